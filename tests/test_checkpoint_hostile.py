"""Hostile model files (security review): a payload that prints as gigabytes through shared references, values
too long to quote, and settings or tensors that would make the model allocate far more than the file holds. Each is
refused fast, in one short line naming the file (and the setting at fault); a real small model file still loads."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from gradad.errors import CheckpointError, ConfigError
import gradad.training.checkpoint as checkpoint_module
from gradad.training.checkpoint import load_detector, model_payload, read_checkpoint
from gradad.text import shown_value
from gradad.training.config import MAX_GRID_SIZE, MAX_IMAGE_SIZE, preset_config
from gradad.training.model import GRADModel

#: what an error line may take: a few hundred characters of message plus the file's path
SHORT = 2000
#: seconds a refusal may take on a busy machine (the walk over a million entries takes well under one)
FAST = 20.0


@pytest.fixture(scope="module")
def channels() -> int:
    from gradad.training.backbone import FeatureExtractor

    cfg = preset_config("tiny")
    cfg.backbone.weights = "none"
    return FeatureExtractor(cfg.backbone).channels


def _small_model(channels: int) -> dict[str, Any]:
    """A real tiny-preset model file's payload (random extractor weights, 64 px images: 8 x 8 features)."""
    cfg = preset_config("tiny")
    cfg.backbone.weights = "none"
    return model_payload(cfg, GRADModel(channels, (8, 8), cfg.model), {})


def _save(payload: Any, tmp_path: Path, name: str = "model.pt") -> Path:
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _refusal(call, path: Path, *args: Any) -> str:
    """The one CheckpointError line ``call(path)`` raises, checked to be short, fast and to name the file."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        call(path, *args)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert len(message) < SHORT, message[:SHORT]
    assert str(path) in message
    assert elapsed < FAST
    return message


def _bomb(depth: int = 6, width: int = 10) -> list:
    """A list of ``width`` references to a list of ``width`` references ... ``depth`` deep: 1.4 KB as a pickle,
    ~14 million characters printed (the tests lower the entry cap to 1,000,000 so the walk stays short; depth 7
    against the real cap takes ~5 s per refusal on 2 cores)."""
    node: Any = "shared-leaf"
    for _ in range(depth):
        node = [node] * width
    return node


# ----------------------------------------------------------------------------- A. values that print too large


@pytest.mark.parametrize("where", ["format", "gradad_version", "config"])
def test_a_shared_reference_bomb_is_refused_fast_in_one_short_line(tmp_path: Path, where: str,
                                                                  monkeypatch) -> None:
    monkeypatch.setattr(checkpoint_module, "MAX_PAYLOAD_ENTRIES", 1_000_000)
    payload: dict[str, Any] = {"format": 1, "config": {}, "state_dict": {}}
    if where == "format":
        payload["format"] = _bomb()  # quoted by the format check
    elif where == "gradad_version":
        payload["gradad_version"], payload["config"] = _bomb(), []  # quoted by the misfit message
    else:
        payload["config"] = {"model": {"fusion_block": _bomb()}}  # quoted by the config's own checks
    path = _save(payload, tmp_path)
    assert path.stat().st_size < 4096
    for call in (read_checkpoint, load_detector):
        message = _refusal(call, path)
        assert "more than 1,000,000 entries" in message


def test_a_payload_that_holds_itself_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint_module, "MAX_PAYLOAD_ENTRIES", 1_000_000)
    loop: list = []
    loop.append(loop)
    path = _save({"format": 1, "config": {}, "state_dict": {}, "held_out_goods": loop}, tmp_path)
    assert "entries" in _refusal(read_checkpoint, path)


@pytest.mark.parametrize("value", ["x" * 100_000, ["y" * 1000] * 1000], ids=["text", "list"])
def test_values_from_the_file_are_shortened_in_messages(tmp_path: Path, value: Any) -> None:
    """Below the caps but long: the format check and the misfit message quote the value shortened."""
    path = _save({"format": value}, tmp_path, "format.pt")
    _refusal(read_checkpoint, path)
    path = _save({"format": 1, "gradad_version": value, "config": [], "state_dict": {}}, tmp_path, "version.pt")
    assert "does not fit this gradad" in _refusal(read_checkpoint, path)


def test_the_shortened_form_of_any_value_is_short() -> None:

    assert shown_value("edge") == "'edge'" and shown_value([1, 3, 5, 7]) == "[1, 3, 5, 7]"
    for value in ("x" * 100_000, _bomb(), {str(i): "v" * 1000 for i in range(1000)}, 10**5000, torch.zeros(10**6)):
        assert len(shown_value(value)) < 300
    assert shown_value(10**5000) == "<integer of 16610 bits>"  # repr itself refuses past 4300 digits


def test_a_long_backbone_name_is_shortened(tmp_path: Path, channels: int) -> None:
    payload = _small_model(channels)
    payload["config"]["backbone"]["name"] = "hf-hub:" + "z" * 200_000
    assert "never downloads" in _refusal(load_detector, _save(payload, tmp_path))


# ----------------------------------------------------------------------------- B. sizes allocated before the check


@pytest.mark.parametrize(("section", "key", "value"), [
    ("model", "local_grid_size", 100_000),
    ("model", "global_grid_size", 100_000),
    ("data", "image_size", 800_000),
    ("model", "fusion_depth", 200),  # above the bound of 64
])
def test_a_setting_asking_for_a_huge_model_is_refused_before_allocating(tmp_path: Path, channels: int,
                                                                        section: str, key: str, value: int) -> None:
    payload = _small_model(channels)
    payload["config"][section][key] = value
    if key == "image_size":  # consistent with its features, so that only the size itself is at fault
        payload["feat_hw"] = [value // 8, value // 8]
    message = _refusal(load_detector, _save(payload, tmp_path))
    assert f"{section}.{key} = {value}" in message


@pytest.fixture
def real_model_builds(monkeypatch) -> list[str]:
    """The devices GRADModel is built on while a model file is loaded: a refusal must come before any build that
    allocates (the weight-shape check's build on the meta device allocates nothing)."""
    devices: list[str] = []
    original = GRADModel.__init__

    def spy(self, *args: Any, **kwargs: Any) -> None:
        devices.append(torch.empty(0).device.type)  # the default device the build allocates on
        original(self, *args, **kwargs)

    monkeypatch.setattr(GRADModel, "__init__", spy)
    return devices


def test_a_grid_the_bounds_allow_but_the_file_lacks_is_refused_without_a_real_build(
        tmp_path: Path, channels: int, real_model_builds: list[str]) -> None:
    """Settings within the bounds (global grid 64: C * 64 * 64^2 floats per grid, ~1.5 GB at lite0's 152
    channels) whose weights the file does not hold: only the meta-device build happens before the refusal."""
    payload = _small_model(channels)
    payload["config"]["model"]["global_grid_size"] = MAX_GRID_SIZE
    path = _save(payload, tmp_path)
    real_model_builds.clear()  # _small_model built the file's own model
    message = _refusal(load_detector, path)
    assert "global_grid" in message
    assert real_model_builds and set(real_model_builds) == {"meta"}


def test_feat_hw_must_be_what_the_image_size_gives(tmp_path: Path, channels: int) -> None:
    payload = _small_model(channels)
    payload["feat_hw"] = [100_000, 100_000]  # a global grid of C * 10^10 * R_g^2 values
    message = _refusal(load_detector, _save(payload, tmp_path))
    assert "feat_hw" in message and "data.image_size = 64" in message and "[8, 8]" in message


def test_a_grid_of_another_shape_than_the_settings_give_is_named(tmp_path: Path, channels: int) -> None:
    """Within the bounds but not what the weights hold: refused before the model is built, naming the setting."""
    payload = _small_model(channels)
    payload["config"]["model"]["local_grid_size"] = MAX_GRID_SIZE
    message = _refusal(load_detector, _save(payload, tmp_path))
    assert "normal_grid.local_grid" in message and "model.local_grid_size" in message


def test_a_missing_grid_is_refused_before_the_model_is_built(tmp_path: Path, channels: int) -> None:
    payload = _small_model(channels)
    del payload["state_dict"]["normal_grid.global_grid"]
    message = _refusal(load_detector, _save(payload, tmp_path))
    assert "lacks the weight normal_grid.global_grid" in message


def test_a_broadcast_tensor_claiming_terabytes_is_refused(tmp_path: Path, channels: int) -> None:
    """Settings and weight shapes that agree, both at the bounds, but the grids are stride-0 views of one stored
    value: the file is small, the model would allocate C * 512^2 * 64^2 floats per grid (terabytes)."""
    payload = _small_model(channels)
    payload["config"]["data"]["image_size"] = MAX_IMAGE_SIZE
    payload["config"]["model"]["global_grid_size"] = MAX_GRID_SIZE
    side = MAX_IMAGE_SIZE // 8
    payload["feat_hw"] = [side, side]
    for grid in ("normal_grid", "abnormal_grid"):
        payload["state_dict"][f"{grid}.global_grid"] = torch.zeros(1).expand(
            1, channels * side * side, MAX_GRID_SIZE, MAX_GRID_SIZE)
    path = _save(payload, tmp_path)
    assert path.stat().st_size < 10_000_000
    for call in (read_checkpoint, load_detector):
        assert "stored data" in _refusal(call, path)


def test_the_bounds_are_validated_and_the_presets_within_them() -> None:
    for name in ("edge", "paper", "tiny"):
        preset_config(name).validate()
    for section, key, value in (("model", "local_grid_size", MAX_GRID_SIZE + 1), ("model", "global_grid_size", 0),
                                ("data", "image_size", MAX_IMAGE_SIZE + 16), ("model", "smoothing_sigma", 1e12),
                                ("model", "smoothing_size", 1001), ("model", "score_pool", 10**9),
                                ("model", "map_scales", (1, 3, 5001))):
        cfg = preset_config("edge")
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=re.escape(f"setting {section}.{key} = {shown_value(value)}")):
            cfg.validate()


# ----------------------------------------------------------------------------- the normal path


def test_a_real_small_model_file_still_loads(tmp_path: Path, channels: int) -> None:
    payload = _small_model(channels)
    path = _save(payload, tmp_path)
    detector, loaded = load_detector(path)
    assert detector.model.feat_hw == (8, 8) and loaded["channels"] == channels
    for key, value in payload["state_dict"].items():
        assert torch.equal(detector.model.state_dict()[key], value)
    score, amap = detector(torch.zeros(1, 3, 64, 64))
    assert score.shape == (1,) and amap.shape == (1, 1, 64, 64)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("model", "smoothing_size", 4),  # an even box shifts every map by half a pixel, silently
    ("model", "score_pool", 0),  # loaded, then failed at the first frame
    ("data", "image_size", 72),  # not a multiple of 16
    ("backbone", "exposure_max_gain", 0.5),  # a gain limit below 1
])
def test_model_settings_a_training_run_refuses_are_refused_in_a_model_file(tmp_path: Path, channels: int,
                                                                            section: str, key: str,
                                                                            value: Any) -> None:
    """A model file edited by hand (or written by a tool that skipped the checks) is held to the same rules as the
    training run for what shapes its model and maps; its training-only settings no longer matter."""
    payload = _small_model(channels)
    payload["config"][section][key] = value
    message = _refusal(load_detector, _save(payload, tmp_path))
    assert f"{section}.{key}" in message
    payload = _small_model(channels)
    payload["config"]["train"]["batch_size"] = 1  # a training-only setting: the model still loads
    load_detector(_save(payload, tmp_path, "training_only.pt"))


def test_map_scales_that_are_no_list_are_one_clear_error(tmp_path: Path, channels: int) -> None:
    """A file written before the multi-scale map gets gains of 1 per scale; a map_scales that is no list made that
    upgrade raise a bare TypeError (a traceback) before the config could name the setting."""
    payload = _small_model(channels)
    payload["config"]["model"]["map_scales"] = 7
    del payload["state_dict"]["map_scale_gain"]
    message = _refusal(load_detector, _save(payload, tmp_path))
    assert "map_scale" in message


def test_a_plain_state_without_batch_counters_still_loads(tmp_path: Path, channels: int) -> None:
    """BatchNorm's num_batches_tracked is no size the settings give: load_state_dict fills it in for a plain-dict
    state (a NORMAL-only file after the legacy upgrade, a converted one), so the shape check must not refuse it."""
    payload = _small_model(channels)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.endswith("num_batches_tracked")}
    detector, _ = load_detector(_save(payload, tmp_path))
    assert any(k.endswith("num_batches_tracked") for k in detector.model.state_dict())


def test_a_training_config_yaml_error_does_not_quote_the_line(tmp_path: Path) -> None:
    from gradad.training.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("data:\n  root: /data/secret:token: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "at line 2, column" in str(info.value) and "secret" not in str(info.value)


def test_an_integer_too_long_to_read_is_one_yaml_error(tmp_path: Path) -> None:
    """PyYAML's int() of a 5000-digit value raised a bare ValueError (a traceback) out of the settings reader."""
    from gradad.training.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("train:\n  seed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid YAML/JSON: a value cannot be read"):
        load_config(path)
