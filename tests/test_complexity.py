"""Preset sizes: the edge preset must stay a few GFLOP per 256x256 image (DESIGN.md section 2)."""

from __future__ import annotations

import pytest

from gradad.benchmarks.complexity import preset_complexity
from gradad.training.config import preset_config


def test_edge_preset_is_a_few_gflop() -> None:
    row = preset_complexity(preset_config("edge"))
    assert row["feature_shape"] == [152, 32, 32]
    assert 1.0 <= row["gflop_total"] <= 5.0
    assert row["gflop_total"] == pytest.approx(row["gflop_extractor"] + row["gflop_grad"], abs=0.002)  # rounding
    # Grids: (local C*8*8 + global C*H*W*R_g^2) x 2 branches.
    expected_grids = 2 * (152 * 64 + 152 * 32 * 32 * 16)
    assert row["params_grids_m"] == round(expected_grids / 1e6, 3)
