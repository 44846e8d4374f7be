"""Version 0.1's argument names, kept for one release with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["take_renamed", "reject_unknown"]


def take_renamed(options: dict[str, Any], old: str, new: str, value: Any, where: str, why: str = "") -> Any:
    """``options[old]`` (removed from ``options``, with a DeprecationWarning) if given, else ``value``."""
    if old not in options:
        return value
    warnings.warn(f"`{where}({old}=...)` is deprecated: say `{new}=`{why}", DeprecationWarning, stacklevel=3)
    return options.pop(old)


def reject_unknown(options: dict[str, Any], where: str) -> None:
    """TypeError for keyword arguments left over after the deprecated ones were taken."""
    if options:
        raise TypeError(f"{where}() got unexpected keyword arguments {sorted(options)}")
