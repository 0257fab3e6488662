"""Small text helpers for one-line messages."""

from __future__ import annotations

import reprlib
from typing import Any, Iterable


def first_few(items: Iterable[object], n: int = 3, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` joined by ``sep``, then `` ...`` when there are more: a message names a few of
    many files without growing past one line."""
    listed = [str(item) for item in items]
    return sep.join(listed[:n]) + (" ..." if len(listed) > n else "")


#: the longest :func:`shown_value`
SHOWN_CHARS = 200


class _ShortRepr(reprlib.Repr):
    """reprlib with small limits, and a huge integer as its size (its repr would raise ValueError past 4300
    digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 2, 4, 6, 6, 6
        self.maxfrozenset, self.maxdeque, self.maxarray = 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = 80, 80, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def shown_value(value: Any) -> str:
    """``repr(value)`` shortened for a message (at most :data:`SHOWN_CHARS` characters, whatever the value): every
    value read from a file that an error message quotes goes through this."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # a repr that fails: the type is still worth naming
        text = f"<{type(value).__name__}>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def one_line(text: str, limit: int = 300) -> str:
    """``text`` (an exception's, which may quote a file's content at any length) as one line of at most ``limit``
    characters: whitespace runs become one space, only the first 4000 characters are read."""
    line = " ".join(text[:4000].split())
    return line if len(line) <= limit else line[:limit - 3] + "..."
