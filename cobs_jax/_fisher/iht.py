"""IHT selector: joint selection and update on the low-rank Fisher (in the spirit of CHITA).

Minimises ``q(w) = 1/2 (w - w_bar)^T F_lambda (w - w_bar) [+ g_bar^T (w - w_bar)]`` subject to
exactly k pruned (zero) prunable weights, by iterative hard thresholding

    w <- H_k(w - eta * grad q(w)),   grad q(w) = F_lambda (w - w_bar) [+ g_bar],

where H_k zeroes the k entries of smallest magnitude (per group under a per-layer or N:M budget).
Every product goes through G (O(N D) per iteration, never D x D). As in CHITA: a step search
(plain steps m/L with L = 1.05 (sigma_max(F) + lambda) from a power iteration on G, and
diagonal-Newton steps m / (F_jj + lambda), each thresholded by |z| and by |z| sqrt(F_jj + lambda)),
the exact re-solve of the kept weights on the support (the CBS-U "backsolve") when the support
stops changing, and from an exact point proposals scored re-solved. An iterate is accepted only if
it lowers q, so q never increases. The warm start is the exact CBS-U solution on the magnitude or
WoodFisher support. CHITA's active set (iterating on a subset of ~1.5x the kept weights) is not
used: the products through G cost O(N D) whatever the set, with static shapes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._core.topk import smallest_k
from .fisher import Fisher
from .problem import Problem
from .update import cbs_update

__all__ = ["IHT", "update_aware_objective", "fisher_max_eigenvalue"]


def update_aware_objective(fisher: Fisher, w: jax.Array, pruned: jax.Array) -> jax.Array:
    """Loss of the quadratic model after the optimal (CBS-U) update for the pruned set P.

    ``1/2 w_P^T ([F_lambda^{-1}]_PP)^{-1} w_P``, computed per block without any D x D matrix as
    ``lambda/2 (||w_P||^2 + u^T (N lambda I + G_R G_R^T)^{-1} u)`` with ``u = G_P w_P``: one N x N
    Cholesky per block (O(N^2 D_b + N^3)).
    """
    def one(g, wb, pb):
        wp = jnp.where(pb, wb, 0.0)
        u = g @ wp
        z = fisher.gram_solve(fisher.gram_cholesky(g, ~pb), u)
        return jnp.sum(wp**2) + fisher.sum_rows(u @ z)

    return 0.5 * fisher.damping * jnp.sum(fisher.map_blocks(one, w, pruned, out="blocks"))


def fisher_max_eigenvalue(fisher: Fisher, iters: int = 30) -> jax.Array:
    """Largest eigenvalue of the undamped block-diagonal F by power iteration (O(N D) per step)."""
    v = jnp.ones(fisher.dim, fisher.grads.dtype) / jnp.sqrt(fisher.dim)

    def body(_, v):
        fv = fisher.matvec(v, damped=False)
        return fv / (jnp.linalg.norm(fv) + 1e-30)

    v = jax.lax.fori_loop(0, iters, body, v)
    return v @ fisher.matvec(v, damped=False)


@dataclasses.dataclass(frozen=True)
class IHT:
    """Iterative hard thresholding on the damped quadratic model (``method="iht"``).

    Args:
      max_iter: iteration cap.
      tol: stop when the relative decrease of q in an iteration falls below ``tol``.
      init: ``"woodfisher"`` or ``"magnitude"`` support for the warm start.
      line_search: step search: the plain steps 1/L, 2/L, 4/L, 8/L and the diagonal-Newton steps
        m / (F_jj + lambda), m in {2, 1, 1/2, 1/4}, each thresholded two ways (16 candidates, one
        O(N D) product each); without it the steps 1/L and 1 / (F_jj + lambda).
      first_order: include the gradient term ``g_bar^T (w - w_bar)``, ``g_bar = mean(G, 0)``.
      resolve_candidates: from an exact point, how many of the best new supports (by the
        thresholded objective) are re-solved and compared exactly (one CBS-U solve each; at most
        the number of candidates).

    The iterate is exact (the CBS-U minimiser on its support) at the start, whenever the support
    stops changing or no step lowers q, and after every move from an exact point; the search stops
    when no step improves on an exact point. The selection returned is the final support; use
    ``update="cbs"`` for the exact re-solve of the kept weights on it.
    """

    max_iter: int = 100
    tol: float = 1e-6
    init: str = "woodfisher"
    line_search: bool = True
    first_order: bool = False
    resolve_candidates: int = 2

    def __post_init__(self):
        if not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"IHT `max_iter` must be an int >= 0, got {self.max_iter!r}")
        if not self.tol >= 0:
            raise ValueError(f"IHT `tol` must be >= 0, got {self.tol!r}")
        if not isinstance(self.resolve_candidates, int) or not 1 <= self.resolve_candidates <= 16:
            raise ValueError(f"IHT `resolve_candidates` must be an int in [1, 16], got {self.resolve_candidates!r}")
        if self.init not in ("woodfisher", "magnitude"):
            raise ValueError(f"IHT `init` must be 'woodfisher' or 'magnitude', got {self.init!r}")

    def objective(self, fisher: Fisher, wbar, w):
        dw = w - wbar
        q = 0.5 * fisher.quadratic(dw, damped=True)
        return q + fisher.mean_grad() @ dw if self.first_order else q

    def select(self, problem: Problem, k, key):
        del key
        fisher, wbar = problem.fisher, problem.w
        assert fisher is not None  # IHT needs the Fisher
        if self.init == "woodfisher":
            score = wbar**2 / fisher.inv_diag()
        else:
            score = jnp.abs(wbar)
        groups = problem.groups

        def support(w):  # exactly k pruned: the zeros, then the smallest kept if w has extra zeros
            return smallest_k(jnp.where(w == 0.0, -1.0, jnp.abs(w)), k, groups)

        def resolve(pruned):  # the exact minimiser of the quadratic on the support
            return cbs_update(wbar, pruned, fisher)

        w0 = resolve(smallest_k(score, k, groups))
        step = 1.0 / (1.05 * (fisher_max_eigenvalue(fisher) + fisher.damping))
        plain = [1.0, 2.0, 4.0, 8.0] if self.line_search else [1.0]
        newton = [2.0, 1.0, 0.5, 0.25] if self.line_search else [1.0]
        # per coordinate, a plain step (m / L) or a diagonal-Newton step (m / (F_jj + lambda))
        diag = fisher.diag() + fisher.damping
        precond = jnp.stack([jnp.full_like(wbar, m * step) for m in plain] + [m / diag for m in newton])
        gbar = fisher.mean_grad() if self.first_order else 0.0
        q0 = self.objective(fisher, wbar, w0)
        hist0 = jnp.full(self.max_iter + 1, jnp.nan, wbar.dtype).at[0].set(q0)

        dscale = jnp.sqrt(diag)

        def candidate(w, grad, eta, metric):  # hard threshold by |z| or by |z| sqrt(F_jj + lambda)
            z = w - eta * grad
            return jnp.where(smallest_k(jnp.abs(z) * metric, k, groups), 0.0, z)

        def cond(st):
            it, _, _, _, _, done = st
            return (it < self.max_iter) & ~done

        def body(st):
            it, w, q, hist, exact, _ = st
            grad = fisher.matvec(w - wbar) + gbar
            cands = jnp.concatenate([jax.vmap(lambda eta: candidate(w, grad, eta, m))(precond)
                                     for m in (1.0, dscale)])

            q_thr = jax.vmap(lambda c: self.objective(fisher, wbar, c))(cands)

            def resolved():  # from an exact point, the best new supports are scored re-solved
                fresh = ~jax.vmap(lambda c: jnp.all((c == 0.0) == (w == 0.0)))(cands)
                n = min(self.resolve_candidates, cands.shape[0])
                top = jnp.argsort(jnp.where(fresh, q_thr, jnp.inf))[:n]
                ws = jax.vmap(lambda c: resolve(support(c)))(cands[top])
                qs = jax.vmap(lambda c: self.objective(fisher, wbar, c))(ws)
                qs = jnp.where(fresh[top], qs, jnp.inf)
                # padded to the shape of the other branch
                return (jnp.concatenate([ws, cands[n:]]),
                        jnp.concatenate([qs, jnp.full(cands.shape[0] - n, jnp.inf, qs.dtype)]))

            cands, qs = jax.lax.cond(exact, resolved, lambda: (cands, q_thr))
            b = jnp.argmin(qs)
            improved = qs[b] < q - self.tol * jnp.abs(q)
            w1 = jnp.where(improved, cands[b], w)
            q1 = jnp.where(improved, qs[b], q)
            same = jnp.all((w1 == 0.0) == (w == 0.0))
            # re-solve exactly once the support stops changing (or no step helps any more)
            redo = ~exact & (same | ~improved)

            def exact_step():
                w2 = resolve(support(w1))
                q2 = self.objective(fisher, wbar, w2)
                ok = q2 <= q1  # always, unless the first-order term is on
                return jnp.where(ok, w2, w1), jnp.where(ok, q2, q1)

            w2, q2 = jax.lax.cond(redo, exact_step, lambda: (w1, q1))
            done = ~improved & exact  # no step improves on an exact point: converged
            return it + 1, w2, q2, hist.at[it + 1].set(q2), exact | redo, done

        it, w, q, hist, _, done = jax.lax.while_loop(
            cond, body, (jnp.int32(0), w0, q0, hist0, jnp.bool_(True), jnp.bool_(self.max_iter == 0))
        )
        return support(w), {"iht_iterations": it, "iht_objective": hist, "iht_converged": done}
