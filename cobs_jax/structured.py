"""Structured pruning: remove whole units (attention heads, GQA KV groups, MLP channels, conv
filters) with second-order selection and exact compensation, for a physically smaller model.

>>> import cobs_jax
>>> cobs_jax.structured.GroupCBS(max_swaps=16)
GroupCBS(max_swaps=16)

One consumer layer: :func:`prune_groups`. A whole model: describe each block's units with
:class:`Units`, choose a budget (:func:`share_plan`, :func:`allocate` over
:func:`error_curves`, or FLAP's :func:`flap_plan`, from :func:`calibrate`), run
:func:`prune_structured`, and slice each block with :func:`shrunk_params`.
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
from ._structured.model import BlockInfo as BlockInfo
from ._structured.model import Given as Given
from ._structured.model import StructuredResult as StructuredResult
from ._structured.model import allocate as allocate
from ._structured.model import calibrate as calibrate
from ._structured.model import error_curves as error_curves
from ._structured.model import flap_plan as flap_plan
from ._structured.model import flap_scores as flap_scores
from ._structured.model import probe_scales as probe_scales
from ._structured.model import prune_structured as prune_structured
from ._structured.model import shrunk_params as shrunk_params
from ._structured.model import share_plan as share_plan
from ._structured.model import slimgpt_shares as slimgpt_shares
from ._structured.units import Units as Units

__all__ = ["BlockInfo", "Calibration", "Given", "GroupCBS", "GroupOBS", "GroupPruner", "GroupResult", "MagnitudeSP",
           "StructuredResult", "Units", "WandaSP", "allocate", "calibrate", "error_curves", "flap_plan", "flap_scores",
           "head_groups", "probe_scales", "prune_groups", "prune_structured", "share_plan", "shrunk_params", "slimgpt_shares"]
