"""What a removable unit is in a model: the group specification a user writes for a block.

A :class:`Units` names, in layer names as :func:`cobs_jax.prune_layerwise` uses them, the
*consumer* whose inputs the units are (``size`` consecutive entries each along one input axis
of its kernel), the *producers* whose outputs feed exactly those inputs (``{layer: outputs per
unit}``) and the *followers* between them (a BatchNorm after a producer conv: ``{module path:
entries per unit}``, every array of the module sliced on its last axis). The consumer is where
the second-order selection and compensation happen; the producers' and followers' entries are
deleted with the unit and cost no error (structured.md §2.1). Examples::

    # Llama block: MLP channels, and GQA KV groups (3 query heads of 64 per KV head)
    Units("mlp/down_proj", 1, {"mlp/gate_proj": 1, "mlp/up_proj": 1})
    Units("self_attn/o_proj", 3 * 64, {"self_attn/q_proj": 3 * 64, "self_attn/k_proj": 64, "self_attn/v_proj": 64})
    # ResNet basic block: conv1's filters, with their BatchNorm, feed conv2's input channels;
    # conv2 has no bias, the intercept goes into bn2's running mean
    Units("conv2", 1, {"conv1": 1}, followers={"bn1": 1}, bias_into="bn2")
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

__all__ = ["Units", "producer_axis", "slice_units", "unit_cost"]


def _per_unit(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")
    return int(v)


@dataclasses.dataclass(frozen=True)
class Units:
    """One kind of removable unit of a block.

    Args:
      consumer: the layer whose inputs the units are (``o_proj`` for heads, ``down_proj`` for MLP
        channels, the next conv for filters).
      size: entries per unit along ``axis`` (``head_dim`` for a head of a ``(heads * head_dim,
        d)`` kernel; 1 for a channel; ``n_rep * head_dim`` for a GQA KV group).
      producers: ``{layer: outputs per unit}`` or ``{layer: (axis, outputs per unit)}``: the
        layers whose outputs are the units' inputs to the consumer, in the same unit order (q/k/v
        of a head; gate/up of a channel; the conv whose filters they are), sliced away with the
        unit along ``axis`` of their kernel (default: its first output axis), biases with them.
      axis: the consumer kernel's input axis the units run along (default its last input axis:
        ``d_in`` of a Dense kernel, ``c_in`` of a conv's ``(kh, kw, c_in, c_out)``; 0 for the
        heads of a ``(heads, head_dim, d)`` DenseGeneral kernel, with ``size=1``).
      followers: ``{module path: entries per unit}``: modules between producer and consumer
        whose every array's last axis runs over the units (a BatchNorm's scale, bias, mean,
        var), sliced with them.
      families: the units form this many equal consecutive runs, and every plan removes the
        same count from each: query heads inside GQA groups (``families=num_kv_heads``; the k/v
        rows stay, every KV head keeps as many query heads).
      multiple: every plan removes a multiple of this many units, so widths that are multiples
        of it stay so (8 or 16 channels: XLA's CPU convolutions and GPU matmuls are slow on odd
        widths); the selection still picks single units.
      bias_into: for a consumer without a bias, the BatchNorm (module path) right after it
        that takes the intercept instead: in inference mode adding ``Δb`` before it equals
        subtracting ``Δb`` from its running ``mean`` (conv2 -> bn2 of a ResNet block).
    """

    consumer: str
    size: int = 1
    producers: Any = ()
    axis: Optional[int] = None
    followers: Any = ()
    families: int = 1
    multiple: int = 1
    bias_into: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.consumer, str) or not self.consumer:
            raise ValueError(f"Units: `consumer` must be a layer name, got {self.consumer!r}")
        _per_unit(self.size, f"Units({self.consumer!r}): `size`")
        _per_unit(self.families, f"Units({self.consumer!r}): `families`")
        _per_unit(self.multiple, f"Units({self.consumer!r}): `multiple`")
        if self.bias_into is not None and (not isinstance(self.bias_into, str) or not self.bias_into):
            raise ValueError(f"Units({self.consumer!r}): `bias_into` must be a module path, got {self.bias_into!r}")
        for field in ("producers", "followers"):
            entries = dict(getattr(self, field))
            for name, per in entries.items():
                axis, n = per if field == "producers" and isinstance(per, tuple) else (None, per)
                if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
                    raise ValueError(f"Units({self.consumer!r}): producer {name!r}: the axis must be an int, "
                                     f"got {axis!r}")
                _per_unit(n, f"Units({self.consumer!r}): entries per unit of {field[:-1]} {name!r}")
                if field == "producers":
                    entries[name] = (axis, int(n))
            object.__setattr__(self, field, tuple(sorted(entries.items())))

    def _axis(self, shape: tuple, in_axes: tuple) -> int:
        """The unit axis of a consumer kernel of ``shape`` (an entry of ``in_axes``)."""
        axes = tuple(a % len(shape) for a in in_axes)
        axis = axes[-1] if self.axis is None else self.axis % len(shape)
        if axis not in axes:
            raise ValueError(f"Units({self.consumer!r}): `axis` {self.axis} is not an input axis of its kernel "
                             f"{shape} (input axes {axes})")
        if shape[axis] % (self.size * self.families):
            raise ValueError(f"Units({self.consumer!r}): its {shape[axis]} inputs along axis {axis} are not a whole "
                             f"number of units of {self.size} in {self.families} families")
        return axis

    def count(self, shape: tuple, in_axes: tuple) -> int:
        """Units in a consumer kernel of ``shape`` with input axes ``in_axes``."""
        return shape[self._axis(shape, in_axes)] // self.size

    def groups(self, shape: tuple, in_axes: tuple) -> np.ndarray:
        """The ``(n_units, columns)`` columns of each unit in the kernel's rows layout (input
        axes flattened in ``in_axes`` order, as :func:`cobs_jax.prune_layer` sees it)."""
        axes = tuple(a % len(shape) for a in in_axes)
        axis = self._axis(shape, in_axes)
        idx = np.arange(math.prod(shape[a] for a in axes), dtype=np.int32).reshape([shape[a] for a in axes])
        idx = np.moveaxis(idx, axes.index(axis), 0)
        return idx.reshape(self.count(shape, in_axes), -1)



def unit_cost(units: Units, kernels: Mapping[str, Any], in_axes: Mapping[str, tuple]) -> int:
    """Kernel weights one unit holds: its consumer inputs times the consumer's outputs, plus
    its producer outputs times each producer's inputs (biases and followers not counted)."""
    shape = jnp.shape(kernels[units.consumer])
    cost = math.prod(shape) // units.count(shape, in_axes[units.consumer])
    for name, (_, per) in units.producers:
        pshape = jnp.shape(kernels[name])
        cost += per * math.prod(pshape) // pshape[producer_axis(units, name, pshape, in_axes[name])]
    return cost


def producer_axis(units: Units, name: str, shape: tuple, in_axes: tuple) -> int:
    """The axis of producer ``name``'s kernel that the units run along (an output axis)."""
    axis = dict(units.producers)[name][0]
    ins = {a % len(shape) for a in in_axes}
    outs = [a for a in range(len(shape)) if a not in ins]
    axis = outs[0] if axis is None else axis % len(shape)
    if axis in ins:
        raise ValueError(f"Units({units.consumer!r}): producer {name!r}: axis {axis} is an input axis of its kernel")
    return axis


def slice_units(params: Mapping[str, Any], units: Units, removed: np.ndarray, in_axes: Mapping[str, tuple],
                followers: Optional[Mapping[str, list]] = None) -> dict:
    """New ``{layer: {"kernel": ..., "bias": ...}}`` for the consumer and producers of ``units``
    with the ``removed`` units (bool ``(n_units,)``) sliced away: the consumer's inputs along its
    unit axis, the producers' outputs and biases. ``params[layer]`` holds the layer's
    ``kernel`` (and ``bias`` or None). ``followers`` (``{module path: [dicts of arrays]}``) are
    sliced in place on their arrays' last axis."""
    removed = np.asarray(removed, bool)
    k = params[units.consumer]["kernel"]
    ax = tuple(a % k.ndim for a in in_axes[units.consumer])
    n = units.count(k.shape, ax)
    if removed.shape != (n,):
        raise ValueError(f"Units({units.consumer!r}): `removed` must be bool ({n},), got {removed.shape}")
    axis = units._axis(k.shape, ax)
    keep = np.flatnonzero(np.repeat(~removed, units.size)).astype(np.int32)
    out = {units.consumer: dict(params[units.consumer], kernel=jnp.take(k, keep, axis=axis))}
    for name, (_, per) in units.producers:
        p = params[name]
        pk = p["kernel"]
        pax = producer_axis(units, name, pk.shape, in_axes[name])
        cols = np.flatnonzero(np.repeat(~removed, per)).astype(np.int32)
        entry = dict(p, kernel=jnp.take(pk, cols, axis=pax))
        if p.get("bias") is not None:  # the bias has the kernel's output axes, in order
            ins = {x % pk.ndim for x in in_axes[name]}
            entry["bias"] = jnp.take(p["bias"], cols, axis=sum(1 for a in range(pax) if a not in ins))
        out[name] = entry
    for path, per in units.followers:
        cols = np.flatnonzero(np.repeat(~removed, per)).astype(np.int32)
        for d in (followers or {}).get(path, []):
            for key, v in d.items():
                if hasattr(v, "shape") and v.ndim >= 1:
                    if v.shape[-1] != per * n:
                        raise ValueError(f"Units({units.consumer!r}): follower {path!r} entry {key!r} has "
                                         f"{v.shape[-1]} entries on its last axis, not {per} x {n} units")
                    d[key] = jnp.take(v, cols, axis=-1)
    return out
