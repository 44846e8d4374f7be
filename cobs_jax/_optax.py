"""Fine-tuning a pruned model with optax while its pruned weights stay exactly zero."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._core.layout import PyTree
from ._core.masks import check_same_structure

__all__ = ["keep_sparsity", "KeepSparsityState"]


class KeepSparsityState(NamedTuple):
    """State of :func:`keep_sparsity`: the bool keep-masks (True = kept)."""

    masks: PyTree


def keep_sparsity(masks: PyTree) -> optax.GradientTransformation:
    """An optax transformation that zeroes the updates of pruned weights.

    Chain it *after* any optimizer: with params whose pruned entries are zero (as :func:`prune`
    returns them), ``optax.apply_updates`` then leaves them exactly zero whatever the optimizer
    does (momentum, Adam moments, weight decay). Chain it *before* the optimizer as well to keep
    the optimizer's state (moments) at zero on pruned weights, so nothing leaks if the masks are
    later relaxed::

        tx = optax.chain(cobs_jax.keep_sparsity(masks), optax.adamw(1e-3), cobs_jax.keep_sparsity(masks))

    Args:
      masks: bool pytree with the params' structure, True = kept (``PruneResult.masks``).

    Returns:
      A ``GradientTransformation``; its state holds the masks (a pytree of bool arrays), so a
      jitted training step receives them as arguments rather than as baked-in constants.

    Raises:
      ValueError (at ``init``): if ``masks`` does not have the structure and leaf shapes of the params.
    """
    masks = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)

    def init_fn(params):
        check_same_structure(params, masks)
        return KeepSparsityState(masks)

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, state.masks)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)
