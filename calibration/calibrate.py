"""``grad-calibrate``: thresholds from the exported model, run through the runtime backend the line will use."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from gradad.bundle import Bundle, Calibration, image_digest
from gradad.calibration.thresholds import (
    CalibrationConfig,
    binomial_upper_bound,
    far_alternatives,
    far_threshold,
    min_images_for_rate,
    outlier_limit,
    outlying_goods,
    pixel_threshold_f1,
    pixel_threshold_good_only,
    check_target_recall,
    rates_at,
    recall_threshold,
)
from gradad.calibration.duplicates import distinct_images, duplicates_warning
from gradad.data.datasets import is_image_file, list_image_files
from gradad.data.images import MASK_THRESHOLD, read_image_rgb, read_mask, resize_mask
from gradad.errors import DatasetError, GradError
from gradad.runtime.backend import Backend
from gradad.runtime.preprocess import to_model_input
from gradad.text import first_few

log = logging.getLogger(__name__)

#: key of calibration.data holding the resolved paths of every image the thresholds were set on (goods, defects)
CALIBRATION_IMAGES = "images"
#: the f1 and recall rules on fewer defect images than this get a warning (one defect moves recall by >= 20 %)
FEW_DEFECTS = 5
#: an f1 or recall threshold that flags more than this share of the good calibration images gets a warning
GOOD_FLAGGED_WARNING = 0.1


def mask_index(masks_dir: Path) -> dict[str, list[Path]]:
    """The image files of ``masks_dir`` by stem, each list sorted: one listing of the folder serves every defect
    image (a listing per image made calibration with a thousand defects list the folder a thousand times)."""
    index: dict[str, list[Path]] = {}
    for path in sorted(masks_dir.iterdir()):
        if is_image_file(path):
            index.setdefault(path.stem, []).append(path)
    return index


def find_mask(masks_dir: Path, image: Path, index: dict[str, list[Path]] | None = None) -> Path | None:
    """<stem>_mask.<ext> or <stem>.<ext> inside masks_dir, stems matched exactly (a glob would give 001.png the
    mask of 001.5.png, and read [ ] in a name as a pattern). Never the image itself (masks kept beside the images,
    or a link to it): an image as its own mask would mark its every bright pixel as defect. ``index``:
    :func:`mask_index` of masks_dir, when several images are matched."""
    index = mask_index(masks_dir) if index is None else index
    itself = image.resolve()
    for stem in (f"{image.stem}_mask", image.stem):
        hits = [p for p in index.get(stem, ()) if p.resolve() != itself]
        if hits:
            return hits[0]
    return None


#: How a mask file is binarised (gradad.data.images.read_mask), for the messages about masks that read empty.
MASK_RULE = (f"a pixel is defect when its value is > {MASK_THRESHOLD} on the 0-255 scale (16-bit and float masks "
             "rescaled; a 0/1 label mask reads > 0)")


def _read_masks(masks_dir: Path, defect_files: Sequence[Path], sizes: Sequence[tuple[int, int]],
                hw: tuple[int, int]) -> tuple[np.ndarray, int]:
    """(masks at model size, one per defect image: all False where no mask file matches; how many matched)."""
    masks = np.zeros((len(defect_files), *hw), bool)
    found = 0
    index = mask_index(masks_dir)
    for i, (f, size) in enumerate(zip(defect_files, sizes)):
        mp = find_mask(masks_dir, f, index)
        if mp is not None:
            masks[i] = resize_mask(read_mask(mp, size), hw[0], hw[1])
            found += 1
    return masks, found


def _check_masks_mark_pixels(masks_dir: Path, masks: np.ndarray, found: int) -> list[str]:
    """Refuse masks that mark no pixel at all (binarised away, e.g. a mask drawn in values <= 127, or defects
    thinner than a model-size cell): the pixel F1 would have no defect pixel to find, and its threshold comes out
    NaN, blamed on the good images. Some empty masks among others: a warning with their count.

    Raises:
        DatasetError: no mask marks a pixel, naming the folder and the binarisation rule.
    """
    marked = int(masks.any(axis=(1, 2)).sum())
    if marked == 0:
        raise DatasetError(f"--masks {masks_dir}: none of the {found} matched mask(s) marks a defect pixel at the "
                           f"model's input size ({MASK_RULE}): check that the masks are white (255) on black")
    if marked < found:
        return [f"--masks {masks_dir}: {found - marked} of {found} matched mask(s) mark no defect pixel at the "
                f"model's input size ({MASK_RULE}); their pixels count as good in the pixel F1"]
    return []


def score_images(backend: Backend, files: Sequence[Path], batch_size: int = 8,
                 desc: str = "scoring") -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(scores, maps at model size, original image sizes) for image files, via the runtime backend."""
    h, w = backend.input_hw
    scores, maps, sizes = [], [], []
    step = max(1, min(batch_size, backend.max_batch))
    for start in tqdm(range(0, len(files), step), desc=desc, unit="batch", leave=False):
        images = [read_image_rgb(p) for p in files[start : start + step]]
        sizes += [im.shape[:2] for im in images]
        s, m = backend.infer(to_model_input(images, h, w))
        scores.append(s)
        maps.append(m)
    return np.concatenate(scores), np.concatenate(maps), sizes


def _strictly_below(t: float) -> float:
    """Decisions are ``score > threshold``; a rule defined with >= t becomes > nextafter(t, -inf)."""
    return float(np.nextafter(np.float32(t), np.float32(-np.inf)))


def inside_gap(t: float, scores: np.ndarray) -> tuple[float, list[float] | None]:
    """A rule defined as ``score >= t`` on calibration scores, as a ``score > threshold`` threshold in the middle of
    the gap below t: every threshold between the next lower calibration score and t decides the calibration images
    alike, and the middle leaves the most room for a slightly weaker defect, or for the score differences between
    backends and precisions (just below t, a defect 1e-5 weaker than the weakest one calibrated would pass).
    Returns (threshold, [lower score, t]); the gap is None when no calibration score lies below t."""
    below = np.asarray(scores, dtype=np.float64)
    below = below[below < t]
    if below.size == 0:
        return _strictly_below(t), None
    lower = float(below.max())
    # the line compares float32 scores: a middle that rounds onto t (a gap of one float32 step) would let t pass
    middle = np.float32((lower + t) / 2)
    if not np.float32(lower) <= middle < np.float32(t):
        return _strictly_below(t), [lower, float(t)]
    return float(middle), [lower, float(t)]


def _refuse_non_finite(files: Sequence[Path], scores: np.ndarray, maps: np.ndarray, option: str) -> None:
    """A NaN or infinite score or map would become (or silently skew) a threshold: name the images instead."""
    bad = [f for f, s, m in zip(files, scores, maps) if not (np.isfinite(s) and np.isfinite(m).all())]
    if bad:
        shown = ", ".join(str(f) for f in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise GradError(f"{option}: the model gives a non-finite score or map for {shown}: check these images "
                        f"and the model (grad-export's parity check)")


def _good_dir_class(folder: Path, classes: Sequence[str]) -> str | None:
    """The bundle class a --good folder belongs to: the last part of its path (as given, made absolute) equal to a
    class name (``DATA/nut/test/good`` -> nut), or None when no part names one."""
    for part in reversed(folder.absolute().parts):
        if part in classes:
            return part
    return None


def _classes_of(bundle: Bundle | None, per_dir: Sequence[tuple[Path, list[Path]]],
                good_files: Sequence[Path]) -> list[str] | None:
    """The bundle class of every distinct good image, or None for a one-class bundle or when a --good folder
    names no class (its images may be of any class)."""
    classes = list(bundle.classes or []) if bundle is not None else []
    if len(classes) < 2:
        return None
    owner: dict[Path, str] = {}
    for folder, files in per_dir:
        cls = _good_dir_class(folder, classes)
        if cls is None:
            return None
        for f in files:
            owner.setdefault(f, cls)
    return [owner[f] for f in good_files]


def class_thresholds(good_classes: Sequence[str], good_scores: np.ndarray, good_maps: np.ndarray,
                     config: CalibrationConfig) -> dict[str, dict[str, Any]]:
    """The good-only rules applied to each class's good images: a unified bundle's one threshold holds its
    false-alarm target over the mix of classes, not for each (a class whose good parts score higher gets more
    false alarms); a line that inspects one class runs at that class's thresholds (``grad-run --class``)."""
    labels = np.asarray(good_classes)
    out = {}
    for cls in sorted(set(good_classes)):
        mine = labels == cls
        threshold, k = far_threshold(good_scores[mine], config.false_alarm_rate)
        pixel = pixel_threshold_good_only(good_maps[mine], config.pixel_false_positive_rate)
        if not (threshold > 0 and pixel > 0):
            raise GradError(f"calibrated thresholds of class {cls} ({threshold}, pixel {pixel}) are not positive: "
                            f"check its --good images")
        out[cls] = {"image_threshold": float(threshold), "pixel_threshold": float(pixel), "n_good": int(mine.sum()),
                    "good_above": k, "false_alarm_rate_upper": binomial_upper_bound(k, int(mine.sum()),
                                                                                    config.confidence),
                    "other_targets": _other_targets(good_scores[mine], config.false_alarm_rate, None)}
    return out


def _other_targets(good_scores: np.ndarray, rate: float, defect_scores: np.ndarray | None) -> list[dict[str, Any]]:
    """The far rule at the other usual targets (threshold, good images above, recall with defects): the trade-off
    a user weighs before choosing --false-alarm-rate."""
    return [{"target": other, "threshold": t, "good_above": k, **rates_at(t, good_scores, defect_scores)}
            for other, (t, k) in far_alternatives(good_scores, rate).items()]


def outlier_warning(files: Sequence[Path], good_scores: np.ndarray, threshold: float, rate: float,
                    what: str = "the image threshold") -> str | None:
    """A warning naming the good images that set a far threshold because they score far above the others
    (:func:`~gradad.calibration.thresholds.outlying_goods`: every good score above the outlier limit), with the
    threshold the rest would give at the same rate; None when the threshold is set by the good parts' spread."""
    idx = outlying_goods(good_scores, threshold)
    if not idx.size:
        return None
    rest = np.ones(len(good_scores), bool)
    rest[idx] = False
    without, _ = far_threshold(good_scores[rest], rate)
    median, p90 = np.quantile(good_scores, [0.5, 0.9])
    named = first_few(f"{files[i]} ({good_scores[i]:.4f})" for i in idx)
    return (f"{what} {threshold:.4f} is set by {idx.size} good image(s) scoring far above the others (above "
            f"{outlier_limit(good_scores):.4f} = median {median:.4f} + 3 x (90th percentile {p90:.4f} - median)): "
            f"{named}. Look at them: a defect among the goods, or an exposure or part the line rarely makes? Without "
            f"them the threshold would be {without:.4f}; if the line does make such parts, keep them and add more "
            "good images like them")


def _input_warnings(bundle: Bundle, good_files: Sequence[tuple[Path, list[Path]]]) -> list[str]:
    """Warnings about the --good folders (each with its image files) given the bundle they calibrate: classes of a
    unified bundle without good images (its one threshold is applied to every class), and the model's own
    training images taken as held-out ones."""
    out = []
    classes = list(bundle.classes or [])
    if len(classes) > 1:
        seen = {_good_dir_class(d, classes) for d, _ in good_files}
        if None not in seen:
            missing = [c for c in classes if c not in seen]
            if missing:
                out.append(f"--good: no good images of class(es) {', '.join(missing)} of this {len(classes)}-class "
                           f"bundle; its one threshold is applied to them too: add --good DIR per class")
        else:  # a folder whose class cannot be told may hold any class: no per-class thresholds
            unnamed = [str(d) for d, _ in good_files if _good_dir_class(d, classes) is None]
            previous = getattr(bundle, "calibration", None)
            before = sorted((previous.classes or {}) if previous else {})
            dropped = (f"; the bundle's per-class thresholds ({', '.join(before)}) are replaced by one threshold"
                       if before else "")
            out.append(f"--good {', '.join(unnamed)}: the path names no class of this {len(classes)}-class bundle "
                       f"({', '.join(classes)}), so no per-class thresholds are set{dropped}: keep good images in "
                       f"folders named by class (DATA/<class>/...) to calibrate each class")
    is_trained = _training_image_check(bundle)
    for d, files in good_files:  # the model trained on these: they score lower than unseen parts
        trained = [f for f in map(Path.resolve, files) if is_trained(f)]
        if trained:
            out.append(f"--good {d}: holds {len(trained)} of the model's training images (e.g. {trained[0]}); "
                       f"a threshold from them is too low for unseen good parts: use held-out good images")
    return out


def _defect_warnings(bundle: Bundle | None, per_dir: Sequence[tuple[Path, list[Path]]], good_files: Sequence[Path],
                     defect_dir: Path, defect_files: Sequence[Path]) -> list[str]:
    """Warnings about the --defect folder given the --good ones: defects of another class than the goods (the f1
    and recall rules would weigh one part's defects against another part's good images), and images that are in
    both (a good part counted as a defect)."""
    out = []
    classes = list(bundle.classes or []) if bundle is not None else []
    if len(classes) > 1:
        defect_class = _good_dir_class(defect_dir, classes)
        good_classes = {_good_dir_class(d, classes) for d, _ in per_dir}
        if defect_class is not None and None not in good_classes and defect_class not in good_classes:
            out.append(f"--defect {defect_dir}: defects of class {defect_class}, but --good holds class(es) "
                       f"{', '.join(sorted(good_classes))}: the f1 and recall thresholds would compare different "
                       f"parts: give --good images of {defect_class}")
    good_digests = {image_digest(f): f for f in good_files}
    both = [(f, good_digests[d]) for f in defect_files if (d := image_digest(f)) in good_digests]
    if both:
        out.append(f"--defect {defect_dir}: {len(both)} of its images are also --good images (e.g. {both[0][0]} = "
                   f"{both[0][1]}): a good part counted as a defect lowers the f1 and recall thresholds")
    return out


def _training_image_check(bundle: Bundle) -> Callable[[Path], bool]:
    """For a resolved image path: is it one of the good images the model trained on?

    Models that record content digests of their training goods (``training_data.trained_good_digests``): any
    byte-identical copy, whatever its name or machine. Older ones, by path: exact where the model file recorded
    the good images it trained on (``trained_goods``, by folder: any dataset layout); before that, anything under
    ``<root>/<class>/train`` of every recorded training root (or the bundle's one data root) except the goods the
    trainer held out for validation (``held_out_goods``)."""
    digests = bundle.training_data.get("trained_good_digests")
    if digests is not None:
        known = set(digests)
        return lambda f: image_digest(f) in known
    recorded = bundle.training_data.get("trained_goods")
    if recorded is not None:
        names = {Path(folder): set(files) for folder, files in recorded.items()}
        return lambda f: f.name in names.get(f.parent, ())
    held_out = set(bundle.training_data.get("held_out_goods", []))
    roots = bundle.training_data.get("data_roots") or ([bundle.data_root] if bundle.data_root else [])
    dirs = [(Path(r) / c / "train").resolve() for r in roots for c in bundle.classes or []]
    return lambda f: str(f) not in held_out and any(f.is_relative_to(t) for t in dirs)


class _Warnings(list):
    """The warnings of one calibration, each logged when added; all are stored in bundle.json."""

    def add(self, message: str | None) -> None:
        if message:
            self.append(message)
            log.warning(message)


@dataclass
class _Scored:
    """Images scored by the backend: their files, image scores, maps at model size and original sizes."""

    files: list[Path]
    scores: np.ndarray
    maps: np.ndarray
    sizes: list[tuple[int, int]]


def _check_options(config: CalibrationConfig, defect_dir: str | Path | None, masks_dir: str | Path | None) -> None:
    """Refuse settings that contradict each other before any image is read."""
    if config.method not in ("far", "f1", "recall"):
        raise GradError(f"--method {config.method!r}: choose far, f1 or recall")
    if not 0 < config.false_alarm_rate < 1:
        raise GradError(f"--false-alarm-rate {config.false_alarm_rate}: must be between 0 and 1")
    check_target_recall(config.target_recall)
    if masks_dir and not defect_dir:
        raise GradError("--masks needs --defect: the masks belong to the defect images")
    if masks_dir and Path(masks_dir).resolve() == Path(defect_dir).resolve():
        # every mask file would be scored as a defect image and found as its own mask
        raise GradError(f"--masks {masks_dir} is the --defect folder: keep the masks in a folder of their own")
    if config.method != "far" and not defect_dir:
        raise GradError(f"--method {config.method} needs labelled defects (--defect DIR)")


def _score(backend: Backend, files: list[Path], option: str, desc: str) -> _Scored:
    """Score ``files``; a non-finite score or map is refused naming ``option``."""
    scores, maps, sizes = score_images(backend, files, desc=desc)
    _refuse_non_finite(files, scores, maps, option)
    return _Scored(files, scores, maps, sizes)


def _defect_rules(backend: Backend, config: CalibrationConfig, defect_dir: str | Path, good: _Scored,
                  rules: dict[str, Any], warn: _Warnings, bundle: Bundle | None,
                  per_dir: Sequence[tuple[Path, list[Path]]]) -> _Scored:
    """Score the labelled defects; add the f1 and recall rules, the far rule's recall and the image AUROC."""
    from gradad.ranking import auroc, best_f1

    defects = _score(backend, list_image_files(defect_dir, "--defect"), "--defect", "defect images")
    for msg in _defect_warnings(bundle, per_dir, good.files, Path(defect_dir), defects.files):
        warn.add(msg)
    if len(defects.files) < FEW_DEFECTS and config.method in ("f1", "recall"):
        warn.add(f"--method {config.method} rests on {len(defects.files)} defect image(s) (fewer than "
                 f"{FEW_DEFECTS}): the threshold may not hold for other defects")
    labels = np.r_[np.zeros(len(good.scores), int), np.ones(len(defects.scores), int)]
    all_scores = np.r_[good.scores, defects.scores]
    f1, t_f1 = best_f1(labels, all_scores)
    t_f1, gap_f1 = inside_gap(t_f1, all_scores)
    t_rec, gap_rec = inside_gap(recall_threshold(defects.scores, config.target_recall), all_scores)
    rules["far"].update(rates_at(rules["far"]["threshold"], good.scores, defects.scores))
    rules["f1"] = {"threshold": t_f1, "f1": f1, "gap": gap_f1, **rates_at(t_f1, good.scores, defects.scores)}
    rules["recall"] = {"threshold": t_rec, "target_recall": config.target_recall, "gap": gap_rec,
                       **rates_at(t_rec, good.scores, defects.scores)}
    rules["image_auroc"] = auroc(labels, all_scores)
    return defects


def _mask_pixel_rule(backend: Backend, masks_dir: str | Path, good: _Scored, defects: _Scored,
                     good_only_threshold: float, warn: _Warnings) -> dict[str, Any]:
    """The pixel threshold with the best pixel F1 over the good maps and the defects' masks."""
    n_defect = len(defects.files)
    masks, found = _read_masks(Path(masks_dir), defects.files, defects.sizes, backend.input_hw)
    if not found:
        raise DatasetError(f"--masks {masks_dir}: no mask matches any defect image (<stem>_mask.png)")
    if found < n_defect:
        warn.add(f"--masks {masks_dir}: {n_defect - found} of {n_defect} defect images have no mask; their pixels "
                 f"count as good in the pixel F1")
    for msg in _check_masks_mark_pixels(Path(masks_dir), masks, found):
        warn.add(msg)
    maps = np.concatenate([good.maps, defects.maps])
    gt = np.concatenate([np.zeros_like(good.maps, bool), masks])
    t_px, f1_px = pixel_threshold_f1(maps, gt)
    return {"threshold": _strictly_below(t_px), "method": "pixel F1-optimal", "pixel_f1": f1_px,
            "good_only_threshold": good_only_threshold, "masks_found": found}


def _class_rules(good_classes: list[str] | None, good: _Scored, config: CalibrationConfig, with_masks: bool,
                 needed: int, warn: _Warnings) -> dict[str, Any] | None:
    """Each class's own thresholds (a unified bundle's --good folders by class), for the good-only rules."""
    if good_classes is None:
        return None
    if config.method != "far" or with_masks:
        log.info("no per-class thresholds: they use the good-only rules (--method far, no --masks)")
        return None
    per_class = class_thresholds(good_classes, good.scores, good.maps, config)
    few = [f"{c} {v['n_good']}" for c, v in per_class.items() if v["n_good"] < needed]
    if few:
        warn.add(f"per-class thresholds rest on few good images ({', '.join(few)}; >= {needed} bound a "
                 f"{config.false_alarm_rate:.1%} rate at {config.confidence:.0%} confidence)")
    return per_class


def _warn_outliers(good: _Scored, threshold: float, good_classes: list[str] | None,
                   per_class: dict[str, Any] | None, rate: float, warn: _Warnings) -> None:
    """A far threshold set by a few unusual good images: name them, for the bundle's threshold (grad-run without
    --class) and for each class's own."""
    groups: list[tuple[str, np.ndarray, float]] = [("the image threshold", np.arange(len(good.scores)), threshold)]
    labels = np.asarray(good_classes) if per_class else None
    groups += [(f"class {cls}: the image threshold", np.flatnonzero(labels == cls), entry["image_threshold"])
               for cls, entry in (per_class or {}).items()]
    for what, mine, t in groups:
        warn.add(outlier_warning([good.files[i] for i in mine], good.scores[mine], t, rate, what))


def calibrate(
    backend: Backend,
    good_dir: str | Path | Sequence[str | Path],
    defect_dir: str | Path | None = None,
    masks_dir: str | Path | None = None,
    config: CalibrationConfig = CalibrationConfig(),
    bundle: Bundle | None = None,
) -> Calibration:
    """Compute thresholds from one or several good-image folders; returns bundle.json's ``calibration`` section.

    ``bundle`` (optional): the bundle being calibrated, whose classes and training data root the --good folders
    are checked against (warnings only). The resolved paths of every calibration image are recorded in
    ``data`` so benchmarks can leave them out of the F1 at the calibrated threshold.
    """
    _check_options(config, defect_dir, masks_dir)
    good_dirs = [good_dir] if isinstance(good_dir, (str, Path)) else list(good_dir)
    per_dir = [(Path(d), list_image_files(d, "--good")) for d in good_dirs]
    listed = [f for _, files in per_dir for f in files]
    good_files, copies = distinct_images(listed)
    warn = _Warnings()
    for msg in _input_warnings(bundle, per_dir) if bundle is not None else ():
        warn.add(msg)
    if copies:
        warn.add(duplicates_warning(len(listed), copies))
    good = _score(backend, good_files, "--good", "good images")
    n, rate = len(good.scores), config.false_alarm_rate
    threshold, k = far_threshold(good.scores, rate)
    upper = binomial_upper_bound(k, n, config.confidence)
    needed = min_images_for_rate(rate, config.confidence)
    if n < needed:
        warn.add(f"calibration set too small for a {rate:.1%} false-alarm rate: {n} good images bound it only to "
                 f"<= {upper:.1%} at {config.confidence:.0%} confidence; use >= {needed} images")
    rules: dict[str, Any] = {"far": {"threshold": threshold, "good_above": k, **rates_at(threshold, good.scores, None),
                                     "false_alarm_rate_upper": upper}}
    pixel = {"threshold": pixel_threshold_good_only(good.maps, config.pixel_false_positive_rate),
             "method": f"good pixels above: {config.pixel_false_positive_rate}"}
    defects = None
    if defect_dir:
        defects = _defect_rules(backend, config, defect_dir, good, rules, warn, bundle, per_dir)
        if masks_dir:
            pixel = _mask_pixel_rule(backend, masks_dir, good, defects, pixel["threshold"], warn)
    rules["far"]["other_targets"] = _other_targets(good.scores, rate, defects.scores if defects else None)
    good_classes = _classes_of(bundle, per_dir, good_files)
    per_class = _class_rules(good_classes, good, config, bool(masks_dir), needed, warn)
    if config.method == "far":
        _warn_outliers(good, threshold, good_classes, per_class, rate, warn)
    active = rules[config.method]["threshold"]
    flagged = float(np.mean(good.scores > active))
    if config.method != "far" and flagged > max(GOOD_FLAGGED_WARNING, rate):
        warn.add(f"--method {config.method}: the threshold {active:.4f} flags {flagged:.0%} of the good calibration "
                 f"images (--method far: {rules['far']['threshold']:.4f}); check that --defect holds defects of the "
                 f"parts in --good")
    if not active > 0:
        raise GradError(f"calibrated image threshold {active} is not positive: check the --good images")
    if not pixel["threshold"] > 0:
        raise GradError(f"calibrated pixel threshold {pixel['threshold']} is not positive (every good map is 0 "
                        f"there?): check the --good images")
    defect_files = defects.files if defects else []
    return Calibration(
        image_threshold=float(active),
        pixel_threshold=float(pixel["threshold"]),
        method=config.method,
        normalisation="normalised_score = score / (2 * image_threshold), so 0.5 = threshold",
        decision="anomalous if score > image_threshold",
        rules=rules,
        pixel=pixel,
        config=asdict(config),
        backend=backend.name,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        data={"good_dirs": [str(d) for d in good_dirs], "n_good": n, "n_good_copies_ignored": len(copies),
              "defect_dir": str(defect_dir) if defect_dir else None,
              "n_defect": len(defect_files), "masks_dir": str(masks_dir) if masks_dir else None,
              "good_score_quantiles": {q: float(np.quantile(good.scores, q)) for q in (0.5, 0.9, 0.99, 1.0)},
              # resolved, so grad-bench accuracy can leave them out of the F1 at this threshold from any folder
              CALIBRATION_IMAGES: [str(f.resolve()) for f in listed] + [str(f.resolve()) for f in defect_files]},
        warnings=list(warn),
        classes=per_class,
    )


def store_calibration(bundle_dir: str | Path, calibration: Calibration) -> Path:
    """Write the calibration into bundle.json (the model files and their hashes are untouched)."""
    bundle = Bundle.load(bundle_dir)
    bundle.calibration = calibration
    return bundle.save()


def calibration_table(cal: Calibration) -> str:
    """Markdown table of the threshold rules with their false-alarm rate and recall."""
    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.1f}%"

    lines = ["| rule | threshold | false alarms (good) | recall (defects) | note |", "|---|---:|---:|---:|---|"]
    for name in ("far", "f1", "recall"):
        r = (cal.rules or {}).get(name)
        if not r:
            continue
        active = " (active)" if name == cal.method else ""
        note = {"far": f"target {pct((cal.config or {}).get('false_alarm_rate'))}, 95% upper bound "
                       f"{pct(r.get('false_alarm_rate_upper'))}",
                "f1": f"F1 {r.get('f1', 0):.3f}",
                "recall": f"target recall {pct(r.get('target_recall'))}"}[name]
        if r.get("gap"):
            note += f"; middle of the gap {r['gap'][0]:.4f} - {r['gap'][1]:.4f}"
        lines.append(f"| {name}{active} | {r['threshold']:.4f} | {pct(r['false_alarm_rate'])} | "
                     f"{pct(r['recall'])} | {note} |")
    others = ((cal.rules or {}).get("far") or {}).get("other_targets")
    if others:
        lines.append(f"\nother false-alarm targets (--false-alarm-rate): {_targets_text(others)}")
    lines.append(f"\npixel threshold {cal.pixel_threshold:.4f} ({(cal.pixel or {}).get('method')})")
    for cls, t in (cal.classes or {}).items():
        lines.append(f"class {cls}: image threshold {t['image_threshold']:.4f}, pixel {t['pixel_threshold']:.4f} "
                     f"({t['n_good']} good images, {t['good_above']} above; 95% upper bound of its false-alarm rate "
                     f"{pct(t['false_alarm_rate_upper'])})"
                     + (f"; other targets: {_targets_text(t['other_targets'])}" if t.get("other_targets") else ""))
    return "\n".join(lines)


def _targets_text(others: Sequence[dict[str, Any]]) -> str:
    """``5% -> 37.2817 (3 good above, recall 91.0%)`` per other target, comma-separated."""
    def one(o: dict[str, Any]) -> str:
        recall = "" if o.get("recall") is None else f", recall {100 * o['recall']:.1f}%"
        return f"{100 * o['target']:g}% -> {o['threshold']:.4f} ({o['good_above']} good above{recall})"
    return ", ".join(one(o) for o in others)
