"""Reaching a target over several stages, with a fresh Fisher at every stage.

Two programs: :func:`prune_multistage`, the whole schedule compiled into one device loop with
every stage checked by the true loss; and :func:`prune_gradual`, the stages as :func:`prune`
calls from Python with the user's fine-tuning between them. Both return a :class:`StagedResult`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from .._core.budget import BudgetSpec, check_sparsity, parse_pattern
from .._core.exclude import Exclude
from .._core.keys import as_key
from .._core.layout import PyTree, make_layout
from .._core.masks import apply_masks
from .._core.progress import progress as show
from .multistage import run_stages, stage_plan
from .prune import check_damping_update_mesh, info_dict, make_selector, prune, renamed_fisher_options

__all__ = ["sparsity_schedule", "prune_gradual", "prune_multistage", "LossCheck", "StagedResult"]

Schedule = Union[str, Callable[[float], float]]
_POWERS = {"cubic": 3, "linear": 1}


@dataclasses.dataclass(frozen=True)
class LossCheck:
    """How :func:`prune_multistage` checks each stage by the true loss.

    A stage whose loss rises more than ``ratio`` times what the quadratic model predicted (plus
    ``slack`` times the dense loss) is redone with half the step, ``max_halvings`` times at most,
    the rest of the step becoming an extra stage, at most ``max_stages`` stages in all (default
    twice the planned ones).

    Args:
      ratio: the ratio of true to predicted loss rise above which a stage is redone (> 0).
      slack: a rise up to ``slack * dense loss`` is always accepted (>= 0).
      max_halvings: how many times a rejected step may be halved before the smallest one tried is
        taken (1: a rejected step is split evenly in two; when the model underestimates the loss
        systematically, more halvings only spend the extra stages on slivers).
      max_stages: the most stages run, extra ones included (default ``2 * stages``).
    """

    ratio: float = 3.0
    slack: float = 0.01
    max_halvings: int = 1
    max_stages: Optional[int] = None

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and np.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError(f"`LossCheck(ratio=...)` must be a number > 0, got {self.ratio!r}")
        if not (isinstance(self.slack, (int, float)) and np.isfinite(self.slack) and self.slack >= 0):
            raise ValueError(f"`LossCheck(slack=...)` must be a number >= 0, got {self.slack!r}")
        if isinstance(self.max_halvings, bool) or not isinstance(self.max_halvings, (int, np.integer)) \
                or self.max_halvings < 0:
            raise ValueError(f"`LossCheck(max_halvings=...)` must be an int >= 0, got {self.max_halvings!r}")


class StagedResult(NamedTuple):
    """What :func:`prune_multistage` and :func:`prune_gradual` return: :class:`PruneResult`'s
    fields for the final model, plus ``stages``, one dict per stage run (its target, the sparsity
    reached, its loss and timings; the compiled path also the loss before, the predicted loss,
    the halvings and whether it was reverted or kept the magnitude mask)."""

    params: PyTree
    masks: PyTree
    sparsity: float
    layer_sparsity: dict[str, float]
    num_pruned: int
    num_prunable: int
    loss: Optional[float]
    timings: dict[str, float]
    stages: list[dict[str, Any]]
    stats: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """Deprecated: version 0.1's single dict (the typed fields and ``stats`` merged)."""
        warnings.warn("`.info` is deprecated: use the result's fields and .stats", DeprecationWarning, stacklevel=2)
        return info_dict(self)


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


_COMPILED_ONLY = ("compiled", "warm_start", "compare_magnitude", "loss_check", "loss_slack", "max_halvings",
                  "max_stages")


def prune_multistage(
    params: PyTree,
    loss_fn: Callable[[PyTree, PyTree], Any],
    batch: PyTree,
    *,
    sparsity: Optional[float] = None,
    stages: int = 4,
    schedule: Schedule = "cubic",
    budget: BudgetSpec = "global",
    pattern: Optional[str] = None,
    method: Any = "magnitude",
    update: Optional[str] = None,
    abs_damping: float = 1e-3,
    fisher_blocks: Any = "model",
    check: Optional[LossCheck] = LossCheck(),
    warm_start: bool = True,
    compare_magnitude: bool = False,
    refresh: Optional[Callable[[PyTree], PyTree]] = None,
    key: Union[None, int, jax.Array] = None,
    prunable: Any = None,
    exclude: Exclude = None,
    mini_batch: int = 1,
    chunk_size: int = 256,
    loss_batch: Optional[PyTree] = None,
    update_scale: float = 1.0,
    mesh: Any = None,
    verbose: bool = False,
    progress: bool = False,
    **deprecated: Any,
) -> StagedResult:
    """Prune to ``sparsity`` in ``stages`` steps, all compiled into one device program.

    Stage ``t`` prunes the sparsity of :func:`sparsity_schedule` with the masks of stage ``t - 1``
    frozen and the Fisher recomputed at the current weights, with any method and update
    (WoodFisher's and CHITA++'s multi-stage scheme; without fine-tuning, the strongest one-shot
    path of this library). Per-example gradients, selection, the update and the true loss of
    every stage run inside one ``lax.while_loop`` with the pruned counts traced: nothing returns
    to the host between stages and a new sparsity does not recompile. Each stage is **checked by
    the true loss** (:class:`LossCheck`); a split stage whose path ends above the full step it
    replaced is undone (``"reverted"``), so checking never ends a planned stage higher than the
    unchecked step from the same weights.

    Args:
      params, loss_fn, batch: as in :func:`prune` (``batch``: the Fisher examples).
      sparsity: the final target (with ``budget`` as in :func:`prune`; a dict budget's per-layer
        sparsities are scaled by the same schedule). With ``pattern="N:M"`` it may be omitted;
        stage t then prunes ``round(f_t (M - N))`` of every group of M.
      stages: number of planned pruning steps ``T >= 1`` (1 is one-shot pruning).
      schedule: ``"cubic"``, ``"linear"``, ``"geometric"`` or a callable (see
        :func:`sparsity_schedule`). ``"geometric"`` is shaped by the final sparsity. With
        ``check=None`` it is a fast multi-stage path: on MLPNet within noise of the checked cubic
        schedule up to 0.95 sparsity in half its time, but 2.7 points below it on ResNet20 at 0.9.
      budget, pattern, method, update, abs_damping, fisher_blocks, prunable, exclude, mini_batch,
        chunk_size, loss_batch, mesh: as in :func:`prune` (``update_scale`` a number).
      check: how stages are checked by the true loss (:class:`LossCheck`), or ``None``: every
        stage as planned.
      warm_start: warm-start the selection from the previous stage's mask (CBS: its RMP trials
        only at the first stage, later ones start the swap search from the previous mask
        completed by magnitude).
      compare_magnitude: a selector other than magnitude: every attempt also deploys the
        magnitude completion of the frozen set with the same update and keeps whichever has the
        lower true loss (``stages[t]["magnitude_kept"]``); one more update and loss per attempt.
      refresh: optional pure, jittable ``refresh(params) -> params`` run after every attempt's
        update, before its true loss (e.g. BatchNorm statistics re-estimated on unlabelled
        inputs; no gradient step); its result is re-masked. It must keep the structure, shapes
        and dtypes of ``params``; pass the same function object again to reuse the program.
      key: PRNG key or int seed; stage ``t`` uses ``fold_in(key, t)``.
      verbose, progress: one line per stage, printed from the device loop.
      **deprecated: version 0.1's ``damping``, ``blocks`` (see :func:`prune`).

    Returns:
      A :class:`StagedResult`.

    Raises:
      ValueError: for ``stages < 1``, a schedule that does not rise to the target, a bad ``check``,
        a ``refresh`` that changes the params' structure, and whatever :func:`prune` rejects.
    """
    abs_damping, fisher_blocks = renamed_fisher_options(deprecated, abs_damping, fisher_blocks, "prune_multistage")
    if refresh is not None and not callable(refresh):
        raise ValueError(f"`refresh` must be callable, got {refresh!r}")
    if check is not None and not isinstance(check, LossCheck):
        raise ValueError(f"`check` must be a cobs_jax.LossCheck or None, got {check!r}")
    fractions = _checked_fractions(sparsity, stages, schedule, budget, pattern)
    max_stages = 2 * stages if check is None or check.max_stages is None else check.max_stages
    return _prune_compiled(
        params, loss_fn, batch, sparsity=sparsity, fractions=fractions, budget=budget, key=as_key(key),
        warm_start=warm_start, compare_magnitude=bool(compare_magnitude), refresh=refresh,
        loss_check=None if check is None else check.ratio, loss_slack=LossCheck().slack if check is None else check.slack,
        max_halvings=LossCheck().max_halvings if check is None else check.max_halvings, max_stages=max_stages,
        verbose=verbose or progress, schedule=schedule, method=method, update=update, damping=abs_damping,
        blocks=fisher_blocks, prunable=prunable, exclude=exclude, mini_batch=mini_batch, chunk_size=chunk_size, loss_batch=loss_batch,
        update_scale=update_scale, mesh=mesh, pattern=pattern,
    )


def _checked_fractions(sparsity, stages, schedule, budget, pattern) -> list[float]:
    if sparsity is None and not isinstance(budget, Mapping) and pattern is None:
        raise ValueError("`sparsity` is required")
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise ValueError(f"`stages` must be an int >= 1, got {stages!r}")
    if sparsity is not None:
        check_sparsity(sparsity)
    geometric = isinstance(schedule, str) and schedule == "geometric"
    return _fractions(int(stages), schedule, _reference_sparsity(sparsity, budget, pattern) if geometric else 0.0)


def _from_v01(options: dict, stages: int) -> dict:
    """prune_gradual's compiled-path options of version 0.1 as prune_multistage's."""
    check = None if options.get("loss_check", 3.0) is None else LossCheck(
        ratio=options.get("loss_check", 3.0), slack=options.get("loss_slack", 0.01),
        max_halvings=options.get("max_halvings", 1), max_stages=options.get("max_stages"))
    if check is None and options.get("max_stages") is not None:
        check = None  # every stage as planned: no extra stages either
    out = {k: options[k] for k in ("warm_start", "compare_magnitude") if k in options}
    return dict(out, check=check)


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
    refresh: Optional[Callable[[PyTree], PyTree]] = None,
    key: Union[None, int, jax.Array] = None,
    verbose: bool = False,
    progress: bool = False,
    **prune_kwargs: Any,
) -> StagedResult:
    """Prune to ``sparsity`` in ``stages`` :func:`prune` calls, fine-tuning between them.

    Stage ``t`` prunes the sparsity of :func:`sparsity_schedule` with the masks of stage ``t - 1``
    frozen and the Fisher recomputed at the current weights; then ``finetune(params, masks, t)``
    may train the network (use :func:`keep_sparsity` in its optimizer); its result is re-masked,
    so pruned weights can never come back. Without fine-tuning, :func:`prune_multistage` runs the
    same schedule compiled, checked by the true loss, and is faster.

    Args:
      params, loss_fn: as in :func:`prune`.
      batch: the Fisher examples, or ``batch(t) -> examples`` for a fresh sample at stage ``t``.
      sparsity, stages, schedule, budget: as in :func:`prune_multistage` (no ``pattern`` here).
      finetune: optional ``finetune(params, masks, stage) -> params`` run after stages
        ``0 .. T-2`` (not after the last one: fine-tune the result yourself).
      refresh: optional ``refresh(params) -> params`` run after every stage's update, before
        ``finetune`` (e.g. BatchNorm statistics re-estimated); its result is re-masked.
      key: PRNG key or int seed; stage ``t`` uses ``fold_in(key, t)``.
      verbose: print one line per stage.
      progress: a progress bar (tqdm, or plain lines) over the stages.
      **prune_kwargs: passed to :func:`prune` (``method``, ``update``, ``abs_damping``,
        ``fisher_blocks``, ``mesh``, ``loss_batch``, ``prunable``, ``exclude``, ``mini_batch``,
        ``chunk_size``, ``update_scale``). ``masks`` and ``grads`` are not allowed: the masks come
        from the previous stage and the gradients must be recomputed. Version 0.1's compiled-path
        options (``compiled``, ``warm_start``, ``compare_magnitude``, ``loss_check``,
        ``loss_slack``, ``max_halvings``, ``max_stages``), and a call without ``finetune`` on a
        fixed ``batch`` (which was compiled in 0.1), run :func:`prune_multistage` as before, with
        a DeprecationWarning.

    Returns:
      A :class:`StagedResult`; ``stages`` gives per stage the target, the sparsity reached, the
      loss, the prune timings and the fine-tuning time.

    Raises:
      ValueError: for ``stages < 1``, a schedule that does not rise to the target, ``masks`` /
        ``grads`` given, and whatever :func:`prune` rejects.
    """
    for name in ("masks", "grads"):
        if name in prune_kwargs:
            raise ValueError(f"`prune_gradual` does not take `{name}` (see its docstring)")
    for name, fn in (("finetune", finetune), ("refresh", refresh)):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be callable, got {fn!r}")
    v01 = {k: prune_kwargs.pop(k) for k in _COMPILED_ONLY if k in prune_kwargs}
    compiled = v01.pop("compiled", None)
    if compiled and finetune is not None:
        raise ValueError("`finetune` runs between stages from Python: it needs `compiled=False`")
    if compiled and callable(batch):
        raise ValueError("a callable `batch` (a fresh sample per stage) needs `compiled=False`")
    if compiled is None:
        compiled = finetune is None and not callable(batch)
    if compiled:
        warnings.warn("`prune_gradual` without `finetune` is deprecated: the compiled multi-stage schedule is "
                      "`cobs_jax.prune_multistage` (its loss check is `check=cobs_jax.LossCheck(...)`)",
                      DeprecationWarning, stacklevel=2)
        return prune_multistage(params, loss_fn, batch, sparsity=sparsity, stages=stages, schedule=schedule,
                                budget=budget, refresh=refresh, key=key, verbose=verbose, progress=progress,
                                **_from_v01(v01, stages), **prune_kwargs)
    if v01:
        raise ValueError(f"{sorted(v01)} are options of the compiled schedule (`cobs_jax.prune_multistage`), "
                         "not of the fine-tuning loop")
    if prune_kwargs.get("pattern") is not None:
        raise ValueError("`pattern` needs the compiled schedule: `cobs_jax.prune_multistage`")
    fractions = _checked_fractions(sparsity, stages, schedule, budget, None)
    key = as_key(key)
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
        entry: dict[str, Any] = {"stage": t, "target": stage_sparsity, "sparsity": res.sparsity, "loss": res.loss,
                 "timings": res.timings}
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
    timings = {k: float(sum(float(e["timings"].get(k, 0.0)) for e in history)) for k in res.timings}
    return StagedResult(params, masks, res.sparsity, res.layer_sparsity, res.num_pruned, res.num_prunable, res.loss,
                        timings, history, {**res.stats, "schedule": schedule, "compiled": False})


def _reference_sparsity(sparsity, budget, pattern) -> float:
    """The overall target that shapes a ``"geometric"`` schedule (validated)."""
    if sparsity is not None:
        return float(sparsity)
    if isinstance(budget, Mapping) and budget:
        return max(check_sparsity(v, f"budget[{k!r}]") for k, v in budget.items())
    nm = parse_pattern(pattern)
    return 0.0 if nm is None else (nm[1] - nm[0]) / nm[1]


def _prune_compiled(
    params, loss_fn, batch, *, sparsity, fractions, budget, key, warm_start, compare_magnitude, refresh, loss_check,
    loss_slack, max_halvings, max_stages, verbose, schedule, method, update, damping, blocks, prunable, exclude,
    mini_batch,
    chunk_size, loss_batch, update_scale, mesh, pattern,
) -> StagedResult:
    """:func:`prune_multistage` after its own checks: check the rest, plan the counts, run."""
    check_damping_update_mesh(damping, update, mesh)
    if isinstance(update_scale, str) or not np.isfinite(update_scale):
        raise ValueError(f"the compiled schedule takes a finite number as `update_scale`, got {update_scale!r}")
    if isinstance(max_stages, bool) or not isinstance(max_stages, (int, np.integer)) or max_stages < len(fractions):
        raise ValueError(f"`max_stages` must be an int >= stages ({len(fractions)}), got {max_stages!r}")
    if loss_fn is None or batch is None:
        raise ValueError("the compiled schedule needs `loss_fn` and `batch` (every stage's true loss)")
    selector = make_selector(method)
    layout = make_layout(params, prunable, exclude)
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
    stats = {
        "method": type(selector).__name__, "update": update, "fisher_blocks": blocks, "budget": budget,
        "pattern": pattern, "schedule": schedule, "compiled": True, "loss_check": loss_check,
        "max_halvings": max_halvings, "compare_magnitude": compare_magnitude,
        "planned_targets": info["planned_targets"], "dense_loss": info["dense_loss"],
    }
    return StagedResult(new_params, layout.to_masks(jnp.asarray(keep)), float(1.0 - keep.mean()),
                        layout.per_layer_sparsity(keep), int(np.sum(~keep)), layout.size, info["loss"],
                        info["timings"], info["stages"], stats)
