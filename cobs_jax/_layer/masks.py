"""Mask choice on a layer's (rows, d_in) score matrix: exact counts per layer, per row or N:M.

A layer kernel is seen as ``W`` of shape ``(rows, d_in)``: one row per output unit, the input
(contraction) axis last. Scores are "lower = pruned first". Counts are exact:

* ``"layer"``: ``round(s * rows * d_in)`` over the whole layer (one threshold);
* ``"unit"``: ``round(s * d_in)`` in every row (every output unit equally sparse);
* ``N:M``: in every group of M consecutive inputs of a row, exactly ``M - N`` pruned.

Ties are broken by position (stable sort), with ``-0.0 == +0.0``: the rule of
:func:`cobs_jax.smallest_k`, which every selection here goes through.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._core.topk import smallest_k

__all__ = ["prune_smallest", "prune_smallest_rows", "nm_prune", "span_counts"]


def prune_smallest(score: jax.Array, count) -> jax.Array:
    """Bool array of ``score``'s shape, True on its ``count`` smallest entries (flattened): the
    library's one top-k (:func:`cobs_jax.smallest_k`, its tie rule: ``-0.0 == +0.0``, the
    earliest position first), by bisection on the floats' bits (no sort)."""
    return smallest_k(score.reshape(-1), count).reshape(score.shape)


def prune_smallest_rows(score: jax.Array, counts) -> jax.Array:
    """Bool (rows, n): True on the ``counts[r]`` (or ``counts``) smallest entries of each row."""
    counts = jnp.broadcast_to(jnp.asarray(counts), score.shape[:1])
    return jax.vmap(prune_smallest)(score, counts)


def nm_prune(score: jax.Array, n: int, m: int) -> jax.Array:
    """Bool (rows, d): in every group of ``m`` consecutive entries of a row, the ``m - n`` smallest.

    The rank of an entry in its group is counted by comparing it with the group's other
    ``m - 1`` entries (ties: the earlier position ranks lower), as a stable sort would rank them.
    """
    rows, d = score.shape
    g = score.reshape(rows, d // m, m)
    a, b = g[..., :, None], g[..., None, :]  # rank_i = #{j : g_j < g_i or (g_j == g_i and j < i)}
    earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[None, None]
    rank = jnp.sum((b < a) | ((b == a) & earlier), axis=-1)
    return (rank < m - n).reshape(rows, d)


def span_counts(sparsity: float, total: int, bounds: np.ndarray) -> np.ndarray:
    """Counts to prune in consecutive spans so that their cumulative sum is exact.

    ``bounds`` are the span edges ``0 = b_0 < b_1 < ... < b_K = total`` (in units of columns);
    span ``j`` prunes ``round(s * b_{j+1}) - round(s * b_j)``, so spans ``0..j`` together prune
    ``round(s * b_{j+1})`` and all of them exactly ``round(s * total)``.
    """
    cum = np.array([int(round(sparsity * float(b))) for b in bounds], np.int64)
    assert bounds[-1] == total
    return np.diff(cum).astype(np.int32)


@partial(jax.jit, static_argnames=("sparsity", "granularity", "nm"))
def choose(score: jax.Array, sparsity: Optional[float], granularity: str, nm) -> jax.Array:
    """Pruned set (True = pruned) of a whole layer from ``score`` (rows, d_in), on the host's counts."""
    rows, d = score.shape
    if nm is not None:
        return nm_prune(score, *nm)
    assert sparsity is not None  # unstructured
    if granularity == "unit":
        return prune_smallest_rows(score, int(round(sparsity * d)))
    return prune_smallest(score, int(round(sparsity * rows * d)))
