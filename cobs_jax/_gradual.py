"""Gradual pruning: reach the target over several stages, with a fresh Fisher at every stage."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np

from ._budget import BudgetSpec, check_sparsity
from ._keys import as_key
from ._layout import PyTree
from ._masks import apply_masks
from ._progress import progress as show
from ._prune import PruneResult, prune

__all__ = ["sparsity_schedule", "prune_gradual"]

Schedule = Union[str, Callable[[float], float]]
_POWERS = {"cubic": 3, "linear": 1}


def sparsity_schedule(target: float, stages: int, schedule: Schedule = "cubic") -> list[float]:
    """Sparsity reached after each of ``stages`` stages, ending exactly at ``target``.

    ``"cubic"`` is the polynomial schedule of Zhu & Gupta (2017), ``s_t = target (1 - (1 - t/T)^3)``:
    large steps first, small ones near the end, when the network has less slack. ``"linear"``
    uses the power 1. A callable maps the progress ``t/T`` in (0, 1] to the fraction of the target
    (it must be non-decreasing and return 1 at 1).
    """
    target = check_sparsity(target, "sparsity")
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise ValueError(f"`stages` must be an int >= 1, got {stages!r}")
    return [target * f for f in _fractions(stages, schedule)]


def _fractions(stages: int, schedule: Schedule) -> list[float]:
    if isinstance(schedule, str):
        if schedule not in _POWERS:
            raise ValueError(f"`schedule` must be one of {sorted(_POWERS)} or a callable, got {schedule!r}")
        p = _POWERS[schedule]
        fr = [1.0 - (1.0 - t / stages) ** p for t in range(1, stages + 1)]
    elif callable(schedule):
        fr = [float(schedule(t / stages)) for t in range(1, stages + 1)]
    else:
        raise ValueError(f"`schedule` must be one of {sorted(_POWERS)} or a callable, got {schedule!r}")
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
    key: Union[None, int, jax.Array] = None,
    verbose: bool = False,
    progress: bool = False,
    **prune_kwargs: Any,
) -> PruneResult:
    """Prune to ``sparsity`` in ``stages`` one-shot steps, recomputing the Fisher each time.

    Stage ``t`` calls :func:`prune` on the current params with the sparsity of
    :func:`sparsity_schedule` and the masks of stage ``t - 1`` (so pruned weights stay pruned), with
    any method and update. Between stages ``finetune(params, masks, t)`` may train the network
    (use :func:`keep_sparsity` in its optimizer); its result is re-masked, so pruned weights can
    never come back. This is WoodFisher's and CHITA's multi-stage scheme.

    Args:
      params: as in :func:`prune`.
      loss_fn: as in :func:`prune`.
      batch: the Fisher examples, or ``batch(t) -> examples`` for a fresh sample at stage ``t``.
      sparsity: the final target (with ``budget`` as in :func:`prune`; a dict budget's per-layer
        sparsities are scaled by the same schedule).
      stages: number of pruning steps ``T >= 1`` (1 is one-shot pruning).
      schedule: ``"cubic"``, ``"linear"`` or a callable (see :func:`sparsity_schedule`).
      finetune: optional ``finetune(params, masks, stage) -> params`` run after stages
        ``0 .. T-2`` (not after the last one: fine-tune the result yourself).
      key: PRNG key or int seed; stage ``t`` uses ``fold_in(key, t)``.
      verbose: print one line per stage.
      progress: a progress bar (tqdm, or plain lines) over the stages.
      **prune_kwargs: passed to :func:`prune` (``method``, ``update``, ``damping``, ``blocks``, ``mesh``,
        ``loss_batch``, ...). ``masks``, ``grads`` and ``pattern`` are not allowed: the masks come
        from the previous stage and the gradients must be recomputed.

    Returns:
      The :class:`PruneResult` of the last stage, whose ``info["stages"]`` lists per stage the
      target, the sparsity reached, the loss, the prune timings and the fine-tuning time.
    """
    for name in ("masks", "grads", "pattern"):
        if name in prune_kwargs:
            raise ValueError(f"`prune_gradual` does not take `{name}` (see its docstring)")
    if finetune is not None and not callable(finetune):
        raise ValueError(f"`finetune` must be callable, got {finetune!r}")
    if sparsity is None and not isinstance(budget, Mapping):
        raise ValueError("`sparsity` is required")
    if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
        raise ValueError(f"`stages` must be an int >= 1, got {stages!r}")
    if sparsity is not None:
        check_sparsity(sparsity)
    fractions = _fractions(stages, schedule)
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
    return PruneResult(params, masks, {**res.info, "stages": history, "schedule": schedule})
