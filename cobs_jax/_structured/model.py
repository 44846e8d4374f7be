"""Structured pruning of a whole model, block by block, and its budgets across blocks.

:func:`prune_structured` walks the blocks in order (like :func:`cobs_jax.prune_layerwise`): for
each kind of :class:`~.units.Units` it captures the consumer's inputs on the already-pruned
model (``XᵀX``, ``Σ x``, ``n``), removes the plan's units with :func:`.groups.prune_groups`,
writes the compensated kernel and the bias, and the next kind (the MLP after the heads) sees
the pruned attention (SlimGPT's order, structured.md §4.1). The result holds the *masked*
blocks (removed columns exactly zero) and the removed sets; :func:`shrunk_params` slices a
block's parameters to the smaller widths for a model built with them.

Budgets (the ``plan``): :func:`share_plan` (uniform, or SlimGPT's depth-increasing
:func:`slimgpt_shares`), :func:`allocate`
(a global allocation by measured error per removed weight, from :func:`error_curves`), and
FLAP's adaptive structure (:func:`flap_plan`); all from :func:`calibrate` on the dense model.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from functools import partial
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .._core.progress import progress as _progress
from .._layer.capture import BlockAdapter, block_layers, input_stats
from .._layer.kernels import as_rows
from .._layer.layerwise import check_calibration, forward_chunks
from .compensate import Calibration, damped
from .groups import GroupCBS, GroupOBS, GroupPruner, prune_groups
from .select import greedy_columns, greedy_obs
from .units import Units, producer_axis, slice_units, unit_cost

__all__ = ["Given", "BlockInfo", "StructuredResult", "calibrate", "prune_structured", "share_plan", "slimgpt_shares", "error_curves",
           "allocate", "probe_scales", "flap_scores", "flap_plan", "shrunk_params"]

Plan = Sequence[Mapping[str, Union[int, np.ndarray]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Given(GroupPruner):
    """A fixed removed set (bool ``(n_units,)``), compensated or not: how a plan that chose the
    units itself (FLAP's global structure) is applied."""

    removed: Any
    compensates: bool = True  # type: ignore[misc]

    def choose(self, w, h, hd, count, groups, k, families=1):
        r = jnp.asarray(self.removed, bool)
        if r.shape != (groups.shape[0],) or int(r.sum()) != k:
            raise ValueError(f"Given: the removed set must be bool ({groups.shape[0]},) with {k} True")
        return r, {}


class BlockInfo(NamedTuple):
    """One block's layers as the structured driver sees them: ``kernels`` and ``in_axes`` by
    layer name, and each :class:`Units` kind's unit count, weights per unit and step (a plan
    removes a multiple of ``steps`` units: the least common multiple of the kind's ``families``
    and ``multiple``)."""

    kernels: dict
    in_axes: dict
    counts: dict
    costs: dict
    steps: dict


def _info(adapter: BlockAdapter, x, args, kwargs, units: Sequence[Units], where: str) -> BlockInfo:
    specs = {s.name: s for s in block_layers(adapter, x[:1], args, kwargs)[0]}
    kernels, in_axes = {}, {}
    for u in units:
        for name in (u.consumer,) + tuple(n for n, _ in u.producers):
            if name not in specs:
                raise ValueError(f"{where}: Units({u.consumer!r}) names layer {name!r}, which the block does not "
                                 f"call (its layers: {sorted(specs)})")
            if specs[name].error:
                raise ValueError(f"{where}: layer {name!r}: {specs[name].error}")
            kernels[name] = adapter.kernel(name)
            in_axes[name] = specs[name].in_axes
    counts, costs = {}, {}
    for u in units:
        k = kernels[u.consumer]
        try:
            counts[u.consumer] = u.count(k.shape, in_axes[u.consumer])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        costs[u.consumer] = unit_cost(u, kernels, in_axes)
        for name, (_, per) in u.producers:
            shape = kernels[name].shape
            d_out = shape[producer_axis(u, name, shape, in_axes[name])]
            if d_out != per * counts[u.consumer]:
                raise ValueError(f"{where}: producer {name!r} has {d_out} outputs on its unit axis, not {per} per "
                                 f"unit x {counts[u.consumer]} units of {u.consumer!r}")
    steps = {}
    for u in units:
        steps[u.consumer] = math.lcm(u.families, u.multiple)
        if counts[u.consumer] % steps[u.consumer]:
            raise ValueError(f"{where}: Units({u.consumer!r}): its {counts[u.consumer]} units are not a multiple of "
                             f"`multiple` = {u.multiple} (with {u.families} families)")
    return BlockInfo(kernels, in_axes, counts, costs, steps)


def _check_units(units) -> tuple[Units, ...]:
    units = tuple(units)
    if not units or not all(isinstance(u, Units) for u in units):
        raise ValueError("`units` must be a non-empty sequence of cobs_jax.structured.Units")
    if len({u.consumer for u in units}) != len(units):
        raise ValueError("`units`: two kinds share a consumer")
    return units


def calibrate(blocks: Sequence[Any], inputs, units: Sequence[Units], *, args=(), kwargs=None, chunk_size: int = 8,
              progress: bool = False) -> tuple[list[dict[str, Calibration]], list[BlockInfo], list[float]]:
    """Every consumer's input statistics on the **dense** model (one forward pass), each
    block's :class:`BlockInfo`, and the energy ``Σ ‖x‖²`` of each block's input hidden states
    (the residual stream the block's error lands in)."""
    units = _check_units(units)
    kwargs = kwargs or {}
    x, _ = check_calibration(inputs, args, kwargs, chunk_size)
    stats, infos, energy = [], [], []
    for i, block in enumerate(_progress(blocks, progress, len(blocks), "calibrate")):
        a = BlockAdapter(block, f"block {i}")
        infos.append(_info(a, x, args, kwargs, units, f"block {i}"))
        raw = input_stats(a, x, args, kwargs, frozenset(u.consumer for u in units), chunk_size)
        stats.append({k: Calibration(*v) for k, v in raw.items()})
        energy.append(float(jnp.sum(jnp.square(x.astype(jnp.float32)))))
        x = forward_chunks(a, a.params, x, args, kwargs, chunk_size, None, capture=False)
    return stats, infos, energy


def _weights(shares: Optional[Sequence[float]], num_blocks: int) -> np.ndarray:
    """Checked per-block ``shares`` (uniform for None)."""
    weights = np.ones(num_blocks) if shares is None else np.asarray(shares, np.float64)
    if weights.shape != (num_blocks,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"`shares` must be {num_blocks} non-negative numbers, not all zero")
    return weights


def share_plan(infos: Sequence[BlockInfo], num_params: int, shares: Optional[Sequence[float]] = None) -> list[dict[str, int]]:
    """A per-block budget (FLAP's uniform rule with the weight count made exact, its UL-MM):
    block ``i`` loses ``num_params · shares[i] / Σ shares`` weights (uniform shares by default;
    :func:`slimgpt_shares` for SlimGPT's depth-increasing ratio). In each block every unit kind
    but the last removes ``⌊p_i · n⌋`` units (``p_i`` the block's removed fraction: heads by
    ratio), and the last kind (the MLP channels) fills the rest of the block's share, rounded
    down; then the blocks with the largest remainders take one more unit each until
    ``num_params`` is reached (the total overshoots by less than one unit)."""
    weights = _weights(shares, len(infos))
    plan: list[dict[str, int]] = []
    rest = []
    removed = 0
    for info, share in zip(infos, weights / weights.sum()):
        left = num_params * share
        size = sum(info.counts[c] * info.costs[c] for c in info.counts)
        *first, last = list(info.counts)
        row = {}
        for c in first:
            f = info.steps[c]
            row[c] = int(np.floor(left / size * info.counts[c] / f + 1e-9)) * f
            left -= row[c] * info.costs[c]
        f = info.steps[last]
        exact = max(left, 0.0) / info.costs[last] / f
        row[last] = int(np.floor(exact + 1e-9)) * f
        rest.append(exact - row[last] / f)
        removed += sum(row[c] * info.costs[c] for c in row)
        plan.append(row)
    for i in np.argsort(-np.asarray(rest), kind="stable"):
        if removed >= num_params:
            break
        last = list(infos[i].counts)[-1]
        plan[i][last] += infos[i].steps[last]
        removed += infos[i].steps[last] * infos[i].costs[last]
    for i, (row, info) in enumerate(zip(plan, infos)):
        last = list(info.counts)[-1]
        if row[last] >= info.counts[last]:
            raise ValueError(f"`num_params` = {num_params}: block {i} would lose every unit of {last!r}")
    return plan


def slimgpt_shares(num_blocks: int, ratio: float = 4.0) -> np.ndarray:
    """SlimGPT's incremental pruning ratio (log increase, structured.md §4.5): block ``l`` gets
    ``1 + (ratio − 1) · ln(1 + l) / ln(num_blocks)`` (its README: 0.0625 → 0.25, ratio 4; the
    code's ``ln 32`` is ``ln(num_blocks)`` here, so the last block gets ``ratio`` times the first)."""
    layers = np.arange(num_blocks)
    return 1.0 + (ratio - 1.0) * np.log1p(layers) / np.log(max(num_blocks, 2))


def error_curves(stats, infos, units: Sequence[Units], *, max_fraction: float = 0.9, rel_damping: float = 0.01,
                 intercept: bool = True, energy: Optional[Sequence[float]] = None,
                 batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Per block and consumer, the error after greedily removing 1, 2, ... units
    (``⌊max_fraction · n⌋`` at most, fewer than all): the running sum of greedy group OBS's
    exact step errors (ZipLM's level database). Units of one column go ``batch`` at a time
    (SlimGPT's batched greedy: a few times faster, the curve exact at every multiple of
    ``batch``).

    The errors of a block are divided by the energy of its consumers' outputs
    (``Σ tr(W C Wᵀ)``, what the block adds to the residual stream): within a block they stay
    comparable, across blocks they are relative. ``energy[i]`` (e.g. ``calibrate``'s residual
    stream energy) replaces that divisor."""
    curves = []
    for i, (st, info) in enumerate(zip(stats, infos)):
        row, scale = {}, 0.0
        for u in units:
            c = u.consumer
            cal = st[c]
            kern = info.kernels[c]
            ax = info.in_axes[c]
            w, _ = as_rows(jnp.asarray(kern), ax)
            dt = cal.h.dtype
            hd, _ = damped(Calibration(cal.h, cal.total, cal.num_inputs), rel_damping, intercept)
            n, f = info.counts[c], info.steps[c]
            k = min(int(max_fraction * n) // f, n // f - 1) * f
            groups = jnp.asarray(u.groups(kern.shape, ax))
            if not k:
                steps = jnp.zeros(0)
            elif u.size == 1 and u.families == 1:
                steps = greedy_columns(w.astype(dt), hd, groups[:, 0], k, batch)[1]
            else:
                steps = greedy_obs(w.astype(dt), hd, groups, k, u.families)[1]
            row[c] = np.cumsum(np.maximum(np.asarray(steps, np.float64), 0.0))
            scale += float(_output_energy(w.astype(dt), cal, intercept))
        div = energy[i] if energy is not None else scale
        curves.append({c: v / div for c, v in row.items()})
    return curves


@partial(jax.jit, static_argnames=("intercept",))
def _output_energy(w, cal: Calibration, intercept: bool):
    c = cal.h
    if intercept and cal.total is not None:  # calibrate always gives the sum
        c = c - jnp.outer(cal.total, cal.total) / cal.num_inputs
    return jnp.sum((w @ c) * w)


def allocate(curves: Sequence[Mapping[str, np.ndarray]], infos: Sequence[BlockInfo], num_params: int,
             shares: Optional[Sequence[float]] = None) -> list[dict[str, int]]:
    """Units to remove per block and consumer so that at least ``num_params`` weights go (and
    less than one of the smallest unit beyond), each next unit the one of least added error per weight
    (``curves`` from :func:`error_curves`; greedy on the increments): over all blocks, or with
    ``shares`` (as :func:`share_plan`'s) within each block for its share of ``num_params``,
    the curves then choosing only between the block's kinds of unit (heads vs channels)."""
    if shares is not None:
        weights = _weights(shares, len(infos))
        quota = num_params * weights / weights.sum()
        # each block rounds up to whole units: the total stays within one unit per block
        return [_allocate([row], [info], int(np.ceil(q)))[0] for row, info, q in zip(curves, infos, quota)]
    return _allocate(curves, infos, num_params)


def _allocate(curves, infos, num_params: int) -> list[dict[str, int]]:
    counts = [{c: 0 for c in row} for row in curves]
    heap: list = []
    smallest = min(infos[i].costs[c] * infos[i].steps[c] for i, row in enumerate(curves) for c in row)

    def push(i, c):  # the next step of a kind: `steps` units at once
        j, f = counts[i][c], infos[i].steps[c]
        curve = curves[i][c]
        if j + f <= len(curve):
            inc = curve[j + f - 1] - (curve[j - 1] if j else 0.0)
            heapq.heappush(heap, (inc / (f * infos[i].costs[c]), i, c))

    for i, row in enumerate(curves):
        for c in row:
            push(i, c)
    removed = 0
    while removed < num_params:
        if not heap:
            raise ValueError(f"`num_params` = {num_params} is more than the curves allow ({removed})")
        _, i, c = heapq.heappop(heap)
        f = infos[i].steps[c]
        if removed + f * infos[i].costs[c] >= num_params + smallest:
            continue  # would overshoot by more than the smallest step: that kind is done
        counts[i][c] += f
        removed += f * infos[i].costs[c]
        push(i, c)
    return counts


def flap_scores(w_rows: jax.Array, cal: Calibration) -> jax.Array:
    """FLAP's WIFV per input column: the inputs' sample variance times ``‖W[:, j]‖²``
    (structured.md §3.4; the sample variance as the paper states, the code's running
    variant differs by a near-constant factor that standardisation removes)."""
    if cal.total is None:
        raise ValueError("flap_scores needs the inputs' sum (`Calibration.total`), as `calibrate` gives")
    n = cal.num_inputs
    mu = cal.total / n
    var = (jnp.diagonal(cal.h) - n * mu * mu) / (n - 1)
    return jnp.maximum(var, 0.0) * jnp.sum(w_rows * w_rows, axis=0)


def flap_plan(stats, infos, units: Sequence[Units], num_params: int, *, squared: Sequence[str] = ()) -> list[dict[str, np.ndarray]]:
    """FLAP's adaptive structure (AL-AM, structured.md §3.4): WIFV per column (squared for the
    consumers in ``squared``: FLAP squares the attention's), standardised per layer (unbiased
    std), a unit scores the mean of its columns; all units of all blocks pooled and the lowest
    removed until ``num_params`` weights are gone (each unit weighted by its true weight count,
    where FLAP's code has 512/3 per 128-wide MHA head, the same ratio; a unit that would
    overshoot by more than the smallest unit is passed over, where FLAP stops at the nearest
    cumulative count, so that every method removes the same count). Returns removed sets."""
    if any(u.families > 1 for u in units):
        raise ValueError("flap_plan: FLAP removes whole KV groups under GQA (its GQA fork), not query heads inside "
                         "groups: use Units without `families`")
    if any(u.multiple > 1 for u in units):
        raise ValueError("flap_plan: FLAP picks single units from a global ranking; it cannot keep widths a multiple "
                         "of `Units(multiple=...)`")
    pool = []
    for i, (st, info) in enumerate(zip(stats, infos)):
        for u in units:
            c = u.consumer
            w, _ = as_rows(jnp.asarray(info.kernels[c]), info.in_axes[c])
            m = np.asarray(flap_scores(w.astype(st[c].h.dtype), st[c]), np.float64)
            if c in squared:
                m = m * m
            z = (m - m.mean()) / m.std(ddof=1)
            score = z[u.groups(info.kernels[c].shape, info.in_axes[c])].mean(axis=1)
            pool += [(s, i, c, j) for j, s in enumerate(score)]
    pool.sort(key=lambda t: t[0])
    plan = [{u.consumer: np.zeros(info.counts[u.consumer], bool) for u in units} for info in infos]
    removed = 0
    smallest = min(info.costs[u.consumer] for info in infos for u in units)
    for _, i, c, j in pool:
        if removed >= num_params:
            break
        if plan[i][c].sum() + 1 >= infos[i].counts[c] or removed + infos[i].costs[c] >= num_params + smallest:
            continue  # never a whole layer; never overshoot by more than the smallest unit
        plan[i][c][j] = True
        removed += infos[i].costs[c]
    return plan


class StructuredResult(NamedTuple):
    """What :func:`prune_structured` returns.

    Attributes:
      blocks: the pruned blocks, masked: the removed units' consumer columns exactly zero, the
        kept ones compensated, the bias moved (shrink them with :func:`shrunk_params`).
      removed: per block, ``{consumer: bool (n_units,)}``, True = removed.
      errors: per block, ``{consumer: relative output error}`` (see ``GroupResult.error``).
      removed_params: weights of the removed units (consumer columns and producer outputs).
      total_params: weights of every unit's layers before pruning.
      seconds: wall time; timings: ``capture``, ``prune``, ``forward`` seconds.
    """

    blocks: list
    removed: list
    errors: list
    removed_params: int
    total_params: int
    seconds: float
    timings: dict


def prune_structured(
    blocks: Sequence[Any],
    inputs,
    units: Sequence[Units],
    plan: Plan,
    *,
    method: GroupPruner = GroupCBS(),
    intercept: bool = True,
    rel_damping: float = 0.01,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    chunk_size: int = 8,
    progress: bool = False,
) -> StructuredResult:
    """Remove whole units (heads, KV groups, MLP channels, filters) from every block.

    Args:
      blocks: nnx modules or linen ``(module, variables)`` pairs, applied in order.
      inputs: the first block's calibration inputs ``(n, ...)``.
      units: the :class:`Units` kinds of each block (pruned in this order within a block).
      plan: per block, ``{consumer: how many units to remove}`` (chosen by ``method``) or
        ``{consumer: bool (n_units,)}`` (a set chosen before, e.g. :func:`flap_plan`).
      method: :class:`GroupCBS` (default), :class:`GroupOBS`, :class:`WandaSP`, :class:`MagnitudeSP`.
      intercept: re-solve the consumer's bias too (it must have one, or name a BatchNorm after
        it in ``Units(bias_into=...)``; FLAP's bias compensation for the methods that do not
        compensate).
      rel_damping: relative damping of the scatter.
      args, kwargs: the blocks' other call arguments.
      chunk_size: examples per forward chunk.
      progress: a progress bar over the blocks.

    Returns:
      A :class:`StructuredResult`.
    """
    t0 = time.perf_counter()
    units = _check_units(units)
    kwargs = kwargs or {}
    if len(plan) != len(blocks):
        raise ValueError(f"`plan` has {len(plan)} entries for {len(blocks)} blocks")
    x, _ = check_calibration(inputs, args, kwargs, chunk_size)
    out_blocks, removed_all, errors = [], [], []
    removed_params = total_params = 0
    timings = {"capture": 0.0, "prune": 0.0, "forward": 0.0}
    for i, block in enumerate(_progress(blocks, progress, len(blocks), "structured")):
        where = f"block {i}"
        a = BlockAdapter(block, where)
        info = _info(a, x, args, kwargs, units, where)
        total_params += sum(int(np.prod(np.shape(k))) for k in info.kernels.values())
        if set(plan[i]) - {u.consumer for u in units}:
            raise ValueError(f"`plan[{i}]` names {sorted(set(plan[i]) - {u.consumer for u in units})}, not a "
                             "consumer of `units`")
        rem, err = {}, {}
        for u in units:
            c = u.consumer
            entry = plan[i].get(c, 0)
            t = time.perf_counter()
            cal = Calibration(*input_stats(a, x, args, kwargs, frozenset({c}), chunk_size)[c])
            timings["capture"] += time.perf_counter() - t
            t = time.perf_counter()
            how = method
            if not isinstance(entry, (int, np.integer)):
                how = Given(np.asarray(entry, bool), method.compensates)
                entry = int(np.sum(entry))
            r = prune_groups(info.kernels[c], cal, u.groups(info.kernels[c].shape, info.in_axes[c]), num_remove=int(entry), method=how,
                             intercept=intercept, rel_damping=rel_damping, in_axes=info.in_axes[c],
                             families=u.families, name=f"{where} {c}")
            a = _written(a, u, r, intercept, where)
            timings["prune"] += time.perf_counter() - t
            rem[c] = np.asarray(r.removed)
            err[c] = r.error
            removed_params += int(rem[c].sum()) * info.costs[c]
        t = time.perf_counter()
        x = forward_chunks(a, a.params, x, args, kwargs, chunk_size, None, capture=False)
        timings["forward"] += time.perf_counter() - t
        out_blocks.append(a.rebuild(a.params))
        removed_all.append(rem)
        errors.append(err)
    return StructuredResult(out_blocks, removed_all, errors, removed_params, total_params,
                            time.perf_counter() - t0, timings)


def _written(a: BlockAdapter, u: Units, r, intercept: bool, where: str) -> BlockAdapter:
    """The block with consumer ``u.consumer``'s kernel from ``r`` and, with ``intercept``, the
    bias shift in its bias (or in the running mean of ``u.bias_into``)."""
    c = u.consumer
    pure = a.pure()
    layer, key = a.layer_dict(pure, c)
    layer[key] = r.kernel
    if intercept:
        if layer.get("bias") is not None:
            layer["bias"] = (layer["bias"] + r.bias_delta).astype(layer["bias"].dtype)
        elif u.bias_into is not None:
            stats = [d for d in _modules(pure, u.bias_into, a.kind) if "mean" in d]
            if not stats or np.shape(stats[0]["mean"]) != np.shape(r.bias_delta):
                raise ValueError(f"{where}: `bias_into` {u.bias_into!r} of {c!r} must be a BatchNorm with a running "
                                 f"`mean` of shape {np.shape(r.bias_delta)}")
            m = stats[0]["mean"]
            stats[0]["mean"] = (m - r.bias_delta).astype(m.dtype)
        else:
            raise ValueError(f"{where}: layer {c!r} has no bias; the intercept moves the removed inputs' mean into "
                             "the bias: give the layer a (zero) bias, name the BatchNorm after it in "
                             "`Units(bias_into=...)`, or pass intercept=False")
    return BlockAdapter(a.rebuild(a.from_pure(pure)), where)


def probe_scales(blocks: Sequence[Any], inputs, units: Sequence[Units], stats, infos, curves, plan, tail, *,
                 args=(), kwargs=None, chunk_size: int = 8, rel_damping: float = 0.01, intercept: bool = True,
                 progress: bool = False) -> np.ndarray:
    """How much loss a unit of each block's curve error costs, measured: block ``i`` alone
    pruned to ``plan[i]`` (greedy group OBS on the dense statistics, compensated), the blocks
    after it dense, ``tail(outputs)`` the loss (e.g. final norm, LM head and NLL of the
    ``inputs``' tokens). Returns ``scale[i] = (loss_i − dense loss) / Σ_c curves[i][c][k_c − 1]``
    (the median where block ``i`` removes nothing): multiply block ``i``'s curves by it before
    :func:`allocate`, so that errors of different blocks are compared in loss, as SPDY's
    search does with whole-model evaluations, at one probe per block."""
    units = _check_units(units)
    kwargs = kwargs or {}
    x, _ = check_calibration(inputs, args, kwargs, chunk_size)
    adapters = [BlockAdapter(b, f"block {i}") for i, b in enumerate(blocks)]
    xs = []
    for a in adapters:
        xs.append(x)
        x = forward_chunks(a, a.params, x, args, kwargs, chunk_size, None, capture=False)
    base = float(tail(x))
    scales = np.full(len(blocks), np.nan)
    for i in _progress(range(len(blocks)), progress, len(blocks), "probe"):
        a, err, where = adapters[i], 0.0, f"block {i}"
        for u in units:
            c, k = u.consumer, int(plan[i].get(u.consumer, 0))
            if not k:
                continue
            info = infos[i]
            r = prune_groups(info.kernels[c], stats[i][c], u.groups(info.kernels[c].shape, info.in_axes[c]),
                             num_remove=k, method=GroupOBS(), intercept=intercept, rel_damping=rel_damping,
                             in_axes=info.in_axes[c], families=u.families, name=f"{where} {c}")
            a = _written(a, u, r, intercept, where)
            err += float(curves[i][c][k - 1])
        if err <= 0:
            continue
        h = xs[i]
        for b in [a] + adapters[i + 1 :]:
            h = forward_chunks(b, b.params, h, args, kwargs, chunk_size, None, capture=False)
        scales[i] = max(float(tail(h)) - base, 0.0) / err
    return np.where(np.isnan(scales), np.nanmedian(scales), scales)


def shrunk_params(block: Any, units: Sequence[Units], removed: Mapping[str, np.ndarray], x, *, args=(),
                  kwargs=None) -> dict:
    """The block's parameters as a nested dict (``nnx.to_pure_dict`` / linen variables) with
    the ``removed`` units sliced away: consumer input columns, producer output columns and
    their biases. Build the smaller module with the new widths and load these into it
    (``nnx.replace_by_pure_dict``); its outputs equal the masked block's. ``x``: one example
    input (for tracing the layers)."""
    units = _check_units(units)
    a = BlockAdapter(block)
    info = _info(a, jnp.asarray(x), args, kwargs or {}, units, "block")
    pure = a.pure()
    for u in units:
        where = {n: a.layer_dict(pure, n) for n in (u.consumer,) + tuple(n for n, _ in u.producers)}
        layers = {n: {"kernel": d[k], "bias": d.get("bias")} for n, (d, k) in where.items()}
        followers = {path: _modules(pure, path, a.kind) for path, _ in u.followers}
        for n, entry in slice_units(layers, u, np.asarray(removed[u.consumer], bool), info.in_axes,
                                    followers).items():
            d, k = where[n]
            d[k] = entry["kernel"]
            if entry.get("bias") is not None:
                d["bias"] = entry["bias"]
    return pure


def _modules(pure: dict, path: str, kind: str) -> list:
    """The dicts at module ``path`` of a block's pure params: one (nnx), or one per collection
    that holds it (linen: ``params`` and ``batch_stats`` of a BatchNorm)."""
    roots = [pure] if kind == "nnx" else list(pure.values())
    found = []
    for d in roots:
        for k in path.split("/"):
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict):
            found.append(d)
    if not found:
        raise ValueError(f"follower {path!r}: no such module in the block")
    return found
