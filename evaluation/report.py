"""Write evaluation results as JSON (machine-readable) and a markdown table (human-readable).

Results layout understood by :func:`write_results`::

    {
        "per_class": {"bottle": {"image_auroc": 0.99, ..., "by_defect": {...}}, ..., "mean": {...}},
        "command": "grad-eval ...", "config": {...}, "timing": {...}, ...   # any extra metadata
    }

A bare per-class dict (the output of :func:`gradad.evaluation.metrics.per_class_metrics`) is accepted as well.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["write_results", "markdown_table", "to_jsonable", "TABLE_COLUMNS"]

#: (metric key, column header) of the markdown table.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "Image AUROC"),
    ("image_aupr", "Image AUPR"),
    ("pixel_auroc", "Pixel AUROC"),
    ("pixel_aupr", "Pixel AUPR"),
    ("pro", "PRO"),
)

_SIG_DIGITS = 6


def _round_float(x: float) -> float | None:
    if not math.isfinite(x):
        return None
    return float(f"{x:.{_SIG_DIGITS}g}")


def to_jsonable(obj: Any) -> Any:
    """Convert to plain JSON types: floats rounded to 6 significant digits, nan/inf → None, numpy scalars and
    arrays → Python numbers/lists, tuples/sets → lists, paths → str, dict keys → str."""
    if obj is None or isinstance(obj, (bool, np.bool_)):
        return None if obj is None else bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _round_float(float(obj))
    if isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    return str(obj)


def _pct(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if not math.isfinite(f) else f"{100.0 * f:.1f}"


def _per_class_of(results: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(results.get("per_class"), Mapping):
        return dict(results["per_class"])
    keys = {k for k, _ in TABLE_COLUMNS}
    return {k: v for k, v in results.items() if isinstance(v, Mapping) and keys & set(v)}


def markdown_table(per_class: Mapping[str, Any]) -> str:
    """Markdown table: one row per class, then the ``mean`` row (bold), metrics as percentages with 1 decimal.

    Columns: image AUROC, image AUPR, pixel AUROC, pixel AUPR, PRO; missing or nan values show as "–".
    """
    header = "| Class | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [header, sep]
    for name, m in per_class.items():
        if name == "mean" or not isinstance(m, Mapping):
            continue
        rows.append(f"| {name} | " + " | ".join(_pct(m.get(k)) for k, _ in TABLE_COLUMNS) + " |")
    mean = per_class.get("mean")
    if isinstance(mean, Mapping):
        rows.append("| **mean** | " + " | ".join(f"**{_pct(mean.get(k))}**" for k, _ in TABLE_COLUMNS) + " |")
    return "\n".join(rows) + "\n"


def _defect_table(per_class: Mapping[str, Any]) -> str | None:
    rows = []
    for name, m in per_class.items():
        if name == "mean" or not isinstance(m, Mapping) or not isinstance(m.get("by_defect"), Mapping):
            continue
        for d, dm in m["by_defect"].items():
            rows.append(f"| {name} | {d} | " + " | ".join(_pct(dm.get(k)) for k, _ in TABLE_COLUMNS) + " |")
    if not rows:
        return None
    header = "| Class | Defect | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    sep = "|---|---|" + "---:|" * len(TABLE_COLUMNS)
    return "\n".join([header, sep, *rows]) + "\n"


def _short(v: Any, limit: int = 160) -> str:
    if isinstance(v, (Mapping, list, tuple)):
        s = json.dumps(to_jsonable(v), separators=(",", ":"))
    elif isinstance(v, (float, np.floating)):
        r = _round_float(float(v))
        s = "nan" if r is None else str(r)
    else:
        s = str(v)
    s = s.replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def write_results(results: Mapping[str, Any], out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths.

    The JSON holds everything (pretty-printed, floats to 6 significant digits, nan as null). The markdown has a
    short header with the scalar metadata (command, timing, ...; long values truncated), the per-class table
    (:func:`markdown_table`) and, when present, a per-defect-type table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    payload = to_jsonable(results)
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    per_class = _per_class_of(results)
    lines = [f"# {name}", ""]
    meta = [(k, v) for k, v in results.items() if k != "per_class" and k not in per_class]
    for k, v in meta:
        lines.append(f"- **{k}**: {_short(v)}")
    if meta:
        lines.append("")
    if per_class:
        lines.append(markdown_table(per_class))
        dt = _defect_table(per_class)
        if dt:
            lines += ["## Per defect type (vs. good images of the class)", "", dt]
    md_path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return json_path, md_path
