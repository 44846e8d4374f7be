"""The layer half's method registry: names as shorthands for :class:`LayerPruner` objects.

``method="sparsegpt"`` is ``SparseGPT()``; ``update="exact"`` is ``Exact()``. A new method
registers its class here (or a user calls :func:`register_layer_method`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from .base import LayerPruner, LayerUpdate
from .cbs import CBS
from .exact import Exact
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = ["LAYER_METHODS", "LAYER_UPDATES", "as_pruner", "as_update", "register_layer_method"]

LAYER_METHODS: dict[str, type] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT, "cbs": CBS}
LAYER_UPDATES: dict[str, type] = {"exact": Exact}


def register_layer_method(name: str, cls: type) -> None:
    """Make ``method=name`` a shorthand for ``cls()`` (a :class:`cobs_jax.layer.LayerPruner`)."""
    if not (isinstance(cls, type) and issubclass(cls, LayerPruner)):
        raise ValueError(f"`cls` must be a LayerPruner subclass, got {cls!r}")
    LAYER_METHODS[name] = cls


def as_pruner(method: Union[str, LayerPruner], what: str = "method") -> LayerPruner:
    """``method`` as a :class:`LayerPruner` (a name is looked up, with default options)."""
    if isinstance(method, LayerPruner):
        return method
    if isinstance(method, str) and method in LAYER_METHODS:
        return LAYER_METHODS[method]()
    raise ValueError(f"`{what}` must be a cobs_jax.layer pruner ({', '.join(c.__name__ + '()' for c in LAYER_METHODS.values())}) "
                     f"or one of the names {tuple(LAYER_METHODS)}, got {method!r}")


def as_update(update: Union[None, str, LayerUpdate]) -> Optional[LayerUpdate]:
    """``update`` as a :class:`LayerUpdate` or ``None`` (the method's own weights)."""
    if update is None or update == "none":
        return None
    if isinstance(update, LayerUpdate):
        return update
    if isinstance(update, str) and update in LAYER_UPDATES:
        return LAYER_UPDATES[update]()
    raise ValueError(f"`update` must be None, a cobs_jax.layer update (Exact()) or one of {tuple(LAYER_UPDATES)}, "
                     f"got {update!r}")


_FLAT = ("block_size", "granularity", "start", "window", "max_swaps")


def from_flat_options(method: Any, options: dict[str, Any], where: str) -> Union[str, LayerPruner]:
    """The pruner that the flat keyword arguments of version 0.1 (``block_size``, ``granularity``,
    ``start``, ``window``, ``max_swaps``) described, with a DeprecationWarning; ``method``
    unchanged when none is given."""
    import warnings

    given = {k: options.pop(k) for k in _FLAT if k in options}
    if not given:
        return method
    warnings.warn(f"`{where}({', '.join(given)}=...)` is deprecated: the options live on the method object, e.g. "
                  "method=cobs_jax.layer.SparseGPT(block_size=128) or "
                  "cobs_jax.layer.CBS(start=cobs_jax.layer.Wanda(), window=64, max_swaps=64)",
                  DeprecationWarning, stacklevel=3)
    name = method if isinstance(method, str) else None
    if name not in LAYER_METHODS:
        raise ValueError(f"`{where}`: the deprecated options {sorted(given)} need `method` given by name, got {method!r}")
    def build(n: str, opts: dict) -> LayerPruner:
        cls = LAYER_METHODS[n]
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in opts.items() if k in fields and v is not None})
    if name == "cbs":
        start = given.pop("start", "sparsegpt")
        if not isinstance(start, str) or start not in LAYER_METHODS or start == "cbs":
            raise ValueError(f"`start` must be one of ('magnitude', 'wanda', 'sparsegpt'), got {start!r}")
        return CBS(start=build(start, given), **{k: given[k] for k in ("window", "max_swaps") if k in given})
    return build(name, given)
