"""grad-bench gpu: on a machine without CUDA every GPU row is skipped with its reason, the JSON is valid and
rewritten after every row, the time budget skips rows, a missing torch gives skipped rows, and the wrapper script
runs the working tree without an installed gradad."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradad.benchmarks import gpu_check
from gradad.benchmarks.cli import main
from gradad.benchmarks.gpu_check import GpuCheckConfig, ResultFile, make_row, plan, run_gpu_check

ROOT = Path(__file__).resolve().parents[1]
needs_no_cuda = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the skip reasons of a machine without CUDA")


def _rows(data: dict) -> dict[str, dict]:
    return {r["label"]: r for r in data["rows"]}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    result = CliRunner().invoke(main, ["gpu", "--smoke", "--no-cpu-train", "-o", str(out), "--name", "gc"])
    assert result.exit_code == 0, result.output
    assert (out / "gc.md").is_file() and (out / "gc.log").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left behind
    return json.loads((out / "gc.json").read_text())


@needs_no_cuda
def test_smoke_on_cpu_skips_every_gpu_row_with_its_reason(smoke_run: dict) -> None:
    data = smoke_run
    assert data["kind"] == "gpu" and data["status"] == "done"
    assert data["command"].startswith("grad-bench gpu --smoke")
    assert {"torch", "onnxruntime", "cpu_model", "gpu"} <= set(data["environment"])
    assert data["cuda"]["cuda_available"] is False
    planned = [label for s in plan(GpuCheckConfig.smoke_config(cpu_train=False), cuda=False) for label in s.labels]
    assert list(_rows(data)) == planned  # every planned row is reported, in order
    for row in data["rows"]:
        assert row["status"] == "skipped" and row["reason"], row
    reasons = {r["section"]: r["reason"] for r in data["rows"]}
    assert "no CUDA device" in reasons["latency_tiny"] and "no CUDA device" in reasons["f2pad"]
    assert "get_available_providers" in reasons["onnxruntime"]
    assert "tensorrt" in reasons["tensorrt"].lower()
    assert data["row_counts"] == {"ok": 0, "skipped": len(planned), "failed": 0}


def test_time_budget_skips_the_remaining_rows(tmp_path: Path) -> None:
    cfg = GpuCheckConfig.smoke_config(out_dir=str(tmp_path), name="tb", time_budget_s=0.0, allow_cpu=True)
    data = run_gpu_check(cfg)
    assert data["rows"] and all(r["status"] == "skipped" for r in data["rows"])
    assert all("time budget" in r["reason"] for r in data["rows"])
    assert json.loads((tmp_path / "tb.json").read_text())["status"] == "done"


def test_json_is_rewritten_after_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = GpuCheckConfig.smoke_config(out_dir=str(tmp_path), name="inc")
    results = ResultFile(cfg, {"kind": "gpu", "name": "inc", "command": "grad-bench gpu"})
    seen = []
    for i in range(3):
        results.add(make_row("s", f"row {i}", "ok", summary=f"{i} ms", value=float(i)))
        on_disk = json.loads((tmp_path / "inc.json").read_text())
        seen.append([r["label"] for r in on_disk["rows"]])
        assert on_disk["status"] == "running"
    assert seen == [["row 0"], ["row 0", "row 1"], ["row 0", "row 1", "row 2"]]
    results.add(make_row("s", "bad", "failed", "RuntimeError: nan", value=float("nan")))  # nan -> null, still JSON
    assert json.loads((tmp_path / "inc.json").read_text())["rows"][-1]["value"] is None


def test_a_failing_row_does_not_lose_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies after its first row: that row is kept, the rest become failed rows with the exit code."""
    cfg = GpuCheckConfig.smoke_config(out_dir=str(tmp_path), name="crash")
    section = gpu_check.Section("x", "train", ["a", "b"], {"tasks": []})
    script = tmp_path / "worker.py"
    script.write_text(f"import sys, json\nsys.stdin.read()\nprint({gpu_check.ROW_PREFIX!r} + json.dumps("
                      "{'section': 'x', 'label': 'a', 'status': 'ok'}), flush=True)\nsys.exit(3)\n")
    real_popen = subprocess.Popen
    monkeypatch.setattr(gpu_check.subprocess, "Popen",
                        lambda cmd, **kw: real_popen([sys.executable, str(script)], **kw))
    results = ResultFile(cfg, {"kind": "gpu"})
    gpu_check.run_section(cfg, section, ["a", "b"], 1e18, tmp_path / "crash.log", results)
    rows = _rows(json.loads((tmp_path / "crash.json").read_text()))
    assert rows["a"]["status"] == "ok"
    assert rows["b"]["status"] == "failed" and "code 3" in rows["b"]["reason"]


@needs_no_cuda
def test_missing_torch_gives_skipped_rows(tmp_path: Path) -> None:
    """torch that cannot be imported (a blocking stub first on the path): every torch row is skipped, no crash."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('torch blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "gradad.benchmarks.cli", "gpu", "--smoke", "-o", str(tmp_path),
                           "--name", "nt"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "nt.json").read_text())
    assert data["environment"]["torch"] is None
    assert all(r["status"] == "skipped" for r in data["rows"])
    torch_rows = [r for r in data["rows"] if r["section"] not in ("onnxruntime", "tensorrt")]
    assert torch_rows and all("torch is not importable" in r["reason"] for r in torch_rows)


@needs_no_cuda
@pytest.mark.skipif(sys.version_info < (3, 11), reason="the wrapper needs PYTHONSAFEPATH (Python >= 3.11)")
def test_wrapper_runs_the_working_tree_without_an_installed_gradad(tmp_path: Path) -> None:
    """A Python that sees torch & co. but not gradad (a venv borrowing this one's site-packages without running
    its .pth files, so the editable install is invisible): the wrapper's symlink mirror makes it importable."""
    import site
    import venv

    site_packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    clean = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(clean)
    target = next((clean / "lib").glob("python3*/site-packages"))
    (target / "borrow.pth").write_text(site_packages + "\n")
    python = clean / "bin" / "python"
    alone = subprocess.run([str(python), "-c", "import gradad"], cwd=tmp_path, capture_output=True, text=True,
                           check=False)
    assert alone.returncode != 0  # really not installed for that Python
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(python)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--no-cpu-train",
                           "--train-preset", "tiny", "-o", str(tmp_path / "out"), "--name", "w"], env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradad-gpu-check." in proc.stderr  # gradad came from the wrapper's mirror, not an installation
    data = json.loads((tmp_path / "out" / "w.json").read_text())
    assert data["wrapper_command"].startswith("bash benchmarks/gpu_check.sh --smoke")
    assert data["status"] == "done" and all(r["status"] == "skipped" for r in data["rows"])


@pytest.mark.slow
def test_allow_cpu_smoke_runs_every_torch_row(tmp_path: Path) -> None:
    """The CUDA rows' code on the CPU (--allow-cpu): training, eager latency and F2PAD measure; the rest skip."""
    data = run_gpu_check(GpuCheckConfig.smoke_config(out_dir=str(tmp_path), name="cpu", allow_cpu=True))
    rows = _rows(data)
    failed = [r for r in data["rows"] if r["status"] == "failed"]
    assert not failed, failed
    assert rows["latency · tiny · eager FP32"]["status"] == "ok"
    assert [b["batch"] for b in rows["latency · tiny · eager FP32"]["by_batch"]] == [1, 2]
    train = rows["train · tiny · CPU stand-in (--allow-cpu; not GPU numbers)"]
    assert train["status"] == "ok" and train["stages"]["normal"]["seconds_per_epoch"] > 0
    f2pad = [r for r in data["rows"] if r["section"] == "f2pad"]
    assert all(r["status"] == "ok" and r["seconds_per_flagged_frame"] > 0 for r in f2pad)
    assert rows["train · tiny · CPU comparison (extrapolated)"]["status"] == "ok"
    if shutil.which("nvidia-smi") is None:
        assert "graph" in rows["latency · tiny · CUDA graph FP32"]["reason"]
