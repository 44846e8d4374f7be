"""``exclude``: the one way both halves say which layers stay dense.

A regex (or a list of them) searched in each layer's name, or ``callable(name) -> bool``. Layer
half names: a kernel's path in its block without a trailing ``kernel`` (``"mlp/up_proj"``);
Fisher half names: a leaf's path joined by ``/`` (``"params/Dense_1/kernel"``, nnx ``"fc/kernel"``).
A pattern that matches nothing raises, so a typo never goes unnoticed.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence, Union

__all__ = ["Exclude", "Excluder"]

Exclude = Union[None, str, Sequence[str], Callable[[str], bool]]


class Excluder:
    """``exclude`` as a predicate on layer names, remembering which patterns matched."""

    def __init__(self, exclude):
        self.fn: Optional[Callable[[str], bool]] = None
        self.patterns: list = []
        self.used: list[bool] = []
        if exclude is None:
            return
        if callable(exclude):
            self.fn = exclude
            return
        pats = [exclude] if isinstance(exclude, str) else exclude
        if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats):
            raise ValueError(f"`exclude` must be a regex, a list of them or callable(name) -> bool, got {exclude!r}")
        try:
            self.patterns = [re.compile(p) for p in pats]
        except re.error as e:
            raise ValueError(f"`exclude`: bad regex ({e})") from e
        self.used = [False] * len(self.patterns)

    def __call__(self, name: str) -> bool:
        if self.fn is not None:
            return bool(self.fn(name))
        hits = [bool(p.search(name)) for p in self.patterns]
        self.used = [u or h for u, h in zip(self.used, hits)]
        return any(hits)

    def check_used(self, names: list) -> None:
        """ValueError for a pattern that matched none of ``names`` (every layer and weight seen)."""
        for p, used in zip(self.patterns, self.used):
            if not used:
                raise ValueError(f"`exclude` pattern {p.pattern!r} matches no layer; the layers are named like "
                                 f"{sorted(set(names))[:8]}")
