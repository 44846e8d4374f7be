"""cobs_jax: one-shot second-order pruning (Combinatorial Brain Surgeon) for JAX and Flax.

The public API is flat: ``cobs_jax.prune`` does everything in one call; the stages
(``make_layout``, ``per_example_grads``, ``Fisher``, the selectors, ``cbs_update``/``obs_update``,
``apply_masks``) are exposed for users who compose their own pipeline. After pruning,
``keep_sparsity`` (an optax transformation) fine-tunes without reviving pruned weights, and
``prune_gradual`` reaches a target over several stages.

Layer-wise pruning (for transformers and LLMs, where the N x D gradient matrix cannot be held):
``layer_hessian`` (XᵀX of a layer's inputs, streamed), ``prune_layer`` (magnitude, Wanda,
SparseGPT and the exact re-solve for one kernel) and ``prune_layerwise`` (a Flax model block by
block from calibration data; any kernel module: Dense, DenseGeneral, Einsum, attention, conv, and
the user's own through ``register_kernel``; scanned stacks through ``Stacked``).
"""

from ._core.budget import Budget as Budget
from ._core.budget import make_budget as make_budget
from ._fisher.cbs import CBS as CBS
from ._fisher.cbs import rmp_mask as rmp_mask
from ._export import NMPacked as NMPacked
from ._export import load as load
from ._export import pack_nm as pack_nm
from ._export import save as save
from ._export import to_sparse as to_sparse
from ._export import unpack_nm as unpack_nm
from ._fisher.fisher import Fisher as Fisher
from ._fisher.fisher import per_example_grads as per_example_grads
from ._fisher.gradual import LossCheck as LossCheck
from ._fisher.gradual import StagedResult as StagedResult
from ._fisher.gradual import prune_gradual as prune_gradual
from ._fisher.gradual import prune_multistage as prune_multistage
from ._fisher.gradual import sparsity_schedule as sparsity_schedule
from ._layer.hessian import layer_hessian as layer_hessian
from ._fisher.iht import IHT as IHT
from ._fisher.iht import update_aware_objective as update_aware_objective
from ._layer.kernels import register_kernel as register_kernel
from . import layer as layer
from ._layer.layer import LayerInfo as LayerInfo
from ._layer.layer import LayerResult as LayerResult
from ._layer.layer import prune_layer as prune_layer
from ._layer.hessian import reconstruction_error as reconstruction_error
from ._layer.owl import owl_sparsities as owl_sparsities
from ._layer.layerwise import LayerRecord as LayerRecord
from ._layer.layerwise import LayerwiseResult as LayerwiseResult
from ._layer.layerwise import prune_layerwise as prune_layerwise
from ._core.layout import Layout as Layout
from ._core.layout import default_prunable as default_prunable
from ._core.layout import make_layout as make_layout
from ._core.masks import apply_masks as apply_masks
from ._core.masks import sparsity_of as sparsity_of
from ._optax import KeepSparsityState as KeepSparsityState
from ._optax import keep_sparsity as keep_sparsity
from ._fisher.prune import METHODS as METHODS
from ._fisher.prune import PruneResult as PruneResult
from ._fisher.prune import apply_update as apply_update
from ._fisher.prune import make_selector as make_selector
from ._fisher.prune import prune as prune
from ._fisher.prune import prune_sweep as prune_sweep
from ._fisher.magnitude import Magnitude as Magnitude
from ._layer.stacked import Stacked as Stacked
from ._fisher.problem import Problem as Problem
from ._fisher.woodfisher import WoodFisher as WoodFisher
from ._core.topk import smallest_k as smallest_k
from ._fisher.update import cbs_update as cbs_update
from ._fisher.update import obs_update as obs_update

__version__ = "0.1.0"

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
    "to_sparse",
    "unpack_nm",
    "update_aware_objective",
]
