"""Keep-masks on parameter pytrees (True = kept)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .layout import PyTree, same_structure

__all__ = ["apply_masks", "sparsity_of"]


def check_same_structure(params: PyTree, masks: PyTree) -> None:
    pt, mt = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(masks)
    if not same_structure(pt, mt):
        raise ValueError(f"`masks` must have the structure of `params`; got {mt}, expected {pt}")
    for (kp, p), m in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(masks)):
        if jnp.shape(m) != jnp.shape(p):
            raise ValueError(
                f"`masks` leaf {jax.tree_util.keystr(kp)} has shape {jnp.shape(m)}, "
                f"expected {jnp.shape(p)}"
            )


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zero the entries of ``params`` whose mask is False. Returns a new pytree (dtypes kept).

    Raises:
      ValueError: if ``masks`` does not have the structure and leaf shapes of ``params``.
    """
    check_same_structure(params, masks)
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity_of(masks: PyTree) -> float:
    """Fraction of False entries over all leaves of a keep-mask pytree."""
    leaves = jax.tree_util.tree_leaves(masks)
    total = sum(int(jnp.size(m)) for m in leaves)
    kept = sum(int(jnp.sum(m)) for m in leaves)
    return 1.0 - kept / total if total else 0.0
