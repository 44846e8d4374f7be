"""Gradual pruning: reach the target over several stages, with a fresh Fisher at every stage."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from .._core.budget import BudgetSpec, check_sparsity, parse_pattern
from .._core.keys import as_key
from .._core.layout import PyTree, make_layout
from .._core.masks import apply_masks
from .._core.progress import progress as show
from .multistage import run_stages, stage_plan
from .prune import PruneResult, check_damping_update_mesh, make_selector, prune

__all__ = ["sparsity_schedule", "prune_gradual"]

Schedule = Union[str, Callable[[float], float]]
_POWERS = {"cubic": 3, "linear": 1}
LOSS_CHECK: Optional[float] = 3.0
LOSS_SLACK = 0.01
MAX_HALVINGS = 1


def sparsity_schedule(target: float, stages: int, schedule: Schedule = "cubic") -> list[float]:
    """Sparsity reached after each of ``stages`` stages, ending exactly at ``target``.

    ``"cubic"`` is the polynomial schedule of Zhu & Gupta (2017), ``s_t = target (1 - (1 - t/T)^3)``:
    large steps first, small ones near the end, when the network has less slack. ``"linear"``
    uses the power 1. ``"geometric"`` keeps the same fraction of the remaining weights at every
    stage, ``1 - s_t = (1 - target)^(t/T)`` (every stage removes ``1 - (1 - target)^(1/T)`` of what
    is left): smaller steps than cubic's in mid-schedule, where cubic removes up to 23 % (target
    0.95) or 30 % (0.98) of the survivors in one stage, and no near-empty stages at its end. A
    callable maps the progress ``t/T`` in (0, 1] to the fraction of the target (it must be
    non-decreasing and return 1 at 1).
    """
    target = check_sparsity(target, "sparsity")
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise ValueError(f"`stages` must be an int >= 1, got {stages!r}")
    return [target * f for f in _fractions(stages, schedule, target)]


def _fractions(stages: int, schedule: Schedule, target: float) -> list[float]:
    """Fraction of the final ``target`` reached after each stage (``target`` shapes ``"geometric"``)."""
    names = sorted(_POWERS) + ["geometric"]
    if isinstance(schedule, str):
        if schedule not in names:
            raise ValueError(f"`schedule` must be one of {names} or a callable, got {schedule!r}")
        if schedule == "geometric":
            fr = [(1.0 - (1.0 - target) ** (t / stages)) / target if target > 0 else t / stages
                  for t in range(1, stages + 1)]
        else:
            p = _POWERS[schedule]
            fr = [1.0 - (1.0 - t / stages) ** p for t in range(1, stages + 1)]
    elif callable(schedule):
        fr = [float(schedule(t / stages)) for t in range(1, stages + 1)]
    else:
        raise ValueError(f"`schedule` must be one of {names} or a callable, got {schedule!r}")
    if not all(0.0 <= a <= b <= 1.0 for a, b in zip([0.0] + fr, fr)) or abs(fr[-1] - 1.0) > 1e-12:
        raise ValueError(f"`schedule` must rise from 0 to exactly 1 without decreasing, got {fr}")
    fr[-1] = 1.0
    return fr


def prune_gradual(
    params: PyTree,
    loss_fn: Callable[[PyTree, PyTree], Any],
    batch: Union[PyTree, Callable[[int], PyTree]] = None,
    *,
    sparsity: Optional[float] = None,
    stages: int = 4,
    schedule: Schedule = "cubic",
    budget: BudgetSpec = "global",
    finetune: Optional[Callable[[PyTree, PyTree, int], PyTree]] = None,
    compiled: Optional[bool] = None,
    warm_start: bool = True,
    compare_magnitude: bool = False,
    refresh: Optional[Callable[[PyTree], PyTree]] = None,
    loss_check: Optional[float] = LOSS_CHECK,
    loss_slack: float = LOSS_SLACK,
    max_halvings: int = MAX_HALVINGS,
    max_stages: Optional[int] = None,
    key: Union[None, int, jax.Array] = None,
    verbose: bool = False,
    progress: bool = False,
    **prune_kwargs: Any,
) -> PruneResult:
    """Prune to ``sparsity`` in ``stages`` one-shot steps, recomputing the Fisher each time.

    Stage ``t`` prunes the sparsity of :func:`sparsity_schedule` with the masks of stage ``t - 1``
    frozen (pruned weights stay pruned) and the Fisher recomputed at the current weights, with any
    method and update. This is WoodFisher's and CHITA++'s multi-stage scheme; without fine-tuning
    it is the strongest one-shot path of this library (README, "Which path").

    Without ``finetune`` (and with a fixed ``batch``) the whole schedule is **one compiled
    program** (``compiled=True``, the default then): per-example gradients at the current weights,
    selection, the update and the true loss of every stage run inside a ``lax.while_loop`` with the
    pruned counts traced, so nothing returns to the host between stages and a new sparsity does not
    recompile. There, the stages are also **checked by the true loss** on the loss batch: a stage
    whose loss rises more than ``loss_check`` times what the quadratic model predicted (plus
    ``loss_slack`` times the dense loss) is redone with half the step (``max_halvings`` times at
    most), the rest of the step becoming an extra stage, at most ``max_stages`` in all. A split
    stage whose path ends above the full step it replaced is undone (``"reverted"``), so checking
    never ends a planned stage higher than the unchecked step from the same weights. ``info["stages"]`` reports
    for every stage run its target, sparsity, the loss before, the predicted and the true loss
    after, the halvings and whether it was reverted. With ``warm_start`` (default) CBS runs its RMP trials only at the
    first stage; later stages start the swap search from the previous mask completed by magnitude.

    With ``finetune`` (or ``compiled=False``) each stage is a :func:`prune` call from Python and
    ``finetune(params, masks, t)`` may train the network between stages (use
    :func:`keep_sparsity` in its optimizer); its result is re-masked, so pruned weights can never
    come back.

    Args:
      params: as in :func:`prune`.
      loss_fn: as in :func:`prune`.
      batch: the Fisher examples, or (loop only) ``batch(t) -> examples`` for a fresh sample at
        stage ``t``.
      sparsity: the final target (with ``budget`` as in :func:`prune`; a dict budget's per-layer
        sparsities are scaled by the same schedule). With ``pattern="N:M"`` (compiled only) it may
        be omitted; stage t then prunes ``round(f_t (M - N))`` of every group of M.
      stages: number of planned pruning steps ``T >= 1`` (1 is one-shot pruning).
      schedule: ``"cubic"``, ``"linear"``, ``"geometric"`` or a callable (see
        :func:`sparsity_schedule`). ``"geometric"`` is shaped by the final sparsity (with a dict
        ``budget``, its largest entry; with only ``pattern="N:M"``, ``(M - N) / M``). Without
        fine-tuning and with ``loss_check=None`` it is a fast multi-stage path: on MLPNet within
        noise of the checked cubic schedule up to 0.95 sparsity in half its time, but 2.7 points
        below it on ResNet20 at 0.9 (docs: "Which method when").
      finetune: optional ``finetune(params, masks, stage) -> params`` run after stages
        ``0 .. T-2`` (not after the last one: fine-tune the result yourself). Loop path only.
      compiled: ``None`` (compiled unless ``finetune`` or a callable ``batch`` needs the loop),
        ``True`` or ``False``.
      warm_start: compiled path: warm-start the selection from the previous stage's mask.
      compare_magnitude: compiled path, a selector other than magnitude: every attempt also
        deploys the magnitude completion of the frozen set (what ``method="magnitude"`` would
        prune from the same weights) with the same update and keeps whichever has the lower true
        loss (``info["stages"][t]["magnitude_kept"]``); costs one more update and loss
        evaluation per attempt.
      refresh: optional pure ``refresh(params) -> params`` run on the whole params after every
        stage's update (compiled: after every attempt, before its true loss, so the loss check and
        the next stage's Fisher see the refreshed model; loop: before ``finetune``). Meant for
        state that is not trained but follows the weights, such as BatchNorm statistics
        re-estimated on unlabelled inputs (guide, "BatchNorm statistics in multi-stage pruning"); no
        gradient step. Its result is re-masked, so pruned weights stay zero. Compiled path: it must
        be jittable and keep the structure, shapes and dtypes of ``params``; pass the same function
        object again to reuse the compiled program. On the README's ResNet20 re-estimating
        BatchNorm statistics this way did not change multi-stage accuracy (87.5 % at 0.9); after
        one-shot pruning it matters most (docs: Benchmarks).
      loss_check: compiled path: the ratio of true to predicted loss rise above which a stage is
        redone with a smaller step; ``None`` turns the check off (every stage as planned).
      loss_slack: compiled path: a rise up to ``loss_slack * dense loss`` is always accepted.
      max_halvings: compiled path: how many times a rejected step may be halved before the
        smallest one tried is taken (1, the default: a rejected step is split evenly in two; when
        the model underestimates the loss systematically, more halvings only spend the extra
        stages on slivers).
      max_stages: compiled path: the most stages run, extra ones included (default ``2 * stages``).
      key: PRNG key or int seed; stage ``t`` uses ``fold_in(key, t)``.
      verbose: print one line per stage.
      progress: a progress bar (tqdm, or plain lines) over the stages of the loop; the compiled
        path prints one line per stage from the device loop.
      **prune_kwargs: passed to :func:`prune` (``method``, ``update``, ``damping``, ``blocks``, ``mesh``,
        ``loss_batch``, ``prunable``, ``mini_batch``, ``chunk_size``, ``update_scale``; ``pattern``
        on the compiled path). ``masks`` and ``grads`` are not allowed: the masks come from the
        previous stage and the gradients must be recomputed.

    Returns:
      A :class:`PruneResult`; ``info["stages"]`` lists the stages (see above; the loop path gives
      per stage the target, the sparsity reached, the loss, the prune timings and the fine-tuning
      time).

    Raises:
      ValueError: for ``stages < 1``, a schedule that does not rise to the target, a bad
        ``loss_check``/``loss_slack``/``max_halvings``/``max_stages``, ``finetune`` or a callable
        ``batch`` with ``compiled=True``, ``masks``/``grads`` given, and whatever :func:`prune`
        rejects.
    """
    for name in ("masks", "grads"):
        if name in prune_kwargs:
            raise ValueError(f"`prune_gradual` does not take `{name}` (see its docstring)")
    for name, fn in (("finetune", finetune), ("refresh", refresh)):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be callable, got {fn!r}")
    pattern = prune_kwargs.get("pattern")
    if sparsity is None and not isinstance(budget, Mapping) and pattern is None:
        raise ValueError("`sparsity` is required")
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise ValueError(f"`stages` must be an int >= 1, got {stages!r}")
    if sparsity is not None:
        check_sparsity(sparsity)
    if compiled is None:
        compiled = finetune is None and not callable(batch)
    elif compiled and finetune is not None:
        raise ValueError("`finetune` runs between stages from Python: it needs `compiled=False`")
    elif compiled and callable(batch):
        raise ValueError("a callable `batch` (a fresh sample per stage) needs `compiled=False`")
    geometric = isinstance(schedule, str) and schedule == "geometric"
    fractions = _fractions(stages, schedule, _reference_sparsity(sparsity, budget, pattern) if geometric else 0.0)
    key = as_key(key)
    if compare_magnitude and not compiled:
        raise ValueError("`compare_magnitude` needs the compiled schedule (no `finetune`, a fixed `batch`)")
    if compiled:
        return _prune_compiled(
            params, loss_fn, batch, sparsity=sparsity, fractions=fractions, budget=budget, key=key,
            warm_start=warm_start, compare_magnitude=bool(compare_magnitude), refresh=refresh, loss_check=loss_check,
            loss_slack=loss_slack, max_halvings=max_halvings,
            max_stages=2 * stages if max_stages is None else max_stages, verbose=verbose or progress,
            schedule=schedule, **prune_kwargs,
        )
    if pattern is not None:
        raise ValueError("`pattern` needs the compiled schedule (no `finetune`, a fixed `batch`)")
    masks, res, history = None, None, []
    for t, frac in show(enumerate(fractions), progress, len(fractions), f"prune_gradual ({stages} stages)"):
        stage_budget = (
            {name: frac * s for name, s in budget.items()} if isinstance(budget, Mapping) else budget
        )
        stage_sparsity = None if sparsity is None else frac * sparsity
        examples = batch(t) if callable(batch) else batch
        res = prune(
            params, loss_fn, examples, sparsity=stage_sparsity, budget=stage_budget, masks=masks,
            key=jax.random.fold_in(key, t), **prune_kwargs,
        )
        params, masks = res.params, res.masks
        if refresh is not None:
            params = apply_masks(refresh(params), masks)
        entry = {
            "stage": t,
            "target": stage_sparsity,
            "sparsity": res.info["sparsity"],
            "loss": res.info.get("loss"),
            "timings": res.info["timings"],
        }
        if finetune is not None and t < stages - 1:
            t0 = time.perf_counter()
            params = jax.block_until_ready(apply_masks(finetune(params, masks, t), masks))
            entry["finetune_time"] = time.perf_counter() - t0
        history.append(entry)
        if verbose:
            loss = "" if entry["loss"] is None else f", loss {entry['loss']:.4f}"
            print(
                f"[cobs_jax] stage {t + 1}/{stages}: sparsity {entry['sparsity']:.4f}{loss}, "
                f"prune {sum(entry['timings'].values()):.2f}s"
                + (f", finetune {entry['finetune_time']:.2f}s" if "finetune_time" in entry else "")
            )
    assert res is not None  # stages >= 1
    return PruneResult(params, masks, {**res.info, "stages": history, "schedule": schedule, "compiled": False})


def _reference_sparsity(sparsity, budget, pattern) -> float:
    """The overall target that shapes a ``"geometric"`` schedule (validated)."""
    if sparsity is not None:
        return float(sparsity)
    if isinstance(budget, Mapping) and budget:
        return max(check_sparsity(v, f"budget[{k!r}]") for k, v in budget.items())
    nm = parse_pattern(pattern)
    return 0.0 if nm is None else (nm[1] - nm[0]) / nm[1]


def _prune_compiled(
    params, loss_fn, batch, *, sparsity, fractions, budget, key, warm_start, compare_magnitude, refresh, loss_check, loss_slack,
    max_halvings, max_stages,
    verbose, schedule, method="magnitude", update=None, damping=1e-3, blocks="model", prunable=None,
    mini_batch=1, chunk_size=256, loss_batch=None, update_scale=1.0, mesh=None, pattern=None,
) -> PruneResult:
    """``prune_gradual``'s compiled path: check the arguments, plan the counts, run the schedule."""
    check_damping_update_mesh(damping, update, mesh)
    if isinstance(update_scale, str) or not np.isfinite(update_scale):
        raise ValueError(f"the compiled schedule takes a finite number as `update_scale`, got {update_scale!r}")
    if loss_check is not None and not (np.isfinite(loss_check) and loss_check > 0):
        raise ValueError(f"`loss_check` must be a number > 0 or None, got {loss_check!r}")
    if not (np.isfinite(loss_slack) and loss_slack >= 0):
        raise ValueError(f"`loss_slack` must be a number >= 0, got {loss_slack!r}")
    if isinstance(max_halvings, bool) or not isinstance(max_halvings, (int, np.integer)) or max_halvings < 0:
        raise ValueError(f"`max_halvings` must be an int >= 0, got {max_halvings!r}")
    if isinstance(max_stages, bool) or not isinstance(max_stages, (int, np.integer)) or max_stages < len(fractions):
        raise ValueError(f"`max_stages` must be an int >= stages ({len(fractions)}), got {max_stages!r}")
    if loss_fn is None or batch is None:
        raise ValueError("the compiled schedule needs `loss_fn` and `batch` (every stage's true loss)")
    selector = make_selector(method)
    layout = make_layout(params, prunable)
    layout.check_finite(params)
    if refresh is not None:
        def spec(tree):
            return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]

        if spec(jax.eval_shape(refresh, params)) != spec(jax.eval_shape(lambda p: p, params)):
            raise ValueError("`refresh` must return params of the same structure, shapes and dtypes as `params`")
    plan = stage_plan(layout, sparsity, fractions, budget, pattern)
    targets = [None if sparsity is None else f * sparsity for f in fractions]
    new_params, pruned, info = run_stages(
        params, loss_fn, batch, layout=layout, selector=selector, update=update, plan=plan, targets=targets,
        damping=float(damping), blocks=layout.blocks(blocks), key=key, loss_batch=batch if loss_batch is None else loss_batch,
        loss_check=loss_check, loss_slack=loss_slack, max_halvings=int(max_halvings), max_stages=int(max_stages),
        warm_start=warm_start, compare_magnitude=compare_magnitude, refresh=refresh, update_scale=float(update_scale),
        mini_batch=int(mini_batch), chunk_size=int(chunk_size), mesh=mesh,
        progress=verbose,
    )
    keep = ~np.asarray(pruned)
    info = {
        "method": type(selector).__name__, "update": update, "blocks": blocks, "budget": budget, "pattern": pattern,
        "num_prunable": layout.size, "num_pruned": int(np.sum(~keep)), "sparsity": float(1.0 - keep.mean()),
        "layer_sparsity": layout.per_layer_sparsity(keep), "schedule": schedule, "compiled": True,
        "loss_check": loss_check, "max_halvings": max_halvings, "compare_magnitude": compare_magnitude, **info,
    }
    return PruneResult(new_params, layout.to_masks(jnp.asarray(keep)), info)
