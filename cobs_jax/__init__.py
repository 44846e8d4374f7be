"""cobs_jax: one-shot second-order pruning (Combinatorial Brain Surgeon) for JAX and Flax.

One flat public namespace over two halves that share one core (see the docs' Design page):

* the **Fisher half** prunes a whole model from the empirical Fisher in low-rank form:
  ``prune``, ``prune_sweep``, ``prune_multistage`` (compiled multi-stage), ``prune_gradual``
  (with fine-tuning between stages), and the stages for your own pipeline (``make_layout``,
  ``per_example_grads``, ``Fisher``, the selectors ``Magnitude``, ``WoodFisher``, ``CBS``,
  ``IHT``, the updates ``cbs_update``/``obs_update``);
* the **layer half** prunes layer by layer from each kernel's ``XᵀX``: ``prune_layerwise``,
  ``prune_layer``, ``layer_hessian``, ``owl_sparsities``, with the methods as objects in
  :mod:`cobs_jax.layer` (``SparseGPT``, ``Wanda``, ``Magnitude``, ``CBS``, ``Exact``), every Flax
  kernel kind (``register_kernel`` for your own) and scanned stacks (``Stacked``);
* masks (params-shaped bool pytrees, True = kept) go to ``keep_sparsity`` (optax), ``save``,
  ``to_sparse``, ``pack_nm``, ``sparsity_of`` from either half.
"""

# the core
from ._core.budget import Budget as Budget
from ._core.budget import make_budget as make_budget
from ._core.layout import Layout as Layout
from ._core.layout import default_prunable as default_prunable
from ._core.layout import make_layout as make_layout
from ._core.masks import apply_masks as apply_masks
from ._core.masks import sparsity_of as sparsity_of
from ._core.topk import smallest_k as smallest_k

# the Fisher half
from ._fisher.cbs import CBS as CBS
from ._fisher.cbs import rmp_mask as rmp_mask
from ._fisher.fisher import Fisher as Fisher
from ._fisher.fisher import per_example_grads as per_example_grads
from ._fisher.gradual import LossCheck as LossCheck
from ._fisher.gradual import StagedResult as StagedResult
from ._fisher.gradual import prune_gradual as prune_gradual
from ._fisher.gradual import prune_multistage as prune_multistage
from ._fisher.gradual import sparsity_schedule as sparsity_schedule
from ._fisher.iht import IHT as IHT
from ._fisher.iht import update_aware_objective as update_aware_objective
from ._fisher.magnitude import Magnitude as Magnitude
from ._fisher.problem import Problem as Problem
from ._fisher.prune import METHODS as METHODS
from ._fisher.prune import PruneResult as PruneResult
from ._fisher.prune import apply_update as apply_update
from ._fisher.prune import make_selector as make_selector
from ._fisher.prune import prune as prune
from ._fisher.prune import prune_sweep as prune_sweep
from ._fisher.update import cbs_update as cbs_update
from ._fisher.update import obs_update as obs_update
from ._fisher.woodfisher import WoodFisher as WoodFisher

# the layer half
from . import layer as layer
from ._layer.hessian import layer_hessian as layer_hessian
from ._layer.hessian import reconstruction_error as reconstruction_error
from ._layer.kernels import register_kernel as register_kernel
from ._layer.layer import LayerInfo as LayerInfo
from ._layer.layer import LayerResult as LayerResult
from ._layer.layer import prune_layer as prune_layer
from ._layer.layerwise import LayerRecord as LayerRecord
from ._layer.layerwise import LayerwiseResult as LayerwiseResult
from ._layer.layerwise import prune_layerwise as prune_layerwise
from ._layer.owl import owl_sparsities as owl_sparsities
from ._layer.stacked import Stacked as Stacked

# structured pruning
from . import structured as structured

# export and training with masks
from ._export import NMPacked as NMPacked
from ._export import load as load
from ._export import pack_nm as pack_nm
from ._export import save as save
from ._export import to_sparse as to_sparse
from ._export import unpack_nm as unpack_nm
from ._optax import KeepSparsityState as KeepSparsityState
from ._optax import keep_sparsity as keep_sparsity

__version__ = "0.2.0"

__all__ = [
    "Budget",
    "CBS",
    "Fisher",
    "IHT",
    "KeepSparsityState",
    "LayerInfo",
    "LossCheck",
    "LayerRecord",
    "LayerResult",
    "LayerwiseResult",
    "Layout",
    "METHODS",
    "Magnitude",
    "NMPacked",
    "Problem",
    "Stacked",
    "StagedResult",
    "PruneResult",
    "WoodFisher",
    "apply_masks",
    "apply_update",
    "cbs_update",
    "default_prunable",
    "keep_sparsity",
    "layer",
    "layer_hessian",
    "load",
    "make_budget",
    "make_layout",
    "make_selector",
    "obs_update",
    "pack_nm",
    "per_example_grads",
    "prune",
    "prune_gradual",
    "prune_layer",
    "prune_layerwise",
    "prune_multistage",
    "owl_sparsities",
    "prune_sweep",
    "reconstruction_error",
    "rmp_mask",
    "save",
    "register_kernel",
    "smallest_k",
    "sparsity_of",
    "sparsity_schedule",
    "structured",
    "to_sparse",
    "unpack_nm",
    "update_aware_objective",
]


def __getattr__(name: str):
    """Version 0.1's ``cobs_jax.LAYER_METHODS`` (a tuple of names), with a DeprecationWarning."""
    if name == "LAYER_METHODS":
        import warnings

        warnings.warn("`cobs_jax.LAYER_METHODS` is deprecated: the layer methods are "
                      "`cobs_jax.layer.LAYER_METHODS` (name -> class)", DeprecationWarning, stacklevel=2)
        return tuple(layer.LAYER_METHODS)
    raise AttributeError(f"module 'cobs_jax' has no attribute {name!r}")
