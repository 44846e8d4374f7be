"""CBS on a layer's reconstruction objective: joint swap search per output unit, exact weights.

For output unit r with trained weights w̄ (d_in,), kept set K and the (damped) layer Hessian H
shared by every unit, the loss after the optimal update is

    L(K) = ½ min_{w: w_P = 0} (w - w̄)ᵀ H (w - w̄) = ½ w̄ᵀHw̄ - ½ bₖᵀ [H_KK]⁻¹ bₖ,   b = H w̄.

Starting from a mask (SparseGPT's or Wanda's), every row gets a *window* W of ``window``
inputs whose fate is reopened: its least certain kept inputs (smallest OBS saliency
``w̄_j² / [H⁻¹]_jj``) and its most salient pruned ones (N:M: every input of its least certain
groups). The rest of the row is fixed: K0 (kept outside W) and P0 (pruned outside W).
Eliminating K0 exactly (one Cholesky of ``H_K0K0`` per row, the cost of one exact re-solve)
leaves a small problem on W,

    maximise  f(B) = g_Bᵀ [T_BB]⁻¹ g_B   over  B ⊂ W, |B| = |K ∩ W|   (per N:M group),

with ``T = H_WW - H_WK0 [H_K0K0]⁻¹ H_K0W`` (a Schur complement) and ``g = b_W - H_WK0 [H_K0K0]⁻¹ b_K0``;
L(K0 ∪ B) = L(K0) - f(B) / 2 exactly. The swap search on f runs for all rows at once: with
``V = [T_BB]⁻¹`` and ``β = V g`` (the window's weights), swapping kept b for pruned c changes f to

    f + h_c² / s_c - (β_b - E_bc h_c / s_c)² / (V_bb + E_bc² / s_c),
    E = V T,  s_c = T_cc - T_cB E_Bc,  h_c = g_c - (T β)_c,

(add c by a bordered inverse, then remove b by a rank-1 downdate), so every candidate pair of
every row is scored at once from ``V`` and ``E``; the best improving swap of each row is taken
and ``V`` updated by that rank-2 change (no refactorisation per candidate), until no row
improves or ``max_swaps`` swaps are made. ``V`` is recomputed from scratch at the end (a
sweep-operator inverse, pure JAX) and a row whose recomputed f fell below its start keeps its
start. The weights are then exact for the final mask: ``w_B = β``, ``w_K0 = [H_K0K0]⁻¹ b_K0 -
[H_K0K0]⁻¹ H_K0B β`` (the solves already made), so the result is never worse than the start
mask with ``update="exact"``.

Rows are processed in chunks of similar |K0| (padded to a multiple of 64: few compiled
shapes), each row's factorisation alone in a ``lax.map`` (unbatched LAPACK, see
``_layer_exact``), the search batched over the chunk's rows. Memory per chunk: rows x |K0| x
``window`` for the solved columns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .._core.linalg import spd_inverse
from .._core.mesh import rows_sharded
from .base import LayerProblem, LayerPruner, LayerSelection, positive_int
from .sparsegpt import SparseGPT

__all__ = ["CBS", "cbs_layer", "window_indices"]

_PAD = 64  # |K0| is padded to a multiple of this (one compiled program per padded size)
_CHUNK = 256  # rows per chunk at most
_ROWS = 64  # chunks are padded to a multiple of this many rows


@partial(jax.jit, static_argnames=("window", "nm"))
def window_indices(w0, qdiag, keep, *, window: int, nm: Optional[tuple[int, int]]):
    """Per row, the ``window`` inputs whose keep/prune decision is reopened.

    Returns ``(idx, valid)``, both ``(rows, window)``: unstructured, the least salient kept
    inputs and the most salient pruned ones (half the window each, or more of one side when the
    other has too few; salience ``w̄_j² / [H⁻¹]_jj``); N:M, all inputs of the ``window // M``
    groups whose weakest kept input is closest to (or below) their strongest pruned one.
    """
    rows, d = w0.shape
    sal = w0**2 / qdiag[None, :]
    if nm is not None:
        n, m = nm
        groups = d // m
        g = window // m
        s = sal.reshape(rows, groups, m)
        k = keep.reshape(rows, groups, m)
        margin = jnp.min(jnp.where(k, s, jnp.inf), -1) - jnp.max(jnp.where(k, -jnp.inf, s), -1)
        _, top = jax.lax.top_k(-margin, g)  # the g smallest margins
        idx = (top[:, :, None] * m + jnp.arange(m)[None, None, :]).reshape(rows, g * m)
        return idx.astype(jnp.int32), jnp.ones(idx.shape, bool)
    half = window // 2
    nk = jnp.sum(keep, 1)
    npr = d - nk
    qk = jnp.minimum(nk, jnp.maximum(half, window - npr))
    qp = jnp.minimum(npr, window - qk)
    kk = min(window, d)
    _, ik = jax.lax.top_k(jnp.where(keep, -sal, -jnp.inf), kk)  # weakest kept first
    _, ip = jax.lax.top_k(jnp.where(keep, -jnp.inf, sal), kk)  # strongest pruned first
    j = jnp.arange(window)[None, :]
    from_k = j < qk[:, None]
    ik_at = jnp.take_along_axis(ik, jnp.clip(j, 0, kk - 1), 1)
    ip_at = jnp.take_along_axis(ip, jnp.clip(j - qk[:, None], 0, kk - 1), 1)
    idx = jnp.where(from_k, ik_at, ip_at)
    valid = j < (qk + qp)[:, None]
    return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def _solve_fixed(mat, idx, valid, widx, wvalid, vec):
    """Per row (a ``lax.map``): one Cholesky of ``mat`` on the row's fixed set ``idx``; returns
    ``[mat_FF]⁻¹ mat_FW`` (n, m), ``[mat_FF]⁻¹ vec_F`` (n,), ``mat_WW - mat_WF [mat_FF]⁻¹ mat_FW``
    (m, m, identity on invalid window entries) and ``mat_WF [mat_FF]⁻¹ vec_F`` (m,)."""
    n, m = idx.shape[1], widx.shape[1]
    eye_n, eye_m = jnp.eye(n, dtype=mat.dtype), jnp.eye(m, dtype=mat.dtype)

    def one(args):
        i, v, wi, wv, b = args
        a = jnp.where(v[:, None] & v[None, :], mat[i[:, None], i[None, :]], eye_n)
        c = jnp.where(v[:, None] & wv[None, :], mat[i[:, None], wi[None, :]], 0.0)
        rhs = jnp.concatenate([c, jnp.where(v, b[i], 0.0)[:, None]], axis=1)
        sol = jnp.where(v[:, None], jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), rhs), 0.0)
        y_w, y_b = sol[:, :m], sol[:, m]
        t = jnp.where(wv[:, None] & wv[None, :], mat[wi[:, None], wi[None, :]] - c.T @ y_w, eye_m)
        return y_w, y_b, 0.5 * (t + t.T), c.T @ y_b

    return jax.lax.map(one, (idx, valid, widx, wvalid, vec))


def _scatter(values, idx, d):
    """(rows, d) with ``values`` (rows, k) added at ``idx`` (rows, k)."""
    return jnp.zeros(values.shape[:1] + (d,), values.dtype).at[jnp.arange(values.shape[0])[:, None], idx].add(values)


def _kept_form(h, w0, idx, valid, widx, wvalid):
    """Kept form: eliminate the fixed kept set K0 with one Cholesky of ``H_K0K0`` per row.

    The window problem is ``T = H_WW - H_WK0 [H_K0K0]⁻¹ H_K0W``, ``g = b_W - H_WK0 [H_K0K0]⁻¹ b_K0``
    (b = H w̄); for window weights β the row is ``w_W = β``, ``w_K0 = y - Y β``.
    """
    hw = w0 @ h
    y_w, y, t, hy = _solve_fixed(h, idx, valid, widx, wvalid, hw)
    g = jnp.where(wvalid, jnp.take_along_axis(hw, widx, 1) - hy, 0.0)
    return (y_w, y), t, g


def _pruned_form(q, w0, idx, valid, widx, wvalid):
    """Pruned (OBS) form: eliminate the fixed pruned set P0 with one Cholesky of ``Q_P0P0`` per row
    (Q = H⁻¹). The window's conditional covariance ``S = Q_WW - Q_WP0 [Q_P0P0]⁻¹ Q_P0W`` is ``T⁻¹``
    and the optimum with only P0 pruned is ``w1 = w̄ - Q_:P0 [Q_P0P0]⁻¹ w̄_P0``, so ``g = T w1_W``.
    """
    x_w, x, s, _ = _solve_fixed(q, idx, valid, widx, wvalid, w0)
    w1 = w0 - _scatter(jnp.where(valid, x, 0.0), idx, w0.shape[1]) @ q
    r = jnp.where(wvalid, jnp.take_along_axis(w1, widx, 1), 0.0)
    t = spd_inverse(s)
    return (x_w, w1, r), t, jnp.einsum("rij,rj->ri", t, r)


def _weights(q, parts, t, idx, valid, widx, beta):
    """The row weights for window weights ``beta`` (zero outside the window's kept set).

    Kept form: ``w_W = β``, ``w_K0 = y - Y β``. Pruned form: the window moves by
    ``λ = T (β - w1_W)`` in H-space, so ``w = w1 + Q (e_W λ - e_P0 X λ)`` (one product with Q for
    all rows; X = [Q_P0P0]⁻¹ Q_P0W).
    """
    d = q.shape[0]
    if len(parts) == 2:  # kept form
        y_w, y = parts
        return _scatter(jnp.where(valid, y - jnp.einsum("rnm,rm->rn", y_w, beta), 0.0), idx, d) + _scatter(beta, widx, d)
    x_w, w1, r = parts
    lam = jnp.einsum("rij,rj->ri", t, beta - r)
    move = _scatter(lam, widx, d) - _scatter(jnp.where(valid, jnp.einsum("rnm,rm->rn", x_w, lam), 0.0), idx, d)
    return w1 + move @ q


def _pair_scores(v, t, g, kept, allowed):
    """f after swapping kept b for pruned c, for every (row, b, c); -inf where not a swap."""
    beta = jnp.einsum("rij,rj->ri", v, g)
    f = jnp.sum(g * beta, -1)
    e = jnp.einsum("rij,rjk->rik", v, t)  # E[:, b, c] = (V T_{B, c})_b (zero for b outside B)
    s = jnp.diagonal(t, axis1=1, axis2=2) - jnp.sum(t * e, axis=1)  # s_c = T_cc - T_cB E_Bc
    hc = g - jnp.einsum("rij,rj->ri", t, beta)
    s = jnp.maximum(s, jnp.finfo(t.dtype).tiny)
    r = (hc / s)[:, None, :]
    vbb = jnp.diagonal(v, axis1=1, axis2=2)[:, :, None]
    new = f[:, None, None] + (hc**2 / s)[:, None, :] - (beta[:, :, None] - e * r) ** 2 / (vbb + e**2 / s[:, None, :])
    ok = kept[:, :, None] & ~kept[:, None, :] & allowed
    return jnp.where(ok, new, -jnp.inf), f, e, s


def _masked_inverse(t, kept):
    both = kept[:, :, None] & kept[:, None, :]
    eye = jnp.eye(t.shape[-1], dtype=t.dtype)
    return jnp.where(both, spd_inverse(jnp.where(both, t, eye)), 0.0)


def _search(t, g, kept0, allowed, *, max_swaps: int):
    """Best-improvement swap search on f(B) = g_Bᵀ T_BB⁻¹ g_B for a batch of rows.

    Returns the final kept set of every window and its weights β. Rows are independent (each
    stops when it no longer improves), so any split of the rows gives the same result.
    """
    rows, m = g.shape
    rtol = 16 * jnp.finfo(t.dtype).eps
    v0 = _masked_inverse(t, kept0)
    f0 = jnp.sum(g * jnp.einsum("rij,rj->ri", v0, g), -1)

    def cond(c):
        it, _, _, active = c
        return (it < max_swaps) & jnp.any(active)

    def body(c):
        it, kept, v, active = c
        score, f, e, s = _pair_scores(v, t, g, kept, allowed)
        flat = jnp.argmax(score.reshape(rows, m * m), axis=1)
        best = jnp.take_along_axis(score.reshape(rows, m * m), flat[:, None], 1)[:, 0]
        b, cc = flat // m, flat % m
        go = active & (best > f + rtol * jnp.abs(f))
        # V after adding c (bordered inverse) and removing b (rank-1 downdate): a rank-2 change
        oh_b = jax.nn.one_hot(b, m, dtype=t.dtype)
        oh_c = jax.nn.one_hot(cc, m, dtype=t.dtype)
        ec = jnp.take_along_axis(e, cc[:, None, None], 2)[..., 0]
        sc = jnp.take_along_axis(s, cc[:, None], 1)[:, 0]
        u = ec - oh_c
        v1 = v + u[:, :, None] * u[:, None, :] / sc[:, None, None]
        col = jnp.einsum("rij,rj->ri", v1, oh_b)
        v2 = v1 - col[:, :, None] * col[:, None, :] / jnp.sum(col * oh_b, -1)[:, None, None]
        new_kept = (kept | (oh_c > 0)) & ~(oh_b > 0)
        kept = jnp.where(go[:, None], new_kept, kept)
        v = jnp.where(go[:, None, None], v2, v)
        return it + 1, kept, v, go

    _, kept, _, _ = jax.lax.while_loop(cond, body, (0, kept0, v0, jnp.ones(rows, bool)))
    v = _masked_inverse(t, kept)  # fresh, not the updated one
    beta = jnp.einsum("rij,rj->ri", v, g)
    f = jnp.sum(g * beta, -1)
    worse = f < f0  # rounding only; such a row keeps its start
    kept = jnp.where(worse[:, None], kept0, kept)
    beta = jnp.where(worse[:, None], jnp.einsum("rij,rj->ri", v0, g), beta)
    return kept, beta


def _chunk(h, q, w0, idx, valid, widx, wvalid, kept_w, k0, *, kept_form: bool, group: int, max_swaps: int):
    """One chunk of rows, end to end: eliminate the fixed sets, search the windows, weights.

    Returns the rows' weights (pruned entries exactly 0), keep-masks and swaps made.
    """
    if kept_form:
        parts, t, g = _kept_form(h, w0, idx, valid, widx, wvalid)
    else:
        parts, t, g = _pruned_form(q, w0, idx, valid, widx, wvalid)
    grp = widx // group
    allowed = (grp[:, :, None] == grp[:, None, :]) & wvalid[:, :, None] & wvalid[:, None, :]
    kept, beta = _search(t, g, kept_w, allowed, max_swaps=max_swaps)
    kept = kept & wvalid
    keep = k0.at[jnp.arange(k0.shape[0])[:, None], widx].max(kept)
    w = jnp.where(keep, _weights(q, parts, t, idx, valid, widx, jnp.where(kept, beta, 0.0)), 0.0)
    return w, keep, jnp.sum(kept & ~kept_w, axis=1)


@functools.lru_cache(maxsize=None)
def _chunk_program(mesh: Optional[Mesh], kept_form: bool, group: int, max_swaps: int):
    """The compiled chunk program (one per mesh, form, N:M group size and ``max_swaps``)."""
    return rows_sharded(partial(_chunk, kept_form=kept_form, group=group, max_swaps=max_swaps), mesh, 2, 7)


def _chunks(rows: np.ndarray) -> list[np.ndarray]:
    """``rows`` split into equal chunks of at most ``_CHUNK`` (padded later to ``_ROWS``)."""
    if len(rows) == 0:
        return []
    k = -(-len(rows) // _CHUNK)
    return np.array_split(rows, k)


def cbs_layer(
    w0: jax.Array,
    h: jax.Array,
    u: jax.Array,
    keep: jax.Array,
    *,
    window: int,
    max_swaps: int,
    nm: Optional[tuple[int, int]],
    mesh: Optional[Mesh] = None,
) -> tuple[jax.Array, jax.Array, int]:
    """Swap search from ``keep`` on every row of ``w0`` (rows, d), then exact weights.

    ``h`` is the damped Hessian, ``u`` the upper Cholesky factor of its inverse (``h⁻¹ = uᵀu``).
    Returns ``(w, keep, stats)``: the new weights (pruned entries exactly 0), the new keep-mask
    (same count per row, and per N:M group, as ``keep``) and the number of swaps (inputs that
    went from kept to pruned) over all rows. With ``mesh``, each chunk's rows are split over
    the mesh's first axis (every row's work is its own: the result is the same).
    """
    rows, d = w0.shape
    if nm is not None:
        window = max(nm[1], (min(window, d) // nm[1]) * nm[1])
    window = min(window, d)
    q = u.T @ u  # h⁻¹
    widx, wvalid = window_indices(w0, jnp.diagonal(q), keep, window=window, nm=nm)
    kept_w = jnp.take_along_axis(keep, widx, 1) & wvalid
    in_w = np.asarray(jnp.zeros((rows, d), bool).at[jnp.arange(rows)[:, None], widx].max(wvalid))
    k0 = np.asarray(keep) & ~in_w
    p0 = ~np.asarray(keep) & ~in_w
    kept_form = k0.sum(1) <= p0.sum(1)  # each row eliminates the smaller of its two fixed sets
    fixed = np.where(kept_form[:, None], k0, p0)
    sizes = fixed.sum(1)
    order = np.lexsort((sizes, ~kept_form))  # kept-form rows first, then by size
    step = _ROWS if mesh is None else math.lcm(_ROWS, mesh.shape[mesh.axis_names[0]])
    out_w, out_k = [], []
    swaps = jnp.zeros((), jnp.int32)
    n_kept = int(kept_form.sum())
    for sel in (c for b, e in ((0, n_kept), (n_kept, rows)) for c in _chunks(order[b:e])):
        form = bool(kept_form[sel[0]])
        n = min(d, max(_PAD, -(-int(sizes[sel].max()) // _PAD) * _PAD))
        size = -(-len(sel) // step) * step  # padded to a multiple of `step` rows: few compiled shapes
        sel_p = np.concatenate([sel, np.repeat(sel[:1], size - len(sel))])
        idx = jnp.asarray(np.argsort(~fixed[sel_p], axis=1, kind="stable")[:, :n].astype(np.int32))
        valid = jnp.asarray(np.arange(n)[None, :] < sizes[sel_p][:, None])
        program = _chunk_program(mesh, form, nm[1] if nm else d, max_swaps)
        w, kp, made = program(h, q, w0[sel_p], idx, valid, widx[sel_p], wvalid[sel_p], kept_w[sel_p],
                              jnp.asarray(k0[sel_p]))
        nreal = len(sel)
        out_w.append(w[:nreal])
        out_k.append(kp[:nreal])
        swaps = swaps + jnp.sum(made[:nreal])  # summed on device: no host sync per chunk
    inv = np.argsort(order)
    return jnp.concatenate(out_w)[inv], jnp.concatenate(out_k)[inv], int(swaps)


@dataclasses.dataclass(frozen=True)
class CBS(LayerPruner):
    """The Combinatorial Brain Surgeon on the layer objective: from ``start``'s mask, a joint swap
    search per output unit on the loss after the optimal update, then the exact weights.

    With the exact weights for the start mask as the reference, the result is never worse: a row
    whose search ends below its start keeps the start.

    Args:
      start: the pruner whose mask the search starts from (:class:`~cobs_jax.layer.SparseGPT`,
        :class:`~cobs_jax.layer.Wanda`, :class:`~cobs_jax.layer.Magnitude`, or its name); its
        granularity decides where the count is exact.
      window: inputs per output unit whose keep/prune decision is reopened (its least salient
        kept and most salient pruned inputs; N:M: whole groups), at least 2.
      max_swaps: at most this many swaps per output unit.

    ``stats["swaps"]``: kept/pruned swaps made over the layer.
    """

    start: Any = None
    window: int = 64
    max_swaps: int = 64
    uses_factors: ClassVar[bool] = True

    def __post_init__(self):
        from .registry import as_pruner  # the registry imports this module

        start = as_pruner(SparseGPT() if self.start is None else self.start, "CBS(start=...)")
        if isinstance(start, CBS):
            raise ValueError("`CBS(start=...)` must be a mask-choosing pruner (SparseGPT, Wanda, Magnitude), not CBS")
        object.__setattr__(self, "start", start)
        positive_int(self.window, "CBS(window=...)", minimum=2)
        positive_int(self.max_swaps, "CBS(max_swaps=...)")

    def check(self, d_in: int, nm: Optional[tuple[int, int]], name: str) -> None:
        self.start.check(d_in, nm, name)

    def prune(self, problem: LayerProblem) -> LayerSelection:
        assert problem.factors is not None  # uses_factors
        first = self.start.prune(problem)
        w, keep, swaps = cbs_layer(problem.w, problem.factors.h, problem.factors.u, first.keep, window=self.window,
                                   max_swaps=self.max_swaps, nm=problem.nm, mesh=problem.mesh)
        return LayerSelection(w, keep, {**first.stats, "swaps": swaps})
