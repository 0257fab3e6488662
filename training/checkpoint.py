"""Checkpoint files: the resumable training state and the final model file consumed by eval and export."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from gradad import __version__
from gradad.errors import CheckpointError
from gradad.training.backbone import FeatureExtractor
from gradad.training.config import RunConfig, config_from_dict, config_to_dict
from gradad.training.model import GRADDetector, GRADModel

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file then rename, so an interrupted write never corrupts the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_payload(cfg: RunConfig, model: GRADModel, meta: dict[str, Any]) -> dict[str, Any]:
    """What the final model file holds: config, GRAD weights and everything needed to rebuild the detector."""
    return {
        "format": CHECKPOINT_FORMAT,
        "gradad_version": __version__,
        "config": config_to_dict(cfg),
        "channels": model.channels,
        "feat_hw": list(model.feat_hw),
        "state_dict": model.state_dict(),
        **meta,
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict with a clear error for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a gradad checkpoint): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a gradad checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found {payload.get('format') if isinstance(payload, dict) else type(payload).__name__})"
        )
    return payload


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[GRADDetector, dict[str, Any]]:
    """Rebuild the eval-mode detector (extractor + GRAD model + head) from a model file.

    The extractor's weights come from the backbone config, or from ``extractor_state_dict`` when the file embeds
    them (see :func:`self_contained_payload`).
    """
    payload = read_checkpoint(path)
    cfg = config_from_dict(payload["config"])
    embedded = payload.get("extractor_state_dict")
    if embedded is None:
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
            f"{path}: model was trained on {payload['channels']} feature channels but backbone "
            f"{cfg.backbone.name} gives {extractor.channels}"
        )
    model = GRADModel(payload["channels"], tuple(payload["feat_hw"]), cfg.model)
    model.load_state_dict(payload["state_dict"])
    size = cfg.data.image_size
    detector = GRADDetector(extractor, model, (size, size)).to(device).eval()
    payload["resolved_config"] = cfg
    return detector, payload


def self_contained_payload(path: str | Path) -> dict[str, Any]:
    """The model file at ``path`` plus the extractor's weights, so it loads without the backbone weight source."""
    detector, payload = load_detector(path)
    payload.pop("resolved_config", None)
    payload["extractor_state_dict"] = detector.extractor.state_dict()
    return payload
