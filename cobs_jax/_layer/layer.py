"""Prune one layer from its Hessian H = XᵀX with a :class:`~cobs_jax.layer.LayerPruner`.

:func:`prune_layer` sees a kernel in its Flax layout and the layer's Hessian, and returns a
:class:`LayerResult`: the pruned kernel, its keep-mask and what the run measured. The model
driver (:func:`cobs_jax.prune_layerwise`) calls :func:`solve_layer` for every kernel of every
block.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from .._core.budget import check_sparsity, parse_pattern
from .._core.deprecation import reject_unknown, take_renamed
from .._core.keys import as_key
from .base import LayerProblem, LayerPruner, LayerUpdate
from .hessian import Factors, accumulate_dtype, factor_hessian, reconstruction_error
from .kernels import as_rows, from_rows
from .registry import as_pruner, as_update, from_flat_options

__all__ = ["prune_layer", "LayerResult", "LayerInfo", "solve_layer"]

_RELATIVE = " (the layer half's damping is relative to mean(diag H))"


class LayerResult(NamedTuple):
    """What :func:`prune_layer` returns.

    Attributes:
      kernel: the pruned kernel in its own layout and dtype, pruned entries exactly 0.
      mask: the bool keep-mask (True = kept), of the kernel's shape.
      error: relative reconstruction error ``tr(ΔW H ΔWᵀ) / tr(W̄ H W̄ᵀ)`` on the undamped H.
      sparsity: the fraction of the kernel's entries pruned.
      rel_damping: the relative damping used (the requested one unless the factorisation failed
        and it was raised; see :func:`prune_layer`).
      seconds: wall time of the call.
      stats: the method's own extras (``CBS``: ``{"swaps": n}``).
    """

    kernel: jax.Array
    mask: jax.Array
    error: float
    sparsity: float
    rel_damping: float
    seconds: float
    stats: dict[str, Any]


class LayerInfo(NamedTuple):
    """Deprecated (``prune_layer(..., return_info=True)`` of version 0.1): use :class:`LayerResult`."""

    damping: float
    error: float
    sparsity: float
    swaps: Optional[int] = None


def check_finite(x: jax.Array, what: str) -> None:
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{what} contains NaN or Inf")


def check_rel_damping(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"`rel_damping` must be a positive finite number, got {value!r}")
    return float(value)


def resolve_sparsity(sparsity: Optional[float], pattern: Optional[str], d_in: int,
                     name: str) -> tuple[Optional[float], Optional[tuple[int, int]]]:
    """``(sparsity, nm)`` from the ``sparsity`` / ``pattern`` pair, checked against ``d_in``."""
    nm = parse_pattern(pattern)
    if nm is None:
        if sparsity is None:
            raise ValueError("`sparsity` is required (or give `pattern='N:M'`)")
        return check_sparsity(sparsity), None
    n, m = nm
    if sparsity is not None and abs(check_sparsity(sparsity) - (m - n) / m) > 1e-9:
        raise ValueError(f"`sparsity`={sparsity} contradicts `pattern`={pattern!r} (sparsity {(m - n) / m:g})")
    if d_in % m:
        raise ValueError(f"{name}: `pattern` {pattern!r} needs an input size that is a multiple of {m}, got {d_in}")
    return None, nm


def uses_factors(pruner: LayerPruner, update: Optional[LayerUpdate]) -> bool:
    return pruner.uses_factors or (update is not None and update.uses_factors)


def solve_layer(
    kernel: jax.Array,
    h: jax.Array,
    pruner: LayerPruner,
    update: Optional[LayerUpdate],
    *,
    sparsity: Optional[float],
    pattern: Optional[str],
    rel_damping: float,
    in_axes: tuple[int, ...],
    name: str,
    factors: Optional[Factors] = None,
    mesh: Optional[Mesh] = None,
) -> LayerResult:
    """:func:`prune_layer` on arguments already checked (finite, matching shapes, H in the
    accumulation dtype), with optional precomputed :class:`Factors` of H (the model driver
    factors a Hessian shared by several layers once)."""
    t0 = time.perf_counter()
    if not float(jnp.max(jnp.diagonal(h))) > 0:
        raise ValueError(f"{name}: its Hessian is all zero (the layer's calibration inputs are all zero), so every "
                         "mask fits equally; check the calibration data or leave the layer dense")
    w_rows, layout = as_rows(kernel, in_axes)
    sparsity, nm = resolve_sparsity(sparsity, pattern, w_rows.shape[1], name)
    pruner.check(w_rows.shape[1], nm, name)
    w0 = w_rows.astype(h.dtype)
    used = rel_damping
    if uses_factors(pruner, update):
        if factors is None:
            factors = factor_hessian(h, rel_damping, name)
        used = factors.damping
        w0 = jnp.where(factors.dead[None, :], 0.0, w0)
    problem = LayerProblem(w0, h, factors, sparsity, nm, mesh)
    w, keep, stats = pruner.prune(problem)
    if update is not None:
        w = update.apply(problem, keep)
    err, finite = _error_and_finite(w_rows.astype(h.dtype), w, h)
    if not bool(finite):
        raise ValueError(f"{name}: the pruned kernel is not finite (ill-conditioned Hessian); raise `rel_damping`")
    new_kernel = jax.block_until_ready(from_rows(w, layout).astype(kernel.dtype))
    mask = from_rows(keep, layout)
    return LayerResult(new_kernel, mask, float(err), 1.0 - float(jnp.mean(mask)), used, time.perf_counter() - t0,
                       dict(stats))


@jax.jit
def _error_and_finite(w0, w, h):
    return reconstruction_error(w0, w, h), jnp.all(jnp.isfinite(w))


def _in_axes(kernel: jax.Array, in_axes: Optional[Sequence[int]]) -> tuple[int, ...]:
    if in_axes is None:
        return tuple(range(kernel.ndim - 1))
    raw = tuple(in_axes)
    if not all(isinstance(a, (int, np.integer)) and -kernel.ndim <= a < kernel.ndim for a in raw):
        raise ValueError(f"`in_axes` must be axes of the {kernel.ndim}-d kernel, got {in_axes!r}")
    axes = tuple(int(a) % kernel.ndim for a in raw)
    if not axes or len(set(axes)) != len(axes) or len(axes) >= kernel.ndim:
        raise ValueError(f"`in_axes` must name distinct axes of the {kernel.ndim}-d kernel, leaving an output axis; "
                         f"got {in_axes!r}")
    return axes


def prune_layer(
    kernel: ArrayLike,
    hessian: ArrayLike,
    *,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    method: Union[str, LayerPruner] = "sparsegpt",
    update: Union[None, str, LayerUpdate] = None,
    rel_damping: float = 0.01,
    in_axes: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh] = None,
    key: Any = None,
    name: str = "layer",
    **deprecated: Any,
) -> Any:
    """Prune one kernel to keep the layer's outputs on the calibration data that made ``hessian``.

    Example:
      >>> import jax, cobs_jax
      >>> x = jax.random.normal(jax.random.key(0), (256, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> r = cobs_jax.prune_layer(w, cobs_jax.layer_hessian(x), sparsity=0.5,
      ...                          method=cobs_jax.layer.SparseGPT(block_size=8))
      >>> print(f"{r.sparsity:.2f}", r.kernel.shape, r.mask.dtype)
      0.50 (16, 8) bool

    Args:
      kernel: the kernel in its Flax layout: ``(d_in, d_out)`` for Dense/Linear, ``(kh, kw, c_in,
        c_out)`` for Conv (input axes flattened in that order), or any einsum kernel with its
        contraction axes given by ``in_axes``.
      hessian: ``XᵀX`` of the layer's inputs, ``(d_in, d_in)`` (:func:`cobs_jax.layer_hessian`);
        any positive scale (sum or mean) gives the same result.
      sparsity: fraction of weights to set to exactly zero, in [0, 1). Optional with ``pattern``.
      pattern: ``None``/``"unstructured"`` or ``"N:M"`` (N of every M consecutive inputs of each
        output unit kept, along the flattened input axis: ``"2:4"``, ``"4:8"``).
      method: a layer pruner, :class:`cobs_jax.layer.Magnitude`, :class:`~cobs_jax.layer.Wanda`,
        :class:`~cobs_jax.layer.SparseGPT` or :class:`~cobs_jax.layer.CBS` with its options, or
        its name (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ``"cbs"``) for the defaults.
      update: ``None`` (the method's own weights) or :class:`cobs_jax.layer.Exact` (``"exact"``):
        the kept weights of every output unit re-solved to the least-squares optimum for the
        chosen mask (against the original kernel, on the damped H).
      rel_damping: relative damping: ``rel_damping * mean(diag H)`` is added to H's diagonal
        (SparseGPT's ``percdamp``; for the methods and updates that factor H). If the damped H
        still fails to factor, it is multiplied by 10 and retried (up to 3 times), then an
        error is raised; the result reports the damping used.
      in_axes: the contraction (input) axes of ``kernel``; default all axes but the last.
      mesh: optional ``jax.sharding.Mesh``: per-output-unit work (CBS's search, the exact
        re-solve) is split over its first axis; the result equals the single-device one.
      key: accepted for API uniformity with randomised selectors; these methods are deterministic.
      name: the layer's name in error messages.
      **deprecated: version 0.1's ``damping`` (now ``rel_damping``), ``block_size``,
        ``granularity``, ``start``, ``window``, ``max_swaps`` (now options of the method object)
        and ``return_info`` still work, with a DeprecationWarning; with ``return_info`` given the
        old ``(kernel, mask)`` / ``(kernel, mask, LayerInfo)`` tuples are returned.

    Returns:
      A :class:`LayerResult`.

    Raises:
      ValueError: for a bad argument (naming it), shape mismatches between kernel and H, a
        non-square or non-symmetric H, NaN/Inf in the kernel or H, or a factorisation that
        fails after re-damping.
    """
    options = dict(deprecated)
    method = from_flat_options(method, options, "prune_layer")
    rel_damping = take_renamed(options, "damping", "rel_damping", rel_damping, "prune_layer", _RELATIVE)
    return_info = options.pop("return_info", None)
    reject_unknown(options, "prune_layer")
    pruner, upd = as_pruner(method), as_update(update)
    rel_damping = check_rel_damping(rel_damping)
    as_key(key)  # validated for uniformity; these methods are deterministic
    kernel = jnp.asarray(kernel)
    h = jnp.asarray(hessian)
    if kernel.ndim < 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"{name}: `kernel` must be a floating array with ndim >= 2, got {kernel.dtype}{kernel.shape}")
    if kernel.size == 0:
        raise ValueError(f"{name}: `kernel` has no entries (shape {kernel.shape})")
    axes = _in_axes(kernel, in_axes)
    d_in = math.prod(kernel.shape[a] for a in axes)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name}: `hessian` must be a square (d_in, d_in) matrix, got shape {h.shape}")
    if h.shape[0] != d_in:
        raise ValueError(f"{name}: `hessian` is {h.shape} but the kernel {kernel.shape} has d_in = {d_in} (in_axes {axes})")
    check_finite(kernel, f"{name}: `kernel`")
    check_finite(h, f"{name}: `hessian`")
    scale = float(jnp.max(jnp.abs(h)))
    if not bool(jnp.allclose(h, h.T, rtol=1e-5, atol=1e-6 * scale)):
        raise ValueError(f"{name}: `hessian` is not symmetric (XᵀX is): check that it is a layer Hessian")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    result = solve_layer(kernel, h.astype(accumulate_dtype()), pruner, upd, sparsity=sparsity, pattern=pattern,
                         rel_damping=rel_damping, in_axes=axes, name=name, mesh=mesh)
    if return_info is None:
        return result
    warnings.warn("`prune_layer(return_info=...)` is deprecated: prune_layer returns a LayerResult "
                  "(.kernel, .mask, .error, .sparsity, .rel_damping, .stats)", DeprecationWarning, stacklevel=2)
    if not return_info:
        return result.kernel, result.mask
    return result.kernel, result.mask, LayerInfo(result.rel_damping, result.error, result.sparsity,
                                                 result.stats.get("swaps"))
