"""The layer-wise methods as objects, for :func:`cobs_jax.prune_layer` and
:func:`cobs_jax.prune_layerwise` (``method=`` and ``update=``).

>>> import cobs_jax
>>> cobs_jax.layer.CBS(start=cobs_jax.layer.Wanda(), window=32)  # doctest: +ELLIPSIS
CBS(start=Wanda(granularity='unit'), window=32, max_swaps=64)

A new method subclasses :class:`LayerPruner` (one file, one class; see the design page) and
may be given a name with :func:`register_layer_method`.
"""

from ._layer.base import LayerProblem as LayerProblem
from ._layer.base import LayerPruner as LayerPruner
from ._layer.base import LayerSelection as LayerSelection
from ._layer.base import LayerUpdate as LayerUpdate
from ._layer.cbs import CBS as CBS
from ._layer.exact import Exact as Exact
from ._layer.magnitude import Magnitude as Magnitude
from ._layer.registry import LAYER_METHODS as LAYER_METHODS
from ._layer.registry import LAYER_UPDATES as LAYER_UPDATES
from ._layer.registry import register_layer_method as register_layer_method
from ._layer.sparsegpt import SparseGPT as SparseGPT
from ._layer.wanda import Wanda as Wanda

__all__ = [
    "CBS",
    "Exact",
    "LAYER_METHODS",
    "LAYER_UPDATES",
    "LayerProblem",
    "LayerPruner",
    "LayerSelection",
    "LayerUpdate",
    "Magnitude",
    "SparseGPT",
    "Wanda",
    "register_layer_method",
]
