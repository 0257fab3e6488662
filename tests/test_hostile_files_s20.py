"""Hostile files, round 20: compression bombs in a bundle's pixel prior and in torch files, terminal escape
sequences in bundle.json strings, and bundle.json numbers that are too long or too large.

Every hostile file is built here, small: a bomb claims tens of MB from a few KB (the rule is the ratio and the
cap, not the size), so the tests stay light on memory even where the old code inflated them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from numpy.lib import format as npf

from cli_helpers import one_error_line

from gradad.bundle import MAX_INPUT_SIDE, BundleError, read_manifest
from gradad.cli_utils import PrintableFormatter, printable, user_errors_as_exit
from gradad.errors import CheckpointError, GradError
from gradad.files import check_zip_expansion
from gradad.refine.prior import PRIOR_MAX_BYTES, PixelPrior

ESC = "\x1b"
#: moves the cursor up, erases the line, writes "echo pwned" to the clipboard (OSC 52), then rings the bell
HOSTILE = "demo\x1b[1A\x1b[2K\x1b]52;c;ZWNobyBwd25lZA==\x07"


# ----------------------------------------------------------------------------------------- 1. compression bombs


def _deflated_copy(src: Path, dst: Path) -> Path:
    """``src`` (a zip archive) rewritten with every member deflated: what torch.load and np.load both inflate."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return dst


def _torch_bomb(tmp_path: Path, name: str = "model.pt", mib: int = 16) -> Path:
    """A torch.save file whose one tensor (``mib`` MiB of zeros) is deflated to a few KB."""
    stored = tmp_path / f"stored-{name}"
    torch.save({"weight": torch.zeros(mib * 2**20 // 4)}, stored)
    bomb = _deflated_copy(stored, tmp_path / name)
    stored.unlink()
    assert bomb.stat().st_size < 200_000
    return bomb


def test_torch_save_stores_its_records_so_the_rule_fits_real_files(tmp_path: Path) -> None:
    """The rule 'no member inflates' rests on torch.save writing stored records; a real file passes the check."""
    path = tmp_path / "real.pt"
    torch.save({"w": torch.randn(1000, 100), "b": torch.arange(7), "meta": {"format": 1}}, path)
    assert {i.compress_type for i in zipfile.ZipFile(path).infolist()} == {zipfile.ZIP_STORED}
    check_zip_expansion(path, "checkpoint")
    from gradad.training.checkpoint import safe_torch_load

    assert safe_torch_load(path)["w"].shape == (1000, 100)


def test_a_deflated_torch_file_is_refused_before_torch_inflates_it(tmp_path: Path) -> None:
    """Old code: torch.load inflated the record whole (a 1 MB file became a 1 GiB tensor)."""
    from gradad.training.checkpoint import safe_torch_load

    bomb = _torch_bomb(tmp_path)
    with pytest.raises(CheckpointError, match="refusing checkpoint .*model.pt.*compression bomb"):
        safe_torch_load(bomb)


def test_a_deflated_model_file_is_one_error_line_on_the_command_line(tmp_path: Path) -> None:
    from gradad.evaluation.cli import main as eval_main

    bomb = _torch_bomb(tmp_path)
    line = one_error_line(CliRunner().invoke(eval_main, [str(bomb)]))
    assert str(bomb) in line and "compression bomb" in line


def test_deflated_backbone_weights_are_refused(tmp_path: Path) -> None:
    from gradad.training.backbone import load_imagenet_classifier

    bomb = _torch_bomb(tmp_path, "weights.pth")
    with pytest.raises(CheckpointError, match="refusing backbone weights .*weights.pth"):
        load_imagenet_classifier("efficientnet_b0", str(bomb))


def test_a_legacy_torch_file_is_no_zip_and_passes(tmp_path: Path) -> None:
    """The packaged backbone weights are in torch's legacy format: tensors stored raw, nothing to inflate."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    check_zip_expansion(path, "checkpoint")


def test_members_that_add_up_beyond_the_file_are_refused(tmp_path: Path) -> None:
    """The total: stored members may not claim more bytes than the file holds (entries sharing one record)."""
    path = tmp_path / "real.pt"
    torch.save({"w": torch.randn(1000)}, path)
    check_zip_expansion(path, "checkpoint")
    with pytest.raises(GradError, match=r"refusing checkpoint .*real.pt: its members would inflate to \d+ bytes"):
        check_zip_expansion(path, "checkpoint", max_bytes=1000)


def test_a_zip_whose_directory_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:3000])  # starts like a zip, its central directory is gone
    with pytest.raises(CheckpointError, match="cut.pt"):
        check_zip_expansion(path, "checkpoint", error=CheckpointError)


def _prior_bomb(path: Path, mib: int = 32) -> Path:
    """A pixel_prior.npz whose arrays are ``mib`` MiB of zeros, deflated to a few tens of KB (a consistent prior:
    the old loader read it whole and accepted it)."""
    k = mib * 2**20 // (12 * 8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, shape in (("means.npy", (k, 3)), ("covariances.npy", (k, 3, 3))):
            with z.open(name, "w", force_zip64=True) as f:
                npf.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
                left, chunk = int(np.prod(shape)) * 8, bytes(1 << 20)
                while left:
                    f.write(chunk[:min(left, len(chunk))])
                    left -= min(left, len(chunk))
        with z.open("mean_log_likelihood.npy", "w") as f:
            np.save(f, np.float64(0))
    assert path.stat().st_size < 1_000_000
    return path


def test_a_pixel_prior_bomb_is_refused_before_numpy_inflates_it(tmp_path: Path) -> None:
    """Old code: np.load inflated every member whole (4.1 MB of file -> 4 GiB) and accepted the prior."""
    bomb = _prior_bomb(tmp_path / "pixel_prior.npz")
    with pytest.raises(GradError, match="refusing pixel prior .*pixel_prior.npz: member 'means.npy'"):
        PixelPrior.load(bomb)


def test_a_pixel_prior_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    """The cap holds for stored (uncompressed) members too; real priors are ~1 KB, far below it."""
    rng = np.random.default_rng(0)
    path = tmp_path / "pixel_prior.npz"
    PixelPrior(rng.normal(size=(5, 3)), np.repeat(np.eye(3)[None], 5, axis=0), -1.5).save(path)
    assert path.stat().st_size * 1000 < PRIOR_MAX_BYTES
    assert PixelPrior.load(path).means.shape == (5, 3)
    with pytest.raises(GradError, match="refusing pixel prior .*its members would inflate to"):
        PixelPrior.load(path, max_bytes=512)


def test_a_prior_with_more_components_than_the_cap_is_refused(tmp_path: Path) -> None:
    """Within the byte cap a prior can still hold ~700 000 components, and the prior term allocates components x 3
    x H x W floats per image (150 GB for 200 000 at 256 x 256): the count is capped when the file is read, and a
    config cannot ask grad-refine prepare for more."""
    from gradad.errors import ConfigError
    from gradad.refine.config import PRIOR_MAX_COMPONENTS, RefineConfig

    rng = np.random.default_rng(2)
    path = tmp_path / "pixel_prior.npz"
    k = PRIOR_MAX_COMPONENTS + 1
    PixelPrior(rng.normal(size=(k, 3)), np.repeat(np.eye(3)[None], k, axis=0), -1.5).save(path)
    with pytest.raises(GradError, match=f"pixel prior .*pixel_prior.npz has {k} components: between 1 and "
                                        f"{PRIOR_MAX_COMPONENTS}"):
        PixelPrior.load(path)
    with pytest.raises(ConfigError, match=f"mog_components={k} \\(at most {PRIOR_MAX_COMPONENTS}"):
        RefineConfig(mog_components=k).validate()


def test_a_compressed_but_honest_prior_still_loads(tmp_path: Path) -> None:
    """np.savez_compressed of real statistics shrinks far less than the 100:1 refused."""
    rng = np.random.default_rng(1)
    path = tmp_path / "pixel_prior.npz"
    np.savez_compressed(path, means=rng.normal(size=(64, 3)), covariances=np.repeat(np.eye(3)[None], 64, axis=0),
                        mean_log_likelihood=np.float64(-2.0))
    assert PixelPrior.load(path).covariances.shape == (64, 3, 3)


# ---------------------------------------------------------------------------------- 2. terminal escape sequences


def _bundle(tmp_path: Path, **changes: Any) -> Path:
    """A small bundle folder (an ONNX file that is only bytes, one engine) whose bundle.json takes ``changes``;
    written raw, as a hostile author would."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    files = {"model.onnx": b"not a real graph", "model.fp16.engine": b"not a real engine"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest: dict[str, Any] = {
        "schema_version": 2, "gradad_version": "0.1.0", "created": "2026-11-29T07:24:01+00:00", "name": "demo",
        "preset": "edge", "backbone": {"name": "tf_efficientnet_lite0", "out_indices": [2, 3], "weights": "packaged"},
        "input": {"name": "image", "layout": "NCHW", "dtype": "uint8", "color": "RGB", "value_range": [0, 255],
                  "height": 256, "width": 256, "model_height": 256, "model_width": 256,
                  "normalisation": {"mean": [0.5] * 3, "std": [0.5] * 3, "in_graph": True}, "resize": "caller"},
        "outputs": {"score": {"shape": ["batch"]}, "anomaly_map": {"shape": ["batch", 1, 256, 256]}},
        "classes": ["nut"], "training_data": {},
        "onnx": {"opset": 17, "exporter": "torch.onnx", "dynamic_batch": True, "simplified": True},
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for name, data in files.items()},
        "parity": {"onnx_fp32_vs_pytorch": {"n_images": 8, "map_max_abs": 1e-4, "map_mean_abs": 1e-6,
                                            "score_max_abs": 1e-5}, "gates": {}},
        "engines": [{"file": "model.fp16.engine", "tensorrt_version": "10.3", "gpu_name": "Orin",
                     "compute_capability": "8.7", "precision": "fp16"}],
        "calibration": {"image_threshold": 19.5, "pixel_threshold": 17.2, "method": "far",
                        "data": {"n_good": 36, "good_dirs": ["demo_data/nut/test/good"]},
                        "classes": {"nut": {"image_threshold": 19.5, "pixel_threshold": 17.5, "n_good": 12}},
                        "warnings": ["few images"]},
    }
    for key, value in changes.items():
        target, *path = key.split(".")
        if path:
            manifest[target][path[0]] = value
        else:
            manifest[key] = value
    (folder / "bundle.json").write_text(json.dumps(manifest))
    return folder


def _hostile_bundle(tmp_path: Path) -> Path:
    return _bundle(tmp_path, name=HOSTILE, classes=[f"nut{ESC}[8m"], preset=f"edge{ESC}]0;title{ESC}\\",
                   engines=[{"file": "model.fp16.engine", "tensorrt_version": f"10.3{ESC}[2J",
                             "gpu_name": f"Orin\x9b2J\r", "compute_capability": "8.7", "precision": "fp16"}])


def _no_control_characters(text: str) -> None:
    assert not [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F], repr(text)


def test_inspect_prints_bundle_strings_without_their_escape_sequences(tmp_path: Path) -> None:
    """Old code: the name's ESC sequences reached the terminal (rewriting the summary, writing the clipboard)."""
    from gradad.export.cli import main as export_main

    result = CliRunner().invoke(export_main, ["inspect", str(_hostile_bundle(tmp_path))])
    assert result.exit_code == 0, result.output
    _no_control_characters(result.output)
    assert r"bundle demo\x1b[1A\x1b[2K\x1b]52;c;ZWNobyBwd25lZA==\x07 at" in result.output  # visible, not acted on
    assert r"classes nut\x1b[8m" in result.output and r"Orin\x9b2J\r" in result.output


def test_inspect_json_and_trust_print_no_escape_sequences(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradad.export.cli import main as export_main

    monkeypatch.setenv("GRADAD_TRUST_FILE", str(tmp_path / "trust.json"))
    bundle = _hostile_bundle(tmp_path)
    as_json = CliRunner().invoke(export_main, ["inspect", "--json", str(bundle)])
    assert as_json.exit_code == 0, as_json.output
    _no_control_characters(as_json.output)
    trusted = CliRunner().invoke(export_main, ["trust", str(bundle)])
    assert trusted.exit_code == 0, trusted.output
    _no_control_characters(trusted.output)
    assert r"TensorRT 10.3\x1b[2J, Orin\x9b2J\r)" in trusted.output


def test_a_newline_in_a_bundle_string_cannot_forge_a_summary_line(tmp_path: Path) -> None:
    from gradad.export.cli import main as export_main

    bundle = _bundle(tmp_path, name="demo\n  calibration: none (forged)")
    result = CliRunner().invoke(export_main, ["inspect", str(bundle)])
    assert result.exit_code == 0, result.output
    assert not any(line.startswith("  calibration: none") for line in result.output.splitlines())
    assert r"bundle demo\n  calibration: none (forged) at" in result.output


def test_error_lines_and_log_lines_escape_control_characters(caplog: pytest.LogCaptureFixture) -> None:
    @click.command()
    @user_errors_as_exit
    def fails() -> None:
        raise GradError(f"bundle {HOSTILE} is broken")

    result = CliRunner().invoke(fails, [])
    line = one_error_line(result)
    _no_control_characters(result.output)
    assert line == r"error: bundle demo\x1b[1A\x1b[2K\x1b]52;c;ZWNobyBwd25lZA==\x07 is broken"
    record = logging.LogRecord("gradad.runtime", logging.INFO, __file__, 1, "bundle %s, backend %s", (HOSTILE, "ort"),
                               None)
    text = PrintableFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert text == r"INFO gradad.runtime: bundle demo\x1b[1A\x1b[2K\x1b]52;c;ZWNobyBwd25lZA==\x07, backend ort"


def test_printable_keeps_ordinary_text() -> None:
    assert printable("naïve ✓ 3×3\tsplit\nline") == "naïve ✓ 3×3\tsplit\nline"
    assert printable("a\nb", newlines=False) == r"a\nb"
    assert printable("\x00\x7f\x85\x9f") == r"\x00\x7f\x85\x9f"


def test_printable_escapes_bidi_controls() -> None:
    """Old code passed U+202E through: a bundle named "model\u202egnp.exe" showed as "modelexe.png" in a terminal."""
    assert printable("model\u202egnp.exe") == r"model\u202egnp.exe"
    assert printable("\u2066a\u2069\u200f\u061c", newlines=False) == r"\u2066a\u2069\u200f\u061c"


# ------------------------------------------------------------------------------- 3. numbers in bundle.json


def test_a_5000_digit_integer_in_bundle_json_is_one_error_line(tmp_path: Path) -> None:
    """Old code: int() refused the digits with a ValueError that escaped as a traceback."""
    from gradad.export.cli import main as export_main

    bundle = _bundle(tmp_path)
    text = (bundle / "bundle.json").read_text().replace('"schema_version": 2', '"schema_version": ' + "9" * 5000)
    (bundle / "bundle.json").write_text(text)
    with pytest.raises(BundleError, match="bundle.json .*number too long"):
        read_manifest(bundle)
    line = one_error_line(CliRunner().invoke(export_main, ["inspect", str(bundle)]))
    assert str(bundle / "bundle.json") in line and len(line) < 400


@pytest.mark.parametrize("key", ["input.height", "input.width", "input.model_height", "input.model_width"])
def test_input_sides_have_a_maximum(tmp_path: Path, key: str) -> None:
    """Old code: a bundle could ask for 100000 x 100000 frames (30 GB each in uint8)."""
    with pytest.raises(BundleError, match=key.split(".")[1]):
        read_manifest(_bundle(tmp_path, **{key: 100_000}))


def test_the_largest_input_side_is_accepted(tmp_path: Path) -> None:
    assert read_manifest(_bundle(tmp_path, **{"input.height": MAX_INPUT_SIDE}))["input"]["height"] == MAX_INPUT_SIDE


def test_export_refuses_an_input_size_the_bundle_could_not_hold(tmp_path: Path) -> None:
    from gradad.export.cli import main as export_main

    result = CliRunner().invoke(export_main, ["onnx", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out"),
                                              "--input-size", f"{MAX_INPUT_SIDE + 1}x640"])
    assert result.exit_code == 2 and "--input-size" in result.output and "16 to 8192" in result.output
