"""Checkpoint files: the resumable training state and the final model file consumed by eval and export."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from gradad import __version__
from gradad.errors import CheckpointError, ConfigError, GradError
from gradad.files import atomic_file, check_zip_expansion, looks_like_onnx
from gradad.plain import plain_leaf
from gradad.text import one_line, shown_value
from gradad.training.backbone import NAMED_WEIGHTS, FeatureExtractor
from gradad.training.config import RunConfig, config_from_dict, config_to_dict
from gradad.training.model import GRADDetector, GRADModel

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file then rename, so an interrupted write never corrupts the old file.

    ``obj`` must hold plain types and tensors only (see :func:`plain`): every reader loads with
    ``weights_only=True``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as fh:  # a failed write (disk full) leaves neither half a file nor its temporary
            torch.save(obj, fh)
    except (OSError, RuntimeError) as exc:
        if _interrupted(exc):  # Ctrl-C inside the write: torch reports it as a short write ("unexpected pos")
            raise KeyboardInterrupt from None
        cause = _write_failure(exc)
        if cause is None:
            raise
        error = CheckpointWriteError(f"cannot write {path}: {_reason(cause)} (disk full?)")
        error.errno = getattr(cause, "errno", None)
        raise error from None


def _interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt raised inside torch.save's file writes lies behind ``exc``."""
    seen: set[int] = set()
    inner: BaseException | None = exc
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, KeyboardInterrupt):
            return True
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    return False


#: how torch's zip writer reports a write that wrote less than asked (it wraps the OSError of a full disk)
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos|PytorchStreamWriter failed writing|file write failed", re.I)


def _write_failure(exc: BaseException) -> BaseException | None:
    """The error that says why a torch.save failed for want of room (or another OSError of the file system), or
    None for a failure of another kind (a bug, which keeps its traceback). torch raises either the OSError of the
    file object's write itself or a RuntimeError "[enforce fail at inline_container.cc] . unexpected pos ..." whose
    cause or context is that OSError (or that shows it only in its message)."""
    if isinstance(exc, OSError):
        return exc
    for inner in (exc.__cause__, exc.__context__):
        if isinstance(inner, OSError):
            return inner
    return exc if _TORCH_WRITE_FAILURE.search(str(exc)) else None


def _reason(exc: BaseException) -> str:
    """An error's reason in a few words: an OSError's strerror, else the first line of its message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


class CheckpointWriteError(GradError, OSError):
    """A model or checkpoint file that could not be written (full disk): one line naming the file, as every
    GradError; an OSError still, for callers that clean up after a failed write."""


def plain(obj: Any) -> Any:
    """``obj`` as plain Python types and tensors only (what ``torch.load(weights_only=True)`` accepts).

    numpy scalars and arrays become floats/ints/lists, paths strings, tuples lists; anything else that is not a
    str/int/float/bool/None/tensor is refused here, at save time, rather than making the file unreadable.
    """
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, Path) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    leaf = plain_leaf(obj)
    if leaf is not obj:
        return leaf
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)):
        return obj
    raise TypeError(f"checkpoint values must be plain types or tensors, got {type(obj).__name__}")


def model_payload(cfg: RunConfig, model: GRADModel, meta: dict[str, Any]) -> dict[str, Any]:
    """What the final model file holds: config, GRAD weights and everything needed to rebuild the detector.

    Only plain types and tensors, so the file loads with ``torch.load(weights_only=True)``.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "gradad_version": __version__,
        "config": plain(config_to_dict(cfg)),
        "channels": int(model.channels),
        "feat_hw": [int(v) for v in model.feat_hw],
        "state_dict": model.state_dict(),
        **plain(meta),
    }


_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)")


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    """One line refusing a file that needs more than plain types and tensors to load (never executed)."""
    found = _UNSAFE_GLOBAL.search(str(exc))
    what = f"it would call {found.group(1)}" if found else "it holds objects other than tensors and plain values"
    return CheckpointError(f"refusing to load {path}: not a plain gradad weights file ({what}); only tensors and "
                           f"plain values are loaded, no code from a model file ever runs")


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU: a pickle that would import or call anything is refused with one
    :class:`CheckpointError` line naming the file (its code never runs), and so is one too large to print or
    holding a tensor larger than its data (:func:`check_payload_size`)."""
    path = Path(path)
    check_zip_expansion(path, "checkpoint", error=CheckpointError)  # torch.load inflates deflated records whole
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except Exception as exc:
        text = str(exc)[:4000].strip()
        first = one_line(text.splitlines()[0]) if text else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a gradad checkpoint): {first}") from None
    check_payload_size(path, payload)
    return payload


#: Most entries (container items, dict keys and values) and characters of text a model or checkpoint file may hold,
#: counting a shared object each time it is reached, as printing it would. torch.load(weights_only=True) keeps
#: pickle's shared references: a 1.4 KB file can hold a list of 10 references to a list of 10 references ... 6 deep
#: that prints as 14 million characters, and an error message quoting it (or a value inside it) would grow to
#: gigabytes. Real files hold far less: the MTD + tyre unified model (run s21) 2,500 entries and 41,000 characters
#: (state dict ~100 tensors, config ~100 values, 873 trained-image digests, 97 held-out image paths), its
#: resumable checkpoint with optimizer state 2,900 and 45,000; a run on 1,000,000 images would record ~2 million
#: entries and ~100 million characters. The caps leave that room (a file gradad wrote must load again), walk in a few
#: seconds at most, and stop the files that print as gigabytes.
MAX_PAYLOAD_ENTRIES = 10_000_000
MAX_PAYLOAD_TEXT = 256_000_000


def check_payload_size(path: Path, payload: Any) -> None:
    """Refuse (one CheckpointError naming ``path``) a loaded payload that would print as more than
    :data:`MAX_PAYLOAD_ENTRIES` entries or :data:`MAX_PAYLOAD_TEXT` characters (shared references counted each
    time they are reached; a cycle runs into the cap), or that holds a tensor claiming more elements than its
    stored data (a stride-0 view such as ``torch.zeros(1).expand(10**6, 10**6)``: loading it into a model or
    copying it would allocate the size it claims, not the bytes the file holds) or one of another layout than
    dense (sparse)."""
    entries, text = 1, 0
    stack = [payload]
    while stack:  # iterative: a deeply nested payload cannot exhaust the recursion limit
        obj = stack.pop()
        if isinstance(obj, dict):
            entries += 2 * len(obj)
            children: Any = (*obj.keys(), *obj.values()) if entries <= MAX_PAYLOAD_ENTRIES else ()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            entries += len(obj)
            children = obj if entries <= MAX_PAYLOAD_ENTRIES else ()
        else:
            if isinstance(obj, (str, bytes, bytearray)):
                text += len(obj)
            elif isinstance(obj, torch.Tensor):
                _check_tensor_data(path, obj)
            children = ()
        if entries > MAX_PAYLOAD_ENTRIES or text > MAX_PAYLOAD_TEXT:
            what = (f"more than {MAX_PAYLOAD_ENTRIES:,} entries" if entries > MAX_PAYLOAD_ENTRIES
                    else f"more than {MAX_PAYLOAD_TEXT:,} characters of text")
            raise CheckpointError(f"refusing to load {path}: it holds {what} (counting shared references each time "
                                  f"they are reached, as printing does); a gradad model file holds a few thousand")
        stack.extend(children)  # counted before they are pushed: the stack never outgrows the cap


def _check_tensor_data(path: Path, tensor: torch.Tensor) -> None:
    """A dense tensor whose stored data holds every element it claims, else one CheckpointError naming ``path``."""
    if tensor.layout != torch.strided:
        raise CheckpointError(f"refusing to load {path}: it holds a {tensor.layout} tensor; gradad files hold dense "
                              f"tensors only")
    claimed = tensor.numel() * tensor.element_size()
    stored = tensor.untyped_storage().nbytes()
    if claimed > stored:
        raise CheckpointError(f"refusing to load {path}: it holds a tensor of shape {list(tensor.shape)} "
                              f"({claimed:,} bytes) whose stored data is {stored:,} bytes (a broadcast view, "
                              f"never written by gradad)")


def _looks_like_text(path: Path) -> bool:
    """Whether ``path`` starts like a text file: torch.save writes a zip (``PK``) or, in the legacy format, a
    pickle (``0x80``); neither decodes as printable UTF-8."""
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    if not head or head[:2] == b"PK" or head[:1] == b"\x80":
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def check_checkpoint_file(path: str | Path, option: str = "") -> Path:
    """``path`` exists and is no ONNX model (the file users mix up with model.pt), else one CheckpointError line
    (``option``: the flag that named it, as its prefix)."""
    path = Path(path)
    prefix = option + " " if option else ""
    if path.is_dir():
        inside = path / "model.pt"
        hint = f": give {inside}" if inside.is_file() else ": give the model.pt that grad-train wrote"
        raise CheckpointError(f"{prefix}{path} is a folder, not a checkpoint{hint}")
    if not path.is_file():
        raise CheckpointError(f"{prefix}checkpoint not found: {path}")
    if _looks_like_text(path):
        beside = path.parent / "model.pt"
        hint = f"give {beside}" if beside.is_file() and beside != path else "give the model.pt that grad-train wrote"
        raise CheckpointError(f"{prefix}{path} is a text file (a run's config.yaml or a log?), not a training "
                              f"checkpoint: {hint}")
    if looks_like_onnx(path):
        raise CheckpointError(f"{option + ' ' if option else ''}{path} looks like an ONNX model (grad-export's "
                              f"output), not a training checkpoint: give the model.pt from grad-train")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with a clear error for a missing, corrupt or foreign file."""
    path = check_checkpoint_file(path)
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a gradad checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found {shown_value(payload.get('format')) if isinstance(payload, dict) else type(payload).__name__})"
        )
    for key in ("config", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise _misfit(path, payload, f"its {key!r} entry is missing or not a mapping")
    return _upgrade(payload)


def _recorded_paths(payload: dict[str, Any], key: str) -> set[str]:
    return {str(p) for p in payload.get(key) or [] if isinstance(p, str)}


def trained_defect_paths(payload: dict[str, Any]) -> set[str]:
    """Resolved paths of the labelled defect images a model file's training used (its payload; empty when none or
    not recorded): those stage 1 trained on (``trained_defects``) and those held out of stage 1 that picked its
    epoch and fitted the fusion weight (``tuned_defects``). An evaluation must score neither."""
    return _recorded_paths(payload, "trained_defects") | _recorded_paths(payload, "tuned_defects")


def tuned_defect_paths(payload: dict[str, Any]) -> set[str]:
    """Resolved paths of the labelled defects held out of stage 1 for its self-check and the fusion fit (part of
    :func:`trained_defect_paths`), so that results can count them apart."""
    return _recorded_paths(payload, "tuned_defects")


def _misfit(path: str | Path, payload: dict[str, Any], reason: str) -> CheckpointError:
    """The one error for a model file another gradad version wrote, or one damaged or edited by hand."""
    version = payload.get("gradad_version")
    written_by = shown_value(version) if version else "of unknown version"
    return CheckpointError(f"{path} (written by gradad {written_by}) does not fit this gradad {__version__}: "
                           f"{reason}")


#: model settings added after the first checkpoints, with the value that reproduces what those models were
_LEGACY_MODEL_SETTINGS = {"abnormal_mapper": "shared", "abnormal_score": "channel0", "map_scales": [1],
                          "image_gaussian": False, "image_gaussian_stats": "mean_std"}
#: the same for the backbone section (backbone.exposure, session 22): without it, --resume and --normal-from of an
#: older model were refused as "backbone.exposure (None -> 'none')"
_LEGACY_BACKBONE_SETTINGS = {"exposure": "none", "exposure_max_gain": None}  # gain was unlimited before session 24


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """Make a model file written before the separate abnormal mapper, the multi-scale map, the map's own
    refinement setting or the exposure rule load as the model it was: the settings it predates get their old
    values, and a NORMAL-only file drops the unused abnormal weights."""
    backbone_cfg = payload.get("config", {}).get("backbone")
    if isinstance(backbone_cfg, dict):
        for key, old in _LEGACY_BACKBONE_SETTINGS.items():
            backbone_cfg.setdefault(key, old)
    model_cfg = payload.get("config", {}).get("model")
    if isinstance(model_cfg, dict):
        for key, old in _LEGACY_MODEL_SETTINGS.items():
            model_cfg.setdefault(key, old)
        # before the map had its own refinement setting, it used the loss's
        model_cfg.setdefault("map_refine_mask_weight", model_cfg.get("refine_mask_weight", 0.3))
        best = payload.get("best")  # a resumable checkpoint's best epoch so far
        scales = model_cfg.get("map_scales")  # anything but a list is refused with the config, by name
        for state in (payload.get("state_dict"), best.get("state") if isinstance(best, dict) else None):
            if isinstance(state, dict) and "map_scale_gain" not in state and isinstance(scales, (list, tuple)):
                state["map_scale_gain"] = torch.ones(len(scales))  # written before the multi-scale map
        if model_cfg.get("abnormal_branch") is False and isinstance(payload.get("state_dict"), dict):
            payload["state_dict"] = {k: v for k, v in payload["state_dict"].items()
                                     if not k.startswith(("abnormal_grid.", "abnormal_cnn.", "abnormal_mapper."))}
    return payload


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[GRADDetector, dict[str, Any]]:
    """Rebuild the eval-mode detector (extractor + GRAD model + head) from a model file.

    The extractor's weights come from the backbone config, or from ``extractor_state_dict`` when the file embeds
    them (see :func:`self_contained_payload`).
    """
    payload = read_checkpoint(path)
    try:
        detector = _build_detector(path, payload)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, ConfigError) as exc:
        raise _misfit(path, payload, f"{type(exc).__name__}: {one_line(str(exc))}") from None
    return detector.to(device).eval(), payload


def _build_detector(path: str | Path, payload: dict[str, Any]) -> GRADDetector:
    """The detector a checkpoint's payload describes, on the CPU (sets ``payload["resolved_config"]``)."""
    cfg = config_from_dict(payload["config"])
    try:  # before anything is built: these settings size what the model allocates and shape its maps
        cfg.check_model_settings()
    except ConfigError as exc:
        raise CheckpointError(f"refusing to load {path}: {exc}") from None
    embedded = payload.get("extractor_state_dict")
    if ":" in cfg.backbone.name:
        # a model file is data: opening one never fetches a repository or folder it names (hf-hub:OWNER/REPO,
        # local-dir:PATH); a plain timm name with weights "hub" (the paper preset) loads timm's own weights
        raise CheckpointError(f"{path} names its backbone {shown_value(cfg.backbone.name)}, a location rather than "
                              f"a timm model: loading a model file never downloads from a repository it names")
    if embedded is None:
        if cfg.backbone.weights not in NAMED_WEIGHTS:
            # a model file is data: opening one never reads another file it names (a hostile one could name any
            # file of the user's; the error would even tell whether it exists)
            raise CheckpointError(
                f"{path} names a backbone weights file ({shown_value(cfg.backbone.weights)}) instead of holding the "
                f"extractor: loading a model file never reads a file it names. grad-train now writes the extractor "
                f"into models trained on a weights file: re-write this one where it was trained with `grad-train "
                f"--config RUN/config.yaml --resume` (refits only the last stage)")
        extractor = FeatureExtractor(cfg.backbone)
    else:  # self-contained file (refinement bundles): no weights package or training-machine path needed
        backbone_log = logging.getLogger("gradad.training.backbone")
        level = backbone_log.level
        backbone_log.setLevel(logging.ERROR)  # its "random weights" warning does not apply: loaded just below
        try:
            extractor = FeatureExtractor(dataclasses.replace(cfg.backbone, weights="none"))
        finally:
            backbone_log.setLevel(level)
        extractor.load_state_dict(embedded)
    if extractor.channels != payload["channels"]:
        raise CheckpointError(
            f"{path}: model was trained on {shown_value(payload['channels'])} feature channels but backbone "
            f"{shown_value(cfg.backbone.name)} gives {extractor.channels}"
        )
    feat_hw = tuple(payload["feat_hw"])
    _check_feature_size(path, cfg, extractor, feat_hw)
    _check_weight_shapes(path, payload, cfg, feat_hw)
    model = GRADModel(payload["channels"], feat_hw, cfg.model)
    model.load_state_dict(payload["state_dict"])
    gaussian = model.image_gaussian
    if gaussian is not None and gaussian.fitted and gaussian.dims(payload["channels"]) != gaussian.mean.shape[1]:
        raise CheckpointError(f"{path}: its image Gaussian has {gaussian.mean.shape[1]} dimensions, but "
                              f"model.image_gaussian_stats = {gaussian.stats!r} of {payload['channels']} channels "
                              f"gives {gaussian.dims(payload['channels'])} (a config edited after the fit?)")
    if gaussian is not None and not gaussian.fitted:
        log.warning("%s: model.image_gaussian is on but the file holds no fitted image Gaussian (written before "
                    "training finished?): the image score is the map's alone", path)
    size = cfg.data.image_size
    payload["resolved_config"] = cfg
    return GRADDetector(extractor, model, (size, size))


def _check_feature_size(path: str | Path, cfg: RunConfig, extractor: FeatureExtractor,
                        feat_hw: tuple[Any, ...]) -> None:
    """The file's ``feat_hw`` is the feature map its backbone gives at ``data.image_size`` (the grids are sized by
    it), else one CheckpointError naming both."""
    stride = min(extractor.body.feature_info.reduction())  # the output's stride: its coarser level is up-sampled
    side = -(-cfg.data.image_size // stride)  # "same" padding: ceil(size / stride) (data.image_size % 16 == 0)
    if feat_hw != (side, side):
        raise CheckpointError(f"refusing to load {path}: its feat_hw {shown_value(list(feat_hw))} is not the "
                              f"feature map of data.image_size = {cfg.data.image_size} at backbone "
                              f"{shown_value(cfg.backbone.name)}'s stride {stride} ([{side}, {side}])")


#: weights whose shapes the file sets itself: the image Gaussian takes its classes and dimensions from the file
#: (its buffers are sized like the file's tensors, which check_payload_size found to hold their data)
_FILE_SIZED_WEIGHTS = ("image_gaussian.",)


def _check_weight_shapes(path: str | Path, payload: dict[str, Any], cfg: RunConfig, feat_hw: tuple[int, ...]) -> None:
    """Every weight of the model the file's settings describe is in its state dict with the same shape, before the
    model is built: the model allocates (and initialises) its grids at the size the settings ask for, and only
    ``load_state_dict`` compared them with the file's, after the allocation. The file's tensors hold their data
    (:func:`check_payload_size`), so the model then allocates no more than the file already holds. The expected
    shapes come from the same model built on the meta device (no memory); a weight missing or of another shape
    fails ``load_state_dict`` anyway, so this refuses no file that loaded before, only sooner."""
    with torch.device("meta"):
        expected = GRADModel(payload["channels"], feat_hw, cfg.model).state_dict()
    state = payload["state_dict"]
    for key, want in expected.items():
        # num_batches_tracked: a scalar the settings do not size, which load_state_dict fills in when a plain-dict
        # state (no _metadata: a NORMAL-only file after _upgrade, a converted one) lacks it
        if key.startswith(_FILE_SIZED_WEIGHTS) or key.endswith("num_batches_tracked"):
            continue
        have = state.get(key)
        if not isinstance(have, torch.Tensor):
            raise _misfit(path, payload, f"its state_dict lacks the weight {key} that its settings give the model")
        if tuple(have.shape) != tuple(want.shape):
            raise _misfit(path, payload, f"its weight {key} has shape {list(have.shape)}, but its settings "
                                         f"({_settings_of(key)}) give {list(want.shape)}")


def _settings_of(key: str) -> str:
    """The settings a weight's shape follows, for the message of :func:`_check_weight_shapes`."""
    if key.endswith(".local_grid"):
        return "model.local_grid_size, channels"
    if key.endswith(".global_grid"):
        return "model.global_grid_size, feat_hw from data.image_size, channels"
    return "channels and model settings"


#: What a model file records about the training machine's files by path: a copy that travels in a bundle keeps
#: none of them (the bundle names no training image or folder; README "training images").
_MACHINE_PATH_KEYS = ("data_roots", "trained_goods", "held_out_goods", "normal_branch_from")


def self_contained_payload(path: str | Path) -> dict[str, Any]:
    """The model file at ``path`` plus the extractor's weights, so it loads without the backbone weight source;
    for a bundle, so without the training machine's paths: its labelled defects are named by content
    (``digest:...``, which grad-refine tune and the benchmarks match as they matched the paths)."""
    from gradad.data.tuning_split import DIGEST_PREFIX

    detector, payload = load_detector(path)
    payload.pop("resolved_config", None)
    payload["extractor_state_dict"] = detector.extractor.state_dict()
    for key in _MACHINE_PATH_KEYS:
        payload.pop(key, None)
    payload["config"] = _without_machine_paths(payload["config"])
    for key in ("trained_defects", "tuned_defects"):
        if payload.get(key) is not None:
            payload[key] = [DIGEST_PREFIX + d for d in _defect_digests(path, key, payload[key])]
    return payload


def _without_machine_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The run's config with its folders (dataset roots, cache, labelled defects, output) put back to the
    defaults: they locate the training machine's files and mean nothing where the bundle goes."""
    from gradad.training.config import DataConfig, RunConfig

    config = copy.deepcopy(config)
    data, defaults = config.get("data", {}), DataConfig()
    for key in ("root", "extra_roots", "cache_dir", "defects", "defect_masks"):
        if key in data:
            data[key] = copy.deepcopy(getattr(defaults, key))
    if "output_dir" in config:
        config["output_dir"] = RunConfig().output_dir
    return config


def _defect_digests(path: str | Path, key: str, files: list[str]) -> list[str]:
    """Content digests of the recorded defect files still readable here (a missing one is named in a warning:
    without it, that image may be scored or tuned on as if the model had never seen it)."""
    from gradad.bundle import image_digest

    readable = [f for f in files if Path(f).is_file()]
    if len(readable) < len(files):
        log.warning("%s: %d of its %d %s are no longer readable here, so the bundle cannot name them: run "
                    "grad-refine prepare where the training data is", path, len(files) - len(readable), len(files),
                    key.replace("_", " "))
    return sorted({image_digest(f) for f in readable})
