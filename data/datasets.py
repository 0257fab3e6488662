"""Dataset readers: list the images (and ground-truth masks) of an anomaly-detection dataset on disk.

Supported layouts (``layout=`` argument; ``"auto"`` detects it, see :func:`detect_layout`):

``mvtec`` (MVTec AD)
    ``<root>/<cls>/train/good/*``, ``<root>/<cls>/test/<good|defect>/*`` and masks
    ``<root>/<cls>/ground_truth/<defect>/<stem>_mask.png``. ``root`` may also be one class folder (it has
    ``train/`` and ``test/``); the class name is then the folder name.
``goodsad`` (GoodsAD)
    Same folders as MVTec AD but masks are ``ground_truth/<defect>/<stem>.png`` (no ``_mask`` suffix). MVTec AD and
    GoodsAD share one reader, which looks for ``<stem>_mask.*`` first and then ``<stem>.*``.
``visa`` (VisA)
    ``<root>/split_csv/1cls.csv`` with columns ``object,split,label,image,mask``; ``split`` is train/test,
    ``label`` is normal/anomaly, paths are relative to ``root`` and ``mask`` is empty for normal images. Raw
    VisA masks store defects as small non-zero values, so VisA samples carry ``mask_threshold=0``.
``folder`` (any folder of good/defect images)
    ``<root>/<cls>/good/*`` normal images, ``<root>/<cls>/defect/*`` anomalous images (files directly in
    ``defect/`` get defect type ``"defect"``, files in ``defect/<type>/`` get ``<type>``), optional masks
    ``<root>/<cls>/masks/[<type>/]<stem>[_mask].*``. ``root`` may also be one class folder (it has ``good/``).

    Split rule: if ``<root>/<cls>/test/`` exists it is the test split, read like MVTec AD (``test/<good|defect>``,
    masks in ``ground_truth/<defect>/`` or ``masks/``) and all of ``good/`` is training data. Otherwise the
    files of ``good/`` sorted by name are split deterministically: every 5th file (1-based positions 5, 10,
    15, ...) goes to test, the rest to train; all of ``defect/`` is test.

Image files: ``.png .jpg .jpeg .bmp .tif .tiff`` (any case), read directly inside their folder; hidden files and
folders (name starting with ``.``) are ignored; files are sorted by name so the order is deterministic. Other
files (``.webp``, ``.txt``, ...), broken links and images in subfolders of an image folder (``train/good/day1/``)
are not read, with one warning per folder naming them (see :func:`scan_image_folder`), and a class left without
training images is refused with what its folder held instead. A defect image without a mask file is not
an error: its ``mask_path`` is ``None`` (one warning per class). Every other problem raises
:class:`gradad.errors.DatasetError` with a one-line message.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradad.errors import DatasetError
from gradad.text import first_few

logger = logging.getLogger(__name__)

#: Recognised image file extensions (compared lower-case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Concrete layouts, in the order auto-detection reports them.
LAYOUTS: tuple[str, ...] = ("mvtec", "visa", "goodsad", "folder")
#: Valid ``split`` values.
SPLITS: tuple[str, ...] = ("train", "test")
#: In the ``folder`` layout without a ``test/`` folder, every FOLDER_TEST_EVERY-th sorted good image is test.
FOLDER_TEST_EVERY = 5
#: Relative path of the VisA split file.
VISA_CSV = Path("split_csv") / "1cls.csv"

_GOOD = "good"
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_NORMAL = {"normal", "good", "ok", "0"}
_VISA_ANOMALY = {"anomaly", "abnormal", "bad", "defect", "ng", "1"}
_TRIED = (
    "mvtec/goodsad (<cls>/train/good + <cls>/test, or a class folder with train/ and test/), "
    "visa (split_csv/1cls.csv), folder (<cls>/good, or a class folder with good/)"
)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split.

    Attributes:
        image_path: the image file.
        class_name: object / texture class.
        split: ``"train"`` or ``"test"``.
        label: 0 normal, 1 anomalous.
        defect_type: ``"good"`` for normal images, otherwise the defect folder name (``"anomaly"`` for VisA).
        mask_path: ground-truth mask, ``None`` for normal images or when no mask file exists.
        mask_threshold: the mask file is binarised with ``value > mask_threshold`` (127, or 0 for VisA).
    """

    image_path: Path
    class_name: str
    split: str
    label: int
    defect_type: str
    mask_path: Path | None
    mask_threshold: int = 127


# --------------------------------------------------------------------------------------------------- helpers


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with a recognised image extension."""
    return not _is_hidden(path) and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _entries(d: Path) -> list[Path]:
    """Visible entries of a folder sorted by name ([] when the folder does not exist)."""
    if not d.is_dir():
        return []
    try:
        return sorted((p for p in d.iterdir() if not _is_hidden(p)), key=lambda p: p.name)
    except OSError as exc:
        raise DatasetError(f"cannot list folder ({exc.strerror or exc}): {d}") from None


def _subdirs(d: Path) -> list[Path]:
    return [p for p in _entries(d) if p.is_dir()]


@dataclass(frozen=True)
class FolderListing:
    """What one image folder holds as the readers see it: the images they read and what they pass over.

    Attributes:
        images: visible image files of a known type, sorted by name (what is read).
        other_types: visible files of no known image type (``.webp``, ``.txt``, no extension, a FIFO ...).
        broken_links: visible links whose target does not exist.
        nested: names of visible subfolders that hold images somewhere below (only when subfolders are not
            expected there: ``train/good``, ``good``, one defect type's folder).
    """

    images: list[Path]
    other_types: list[Path]
    broken_links: list[Path]
    nested: list[str]

    def ignored_summary(self) -> str | None:
        """One clause per kind of thing the readers pass over (``None`` when nothing is): what a warning about the
        folder, or an empty-class error, says was there instead of readable images."""
        parts = []
        if self.other_types:
            parts.append(unknown_types_summary(self.other_types))
        if self.broken_links:
            names = first_few(p.name for p in self.broken_links)
            parts.append(f"ignored {len(self.broken_links)} broken link(s) whose target does not exist ({names})")
        if self.nested:
            names = first_few((f"{n}/" for n in self.nested), 4)
            parts.append(f"images in subfolders {names} are not read: move them up or use one class per folder")
        return "; ".join(parts) or None


def _kind(p: Path) -> str:
    """How a passed-over file is named in a warning: its extension, or why it has none that counts."""
    if not p.is_file():
        return "(not a regular file)"
    return p.suffix.lower() or "(no extension)"


def unknown_types_summary(files: Sequence[Path]) -> str:
    """``ignored N file(s) that are not images of a known type (kinds; known: ...)``: how every reader (training,
    evaluation, calibration, grad-run's file sources) says what it passed over."""
    kinds = sorted({_kind(p) for p in files})
    return (f"ignored {len(files)} file(s) that are not images of a known type ({', '.join(kinds)}; known: "
            f"{' '.join(IMAGE_EXTENSIONS)})")


def _holds_images(d: Path) -> bool:
    """Whether a visible image file lies anywhere below ``d`` (stops at the first; hidden folders skipped)."""
    for top, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        if any(not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS and (Path(top) / f).is_file()
               for f in files):
            return True
    return False


def scan_image_folder(d: str | Path, nested_expected: bool = False) -> FolderListing:
    """List the image files directly inside ``d`` and what else it holds (see :class:`FolderListing`).

    ``nested_expected``: the folder holds subfolders by design (``defect/<type>``, ``masks/<type>``); they are then
    not searched for images. A folder that does not exist gives an empty listing.
    """
    images: list[Path] = []
    other: list[Path] = []
    broken: list[Path] = []
    nested: list[str] = []
    for p in _entries(Path(d)):
        if p.is_symlink() and not p.exists():
            broken.append(p)
        elif p.is_dir():
            if not nested_expected and _holds_images(p):
                nested.append(p.name)
        elif is_image_file(p):
            images.append(p)
        else:
            other.append(p)
    return FolderListing(images, other, broken, nested)


#: (folder, message) pairs already warned about in this process: training, evaluation and calibration list the
#: same folders more than once, and one warning per folder is what is useful
_WARNED: set[tuple[str, str]] = set()


def _warn_ignored(d: Path, listing: FolderListing) -> None:
    """Log, once per folder and process, what the readers pass over in ``d`` (nothing when nothing is)."""
    summary = listing.ignored_summary()
    if summary is None:
        return
    key = (str(d.resolve()), summary)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning("folder %s: %s", d, summary)


def _images(d: Path, warn: bool = True, nested_expected: bool = False) -> list[Path]:
    """The image files read from ``d``; with ``warn``, one warning about the files and subfolders passed over."""
    listing = scan_image_folder(d, nested_expected=nested_expected or not warn)
    if warn:
        _warn_ignored(d, listing)
    return listing.images


def _instead(d: Path) -> str:
    """What a folder without readable images holds instead, as a parenthesis for an error message."""
    if not d.exists():
        return " (the folder does not exist)"
    if not d.is_dir():
        return " (it is not a folder)"
    summary = scan_image_folder(d).ignored_summary()
    return f" ({summary})" if summary else " (the folder is empty)"


def list_image_files(folder: str | Path, what: str = "image") -> list[Path]:
    """Sorted visible image files directly inside ``folder``; DatasetError naming ``what`` when there are none.

    Files of other types, broken links and images in subfolders are passed over with one warning per folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{what} folder not found: {folder}")
    listing = scan_image_folder(folder)
    if not listing.images:
        nested = listing.nested
        hint = (f" (subfolders are not searched; {first_few(nested, 4)} "
                f"hold images: give one of them)" if nested else "")
        if not hint and (listing.other_types or listing.broken_links):
            hint = f" ({listing.ignored_summary()})"
        raise DatasetError(f"{what} folder {folder} holds no images{hint}")
    _warn_ignored(folder, listing)
    return listing.images


def _mask_index(d: Path, nested_expected: bool = False) -> dict[str, Path]:
    """Map file stem -> mask file for the image files of a folder (``.png`` wins over other extensions);
    ``nested_expected`` for a masks folder that also holds one subfolder per defect type."""
    index: dict[str, Path] = {}
    for p in _images(d, nested_expected=nested_expected):
        if p.stem not in index or p.suffix.lower() == ".png":
            index[p.stem] = p
    return index


def _find_mask(stem: str, indexes: Iterable[dict[str, Path]], loose: bool = False,
               taken: frozenset[Path] | set[Path] = frozenset()) -> Path | None:
    """Find the mask of image ``stem``: ``<stem>_mask.*`` then ``<stem>.*`` in each index in turn.

    With ``loose`` (generic folder layout) a unique file named ``<stem>_*`` / ``<stem>-*`` is also accepted, unless
    it is in ``taken`` (the exact mask of another image: ``lot7.png`` must not take ``lot7_b_mask.png``).
    """
    for index in indexes:
        for key in (f"{stem}_mask", stem, f"{stem}-mask"):
            if key in index:
                return index[key]
        if loose:
            hits = [p for k, p in index.items() if k.startswith((f"{stem}_", f"{stem}-")) and p not in taken]
            if len(hits) == 1:
                return hits[0]
    return None


def _match_masks(images: Sequence[tuple[Path, Sequence[dict[str, Path]]]], loose: bool) -> list[Path | None]:
    """The mask of every (image, mask indexes) of one class, in order: exact names first for all images, then
    (``loose``) the loose ``<stem>_*`` names among the masks no image claims exactly. One mask file for two images
    is refused: one of them would be scored against the other's defect."""
    exact = [_find_mask(img.stem, indexes) for img, indexes in images]
    taken = {m for m in exact if m is not None}
    found = [m if m is not None or not loose else _find_mask(img.stem, indexes, loose=True, taken=taken)
             for m, (img, indexes) in zip(exact, images)]
    owner: dict[Path, Path] = {}
    for (img, _), mask in zip(images, found):
        if mask is None:
            continue
        if mask in owner:
            raise DatasetError(f"mask {mask} matches two images, {owner[mask]} and {img}: rename it "
                               "<stem>_mask.png after the image it belongs to")
        owner[mask] = img
    return found


def _warn_missing_masks(class_name: str, missing: list[Path], n_defect: int) -> None:
    if missing:
        logger.warning(
            "class '%s': %d of %d defect images have no mask file (e.g. %s); they stay anomalous for image "
            "metrics and get an empty ground-truth mask",
            class_name,
            len(missing),
            n_defect,
            missing[0],
        )


def _check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset root does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset root is not a folder: {root}")
    return root


def _check_layout(layout: str) -> str:
    if layout != "auto" and layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout '{layout}'; choose one of auto, {', '.join(LAYOUTS)}")
    return layout


def _is_mvtec_class(d: Path) -> bool:
    return (d / "train").is_dir() or ((d / "test").is_dir() and not (d / _GOOD).is_dir())


def _is_single_mvtec_class(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _is_folder_class(d: Path) -> bool:
    return (d / _GOOD).is_dir()


def _mvtec_class_dirs(root: Path) -> dict[str, Path]:
    if _is_single_mvtec_class(root):
        return {root.name: root}
    return {d.name: d for d in _subdirs(root) if _is_mvtec_class(d)}


def _folder_class_dirs(root: Path) -> dict[str, Path]:
    if _is_folder_class(root):
        return {root.name: root}
    return {d.name: d for d in _subdirs(root) if _is_folder_class(d)}


def _mvtec_or_goodsad(class_dirs: Iterable[Path]) -> str:
    """Tell MVTec AD (``*_mask.png``) from GoodsAD (same stem) by the mask file names; MVTec when unsure."""
    saw_plain = False
    for cdir in class_dirs:
        for ddir in _subdirs(cdir / "ground_truth"):
            for p in _images(ddir, warn=False):  # only names matter here; the test split warns when it reads them
                if p.stem.endswith("_mask"):
                    return "mvtec"
                saw_plain = True
    return "goodsad" if saw_plain else "mvtec"


# ------------------------------------------------------------------------------------------------ detection


def detect_layout(root: str | Path) -> str:
    """Detect the layout of a dataset folder: ``"mvtec"``, ``"visa"``, ``"goodsad"`` or ``"folder"``.

    Order: ``split_csv/1cls.csv`` -> visa; a class folder with ``train/`` and ``test/`` or class sub-folders with
    ``train/`` (or only ``test/``) -> mvtec or goodsad (told apart by mask names: ``<stem>_mask.png`` is MVTec AD,
    ``<stem>.png`` GoodsAD); a ``good/`` folder or class sub-folders with ``good/`` -> folder.

    Raises:
        DatasetError: the root does not exist or matches none of the layouts.
    """
    root = _check_root(root)
    if (root / VISA_CSV).is_file():
        return "visa"
    _check_not_inside_class(root, depth=1)  # <cls>/test has good/: it would pass for a folder class "test"
    if _is_single_mvtec_class(root):
        return _mvtec_or_goodsad([root])
    subdirs = _subdirs(root)
    if any((d / "train").is_dir() for d in subdirs):
        return _mvtec_or_goodsad(_mvtec_class_dirs(root).values())
    if _is_folder_class(root) or any(_is_folder_class(d) for d in subdirs):
        return "folder"
    if any((d / "test").is_dir() for d in subdirs):
        return _mvtec_or_goodsad(_mvtec_class_dirs(root).values())
    _check_not_inside_class(root, depth=_INSIDE_DEPTH)  # checked last: a root any layout reads stays readable
    raise DatasetError(f"not a recognised dataset layout: {root} (tried {_TRIED})")


#: Folders of an MVTec-style class folder a dataset root can wrongly point into (at any depth below them).
_MVTEC_PARTS = ("train", "test", "ground_truth")
#: Folders of a generic-folder class.
_FOLDER_PARTS = ("good", "defect", "masks")
#: How many levels above a root are searched for the class folder it lies in (<cls>/ground_truth/<type>: 2).
_INSIDE_DEPTH = 2


def _inside_class_error(root: Path, cdir: Path) -> DatasetError:
    return DatasetError(f"dataset root points inside the class folder {cdir}: {root} (pass the class folder or "
                        "the dataset root)")


def _check_not_inside_class(root: Path, depth: int) -> None:
    """Refuse a root inside a class folder, naming the class folder to pass instead: up to ``depth`` levels into
    an MVTec-style one (``<cls>/train``, ``<cls>/train/good``, ``<cls>/test/<type>``, ``<cls>/ground_truth/...``)
    or, at the full depth, one level into a generic-folder one (``<cls>/good``, ``<cls>/defect``, ``<cls>/masks``)."""
    child = root
    for parent in list(root.parents)[:depth]:
        if child.name in _MVTEC_PARTS and _is_single_mvtec_class(parent):
            raise _inside_class_error(root, parent)
        child = parent
    # after the MVTec check: <cls>/train/good is also "good/ of a folder class named train"
    if depth >= _INSIDE_DEPTH and root.name in _FOLDER_PARTS and _is_folder_class(root.parent):
        raise _inside_class_error(root, root.parent)


def _resolve_layout(root: Path, layout: str) -> str:
    layout = _check_layout(layout)
    return detect_layout(root) if layout == "auto" else layout


# ------------------------------------------------------------------------------------------------------ VisA


def _visa_rows(root: Path) -> list[dict[str, str]]:
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            missing = [c for c in _VISA_COLUMNS if c not in fields]
            if missing:
                raise DatasetError(
                    f"VisA split file lacks column(s) {', '.join(missing)} (expected {','.join(_VISA_COLUMNS)}): "
                    f"{csv_path}"
                )
            rows = []
            for raw in reader:
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
                if not any(row.values()):
                    continue  # a row of empty cells (e.g. ",,,," at the end of a spreadsheet export)
                # the class name becomes a folder / file name part downstream (figures, reports): one plain part only
                problem = _class_name_problem(row.get("object", ""))
                if problem:
                    raise DatasetError(f"VisA split file {csv_path} line {reader.line_num}: object "
                                       f"{row.get('object', '')!r} is not a usable class name ({problem})")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read VisA split file ({exc}): {csv_path}") from None
    return rows


def _class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class name (``None`` when it can): it must be one plain path part."""
    if not name:
        return "empty"
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if name.startswith("."):
        return "it starts with '.'"
    if any(ord(ch) < 32 for ch in name):
        return "it holds a control character"
    return None


def _inside_root(root: Path, rel: str, csv_path: Path, what: str) -> Path:
    """``root / rel`` for a path listed in the VisA split file, refused when it leaves the dataset root: an absolute
    path or one that ``..`` takes out. Checked on the names, so a dataset whose files are links into a shared
    store still reads."""
    normal = Path(os.path.normpath(rel)) if rel else Path()
    if normal.is_absolute() or normal.drive or ".." in normal.parts:
        raise DatasetError(f"{what} {rel!r} listed in {csv_path} lies outside the dataset root {root}")
    return root / rel


def _visa_classes(root: Path) -> list[str]:
    return sorted({r["object"] for r in _visa_rows(root)})


def _visa_samples(root: Path, split: str, classes: list[str]) -> list[Sample]:
    csv_path = root / VISA_CSV
    wanted = set(classes)
    per_class: dict[str, list[Sample]] = {c: [] for c in classes}
    missing_masks: dict[str, list[Path]] = {c: [] for c in classes}
    for row in _visa_rows(root):
        cls = row["object"]
        if cls not in wanted or row["split"].lower() != split:
            continue
        lab = row["label"].lower()
        if lab in _VISA_NORMAL:
            label = 0
        elif lab in _VISA_ANOMALY:
            label = 1
        else:
            raise DatasetError(
                f"unknown label '{row['label']}' for {row['image']} (expected normal/anomaly): {csv_path}"
            )
        image_path = _inside_root(root, row["image"], csv_path, "image")
        if not row["image"] or not image_path.is_file():
            raise DatasetError(f"image listed in {csv_path} not found: {image_path}")
        mask_path: Path | None = None
        if label == 1:
            listed = _inside_root(root, row["mask"], csv_path, "mask") if row["mask"] else None
            if listed is not None and listed.is_file():
                mask_path = listed
            else:
                missing_masks[cls].append(image_path)
        per_class[cls].append(
            Sample(
                image_path=image_path,
                class_name=cls,
                split=split,
                label=label,
                defect_type="anomaly" if label else _GOOD,
                mask_path=mask_path,
                mask_threshold=0,
            )
        )
    out: list[Sample] = []
    for cls in classes:
        samples = sorted(per_class[cls], key=lambda s: (s.label, str(s.image_path)))
        if not samples:
            _raise_empty(cls, split, csv_path)
        if split == "train" and any(s.label for s in samples):
            logger.warning("class '%s': %s lists anomalous images in the train split", cls, csv_path)
        _warn_missing_masks(cls, missing_masks[cls], sum(s.label for s in samples))
        out.extend(samples)
    return out


# ------------------------------------------------------------------------------------------ MVTec / GoodsAD


def _raise_empty(cls: str, split: str, where: Path, why: str | None = None) -> None:
    """Refuse a class without images of ``split``, saying what ``where`` holds instead (or ``why``)."""
    if why is None:
        why = "" if where.is_file() else _instead(where)  # a VisA split file: nothing to describe
    if split == "train":
        raise DatasetError(f"empty class '{cls}': no training images in {where}{why}")
    raise DatasetError(f"class '{cls}' has no test images in {where}{why}")


def _no_test_subfolder_images(test_dir: Path) -> str:
    """Why a ``test/`` folder gave no images (it is read one subfolder per label: good/ and each defect type)."""
    if not test_dir.is_dir():
        return " (the folder does not exist)"
    return " (its images are read from one subfolder per label, test/good/ and test/<defect type>/: none holds " \
           "images of a known type)"


def _hold_out_rule(cdir: Path, n_good: int) -> str:
    """Why a generic-folder class without ``test/`` has no test images: the hold-out rule, and what would give some."""
    return (f": without a test/ folder, every {FOLDER_TEST_EVERY}th good image (sorted by name) is held out for "
            f"testing, so its {n_good} good image(s) give none, and {cdir / 'defect'} holds no images; add good "
            f"images (at least {FOLDER_TEST_EVERY}), defect images in defect/, or a test/ folder "
            f"(test/good/, test/<defect type>/)")


def _test_dir_samples(
    cls: str, cdir: Path, mask_dirs: Sequence[Path], missing: list[Path], loose: bool
) -> list[Sample]:
    """Samples of an MVTec-style ``<cdir>/test/<good|defect>/`` folder; masks searched in ``<mask_dir>/<defect>/``."""
    found: list[tuple[Path, str, list[dict[str, Path]]]] = []  # (image, defect folder, its mask indexes)
    defect_dirs = _subdirs(cdir / "test")
    defect_dirs.sort(key=lambda d: (d.name != _GOOD, d.name))
    for ddir in defect_dirs:
        label = 0 if ddir.name == _GOOD else 1
        indexes = [_mask_index(m / ddir.name) for m in mask_dirs] if label else []
        if label and loose:
            indexes += [_mask_index(m, nested_expected=True) for m in mask_dirs]
        found += [(img, ddir.name, indexes) for img in _images(ddir)]
    defects = [(img, indexes) for img, dtype, indexes in found if dtype != _GOOD]
    masks = iter(_match_masks(defects, loose))
    out: list[Sample] = []
    for img, dtype, _ in found:
        label = 0 if dtype == _GOOD else 1
        mask_path = next(masks) if label else None
        if label and mask_path is None:
            missing.append(img)
        out.append(Sample(img, cls, "test", label, dtype, mask_path))
    return out


def _mvtec_samples(cls: str, cdir: Path, split: str) -> list[Sample]:
    if split == "train":
        train_dir = cdir / "train" / _GOOD
        imgs = _images(train_dir) if train_dir.is_dir() else _images(cdir / "train")
        if not imgs:
            _raise_empty(cls, split, train_dir)
        return [Sample(p, cls, "train", 0, _GOOD, None) for p in imgs]
    missing: list[Path] = []
    out = _test_dir_samples(cls, cdir, [cdir / "ground_truth"], missing, loose=False)
    if not out:
        _raise_empty(cls, split, cdir / "test", _no_test_subfolder_images(cdir / "test"))
    _warn_missing_masks(cls, missing, sum(s.label for s in out))
    return out


# ---------------------------------------------------------------------------------------------- generic folder


def _folder_samples(cls: str, cdir: Path, split: str) -> list[Sample]:
    good = _images(cdir / _GOOD)
    has_test_dir = (cdir / "test").is_dir()
    if not good:
        # no normal images at all: nothing to train on, whatever split was asked for
        _raise_empty(cls, "train", cdir / _GOOD)
    if has_test_dir:
        train_good, test_good = good, []
    else:
        train_good = [p for i, p in enumerate(good) if i % FOLDER_TEST_EVERY != FOLDER_TEST_EVERY - 1]
        test_good = [p for i, p in enumerate(good) if i % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1]
    if split == "train":
        if test_good:  # said where it happens: the quick start's layout trains on 80 % of the photos it was given
            logger.info("class %s: %d of its %d good images (every %dth) are kept out of training as its test split "
                        "(folder layout without a test/ folder; with %s/test/ all of good/ is trained on)", cls,
                        len(test_good), len(good), FOLDER_TEST_EVERY, cdir)
        return [Sample(p, cls, "train", 0, _GOOD, None) for p in train_good]

    missing: list[Path] = []
    if has_test_dir:
        out = _test_dir_samples(cls, cdir, [cdir / "ground_truth", cdir / "masks"], missing, loose=True)
    else:
        out = [Sample(p, cls, "test", 0, _GOOD, None) for p in test_good]
        defect_root = cdir / "defect"
        masks_root = cdir / "masks"
        root_index = _mask_index(masks_root, nested_expected=True)
        groups: list[tuple[str, list[Path], list[dict[str, Path]]]] = [
            ("defect", _images(defect_root, nested_expected=True), [root_index])
        ]
        for sub in _subdirs(defect_root):
            groups.append((sub.name, _images(sub), [_mask_index(masks_root / sub.name), root_index]))
        defects = [(dtype, img, indexes) for dtype, imgs, indexes in groups for img in imgs]
        masks = _match_masks([(img, indexes) for _, img, indexes in defects], loose=True)
        for (dtype, img, _), mask_path in zip(defects, masks):
            if mask_path is None:
                missing.append(img)
            out.append(Sample(img, cls, "test", 1, dtype, mask_path))
    if not out and has_test_dir:
        _raise_empty(cls, split, cdir / "test", _no_test_subfolder_images(cdir / "test"))
    if not out:
        _raise_empty(cls, split, cdir, _hold_out_rule(cdir, len(good)))
    _warn_missing_masks(cls, missing, sum(s.label for s in out))
    return out


# ---------------------------------------------------------------------------------------------------- public


def _class_dirs(root: Path, layout: str) -> dict[str, Path]:
    if layout in ("mvtec", "goodsad"):
        return _mvtec_class_dirs(root)
    return _folder_class_dirs(root)


def list_classes(root: str | Path, layout: str = "auto") -> list[str]:
    """Sorted class names of the dataset at ``root``.

    Raises:
        DatasetError: the root does not exist, the layout is unknown / not recognised, or it holds no class.
    """
    root = _check_root(root)
    layout = _resolve_layout(root, layout)
    names = _visa_classes(root) if layout == "visa" else sorted(_class_dirs(root, layout))
    if not names:
        _check_not_inside_class(root, depth=_INSIDE_DEPTH)
        raise DatasetError(f"no classes found in {root} for layout '{layout}' (tried {_TRIED})")
    return names


def load_samples(
    root: str | Path,
    split: str,
    classes: Sequence[str] | None = None,
    layout: str = "auto",
) -> list[Sample]:
    """List the samples of one split of a dataset.

    Args:
        root: dataset root (or a single class folder for the mvtec/goodsad and folder layouts).
        split: ``"train"`` or ``"test"``.
        classes: class names to load (in this order); ``None`` loads all classes in sorted order.
        layout: ``"auto"`` or one of ``mvtec``, ``visa``, ``goodsad``, ``folder`` (see the module docstring,
            which also documents the deterministic train/test split of the ``folder`` layout).

    Returns:
        Samples grouped by class; within a class normal images first, then defect types by name, files sorted.

    Raises:
        DatasetError: bad split or layout setting, missing root, unrecognised layout, unknown class (the message
            lists the available ones), a class without training images (``empty class``) or without test images,
            an image listed in a VisA CSV that does not exist.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; expected 'train' or 'test'")
    root = _check_root(root)
    layout = _resolve_layout(root, layout)
    available = list_classes(root, layout)
    if classes is None:
        wanted = available
    else:
        if isinstance(classes, str):
            classes = [classes]
        wanted = list(dict.fromkeys(classes))
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise DatasetError(
                f"class {', '.join(repr(c) for c in unknown)} not found in {root} (layout {layout}); "
                f"available: {', '.join(available)}"
            )
    if layout == "visa":
        samples = _visa_samples(root, split, wanted)
    else:
        dirs = _class_dirs(root, layout)
        reader = _folder_samples if layout == "folder" else _mvtec_samples
        samples = [s for cls in wanted for s in reader(cls, dirs[cls], split)]
    logger.debug("loaded %d %s samples from %s (layout %s)", len(samples), split, root, layout)
    return samples


def load_samples_from_roots(
    roots: Sequence[str | Path],
    split: str,
    classes: Sequence[str] | None = None,
    layout: str = "auto",
) -> list[Sample]:
    """:func:`load_samples` over several dataset roots (one unified model for all of them).

    Classes keep their own names; a name found in two roots is refused, since the model and its metrics could
    not tell the two apart. ``classes`` selects by name across the roots; unknown names list what exists.
    """
    roots = _distinct_roots(roots)
    if len(roots) == 1:
        return load_samples(roots[0], split, classes, layout)
    owner: dict[str, Path] = {}
    for root in roots:
        checked = _check_root(root)
        for cls in list_classes(checked, layout):
            if cls in owner:
                raise DatasetError(f"class {cls!r} exists in both {owner[cls]} and {checked}"
                                   f"{_nesting(owner[cls], checked)}: rename one so the unified model can keep "
                                   "them apart")
            owner[cls] = checked
    if classes is not None:
        unknown = [c for c in classes if c not in owner]
        if unknown:
            raise DatasetError(f"class {', '.join(map(repr, unknown))} not found in any of "
                               f"{', '.join(map(str, roots))}; available: {', '.join(owner)}")
    wanted = list(owner) if classes is None else list(dict.fromkeys(classes))
    return [s for cls in wanted for s in load_samples(owner[cls], split, [cls], layout)]


def _distinct_roots(roots: Sequence[str | Path]) -> list[str | Path]:
    """``roots`` with any root given a second time (the same folder, however spelled: ``mv``, ``./mv/``, a link to
    it) left out with a warning: reading it twice would make every class clash with itself."""
    kept: dict[Path, str | Path] = {}
    for root in roots:
        key = _check_root(root).resolve()
        if key in kept:
            logger.warning("dataset root %s is given twice (as %s and %s): reading it once", key, kept[key], root)
            continue
        kept[key] = root
    return list(kept.values())


def _nesting(a: Path, b: Path) -> str:
    """`` (b lies inside a)`` when one root lies inside the other, the likely cause of a class found in both."""
    ra, rb = a.resolve(), b.resolve()
    if ra in rb.parents:
        return f" ({b} lies inside {a}: give one of them)"
    if rb in ra.parents:
        return f" ({a} lies inside {b}: give one of them)"
    return ""


def summarize(samples: Iterable[Sample]) -> dict[str, Any]:
    """Count samples per class, split, label and defect type (JSON-serialisable).

    Returns a dict like::

        {"total": 866, "normal": 856, "anomalous": 10, "with_mask": 10,
         "splits": {"train": {"total": ..., "normal": ..., "anomalous": ..., "with_mask": ...,
                              "defect_types": {"good": ...}}, ...},
         "classes": {"bottle": {"train": {...same keys as a split...}, "test": {...}}, ...}}
    """

    def new() -> dict[str, Any]:
        return {"total": 0, "normal": 0, "anomalous": 0, "with_mask": 0, "defect_types": Counter()}

    def add(bucket: dict[str, Any], s: Sample) -> None:
        bucket["total"] += 1
        bucket["anomalous" if s.label else "normal"] += 1
        bucket["with_mask"] += int(s.mask_path is not None)
        bucket["defect_types"][s.defect_type] += 1

    overall = {"total": 0, "normal": 0, "anomalous": 0, "with_mask": 0}
    splits: dict[str, dict[str, Any]] = {}
    classes: dict[str, dict[str, dict[str, Any]]] = {}
    for s in samples:
        overall["total"] += 1
        overall["anomalous" if s.label else "normal"] += 1
        overall["with_mask"] += int(s.mask_path is not None)
        add(splits.setdefault(s.split, new()), s)
        add(classes.setdefault(s.class_name, {}).setdefault(s.split, new()), s)

    def finish(bucket: dict[str, Any]) -> dict[str, Any]:
        bucket["defect_types"] = dict(sorted(bucket["defect_types"].items(), key=lambda kv: (kv[0] != _GOOD, kv[0])))
        return bucket

    return {
        **overall,
        "splits": {k: finish(v) for k, v in sorted(splits.items())},
        "classes": {c: {k: finish(v) for k, v in sorted(d.items())} for c, d in sorted(classes.items())},
    }
