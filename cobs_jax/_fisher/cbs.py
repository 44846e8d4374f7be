"""CBS-S: randomised magnitude pruning (Algorithm 2) and the local swap search (Algorithm 1).

Selection minimises the paper's objective ``f(P) = w_P^T F_PP w_P`` (undamped, not halved, as in
the official code) over sets P of k pruned weights. With ``u_b = G_b (w * 1_P)_b`` per Fisher block
and ``c = G^T u / N`` (blockwise) the quantities of Algorithm 1 are (cbs.md section 2.5)

    alpha_i = 2 w_i c_i - w_i^2 F_ii    (i in P: objective drop if i leaves P)
    beta_j  = 2 w_j c_j + w_j^2 F_jj    (j not in P: objective rise if j joins P)
    gamma_ij = 2 w_i w_j (g_i . g_j) / N   (0 across blocks)
    f(P) = sum_b ||u_b||^2 / N.

Within a pass ``v_b = G_J w_J - G_I w_I`` (per block) gives the corrected alpha/beta of a candidate
pair in O(N), so a pass of s swaps costs O(N (s + rho * #tested)), not the code's O(rho N s^2). The
pass is sequential (first improvement, J exclusion, failure counter) and runs in a
``lax.while_loop`` on device; no host round-trip per candidate or per pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve
from jax.typing import ArrayLike

from .._core.topk import rank_in_group, smallest_k
from .fisher import Fisher
from .iht import update_aware_objective
from .problem import Problem
from .update import cbs_update

__all__ = ["CBS", "alpha_beta", "rmp_mask"]

_PREFIX = 1024  # entries of the candidate orders a pass takes from ``lax.top_k`` before it sorts all D


def alpha_beta(fisher, w: jax.Array, pruned: jax.Array, diag: Optional[jax.Array] = None):
    """alpha (meaningful on P), beta (on the complement) and ``u = G_P w_P`` per block.

    Paper App. B, eqs. (13)-(14) for symmetric F = G^T G / N (block-diagonal), in O(N D).
    ``diag``: ``fisher.diag()`` when the caller already has it (it does not change between the
    passes of a search, and costs as much as the rest of this function on CPU).
    """
    u = fisher.project(jnp.where(pruned, w, 0.0))  # (num_blocks, N)
    c = fisher.back_project(u) / fisher.num_rows
    d = fisher.diag() if diag is None else diag
    return 2 * w * c - w * w * d, 2 * w * c + w * w * d, u


def _smallest_first(key: jax.Array, size: int) -> jax.Array:
    """Indices of the ``size`` smallest keys in ascending order, ties by index (as a stable argsort).

    ``lax.top_k`` on floats (XLA's CPU top_k has a fast path for floats, not for integers); -0.0 is
    made +0.0 first, since top_k orders the two zeros and argsort does not.
    """
    return jax.lax.top_k(-jnp.where(key == 0, jnp.zeros_like(key), key), size)[1]


def _report_pass(s, swaps, loss, best, done) -> None:
    print(f"[cobs_jax] CBS local search pass {int(s)}: {int(swaps)} swaps, loss {float(loss):.6g}, "
          f"best {float(best):.6g}" + (" (stop)" if bool(done) else ""), flush=True)


def _num_buckets(d: int, num_buckets: Optional[int]) -> int:
    return int(num_buckets) if num_buckets else max(1, min(math.isqrt(d), 1000))


def _sort_pairs(hi: jax.Array, hi_bits: int, lo: jax.Array, lo_bits: int, wide: bool) -> jax.Array:
    """``lo`` sorted by ``(hi, lo)`` for non-negative ints below ``2**hi_bits`` / ``2**lo_bits``.

    Packs both into one unsigned key and sorts it alone (a single-operand sort is ~5x faster than
    ``argsort``/``lexsort`` on CPU): uint32 when it fits, uint64 when ``wide`` (x64 on), else a
    ``lexsort`` fallback.
    """
    for utype, width in ((jnp.uint32, 32), (jnp.uint64, 64)):
        if hi_bits + lo_bits <= width and (width == 32 or wide):
            packed = (hi.astype(utype) << lo_bits) | lo.astype(utype)
            return (jnp.sort(packed) & ((1 << lo_bits) - 1)).astype(lo.dtype)
    return lo[jnp.lexsort((lo, hi))]


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _random_order(key: jax.Array, d: int, wide: bool) -> jax.Array:
    """A uniformly random permutation of ``arange(d)`` from one sort of random keys.

    The keys have at least 16 random bits (32 - log2 d with uint32, more with uint64); the rare
    equal keys are ordered by index.
    """
    ib = _bits(d)
    iota = jnp.arange(d, dtype=jnp.int32)
    if 32 - ib >= 16 or not wide:
        r = jax.random.bits(key, (d,), jnp.uint32)
        if 32 - ib >= 16:
            return _sort_pairs(r >> ib, 32 - ib, iota, ib, wide)
        return jnp.argsort(r, stable=True).astype(jnp.int32)
    return _sort_pairs(jax.random.bits(key, (d,), jnp.uint64) >> ib, 64 - ib, iota, ib, wide)


def _rmp_sampler(absw: jax.Array, num_buckets: int, groups=None):
    """RMP trials for fixed weights: ``trial(key, k) -> pruned`` and ``layout(key)``.

    The weights are ranked by descending ``|w|`` once (``order``). A trial draws a random
    permutation of the D positions, cuts it into ``num_buckets`` near-equal buckets (static
    segments) and sorts every segment by magnitude rank (one packed sort), which gives each weight
    its bucket and its rank r in it; its quantile ``(r + 1/2) / bucket_size`` is then static per
    segment position, and so is the set of the k largest quantiles (ties by bucket): without
    ``groups`` a trial costs two sorts of D integers and no float sort.
    """
    d = absw.shape[0]
    wide = bool(jax.config.read("jax_enable_x64"))
    order = jnp.argsort(-absw, stable=True).astype(jnp.int32)  # ties by index
    label = (np.arange(d, dtype=np.int64) * num_buckets // d).astype(np.int32)  # bucket of segment position
    sizes = np.bincount(label, minlength=num_buckets)
    starts = np.cumsum(sizes) - sizes
    quantile = (np.arange(d) - starts[label] + 0.5) / sizes[label]
    qrank = np.empty(d, np.int32)
    qrank[np.lexsort((np.arange(d), -quantile))] = np.arange(d, dtype=np.int32)
    label_j, quantile_j, qrank_j = jnp.asarray(label), jnp.asarray(-quantile, absw.dtype), jnp.asarray(qrank)

    def layout(key):  # the weight at each segment position
        q_of_p = _random_order(key, d, wide)
        return order[_sort_pairs(label_j, _bits(num_buckets), q_of_p, _bits(d), wide)]

    def trial(key, k):
        at = layout(key)
        if groups is None:
            flag = qrank_j < k
        else:
            flag = smallest_k(quantile_j, k, groups[at])
        return jnp.zeros(d, bool).at[at].set(flag)

    return trial, layout


def rmp_mask(absw: jax.Array, k, key: jax.Array, num_buckets: int, groups=None) -> jax.Array:
    """One randomised-magnitude trial: pruned mask with exactly k entries.

    The weights are randomly permuted and cut into ``num_buckets`` near-equal buckets; inside each
    bucket the same fraction is pruned by magnitude. Exactly k overall: every weight gets its
    quantile ``(rank_in_bucket + 1/2) / bucket_size`` by descending ``|w|`` and the k of largest
    quantile are pruned (equal quantiles: the lower bucket first), which prunes ``k/D`` of every
    bucket up to rounding. With ``groups`` (see :func:`smallest_k`) the ``k[g]`` weights of
    largest quantile in each group are pruned.
    """
    return _rmp_sampler(absw, num_buckets, groups)[0](key, k)


@dataclasses.dataclass(frozen=True)
class CBS:
    """The Combinatorial Brain Surgeon selector (CBS-S): RMP start + local swap search.

    Args:
      num_trials: S, RMP trials (trial 0 is global magnitude). ``1`` gives magnitude + LS.
      num_buckets: B, RMP buckets; default ``max(1, min(floor(sqrt(D)), 1000))`` as in the code.
      epsilon: minimum objective decrease for a swap (on the un-halved scale).
      rho: half-width of the candidate window in the sorted complement.
      tau: failed candidates i per pass before the pass ends.
      max_steps: maximum local-search passes (the paper's steps_max).
      noimp_max: stop after this many passes without a lower true loss.
      local_search: run Algorithm 1 after RMP (False gives RMP alone).
      objective: ``"selection"`` (the paper's f(P) = w_P^T F_PP w_P, the loss if the pruned
        weights are just zeroed) or ``"update_aware"``: swaps must lower the loss of the quadratic
        model *after* the optimal CBS-U update, ``w_P^T ([F_lambda^-1]_PP)^-1 w_P``, evaluated with
        rank-2 N x N updates (:meth:`ua_pass`; O(N^2) per candidate instead of O(N), plus one
        N x N inverse per block and pass), and the true-loss checks of the passes score the
        updated weights (one CBS-U solve per pass). Use it with ``update="cbs"``.
      progress: print one line per local-search pass (swaps, its true loss, the best so far)
        from inside the compiled loop (``jax.debug.callback``). ``prune(..., progress=True)``
        turns it on.
      first_pair_stop: end the search when the best-ranked pair (pi_1, theta_1) fails to improve
        by epsilon (Algorithm 1, line 8). The paper does this; it often stops the search while
        improving swaps exist further down the window, so it is off by default: a pass then ends
        only after ``tau`` failures, and the search when a pass makes no swap. On enumerable
        random problems this raises the share of exact optima found from 40 % to 60 %
        (``tests/test_cbs.py::test_cbs_vs_brute_force_on_enumerable_problems``).

    The paper's defaults (section 7.1): epsilon 1e-4, rho 10, tau 20, steps_max 50, noimp_max 5,
    S = 50. The window follows the paper (2 rho + 1 candidates); cbs.md 2.4 lists the code's
    off-by-one differences.
    """

    num_trials: int = 50
    num_buckets: Optional[int] = None
    epsilon: float = 1e-4
    rho: int = 10
    tau: int = 20
    max_steps: int = 50
    noimp_max: int = 5
    local_search: bool = True
    first_pair_stop: bool = False
    objective: str = "selection"
    progress: bool = False

    def __post_init__(self):
        for name, lo in (("num_trials", 1), ("rho", 1), ("tau", 1), ("max_steps", 0), ("noimp_max", 0)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"CBS `{name}` must be an int >= {lo}, got {v!r}")
        if not self.epsilon >= 0:
            raise ValueError(f"CBS `epsilon` must be >= 0, got {self.epsilon!r}")
        if self.objective not in ("selection", "update_aware"):
            raise ValueError(f"CBS `objective` must be 'selection' or 'update_aware', got {self.objective!r}")
        if self.num_buckets is not None and int(self.num_buckets) < 1:
            raise ValueError(f"CBS `num_buckets` must be >= 1, got {self.num_buckets!r}")

    # ---- Algorithm 2 ----------------------------------------------------------------------------
    def rmp(self, problem: Problem, k, key):
        """Best of ``num_trials`` RMP masks by true loss (no update). Returns (pruned, losses)."""
        w = problem.w
        absw = jnp.abs(w)
        random_trial = _rmp_sampler(absw, _num_buckets(w.shape[0], self.num_buckets), problem.groups)[0]

        def trial(t):
            pruned = jax.lax.cond(
                t == 0,
                lambda: smallest_k(absw, k, problem.groups),
                lambda: random_trial(jax.random.fold_in(key, t), k),
            )
            return pruned, problem.loss(jnp.where(pruned, 0.0, w))

        if self.num_trials == 1:
            pruned, loss = trial(0)
            return pruned, loss[None]
        losses = jax.lax.map(lambda t: trial(t)[1], jnp.arange(self.num_trials))
        best = jnp.argmin(losses)  # first minimum: trial 0 wins ties
        return trial(best)[0], losses

    # ---- Algorithm 1, one pass ------------------------------------------------------------------
    def ls_pass(
        self, fisher: Fisher, w: jax.Array, pruned: jax.Array, k: ArrayLike, groups: Optional[jax.Array] = None,
        diag: Optional[jax.Array] = None,
    ) -> tuple:
        """One pass of Algorithm 1 from ``pruned`` on the selection objective f(P).

        Args:
          fisher: the Fisher (its blocks give the block structure of F; damping is not used).
          w: (D,) weights.
          pruned: (D,) bool current P with k entries.
          k: the number pruned, or with ``groups`` the (G,) count per group.
          groups: optional (D,) group ids (see :func:`smallest_k`). Swaps then stay inside a group,
            so every group keeps its count: the window of pruned weight i is taken around its rank
            in the sorted complement of its own group. Groups with nothing kept (e.g. weights
            frozen by an earlier mask) take no part.
          diag: optional ``fisher.diag()``, computed once by a caller that runs many passes.
        Returns:
          (new_pruned, num_swaps, total_delta, stop) where stop says the first pair did not
          improve by epsilon (Algorithm 1 line c) or no swap was accepted.
        """
        n, g = fisher.num_rows, fisher.grads  # g: this shard's rows of G when sharded
        blk = jnp.asarray(fisher.block_ids())

        def delta(v, i, js, alpha, beta):  # corrected alpha_i, beta_j and gamma_ij, O(N) each
            gi, gj = g[:, i], g[:, js].T
            dots = fisher.sum_rows((gi @ v[blk[i]], jnp.sum(gj * v[blk[js]], axis=1), gj @ gi))
            a_new = alpha[i] + 2 * w[i] * dots[0] / n
            b_new = beta[js] + 2 * w[js] * dots[1] / n
            gam = 2 * w[i] * w[js] * dots[2] / n * (blk[js] == blk[i])
            return b_new - gam - a_new

        def accept(v, i, j, hit):  # v_b = G_J w_J - G_I w_I per block
            v = v.at[blk[i]].add(jnp.where(hit, -w[i], 0.0) * g[:, i])
            return v.at[blk[j]].add(jnp.where(hit, w[j], 0.0) * g[:, j])

        v0 = jnp.zeros((len(fisher.blocks), g.shape[0]), w.dtype)  # this shard's rows
        return self._pass(fisher, w, pruned, k, groups, delta, accept, v0, self.epsilon, diag)

    def ua_pass(
        self, fisher: Fisher, w: jax.Array, pruned: jax.Array, k: ArrayLike, groups: Optional[jax.Array] = None,
        diag: Optional[jax.Array] = None,
    ) -> tuple:
        """One pass of Algorithm 1 on the update-aware objective (``objective="update_aware"``).

        Candidates are ordered as in :meth:`ls_pass`; a swap (i out of P, j into P) is accepted when
        it lowers ``H(P) = w_P^T ([F_lambda^-1]_PP)^-1 w_P = lambda (||w_P||^2 + sum_b u_b^T M_b^-1 u_b)``
        (twice the model loss after the optimal update; ``u_b = G_b w_P``, ``M_b = N lambda I +
        G_{R,b} G_{R,b}^T``) by ``epsilon * lambda`` (H carries the factor lambda; on MLPNet the
        plain epsilon would reject every swap). The swap changes M_b by ``g_i g_i^T - g_j g_j^T``:
        its effect is evaluated with a rank-2 Woodbury identity on an explicit N x N ``M_b^-1`` per
        block, in O(N^2) per candidate, and ``M_b^-1`` is updated in O(N^2) when a swap is
        accepted. The pass starts with one N x N inverse per block (O(N^2 D_b + N^3)). Same
        arguments and returns as :meth:`ls_pass`.
        """
        n, lam, g = fisher.num_rows, fisher.damping, fisher.grads
        blk = jnp.asarray(fisher.block_ids())
        u0 = fisher.gather_rows(fisher.project(jnp.where(pruned, w, 0.0)))
        eye = jnp.eye(n, dtype=w.dtype)
        minv0 = fisher.map_blocks(
            lambda g, pb: cho_solve(fisher.gram_cholesky(g, ~pb), eye), pruned, out="blocks"
        )
        col = fisher.gather_rows  # whole columns of G: minv, u and z are replicated N-vectors

        def apply_minv(minv, b, x):  # rows M_b^-1 x for block ids b and rows x, without gathering M
            if minv.shape[0] == 1:
                return x @ minv[0]
            return jax.lax.map(lambda t: minv[t[0]] @ t[1], (b, x))

        def pieces(aux, i, js):
            minv, u, z = aux
            bi, bj = blk[i], blk[js]
            gi, gj = col(g[:, i]), col(g[:, js].T)
            yi = minv[bi] @ gi
            yj = apply_minv(minv, bj, gj)
            same = (bj == bi).astype(w.dtype)
            ci, cj = -w[i], w[js] * same
            # block of i: columns g_i (joins R, sign +1) and, if j is in the same block, g_j (sign -1)
            up = (u[bi] + ci * gi)[None, :] + cj[:, None] * gj
            mup = (z[bi] + ci * yi)[None, :] + cj[:, None] * yj
            s11 = 1.0 + gi @ yi
            s12 = (gj @ yi) * same
            s22 = jnp.where(same > 0, -1.0 + jnp.sum(gj * yj, axis=1), -1.0)
            b1, b2 = up @ yi, jnp.sum(up * yj, axis=1) * same
            det = s11 * s22 - s12 * s12
            quad_i = jnp.sum(up * mup, axis=1) - (s22 * b1 * b1 - 2 * s12 * b1 * b2 + s11 * b2 * b2) / det
            d_i = quad_i - u[bi] @ z[bi]
            # block of j when it differs: column g_j (leaves R, sign -1)
            upj = u[bj] + w[js][:, None] * gj
            mupj = z[bj] + w[js][:, None] * yj
            sj = -1.0 + jnp.sum(gj * yj, axis=1)
            quad_j = jnp.sum(upj * mupj, axis=1) - jnp.sum(yj * upj, axis=1) ** 2 / sj
            d_j = (quad_j - jnp.sum(u[bj] * z[bj], axis=1)) * (1.0 - same)
            return lam * (w[js] ** 2 - w[i] ** 2 + d_i + d_j), (yi, yj, s11, s12, s22, sj, same)

        def delta(aux, i, js, alpha, beta):
            return pieces(aux, i, js)[0]

        def accept(aux, i, j, hit):
            minv, u, z = aux
            bi, bj = blk[i], blk[j]
            _, (yi, yj, s11, s12, s22, sj, same) = pieces(aux, i, j[None])
            yj, s12, s22, sj, same = yj[0], s12[0], s22[0], sj[0], same[0]
            det = s11 * s22 - s12 * s12
            y2 = yj * same
            # Woodbury: M^-1 - Y S^-1 Y^T with Y = [y_i, y_j] in the block of i ...
            upd_i = (s22 * jnp.outer(yi, yi) - s12 * (jnp.outer(yi, y2) + jnp.outer(y2, yi))
                     + s11 * jnp.outer(y2, y2)) / det
            minv = minv.at[bi].add(jnp.where(hit, -upd_i, 0.0))
            # ... and M^-1 - y_j y_j^T / s_j in the block of j when it differs
            minv = minv.at[bj].add(jnp.where(hit & (same == 0), -jnp.outer(yj, yj) / sj, 0.0))
            u = u.at[bi].add(jnp.where(hit, -w[i], 0.0) * col(g[:, i]))
            u = u.at[bj].add(jnp.where(hit, w[j], 0.0) * col(g[:, j]))
            z = z.at[bi].set(minv[bi] @ u[bi]).at[bj].set(minv[bj] @ u[bj])
            return minv, u, z

        z0 = jnp.einsum("bnm,bm->bn", minv0, u0)
        aux0 = (minv0, u0, z0)
        return self._pass(fisher, w, pruned, k, groups, delta, accept, aux0, self.epsilon * lam, diag)

    def _pass(self, fisher, w, pruned, k, groups, delta, accept, aux0, threshold, diag):
        """The pass of Algorithm 1 shared by both objectives.

        ``delta(aux, i, js, alpha, beta)`` gives the objective change of swapping i with each
        candidate j; ``accept(aux, i, j, hit)`` updates the running state ``aux`` after a swap; a
        swap must lower the objective by ``threshold``.

        The candidates are the pruned weights by descending alpha and, for each, a window of the
        kept ones of its group by ascending ``beta - gamma_1``. A pass rarely gets far down these
        orders, and a full sort of D keys costs more than the rest of a pass on CPU, so when all
        kept weights are in one group (a global budget, also with frozen weights) the pass first
        runs on the first ``_PREFIX`` entries of both orders (``lax.top_k``, ties by index as in
        the stable sort) and sorts everything only if it gets past them. Either way it visits the
        same candidates in the same order.
        """
        dim, n = w.shape[0], fisher.num_rows
        blk = jnp.asarray(fisher.block_ids())
        k = jnp.reshape(jnp.asarray(k, jnp.int32), (-1,))
        if groups is None:  # one group; no (D,) group arrays (XLA would constant-fold them slowly)
            sizes = jnp.full((1,), dim, jnp.int32)
            group_of = lambda i: jnp.zeros_like(i)  # noqa: E731
        else:
            sizes = jnp.bincount(groups, length=k.shape[0]).astype(jnp.int32)
            group_of = lambda i: groups[i]  # noqa: E731
        gstart = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
        n_rem = sizes - k  # kept weights per group
        movable = pruned & ((n_rem[0] if groups is None else n_rem[groups]) > 0)
        num_movable = jnp.sum(movable)
        alpha, beta, _ = alpha_beta(fisher, w, pruned, diag)
        pi_key = jnp.where(movable, -alpha, jnp.inf)  # P by alpha desc
        i1 = jnp.argmin(pi_key)
        g = fisher.grads
        gam1 = 2 * w[i1] * w * fisher.sum_rows(g[:, i1] @ g) / n * (blk == blk[i1])
        # per group: the kept weights by ascending beta - gamma_1, then the pruned ones
        theta_key = jnp.where(pruned, jnp.inf, beta - gam1)

        def full_orders():  # (pi, rank of each pruned weight in its group, theta)
            pi = jnp.argsort(pi_key, stable=True)
            rank = rank_in_group(jnp.where(pruned, -alpha, jnp.inf), groups, k.shape[0])
            theta = jnp.argsort(theta_key, stable=True) if groups is None else jnp.lexsort((theta_key, groups))
            return pi, rank, theta

        def full_window(orders, ii):
            pi, rank, theta = orders
            i = pi[ii]
            pos = rank[i] + offs
            return i, pos, theta[jnp.clip(gstart[group_of(i)] + pos, 0, dim - 1)]

        def prefix_window(orders, ii):  # one group holds every kept weight: the rank of pi[ii] is ii
            pi, theta = orders
            pos = ii + offs
            return pi[ii], pos, theta[jnp.clip(pos, 0, theta.shape[0] - 1)]

        offs = jnp.arange(-self.rho, self.rho + 1)
        stop0 = num_movable == 0
        orders = full_orders() if self.first_pair_stop else None
        if orders is not None:
            j1 = orders[2][gstart[group_of(i1)]]
            first = delta(aux0, i1, j1[None], alpha, beta)[0]
            stop0 = stop0 | (first > -threshold)

        def cond(s):
            ii, fails = s[0], s[1]
            return (ii < num_movable) & (fails < self.tau) & ~stop0

        def body(window, orders):
            def step(s):
                ii, fails, aux, in_i, in_j, swaps, total = s
                i, pos, js = window(orders, ii)
                valid = (pos >= 0) & (pos < n_rem[group_of(i)]) & ~in_j[js]
                d = delta(aux, i, js, alpha, beta)
                ok = valid & (d <= -threshold)
                hit = jnp.any(ok)
                f = jnp.argmax(ok)
                j = js[f]
                aux = accept(aux, i, j, hit)
                in_i = in_i.at[i].set(in_i[i] | hit)
                in_j = in_j.at[j].set(in_j[j] | hit)
                return (
                    ii + 1,
                    fails + jnp.where(hit, 0, 1),
                    aux,
                    in_i,
                    in_j,
                    swaps + hit.astype(jnp.int32),
                    total + jnp.where(hit, d[f], 0.0),
                )

            return step

        state = (jnp.int32(0), jnp.int32(0), aux0, jnp.zeros(dim, bool), jnp.zeros(dim, bool), jnp.int32(0),
                 jnp.zeros((), w.dtype))
        size = min(_PREFIX, dim)
        if orders is not None or size == dim:
            state = jax.lax.while_loop(cond, body(full_window, full_orders() if orders is None else orders), state)
        else:
            one_group = jnp.sum(n_rem > 0) <= 1
            prefix = tuple(_smallest_first(key, size) for key in (pi_key, theta_key))
            state = jax.lax.while_loop(lambda s: cond(s) & one_group & (s[0] + self.rho < size),
                                       body(prefix_window, prefix), state)
            state = jax.lax.cond(cond(state), lambda s: jax.lax.while_loop(cond, body(full_window, full_orders()), s),
                                 lambda s: s, state)
        _, _, _, in_i, in_j, swaps, total = state
        new = (pruned | in_j) & ~in_i
        return new, swaps, total, stop0 | (swaps == 0)

    # ---- Algorithm 1, outer loop ----------------------------------------------------------------
    def run_local_search(self, problem: Problem, pruned0, k):
        """Passes of Algorithm 1, returning the lowest-true-loss set seen (the start included)."""
        fisher, w = problem.fisher, problem.w
        if fisher is None:
            raise ValueError("CBS's local search needs the Fisher (per-example gradients)")
        steps = self.max_steps
        aware = self.objective == "update_aware"
        one_pass = self.ua_pass if aware else self.ls_pass

        def objective(pruned):
            if aware:
                return 2 * update_aware_objective(fisher, w, pruned)
            return fisher.quadratic(jnp.where(pruned, w, 0.0))

        def loss(pruned):  # of the weights this selection would be deployed with
            return problem.loss(cbs_update(w, pruned, fisher) if aware else jnp.where(pruned, 0.0, w))

        diag = fisher.diag()  # the same for every pass
        loss0 = loss(pruned0)
        hist0 = (
            jnp.full(steps + 1, jnp.nan, w.dtype).at[0].set(objective(pruned0)),
            jnp.full(steps + 1, jnp.nan, w.dtype).at[0].set(loss0),
            jnp.zeros(steps + 1, jnp.int32),
        )
        # state: s, pruned, its objective, best, best_loss, s_improve, done, history
        init = (jnp.int32(0), pruned0, hist0[0][0], pruned0, loss0, jnp.int32(0), jnp.bool_(steps == 0), hist0)

        def cond(st):
            return ~st[6] & (st[0] < steps)

        def body(st):
            s, pruned, obj, best, best_loss, s_imp, _, (h_obj, h_loss, h_sw) = st
            s = s + 1
            new, swaps, total, stop = one_pass(fisher, w, pruned, k, problem.groups, diag)
            obj = obj + total  # the swaps' changes are exact: no objective evaluation per pass
            new_loss = jax.lax.cond(stop, lambda: jnp.asarray(jnp.inf, w.dtype), lambda: loss(new))
            better = ~stop & (new_loss < best_loss)
            h_obj = h_obj.at[s].set(jnp.where(stop, jnp.nan, obj))
            h_loss = h_loss.at[s].set(jnp.where(stop, jnp.nan, new_loss))
            h_sw = h_sw.at[s].set(swaps)
            s_imp = jnp.where(better, s, s_imp)
            done = stop | (~better & (s - s_imp > self.noimp_max))
            if self.progress:  # printed from the device loop, no host round-trip in between
                jax.debug.callback(_report_pass, s, swaps, new_loss, best_loss, done)
            return (
                s,
                jnp.where(stop, pruned, new),
                obj,
                jnp.where(better, new, best),
                jnp.where(better, new_loss, best_loss),
                s_imp,
                done,
                (h_obj, h_loss, h_sw),
            )

        s, _, _, best, best_loss, s_imp, _, hist = jax.lax.while_loop(cond, body, init)
        return best, {
            "ls_objective": hist[0],
            "ls_loss": hist[1],
            "ls_swaps": hist[2],
            "ls_passes": s,
            "ls_best_pass": s_imp,
            "ls_best_loss": best_loss,
        }

    def select(self, problem: Problem, k, key):
        if problem.loss is None:
            raise ValueError("CBS needs a loss to score masks: pass `loss_fn` and a batch")
        pruned, losses = self.rmp(problem, k, key)
        stats = {"rmp_losses": losses, "rmp_best_trial": jnp.argmin(losses)}
        if self.local_search:
            pruned, ls_stats = self.run_local_search(problem, pruned, k)
            stats.update(ls_stats)
        return pruned, stats
