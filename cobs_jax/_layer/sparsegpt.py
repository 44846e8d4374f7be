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

The per-column loop is a ``lax.fori_loop`` over sub-blocks of up to 32 columns, each swept column
by column and then applied to the block's later columns in one product (the lazy scheme again,
one level down: less memory traffic per column step). The blocks are a ``fori_loop`` too (the
kernel padded to whole blocks with zero weights on identity rows of U): one small program per
layer shape, compiled in about a second, at the price of lazy updates over the full width
(``rows * d²`` extra flops, a few ms per layer).
Counts are exact: the unstructured count of block b is ``round(s * n_b) - round(s * n_{b-1})``
for the cumulative sizes n_b (the reference uses the per-slab quantile, which differs by at most
one weight per slab), so the layer (or each row) prunes exactly ``round(s * size)`` weights.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .base import LayerProblem, LayerPruner, LayerSelection, check_granularity, positive_int
from .masks import nm_prune, prune_smallest, prune_smallest_rows, span_counts

__all__ = ["sparsegpt", "sparsegpt_counts", "SparseGPT"]

_SUB = 32  # columns per sub-block of the per-column loop


def _sub_width(width: int, m: int) -> int:
    """The largest multiple of ``m`` that divides ``width`` and is at most ``max(_SUB, m)``."""
    return max(s for s in range(m, max(_SUB, m) + 1, m) if width % s == 0)


def _block_columns(w1, u1, keep1, nm):
    """SparseGPT's per-column loop over one block: quantise each column, spread its error.

    The block is swept in sub-blocks of :func:`_sub_width` columns: inside a sub-block, column
    by column (a ``fori_loop``, touching only the sub-block's columns); after it, its errors
    update the block's later columns in one product, the same "lazy" scheme as between blocks.
    The result equals the plain column loop up to rounding and moves less memory per step.
    Returns the block's updated weights (before masking), keep-mask and scaled errors.
    """
    rows, width = w1.shape
    m = nm[1] if nm is not None else 1
    sub = _sub_width(width, m)
    du = jnp.diagonal(u1)
    cols = jnp.arange(width)

    def column(i, carry):
        ws, ks, es, us, dus = carry
        if nm is not None:
            n = nm[0]
            seg = jax.lax.dynamic_slice_in_dim(ws, i, m, axis=1) ** 2
            seg = seg / jax.lax.dynamic_slice_in_dim(dus, i, m)[None, :] ** 2
            new = jax.lax.dynamic_update_slice_in_dim(ks, ~nm_prune(seg, n, m), i, axis=1)
            ks = jnp.where(i % m == 0, new, ks)
        col = ws[:, i]
        err = jnp.where(ks[:, i], 0.0, col) / us[i, i]
        ws = ws - err[:, None] * us[i][None, :]  # us[i, :i] == 0: only columns >= i change
        return ws, ks, es.at[:, i].set(err), us, dus

    def sub_block(j, carry):
        w1, keep1, err1 = carry
        s1 = j * sub
        ws = jax.lax.dynamic_slice_in_dim(w1, s1, sub, axis=1)
        ks = jax.lax.dynamic_slice_in_dim(keep1, s1, sub, axis=1)
        us = jax.lax.dynamic_slice(u1, (s1, s1), (sub, sub))
        dus = jax.lax.dynamic_slice_in_dim(du, s1, sub)
        ws, ks, es, _, _ = jax.lax.fori_loop(0, sub, column, (ws, ks, jnp.zeros_like(ws), us, dus))
        # the later columns of the block get the sub-block's errors at once (U is upper
        # triangular, so the columns before s1 are unaffected; those of the sub-block are done)
        later = jnp.where(cols[None, :] >= s1 + sub, jax.lax.dynamic_slice_in_dim(u1, s1, sub, axis=0), 0.0)
        w1 = jax.lax.dynamic_update_slice_in_dim(w1 - es @ later, ws, s1, axis=1)
        keep1 = jax.lax.dynamic_update_slice_in_dim(keep1, ks, s1, axis=1)
        return w1, keep1, jax.lax.dynamic_update_slice_in_dim(err1, es, s1, axis=1)

    return jax.lax.fori_loop(0, width // sub, sub_block, (w1, keep1, jnp.zeros_like(w1)))


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
    bs = min(block_size, d)
    nb = -(-d // bs)
    pad = nb * bs - d
    if pad:  # zero weights on identity rows of U: never pruned (unstructured), no error, no coupling
        w = jnp.pad(w, ((0, 0), (0, pad)))
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(d + pad) >= d).astype(u.dtype)
    real = jnp.arange(d + pad) < d
    cols = jnp.arange(d + pad)

    def block(b, carry):
        w, keep = carry
        i1 = b * bs
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, bs, axis=1)
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
        if nm is None:
            assert counts is not None  # given for unstructured sparsity
            du = jnp.diagonal(u1)
            score = jnp.where(jax.lax.dynamic_slice_in_dim(real, i1, bs)[None, :], w1**2 / du[None, :] ** 2, jnp.inf)
            if granularity == "unit":
                keep1 = ~prune_smallest_rows(score, counts[b])
            else:
                keep1 = ~prune_smallest(score, counts[b])
        else:
            keep1 = jnp.ones(w1.shape, bool)
        w1, keep1, err1 = _block_columns(w1, u1, keep1, nm)
        # the lazy update of every later column (U is upper triangular: earlier ones are untouched)
        later = jnp.where(cols[None, :] >= i1 + bs, jax.lax.dynamic_slice_in_dim(u, i1, bs, axis=0), 0.0)
        w = jax.lax.dynamic_update_slice_in_dim(w - err1 @ later, jnp.where(keep1, w1, 0.0), i1, axis=1)
        return w, jax.lax.dynamic_update_slice_in_dim(keep, keep1, i1, axis=1)

    w, keep = jax.lax.fori_loop(0, nb, block, (w, jnp.ones(w.shape, bool)))
    return w[:, :d], keep[:, :d]


@dataclasses.dataclass(frozen=True)
class SparseGPT(LayerPruner):
    """SparseGPT (Frantar & Alistarh, ICML 2023): masks chosen block by block from the partly
    updated weights, OBS updates through the Cholesky factor of the damped ``H⁻¹``.

    Args:
      block_size: the column block of the mask choice and of the lazy update (the paper's
        ``blocksize``, 128). With an N:M pattern it must be a multiple of M.
      granularity: where the unstructured count is exact: ``"layer"`` (each block's share of
        ``round(s * size)`` over its rows x block slab, as published) or ``"unit"`` (per row).

    References: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
    in One-Shot", ICML 2023 (``IST-DASLab/sparsegpt``).
    """

    block_size: int = 128
    granularity: str = "layer"
    uses_factors: ClassVar[bool] = True

    def __post_init__(self):
        positive_int(self.block_size, "SparseGPT(block_size=...)")
        check_granularity(self.granularity, "SparseGPT")

    def check(self, d_in: int, nm: Optional[tuple[int, int]], name: str) -> None:
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"{name}: `SparseGPT(block_size={self.block_size})` must be a multiple of M={nm[1]} "
                             f"for the pattern {nm[0]}:{nm[1]}")

    def prune(self, problem: LayerProblem) -> LayerSelection:
        assert problem.factors is not None  # uses_factors
        rows, d = problem.w.shape
        counts = None
        if problem.nm is None:
            assert problem.sparsity is not None
            counts = jnp.asarray(sparsegpt_counts(problem.sparsity, rows, d, self.block_size, self.granularity))
        w, keep = sparsegpt(problem.w, problem.factors.u, counts, block_size=self.block_size, nm=problem.nm,
                            granularity=self.granularity)
        return LayerSelection(w, keep, {})
