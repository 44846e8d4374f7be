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

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .._core.budget import BudgetSpec, make_budget
from .._core.deprecation import reject_unknown, take_renamed
from .._core.exclude import Exclude
from .._core.keys import as_key
from .._core.layout import BlockSpec, Prunable, PyTree, make_layout
from .._core.mesh import check_rows_divisible, on_mesh, place, row_axis
from .cbs import CBS
from .fisher import Fisher, check_finite_grads, per_example_grads
from .iht import IHT
from .magnitude import Magnitude
from .problem import Problem
from .update import cbs_update, obs_update
from .woodfisher import WoodFisher

__all__ = ["prune", "prune_sweep", "apply_update", "PruneResult", "make_selector", "METHODS", "UPDATES"]

METHODS = {
    "magnitude": Magnitude,
    "woodfisher": WoodFisher,
    "cbs": CBS,
    "iht": IHT,
}
AUTO_SCALES = tuple(i / 10 for i in range(11))
UPDATES = {None: None, "obs": obs_update, "cbs": cbs_update}
NO_FISHER = (Magnitude,)


class PruneResult(NamedTuple):
    """Result of :func:`prune` (and of each level of :func:`prune_sweep`).

    Attributes:
      params: the pruned (and possibly updated) params: same structure and dtypes as the input,
        pruned weights exactly zero.
      masks: bool pytree with the params' structure; True = kept (non-prunable leaves all True).
      sparsity: the fraction of prunable weights pruned.
      layer_sparsity: ``{leaf path: fraction pruned}`` per prunable leaf.
      num_pruned: how many prunable weights were pruned.
      num_prunable: how many weights were prunable (D).
      loss: the true loss of the pruned net on the loss batch, when one was available, else None.
      timings: seconds per phase (``grads``, ``select``, ``update``).
      stats: what else the run measured: ``method``, ``update``, ``objective`` (the CBS selection
        objective ``w_P^T F_PP w_P``), ``quadratic_loss`` (``1/2 dw^T F_lambda dw`` of the applied
        change), the options that shaped it (``fisher_blocks``, ``budget``, ``pattern``) and the
        selector's own statistics (e.g. CBS's ``ls_swaps``, IHT's ``iht_iterations``).
    """

    params: PyTree
    masks: PyTree
    sparsity: float
    layer_sparsity: dict[str, float]
    num_pruned: int
    num_prunable: int
    loss: Optional[float]
    timings: dict[str, float]
    stats: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """Deprecated: version 0.1's single dict (the typed fields and ``stats`` merged)."""
        warnings.warn("`PruneResult.info` is deprecated: use its fields (.sparsity, .layer_sparsity, .num_pruned, "
                      ".num_prunable, .loss, .timings) and .stats", DeprecationWarning, stacklevel=2)
        return info_dict(self)


def info_dict(res: Any) -> dict[str, Any]:
    """Version 0.1's ``info`` dict of a result: its typed fields and ``stats`` merged."""
    out = {k: v for k, v in res._asdict().items() if k not in ("params", "masks", "stats")}
    if out.get("loss") is None:
        out.pop("loss", None)
    return {**out, **res.stats}


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


def make_fisher(grads, damping, blocks, mesh):
    if grads is None:
        return None
    if mesh is None:
        return Fisher(grads, damping, blocks)
    return Fisher(grads, damping, blocks, row_axis(mesh), mesh.shape[row_axis(mesh)])


@functools.partial(jax.jit, static_argnames=("selector", "layout", "loss_fn", "blocks", "mesh", "batched"))
def _select(selector, layout, loss_fn, blocks, mesh, params, grads, damping, loss_batch, k, groups, key,
            batched=False):
    def body(params, grads, damping, loss_batch, k, groups, key):
        w = layout.ravel(params)
        fisher = make_fisher(grads, damping, blocks, mesh)
        loss = _loss_on(layout, loss_fn, params, loss_batch)
        problem = Problem(w, fisher, layout.layer_ranges(), loss, groups)

        def one(k, key):
            pruned, stats = selector.select(problem, k, key)
            if fisher is not None:
                stats["objective"] = fisher.quadratic(jnp.where(pruned, w, 0.0))
            return pruned, stats

        return jax.vmap(one)(k, key) if batched else one(k, key)

    return on_mesh(body, mesh)(params, grads, damping, loss_batch, k, groups, key)


@functools.partial(
    jax.jit, static_argnames=("update", "layout", "loss_fn", "blocks", "mesh", "auto_scale", "batched")
)
def _apply_update(update, layout, loss_fn, blocks, mesh, params, pruned, grads, damping, loss_batch, scale,
                  auto_scale=False, batched=False):
    def body(params, grads, damping, loss_batch, scale, pruned):
        w = layout.ravel(params)
        loss = _loss_on(layout, loss_fn, params, loss_batch)
        fisher = make_fisher(grads, damping, blocks, mesh)

        def one(pruned):
            stats = {}
            if update is None:
                w_new = jnp.where(pruned, 0.0, w)
            elif auto_scale:
                # the update is linear in the scale on the kept weights: score a grid by the true loss
                full = UPDATES[update](w, pruned, fisher, 1.0)
                scales = jnp.asarray(AUTO_SCALES, w.dtype)
                losses = jax.lax.map(lambda s: loss(jnp.where(pruned, 0.0, w + s * (full - w))), scales)
                best = scales[jnp.argmin(losses)]
                w_new = jnp.where(pruned, 0.0, w + best * (full - w))
                stats.update(update_scale=best, scale_losses=losses)
            else:
                w_new = UPDATES[update](w, pruned, fisher, scale)
            if fisher is not None:
                stats["quadratic_loss"] = 0.5 * fisher.quadratic(w_new - w, damped=True)
            if loss is not None:
                stats["loss"] = loss(w_new)
            return layout.unravel(w_new, params), stats

        return jax.vmap(one)(pruned) if batched else one(pruned)

    return on_mesh(body, mesh)(params, grads, damping, loss_batch, scale, pruned)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def _to_host(tree):
    def conv(x):
        x = np.asarray(x)
        return x.item() if x.ndim == 0 else x

    return jax.tree.map(conv, tree)


class _Setup(NamedTuple):
    """What :func:`prune` and :func:`prune_sweep` share once the arguments are checked."""

    selector: Any
    layout: Any
    blocks: tuple
    params: PyTree
    grads: Optional[jax.Array]
    damping: jax.Array
    loss_batch: Optional[PyTree]
    auto_scale: bool
    scale: jax.Array
    timings: dict


def renamed_fisher_options(options: dict, abs_damping, fisher_blocks, where: str) -> tuple[Any, Any]:
    """``(abs_damping, fisher_blocks)`` with version 0.1's ``damping`` / ``blocks`` taken from
    ``options`` (with a DeprecationWarning); any other leftover keyword raises a TypeError."""
    abs_damping = take_renamed(options, "damping", "abs_damping", abs_damping, where,
                               " (the Fisher half's damping is the absolute lambda)")
    fisher_blocks = take_renamed(options, "blocks", "fisher_blocks", fisher_blocks, where,
                                 " (`blocks` names a model's blocks in the layer half)")
    reject_unknown(options, where)
    return abs_damping, fisher_blocks


def check_abs_damping(damping) -> None:
    if not (isinstance(damping, (int, float, np.floating)) and float(damping) > 0 and np.isfinite(damping)):
        raise ValueError(f"`abs_damping` must be a finite number > 0, got {damping!r}")


def check_damping_update_mesh(damping, update, mesh) -> None:
    """``ValueError`` for damping that is not a finite number > 0, an unknown update or a bad mesh."""
    check_abs_damping(damping)
    if update not in UPDATES:
        raise ValueError(f"`update` must be one of {list(UPDATES)}, got {update!r}")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"`mesh` must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")


def _setup(params, loss_fn, batch, *, method, update, damping, blocks, prunable, exclude, mini_batch, chunk_size,
           loss_batch, update_scale, grads, mesh, progress=False) -> _Setup:
    """Check the arguments shared by prune and prune_sweep; compute (or place) G."""
    check_damping_update_mesh(damping, update, mesh)
    auto_scale = isinstance(update_scale, str)
    if auto_scale and update_scale != "auto":
        raise ValueError(f"`update_scale` must be a number or 'auto', got {update_scale!r}")
    if not auto_scale and not np.isfinite(update_scale):
        raise ValueError(f"`update_scale` must be finite, got {update_scale!r}")
    selector = make_selector(method)
    if progress and isinstance(selector, CBS):
        selector = dataclasses.replace(selector, progress=True)
    layout = make_layout(params, prunable, exclude)
    layout.check_finite(params)
    blocks_t = layout.blocks(blocks)
    needs_fisher = update is not None or not isinstance(selector, NO_FISHER)
    timings = {}
    if needs_fisher:
        if loss_fn is None:
            raise ValueError(f"`loss_fn` is required for method={method!r}, update={update!r}")
        if grads is None:
            if batch is None:
                raise ValueError(f"`batch` is required for method={method!r}, update={update!r}")
            grads, timings["grads"] = _timed(
                per_example_grads, params, loss_fn, batch, layout, mini_batch=mini_batch,
                chunk_size=chunk_size, mesh=mesh, progress=progress,
            )
        else:
            if np.ndim(grads) != 2 or np.shape(grads)[1] != layout.size:
                raise ValueError(
                    f"`grads` must have shape (N, {layout.size}) for these params, got {np.shape(grads)}"
                )
            check_rows_divisible(np.shape(grads)[0], mesh)
            grads = jnp.asarray(grads) if mesh is None else place(grads, mesh, P(row_axis(mesh)))
            check_finite_grads(grads, layout)
    else:
        grads = None
    if loss_batch is None:
        loss_batch = batch
    if isinstance(selector, CBS) and (loss_fn is None or loss_batch is None):
        raise ValueError("method 'cbs' scores masks by true loss: pass `loss_fn` and `batch`")
    if auto_scale and (update is None or loss_batch is None):
        raise ValueError("`update_scale='auto'` needs an `update` and a loss batch (`batch` or `loss_batch`)")
    return _Setup(
        selector, layout, blocks_t, place(params, mesh), grads,
        place(jnp.asarray(damping, layout.dtype), mesh), place(loss_batch, mesh), auto_scale,
        place(jnp.asarray(1.0 if auto_scale else update_scale, layout.dtype), mesh), timings,
    )


def _run(st: _Setup, loss_fn, update, mesh, counts, groups, key, batched=False):
    """Selection then update (timed into ``st.timings``); with ``batched`` over leading axes."""
    (pruned, stats), st.timings["select"] = _timed(
        _select, st.selector, st.layout, loss_fn, st.blocks, mesh, st.params, st.grads, st.damping,
        st.loss_batch, place(jnp.asarray(counts, jnp.int32), mesh),
        None if groups is None else place(jnp.asarray(groups), mesh), place(key, mesh), batched=batched,
    )
    (new_params, ustats), st.timings["update"] = _timed(
        _apply_update, update, st.layout, loss_fn, st.blocks, mesh, st.params, pruned, st.grads,
        st.damping, st.loss_batch, st.scale, st.auto_scale, batched=batched,
    )
    return new_params, pruned, stats, ustats


def _result(st: _Setup, new_params, pruned, stats, ustats, extra) -> PruneResult:
    keep = ~np.asarray(pruned)
    stats = {"method": type(st.selector).__name__, **extra, **_to_host(stats), **_to_host(ustats)}
    loss = stats.pop("loss", None)
    return PruneResult(new_params, st.layout.to_masks(jnp.asarray(keep)), float(1.0 - keep.mean()),
                       st.layout.per_layer_sparsity(keep), int(np.sum(~keep)), st.layout.size,
                       None if loss is None else float(loss), dict(st.timings), stats)


def _log(st: _Setup, what: str):
    print(f"[cobs_jax] {what}; " + ", ".join(f"{name} {t:.3f}s" for name, t in st.timings.items()))


def prune(
    params: PyTree,
    loss_fn: Optional[Callable[[PyTree, PyTree], jax.Array]] = None,
    batch: Optional[PyTree] = None,
    *,
    sparsity: Optional[float] = None,
    method: Union[str, Any] = "magnitude",
    update: Optional[str] = None,
    abs_damping: float = 1e-3,
    fisher_blocks: BlockSpec = "model",
    key: Union[None, int, jax.Array] = None,
    prunable: Prunable = None,
    exclude: Exclude = None,
    mini_batch: int = 1,
    chunk_size: int = 256,
    loss_batch: Optional[PyTree] = None,
    update_scale: Union[float, str] = 1.0,
    grads: Optional[jax.Array] = None,
    budget: BudgetSpec = "global",
    pattern: Optional[str] = None,
    masks: Optional[PyTree] = None,
    mesh: Optional[Mesh] = None,
    verbose: bool = False,
    progress: bool = False,
    **deprecated: Any,
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
      abs_damping: the absolute damping lambda > 0 in ``F_lambda = G^T G / N + lambda I`` (paper:
        1e-3 MLPNet, 1e-5 convs). (The layer half's ``rel_damping`` is relative to ``mean(diag H)``.)
      fisher_blocks: the blocks of the block-diagonal Fisher: ``"model"`` (one block), ``"layer"``
        (one per prunable leaf) or a size (int: consecutive chunks of that many weights).
      key: PRNG key for randomised selectors: a ``jax.random.key``, a legacy ``PRNGKey`` or an
        int seed (default ``jax.random.key(0)``).
      prunable: which leaves may be pruned (see :func:`cobs_jax.make_layout`; default every
        floating leaf with ``ndim >= 2``).
      exclude: leaves left dense, by name (``"params/Dense_1/kernel"``; nnx ``"fc/kernel"``): a
        regex or list of them searched in the name, or ``callable(name) -> bool``, as in
        :func:`cobs_jax.prune_layerwise`. A pattern that matches no leaf raises.
      mini_batch: examples averaged per gradient row.
      chunk_size: gradient rows computed at once (per device; bounds memory).
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
      mesh: a ``jax.sharding.Mesh`` to run on several devices (and hosts): the N gradient rows
        are computed data-parallel over its first axis and G stays sharded by rows; every product
        with G is a per-device partial result combined by collectives (see :class:`Fisher`), so
        no device holds all of G. N must be a multiple of that axis' size. The results do not
        depend on the number of devices beyond float rounding; the returned params are
        replicated over the mesh. ``None``: one device, as usual.
      verbose: print the time of each phase.
      progress: a progress bar (tqdm, or plain lines) over the chunks of per-example gradients,
        and for CBS one line per local-search pass (see :class:`CBS`).
      **deprecated: version 0.1's ``damping`` (now ``abs_damping``) and ``blocks`` (now
        ``fisher_blocks``; ``blocks`` names a model's blocks in the layer half) still work, with a
        DeprecationWarning.

    Returns:
      A :class:`PruneResult`.

    Raises:
      ValueError: for sparsity outside [0, 1), damping <= 0, an unknown method/update, a missing
        ``loss_fn``/``batch`` where one is needed, mismatched batch leaves or ``grads`` shape,
        no prunable leaves, non-finite gradients (naming the layer), a bad budget or pattern
        (naming the layer that does not fit), ``masks`` that already exceed the target, or a
        number of gradient rows that does not split over ``mesh``.
    """
    abs_damping, fisher_blocks = renamed_fisher_options(deprecated, abs_damping, fisher_blocks, "prune")
    st = _setup(
        params, loss_fn, batch, method=method, update=update, damping=abs_damping, blocks=fisher_blocks,
        prunable=prunable, exclude=exclude, mini_batch=mini_batch, chunk_size=chunk_size, loss_batch=loss_batch,
        update_scale=update_scale, grads=grads, mesh=mesh, progress=progress,
    )
    layout = st.layout
    frozen = None if masks is None else ~np.asarray(layout.from_masks(masks))
    plan = make_budget(layout, sparsity, budget=budget, pattern=pattern, frozen=frozen)
    key = as_key(key)
    new_params, pruned, stats, ustats = _run(st, loss_fn, update, mesh, plan.counts, plan.groups, key)
    res = _result(st, new_params, pruned, stats, ustats,
                  dict(update=update, fisher_blocks=fisher_blocks, budget=budget, pattern=pattern))
    if verbose:
        _log(st, f"{res.stats['method']}+{update}: pruned {plan.total}/{layout.size} weights")
    return res


def prune_sweep(
    params: PyTree,
    loss_fn: Optional[Callable[[PyTree, PyTree], jax.Array]] = None,
    batch: Optional[PyTree] = None,
    *,
    sparsities: Sequence[float],
    keys: Optional[Sequence[Any]] = None,
    method: Union[str, Any] = "magnitude",
    update: Optional[str] = None,
    abs_damping: float = 1e-3,
    fisher_blocks: BlockSpec = "model",
    prunable: Prunable = None,
    exclude: Exclude = None,
    mini_batch: int = 1,
    chunk_size: int = 256,
    loss_batch: Optional[PyTree] = None,
    update_scale: Union[float, str] = 1.0,
    grads: Optional[jax.Array] = None,
    budget: BudgetSpec = "global",
    masks: Optional[PyTree] = None,
    mesh: Optional[Mesh] = None,
    verbose: bool = False,
    progress: bool = False,
    **deprecated: Any,
) -> list[PruneResult]:
    """:func:`prune` at several sparsity levels and PRNG keys as one batched, compiled computation.

    The gradients are computed once; selection and update are ``jax.vmap``-ed over the
    (sparsity, key) pairs, with the per-level state kept as static-shape masks, so whatever does
    not depend on the level (G, the WoodFisher inverse diagonal and its N x N factorisations, the
    RMP-independent parts of CBS) is computed once for the whole sweep. Each result equals the
    :func:`prune` call with that sparsity and key (up to float rounding). The other arguments are
    as in :func:`prune` (``pattern`` fixes the sparsity, so it is not here).

    Args:
      sparsities: the target sparsity levels, each in [0, 1).
      keys: PRNG keys (or ints, used as ``jax.random.key(i)``) for randomised selectors; every
        level runs with every key. Default: one key, ``jax.random.key(0)``, as :func:`prune`.

    Returns:
      A list of :class:`PruneResult`, ``len(sparsities) * len(keys)`` long, sparsity-major
      (``results[i * len(keys) + j]`` is level i with key j). ``timings`` holds the times of the
      whole sweep, ``stats["target"]`` the level and ``stats["key_index"]`` j.
    """
    levels = [float(x) for x in np.atleast_1d(np.asarray(sparsities, dtype=float))]
    if not levels:
        raise ValueError("`sparsities` must hold at least one level")
    keys = [jax.random.key(0)] if keys is None else list(keys)
    if not keys:
        raise ValueError("`keys` must hold at least one key (or be None)")
    keys = [as_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
    abs_damping, fisher_blocks = renamed_fisher_options(deprecated, abs_damping, fisher_blocks, "prune_sweep")
    st = _setup(
        params, loss_fn, batch, method=method, update=update, damping=abs_damping, blocks=fisher_blocks,
        prunable=prunable, exclude=exclude, mini_batch=mini_batch, chunk_size=chunk_size, loss_batch=loss_batch,
        update_scale=update_scale, grads=grads, mesh=mesh, progress=progress,
    )
    layout = st.layout
    frozen = None if masks is None else ~np.asarray(layout.from_masks(masks))
    plans = [make_budget(layout, s, budget=budget, frozen=frozen) for s in levels]
    groups = plans[0].groups
    pairs = [(i, j) for i in range(len(levels)) for j in range(len(keys))]
    counts = np.stack([np.asarray(plans[i].counts) for i, _ in pairs])
    new_params, pruned, stats, ustats = _run(
        st, loss_fn, update, mesh, counts, groups, jnp.stack([keys[j] for _, j in pairs]), batched=True
    )
    if verbose:
        _log(st, f"{type(st.selector).__name__}+{update}: {len(levels)} levels x {len(keys)} keys")
    pruned, stats, ustats = np.asarray(pruned), _to_host(stats), _to_host(ustats)
    out = []
    for b, (i, j) in enumerate(pairs):
        pick = lambda x, b=b: x[b]  # noqa: E731
        out.append(_result(
            st, jax.tree.map(pick, new_params), pruned[b], jax.tree.map(pick, stats),
            jax.tree.map(pick, ustats),
            dict(update=update, fisher_blocks=fisher_blocks, budget=budget, pattern=None, target=levels[i], key_index=j),
        ))
    return out


def apply_update(
    params: PyTree,
    masks: PyTree,
    grads: jax.Array,
    *,
    update: str = "cbs",
    abs_damping: float = 1e-3,
    fisher_blocks: BlockSpec = "model",
    prunable: Prunable = None,
    exclude: Exclude = None,
    update_scale: float = 1.0,
    mesh: Optional[Mesh] = None,
    **deprecated: Any,
) -> PyTree:
    """Apply a compensating update for a given keep-mask (e.g. MP + CBS-U, cbs.md Table 5).

    Args:
      params: the dense params.
      masks: bool keep-mask pytree (True = kept) with the params' structure.
      grads: (N, D) rows from :func:`cobs_jax.per_example_grads` for the same leaves (``prunable``,
        ``exclude``: as in :func:`prune`).
      update: ``"cbs"`` or ``"obs"``; abs_damping, fisher_blocks, update_scale, mesh: as in
        :func:`prune` (with its deprecated ``damping`` and ``blocks``).

    Returns:
      params with masked weights exactly zero and the others updated.
    """
    damping, blocks = renamed_fisher_options(deprecated, abs_damping, fisher_blocks, "apply_update")
    if update not in ("cbs", "obs"):
        raise ValueError(f"`update` must be 'cbs' or 'obs', got {update!r}")
    check_abs_damping(damping)
    layout = make_layout(params, prunable, exclude)
    pruned = ~layout.from_masks(masks)
    if np.ndim(grads) != 2 or np.shape(grads)[1] != layout.size:
        raise ValueError(f"`grads` must have shape (N, {layout.size}), got {np.shape(grads)}")
    check_rows_divisible(np.shape(grads)[0], mesh)
    grads = jnp.asarray(grads) if mesh is None else place(grads, mesh, P(row_axis(mesh)))
    out, _ = _apply_update(
        update, layout, None, layout.blocks(blocks), mesh, place(params, mesh), place(pruned, mesh), grads,
        place(jnp.asarray(damping, layout.dtype), mesh), None,
        place(jnp.asarray(update_scale, layout.dtype), mesh),
    )
    return out
