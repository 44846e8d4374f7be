"""Weight updates that compensate the pruned weights: OBS-sum (WoodFisher) and CBS-U.

Both act on the flat (D,) weight vector, blockwise over the Fisher blocks, and return weights whose
pruned entries are exactly zero. Neither forms a D x D matrix: each block costs one N x N Cholesky.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from .fisher import Fisher

__all__ = ["cbs_update", "obs_update"]


def cbs_update(w: jax.Array, pruned: jax.Array, fisher: Fisher, scale: ArrayLike = 1.0) -> jax.Array:
    """CBS-U: the multi-weight OBS update for the pruned set P (paper section 6, cbs.md section 3).

    Minimises ``1/2 dw^T F_lambda dw`` subject to ``w_P + dw_P = 0`` in every block. The closed form
    ``dw = -F^{-1} E_P (E_P^T F^{-1} E_P)^{-1} w_P`` is computed in the push-through form

        dw_P = -w_P,    dw_R = G_R^T (N lambda I + G_R G_R^T)^{-1} G_P w_P,

    with R the kept weights of the block (G_R = G with the pruned columns zeroed), so each block
    needs one N x N Cholesky solve. Returns ``where(kept, w + scale * dw, 0)``.

    Args:
      w: (D,) weights.
      pruned: (D,) bool, True = pruned.
      fisher: the blockwise damped Fisher.
      scale: the update scale s (1 = the exact minimiser).
    """
    def one(g, wb, kb):
        z = fisher.gram_solve(fisher.gram_cholesky(g, kb), g @ jnp.where(kb, 0.0, wb))  # G_P w_P
        return jnp.where(kb, wb + scale * fisher.sum_rows(z @ g), 0.0)

    return fisher.map_blocks(one, w, ~pruned)


def obs_update(w: jax.Array, pruned: jax.Array, fisher: Fisher, scale: ArrayLike = 1.0) -> jax.Array:
    """WoodFisher's OBS-sum update (the "WF" baseline; CBS code ``weight_update_method=single``).

    ``dw = -F_lambda^{-1} sum_{q in P} (w_q / [F_lambda^{-1}]_qq) e_q`` per block: the sum of the
    single-weight OBS updates, which ignores interactions between pruned weights. Returns
    ``where(kept, w + scale * dw, 0)``. cbs.md section 4: the paper's WF uses ``scale=0.9`` on MLPNet.
    """
    lam = jnp.where(pruned, w / fisher.inv_diag(), 0.0)
    dw = -fisher.inv_matvec(lam)
    return jnp.where(pruned, 0.0, w + scale * dw)
