"""Plain Python values of numpy scalars, numpy arrays and paths (JSON lines, weights-only torch files)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import numpy as np


def plain_leaf(obj: Any) -> Any:
    """A numpy scalar as a Python number, an array as nested lists, a path as a string; anything else unchanged
    (the same object, so ``plain_leaf(x) is x`` says nothing was converted)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    return obj
