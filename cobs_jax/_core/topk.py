"""The one exact top-k of the library: the ``k`` smallest scores, ties broken by position.

Every selection (the Fisher half's selectors and budgets, the layer half's masks and SparseGPT's
blocks) goes through :func:`smallest_k` / :func:`smallest_k_keys`, so they share one tie rule:
scores are compared as numbers (``-0.0 == +0.0``), and among equal scores the earlier position
is pruned first, as a stable sort would. ``k`` may be traced; no sort is needed for one group.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["smallest_k", "smallest_k_keys", "ordered_bits", "rank_in_group"]


def rank_in_group(score: jax.Array, groups: Optional[jax.Array], num_groups: int) -> jax.Array:
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


def ordered_bits(score: jax.Array) -> jax.Array:
    """Signed integers with the same order as the float ``score`` (-0.0 counted as +0.0)."""
    itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[score.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(jnp.where(score == 0, jnp.zeros_like(score), score), itype)
    return bits ^ ((bits >> (8 * score.dtype.itemsize - 1)) & jnp.iinfo(itype).max)


def _smallest_k_global(score: jax.Array, k) -> jax.Array:
    """``argsort``-free :func:`smallest_k` for one group: bisection on the bits of the scores.

    One compare-and-count over the D entries per bit of the dtype (32 or 64 of them), and one
    cumulative sum for the ties, instead of a sort (a sort of D floats costs ~15x more on CPU).
    """
    return smallest_k_keys(ordered_bits(_floating(score)), k)


def _floating(score: jax.Array) -> jax.Array:
    return score if jnp.issubdtype(score.dtype, jnp.floating) else score.astype(jnp.float32)


def smallest_k_keys(key: jax.Array, k) -> jax.Array:
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
        key = ordered_bits(_floating(score))
        lo, hi = jnp.iinfo(key.dtype).min, jnp.iinfo(key.dtype).max
        kg = k[groups]
        key = jnp.where(kg >= sizes[groups], lo, jnp.where(kg <= 0, hi, jnp.clip(key, lo + 1, hi - 1)))
        return smallest_k_keys(key, jnp.sum(k))

    # e.g. a global budget with an earlier stage's pruned set frozen in a group of its own: no sort
    return jax.lax.cond(jnp.sum((k > 0) & (k < sizes)) <= 1, one_partial,
                        lambda: rank_in_group(score, groups, k.shape[0]) < k[groups])
