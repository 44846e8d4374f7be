"""Magnitude pruning (MP): the k weights of smallest ``|w|``."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .._core.topk import smallest_k
from .problem import Problem

__all__ = ["Magnitude"]


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """Magnitude pruning (MP): prune the k weights of smallest ``|w|``.

    With the default global budget the threshold is shared by all layers; with
    ``budget="uniform"`` (or per-layer sparsities) each layer is thresholded on its own.
    """

    def select(self, problem: Problem, k, key):
        del key
        return smallest_k(jnp.abs(problem.w), k, problem.groups), {}
