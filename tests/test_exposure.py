"""backbone.exposure = "gain": every image brought to the same mean grey level inside the extractor, so training,
the exported graph and F2PAD see the same input (session 22's screen: MTD's capture groups differ in exposure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradad.errors import ConfigError
from gradad.training.backbone import EXPOSURE_LEVEL, ExposureGain, FeatureExtractor
from gradad.training.config import BackboneConfig, preset_config
from gradad.training.features import cache_key, to_tensor


def _texture(level: float, seed: int = 0) -> np.ndarray:
    """A 64x64 RGB texture of mean grey ``level`` that stays within 0..255 when darkened."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (64, 64, 3)).cumsum(axis=0).cumsum(axis=1)
    noise = (noise - noise.mean()) / noise.std()
    return np.clip(level + 25 * noise, 0, 255)


@pytest.fixture(scope="module")
def extractors() -> tuple[FeatureExtractor, FeatureExtractor]:
    return FeatureExtractor(BackboneConfig(exposure="gain")), FeatureExtractor(BackboneConfig())


def _input_level(extractor: FeatureExtractor, images: np.ndarray) -> list[float]:
    """Mean grey level (0..1) of what the backbone sees for each of ``images`` (uint8 NHWC)."""
    x = to_tensor(images, extractor.mean, extractor.std)
    std, mean = x.new_tensor(extractor.std).view(1, 3, 1, 1), x.new_tensor(extractor.mean).view(1, 3, 1, 1)
    with torch.no_grad():
        return (extractor.normalise_exposure(x) * std + mean).mean(dim=(1, 2, 3)).tolist()


def test_a_limited_gain_evens_moderate_exposures_and_leaves_a_dark_part_near_its_own_level() -> None:
    """exposure_max_gain = 3: an image at 0.3 or 0.7 of full grey reaches the target level as with the unlimited rule
    (the default); a dark part (MVTec 3D's tyres sit at ~0.08) is brightened 3x, not 6x (which clipped its
    highlights and cost PatchCore's tyre 5 image AUROC in session 24's screen)."""
    limited = FeatureExtractor(BackboneConfig(exposure="gain", exposure_max_gain=3.0))
    unlimited = FeatureExtractor(BackboneConfig(exposure="gain"))
    assert limited.exposure.max_gain == 3.0 and unlimited.exposure.max_gain is None
    moderate = np.stack([_texture(0.3 * 255, seed=1), _texture(0.7 * 255, seed=2)]).round().astype(np.uint8)
    for extractor in (limited, unlimited):
        assert _input_level(extractor, moderate) == pytest.approx([EXPOSURE_LEVEL] * 2, abs=3e-3)
    dark = np.clip(_texture(128.0, seed=4) * 0.16, 0, 255).round().astype(np.uint8)[None]  # level ~0.08
    level = float(dark.mean()) / 255.0
    assert _input_level(limited, dark)[0] == pytest.approx(3.0 * level, rel=1e-3)
    assert _input_level(unlimited, dark)[0] == pytest.approx(EXPOSURE_LEVEL, abs=3e-3)
    bright = np.full((1, 64, 64, 3), 250, np.uint8)  # over-exposed: darkened by at most 1/1.5
    assert _input_level(FeatureExtractor(BackboneConfig(exposure="gain", exposure_max_gain=1.5)), bright)[0] == \
        pytest.approx(max(250 / 255 / 1.5, EXPOSURE_LEVEL), rel=1e-3)


@pytest.mark.parametrize("value", [0.5, 1000.0, True, float("nan")])
def test_an_out_of_range_gain_limit_is_refused_naming_the_setting(value) -> None:
    cfg = preset_config("edge")
    cfg.backbone.exposure, cfg.backbone.exposure_max_gain = "gain", value
    with pytest.raises(ConfigError, match="backbone.exposure_max_gain"):
        cfg.validate()
    with pytest.raises(ConfigError, match="backbone.exposure_max_gain"):
        FeatureExtractor(cfg.backbone)


def test_a_limit_without_the_gain_is_refused_rather_than_stored_unused() -> None:
    cfg = preset_config("edge")
    cfg.backbone.exposure_max_gain = 3.0
    with pytest.raises(ConfigError, match="backbone.exposure_max_gain.*limits backbone.exposure=gain only"):
        cfg.validate()
    with pytest.raises(ConfigError, match="max_gain"):
        ExposureGain((0.5,) * 3, (0.5,) * 3, 0.0)


def test_the_gain_limit_is_read_from_a_set_option_including_null() -> None:
    from gradad.training.config import apply_set_options

    cfg = apply_set_options(preset_config("edge"), ["backbone.exposure=gain", "backbone.exposure_max_gain=3"])
    assert cfg.backbone.exposure_max_gain == 3.0
    cfg = apply_set_options(cfg, ["backbone.exposure_max_gain=null"])
    assert cfg.backbone.exposure_max_gain is None
    cfg.validate()


def test_gain_makes_the_features_blind_to_a_global_exposure_change(extractors) -> None:
    gain, none = extractors
    bright = _texture(140.0)
    images = np.stack([bright, bright * 0.6]).round().astype(np.uint8)
    x = to_tensor(images, gain.mean, gain.std)
    with torch.no_grad():
        g, n = gain(x), none(x)
    rel = lambda f: float((f[0] - f[1]).norm() / f[0].norm())  # noqa: E731
    assert rel(g) < 0.1 and rel(n) > 3 * rel(g)  # uint8 rounding of the darkened image stays
    # the normalised input has the target mean grey level; a black frame stays black and finite
    std, mean = x.new_tensor(gain.std).view(1, 3, 1, 1), x.new_tensor(gain.mean).view(1, 3, 1, 1)
    rgb = gain.normalise_exposure(x) * std + mean
    assert rgb.mean(dim=(1, 2, 3)) == pytest.approx([EXPOSURE_LEVEL] * 2, abs=2e-3)
    black = to_tensor(np.zeros((1, 64, 64, 3), np.uint8), gain.mean, gain.std)
    with torch.no_grad():
        assert torch.isfinite(gain(black)).all()


def test_unknown_exposure_rule_is_refused_naming_the_setting() -> None:
    cfg = preset_config("edge")
    cfg.backbone.exposure = "auto"
    with pytest.raises(ConfigError, match="backbone.exposure"):
        cfg.validate()


def test_cache_key_tells_the_rules_apart_and_keeps_old_keys(extractors, tmp_path: Path) -> None:
    from gradad.data.datasets import Sample

    gain, none = extractors
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    samples = [Sample(image_path=image, class_name="c", split="train", label=0, defect_type="good", mask_path=None)]
    assert cache_key(gain, 64, samples) != cache_key(none, 64, samples)
    limited = FeatureExtractor(BackboneConfig(exposure="gain", exposure_max_gain=2.0))
    assert cache_key(limited, 64, samples) not in (cache_key(gain, 64, samples), cache_key(none, 64, samples))
    # "none" keeps the identity of caches written before the option existed (no 'exposure' key in it)
    from gradad.training.features import cache_identity

    assert "exposure" not in cache_identity(none, 64, samples)
    assert cache_identity(gain, 64, samples)["exposure"] == "gain"
    # the unlimited gain keeps the key of caches written before the limit existed (session 22)
    assert "exposure_max_gain" not in cache_identity(gain, 64, samples)
    assert cache_identity(limited, 64, samples)["exposure_max_gain"] == 2.0


def test_a_gain_model_exports_with_parity_and_records_its_rule(tiny_demo_root: Path, tmp_path: Path) -> None:
    """Train a tiny model with exposure gain, export it (the export's parity gate compares ONNX Runtime with
    PyTorch), and check the bundle records the rule and the graph scores a darkened good image like the original."""
    from gradad.bundle import Bundle
    from gradad.export.onnx_export import ExportOptions, export_bundle
    from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from gradad.training.trainer import train

    cfg = preset_config("tiny")
    cfg.backbone.exposure, cfg.backbone.exposure_max_gain = "gain", 1.2  # active: these images need 0.86-1.78x
    cfg.data.root = str(tiny_demo_root)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.output_dir = str(tmp_path / "run")
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 0, 2
    cfg.model.abnormal_branch = False
    bundle_dir = export_bundle(train(cfg), tmp_path / "bundle", ExportOptions(parity_max_images=8))
    backbone_record = Bundle.load(bundle_dir).backbone
    assert (backbone_record.exposure, backbone_record.exposure_max_gain) == ("gain", 1.2)
    from gradad.export.cli import summary_text

    assert "(exposure gain, at most 1.2x)" in summary_text(bundle_dir)
    # its nodes are named, and the precision rule keeps them FP32 in the FP16 graph and TensorRT engines
    import onnx

    from gradad.export.precision import keeps_fp32_name

    names = [n.name for n in onnx.load(str(bundle_dir / "model.onnx")).graph.node if "/extractor/exposure/" in n.name]
    assert names and all(keeps_fp32_name(n) for n in names)
    backend = OnnxRuntimeBackend(bundle_dir / "model.onnx", ["cpu"], threads=1)
    h, w = backend.input_hw
    good = _texture(120.0, seed=3)[:h, :w]
    batch = np.stack([good, good * 0.9]).round().astype(np.uint8)  # both within the 1.2x limit of the target
    from gradad.runtime.preprocess import to_model_input

    scores, _ = backend.infer(to_model_input(list(batch), h, w))
    assert scores[1] == pytest.approx(scores[0], rel=0.1)
    # a limit outside [1, 255] in bundle.json is refused by name
    import json

    from gradad.bundle import BundleError

    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    for bad in (0.5, float("nan")):  # NaN passes the schema's bounds
        manifest["backbone"]["exposure_max_gain"] = bad
        (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match="exposure_max_gain"):
            Bundle.load(bundle_dir)


def test_a_model_saved_before_the_option_resumes_and_lends_its_branch_unrefused(trained_tiny: Path,
                                                                                 tmp_path: Path) -> None:
    """Stored configs of older models lack backbone.exposure: read_checkpoint gives it its old value, so --resume
    and --normal-from of such a model are not refused for a setting that did not exist (they were, as None ->
    'none'); a real change of the rule is still named, and a setting whose default changed the behaviour is not
    filled (such a model is still refused)."""
    from gradad.training.checkpoint import read_checkpoint
    from gradad.training.config import config_to_dict
    from gradad.training.trainer import config_differences

    payload = torch.load(trained_tiny, weights_only=True)
    del payload["config"]["backbone"]["exposure"]
    del payload["config"]["backbone"]["exposure_max_gain"]
    del payload["config"]["data"]["defect_holdout"]
    old = tmp_path / "old_model.pt"
    torch.save(payload, old)
    stored = read_checkpoint(old)["config"]
    assert stored["backbone"]["exposure"] == "none"
    assert stored["backbone"]["exposure_max_gain"] is None  # gain was unlimited then
    assert "defect_holdout" not in stored["data"]
    current = config_to_dict(preset_config("tiny"))
    assert not [d for d in config_differences(stored, current) if d.key.startswith("backbone.")]
    current["backbone"]["exposure"] = "gain"
    assert [d.key for d in config_differences(stored, current) if d.key.startswith("backbone.")] == \
        ["backbone.exposure"]
    # the limit is a setting of its own: a model trained unlimited is not resumed or lent under a limit
    current["backbone"]["exposure_max_gain"] = 3.0
    assert [d.key for d in config_differences(stored, current) if d.key.startswith("backbone.")] == \
        ["backbone.exposure", "backbone.exposure_max_gain"]


@pytest.mark.parametrize("max_gain", [None, 2.0])
def test_the_exported_gain_matches_torch_at_full_size(tmp_path: Path, max_gain: float | None) -> None:
    """At 256 x 256 one ReduceMean over all 196k values accumulated enough float32 rounding in ONNX Runtime to fail
    the export's parity gate on the headline model; the staged mean keeps the exported gain at float32 precision."""
    import onnxruntime as ort

    module = ExposureGain((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), max_gain).eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-0.9, -0.3, (2, 3, 256, 256)).astype(np.float32))  # dark frames: gain ~3
    path = tmp_path / "gain.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    assert np.abs(got - want).max() < 2e-6
    # the mean is taken one axis at a time (no ReduceMean over all 196k values at once)
    import onnx

    reductions = [n for n in onnx.load(str(path)).graph.node if n.op_type == "ReduceMean"]
    axes = [list(onnx.helper.get_attribute_value(a)) for n in reductions for a in n.attribute if a.name == "axes"]
    assert len(reductions) == 3 and sorted(map(len, axes)) == [1, 1, 1]
