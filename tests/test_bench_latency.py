"""grad-bench latency with a handful of iterations: required keys, sane numbers, per-row peak memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_helpers import one_error_line
from gradad.benchmarks.cli import main

STAGES = ("decode", "preprocess", "inference", "postprocess", "total")
ENV_KEYS = ("cpu_model", "cpu_count", "gpu", "python", "torch", "onnxruntime", "numpy", "opencv")


@pytest.fixture(scope="module")
def latency_run(bundle: Path, tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench_lat")
    result = CliRunner().invoke(main, [
        "latency", "--bundle", str(bundle), "--backend", "onnxruntime-fp32", "--backend", "tensorrt",
        "--patchcore-bank", "64", "--images", str(tiny_demo_root / "nut" / "test" / "good"), "--batches", "1,2",
        "--iters", "3", "--min-iters", "2", "--warmup", "1", "--threads", "1", "-o", str(out), "--name", "lat"])
    assert result.exit_code == 0, result.output
    assert (out / "lat.md").is_file()
    return json.loads((out / "lat.json").read_text())


def test_latency_json_has_every_required_field(latency_run: dict) -> None:
    data = latency_run
    assert data["kind"] == "latency" and data["command"].startswith("grad-bench latency")
    code = data["code"]  # the commit the result came from (null outside a git checkout)
    assert set(code) == {"commit", "dirty"} and (code["commit"] is None or len(code["commit"]) == 40)
    assert all(k in data["environment"] for k in ENV_KEYS)
    assert data["threads"] == 1
    methods = {(r["method"], r["backend"]) for r in data["rows"]}
    # PatchCore also on ONNX Runtime: the speed comparison is engine with engine
    assert methods == {("grad", "onnxruntime"), ("patchcore", "pytorch"), ("patchcore", "onnxruntime")}
    for row in data["rows"]:
        assert [b["batch"] for b in row["by_batch"]] == [1, 2]
        assert row["batch1"]["batch"] == 1 and row["best_batch"] in (1, 2)
        assert row["best_fps"] == max(b["fps"] for b in row["by_batch"]) > 0
        for b in row["by_batch"]:
            assert b["images"] == b["iterations"] * b["batch"] >= 2 * b["batch"]
            for stage in STAGES:
                s = b["latency_ms"][stage]
                assert 0 <= s["min"] <= s["p50"] <= s["p95"] <= s["p99"]
            assert b["latency_ms"]["inference"]["p50"] > 0
        assert row["peak_rss_mb"] > 0 and row["complexity"]["gflop_total"] > 0
        assert len(row["load_average_1min"]) == 2  # recorded so a busy machine shows in the results


def test_peak_rss_is_measured_per_row(latency_run: dict) -> None:
    """The ONNX Runtime worker never imports torch; the PatchCore worker does: their peaks must differ."""
    rows = {(r["method"], r["backend"]): r for r in latency_run["rows"]}
    assert rows["grad", "onnxruntime"]["peak_rss_mb"] + 100 < rows["patchcore", "pytorch"]["peak_rss_mb"]


def test_patchcore_cost_counts_the_search(latency_run: dict) -> None:
    pc = next(r for r in latency_run["rows"] if r["method"] == "patchcore")["complexity"]
    c, hw = 152, 32 * 32  # edge extractor features at 256 px
    assert pc["gflop_search"] == pytest.approx(2 * 64 * c * hw / 1e9, abs=1e-3)
    assert pc["gflop_total"] == pytest.approx(pc["gflop_extractor"] + pc["gflop_search"], abs=1e-3)


def test_tensorrt_without_tensorrt_is_a_skip_line(latency_run: dict) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here")
    assert any("not importable" in s["reason"] for s in latency_run["skipped"])


def test_latency_needs_something_to_measure(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["latency", "-o", str(tmp_path)])
    assert "--preset" in one_error_line(result)


def test_today_vs_new_rows_and_ratios(bundle: Path, tiny_demo_root: Path, tmp_path: Path) -> None:
    """--today and --grad-run: today's float path and serial loop measured next to the uint8/pipelined ones."""
    result = CliRunner().invoke(main, [
        "latency", "--bundle", str(bundle), "--backend", "onnxruntime-fp32", "--backend", "onnxruntime-int8",
        "--today", "--grad-run", "8", "--pace", "200", "--no-patchcore", "--images",
        str(tiny_demo_root / "nut" / "test" / "good"), "--batches", "1,2", "--iters", "2", "--min-iters", "1",
        "--warmup", "1", "--threads", "1", "-o", str(tmp_path), "--name", "cmp"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "cmp.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert "today: float32 input" in labels[0] and any("model.int8.onnx" in s["reason"] for s in data["skipped"])
    runs = [r for r in data["rows"] if r["backend"] == "grad-run"]
    assert [r["loop"] for r in runs] == ["serial", "pipelined", "pipelined"]  # today, FP32, FP16
    assert all(b["images"] == 8 for r in runs for b in r["by_batch"])
    paced = runs[1]["batch1_paced"]
    assert paced["pace_fps"] == 200 and paced["latency_ms"]["end_to_end"]["p50"] > 0
    kinds = [c["kind"] for c in data["comparisons"]]
    assert kinds.count("worker") == 1 and kinds.count("grad-run") == 2
    for c in data["comparisons"]:
        assert c["e2e_speedup"] > 0 and c["fps_ratio"] > 0
    assert "Today's path vs the new one" in (tmp_path / "cmp.md").read_text()


def test_peak_rss_is_the_process_own_not_its_parents() -> None:
    """grad-run's summary and the latency rows report their own peak: ru_maxrss carries the parent's peak across
    fork and exec (every grad-run row of a benchmark showed the benchmark's 900 MiB)."""
    import subprocess
    import sys

    import numpy as np

    from gradad.process_memory import peak_rss_mb

    ballast = np.ones(400 * 2**20 // 8)  # the parent peaks above 400 MiB
    assert peak_rss_mb() > 400
    child = subprocess.run([sys.executable, "-c", "from gradad.process_memory import peak_rss_mb; "
                            "print(peak_rss_mb())"], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 200, child.stdout
    del ballast
