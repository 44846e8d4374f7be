"""How many weights to prune where: global and per-layer budgets, N:M patterns, frozen weights.

Every selector prunes ``k`` weights of a (D,) vector. A :class:`Budget` says how ``k`` is split:

* ``budget="global"``: one count ``round(s * D)`` over all layers (one threshold; the default).
* ``budget="uniform"``: every layer loses ``round(s * D_l)`` of its own weights.
* ``budget={layer: s_l, ...}``: layer ``l`` loses ``round(s_l * D_l)``; unlisted layers use ``s``.
* ``pattern="N:M"``: in every group of M consecutive weights along a kernel's input axis (axis -2
  of a Flax ``(..., in, out)`` kernel) exactly N are kept: the 2:4 pattern sparse tensor cores run.

These become *groups*: a (D,) int32 group id per weight and a count per group; a selector prunes
exactly ``counts[g]`` weights of group ``g`` (``groups=None`` is the single global group). Weights
that an earlier mask already pruned (gradual pruning) go to one extra group that is pruned whole,
and the counts of their own groups shrink accordingly, so earlier choices are never undone.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Optional, Union

import numpy as np

from .layout import Layout, leaf_name

__all__ = ["Budget", "make_budget", "parse_pattern", "check_sparsity", "layer_index"]

BudgetSpec = Union[str, Mapping[str, float]]


class Budget(NamedTuple):
    """Per-group pruning counts.

    Attributes:
      groups: ``None`` (one global group) or a (D,) int32 group id per weight.
      counts: number of weights to prune: an int for the global group, else a (G,) int32 array.
      total: the total number pruned, ``sum(counts)``.
    """

    groups: Optional[np.ndarray]
    counts: Union[int, np.ndarray]
    total: int


def check_sparsity(value, name: str = "sparsity") -> float:
    """``value`` as a float in [0, 1), or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}")
    return float(value)


def parse_pattern(pattern: Optional[str]) -> Optional[tuple[int, int]]:
    """``"N:M"`` -> ``(N, M)`` with ``1 <= N < M``; ``None``/``"unstructured"`` -> ``None``."""
    if pattern is None or pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if m is None:
        raise ValueError(f"`pattern` must be None, 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise ValueError(f"`pattern` N:M needs 1 <= N < M (N weights kept of every M), got {pattern!r}")
    return n, mm


def layer_index(layout: Layout, name: str) -> int:
    """Index of the prunable layer called ``name``.

    ``name`` may be the exact ``jax.tree_util.keystr`` path (``"['params']['Dense_0']['kernel']"``),
    the path joined by ``/`` (``"params/Dense_0/kernel"``; nnx: ``"l1/kernel"``) or a unique
    ``/``-suffix of it (``"Dense_0/kernel"``).
    """
    names = layout.names
    if name in names:
        return names.index(name)
    slashed = [leaf_name(n) for n in names]
    hits = [i for i, s in enumerate(slashed) if s == name or s.endswith("/" + name)]
    if len(hits) == 1:
        return hits[0]
    what = "matches several layers" if hits else "is not a prunable layer"
    raise ValueError(f"`budget` key {name!r} {what}; prunable layers: {slashed}")


def _nm_groups(layout: Layout, m: int) -> np.ndarray:
    """Group id of every weight: M consecutive entries along axis -2 of each kernel."""
    out, base = [], 0
    for name, i in zip(layout.names, layout.leaf_ids):
        shape = layout.shapes[i]
        if len(shape) < 2:
            raise ValueError(
                f"`pattern` N:M needs kernels with an input axis; layer {name} has shape {shape}"
            )
        cin, cout = shape[-2], shape[-1]
        if cin % m:
            raise ValueError(
                f"`pattern` N:M with M={m}: layer {name} has input dimension {cin}, not a multiple of {m}"
            )
        pre = int(np.prod(shape[:-2], dtype=np.int64))
        a = np.arange(pre)[:, None, None]
        r = np.arange(cin)[None, :, None] // m
        o = np.arange(cout)[None, None, :]
        out.append(base + ((a * (cin // m) + r) * cout + o).ravel())
        base += pre * (cin // m) * cout
    return np.concatenate(out).astype(np.int32)


def make_budget(
    layout: Layout,
    sparsity: Optional[float] = None,
    *,
    budget: BudgetSpec = "global",
    pattern: Optional[str] = None,
    frozen: Optional[np.ndarray] = None,
) -> Budget:
    """Per-group pruning counts for a sparsity target.

    Args:
      layout: the prunable layout (:func:`cobs_jax.make_layout`).
      sparsity: the target fraction in [0, 1); with ``pattern="N:M"`` it may be omitted (it is
        ``1 - N/M``), and with a dict budget that names every layer as well.
      budget: ``"global"``, ``"uniform"`` or ``{layer name: sparsity}`` (see the module doc and
        :func:`layer_index` for the names).
      pattern: ``None``/``"unstructured"`` or ``"N:M"``.
      frozen: optional (D,) bool, weights already pruned that must stay pruned (they count
        towards every target).

    Raises:
      ValueError: for a bad sparsity, budget, pattern, a layer whose shape does not fit the
        pattern, or a ``frozen`` set that already exceeds some target.
    """
    d = layout.size
    nm = parse_pattern(pattern)
    if nm is not None:
        n, m = nm
        if sparsity is not None and abs(check_sparsity(sparsity) - (m - n) / m) > 1e-9:
            raise ValueError(
                f"`sparsity`={sparsity} contradicts `pattern`={pattern!r} (sparsity {(m - n) / m:g})"
            )
        if not (isinstance(budget, str) and budget == "global"):
            raise ValueError(
                f"`pattern`={pattern!r} fixes the budget of every group of {m}; leave `budget` global"
            )
        groups = _nm_groups(layout, m)
        counts = np.full(d // m, m - n, np.int64)
    elif isinstance(budget, str):
        if budget not in ("global", "uniform"):
            raise _bad_budget(budget)
        if sparsity is None:
            raise ValueError("`sparsity` is required")
        s = check_sparsity(sparsity)
        if budget == "global":
            groups, counts = None, np.array([int(round(s * d))])
        else:
            groups = _layer_groups(layout)
            counts = np.array([int(round(s * n)) for n in layout.sizes])
    elif isinstance(budget, Mapping):
        per_layer: list[Optional[float]] = [None] * len(layout.sizes)
        for name, value in budget.items():
            per_layer[layer_index(layout, name)] = check_sparsity(value, f"budget[{name!r}]")
        if any(v is None for v in per_layer):
            if sparsity is None:
                missing = [layout.names[i] for i, v in enumerate(per_layer) if v is None]
                raise ValueError(f"`budget` does not name layers {missing}: give them `sparsity`")
            s = check_sparsity(sparsity)
            per_layer = [s if v is None else v for v in per_layer]
        groups = _layer_groups(layout)
        counts = np.array([int(round(float(v or 0.0) * n)) for v, n in zip(per_layer, layout.sizes)])
    else:
        raise _bad_budget(budget)

    if frozen is not None:
        frozen = np.asarray(frozen, bool)
        base = np.zeros(d, np.int32) if groups is None else groups
        held = np.bincount(base[frozen], minlength=len(counts))
        if np.any(held > counts):
            g = int(np.argmax(held - counts))
            raise ValueError(
                f"`masks` already prunes {held[g]} weights of group {g} "
                f"(layer {_group_layer(layout, base, g)}), more than the target {counts[g]}"
            )
        if frozen.any():
            groups = np.where(frozen, len(counts), base).astype(np.int32)
            counts = np.append(counts - held, frozen.sum())
    total = int(np.sum(counts))
    if groups is None:
        return Budget(None, total, total)
    return Budget(groups, counts.astype(np.int32), total)


def _bad_budget(budget) -> ValueError:
    return ValueError(f"`budget` must be 'global', 'uniform' or a dict {{layer: sparsity}}, got {budget!r}")


def _layer_groups(layout: Layout) -> np.ndarray:
    return np.repeat(np.arange(len(layout.sizes), dtype=np.int32), layout.sizes)


def _group_layer(layout: Layout, groups: np.ndarray, g: int) -> str:
    first = int(np.argmax(groups == g))
    return layout.names[int(np.searchsorted(layout.offsets, first, side="right")) - 1]
