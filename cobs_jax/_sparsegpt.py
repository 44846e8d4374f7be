"""SparseGPT (Frantar & Alistarh, ICML 2023) for one layer, as in ``IST-DASLab/sparsegpt``.

Given ``W`` (rows, d_in) and the upper Cholesky factor ``U`` of the damped ``H⁻¹`` (``H⁻¹ = UᵀU``),
columns are processed left to right in blocks of ``block_size``:

* at the start of a block the mask of its columns is chosen from the *current* (already partly
  updated) weights by the OBS saliency ``w² / U_jj²`` (unstructured: the block's share of the
  count over the rows x block slab, or per row; N:M: at every M-th column, per row, the M - N
  smallest of the next M columns);
* column j of the block is then quantised to its mask (``q = w`` if kept, else 0) and the error
  ``(w - q) / U_jj`` is spread over the block's remaining columns with row j of U;
* after the block, the accumulated errors update every later column at once (the "lazy" update
  ``W[:, i2:] -= Err @ U[i1:i2, i2:]``).

The per-column loop is a ``lax.fori_loop``; the block loop is unrolled at trace time (static
slices, exact lazy-update flops), so one compilation serves every layer of the same shape.
Counts are exact: the unstructured count of block b is ``round(s * n_b) - round(s * n_{b-1})``
for the cumulative sizes n_b (the reference uses the per-slab quantile, which differs by at most
one weight per slab), so the layer (or each row) prunes exactly ``round(s * size)`` weights.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._layer_masks import nm_prune, prune_smallest, prune_smallest_rows, span_counts

__all__ = ["sparsegpt", "sparsegpt_counts"]


def sparsegpt_counts(sparsity: float, rows: int, d: int, block_size: int, granularity: str) -> np.ndarray:
    """Per-block prune counts: of the rows x block slab (``"layer"``) or of each row (``"unit"``)."""
    bounds = np.minimum(np.arange(0, d + block_size, block_size), d)
    bounds = np.unique(bounds)
    if granularity == "unit":
        return span_counts(sparsity, d, bounds)
    return span_counts(sparsity, rows * d, bounds * rows)


@partial(jax.jit, static_argnames=("block_size", "nm", "granularity"))
def sparsegpt(
    w: jax.Array,
    u: jax.Array,
    counts: Optional[jax.Array],
    *,
    block_size: int,
    nm: Optional[tuple[int, int]],
    granularity: str,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT's pruned weights and keep-mask for ``w`` (rows, d) given ``u`` (d, d).

    ``counts``: per-block prune counts from :func:`sparsegpt_counts` (ignored for N:M).
    Returns ``(new_w, keep)``; pruned entries are exactly 0.
    """
    rows, d = w.shape
    keeps = []
    for b, i1 in enumerate(range(0, d, block_size)):
        i2 = min(i1 + block_size, d)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        du = jnp.diagonal(u1)
        if nm is None:
            assert counts is not None  # given for unstructured sparsity
            score = w1**2 / du[None, :] ** 2
            if granularity == "unit":
                pruned = prune_smallest_rows(score, counts[b])
            else:
                pruned = prune_smallest(score, counts[b])
            keep1 = ~pruned
        else:
            keep1 = jnp.ones(w1.shape, bool)

        def column(i, carry):
            w1, keep1, err1 = carry
            if nm is not None:
                n, m = nm
                seg = jax.lax.dynamic_slice_in_dim(w1, i, m, axis=1) ** 2
                seg = seg / jax.lax.dynamic_slice_in_dim(du, i, m)[None, :] ** 2
                new = jax.lax.dynamic_update_slice_in_dim(keep1, ~nm_prune(seg, n, m), i, axis=1)
                keep1 = jnp.where(i % m == 0, new, keep1)
            col = w1[:, i]
            q = jnp.where(keep1[:, i], col, 0.0)
            err = (col - q) / u1[i, i]
            w1 = w1 - err[:, None] * u1[i][None, :]  # u1[i, :i] == 0: only columns >= i change
            return w1, keep1, err1.at[:, i].set(err)

        w1, keep1, err1 = jax.lax.fori_loop(0, i2 - i1, column, (w1, keep1, jnp.zeros_like(w1)))
        w = w.at[:, i1:i2].set(jnp.where(keep1, w1, 0.0))
        if i2 < d:
            w = w.at[:, i2:].add(-(err1 @ u[i1:i2, i2:]))
        keeps.append(keep1)
    return w, jnp.concatenate(keeps, axis=1)
