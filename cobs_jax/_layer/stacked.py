"""Layers stacked on one axis of their parameters (scanned layer stacks), as blocks.

``nnx.scan`` / ``nnx.vmap``-built stacks, linen ``nn.scan`` and MaxText keep L layers as *one*
module whose parameters carry a layer axis of size L. :class:`Stacked` wraps such a stack so that
:func:`cobs_jax.prune_layerwise` prunes it layer by layer: layer i is the module with index i of
every stacked variable (``nnx.merge`` of the sliced state, or the linen layer module with the
sliced variables), run alone on the previous layer's outputs; the pruned layers are stacked back
in the same layout.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Stacked"]


class Stacked:
    """A stack of L layers held as one module with parameters stacked on ``axis``.

    Args:
      layers: an ``nnx.Module`` whose ``nnx.Param`` values all have the layer axis (built by
        ``nnx.vmap`` / used with ``nnx.scan``; any other variable with that axis of size L, such
        as split RNG keys, is sliced too), or a linen pair ``(layer_module, variables)``: the
        module of *one* layer and the stacked variables (``nn.scan(...,
        variable_axes={"params": axis})``'s, e.g. ``variables["params"]["layers"]`` wrapped as
        ``{"params": ...}``), every leaf of which carries the layer axis.
      axis: the layer axis of the parameters (MaxText's ``param_scan_axis`` is 1).

    ``prune_layerwise(Stacked(...), ...)`` returns its pruned ``blocks`` as a :class:`Stacked`
    of the same kind (``.layers``), and one masks dict per layer.
    """

    def __init__(self, layers: Any, axis: int = 0):
        if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
            raise ValueError(f"`axis` must be a non-negative int, got {axis!r}")
        self.axis = axis
        self.layers = layers
        state: Any
        if isinstance(layers, nnx.Module):
            self._graphdef, state = nnx.split(layers)
            params = [v[...] for _, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)]
        elif isinstance(layers, tuple) and len(layers) == 2 and isinstance(layers[0], nn.Module):
            state = flax.core.unfreeze(layers[1])
            params = jax.tree.leaves(state)
        else:
            raise ValueError("`Stacked` takes an nnx.Module or a linen (layer_module, stacked_variables) pair, got "
                             f"{type(layers).__name__}")
        sizes = {jnp.shape(p)[axis] if jnp.ndim(p) > axis else None for p in params}
        if not params or len(sizes) != 1 or None in sizes:
            raise ValueError(f"`Stacked`: every parameter must have the layer axis {axis} with one size; found sizes "
                             f"{sorted(map(str, sizes))}")
        self.length: int = int(sizes.pop() or 0)
        self._state = state

    def _stacked(self, leaf) -> bool:
        return jnp.ndim(leaf) > self.axis and jnp.shape(leaf)[self.axis] == self.length

    def unstack(self) -> list:
        """The L layers as blocks (new modules / pairs; the stack is untouched)."""
        take = lambda i: lambda a: jnp.take(a, i, axis=self.axis) if self._stacked(a) else a  # noqa: E731
        if isinstance(self.layers, nnx.Module):
            return [nnx.merge(self._graphdef, jax.tree.map(take(i), self._state)) for i in range(self.length)]
        return [(self.layers[0], jax.tree.map(take(i), self._state)) for i in range(self.length)]

    def restack(self, blocks: list) -> "Stacked":
        """A new :class:`Stacked` of the same kind from L blocks as :meth:`unstack` gives them."""
        if len(blocks) != self.length:
            raise ValueError(f"`restack` needs {self.length} blocks, got {len(blocks)}")
        nnx_kind = isinstance(self.layers, nnx.Module)
        states = [nnx.split(b)[1] if nnx_kind else b[1] for b in blocks]
        stacked = jax.tree.map(lambda ref, *xs: jnp.stack(xs, axis=self.axis) if self._stacked(ref) else xs[0],
                               self._state, *states)
        if nnx_kind:
            return Stacked(nnx.merge(self._graphdef, stacked), self.axis)
        return Stacked((self.layers[0], stacked), self.axis)

    def restack_masks(self, masks: list) -> Any:
        """L per-layer keep-mask trees (as :func:`cobs_jax.prune_layerwise` gives them) stacked into
        one shaped like the stack's parameters (nnx: ``nnx.state(layers, nnx.Param)``; linen: the
        stacked ``variables["params"]``)."""
        if len(masks) != self.length:
            raise ValueError(f"`restack_masks` needs {self.length} mask trees, got {len(masks)}")
        ref = nnx.filter_state(self._state, nnx.Param) if isinstance(self.layers, nnx.Module) else self._state["params"]
        return jax.tree.map(lambda r, *ms: jnp.stack(ms, axis=self.axis) if self._stacked(r) else ms[0], ref, *masks)
