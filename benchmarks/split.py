"""A documented tuning split: the first K defect images of every type taken out of the public test halves.

They serve as the labelled defects of ``grad-train --defects`` (what a quality engineer with ten bad parts has)
and as the only real defects any setting may be tuned on; ``grad-bench accuracy --exclude SPLIT/split.json``
leaves them out of the scored test set, so no reported number includes an image that was trained or tuned on.

The folder holds links, not copies, so a dataset never lands in the repository:
``SPLIT/defects/<class>/<type>/<file>``, ``SPLIT/masks/<class>/<type>/<stem>_mask.png`` and ``SPLIT/split.json``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from gradad.data.datasets import Sample, load_samples_from_roots
from gradad.data.tuning_split import SPLIT_FILE
from gradad.errors import DatasetError

log = logging.getLogger(__name__)

#: defect images of every type that stay in the scored test set whatever --per-type asks (a type taken out whole
#: would vanish from every report without a word)
MIN_SCORED_PER_TYPE = 1


def choose_held_out(samples: Sequence[Sample], per_type: int) -> list[Sample]:
    """The first ``per_type`` defect images (sorted order, as listed) of every (class, defect type), at most all but
    :data:`MIN_SCORED_PER_TYPE` of a type's images (a warning names the types capped)."""
    defects = [s for s in samples if s.label == 1]
    totals = Counter((s.class_name, s.defect_type) for s in defects)
    limit = {key: max(0, min(per_type, n - MIN_SCORED_PER_TYPE)) for key, n in totals.items()}
    capped = [f"{c}/{t} ({n} images): took {limit[(c, t)]}" for (c, t), n in totals.items() if limit[(c, t)] < per_type]
    if capped:
        log.warning("--per-type %d would leave fewer than %d scored image(s) of %s", per_type, MIN_SCORED_PER_TYPE,
                    "; ".join(capped))
    seen: Counter[tuple[str, str]] = Counter()
    picked = []
    for s in defects:
        key = (s.class_name, s.defect_type)
        seen[key] += 1
        if seen[key] <= limit[key]:
            picked.append(s)
    return picked


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


LINK_FOLDERS = ("defects", "masks")


def _refuse_real_files(out: Path) -> None:
    """Refuse a split folder whose defects/ or masks/ hold real files: this command only ever writes links there,
    so they are someone's data (and a link of the same name would replace one)."""
    for sub in LINK_FOLDERS:
        root = out / sub
        if not root.is_dir():
            continue
        real = next((p for p in sorted(root.rglob("*")) if not p.is_symlink() and not p.is_dir()), None)
        if real is not None:
            raise DatasetError(f"-o {out}: {real} is a file, not a link of a tuning split: choose an empty folder")


def _remove_stale_links(out: Path, keep: set[Path]) -> int:
    """Remove the links under defects/ and masks/ that the new split does not write (an earlier split's), then the
    folders that held only those; real files are never touched. Returns the number of links removed."""
    removed = 0
    for sub in LINK_FOLDERS:
        root = out / sub
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_symlink() and p not in keep:  # grad-train --defects would read an old split's images
                p.unlink()
                removed += 1
        for d in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
    return removed


def write_split(roots: Sequence[str], per_type: int, out_dir: str | Path, layout: str = "auto") -> dict[str, Any]:
    """Write the tuning split of ``roots`` to ``out_dir``; returns what split.json holds. Links an earlier split left
    in ``out_dir`` are removed; a real file under its defects/ or masks/ is refused."""
    if per_type < 1:
        raise DatasetError(f"--per-type {per_type}: must be at least 1")
    out = Path(out_dir)
    _refuse_real_files(out)
    samples = load_samples_from_roots(list(roots), "test", None, layout)
    held = choose_held_out(samples, per_type)
    links: dict[Path, Path] = {}
    for s in held:
        rel = Path(s.class_name) / s.defect_type
        links[out / "defects" / rel / s.image_path.name] = s.image_path
        if s.mask_path is not None:
            links[out / "masks" / rel / f"{s.image_path.stem}_mask{s.mask_path.suffix}"] = s.mask_path
    stale = _remove_stale_links(out, set(links))
    if stale:
        log.info("removed %d links of an earlier split in %s", stale, out)
    for link, target in links.items():
        _link(target, link)
    counts: dict[str, int] = {}
    for s in held:
        counts[f"{s.class_name}/{s.defect_type}"] = counts.get(f"{s.class_name}/{s.defect_type}", 0) + 1
    split = {"per_type": per_type, "roots": [str(r) for r in roots], "held_out": [str(s.image_path.resolve())
                                                                                  for s in held], "counts": counts}
    out.mkdir(parents=True, exist_ok=True)
    (out / SPLIT_FILE).write_text(json.dumps(split, indent=1))
    log.info("tuning split: %d defect images (%d per type) -> %s", len(held), per_type, out)
    return split
