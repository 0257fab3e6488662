"""Shared fixtures: a tiny generated demo dataset, and the slow-test switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradad.data.demo import DemoDataConfig, generate_demo_dataset

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("GRAD_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set GRAD_RUN_SLOW=1 (make test-slow) to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _no_hard_exit_in_process() -> None:
    """grad-run ends with os._exit when a camera thread is stuck in OpenCV; in-process CliRunner tests (e.g.
    ``--camera 99``) would take pytest down with it (exit code 2, no summary)."""
    import gradad.runtime.cli

    gradad.runtime.cli.HARD_EXIT_PAST_STUCK_CAPTURES = False


@pytest.fixture(autouse=True, scope="session")
def _private_trust_list(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Engines the tests build are trusted in a list of their own, never the user's ~/.config one (subprocesses
    inherit it)."""
    from gradad.engine_trust import TRUST_FILE_ENV

    os.environ[TRUST_FILE_ENV] = str(tmp_path_factory.mktemp("trust") / "trusted_engines.json")


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 64 px, 8 train + 3 good + 2 per defect test images per class."""
    root = tmp_path_factory.mktemp("demo") / "data"
    cfg = DemoDataConfig(image_size=64, train_good=8, test_good=3, test_per_defect=2, seed=1)
    return generate_demo_dataset(root, cfg)


@pytest.fixture(scope="session")
def trained_tiny(tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-preset model trained for a few epochs on the tiny demo data (model.pt path)."""
    from gradad.training.config import preset_config
    from gradad.training.trainer import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = preset_config("tiny")
    cfg.data.root = str(tiny_demo_root)
    cfg.data.cache_dir = str(out / "cache")
    cfg.output_dir = str(out / "run")
    cfg.train.stage1_epochs, cfg.train.stage2_epochs = 1, 3
    return train(cfg)


@pytest.fixture(scope="session")
def bundle(trained_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported to an ONNX bundle (FP32 + FP16), not calibrated. Treat as read-only."""
    from gradad.export.onnx_export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    return export_bundle(trained_tiny, out, ExportOptions(parity_max_images=24))
