"""The exact re-solve of a layer for a given mask: each output unit's least-squares optimum.

For output unit r with trained weights w̄ (d_in,), kept set K and pruned set P, the kernel that
keeps the layer's outputs closest on the calibration inputs is

    w* = argmin_{w : w_P = 0} (w - w̄)ᵀ H (w - w̄),   so   w*_K = [H_KK]⁻¹ (H w̄)_K,

with H the (damped) layer Hessian shared by all rows. Equivalently (the OBS form)
``w* = w̄ - [H⁻¹]_{:,P} ([H⁻¹]_PP)⁻¹ w̄_P``, restricted to K. Each row needs one Cholesky of the
smaller of its two systems (|K| or |P| unknowns), so the work is ``rows * max_r min(|K_r|, |P_r|)³ / 3``.
Rows differ in their sets: each row's system is gathered to a common padded size (identity on
the padding), and the rows are solved one after another in a ``lax.map`` (memory ``size²``; no
``d_in² x rows`` tensor is formed). One row at a time on purpose: jaxlib's *batched* CPU
LAPACK kernels (potrf/trsm over a batch) wait on XLA's intra-op thread pool from inside it and
deadlocked when two ran at once (seen with jax 0.10.2 on 2 cores, SmolLM2-sized layers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .._core.mesh import rows_sharded
from .base import LayerProblem, LayerUpdate

__all__ = ["Exact", "exact_update"]

_PAD = 32  # padded system sizes are rounded up to a multiple of this (fewer compilations)


def _gather_indices(sel: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the indices of its selected entries, padded to ``size``, and a validity mask."""
    rows, d = sel.shape
    order = np.argsort(~sel, axis=1, kind="stable")[:, :size]  # selected first, in index order
    valid = np.arange(size)[None, :] < sel.sum(1, keepdims=True)
    return order.astype(np.int32), valid


def _solve(h, hinv, w0, idx, valid, kept_form):
    # Row r solves the smaller of its two systems: kept form [H_KK] w_K = (H w̄)_K, or OBS form
    # [H^-1]_PP z = w̄_P then w = w̄ - z [H^-1]_{P,:}. Both read one stacked (2d, d) matrix, so a
    # row picks its form by an index offset. Only the gathers and the small factorisations run
    # inside the loop; the products with H or H^-1 are one matmul each outside it.
    rows, d = w0.shape
    eye = jnp.eye(idx.shape[1], dtype=h.dtype)
    stacked = jnp.concatenate([h, hinv], axis=0)
    b = jnp.where(kept_form[:, None], w0 @ h, w0)
    rhs = jnp.where(valid, jnp.take_along_axis(b, idx, axis=1), 0.0)
    offset = jnp.where(kept_form, 0, d)

    def one(args):
        i, v, r, off = args
        a = jnp.where(v[:, None] & v[None, :], stacked[(i + off)[:, None], i[None, :]], eye)
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), r)

    z = jnp.where(valid, jax.lax.map(one, (idx, valid, rhs, offset)), 0.0)
    at = (jnp.arange(rows)[:, None], idx)
    full = jnp.zeros_like(w0).at[at].add(z)
    selected = jnp.zeros(w0.shape, bool).at[at].max(valid)
    obs = jnp.where(selected, 0.0, w0 - full @ hinv)  # selected = the pruned set in the OBS form
    return jnp.where(kept_form[:, None], full, obs)


@functools.lru_cache(maxsize=None)
def _solver(mesh: Optional[Mesh]):
    return rows_sharded(_solve, mesh, 2, 4)


def exact_update(w0: jax.Array, h: jax.Array, u: jax.Array, keep: np.ndarray, mesh: Optional[Mesh] = None) -> jax.Array:
    """Each row of ``w0`` (rows, d) re-solved on its kept set, for the damped Hessian ``h``.

    ``u`` is the upper Cholesky factor of ``h⁻¹`` (``h⁻¹ = uᵀu``; the OBS form needs ``h⁻¹``);
    ``keep`` is the (rows, d) host bool mask. Each row solves the smaller of its two systems,
    so the padded size is ``max_r min(|K_r|, |P_r|) <= d / 2`` even when the rows' counts differ
    (a per-layer mask). Pruned entries of the result are exactly 0. With ``mesh``, the rows are
    split over the mesh's first axis (each row's solve is its own: the result is the same).
    """
    keep = np.asarray(keep, bool)
    rows, d = keep.shape
    kept, pruned = keep.sum(1), (~keep).sum(1)
    if pruned.max() == 0:
        return w0
    if kept.max() == 0:
        return jnp.zeros_like(w0)
    kept_form = kept <= pruned
    sel = np.where(kept_form[:, None], keep, ~keep)
    n = int(np.minimum(kept, pruned).max())
    size = min(d, max(_PAD, -(-n // _PAD) * _PAD))
    idx, valid = _gather_indices(sel, size)
    pad = 0 if mesh is None else -rows % mesh.shape[mesh.axis_names[0]]
    if pad:  # whole rows per device: repeat row 0, drop it after
        w0p = jnp.concatenate([w0, jnp.repeat(w0[:1], pad, 0)])
        idx, valid, kept_form = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (idx, valid, kept_form))
    else:
        w0p = w0
    out = _solver(mesh)(h, u.T @ u, w0p, jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(kept_form))
    return out[:rows]


@dataclasses.dataclass(frozen=True)
class Exact(LayerUpdate):
    """The exact re-solve as an update: after any pruner chose the mask, every output unit's kept
    weights become the least-squares optimum ``w*_K = [H_KK]⁻¹ (H w̄)_K`` on the damped ``H``
    (against the original kernel). Use as ``update=Exact()`` or ``update="exact"``."""

    def apply(self, problem: LayerProblem, keep: jax.Array) -> jax.Array:
        assert problem.factors is not None  # uses_factors
        return exact_update(problem.w, problem.factors.h, problem.factors.u, np.asarray(keep), mesh=problem.mesh)
