"""Feature Block Paste and the stage losses."""

from __future__ import annotations

import pytest
import torch

from gradad.training.config import FBPConfig
from gradad.training.fbp import _walk_cells, feature_block_paste, gaussian_kernel3, sample_fbp_masks
from gradad.training.losses import reconstruction_mse, truncated_l1_contrastive


@pytest.mark.parametrize("walk", ["public", "paper"])
def test_fbp_mask_shape_area_and_window(walk: str) -> None:
    cfg = FBPConfig(walk=walk, blur_sigma=0.0)
    gen = torch.Generator().manual_seed(0)
    paint, mask = sample_fbp_masks(64, (32, 32), cfg, feature_std=1.0, gen=gen)
    assert mask.shape == paint.shape == (64, 1, 32, 32)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    areas = mask.sum(dim=(1, 2, 3))
    assert (areas >= 1).all()
    # The walk stays in a (2B+1)^2 window with B <= 9, so a block spans at most 19 cells per side.
    for m in mask[:, 0]:
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert ys.max() - ys.min() <= 18 and xs.max() - xs.min() <= 18
    if walk == "paper":
        assert areas.max() <= 2 * 9 + 1  # at most 2B steps -> 2B + 1 cells


def test_paper_walk_step_count_bounds_cells() -> None:
    cfg = FBPConfig(walk="paper")
    gen = torch.Generator().manual_seed(3)
    for block in range(1, 10):
        cells = _walk_cells(block, cfg, gen)
        assert 1 <= len(cells) <= 2 * block + 1
        assert all(abs(dy) <= block and abs(dx) <= block for dy, dx in cells)


def test_fbp_intensity_scales_with_feature_std_and_blur() -> None:
    cfg = FBPConfig(intensity_std_range=(4.0, 4.0), blur_sigma=0.8)
    gen = torch.Generator().manual_seed(1)
    x = torch.zeros(4, 3, 16, 16)
    out, mask = feature_block_paste(x, cfg, feature_std=2.5, gen=gen)
    # Same paint on every channel: the 3x3 Gaussian blur of (mask * 4 std * 2.5).
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    expected = torch.nn.functional.conv2d(mask * 10.0, gaussian_kernel3(0.8).view(1, 1, 3, 3), padding=1)
    assert torch.allclose(out[:, :1], expected, atol=1e-5)
    # Blur spreads paint beyond the binary mask but never exceeds the intensity.
    assert ((out[:, :1] > 0) & (mask == 0)).any()
    assert out.max() <= 10.0 + 1e-5


def test_gaussian_kernel_normalised_and_symmetric() -> None:
    k = gaussian_kernel3(0.8)
    assert k.sum().item() == pytest.approx(1.0)
    assert torch.allclose(k, k.T) and k[1, 1] == k.max()


def test_fbp_probability_zero_pastes_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    paint, mask = sample_fbp_masks(8, (16, 16), FBPConfig(probability=0.0), 1.0, gen)
    assert paint.abs().sum() == 0 and mask.sum() == 0


def test_contrastive_loss_known_input() -> None:
    s = torch.tensor([0.9, 0.1, -0.2, -0.7]).view(1, 1, 2, 2)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    # anomalous: max(0, .5-.9)=0, max(0, .5-.1)=.4 -> mean .2 ; normal: max(0, .5-.2)=.3, max(0, .5-.7)=0 -> .15
    assert truncated_l1_contrastive(s, mask, 0.5).item() == pytest.approx(0.35)
    # No anomalous cells: only the normal term counts.
    assert truncated_l1_contrastive(s, torch.zeros_like(mask), 0.5).item() == pytest.approx(
        (1.4 + 0.6 + 0.3 + 0.0) / 4
    )


def test_reconstruction_mse() -> None:
    a, b = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2) * 3
    assert reconstruction_mse(a, b).item() == pytest.approx(9.0)
