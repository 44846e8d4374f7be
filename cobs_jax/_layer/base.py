"""What a layer-wise method is: the :class:`LayerPruner` and :class:`LayerUpdate` protocols.

A layer pruner sees one kernel as ``W`` of shape ``(rows, d_in)`` (one row per output unit, the
flattened contraction axes last, :func:`cobs_jax._layer.kernels.as_rows`) and the layer Hessian
``H = XᵀX`` shared by every row, and returns the pruned weights and the keep-mask. Its options
live on the object (a frozen dataclass: hashable, so equal configurations share compiled code);
the driver (:func:`cobs_jax.prune_layer`, :func:`cobs_jax.prune_layerwise`) owns everything
common: the checks, the damped factorisation of ``H`` (shared by the layers that read one input),
counts and patterns, the reconstruction error, the kernel layouts. A new method is one file with
one such class (``docs/design.md`` shows one in 20 lines).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple, Optional

import jax
from jax.sharding import Mesh

from .hessian import Factors

__all__ = ["LayerProblem", "LayerSelection", "LayerPruner", "LayerUpdate", "check_granularity", "positive_int"]


class LayerProblem(NamedTuple):
    """One layer as a pruner sees it.

    Attributes:
      w: ``(rows, d_in)`` trained weights W̄ in the accumulation dtype (inputs that never fire,
        ``H_jj = 0``, already zeroed when ``factors`` is given).
      h: ``(d_in, d_in)`` the undamped ``XᵀX``.
      factors: the damped ``H`` and the Cholesky factor of its inverse (:class:`Factors`), when
        the method or the update asked for them (``uses_factors``), else ``None``.
      sparsity: the fraction of weights to prune (``None`` with an N:M pattern).
      nm: ``(N, M)`` for an N:M pattern (N of every M consecutive inputs of a row kept), else ``None``.
      mesh: an optional mesh to split per-row work over (its first axis).
    """

    w: jax.Array
    h: jax.Array
    factors: Optional[Factors]
    sparsity: Optional[float]
    nm: Optional[tuple[int, int]]
    mesh: Optional[Mesh] = None


class LayerSelection(NamedTuple):
    """What :meth:`LayerPruner.prune` returns: the ``(rows, d_in)`` weights with pruned entries
    zero, the bool keep-mask (True = kept) and the method's own extras (e.g. ``{"swaps": 12}``)."""

    weights: jax.Array
    keep: jax.Array
    stats: dict[str, Any]


class LayerPruner(abc.ABC):
    """A layer-wise pruning method (a frozen dataclass holding its options).

    Subclasses set ``uses_factors`` when they need ``problem.factors`` and implement
    :meth:`prune`; :meth:`check` may reject a pattern the method cannot meet, before any work.
    """

    uses_factors: ClassVar[bool] = False

    def check(self, d_in: int, nm: Optional[tuple[int, int]], name: str) -> None:
        """Raise a ValueError naming ``name`` if this method cannot prune a ``d_in``-input layer
        to the pattern ``nm``; the default accepts everything."""
        del d_in, nm, name

    @abc.abstractmethod
    def prune(self, problem: LayerProblem) -> LayerSelection:
        """The pruned weights, the keep-mask and stats for ``problem`` (exact counts)."""


class LayerUpdate(abc.ABC):
    """A weight update applied after a pruner chose its mask (e.g. :class:`cobs_jax.layer.Exact`)."""

    uses_factors: ClassVar[bool] = True

    @abc.abstractmethod
    def apply(self, problem: LayerProblem, keep: jax.Array) -> jax.Array:
        """New ``(rows, d_in)`` weights for the keep-mask ``keep`` (pruned entries zero)."""


GRANULARITIES = ("layer", "unit")


def check_granularity(value: str, method: str) -> None:
    if value not in GRANULARITIES:
        raise ValueError(f"`{method}(granularity=...)` must be one of {GRANULARITIES}, got {value!r}")


def positive_int(value: Any, what: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{what}` must be an int >= {minimum}, got {value!r}")
