"""Closed-form selectors: magnitude and WoodFisher/OBS saliency.

A selector is a frozen (hashable) dataclass with ``select(problem, k, key) -> (pruned, stats)``,
called inside ``jax.jit``. ``pruned`` is a (D,) bool vector with exactly ``k`` True entries: the
paper's set P (True = pruned; the public masks use the opposite convention, True = kept). ``k`` may
be a traced integer, so sweeping sparsity does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .fisher import Fisher

__all__ = ["Problem", "Magnitude", "WoodFisher", "smallest_k"]


class Problem(NamedTuple):
    """What a selector sees.

    Attributes:
      w: (D,) trained prunable weights, w-bar in the paper.
      fisher: the block-diagonal Fisher (``None`` for selectors that need none).
      layers: static ``(start, stop)`` range of each prunable leaf.
      loss: ``loss(w) -> scalar``, the true loss of the network with prunable weights ``w``
        (used by CBS to score masks), or ``None``.
      groups: ``None`` (one global budget: ``k`` is a scalar) or a (D,) int32 group id per weight
        in ``[0, G)``; ``k`` is then a (G,) vector and exactly ``k[g]`` weights of group ``g`` are
        pruned (per-layer budgets, N:M patterns, weights that must stay pruned; see
        :func:`cobs_jax.make_budget`).
    """

    w: jax.Array
    fisher: Optional[Fisher]
    layers: tuple[tuple[int, int], ...]
    loss: Optional[Callable[[jax.Array], jax.Array]]
    groups: Optional[jax.Array] = None


def _rank_in_group(score: jax.Array, groups: Optional[jax.Array], num_groups: int) -> jax.Array:
    """Rank of each entry by ascending ``score`` among the entries of its group (stable).

    ``groups=None`` means one group: the plain rank (no group arrays are built, so nothing of
    size D is left for XLA to constant-fold).
    """
    if groups is None:
        order = jnp.argsort(score, stable=True)
        return jnp.zeros(score.shape, jnp.int32).at[order].set(jnp.arange(score.shape[0], dtype=jnp.int32))
    order = jnp.lexsort((score, groups))  # by group, then by score; ties by index
    sizes = jnp.bincount(groups, length=num_groups).astype(jnp.int32)
    starts = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    pos = jnp.arange(score.shape[0], dtype=jnp.int32) - starts[groups[order]]
    return jnp.zeros(score.shape, jnp.int32).at[order].set(pos)


def _ordered_bits(score: jax.Array) -> jax.Array:
    """Signed integers with the same order as the float ``score`` (-0.0 counted as +0.0)."""
    itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[score.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(jnp.where(score == 0, jnp.zeros_like(score), score), itype)
    return bits ^ ((bits >> (8 * score.dtype.itemsize - 1)) & jnp.iinfo(itype).max)


def _smallest_k_global(score: jax.Array, k) -> jax.Array:
    """``argsort``-free :func:`smallest_k` for one group: bisection on the bits of the scores.

    One compare-and-count over the D entries per bit of the dtype (32 or 64 of them), and one
    cumulative sum for the ties, instead of a sort (a sort of D floats costs ~15x more on CPU).
    """
    return _smallest_k_keys(_ordered_bits(_floating(score)), k)


def _floating(score: jax.Array) -> jax.Array:
    return score if jnp.issubdtype(score.dtype, jnp.floating) else score.astype(jnp.float32)


def _smallest_k_keys(key: jax.Array, k) -> jax.Array:
    """:func:`_smallest_k_global` on signed integer keys (:func:`_ordered_bits` of the scores)."""
    k = jnp.asarray(k, jnp.int32)

    def body(_, lohi):  # invariant: count(key <= hi) >= k; the answer is the smallest such hi
        lo, hi = lohi
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        enough = jnp.sum(key <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, hi = jnp.min(key), jnp.max(key)
    _, t = jax.lax.fori_loop(0, 8 * key.dtype.itemsize, body, (lo, hi))
    below = key < t
    ties = key == t
    need = k - jnp.sum(below, dtype=jnp.int32)
    return below | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= need))


def smallest_k(score: jax.Array, k, groups: Optional[jax.Array] = None) -> jax.Array:
    """Bool mask of the ``k`` smallest entries of ``score`` (exactly k; ties by index, stable).

    With ``groups`` (a (D,) int32 id per entry) ``k`` is a (G,) vector and the mask holds the
    ``k[g]`` smallest entries of every group ``g``. ``k`` may be traced.
    """
    if groups is None:
        return _smallest_k_global(score, k)
    k, groups = jnp.asarray(k, jnp.int32), jnp.asarray(groups)
    sizes = jnp.bincount(groups, length=k.shape[0]).astype(jnp.int32)

    def one_partial():  # the other groups are pruned whole or kept whole: one selection over all
        key = _ordered_bits(_floating(score))
        lo, hi = jnp.iinfo(key.dtype).min, jnp.iinfo(key.dtype).max
        kg = k[groups]
        key = jnp.where(kg >= sizes[groups], lo, jnp.where(kg <= 0, hi, jnp.clip(key, lo + 1, hi - 1)))
        return _smallest_k_keys(key, jnp.sum(k))

    # e.g. a global budget with an earlier stage's pruned set frozen in a group of its own: no sort
    return jax.lax.cond(jnp.sum((k > 0) & (k < sizes)) <= 1, one_partial,
                        lambda: _rank_in_group(score, groups, k.shape[0]) < k[groups])


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """Magnitude pruning (MP): prune the k weights of smallest ``|w|``.

    With the default global budget the threshold is shared by all layers; with
    ``budget="uniform"`` (or per-layer sparsities) each layer is thresholded on its own.
    """

    def select(self, problem: Problem, k, key):
        del key
        return smallest_k(jnp.abs(problem.w), k, problem.groups), {}


@dataclasses.dataclass(frozen=True)
class WoodFisher:
    """WoodFisher/OBS saliency with a global threshold (WF-S; with ``update="obs"``: WF).

    Prunes the k weights of smallest ``w_q^2 / [F_lambda^{-1}]_qq`` (the OBS saliency, up to the
    factor 1/2), with the diagonal of the blockwise inverse from Woodbury (N x N solves).

    References: Singh & Alistarh 2020 (WoodFisher); cbs.md section 4 ("WF", "WF-S").
    """

    def select(self, problem: Problem, k, key):
        del key
        assert problem.fisher is not None  # WoodFisher needs the Fisher
        saliency = problem.w**2 / problem.fisher.inv_diag()
        return smallest_k(saliency, k, problem.groups), {}
