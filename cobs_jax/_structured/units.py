"""What a removable unit is in a model: the group specification a user writes for a block.

A :class:`Units` names, in layer names as :func:`cobs_jax.prune_layerwise` uses them, the
*consumer* whose input columns the units are (``size`` consecutive columns each, in the
kernel's flattened input order) and the *producers* whose outputs feed exactly those columns
(``{layer: output columns per unit}``). The consumer is where the second-order selection and
compensation happen; the producers' matching outputs are deleted with the unit and cost no
error (structured.md §2.1). Examples for a Llama block::

    Units("mlp/down_proj", 1, {"mlp/gate_proj": 1, "mlp/up_proj": 1})              # MLP channels
    Units("self_attn/o_proj", 3 * 64,                                              # GQA KV groups
          {"self_attn/q_proj": 3 * 64, "self_attn/k_proj": 64, "self_attn/v_proj": 64})
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

__all__ = ["Units", "slice_units", "unit_cost"]


@dataclasses.dataclass(frozen=True)
class Units:
    """One kind of removable unit of a block.

    Args:
      consumer: the layer whose input columns the units are (``o_proj`` for heads,
        ``down_proj`` for MLP channels, the next conv for filters).
      size: consumer input columns per unit (``head_dim``; 1 for a channel; ``n_rep * head_dim``
        for a GQA KV group; ``kh * kw`` for a conv input channel in an unfolded kernel).
      producers: ``{layer: output columns per unit}``: the layers whose outputs are the units'
        inputs to the consumer, in the same unit order (q/k/v rows of a head; gate/up rows of a
        channel). Their outputs are sliced away with the unit; biases with them.
    """

    consumer: str
    size: int
    producers: Any = ()

    def __post_init__(self):
        if not isinstance(self.consumer, str) or not self.consumer:
            raise ValueError(f"Units: `consumer` must be a layer name, got {self.consumer!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"Units({self.consumer!r}): `size` must be a positive int, got {self.size!r}")
        prods = dict(self.producers)
        for name, per in prods.items():
            if isinstance(per, bool) or not isinstance(per, (int, np.integer)) or per < 1:
                raise ValueError(f"Units({self.consumer!r}): producer {name!r} must give a positive int of "
                                 f"output columns per unit, got {per!r}")
        object.__setattr__(self, "producers", tuple(sorted(prods.items())))

    def count(self, d_in: int) -> int:
        """Units in a consumer of ``d_in`` input columns (raises unless ``size`` divides it)."""
        if d_in % self.size:
            raise ValueError(f"Units({self.consumer!r}): its {d_in} input columns are not a whole number of "
                             f"units of {self.size}")
        return d_in // self.size

    def groups(self, d_in: int) -> np.ndarray:
        """The ``(n_units, size)`` input columns of each unit."""
        return np.arange(d_in, dtype=np.int32).reshape(self.count(d_in), self.size)


def _flat(kernel_shape, in_axes) -> tuple[int, int]:
    d_in = math.prod(kernel_shape[a] for a in in_axes)
    return d_in, math.prod(kernel_shape) // d_in


def unit_cost(units: Units, kernels: Mapping[str, Any], in_axes: Mapping[str, tuple]) -> int:
    """Weights one unit holds: its consumer columns times the consumer's outputs, plus its
    producer outputs times each producer's inputs."""
    d_in, d_out = _flat(jnp.shape(kernels[units.consumer]), in_axes[units.consumer])
    cost = units.size * d_out
    for name, per in units.producers:
        p_in, _ = _flat(jnp.shape(kernels[name]), in_axes[name])
        cost += per * p_in
    return cost


def _keep_along(a, axes: tuple, keep_cols: np.ndarray, what: str):
    """``a`` with only ``keep_cols`` of its flattened ``axes`` (consecutive, leading the rest
    in the order given) kept; the first of ``axes`` shrinks."""
    axes = tuple(sorted(a_ % a.ndim for a_ in axes))
    if axes != tuple(range(axes[0], axes[0] + len(axes))):
        raise ValueError(f"{what}: its unit axes {axes} are not consecutive")
    inner = math.prod(a.shape[x] for x in axes[1:])
    if len(keep_cols) % inner:
        raise ValueError(f"{what}: the kept columns are not whole slices of axis {axes[0]}")
    shape = a.shape
    flat = a.reshape(shape[: axes[0]] + (-1,) + shape[axes[-1] + 1 :])
    kept = jnp.take(flat, jnp.asarray(keep_cols, np.int32), axis=axes[0])
    return kept.reshape(shape[: axes[0]] + (len(keep_cols) // inner,) + shape[axes[0] + 1 :])


def slice_units(params: Mapping[str, Any], units: Units, removed: np.ndarray, in_axes: Mapping[str, tuple]) -> dict:
    """The block's ``{layer: {"kernel": ..., "bias": ...}}`` entries of ``units``' layers with the
    ``removed`` units (bool ``(n_units,)``) sliced away: the consumer's input columns, the
    producers' output columns and biases. ``params[layer]`` holds the layer's ``kernel`` (and
    ``bias``, optional); the result holds new arrays only for those layers."""
    removed = np.asarray(removed, bool)
    out = {}
    k = params[units.consumer]["kernel"]
    ax = in_axes[units.consumer]
    d_in, _ = _flat(k.shape, ax)
    if removed.shape != (units.count(d_in),):
        raise ValueError(f"Units({units.consumer!r}): `removed` must be bool ({units.count(d_in)},), got "
                         f"{removed.shape}")
    keep = np.repeat(~removed, units.size)
    out[units.consumer] = dict(params[units.consumer], kernel=_keep_along(k, ax, np.flatnonzero(keep), units.consumer))
    for name, per in units.producers:
        p = params[name]
        pk = p["kernel"]
        out_axes = tuple(a for a in range(pk.ndim) if a not in {x % pk.ndim for x in in_axes[name]})
        cols = np.flatnonzero(np.repeat(~removed, per))
        entry = dict(p, kernel=_keep_along(pk, out_axes, cols, name))
        if p.get("bias") is not None:
            entry["bias"] = _keep_along(p["bias"], tuple(range(p["bias"].ndim)), cols, name + " bias")
        out[name] = entry
    return out
