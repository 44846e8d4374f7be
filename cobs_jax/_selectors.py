"""Closed-form selectors: global and per-layer magnitude, WoodFisher/OBS saliency.

A selector is a frozen (hashable) dataclass with ``select(problem, k, key) -> (pruned, stats)``,
called inside ``jax.jit``. ``pruned`` is a (D,) bool vector with exactly ``k`` True entries: the
paper's set P (True = pruned; the public masks use the opposite convention, True = kept). ``k`` may
be a traced integer, so sweeping sparsity does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ._fisher import Fisher

__all__ = ["Problem", "Magnitude", "LayerMagnitude", "WoodFisher", "smallest_k"]


class Problem(NamedTuple):
    """What a selector sees.

    Attributes:
      w: (D,) trained prunable weights, w-bar in the paper.
      fisher: the block-diagonal Fisher (``None`` for selectors that need none).
      layers: static ``(start, stop)`` range of each prunable leaf.
      loss: ``loss(w) -> scalar``, the true loss of the network with prunable weights ``w``
        (used by CBS to score masks), or ``None``.
    """

    w: jax.Array
    fisher: Optional[Fisher]
    layers: tuple[tuple[int, int], ...]
    loss: Optional[Callable[[jax.Array], jax.Array]]


def smallest_k(score: jax.Array, k) -> jax.Array:
    """Bool mask of the ``k`` smallest entries of ``score`` (exactly k; ties by index, stable)."""
    order = jnp.argsort(score, stable=True)
    rank = jnp.zeros(score.shape, jnp.int32).at[order].set(jnp.arange(score.shape[0], dtype=jnp.int32))
    return rank < k


def layer_budgets(layers: tuple[tuple[int, int], ...], k) -> jax.Array:
    """Split ``k`` over layers proportionally to their size, summing to exactly ``k``.

    Largest-remainder rounding of ``k * D_l / D``; works for a traced ``k``.
    """
    sizes = jnp.array([e - s for s, e in layers], jnp.int32)
    exact = k * sizes / jnp.sum(sizes)
    base = jnp.floor(exact).astype(jnp.int32)
    extra = jnp.asarray(k, jnp.int32) - jnp.sum(base)
    # the `extra` layers with the largest remainders get one more
    bonus = smallest_k(-(exact - base), extra)
    return jnp.minimum(base + bonus.astype(jnp.int32), sizes)


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """Global magnitude pruning (MP): prune the k weights of smallest ``|w|`` over all layers."""

    def select(self, problem: Problem, k, key):
        del key
        return smallest_k(jnp.abs(problem.w), k), {}


@dataclasses.dataclass(frozen=True)
class LayerMagnitude:
    """Per-layer (uniform) magnitude pruning: each layer loses the same fraction of its weights.

    The per-layer counts are rounded so that they add up to exactly ``k`` (largest remainder).
    """

    def select(self, problem: Problem, k, key):
        del key
        budgets = layer_budgets(problem.layers, k)
        parts = [
            smallest_k(jnp.abs(problem.w[s:e]), budgets[i]) for i, (s, e) in enumerate(problem.layers)
        ]
        return jnp.concatenate(parts), {}


@dataclasses.dataclass(frozen=True)
class WoodFisher:
    """WoodFisher/OBS saliency with a global threshold (WF-S; with ``update="obs"``: WF).

    Prunes the k weights of smallest ``w_q^2 / [F_lambda^{-1}]_qq`` (the OBS saliency, up to the
    factor 1/2), with the diagonal of the blockwise inverse from Woodbury (N x N solves).

    References: Singh & Alistarh 2020 (WoodFisher); cbs.md section 4 ("WF", "WF-S").
    """

    def select(self, problem: Problem, k, key):
        del key
        saliency = problem.w**2 / problem.fisher.inv_diag()
        return smallest_k(saliency, k), {}
