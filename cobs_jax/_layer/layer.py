"""Prune one layer from its Hessian H = XᵀX: magnitude, Wanda, SparseGPT, and the exact re-solve.

:func:`prune_layer` is the pure, jit-compiled core of layer-wise pruning: it sees a kernel in its
Flax layout and the layer's Hessian, and returns the pruned kernel and its keep-mask. The model
driver (:func:`cobs_jax.prune_layerwise`) calls it for every kernel of every block.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Optional, Sequence, Union, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from .._core.budget import check_sparsity, parse_pattern
from .hessian import accumulate_dtype
from .._core.keys import as_key
from .cbs import cbs_layer
from .exact import exact_update
from .masks import choose
from .sparsegpt import sparsegpt, sparsegpt_counts

__all__ = ["prune_layer", "LayerInfo", "LAYER_METHODS", "reconstruction_error"]

LAYER_METHODS = ("magnitude", "wanda", "sparsegpt", "cbs")
CBS_STARTS = ("magnitude", "wanda", "sparsegpt")
_DEFAULT_GRANULARITY = {"magnitude": "layer", "wanda": "unit", "sparsegpt": "layer"}
REDAMP_FACTOR, REDAMP_TRIES = 10.0, 4


class LayerInfo(NamedTuple):
    """What :func:`prune_layer` reports with ``return_info=True``.

    Attributes:
      damping: the relative damping used (the requested one unless the Cholesky factorisation
        failed and it was raised, see :func:`prune_layer`).
      error: relative reconstruction error ``tr(ΔW H ΔWᵀ) / tr(W̄ H W̄ᵀ)`` on the undamped H.
      sparsity: the fraction of the kernel's entries that are zero in the mask.
      swaps: ``method="cbs"``: how many kept/pruned swaps the search made over the layer
        (``None`` for the other methods).
    """

    damping: float
    error: float
    sparsity: float
    swaps: Optional[int] = None


def as_rows(kernel: jax.Array, in_axes: Sequence[int]) -> tuple[jax.Array, tuple]:
    """(rows = output units, d_in) view of a kernel whose contraction axes are ``in_axes``."""
    out_axes = [a for a in range(kernel.ndim) if a not in in_axes]
    perm = tuple(in_axes) + tuple(out_axes)
    moved = jnp.transpose(kernel, perm)
    d_in = math.prod(kernel.shape[a] for a in in_axes)
    return moved.reshape(d_in, -1).T, (perm, moved.shape)


def from_rows(rows: jax.Array, layout: tuple) -> jax.Array:
    perm, moved_shape = layout
    return jnp.transpose(rows.T.reshape(moved_shape), tuple(int(a) for a in np.argsort(perm)))


class Factors(NamedTuple):
    """A layer Hessian prepared for pruning (one per distinct H; q/k/v or gate/up share one).

    Attributes:
      h: the damped H (dead inputs given ``H_jj = 1``, then ``damping * mean(diag H)`` added).
      u: the upper Cholesky factor of ``h⁻¹`` (``h⁻¹ = uᵀu``), SparseGPT's ``Hinv``.
      dead: bool (d_in,), inputs that never fire (``H_jj = 0``); their weights are zeroed.
      damping: the relative damping used.
    """

    h: jax.Array
    u: jax.Array
    dead: jax.Array
    damping: float


@jax.jit
def _damped_factor(h, damping):
    """Dead inputs (H_jj = 0) get H_jj = 1, then H + damping * mean(diag H) * I; U with H⁻¹ = UᵀU.

    With J the order-reversing permutation and ``J H J = L Lᵀ`` (one Cholesky),
    ``H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular with a positive diagonal:
    it *is* the upper Cholesky factor of ``H⁻¹``, for one factorisation and one triangular
    inverse (about half the flops of inverting H and factoring the inverse).
    """
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    h = h + damping * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    low = jnp.linalg.cholesky(h[::-1, ::-1])
    u = jax.scipy.linalg.solve_triangular(low, jnp.eye(h.shape[0], dtype=h.dtype), lower=True)[::-1, ::-1]
    ok = jnp.all(jnp.isfinite(low)) & jnp.all(jnp.isfinite(u))
    return h, u, dead, ok


def factor_hessian(h: jax.Array, damping: float, name: str) -> Factors:
    """The :class:`Factors` of ``h``, with the re-damping rule.

    Re-damping rule: if a factorisation fails (H not positive definite to working precision
    even after damping), the relative damping is multiplied by 10 and the factorisation retried,
    up to 4 times in all (0.01 -> 0.1 -> 1 -> 10); after that a ValueError names the layer.
    """
    used = float(damping)
    for _ in range(REDAMP_TRIES):
        hd, u, dead, ok = _damped_factor(h, jnp.asarray(used, h.dtype))
        if bool(ok):
            return Factors(hd, u, dead, used)
        used *= REDAMP_FACTOR
    raise ValueError(
        f"{name}: Cholesky factorisation of the damped Hessian failed even with relative damping "
        f"{used / REDAMP_FACTOR:g} (H is not positive semi-definite: check the activations)"
    )


@jax.jit
def reconstruction_error(w0: jax.Array, w: jax.Array, h: jax.Array) -> jax.Array:
    """``tr(ΔW H ΔWᵀ) / tr(W̄ H W̄ᵀ)`` for rows-layout kernels (rows, d_in)."""
    dw = w - w0
    return jnp.sum((dw @ h) * dw) / jnp.sum((w0 @ h) * w0)


def check_finite(x: jax.Array, what: str) -> None:
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{what} contains NaN or Inf")


def _positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{what}` must be a positive int, got {value!r}")


def check_layer_args(method, update, damping, block_size, granularity, start="sparsegpt", window=64,
                     max_swaps=64) -> None:
    """ValueError naming the first bad argument of :func:`prune_layer`'s options."""
    if method not in LAYER_METHODS:
        raise ValueError(f"`method` must be one of {LAYER_METHODS}, got {method!r}")
    if start not in CBS_STARTS:
        raise ValueError(f"`start` must be one of {CBS_STARTS}, got {start!r}")
    _positive_int(window, "window")
    if window < 2:
        raise ValueError(f"`window` must be at least 2, got {window}")
    _positive_int(max_swaps, "max_swaps")
    if update not in (None, "none", "exact"):
        raise ValueError(f"`update` must be None, 'none' or 'exact', got {update!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < math.inf:
        raise ValueError(f"`damping` must be a positive finite number, got {damping!r}")
    _positive_int(block_size, "block_size")
    if granularity not in (None, "layer", "unit"):
        raise ValueError(f"`granularity` must be None, 'layer' or 'unit', got {granularity!r}")


def _resolve_sparsity(sparsity, pattern, d_in, method, block_size, name):
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
    if method == "sparsegpt" and block_size % m:
        raise ValueError(f"`block_size`={block_size} must be a multiple of M={m} for `pattern` {pattern!r}")
    return (m - n) / m, nm


@overload
def prune_layer(
    kernel: ArrayLike,
    hessian: ArrayLike,
    *,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    method: str = "sparsegpt",
    update: Optional[str] = None,
    damping: float = 0.01,
    block_size: int = 128,
    granularity: Optional[str] = None,
    start: str = "sparsegpt",
    window: int = 64,
    max_swaps: int = 64,
    in_axes: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh] = None,
    key: Any = None,
    return_info: Literal[False] = False,
    name: str = "layer",
) -> tuple[jax.Array, jax.Array]: ...


@overload
def prune_layer(
    kernel: ArrayLike,
    hessian: ArrayLike,
    *,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    method: str = "sparsegpt",
    update: Optional[str] = None,
    damping: float = 0.01,
    block_size: int = 128,
    granularity: Optional[str] = None,
    start: str = "sparsegpt",
    window: int = 64,
    max_swaps: int = 64,
    in_axes: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh] = None,
    key: Any = None,
    return_info: Literal[True],
    name: str = "layer",
) -> tuple[jax.Array, jax.Array, LayerInfo]: ...


def prune_layer(
    kernel: ArrayLike,
    hessian: ArrayLike,
    *,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    method: str = "sparsegpt",
    update: Optional[str] = None,
    damping: float = 0.01,
    block_size: int = 128,
    granularity: Optional[str] = None,
    start: str = "sparsegpt",
    window: int = 64,
    max_swaps: int = 64,
    in_axes: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh] = None,
    key: Any = None,
    return_info: bool = False,
    name: str = "layer",
) -> Union[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array, LayerInfo]]:
    """Prune one kernel to keep the layer's outputs on the calibration data that made ``hessian``.

    Args:
      kernel: the kernel in its Flax layout: ``(d_in, d_out)`` for Dense/Linear, ``(kh, kw, c_in,
        c_out)`` for Conv (its input axes are flattened in that order, as in
        ``jax.lax.conv_general_dilated_patches``-style patches ``kh * kw * c_in``), or any einsum
        kernel with its contraction axes given by ``in_axes``.
      hessian: ``XᵀX`` of the layer's inputs, ``(d_in, d_in)`` (:func:`cobs_jax.layer_hessian`);
        any positive scale (sum or mean) gives the same result.
      sparsity: fraction of weights to set to exactly zero, in [0, 1). Optional with ``pattern``.
      pattern: ``None``/``"unstructured"`` or ``"N:M"`` (N of every M consecutive inputs of each
        output unit kept, along the flattened input axis: ``"2:4"``, ``"4:8"``).
      method: ``"magnitude"`` (|W|), ``"wanda"`` (|W_ij| * ||X_j||_2, Sun et al. 2024; no update),
        ``"sparsegpt"`` (Frantar & Alistarh 2023: mask per column block from the partly
        updated weights, OBS updates through the Cholesky factor of H⁻¹) or ``"cbs"``
        (Combinatorial Brain Surgeon on the layer objective: from ``start``'s mask, a swap
        search per output unit on the loss after the optimal update, then the exact weights;
        never worse than ``start`` with ``update="exact"``; see ``cobs_jax._layer_cbs``).
      update: ``None`` (the method's own weights) or ``"exact"``: the kept weights of every output
        unit re-solved to the least-squares optimum for the chosen mask (against the original
        kernel, on the damped H).
      damping: relative damping: ``damping * mean(diag H)`` is added to H's diagonal (SparseGPT's
        ``percdamp``; used by ``sparsegpt`` and ``update="exact"``). If the damped H still fails
        to factor, the damping is multiplied by 10 and retried (up to 3 times), then an error is
        raised; ``return_info=True`` reports the damping used.
      block_size: SparseGPT's column block (its mask-selection and lazy-update block).
      granularity: where the unstructured count is exact: ``"layer"`` (``round(s * size)`` over the
        kernel; SparseGPT: the block's share over the rows x block slab, as published) or ``"unit"``
        (``round(s * d_in)`` in every output unit). Default: the method's published choice
        (magnitude and SparseGPT ``"layer"``, Wanda ``"unit"``; CBS: its ``start``'s). Ignored
        with ``pattern``.
      start: ``method="cbs"`` only: the method whose mask the search starts from
        (``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``).
      window: ``method="cbs"`` only: inputs per output unit whose keep/prune decision is
        reopened (its least salient kept and most salient pruned inputs; N:M: whole groups).
      max_swaps: ``method="cbs"`` only: at most this many swaps per output unit.
      in_axes: the contraction (input) axes of ``kernel``; default all axes but the last.
      mesh: optional ``jax.sharding.Mesh``: the per-output-unit work of ``method="cbs"`` and
        ``update="exact"`` (each unit's factorisation and swap search) is split over its first
        axis; the result equals the single-device one.
      key: accepted for API uniformity with randomised selectors; these methods are deterministic.
      return_info: also return a :class:`LayerInfo` (damping used, reconstruction error, sparsity).
      name: the layer's name in error messages.

    Returns:
      ``(new_kernel, mask)``, or ``(new_kernel, mask, info)`` with ``return_info=True``: the
      kernel in its own layout and dtype with pruned entries exactly 0, the bool keep-mask
      (True = kept) and a :class:`LayerInfo`.

    Raises:
      ValueError: for a bad argument (naming it), shape mismatches between kernel and H, a
        non-square H, NaN/Inf in the kernel or H, or a factorisation that fails after re-damping.
    """
    check_layer_args(method, update, damping, block_size, granularity, start, window, max_swaps)
    as_key(key)  # validated for uniformity; these methods are deterministic
    kernel = jnp.asarray(kernel)
    h = jnp.asarray(hessian)
    if kernel.ndim < 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"{name}: `kernel` must be a floating array with ndim >= 2, got {kernel.dtype}{kernel.shape}")
    if kernel.size == 0:
        raise ValueError(f"{name}: `kernel` has no entries (shape {kernel.shape})")
    if in_axes is None:
        axes = tuple(range(kernel.ndim - 1))
    else:
        raw = tuple(in_axes)
        if not all(isinstance(a, (int, np.integer)) and -kernel.ndim <= a < kernel.ndim for a in raw):
            raise ValueError(f"`in_axes` must be axes of the {kernel.ndim}-d kernel, got {in_axes!r}")
        axes = tuple(int(a) % kernel.ndim for a in raw)
    if not axes or len(set(axes)) != len(axes) or len(axes) >= kernel.ndim:
        raise ValueError(f"`in_axes` must name distinct axes of the {kernel.ndim}-d kernel, leaving an output axis; got {in_axes!r}")
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
    out = prune_checked(kernel, h.astype(accumulate_dtype()), sparsity=sparsity, pattern=pattern, method=method,
                        update=update, damping=damping, block_size=block_size, granularity=granularity,
                        start=start, window=window, max_swaps=max_swaps, in_axes=axes, name=name, mesh=mesh)
    if not return_info:
        return out[0], out[1]
    return out


def needs_factors(method: str, update: Optional[str]) -> bool:
    """Whether ``method`` / ``update`` use the factorised Hessian."""
    return method in ("sparsegpt", "cbs") or update == "exact"


def prune_checked(
    kernel: jax.Array,
    h: jax.Array,
    *,
    sparsity: Optional[float],
    pattern: Optional[str],
    method: str,
    update: Optional[str],
    damping: float,
    block_size: int,
    granularity: Optional[str],
    in_axes: tuple[int, ...],
    name: str,
    start: str = "sparsegpt",
    window: int = 64,
    max_swaps: int = 64,
    factors: Optional[Factors] = None,
    mesh: Optional[Mesh] = None,
) -> tuple[jax.Array, jax.Array, LayerInfo]:
    """:func:`prune_layer` on arguments already checked (finite, matching shapes, H in the
    accumulation dtype), with optional precomputed :class:`Factors` of H (the model driver
    factors a Hessian shared by several layers once)."""
    if not float(jnp.max(jnp.diagonal(h))) > 0:
        raise ValueError(f"{name}: its Hessian is all zero (the layer's calibration inputs are all zero), so every "
                         "mask fits equally; check the calibration data or leave the layer dense")
    w_rows, layout = as_rows(kernel, in_axes)
    d_in = w_rows.shape[1]
    select = start if method == "cbs" else method  # the method whose mask is chosen first
    sparsity, nm = _resolve_sparsity(sparsity, pattern, d_in, select, block_size, name)
    gran = granularity or _DEFAULT_GRANULARITY[select]
    w0 = w_rows.astype(h.dtype)
    used = float(damping)
    if needs_factors(method, update):
        if factors is None:
            factors = factor_hessian(h, damping, name)
        used = factors.damping
        w0 = jnp.where(factors.dead[None, :], 0.0, w0)
    if select == "sparsegpt":
        assert factors is not None
        rows, d = w0.shape
        counts = None if nm else jnp.asarray(sparsegpt_counts(sparsity, rows, d, block_size, gran))
        w, keep = sparsegpt(w0, factors.u, counts, block_size=block_size, nm=nm, granularity=gran)
    else:
        score = jnp.abs(w0)
        if select == "wanda":
            score = score * jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0))[None, :]
        keep = ~choose(score, sparsity, gran, nm)
        w = jnp.where(keep, w0, 0.0)
    swaps = None
    if method == "cbs":
        assert factors is not None
        w, keep, swaps = cbs_layer(w0, factors.h, factors.u, keep, window=window, max_swaps=max_swaps, nm=nm,
                                   mesh=mesh)
    elif update == "exact":
        assert factors is not None
        w = exact_update(w0, factors.h, factors.u, np.asarray(keep), mesh=mesh)
    err, finite = _error_and_finite(w_rows.astype(h.dtype), w, h)
    if not bool(finite):
        raise ValueError(f"{name}: the pruned kernel is not finite (ill-conditioned Hessian); raise `damping`")
    new_kernel = from_rows(w, layout).astype(kernel.dtype)
    mask = from_rows(keep, layout)
    return new_kernel, mask, LayerInfo(used, float(err), 1.0 - float(jnp.mean(mask)), swaps)


@jax.jit
def _error_and_finite(w0, w, h):
    return reconstruction_error(w0, w, h), jnp.all(jnp.isfinite(w))
