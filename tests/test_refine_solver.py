"""F2PAD solver on the tiny trained model: preparation, objective decrease, region limit, budget, batching, CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gradad.bundle import read_manifest, verify_files
from gradad.data.datasets import load_samples
from gradad.data.images import load_sample_arrays
from gradad.errors import GradError
from gradad.refine.bundle_files import prepare_bundle
from gradad.refine.cli import main as refine_cli
from gradad.refine.config import RefineConfig
from gradad.refine.refiner import Refiner
from gradad.runtime.refine_result import STATUS_EMPTY_REGION, STATUS_MAX_ITERATIONS, STATUS_TIME_BUDGET
from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
from gradad.training.features import load_images

# Fixed-length runs: no early stop, so tests compare like with like.
# No wall-time budget unless a test sets one: iteration counts must not depend on how busy the machine is.
FIXED = dict(device="cpu", min_iterations=10_000, threads=1, time_budget_s=0.0)


@pytest.fixture(scope="module")
def prepared(bundle: Path, trained_tiny: Path, tiny_demo_root: Path, tmp_path_factory) -> Path:
    """A copy of the tiny bundle prepared for refinement."""
    out = tmp_path_factory.mktemp("refine") / "bundle"
    shutil.copytree(bundle, out)
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:12]
    images, _ = load_images(train, 64)
    prepare_bundle(out, trained_tiny, images, RefineConfig(mog_components=3, mog_pixels=20_000))
    return out


@pytest.fixture(scope="module")
def defects(prepared: Path, tiny_demo_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Two defect images, their ORT maps and ground truth, and a pixel threshold that flags part of each."""
    samples = [s for s in load_samples(tiny_demo_root, "test") if s.label == 1][:2]
    arrays = [load_sample_arrays(s, 64) for s in samples]
    images = np.stack([a[0] for a in arrays])
    backend = OnnxRuntimeBackend(prepared / "model.onnx", None, 1, 8)
    _, maps = backend.infer(images.astype(np.float32).transpose(0, 3, 1, 2))
    threshold = float(min(np.quantile(m, 0.85) for m in maps))
    return images, maps, np.stack([a[1] for a in arrays]), threshold


def _refiner(prepared: Path, threshold: float, **overrides) -> Refiner:
    return Refiner.from_bundle(prepared, dataclasses.replace(RefineConfig(), **{**FIXED, **overrides}), threshold)


def test_prepare_records_hashed_files_and_normal_level(prepared: Path):
    manifest = read_manifest(prepared)
    section = manifest["refine"]
    verify_files(prepared, manifest, [section["model"], section["pixel_prior"]])
    assert section["model"].startswith("refine_model.") and section["pixel_prior"].startswith("pixel_prior.")
    assert section["prior"]["components"] == 3
    assert section["checkpoint_vs_onnx_max_rel_error"] < 1e-3
    assert section["normal_map_level"] > 0
    # self-contained: the extractor weights travel with the file (no weight package needed on the device)
    payload = torch.load(prepared / section["model"], map_location="cpu", weights_only=True)
    assert "extractor_state_dict" in payload


def test_reprepare_replaces_files_and_keeps_bundle_valid(prepared, trained_tiny, tiny_demo_root, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(prepared, copy)
    old = read_manifest(copy)["refine"]
    train = [s for s in load_samples(tiny_demo_root, "train") if s.label == 0][:6]
    images, _ = load_images(train, 64)
    prepare_bundle(copy, trained_tiny, images, RefineConfig(mog_components=2, mog_pixels=5000))
    manifest = read_manifest(copy)
    new = manifest["refine"]
    assert new["pixel_prior"] != old["pixel_prior"] and not (copy / old["pixel_prior"]).exists()
    assert old["pixel_prior"] not in manifest["files"]
    verify_files(copy, manifest)  # every listed file present with its hash
    (copy / new["pixel_prior"]).write_bytes(b"tampered")
    with pytest.raises(GradError, match=r"refinement file .* \(modified or corrupt\); run: grad-refine prepare"):
        Refiner.from_bundle(copy, pixel_threshold=1.0)


def test_prepare_refuses_a_checkpoint_that_is_not_the_exported_model(bundle, trained_tiny, tmp_path):
    payload = torch.load(trained_tiny, map_location="cpu", weights_only=True)
    key = next(k for k in payload["state_dict"] if k.startswith("normal_cnn") and k.endswith("weight"))
    payload["state_dict"][key] = payload["state_dict"][key] * 3.0
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(GradError, match="is not the model exported"):
        prepare_bundle(copy, other, images)
    assert "refine" not in read_manifest(copy)  # nothing written


def test_unprepared_bundle_says_how_to_prepare(bundle):
    with pytest.raises(GradError, match="grad-refine prepare"):
        Refiner.from_bundle(bundle, pixel_threshold=1.0)


def test_optimiser_reduces_objective_and_touches_only_the_region(prepared, defects):
    images, maps, _, threshold = defects
    refiner = _refiner(prepared, threshold, max_iterations=25)
    batch = refiner._prepare([images[0]], [maps[0] > threshold])
    start = refiner.objective(batch.x_n, batch.x, batch.region, batch.lam, batch.readout)["total"].item()
    (result,) = refiner.refine([images[0]], [maps[0]])
    assert result.status == STATUS_MAX_ITERATIONS and result.iterations == 25
    assert result.objective < start - 1e-3
    outside = ~result.region
    assert outside.any() and result.region.any()
    assert np.array_equal(result.repaired[outside], images[0][outside])  # no pixel outside the region moves
    assert not (result.mask & outside).any()
    assert np.array_equal(result.coarse_mask, maps[0] > threshold)
    assert (result.region >= result.coarse_mask).all()  # region = dilated coarse mask


def test_batched_refinement_equals_one_by_one(prepared, defects):
    images, maps, _, threshold = defects
    refiner = _refiner(prepared, threshold, max_iterations=8)
    together = refiner.refine(list(images), list(maps))
    alone = [refiner.refine([im], [m])[0] for im, m in zip(images, maps)]
    for a, b in zip(together, alone):
        assert np.array_equal(a.mask, b.mask)
        assert np.abs(a.repaired.astype(int) - b.repaired.astype(int)).max() <= 1
        assert a.objective == pytest.approx(b.objective, rel=1e-4)


def test_images_stopping_early_leave_the_batch_without_changing_the_others(prepared, defects):
    images, maps, _, threshold = defects
    # loose stopping rules, so that images converge at different iterations and the batch shrinks mid-run
    for tolerance in (0.05, 0.02, 0.01, 0.005, 0.002):
        refiner = _refiner(prepared, threshold, max_iterations=80, min_iterations=2, stop_window=2,
                           stop_relative_drop=tolerance)
        together = refiner.refine(list(images), list(maps))
        if together[0].iterations != together[1].iterations:
            break
    assert together[0].iterations != together[1].iterations  # the compaction path really ran
    alone = [refiner.refine([im], [m])[0] for im, m in zip(images, maps)]
    for a, b in zip(together, alone):
        assert a.iterations == b.iterations and a.status == b.status
        assert np.array_equal(a.mask, b.mask)
        assert a.objective == pytest.approx(b.objective, rel=1e-4)


def test_reestimation_pass_only_shrinks_the_mask(prepared, defects):
    images, maps, _, threshold = defects
    first = _refiner(prepared, threshold, max_iterations=10).refine([images[0]], [maps[0]])[0]
    again = _refiner(prepared, threshold, max_iterations=10, reestimate_iterations=5).refine([images[0]], [maps[0]])[0]
    assert not (again.mask & ~first.mask).any()
    assert np.array_equal(again.repaired[~again.region], images[0][~again.region])


def test_time_budget_is_honoured_with_best_mask_so_far(prepared, defects):
    images, maps, _, threshold = defects
    refiner = _refiner(prepared, threshold, max_iterations=1_000_000, time_budget_s=0.5)
    started = time.perf_counter()
    results = refiner.refine(list(images), list(maps))
    elapsed = time.perf_counter() - started
    # the budget is per frame (a batch of n frames may take n x 0.5 s); it stops before an iteration that would end
    # past it, and the margin covers one iteration's jitter
    assert len(images) <= refiner.config.max_batch
    assert elapsed < 0.5 * len(images) + 0.5
    for r in results:
        assert r.status == STATUS_TIME_BUDGET and r.budget_exhausted and r.summary()["budget_exhausted"]
        assert r.iterations >= 1 and np.isfinite(r.objective)


def test_nothing_above_threshold_is_an_empty_region(prepared, defects):
    images, maps, _, _ = defects
    refiner = _refiner(prepared, float(maps.max()) + 1.0)
    (r,) = refiner.refine([images[0]], [maps[0]])
    assert r.status == STATUS_EMPTY_REGION and not r.mask.any() and np.array_equal(r.repaired, images[0])


def test_bad_inputs_are_named(prepared, defects):
    images, maps, _, threshold = defects
    refiner = _refiner(prepared, threshold)
    with pytest.raises(GradError, match="anomaly map 0"):
        refiner.refine([images[0]], [maps[0][:10]])
    with pytest.raises(GradError, match="uint8"):
        refiner.refine([images[0].astype(np.float32)], [maps[0]])


def test_cli_prepare_and_refine_folder(bundle, trained_tiny, tiny_demo_root, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    runner = CliRunner()
    res = runner.invoke(refine_cli, ["prepare", "--bundle", str(copy), "--checkpoint", str(trained_tiny), "--data",
                                     str(tiny_demo_root), "--images", "6", "--set", "mog_components=2"])
    assert res.exit_code == 0, res.output
    assert read_manifest(copy)["refine"]["config"]["mog_components"] == 2
    folder = tiny_demo_root / "fabric" / "test" / "scratch"
    out = tmp_path / "out"
    args = [str(folder), "--bundle", str(copy), "-o", str(out), "--all", "--pixel-threshold", "0.5",
            "--set", "max_iterations=3", "--device", "cpu"]
    res = runner.invoke(refine_cli, args)  # no subcommand: defaults to `run`
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "refine.jsonl").read_text().splitlines()]
    assert len(records) == len(list(folder.iterdir()))
    for rec in records:
        assert rec["refined"] and rec["iterations"] <= 3
        assert (out / rec["mask_file"]).is_file() and (out / rec["repaired_file"]).is_file()
    again = runner.invoke(refine_cli, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    missing = runner.invoke(refine_cli, [str(tmp_path / "nope.png"), "--bundle", str(copy), "-o", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "nope.png" in missing.output


def test_a_class_start_rule_sets_the_mask_refined_and_the_guard_stays_inside_it(prepared, defects):
    """start_peak_fraction (a tuned class setting) decides the start mask; the collapse guard cannot put back what
    the tighter start left out."""
    from gradad.refine.regions import start_mask

    images, maps, _, threshold = defects
    refiner = _refiner(prepared, threshold, max_iterations=3)
    fraction = (1.0 + threshold / float(maps[0].max())) / 2  # half-way between the threshold and the peak
    refiner.class_configs["c"] = dataclasses.replace(refiner.config, start_peak_fraction=fraction,
                                                     collapse_fraction=1.0)
    (plain,) = refiner.refine([images[0]], [maps[0]], ["other"])  # an untuned class: the bundle's config
    (tight,) = refiner.refine([images[0]], [maps[0]], ["c"])
    assert np.array_equal(plain.coarse_mask, maps[0] > threshold)
    expected = start_mask(maps[0], threshold, fraction)
    assert np.array_equal(tight.coarse_mask, expected) and expected.sum() < plain.coarse_mask.sum()
    assert not (tight.mask & ~tight.region).any()  # the guard (always firing here) added nothing outside the start
