"""``prune``: gradients -> Fisher -> selection -> update -> pruned params, in one call.

Paper names (Yu et al. 2022, Tables 1-4) and how to get them:

==========  ==========================================  ====================================
paper       meaning                                     ``prune(...)``
==========  ==========================================  ====================================
MP          global magnitude pruning, no update         ``method="magnitude"``
WF-S        WoodFisher saliency, no update              ``method="woodfisher"``
WF          WoodFisher saliency + OBS-sum update        ``method="woodfisher", update="obs"``
CBS-S       RMP + local search, no update               ``method="cbs"``
CBS         CBS-S + CBS-U (multi-weight OBS update)     ``method="cbs", update="cbs"``
(ours)      IHT on the damped quadratic + exact re-solve ``method="iht", update="cbs"``
==========  ==========================================  ====================================

The paper's WF uses ``update_scale=0.9`` on MLPNet and MobileNet (cbs.md section 4); every other
update uses 1.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ._budget import BudgetSpec, make_budget
from ._cbs import CBS
from ._fisher import Fisher, check_finite_grads, per_example_grads
from ._iht import IHT
from ._layout import BlockSpec, Prunable, PyTree, make_layout
from ._selectors import Magnitude, Problem, WoodFisher
from ._update import cbs_update, obs_update

__all__ = ["prune", "apply_update", "PruneResult", "make_selector", "METHODS", "UPDATES"]

METHODS = {
    "magnitude": Magnitude,
    "woodfisher": WoodFisher,
    "cbs": CBS,
    "iht": IHT,
}
AUTO_SCALES = tuple(i / 10 for i in range(11))
UPDATES = {None: None, "obs": obs_update, "cbs": cbs_update}
_NO_FISHER = (Magnitude,)


class PruneResult(NamedTuple):
    """Result of :func:`prune`.

    Attributes:
      params: the pruned (and possibly updated) params: same structure and dtypes as the input,
        pruned weights exactly zero.
      masks: bool pytree with the params' structure; True = kept (non-prunable leaves all True).
      info: dict with ``sparsity``, ``layer_sparsity``, ``num_pruned``, ``num_prunable``,
        ``objective`` (the CBS selection objective ``w_P^T F_PP w_P``), ``quadratic_loss``
        (``1/2 dw^T F_lambda dw`` of the applied change), ``loss`` (true loss of the pruned net on
        the loss batch, when one is available), ``timings`` (seconds per phase) and the
        selector's own statistics.
    """

    params: PyTree
    masks: PyTree
    info: dict


def make_selector(method) -> Any:
    """A selector object from a method name (see ``METHODS``) or a selector instance."""
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {sorted(METHODS)} or a selector, got {method!r}")
        return METHODS[method]()
    if not hasattr(method, "select"):
        raise ValueError(f"`method` must be a name in {sorted(METHODS)} or a selector, got {method!r}")
    return method


def _loss_on(layout, loss_fn, params, loss_batch):
    if loss_fn is None or loss_batch is None:
        return None
    return lambda w: loss_fn(layout.unravel(w, params), loss_batch)


@functools.partial(jax.jit, static_argnames=("selector", "layout", "loss_fn", "blocks"))
def _select(selector, layout, loss_fn, blocks, params, grads, damping, loss_batch, k, groups, key):
    w = layout.ravel(params)
    fisher = None if grads is None else Fisher(grads, damping, blocks)
    loss = _loss_on(layout, loss_fn, params, loss_batch)
    problem = Problem(w, fisher, layout.layer_ranges(), loss, groups)
    pruned, stats = selector.select(problem, k, key)
    if fisher is not None:
        stats["objective"] = fisher.quadratic(jnp.where(pruned, w, 0.0))
    return pruned, stats


@functools.partial(jax.jit, static_argnames=("update", "layout", "loss_fn", "blocks", "auto_scale"))
def _apply_update(update, layout, loss_fn, blocks, params, pruned, grads, damping, loss_batch, scale,
                  auto_scale=False):
    w = layout.ravel(params)
    loss = _loss_on(layout, loss_fn, params, loss_batch)
    stats = {}
    if update is None:
        w_new = jnp.where(pruned, 0.0, w)
    elif auto_scale:
        # the update is linear in the scale on the kept weights: score a grid by the true loss
        full = UPDATES[update](w, pruned, Fisher(grads, damping, blocks), 1.0)
        scales = jnp.asarray(AUTO_SCALES, w.dtype)
        losses = jax.lax.map(lambda s: loss(jnp.where(pruned, 0.0, w + s * (full - w))), scales)
        best = scales[jnp.argmin(losses)]
        w_new = jnp.where(pruned, 0.0, w + best * (full - w))
        stats.update(update_scale=best, scale_losses=losses)
    else:
        w_new = UPDATES[update](w, pruned, Fisher(grads, damping, blocks), scale)
    if grads is not None:
        stats["quadratic_loss"] = 0.5 * Fisher(grads, damping, blocks).quadratic(w_new - w, damped=True)
    if loss is not None:
        stats["loss"] = loss(w_new)
    return layout.unravel(w_new, params), stats


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def _to_host(tree):
    def conv(x):
        x = np.asarray(x)
        return x.item() if x.ndim == 0 else x

    return jax.tree.map(conv, tree)


def prune(
    params: PyTree,
    loss_fn: Optional[Callable[[PyTree, PyTree], jax.Array]] = None,
    batch: Optional[PyTree] = None,
    *,
    sparsity: Optional[float] = None,
    method: Union[str, Any] = "magnitude",
    update: Optional[str] = None,
    damping: float = 1e-3,
    blocks: BlockSpec = "model",
    key: Optional[jax.Array] = None,
    prunable: Prunable = None,
    mini_batch: int = 1,
    chunk_size: int = 256,
    loss_batch: Optional[PyTree] = None,
    update_scale: Union[float, str] = 1.0,
    grads: Optional[jax.Array] = None,
    budget: BudgetSpec = "global",
    pattern: Optional[str] = None,
    masks: Optional[PyTree] = None,
    verbose: bool = False,
) -> PruneResult:
    """Prune a fraction ``sparsity`` of the prunable weights of ``params`` in one shot.

    Args:
      params: parameter pytree (linen params dict, whole variables dict, or ``nnx.State``).
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss. Needed by every method but magnitude
        and by every update.
      batch: examples for the Fisher: a pytree of arrays with leading axis ``N * mini_batch``.
      sparsity: fraction in [0, 1) of prunable weights set to zero: exactly
        ``round(sparsity * D)`` of them (per layer: ``round(sparsity * D_l)`` with
        ``budget="uniform"``). May be omitted with ``pattern="N:M"``.
      method: ``"magnitude"`` (MP), ``"woodfisher"`` (WF-S), ``"cbs"`` (CBS-S), ``"iht"``, or a
        selector object such as ``cobs_jax.CBS(num_trials=10)``.
      update: ``None`` (pruned weights just zeroed), ``"obs"`` (WoodFisher OBS-sum update) or
        ``"cbs"`` (CBS-U, the exact multi-weight OBS update).
      damping: lambda > 0 in ``F_lambda = G^T G / N + lambda I`` (paper: 1e-3 MLPNet, 1e-5 convs).
      blocks: Fisher blocks: ``"model"``, ``"layer"`` or a chunk size (int).
      key: PRNG key for randomised selectors (default ``jax.random.key(0)``).
      prunable: which leaves may be pruned (see :func:`cobs_jax.make_layout`).
      mini_batch: examples averaged per gradient row.
      chunk_size: gradient rows computed at once (bounds memory).
      loss_batch: examples on which CBS scores masks by true loss (default: ``batch``).
      update_scale: s in ``w + s * dw``, or ``"auto"``: s in {0, 0.1, ..., 1} with the lowest
        true loss on ``loss_batch`` (11 forward passes; pass a held-out ``loss_batch`` to avoid
        fitting s to the Fisher examples). The chosen s is ``info["update_scale"]``.
      grads: precomputed (N, D) gradient rows (from :func:`cobs_jax.per_example_grads`), to share
        one Fisher across several calls; ``batch`` is then only used as the default loss batch.
      budget: how the pruned weights are spread over layers: ``"global"`` (one ranking over all
        layers), ``"uniform"`` (every layer loses ``sparsity`` of its weights) or a dict
        ``{layer: sparsity}`` (names as ``"Dense_0/kernel"`` or keystr paths; unlisted layers get
        ``sparsity``). Every method honours it, the CBS swap search included.
      pattern: ``None`` (unstructured) or ``"N:M"``, e.g. ``"2:4"``: every M consecutive weights
        along a kernel's input axis (axis -2) keep exactly N. Each method chooses within the
        groups by its own criterion (WF: OBS saliency; CBS: RMP and swaps inside each group) and
        the update is the exact one for the resulting mask.
      masks: an earlier keep-mask (e.g. from a previous stage of gradual pruning): its pruned
        weights stay pruned and count towards the target.
      verbose: print the time of each phase.

    Returns:
      A :class:`PruneResult` ``(params, masks, info)``.

    Raises:
      ValueError: for sparsity outside [0, 1), damping <= 0, an unknown method/update, a missing
        ``loss_fn``/``batch`` where one is needed, mismatched batch leaves or ``grads`` shape,
        no prunable leaves, non-finite gradients (naming the layer), a bad budget or pattern
        (naming the layer that does not fit), or ``masks`` that already exceed the target.
    """
    if not (isinstance(damping, (int, float, np.floating)) and float(damping) > 0 and np.isfinite(damping)):
        raise ValueError(f"`damping` must be a finite number > 0, got {damping!r}")
    if update not in UPDATES:
        raise ValueError(f"`update` must be one of {list(UPDATES)}, got {update!r}")
    auto_scale = isinstance(update_scale, str)
    if auto_scale and update_scale != "auto":
        raise ValueError(f"`update_scale` must be a number or 'auto', got {update_scale!r}")
    if not auto_scale and not np.isfinite(update_scale):
        raise ValueError(f"`update_scale` must be finite, got {update_scale!r}")
    selector = make_selector(method)
    layout = make_layout(params, prunable)
    blocks_t = layout.blocks(blocks)
    frozen = None if masks is None else ~np.asarray(layout.from_masks(masks))
    plan = make_budget(layout, sparsity, budget=budget, pattern=pattern, frozen=frozen)
    k = plan.total
    key = jax.random.key(0) if key is None else key
    needs_fisher = update is not None or not isinstance(selector, _NO_FISHER)
    timings = {}

    if needs_fisher:
        if loss_fn is None:
            raise ValueError(f"`loss_fn` is required for method={method!r}, update={update!r}")
        if grads is None:
            if batch is None:
                raise ValueError(f"`batch` is required for method={method!r}, update={update!r}")
            grads, timings["grads"] = _timed(
                per_example_grads, loss_fn, params, batch, layout, mini_batch=mini_batch,
                chunk_size=chunk_size,
            )
        else:
            grads = jnp.asarray(grads)
            if grads.ndim != 2 or grads.shape[1] != layout.size:
                raise ValueError(
                    f"`grads` must have shape (N, {layout.size}) for these params, got {grads.shape}"
                )
            check_finite_grads(grads, layout)
    else:
        grads = None
    if loss_batch is None:
        loss_batch = batch
    if isinstance(selector, CBS) and (loss_fn is None or loss_batch is None):
        raise ValueError("method 'cbs' scores masks by true loss: pass `loss_fn` and `batch`")
    if auto_scale and (update is None or loss_batch is None):
        raise ValueError("`update_scale='auto'` needs an `update` and a loss batch (`batch` or `loss_batch`)")
    damping_a = jnp.asarray(damping, layout.dtype)
    (pruned, stats), timings["select"] = _timed(
        _select, selector, layout, loss_fn, blocks_t, params, grads, damping_a, loss_batch,
        jnp.asarray(plan.counts, jnp.int32), None if plan.groups is None else jnp.asarray(plan.groups),
        key,
    )
    (new_params, ustats), timings["update"] = _timed(
        _apply_update, update, layout, loss_fn, blocks_t, params, pruned, grads, damping_a,
        loss_batch, jnp.asarray(1.0 if auto_scale else update_scale, layout.dtype), auto_scale,
    )
    keep = ~np.asarray(pruned)
    info = {
        "method": type(selector).__name__,
        "update": update,
        "blocks": blocks,
        "budget": budget,
        "pattern": pattern,
        "num_prunable": layout.size,
        "num_pruned": int(k),
        "sparsity": float(1.0 - keep.mean()),
        "layer_sparsity": layout.per_layer_sparsity(keep),
        "timings": timings,
        **_to_host(stats),
        **_to_host(ustats),
    }
    if verbose:
        print(
            f"[cobs_jax] {info['method']}+{update}: pruned {k}/{layout.size} weights; "
            + ", ".join(f"{name} {t:.3f}s" for name, t in timings.items())
        )
    return PruneResult(new_params, layout.to_masks(jnp.asarray(keep)), info)


def apply_update(
    params: PyTree,
    masks: PyTree,
    grads: jax.Array,
    *,
    update: str = "cbs",
    damping: float = 1e-3,
    blocks: BlockSpec = "model",
    prunable: Prunable = None,
    update_scale: float = 1.0,
) -> PyTree:
    """Apply a compensating update for a given keep-mask (e.g. MP + CBS-U, cbs.md Table 5).

    Args:
      params: the dense params.
      masks: bool keep-mask pytree (True = kept) with the params' structure.
      grads: (N, D) rows from :func:`cobs_jax.per_example_grads` for the same ``prunable`` choice.
      update: ``"cbs"`` or ``"obs"``; damping, blocks, update_scale: as in :func:`prune`.

    Returns:
      params with masked weights exactly zero and the others updated.
    """
    if update not in ("cbs", "obs"):
        raise ValueError(f"`update` must be 'cbs' or 'obs', got {update!r}")
    if not (float(damping) > 0 and np.isfinite(damping)):
        raise ValueError(f"`damping` must be a finite number > 0, got {damping!r}")
    layout = make_layout(params, prunable)
    pruned = ~layout.from_masks(masks)
    grads = jnp.asarray(grads)
    if grads.ndim != 2 or grads.shape[1] != layout.size:
        raise ValueError(f"`grads` must have shape (N, {layout.size}), got {grads.shape}")
    out, _ = _apply_update(
        update, layout, None, layout.blocks(blocks), params, pruned, grads,
        jnp.asarray(damping, layout.dtype), None, jnp.asarray(update_scale, layout.dtype),
    )
    return out
