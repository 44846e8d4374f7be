"""Non-uniform layer-wise budgets: per-layer sparsities with the model's total count exact.

OWL (Yin et al., ICML 2024, ``luuyin/OWL``) gives blocks with more *outliers* a lower sparsity:
for block b, the outlier ratio D_b is the fraction of its Wanda scores ``|W_ij| * ||X_j||_2``
above ``outlier_threshold`` times their mean (OWL's ``Hyper_m``, 5 by default), the activations
those of the dense model; the ratios are mapped linearly onto ``[-spread, +spread]`` (OWL's
``Lamda``, 0.08), centred, and added to the target density ``1 - sparsity``. Here the shift is
then corrected so that the counts, weighted by the blocks' sizes, add up to exactly
``round(sparsity * total)`` pruned weights, distributed over the layers in whole units of their
granularity (one weight for a per-layer count, one weight per output unit for a per-unit count)
by largest remainders.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from .._core.budget import check_sparsity
from .._core.deprecation import reject_unknown, take_renamed
from .._core.exclude import Exclude, Excluder
from .capture import BlockAdapter
from .kernels import as_rows
from .layerwise import check_calibration, forward_chunks, plan_blocks  # the driver's own passes and layer plan
from .stacked import Stacked

__all__ = ["owl_sparsities", "allocate_counts"]


def allocate_counts(fractions: np.ndarray, sizes: np.ndarray, granules: np.ndarray, total: int) -> np.ndarray:
    """Integer pruned counts near ``fractions * sizes`` that add up to ``total`` when possible.

    Each count is a multiple of its layer's granule (1, or the number of output units for a
    per-unit count) and at most ``size - granule`` (a layer keeps something). Counts are rounded
    down, then whole granules go to the layers with the largest remainders, round after round,
    while they fit; a per-unit total can fall short of ``total`` by less than one granule.
    Returns counts in weights.
    """
    ideal = np.clip(fractions, 0.0, 1.0) * sizes / granules
    cap = sizes // granules - 1
    units = np.minimum(np.floor(ideal), cap).astype(np.int64)
    left = total - int(np.sum(units * granules))
    order = np.argsort(-(ideal - units), kind="stable")  # largest remainders first
    while left > 0:
        fits = [j for j in order if granules[j] <= left and units[j] < cap[j]]
        if not fits:
            break
        for j in fits:
            if granules[j] <= left and units[j] < cap[j]:
                units[j] += 1
                left -= int(granules[j])
    for j in order[::-1]:  # over the target (only when fractions were clipped): take back
        while left < 0 and units[j] > 0:
            units[j] -= 1
            left += int(granules[j])
    return units * granules


def owl_sparsities(
    blocks: Union[Sequence[Any], Stacked],
    inputs: Any,
    sparsity: float,
    *,
    outlier_threshold: float = 5.0,
    spread: float = 0.08,
    granularity: str = "layer",
    exclude: Exclude = None,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    chunk_size: int = 8,
    **deprecated: Any,
) -> list[dict[str, float]]:
    """Per-layer sparsities by OWL's outlier rule, for :func:`cobs_jax.prune_layerwise`.

    One pass of the *dense* model over ``inputs`` (as OWL does) collects each layer's input
    norms; see the module docstring for the rule.

    Args:
      blocks: as in :func:`cobs_jax.prune_layerwise`.
      inputs: as in :func:`cobs_jax.prune_layerwise`.
      sparsity: the model's overall sparsity over the pruned layers, in [0, 1).
      outlier_threshold: a score is an outlier above this many times its block's mean score.
      spread: block sparsities range over ``sparsity ± spread`` before the count correction.
      granularity: ``"layer"`` (counts exact to one weight: the total is exact) or ``"unit"``
        (counts in whole multiples of the output units, for per-unit methods such as Wanda: the
        total is the closest such sum not above the target).
      exclude: as in :func:`cobs_jax.prune_layerwise` (those layers get no entry).
      args: as in :func:`cobs_jax.prune_layerwise`.
      kwargs: as in :func:`cobs_jax.prune_layerwise`.
      chunk_size: as in :func:`cobs_jax.prune_layerwise`.
      **deprecated: version 0.1's ``batch_size`` (now ``chunk_size``), with a DeprecationWarning.

    Returns:
      One ``{layer name: sparsity}`` dict per block, to pass as ``prune_layerwise(...,
      sparsity=...)``; ``count = sparsity * size`` is an integer for every layer.

    Raises:
      ValueError: for a bad argument.
    """
    chunk_size = take_renamed(deprecated, "batch_size", "chunk_size", chunk_size, "owl_sparsities")
    reject_unknown(deprecated, "owl_sparsities")
    s = check_sparsity(sparsity)
    if not outlier_threshold > 0:
        raise ValueError(f"`outlier_threshold` must be positive, got {outlier_threshold!r}")
    if not 0 <= spread < 1:
        raise ValueError(f"`spread` must be in [0, 1), got {spread!r}")
    if granularity not in ("layer", "unit"):
        raise ValueError(f"`granularity` must be 'layer' or 'unit', got {granularity!r}")
    x, kwargs = check_calibration(inputs, args, kwargs, chunk_size)
    blocks = blocks.unstack() if isinstance(blocks, Stacked) else list(blocks)
    if not blocks:
        raise ValueError("`blocks` is empty: give the model's blocks in order")
    adapters = [BlockAdapter(b, f"blocks[{i}]") for i, b in enumerate(blocks)]
    plans = plan_blocks(adapters, x, args, kwargs, Excluder(exclude))
    if not any(todo for _, todo in plans):
        raise ValueError("`exclude` leaves no layer to prune")
    names, sizes, granules, ratios, owner = [], [], [], [], []
    for b, adapter in enumerate(adapters):
        todo = plans[b][1]
        grams = forward_chunks(adapter, adapter.params, x, args, kwargs, chunk_size, None, capture=True,
                         layers=frozenset(s.name for s in todo))
        scores = []
        for spec in todo:
            h = grams[spec.name]
            if not bool(jnp.all(jnp.isfinite(h))):
                raise ValueError(f"block {b}, layer {spec.name!r}: its captured activations contain NaN or Inf")
            w = as_rows(adapter.kernel(spec.name), spec.in_axes)[0]  # (d_out, d_in)
            scores.append((jnp.abs(w) * jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0))[None, :]).ravel())
            names.append(spec.name)
            sizes.append(w.size)
            granules.append(w.shape[0] if granularity == "unit" else 1)
            owner.append(b)
        if scores:
            allv = jnp.concatenate(scores)
            ratios.append(float(jnp.mean(allv > outlier_threshold * jnp.mean(allv))))
        else:
            ratios.append(0.0)
        x = forward_chunks(adapter, adapter.params, x, args, kwargs, chunk_size, None, capture=False)
    r = np.asarray(ratios)
    span = r.max() - r.min()
    shift = (r - r.min()) / span * 2 * spread if span > 0 else np.zeros_like(r)
    density = shift - shift.mean() + (1.0 - s)
    owner_a, sizes_a, gran_a = np.asarray(owner), np.asarray(sizes, np.int64), np.asarray(granules, np.int64)
    frac = 1.0 - density[owner_a]
    total = int(round(s * sizes_a.sum()))
    frac = frac + (total - float(np.sum(frac * sizes_a))) / sizes_a.sum()  # counts add up to the target
    counts = allocate_counts(frac, sizes_a, gran_a, total)
    out: list[dict[str, float]] = [{} for _ in blocks]
    for name, b, c, n in zip(names, owner, counts, sizes):
        out[b][name] = float(c) / float(n)
    return out
