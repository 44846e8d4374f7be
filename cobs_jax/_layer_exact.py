"""The exact re-solve of a layer for a given mask: each output unit's least-squares optimum.

For output unit r with trained weights w̄ (d_in,), kept set K and pruned set P, the kernel that
keeps the layer's outputs closest on the calibration inputs is

    w* = argmin_{w : w_P = 0} (w - w̄)ᵀ H (w - w̄),   so   w*_K = [H_KK]⁻¹ (H w̄)_K,

with H the (damped) layer Hessian shared by all rows. Equivalently (the OBS form)
``w* = w̄ - [H⁻¹]_{:,P} ([H⁻¹]_PP)⁻¹ w̄_P``, restricted to K. Each row needs one Cholesky of the
smaller of the two systems (|K| or |P| unknowns), so the work is ``rows * min(|K|, |P|)³ / 3``.
Rows differ in their sets: each row's system is gathered to a common padded size (identity on
the padding), and the rows are solved one after another in a ``lax.map`` (memory ``size²``; no
``d_in² x rows`` tensor is formed). One row at a time on purpose: jaxlib's *batched* CPU
LAPACK kernels (potrf/trsm over a batch) wait on XLA's intra-op thread pool from inside it and
deadlocked when two ran at once (seen with jax 0.10.2 on 2 cores, SmolLM2-sized layers).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["exact_update"]

_PAD = 32  # padded system sizes are rounded up to a multiple of this (fewer compilations)


def _gather_indices(sel: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the indices of its selected entries, padded to ``size``, and a validity mask."""
    rows, d = sel.shape
    order = np.argsort(~sel, axis=1, kind="stable")[:, :size]  # selected first, in index order
    valid = np.arange(size)[None, :] < sel.sum(1, keepdims=True)
    return order.astype(np.int32), valid


@partial(jax.jit, static_argnames=("form",))
def _solve(w0, h, hinv, idx, valid, *, form: str):
    # Only the gathers and the small factorisations run inside the loop; the products with H or
    # H^-1 are one matmul each outside it.
    rows, d = w0.shape
    eye = jnp.eye(idx.shape[1], dtype=h.dtype)
    mat, b = (h, w0 @ h) if form == "kept" else (hinv, w0)  # kept: w_K = [H_KK]^-1 (H w̄)_K
    rhs = jnp.where(valid, jnp.take_along_axis(b, idx, axis=1), 0.0)

    def one(args):
        i, v, r = args
        a = jnp.where(v[:, None] & v[None, :], mat[i[:, None], i[None, :]], eye)
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), r)

    z = jnp.where(valid, jax.lax.map(one, (idx, valid, rhs)), 0.0)
    at = (jnp.arange(rows)[:, None], idx)
    full = jnp.zeros_like(w0).at[at].add(z)
    if form == "kept":
        return full
    # OBS form: w̄ - [H^-1]_{:,P} ([H^-1]_PP)^-1 w̄_P, then w_P = 0
    pruned = jnp.zeros(w0.shape, bool).at[at].max(valid)
    return jnp.where(pruned, 0.0, w0 - full @ hinv)


def exact_update(w0: jax.Array, h: jax.Array, u: jax.Array, keep: np.ndarray) -> jax.Array:
    """Each row of ``w0`` (rows, d) re-solved on its kept set, for the damped Hessian ``h``.

    ``u`` is the upper Cholesky factor of ``h⁻¹`` (``h⁻¹ = uᵀu`` is formed only for the OBS
    form, used when fewer weights are pruned than kept);
    ``keep`` is the (rows, d) host bool mask. Pruned entries of the result are exactly 0.
    """
    keep = np.asarray(keep, bool)
    rows, d = keep.shape
    k_max, p_max = int(keep.sum(1).max()), int((~keep).sum(1).max())
    if p_max == 0:
        return w0
    if k_max == 0:
        return jnp.zeros_like(w0)
    form, sel, n = ("kept", keep, k_max) if k_max <= p_max else ("pruned", ~keep, p_max)
    size = min(d, -(-n // _PAD) * _PAD)
    idx, valid = _gather_indices(sel, size)
    hinv = u.T @ u if form == "pruned" else None
    return _solve(w0, h, hinv, jnp.asarray(idx), jnp.asarray(valid), form=form)
