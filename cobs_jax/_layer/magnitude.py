"""Magnitude pruning of one layer: prune the weights of smallest ``|W_ij|``."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .base import LayerProblem, LayerPruner, LayerSelection, check_granularity
from .masks import choose

__all__ = ["Magnitude"]


@dataclasses.dataclass(frozen=True)
class Magnitude(LayerPruner):
    """Prune the weights of smallest magnitude; the kept weights are left as they are.

    Args:
      granularity: where the count is exact: ``"layer"`` (``round(s * size)`` over the kernel,
        one threshold; the published baseline) or ``"unit"`` (``round(s * d_in)`` in every
        output unit).

    Example:
      >>> import cobs_jax
      >>> cobs_jax.layer.Magnitude(granularity="unit")
      Magnitude(granularity='unit')
    """

    granularity: str = "layer"

    def __post_init__(self):
        check_granularity(self.granularity, "Magnitude")

    def prune(self, problem: LayerProblem) -> LayerSelection:
        keep = ~choose(jnp.abs(problem.w), problem.sparsity, self.granularity, problem.nm)
        return LayerSelection(jnp.where(keep, problem.w, 0.0), keep, {})
