"""Structured pruning: remove whole input groups of a consumer layer (attention heads, KV
groups, MLP channels, conv input channels) with second-order selection and exact compensation.

>>> import cobs_jax
>>> cobs_jax.structured.GroupCBS(max_swaps=16)
GroupCBS(max_swaps=16)

This release covers one consumer layer (:func:`prune_groups`); shrinking whole models and the
LLM benchmark are the next steps (see the docs' Design page).
"""

from ._structured.compensate import Calibration as Calibration
from ._structured.compensate import head_groups as head_groups
from ._structured.groups import GroupCBS as GroupCBS
from ._structured.groups import GroupOBS as GroupOBS
from ._structured.groups import GroupPruner as GroupPruner
from ._structured.groups import GroupResult as GroupResult
from ._structured.groups import MagnitudeSP as MagnitudeSP
from ._structured.groups import WandaSP as WandaSP
from ._structured.groups import prune_groups as prune_groups

__all__ = ["Calibration", "GroupCBS", "GroupOBS", "GroupPruner", "GroupResult", "MagnitudeSP", "WandaSP",
           "head_groups", "prune_groups"]
