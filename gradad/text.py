"""Small text helpers for one-line messages."""

from __future__ import annotations

from typing import Iterable


def first_few(items: Iterable[object], n: int = 3, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` joined by ``sep``, then `` ...`` when there are more: a message names a few of
    many files without growing past one line."""
    listed = [str(item) for item in items]
    return sep.join(listed[:n]) + (" ..." if len(listed) > n else "")
