"""The exact re-solve of a layer for a given mask: each output unit's least-squares optimum.

For output unit r with trained weights w̄ (d_in,), kept set K and pruned set P, the kernel that
keeps the layer's outputs closest on the calibration inputs is

    w* = argmin_{w : w_P = 0} (w - w̄)ᵀ H (w - w̄),   so   w*_K = [H_KK]⁻¹ (H w̄)_K,

with H the (damped) layer Hessian shared by all rows. Equivalently (the OBS form)
``w* = w̄ - [H⁻¹]_{:,P} ([H⁻¹]_PP)⁻¹ w̄_P``, restricted to K. Each row needs one Cholesky of the
smaller of the two systems (|K| or |P| unknowns), so the work is ``rows * min(|K|, |P|)³ / 3``.
Rows differ in their sets: each row's system is gathered to a common padded size (identity on
the padding), and rows are solved in chunks of a ``lax.map`` so memory stays at
``chunk * size²``; no ``d_in² x rows`` tensor is formed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["exact_update"]

_PAD = 32  # padded system sizes are rounded up to a multiple of this (fewer compilations)
_CHUNK_BYTES = 256 * 2**20  # memory for one chunk of gathered systems


def _gather_indices(sel: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the indices of its selected entries, padded to ``size``, and a validity mask."""
    rows, d = sel.shape
    order = np.argsort(~sel, axis=1, kind="stable")[:, :size]  # selected first, in index order
    valid = np.arange(size)[None, :] < sel.sum(1, keepdims=True)
    return order.astype(np.int32), valid


@partial(jax.jit, static_argnames=("form", "chunk"))
def _solve(w0, h, hinv, idx, valid, *, form: str, chunk: int):
    eye = jnp.eye(idx.shape[1], dtype=h.dtype)

    def one(args):
        w, i, v = args
        vv = v[:, None] & v[None, :]
        if form == "kept":  # w_K = [H_KK]^-1 (H w̄)_K
            a = jnp.where(vv, h[i][:, i], eye)
            rhs = jnp.where(v, (h @ w)[i], 0.0)
            z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), rhs)
            return jnp.zeros_like(w).at[i].add(jnp.where(v, z, 0.0))
        # OBS form: w̄ - [H^-1]_{:,P} ([H^-1]_PP)^-1 w̄_P, then w_P = 0
        a = jnp.where(vv, hinv[i][:, i], eye)
        rhs = jnp.where(v, w[i], 0.0)
        z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), rhs)
        z = jnp.where(v, z, 0.0)
        new = w - hinv[:, i] @ z
        return new.at[i].set(jnp.where(v, 0.0, new[i]))

    return jax.lax.map(one, (w0, idx, valid), batch_size=chunk)


def exact_update(w0: jax.Array, h: jax.Array, hinv: jax.Array, keep: np.ndarray) -> jax.Array:
    """Each row of ``w0`` (rows, d) re-solved on its kept set, for the damped Hessian ``h``.

    ``hinv`` is ``h⁻¹`` (used by the OBS form when fewer weights are pruned than kept);
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
    chunk = int(max(1, min(rows, _CHUNK_BYTES // (3 * size * size * w0.dtype.itemsize))))
    return _solve(w0, h, hinv, jnp.asarray(idx), jnp.asarray(valid), form=form, chunk=chunk)
