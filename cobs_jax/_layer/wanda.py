"""Wanda (Sun et al., ICLR 2024): prune by ``|W_ij| * ||X_j||_2``, no weight update."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .base import LayerProblem, LayerPruner, LayerSelection, check_granularity
from .masks import choose

__all__ = ["Wanda"]


@dataclasses.dataclass(frozen=True)
class Wanda(LayerPruner):
    """Prune the weights of smallest ``|W_ij| * ||X_j||_2`` (``||X_j||_2 = sqrt(H_jj)``).

    Args:
      granularity: ``"unit"`` (``round(s * d_in)`` pruned in every output unit, as published)
        or ``"layer"`` (one threshold over the kernel).

    References: Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large
    Language Models", ICLR 2024 (``locuslab/wanda``).
    """

    granularity: str = "unit"

    def __post_init__(self):
        check_granularity(self.granularity, "Wanda")

    def prune(self, problem: LayerProblem) -> LayerSelection:
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(problem.h), 0.0))
        keep = ~choose(jnp.abs(problem.w) * norms[None, :], problem.sparsity, self.granularity, problem.nm)
        return LayerSelection(jnp.where(keep, problem.w, 0.0), keep, {})
