"""Progress output for long calls: a tqdm bar when tqdm is installed, plain lines otherwise."""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(it: Iterable[T], enabled: bool, total: Optional[int] = None, desc: str = "") -> Iterable[T]:
    """``it`` unchanged when not ``enabled``; else wrapped in a tqdm bar (or printed step lines)."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: plain lines instead
        return _lines(it, total, desc)
    return tqdm(it, total=total, desc=desc)


def _lines(it: Iterable[T], total: Optional[int], desc: str) -> Iterator[T]:
    for i, v in enumerate(it):
        print(f"[cobs_jax] {desc}: {i + 1}/{total if total is not None else '?'}", flush=True)
        yield v
