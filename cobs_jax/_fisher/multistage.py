"""Multi-stage one-shot pruning as one compiled program (``prune_gradual`` without fine-tuning).

Every stage of the schedule runs on device inside one ``lax.while_loop``:

1. the per-example gradients G at the current weights (the Fisher is recomputed each stage, as
   CHITA++ and WoodFisher's multi-stage runs do);
2. the selection of the stage's count with the earlier pruned set frozen (it stays pruned and
   counts towards the target); with ``warm_start`` CBS runs its RMP trials only at the first
   stage and later starts the swap search from the previous mask completed by magnitude;
3. the update (CBS-U by default) and the true loss on the loss batch;
4. the loss check: a stage whose true loss rises more than ``loss_check`` times the rise the
   quadratic model predicted (``1/2 dw^T F_lambda dw``), plus a slack, is redone with half the
   step (``max_halvings`` times at most: 1 by default, 3 goes down to an eighth), and the rest of
   the step becomes an extra stage. At most ``max_stages`` stages run, so the last planned stages
   always reach the exact target. When the split path reaches the planned count, its true loss is
   compared with the full step tried at the planned stage's start (and any full step tried on the
   way): if a full step was lower, the split is undone. So a planned stage never ends above the
   step it would have taken unchecked.

With ``refresh`` (a pure function of the whole params, e.g. BatchNorm statistics re-estimated on
unlabelled inputs) every deployed attempt is refreshed before its true loss is taken, and the next
stage's gradients are taken at the refreshed params; its pruned weights stay zero.

With ``compare_magnitude`` (a selector other than magnitude) every attempt also deploys the
magnitude completion of the frozen set with the same update and keeps whichever has the lower true
loss: the selector's mask is scored by the loss without the update, which is not the loss it is
deployed with.

The pruned counts are traced values: changing the sparsity or the schedule does not recompile, only
the number of planned stages (a static shape) does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .._core.budget import BudgetSpec, make_budget
from .._core.layout import Layout, PyTree
from .._core.mesh import on_mesh, place, row_axis
from .cbs import CBS
from .fisher import batch_size_of, check_grad_batch, grad_rows
from .magnitude import Magnitude
from .problem import Problem
from .prune import NO_FISHER, UPDATES, make_fisher

__all__ = ["StagePlan", "stage_plan", "run_stages"]


class Deployed(NamedTuple):
    """One attempt of a stage: the pruned set, the deployed weights (and whole params with
    ``refresh``), the quadratic model's predicted rise, the true loss, and whether the magnitude
    completion won (``compare_magnitude``)."""

    mask: jax.Array
    w: jax.Array
    pred: jax.Array
    loss: jax.Array
    params: Any
    won: jax.Array


class History(NamedTuple):
    """Per stage run (arrays of ``max_stages``): target and pruned counts, predicted rise, true
    loss, loss before, halvings, reverted, magnitude kept."""

    target: jax.Array
    pruned: jax.Array
    pred: jax.Array
    loss: jax.Array
    before: jax.Array
    tries: jax.Array
    reverted: jax.Array
    magnitude_kept: jax.Array


class StageState(NamedTuple):
    """The device loop's state: stages run, planned stages done, weights, params (``refresh``),
    pruned set, current loss, history, whether the last gradients were finite, and the best full
    step of the current planned stage."""

    run: jax.Array
    planned: jax.Array
    w: jax.Array
    params: Any
    pruned: jax.Array
    loss: jax.Array
    hist: History
    finite: jax.Array
    best: Deployed


class StagePlan(NamedTuple):
    """Per-stage pruned counts of a schedule.

    Attributes:
      groups: (D,) int32 group of every weight (all 0 for a global budget; layers for per-layer
        budgets; N:M groups for a pattern).
      counts: (T, G) int32 cumulative pruned count of every group after each planned stage.
    """

    groups: np.ndarray
    counts: np.ndarray


def stage_plan(layout: Layout, sparsity: Optional[float], fractions: Sequence[float], budget: BudgetSpec,
               pattern: Optional[str]) -> StagePlan:
    """The counts of every planned stage: stage t reaches ``fractions[t]`` of the final target.

    Unstructured budgets round each stage's sparsity exactly as :func:`cobs_jax.prune` would
    (so the compiled schedule equals a loop of ``prune`` calls); an N:M pattern prunes
    ``round(f (M - N))`` weights of every group of M at fraction f.
    """
    final = make_budget(layout, sparsity, budget=budget, pattern=pattern)
    groups = np.zeros(layout.size, np.int32) if final.groups is None else np.asarray(final.groups, np.int32)
    rows = []
    for frac in fractions:
        if pattern is not None:
            rows.append(np.round(frac * np.asarray(final.counts)).astype(np.int64))
            continue
        scaled = {k: frac * v for k, v in budget.items()} if isinstance(budget, Mapping) else budget
        plan = make_budget(layout, None if sparsity is None else frac * sparsity, budget=scaled)
        rows.append(np.atleast_1d(np.asarray(plan.counts, np.int64)))
    counts = np.maximum.accumulate(np.stack(rows), axis=0)  # nested masks need rising counts
    if not np.array_equal(counts[-1], np.atleast_1d(final.counts)):
        raise ValueError("the schedule does not reach the target at its last stage")
    return StagePlan(groups, counts.astype(np.int32))


def _report(e, pruned, size, loss, pred, halvings, reverted, won):
    print(f"[cobs_jax] prune_gradual stage {int(e) + 1}: pruned {int(pruned)}/{int(size)}, loss {float(loss):.6g}"
          f" (model predicted {float(pred):.6g})" + (f", step halved {int(halvings)}x" if int(halvings) else "")
          + (", split undone (the full step was lower)" if bool(reverted) else "")
          + (", magnitude mask kept" if bool(won) else ""), flush=True)


@functools.partial(
    jax.jit,
    static_argnames=("selector", "warm", "update", "layout", "loss_fn", "blocks", "mesh", "mini_batch",
                     "chunk_size", "max_stages", "needs_fisher", "guard", "refresh", "progress"),
)
def _compiled(selector, warm, update, layout, loss_fn, blocks, mesh, mini_batch, chunk_size, max_stages,
              needs_fisher, guard, refresh, progress, params, batch, loss_batch, damping, scale, counts, groups, key, check,
              slack, max_halvings):
    def body(params, batch, loss_batch, damping, scale, counts, groups, key, check, slack, max_halvings):
        num_planned, ng = counts.shape
        d, dtype = layout.size, layout.dtype
        n_local = batch_size_of(batch) // mini_batch
        c = min(chunk_size, n_local)
        starts = [min(s, n_local - c) for s in range(0, n_local, c)]

        # p: the whole current params as `refresh` left them; without `refresh` nothing but w changes,
        # so the loop carries () and the input params are used
        def full(p):
            return params if refresh is None else p

        def loss(w, p):
            return loss_fn(layout.unravel(w, full(p)), loss_batch)

        w0 = layout.ravel(params)
        p0 = () if refresh is None else params
        loss0 = loss(w0, p0)
        tol = slack * jnp.abs(loss0)  # a rise this small is always accepted

        def grads_at(w, p):  # G at the current weights, chunk by chunk in place (this device's rows)
            p = layout.unravel(w, full(p))

            def fill(i, g):
                s = jnp.asarray(starts, jnp.int32)[i]
                rows = grad_rows(loss_fn, layout, p, batch, s, mini_batch, c).astype(dtype)
                return jax.lax.dynamic_update_slice_in_dim(g, rows, s, axis=0)

            return jax.lax.fori_loop(0, len(starts), fill, jnp.zeros((n_local, d), dtype))

        def attempt(fisher, w, p, pruned, held, target, k_e, first):
            k = jnp.concatenate([target - held, jnp.sum(held)[None]])
            problem = Problem(w, fisher, layout.layer_ranges(), lambda v: loss(v, p), jnp.where(pruned, ng, groups))
            if warm == selector:
                new = selector.select(problem, k, k_e)[0]
            else:
                new = jax.lax.cond(first, lambda: selector.select(problem, k, k_e)[0],
                                   lambda: warm.select(problem, k, k_e)[0])

            def deployed(mask):  # the weights this mask is deployed with, the model's rise and the true loss
                w_new = jnp.where(mask, 0.0, w) if update is None else UPDATES[update](w, mask, fisher, scale)
                pred = 0.5 * fisher.quadratic(w_new - w, damped=True) if fisher is not None else jnp.zeros((), dtype)
                p_new = p
                if refresh is not None:  # e.g. BatchNorm statistics re-estimated; pruned weights stay 0
                    p_new = refresh(layout.unravel(w_new, p))
                    w_new = jnp.where(mask, 0.0, layout.ravel(p_new))
                return Deployed(mask, w_new, pred, loss(w_new, p_new), p_new, jnp.bool_(False))

            out = deployed(new)
            if not guard:
                return out
            # the magnitude completion of the frozen set, deployed the same way: kept if lower (the
            # selector often returns that very mask, which needs no second update)
            alt_mask = Magnitude().select(problem, k, k_e)[0]
            alt = jax.lax.cond(jnp.array_equal(alt_mask, new), lambda: out, lambda: deployed(alt_mask))
            won = alt.loss < out.loss
            return jax.tree.map(lambda a, b: jnp.where(won, a, b), alt, out)._replace(won=won)

        def stage(st: StageState) -> StageState:
            e, t, w, p, pruned, loss_w, hist, fb = st.run, st.planned, st.w, st.params, st.pruned, st.loss, st.hist, st.best
            if needs_fisher:
                g = grads_at(w, p)
                bad = jnp.sum(~jnp.isfinite(g))
                fisher = make_fisher(g, damping, blocks, mesh)
                finite = fisher.sum_rows(bad) == 0
            else:
                fisher, finite = None, jnp.bool_(True)
            k_e = jax.random.fold_in(key, e)
            full = counts[t]
            held = jax.ops.segment_sum(pruned.astype(jnp.int32), groups, ng)
            # e - t stages were inserted so far; planned stage t may have used (t+1)/T of the extra ones
            allowed = (e - t) < (extra_total * (t + 1)) // num_planned
            first = attempt(fisher, w, p, pruned, held, full, k_e, e == 0)

            def rejected(a):
                target, tries, tried = a
                smaller = held + (target - held) // 2
                return ((tried.loss - loss_w > check * jnp.maximum(tried.pred, 0.0) + tol) & allowed
                        & (tries < max_halvings) & (jnp.sum(smaller - held) > 0))

            def halve(a):
                target, tries, _ = a
                target = held + (target - held) // 2
                return target, tries + 1, attempt(fisher, w, p, pruned, held, target, k_e, e == 0)

            target, tries, (new, w_new, pred, new_loss, p_new, won) = jax.lax.while_loop(
                rejected, halve, (full, jnp.int32(0), first)
            )
            done = jnp.all(target == full)
            # the best full step tried during this planned stage: a split path that ends the stage
            # above it is undone (so splitting never ends a planned stage higher than not splitting)
            better = first.loss < fb.loss
            fb = jax.tree.map(lambda a, b: jnp.where(better, a, b), first, fb)
            revert = done & (fb.loss < new_loss)
            new, w_new, pred, new_loss, p_new, won = jax.tree.map(lambda a, b: jnp.where(revert, a, b), fb,
                                                                  Deployed(new, w_new, pred, new_loss, p_new, won))
            fb = jax.tree.map(lambda a, b: jnp.where(done, a, b), fb0, fb)
            hist = History(*(h.at[e].set(v) for h, v in zip(hist, (
                jnp.sum(target).astype(jnp.int32), jnp.sum(new, dtype=jnp.int32), pred, new_loss, loss_w, tries,
                revert, won))))
            if progress:
                jax.debug.callback(_report, e, jnp.sum(new), d, new_loss, loss_w + pred, tries, revert, won)
            return StageState(e + 1, jnp.where(done, t + 1, t), w_new, p_new, new, new_loss, hist, finite, fb)

        nan = jnp.full(max_stages, jnp.nan, dtype)
        hist0 = History(jnp.zeros(max_stages, jnp.int32), jnp.zeros(max_stages, jnp.int32), nan, nan, nan,
                        jnp.zeros(max_stages, jnp.int32), jnp.zeros(max_stages, bool), jnp.zeros(max_stages, bool))
        extra_total = max_stages - num_planned
        fb0 = Deployed(jnp.zeros(d, bool), w0, jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype), p0,
                       jnp.bool_(False))  # none yet
        init = StageState(jnp.int32(0), jnp.int32(0), w0, p0, jnp.zeros(d, bool), loss0, hist0, jnp.bool_(True), fb0)
        end = jax.lax.while_loop(lambda st: (st.planned < num_planned) & st.finite, stage, init)
        return layout.unravel(end.w, full(end.params)), end.pruned, end.run, end.hist, end.finite, loss0

    return on_mesh(body, mesh)(params, batch, loss_batch, damping, scale, counts, groups, key, check, slack,
                                max_halvings)


def run_stages(
    params: PyTree,
    loss_fn: Callable[[PyTree, PyTree], Any],
    batch: PyTree,
    *,
    layout: Layout,
    selector: Any,
    update: Optional[str],
    plan: StagePlan,
    targets: Sequence[Optional[float]],
    damping: float,
    blocks: tuple,
    key: jax.Array,
    loss_batch: PyTree,
    loss_check: Optional[float],
    loss_slack: float,
    max_halvings: int,
    max_stages: int,
    warm_start: bool,
    compare_magnitude: bool,
    refresh: Optional[Callable[[PyTree], PyTree]],
    update_scale: float,
    mini_batch: int,
    chunk_size: int,
    mesh: Optional[Mesh],
    progress: bool,
) -> tuple[PyTree, jax.Array, dict]:
    """Run the whole schedule compiled; returns (params, pruned (D,) bool, info)."""
    check_grad_batch(batch, mini_batch, chunk_size, mesh)
    batch_size_of(loss_batch, "loss_batch")
    warm = selector
    if warm_start and isinstance(selector, CBS) and selector.num_trials > 1:
        warm = dataclasses.replace(selector, num_trials=1)  # trial 0: the previous mask + magnitude
    needs_fisher = update is not None or not isinstance(selector, NO_FISHER)
    dtype = layout.dtype
    t0 = time.perf_counter()
    new_params, pruned, e, hist, finite, loss0 = jax.block_until_ready(_compiled(
        selector, warm, update, layout, loss_fn, blocks, mesh, int(mini_batch), int(chunk_size), int(max_stages),
        needs_fisher, bool(compare_magnitude and not isinstance(selector, Magnitude)), refresh, bool(progress),
        place(params, mesh), place(batch, mesh, P(None if mesh is None else row_axis(mesh))),
        place(loss_batch, mesh), place(jnp.asarray(damping, dtype), mesh),
        place(jnp.asarray(update_scale, dtype), mesh), place(jnp.asarray(plan.counts), mesh),
        place(jnp.asarray(plan.groups), mesh), place(key, mesh),
        place(jnp.asarray(np.inf if loss_check is None else loss_check, dtype), mesh),
        place(jnp.asarray(loss_slack, dtype), mesh), place(jnp.asarray(max_halvings, jnp.int32), mesh),
    ))
    seconds = time.perf_counter() - t0
    e = int(e)
    if not bool(finite):
        raise ValueError(f"the per-example gradients at stage {e} contain NaN or Inf (at the weights of "
                         f"stage {e - 1}); lower the sparsity or raise `damping`")
    h_target, h_pruned, h_pred, h_loss, h_before, h_tries, h_revert, h_won = (np.asarray(x)[:e] for x in hist)
    size = layout.size
    stages = [
        {"stage": i, "target": float(h_target[i]) / size, "sparsity": float(h_pruned[i]) / size,
         "loss_before": float(h_before[i]), "predicted_loss": float(h_before[i] + h_pred[i]),
         "loss": float(h_loss[i]), "halvings": int(h_tries[i]),
         "reverted": bool(h_revert[i]), "magnitude_kept": bool(h_won[i])}
        for i in range(e)
    ]
    info = {"stages": stages, "planned_targets": list(targets), "dense_loss": float(loss0),
            "loss": stages[-1]["loss"] if stages else float(loss0), "timings": {"compiled_schedule": seconds}}
    return new_params, pruned, info

