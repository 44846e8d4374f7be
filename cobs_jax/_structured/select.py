"""Choosing which groups to remove: magnitude-sp, Wanda-sp, greedy group OBS, and CBS on groups.

All work on a consumer's rows-layout ``W`` (rows, d), its damped Hessian and ``groups``
((n, s) input columns). The second-order objective of a removed set P of groups is the error
after exact compensation, ``E(P) = tr(W_P (G_PP)⁻¹ W_Pᵀ)`` with ``G = H⁻¹``
(:mod:`.compensate`). Selections are bool (n,) vectors, True = removed, with exactly ``k`` True.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .._core.linalg import chol_inverse, spd_inverse
from .._core.topk import smallest_k

__all__ = ["family_of", "magnitude_sp", "wanda_sp", "greedy_obs", "greedy_columns", "swap_search", "column_swap_deltas", "group_swap_deltas", "objective"]


def family_of(n: int, families: int) -> jax.Array:
    """The family of each of ``n`` groups: ``families`` equal consecutive runs (the query heads
    of one KV head), from each of which the same count must go."""
    return jnp.arange(n) // (n // families)


def _lowest(score: jax.Array, k: int, families: int) -> jax.Array:
    if families == 1:
        return smallest_k(score, k)
    return smallest_k(score, jnp.full(families, k // families), family_of(score.shape[0], families))


def magnitude_sp(w: jax.Array, groups: jax.Array, k: int, families: int = 1) -> jax.Array:
    """FLAP's magnitude-sp: a group scores the sum of its columns' ``‖W[:, j]‖₂``; the ``k``
    lowest go (structured.md §3.2; ties by position; ``k / families`` from each family)."""
    score = jnp.sum(jnp.linalg.norm(w, axis=0)[groups], axis=1)
    return _lowest(score, k, families)


def wanda_sp(w: jax.Array, h: jax.Array, count: int, groups: jax.Array, k: int, families: int = 1) -> jax.Array:
    """FLAP's Wanda-sp: column score ``mean_r |W_rj| · sqrt(a_j)`` with ``a_j`` the mean of
    ``x_j²`` (``H_jj / count``); a group scores the sum (structured.md §3.3)."""
    col = jnp.mean(jnp.abs(w), axis=0) * jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0) / count)
    return _lowest(jnp.sum(col[groups], axis=1), k, families)


def _block(g: jax.Array, groups: jax.Array) -> jax.Array:
    return g[groups[:, :, None], groups[:, None, :]]  # (n, s, s)


def greedy_obs(w: jax.Array, hd: jax.Array, groups: jax.Array, k: int,
               families: int = 1) -> tuple[jax.Array, jax.Array]:
    """Greedy group OBS (ZipLM's structured step, structured.md §1.3): ``k`` times, remove the
    group of least error ``tr(W_g (G_gg)⁻¹ W_gᵀ)`` given the removals so far, then apply its OBS
    update to ``W`` and downdate ``G``. The exact score of each step, not SlimGPT's diagonal
    estimate. The (n, s, s) blocks are inverted in pure JAX (:func:`spd_inverse`).

    With ``families`` > 1 a family whose ``k / families`` groups are gone takes no more.

    Returns the removed set and the ``k`` step errors: their running sum is the exact error
    ``E`` after 1, 2, ... removals (ZipLM's level database), used for budgets across layers."""
    n, s = groups.shape
    if k == 0:
        return jnp.zeros(n, bool), jnp.zeros(0, w.dtype)
    if s == 1 and families == 1:
        return greedy_columns(w, hd, groups[:, 0], k)
    return _greedy_groups(w, hd, groups, k, families)


@partial(jax.jit, static_argnames=("k", "families"))
def _greedy_groups(w, hd, groups, k, families):
    n, s = groups.shape
    fam = family_of(n, families)
    g0 = chol_inverse(hd)
    eye = jnp.eye(s, dtype=hd.dtype)

    def step(i, carry):
        w, g, removed, steps = carry
        inv = spd_inverse(jnp.where(removed[:, None, None], eye, _block(g, groups)))
        wg = w[:, groups]  # (rows, n, s)
        score = jnp.einsum("rns,nst,rnt->n", wg, inv, wg)
        full = jnp.bincount(fam, weights=removed.astype(jnp.int32), length=families)[fam] >= k // families
        j = jnp.argmin(jnp.where(removed | ((families > 1) & full), jnp.inf, score))
        idx = groups[j]
        gj = g[idx, :]  # (s, d)
        lam = w[:, idx] @ inv[j]  # (rows, s)
        w = (w - lam @ gj).at[:, idx].set(0.0)
        g = g - gj.T @ inv[j] @ gj
        g = g.at[idx, :].set(0.0).at[:, idx].set(0.0).at[idx, idx].set(1.0)
        return w, g, removed.at[j].set(True), steps.at[i].set(score[j])

    init = (w, g0, jnp.zeros(n, bool), jnp.zeros(k, w.dtype))
    _, _, removed, steps = jax.lax.fori_loop(0, k, step, init)
    return removed, steps


def greedy_columns(w: jax.Array, hd: jax.Array, columns: jax.Array, k: int, batch: int = 1):
    """:func:`greedy_obs` for groups of one column (MLP channels), on the candidate columns only
    (the downdates never leave them), with rank-``batch`` updates: each step removes the
    ``batch`` columns of least current error together (SlimGPT's batched greedy; ``batch=1``
    is exact greedy OBS), then updates ``W`` and downdates ``G`` by their block. The step
    errors of a block are its exact joint error split evenly. A removed column's row and
    column of ``G`` become zero by the downdate itself. ``k`` is traced: one program per
    layer shape, whatever the count."""
    removed, steps = _greedy_columns(w, hd, columns, jnp.int32(k), batch)
    return removed, steps[:k]


@partial(jax.jit, static_argnames=("batch",))
def _greedy_columns(w, hd, columns, k, batch):
    g = chol_inverse(hd)[columns[:, None], columns[None, :]]
    w = w[:, columns]
    n = columns.shape[0]

    def step(size):
        def run(i, carry):
            w, g, removed, steps, done = carry
            score = jnp.where(removed, jnp.inf, jnp.sum(w * w, axis=0) / jnp.diagonal(g))
            p = jax.lax.top_k(-score, size)[1]
            v = spd_inverse(g[p[:, None], p[None, :]])
            gp = g[p]  # (size, n)
            lam = w[:, p] @ v
            err = jnp.sum(lam * w[:, p])  # tr(W_P V W_Pᵀ): the block's exact joint error
            w = w - lam @ gp
            g = g - gp.T @ (v @ gp)
            steps = jax.lax.dynamic_update_slice(steps, jnp.full(size, err / size, w.dtype), (done,))
            return w, g, removed.at[p].set(True), steps, done + size
        return run

    carry = (w, g, jnp.zeros(n, bool), jnp.zeros(n, w.dtype), jnp.int32(0))
    carry = jax.lax.fori_loop(0, k // batch, step(batch), carry)
    if batch > 1:
        carry = jax.lax.fori_loop(0, k % batch, step(1), carry)
    return carry[2], carry[3]


def objective(w: jax.Array, g: jax.Array, cols: jax.Array) -> jax.Array:
    """``E`` for the removed columns ``cols`` (static size m): ``Σ_r w_r,P (G_PP)⁻¹ w_r,Pᵀ``."""
    wp = w[:, cols]  # (rows, m)
    return jnp.sum(wp * (wp @ spd_inverse(g[cols[:, None], cols[None, :]])))


def column_swap_deltas(wc: jax.Array, g: jax.Array, removed: jax.Array, k: int):
    """Every swap's exact change of ``E`` for groups of one column.

    ``wc`` (rows, n) and ``g`` (n, n) are ``W`` and ``G = H⁻¹`` on the candidate columns,
    ``removed`` bool (n,) with ``k`` True. With ``V = (G_PP)⁻¹``, ``Λ = W_P V``, ``C = V G_PK``,
    the residuals ``ρ = W_K − W_P C`` and Schur complements ``s_b = G_bb − G_bP C_b``, swapping
    removed ``a`` for kept ``b`` changes the objective by::

        Δ(a, b) = −L_a / V_aa + (R_b + 2 β X_ab + β² L_a) / (s_b + C_ab² / V_aa),  β = C_ab / V_aa

    (``L = Σ_r Λ²``, ``R = Σ_r ρ²``, ``X = Λᵀ ρ``): removing ``a`` lowers ``E`` by
    ``λ_a² / V_aa`` per row, then adding ``b`` raises it by its residual² over its Schur
    complement, both after ``a``'s rank-1 downdate of ``V``.

    Returns ``(p, q, Δ, E)``: the removed (k,) and kept (n − k,) positions, Δ (k, n − k), and
    the current objective.
    """
    order = jnp.argsort(~removed, stable=True)
    p, q = order[:k], order[k:]
    v = chol_inverse(g[p[:, None], p[None, :]])
    lam = wc[:, p] @ v
    gpq = g[p[:, None], q[None, :]]
    c = v @ gpq
    rho = wc[:, q] - wc[:, p] @ c
    s = jnp.diagonal(g)[q] - jnp.sum(gpq * c, axis=0)
    vd = jnp.diagonal(v)
    lsq = jnp.sum(lam * lam, axis=0)
    beta = c / vd[:, None]
    delta = (-lsq / vd)[:, None] + (jnp.sum(rho * rho, axis=0)[None, :] + 2 * beta * (lam.T @ rho)
                                   + beta**2 * lsq[:, None]) / (s[None, :] + c * beta)
    return p, q, delta, jnp.sum(lam * wc[:, p])


def group_swap_deltas(wc: jax.Array, g: jax.Array, removed: jax.Array, k: int, s: int):
    """Every swap's exact change of ``E`` for groups of ``s`` contiguous columns: the block form
    of :func:`column_swap_deltas` (``wc`` (rows, n s), ``g`` (n s, n s), group ``j`` the columns
    ``j s … j s + s − 1``).

    With ``V = (G_PP)⁻¹``, ``Λ = W_P V``, ``C = V G_PK``, ``ρ = W_K − W_P C`` and the Schur
    complements ``S_b = G_bb − G_bP C_b`` as before, and for removed ``a``: ``U_a = (V_aa)⁻¹``
    (s × s), ``M_ab = U_a C_ab``; removing ``a`` lowers ``E`` by ``tr(U_a Λ_aᵀ Λ_a)``; after
    its block downdate of ``V``, kept ``b`` has the residual ``ρ_b + Λ_a M_ab`` and the Schur
    complement ``S_b + C_abᵀ M_ab``, and adding it raises ``E`` by ``tr(S'⁻¹ ρ'ᵀ ρ')``. All
    pairs cost ``k (n − k)`` inverses of ``s × s``, where recomputing ``E`` costs one of
    ``k s × k s`` per pair.

    Returns ``(p, q, Δ, E)`` as :func:`column_swap_deltas` does, over groups."""
    n = removed.shape[0]
    m = n - k
    order = jnp.argsort(~removed, stable=True)
    p, q = order[:k], order[k:]
    span = jnp.arange(s)
    pb, qb = p[:, None] * s + span[None, :], q[:, None] * s + span[None, :]  # (groups, s) columns
    pc, qc = pb.ravel(), qb.ravel()
    v = chol_inverse(g[pc[:, None], pc[None, :]])
    lam = wc[:, pc] @ v
    gpq = g[pc[:, None], qc[None, :]]
    c = v @ gpq
    rho = (wc[:, qc] - wc[:, pc] @ c).reshape(-1, m, s)
    schur = g[qb[:, :, None], qb[:, None, :]] - jnp.einsum("pbi,pbj->bij", gpq.reshape(k * s, m, s), c.reshape(k * s, m, s))
    u = spd_inverse(jnp.einsum("aiaj->aij", v.reshape(k, s, k, s)))
    lam3 = lam.reshape(-1, k, s)
    ll = jnp.einsum("rai,raj->aij", lam3, lam3)
    gain = jnp.einsum("aij,aji->a", u, ll)
    cab = c.reshape(k, s, m, s).transpose(0, 2, 1, 3)  # (a, b, i in a, j in b)
    mab = jnp.einsum("aij,abjl->abil", u, cab)
    x = jnp.einsum("rai,rbj->abij", lam3, rho)
    cross = jnp.einsum("abji,abjl->abil", x, mab)
    gram = (jnp.einsum("rbi,rbj->bij", rho, rho)[None] + cross + jnp.swapaxes(cross, -1, -2)
            + jnp.einsum("abji,ajk,abkl->abil", mab, ll, mab))
    sp = schur[None] + jnp.einsum("abji,abjl->abil", cab, mab)
    delta = -gain[:, None] + jnp.einsum("abij,abji->ab", spd_inverse(sp), gram)
    return p, q, delta, jnp.sum(lam * wc[:, pc])


_BUCKET = 128  # removed-set columns are padded to multiples of this: one program per few hundred counts


def swap_search(w: jax.Array, hd: jax.Array, groups: jax.Array, start: jax.Array, k: int,
                max_swaps: int, families: int = 1) -> tuple[jax.Array, jax.Array]:
    """CBS on groups: from ``start`` (bool (n,), ``k`` removed), swap one removed group for one
    kept group while that lowers the exact objective ``E`` (every removed/kept pair scored at
    once by :func:`column_swap_deltas` or :func:`group_swap_deltas`, the best taken; with
    ``families``, pairs of one family only), at most ``max_swaps`` swaps. Never worse than
    ``start``. Returns the set and the number of swaps.

    The removed set is padded with dummy groups (zero weights, unit Hessian, no coupling: they
    add no error and never swap) to a multiple of about 128 columns, so layers with different
    counts share one compiled program."""
    n, s = groups.shape
    bucket = max(1, _BUCKET // s)
    kp = -(-k // bucket) * bucket
    cols = groups.reshape(-1)
    g = chol_inverse(hd)[cols[:, None], cols[None, :]]
    gp = jnp.eye((n + bucket) * s, dtype=g.dtype).at[: n * s, : n * s].set(g)
    wp = jnp.pad(w[:, cols], ((0, 0), (0, bucket * s)))
    fam = jnp.concatenate([family_of(n, families), jnp.full(bucket, -1)])
    dummies = jnp.arange(bucket) < kp - k
    removed, swaps = _swap(wp, gp, jnp.concatenate([start, dummies]), fam, n, kp, s, max_swaps)
    return removed[:n], swaps


@partial(jax.jit, static_argnames=("n", "k", "s", "max_swaps"))
def _swap(wc, g, start, fam, n, k, s, max_swaps):
    total = start.shape[0]

    def body(carry):
        removed, swaps, _ = carry
        if s == 1:
            p, q, delta, value = column_swap_deltas(wc, g, removed, k)
        else:
            p, q, delta, value = group_swap_deltas(wc, g, removed, k, s)
        delta = jnp.where((fam[p][:, None] == fam[q][None, :]) & (fam[q] >= 0)[None, :], delta, jnp.inf)
        best = jnp.argmin(delta)
        a, b = p[best // (total - k)], q[best % (total - k)]
        better = delta.reshape(-1)[best] < -1e-9 * value
        new = jnp.where(better, removed.at[a].set(False).at[b].set(True), removed)
        return new, swaps + better.astype(jnp.int32), better

    removed, swaps, _ = jax.lax.while_loop(lambda c: c[2] & (c[1] < max_swaps), body,
                                           (start, jnp.int32(0), jnp.bool_(True)))
    return removed, swaps
