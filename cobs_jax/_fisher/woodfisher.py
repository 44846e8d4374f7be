"""WoodFisher/OBS saliency (WF-S), from the diagonal of the blockwise inverse Fisher."""

from __future__ import annotations

import dataclasses

from .._core.topk import smallest_k
from .problem import Problem

__all__ = ["WoodFisher"]


@dataclasses.dataclass(frozen=True)
class WoodFisher:
    """WoodFisher/OBS saliency with a global threshold (WF-S; with ``update="obs"``: WF).

    Prunes the k weights of smallest ``w_q^2 / [F_lambda^{-1}]_qq`` (the OBS saliency, up to the
    factor 1/2), with the diagonal of the blockwise inverse from Woodbury (N x N solves).

    References: Singh & Alistarh 2020 (WoodFisher); cbs.md section 4 ("WF", "WF-S").
    """

    def select(self, problem: Problem, k, key):
        del key
        assert problem.fisher is not None  # WoodFisher needs the Fisher
        saliency = problem.w**2 / problem.fisher.inv_diag()
        return smallest_k(saliency, k, problem.groups), {}
