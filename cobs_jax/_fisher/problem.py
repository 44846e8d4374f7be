"""What a Fisher-half selector sees (:class:`Problem`) and what a selector is.

A selector is a frozen (hashable) dataclass with ``select(problem, k, key) -> (pruned, stats)``,
called inside ``jax.jit``. ``pruned`` is a (D,) bool vector with exactly ``k`` True entries: the
paper's set P (True = pruned; the public masks use the opposite convention, True = kept). ``k`` may
be a traced integer, so sweeping sparsity does not recompile. One selector per file:
:mod:`.magnitude`, :mod:`.woodfisher`, :mod:`.cbs`, :mod:`.iht`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax

from .fisher import Fisher

__all__ = ["Problem"]


class Problem(NamedTuple):
    """What a selector sees.

    Attributes:
      w: (D,) trained prunable weights, w-bar in the paper.
      fisher: the block-diagonal Fisher (``None`` for selectors that need none).
      layers: static ``(start, stop)`` range of each prunable leaf.
      loss: ``loss(w) -> scalar``, the true loss of the network with prunable weights ``w``
        (used by CBS to score masks), or ``None``.
      groups: ``None`` (one global budget: ``k`` is a scalar) or a (D,) int32 group id per weight
        in ``[0, G)``; ``k`` is then a (G,) vector and exactly ``k[g]`` weights of group ``g`` are
        pruned (per-layer budgets, N:M patterns, weights that must stay pruned; see
        :func:`cobs_jax.make_budget`).
    """

    w: jax.Array
    fisher: Optional[Fisher]
    layers: tuple[tuple[int, int], ...]
    loss: Optional[Callable[[jax.Array], jax.Array]]
    groups: Optional[jax.Array] = None
