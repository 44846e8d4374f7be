"""Structured pruning of one consumer layer: remove whole input groups, compensate exactly.

:func:`prune_groups` takes a consumer kernel (the output projection for heads, the down
projection for MLP channels, the next conv for filters), its calibration statistics and the
groups of its input columns, removes ``num_remove`` groups chosen by a :class:`GroupPruner`,
and re-solves the kept weights (and, with an intercept, the bias) to keep the layer's outputs.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .._layer.base import positive_int
from .._layer.hessian import accumulate_dtype
from .._layer.kernels import as_rows, from_rows
from .compensate import Calibration, check_groups, compensate, damped, group_error
from .select import greedy_obs, magnitude_sp, swap_search, wanda_sp

__all__ = ["GroupPruner", "MagnitudeSP", "WandaSP", "GroupOBS", "GroupCBS", "GroupResult", "prune_groups"]


class GroupPruner(abc.ABC):
    """A structured method: chooses ``k`` groups to remove (bool (n,), True = removed).
    ``compensates``: whether the kept weights are re-solved afterwards (the published
    magnitude-sp and Wanda-sp do not)."""

    compensates: ClassVar[bool] = True

    @abc.abstractmethod
    def choose(self, w: jax.Array, h: jax.Array, hd: jax.Array, count: int, groups: jax.Array,
               k: int, families: int = 1) -> tuple[jax.Array, dict[str, Any]]:
        """The removed groups and stats, from the rows-layout ``w``, raw ``h``, damped ``hd``;
        ``k / families`` from each of ``families`` equal consecutive runs of groups."""


@dataclasses.dataclass(frozen=True)
class MagnitudeSP(GroupPruner):
    """FLAP's magnitude-sp: the groups of least summed column norm ``‖W[:, j]‖₂``, no data, no
    compensation (structured.md §3.2)."""

    compensates: ClassVar[bool] = False

    def choose(self, w, h, hd, count, groups, k, families=1):
        return magnitude_sp(w, groups, k, families), {}


@dataclasses.dataclass(frozen=True)
class WandaSP(GroupPruner):
    """FLAP's Wanda-sp: the groups of least summed ``mean_r |W_rj| · sqrt(mean x_j²)``, no
    compensation (structured.md §3.3)."""

    compensates: ClassVar[bool] = False

    def choose(self, w, h, hd, count, groups, k, families=1):
        return wanda_sp(w, h, count, groups, k, families), {}


@dataclasses.dataclass(frozen=True)
class GroupOBS(GroupPruner):
    """Greedy group OBS (ZipLM / SlimGPT's selection with the exact group error): one group at
    a time, each the least error given the removals so far, with OBS updates and downdates."""

    def choose(self, w, h, hd, count, groups, k, families=1):
        removed, steps = greedy_obs(w, hd, groups, k, families)
        return removed, {"step_errors": steps}


@dataclasses.dataclass(frozen=True)
class GroupCBS(GroupPruner):
    """The Combinatorial Brain Surgeon on groups: from greedy group OBS's set, a joint swap
    search on the exact error after compensation (every removed/kept pair scored, the best
    improving swap taken), so the set is chosen jointly. Never worse than :class:`GroupOBS`.
    Every pair's change of the objective comes in closed form from one downdate of the removed
    set's inverse (:func:`~cobs_jax._structured.select.swap_search`): rank 1 for channels,
    ``s × s`` blocks for heads and filters of ``s`` columns.

    Args:
      max_swaps: at most this many swaps.
    """

    max_swaps: int = 64

    def __post_init__(self):
        positive_int(self.max_swaps, "GroupCBS(max_swaps=...)")

    def choose(self, w, h, hd, count, groups, k, families=1):
        start, steps = greedy_obs(w, hd, groups, k, families)
        if k == 0:
            return start, {"swaps": 0, "step_errors": steps}
        removed, swaps = swap_search(w, hd, groups, start, k, self.max_swaps, families)
        return removed, {"swaps": int(swaps), "step_errors": steps}


class GroupResult(NamedTuple):
    """What :func:`prune_groups` returns.

    Attributes:
      kernel: the consumer kernel in its own layout, the removed groups' input columns exactly 0
        (slice them away, with the producers' matching outputs, for a smaller model).
      removed: bool (n_groups,), True = removed.
      bias_delta: ``(d_out,)`` to add to the consumer's bias (zeros without ``intercept``; a
        layer without a bias gains one).
      error: relative output error ``tr(ΔW C ΔWᵀ) / tr(W̄ C W̄ᵀ)`` (C: the undamped, with
        ``intercept`` centred, scatter of the inputs).
      seconds: wall time.
      stats: the method's extras (``GroupCBS``: ``swaps``).
    """

    kernel: jax.Array
    removed: jax.Array
    bias_delta: jax.Array
    error: float
    seconds: float
    stats: dict[str, Any]


def prune_groups(
    kernel: ArrayLike,
    calibration: Union[Calibration, ArrayLike],
    groups: Any,
    *,
    num_remove: int,
    method: GroupPruner = GroupCBS(),
    intercept: bool = False,
    rel_damping: float = 0.01,
    in_axes: Optional[Sequence[int]] = None,
    families: int = 1,
    name: str = "layer",
) -> GroupResult:
    """Remove ``num_remove`` input groups of a consumer kernel and compensate exactly.

    Example:
      >>> import jax, numpy as np, cobs_jax
      >>> x = np.random.default_rng(0).normal(size=(256, 8))      # the consumer's inputs
      >>> w = np.random.default_rng(1).normal(size=(8, 4))        # (d_in, d_out) kernel
      >>> heads = np.arange(8).reshape(4, 2)                      # 4 heads of 2 columns
      >>> r = cobs_jax.structured.prune_groups(w, x.T @ x, heads, num_remove=2)
      >>> int(r.removed.sum()), r.kernel.shape
      (2, (8, 4))

    Args:
      kernel: the consumer kernel in its Flax layout (``(d_in, d_out)``; any kernel with
        ``in_axes``, as in :func:`cobs_jax.prune_layer`).
      calibration: ``XᵀX`` of its inputs, or a :class:`Calibration` (``h``, ``total`` = ``Σ x``,
        ``num_inputs``) — needed for ``intercept`` and for ``WandaSP``'s mean activations.
      groups: ``(n_groups, size)`` input columns of each group (e.g.
        ``np.arange(d).reshape(heads, head_dim)``); disjoint.
      num_remove: how many groups to remove, in ``[0, n_groups)``.
      method: :class:`GroupCBS` (default), :class:`GroupOBS`, :class:`WandaSP`, :class:`MagnitudeSP`.
      intercept: also re-solve the bias (least squares with an intercept column: the removed
        inputs' mean moves into the bias, FLAP's bias compensation done exactly).
      rel_damping: relative damping of the scatter, as in :func:`cobs_jax.prune_layer`.
      in_axes: the kernel's contraction axes (default all but the last).
      families: the groups form this many equal consecutive runs and ``num_remove / families``
        go from each (query heads inside GQA groups: every KV head keeps as many query heads).
      name: the layer's name in errors.

    Returns:
      A :class:`GroupResult`.

    Raises:
      ValueError: bad groups (overlapping, out of range, fewer than two), a bad ``num_remove``,
        NaN/Inf, an intercept without the inputs' sum.
    """
    t0 = time.perf_counter()
    if not isinstance(method, GroupPruner):
        raise ValueError(f"`method` must be a cobs_jax.structured GroupPruner (GroupCBS(), GroupOBS(), WandaSP(), "
                         f"MagnitudeSP()), got {method!r}")
    cal = calibration if isinstance(calibration, Calibration) else Calibration(jnp.asarray(calibration))
    kernel = jnp.asarray(kernel)
    axes = tuple(range(kernel.ndim - 1)) if in_axes is None else tuple(int(a) % kernel.ndim for a in in_axes)
    w_rows, layout = as_rows(kernel, axes)
    d = w_rows.shape[1]
    if cal.h.shape != (d, d):
        raise ValueError(f"{name}: the Hessian is {cal.h.shape} but the kernel has d_in = {d}")
    g = check_groups(groups, d, name)
    n = g.shape[0]
    if isinstance(num_remove, bool) or not isinstance(num_remove, (int, np.integer)) or not 0 <= num_remove < n:
        raise ValueError(f"{name}: `num_remove` must be an int in [0, {n}), got {num_remove!r}")
    positive_int(families, "families")
    if n % families or num_remove % families:
        raise ValueError(f"{name}: `families` = {families} must divide the {n} groups and `num_remove` = {num_remove}")
    if not math.isfinite(rel_damping) or rel_damping <= 0:
        raise ValueError(f"`rel_damping` must be a positive finite number, got {rel_damping!r}")
    dtype = accumulate_dtype()
    cal = Calibration(jnp.asarray(cal.h, dtype), None if cal.total is None else jnp.asarray(cal.total, dtype),
                      int(cal.num_inputs))
    for what, x in (("kernel", kernel), ("Hessian", cal.h)):
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"{name}: the {what} contains NaN or Inf")
    w = w_rows.astype(dtype)
    hd, mu = damped(cal, rel_damping, intercept)
    gj = jnp.asarray(g)
    removed, stats = method.choose(w, cal.h, hd, max(cal.num_inputs, 1), gj, int(num_remove), int(families))
    cols = jnp.zeros(d, bool).at[gj[removed].reshape(-1)].set(True) if num_remove else jnp.zeros(d, bool)
    if method.compensates:
        new, delta = compensate(w, hd, cols, mu)
    else:  # the baseline's weights as they are; with an intercept, FLAP's bias compensation b += W_P μ_P
        new = jnp.where(cols[None, :], 0.0, w)
        delta = jnp.zeros(w.shape[0], dtype) if mu is None else w @ jnp.where(cols, mu, 0.0)
    c = cal.h if mu is None else cal.h - cal.num_inputs * jnp.outer(mu, mu)
    err = float(group_error(w, new, c) / jnp.sum((w @ c) * w))
    out = from_rows(new, layout).astype(kernel.dtype)
    return GroupResult(jax.block_until_ready(out), removed, delta, err, time.perf_counter() - t0, stats)
