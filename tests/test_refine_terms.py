"""F2PAD building blocks against hand-computed values: penalties, gradient sharing, Adan, pixel prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradad.errors import ConfigError
from gradad.refine.adan import AdanDirection
from gradad.refine.config import RefineConfig, refine_config_from_dict
from gradad.refine.objective import (feature_loss, linear_readout_weights, log_sparsity, mog_penalty,
                                     total_variation, validity_penalty)
from gradad.refine.prior import PixelPrior, fit_pixel_prior
from gradad.refine.sharing import bilateral_weights, share_gradients


def _image(values: list[list[list[float]]]) -> torch.Tensor:
    """(3, H, W) nested list -> (1, 3, H, W) tensor."""
    return torch.tensor(values, dtype=torch.float32).unsqueeze(0)


def test_log_sparsity_matches_hand_value():
    a = torch.zeros(1, 3, 2, 2)
    a[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # |a| = 5
    a[0, :, 1, 1] = torch.tensor([0.0, 0.0, 1.0])  # |a| = 1
    region = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])  # pixel (0, 1) excluded
    eps = 1e-3
    f = lambda n: math.log(n + math.sqrt(n * n + eps))  # noqa: E731
    expected = (f(5.0) + f(0.0) + f(1.0)) / 3 - f(0.0)  # offset so that the penalty is 0 at a = 0
    # abs 1e-4: |a| carries a 1e-6 floor so its gradient stays finite at a = 0
    assert log_sparsity(a, region, eps).item() == pytest.approx(expected, abs=1e-4)
    d = 0.1  # smoothed norm sqrt(|a|^2 + d^2)
    g = lambda n: f(math.sqrt(n * n + d * d))  # noqa: E731
    assert log_sparsity(a, region, eps, d).item() == pytest.approx((g(5.0) + g(0.0) + g(1.0)) / 3 - g(0.0),
                                                                   rel=1e-5)
    assert log_sparsity(torch.zeros(1, 3, 2, 2), region, eps, d).item() == pytest.approx(0.0, abs=1e-6)


def test_mog_penalty_is_min_squared_mahalanobis():
    x = torch.zeros(1, 3, 1, 2)
    x[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    x[0, :, 0, 1] = torch.tensor([2.0, 2.0, 0.0])
    means = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    precisions = torch.stack([torch.diag(torch.tensor([4.0, 1.0, 1.0])), torch.eye(3)])
    # pixel 1: comp0 4*1 = 4, comp1 1+4+4 = 9 -> 4 ; pixel 2: comp0 16+4 = 20, comp1 0+0+4 = 4 -> 4
    region = torch.ones(1, 1, 1, 2)
    assert mog_penalty(x, region, means, precisions).item() == pytest.approx(4.0)
    region = torch.tensor([[[[0.0, 1.0]]]])
    x[0, 2, 0, 1] = 1.0  # comp1: 0+0+1 = 1
    assert mog_penalty(x, region, means, precisions).item() == pytest.approx(1.0)


def test_total_variation_counts_pairs_touching_the_region():
    x = _image([[[0, 1, 3], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [2, 0, 0]]])
    region = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])  # only pixel (0, 0)
    # pairs touching (0,0): right (0,0)-(0,1): |1-0| = 1 (channel 0); down (0,0)-(1,0): |2-0| = 2 (channel 2)
    assert total_variation(x, region).item() == pytest.approx(3.0)
    full = torch.ones(1, 1, 2, 3)
    # all horizontal: ch0 row0 1 + 2, ch2 row1 2 + 0 ; all vertical: ch0 col1 1, col2 3 ; ch2 col0 2 -> 11 over 6 px
    assert total_variation(x, full).item() == pytest.approx(11.0 / 6.0)


def test_validity_penalty_is_squared_excursion():
    x = torch.zeros(1, 3, 1, 2)
    x[0, 0, 0, 0] = 1.5  # 0.5 above high
    x[0, 1, 0, 1] = -1.2  # 0.2 below low
    low, high = -torch.ones(3), torch.ones(3)
    assert validity_penalty(x, torch.ones(1, 1, 1, 2), low, high).item() == pytest.approx((0.25 + 0.04) / 2)
    assert validity_penalty(torch.zeros(1, 3, 1, 2), torch.ones(1, 1, 1, 2), low, high).item() == 0.0


def test_linear_readout_equals_full_resolution_feature_loss():
    from gradad.training.config import ModelConfig
    from gradad.training.model import AnomalyHead

    head = AnomalyHead(ModelConfig(smoothing="mean", smoothing_size=5), (32, 32))
    torch.manual_seed(0)
    region = (torch.rand(2, 1, 32, 32) > 0.6).float()
    weights = linear_readout_weights(head.postprocess, (2, 1, 4, 4), region, pixel_threshold=3.0)
    lowres = torch.rand(2, 1, 4, 4) * 10
    _, full = head.postprocess(lowres)
    expected = feature_loss(full, region, 3.0)
    assert torch.allclose((weights * lowres).sum(dim=(1, 2, 3)), expected, rtol=1e-5)


def test_bilateral_weights_sum_to_one_and_match_direct_computation():
    torch.manual_seed(1)
    guide = torch.rand(1, 3, 6, 7)
    k, ss, sc = 5, 1.0, 1.1
    w = bilateral_weights(guide, k, ss, sc)
    assert torch.allclose(w.sum(dim=1), torch.ones(1, 6, 7), atol=1e-6)
    for (i, j) in [(0, 0), (2, 3), (5, 6), (3, 1)]:
        direct = torch.zeros(k * k)
        for di in range(-2, 3):
            for dj in range(-2, 3):
                y, x = i + di, j + dj
                if 0 <= y < 6 and 0 <= x < 7:
                    color = ((guide[0, :, y, x] - guide[0, :, i, j]) ** 2).sum()
                    direct[(di + 2) * k + dj + 2] = math.exp(-(di * di + dj * dj) / (2 * ss**2)) * torch.exp(
                        -color / (2 * sc**2))
        direct /= direct.sum()
        assert torch.allclose(w[0, :, i, j], direct, atol=1e-6)


def test_shared_gradient_and_adaptive_step():
    guide = torch.zeros(1, 3, 5, 5)
    w = bilateral_weights(guide, 5, 1.0, 1.1)
    same = torch.ones(1, 3, 5, 5)
    shared, step = share_gradients(same, w, 1.0, 3.0)
    assert torch.allclose(shared, same, atol=1e-6)  # weights sum to 1
    assert torch.allclose(step, torch.full_like(step, 3.0))  # full agreement -> max step
    checker = torch.ones(1, 3, 5, 5)
    checker[..., ::2, 1::2] = -1
    checker[..., 1::2, ::2] = -1
    _, step = share_gradients(checker, w, 1.0, 3.0)
    assert step.min() >= 1.0 and step[0, 0, 2, 2] < 1.5  # neighbours disagree -> small step


def test_adan_image_scale_keeps_steps_proportional_to_gradients():
    g = torch.tensor([[[0.5, -2.0], [0.0, 1.0]]])
    adan = AdanDirection(g.shape, (0.98, 0.92, 0.99), 1e-8, "cpu", per_row_scale=True)
    d = adan.direction(g, torch.tensor([0]))
    assert torch.allclose(d, g / g.pow(2).mean().sqrt(), atol=1e-6)  # first step: g / rms(g) of the image


def test_adan_first_direction_is_sign_like_and_matches_recursion():
    g1 = torch.tensor([[0.5, -2.0, 0.0]])
    adan = AdanDirection(g1.shape, (0.98, 0.92, 0.99), 1e-8, "cpu")
    rows = torch.tensor([0])
    d1 = adan.direction(g1, rows)
    assert torch.allclose(d1, g1 / (g1.abs() + 1e-8), atol=1e-6)  # bias-corrected moments: g / |g|
    g2 = torch.tensor([[1.0, -1.0, 1.0]])
    d2 = adan.direction(g2, rows)
    b1, b2, b3 = 0.98, 0.92, 0.99
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = (1 - b2) * (g2 - g1)
    n = b3 * (1 - b3) * g1**2 + (1 - b3) * (g2 + b2 * (g2 - g1)) ** 2
    expected = (m / (1 - b1**2) + b2 * v / (1 - b2**2)) / ((n / (1 - b3**2)).sqrt() + 1e-8)
    assert torch.allclose(d2, expected, atol=1e-5)


def test_em_recovers_two_colour_clusters(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal([-0.5, 0.0, 0.5], 0.05, size=(3000, 3))
    b = rng.normal([0.6, 0.6, -0.6], 0.1, size=(3000, 3))
    prior = fit_pixel_prior(np.concatenate([a, b]), components=2, iterations=30)
    found = sorted(prior.means.tolist())
    assert np.allclose(found[0], [-0.5, 0.0, 0.5], atol=0.02)
    assert np.allclose(found[1], [0.6, 0.6, -0.6], atol=0.02)
    stds = sorted(np.sqrt(np.diagonal(prior.covariances, axis1=1, axis2=2)).mean(axis=1).tolist())
    assert stds == pytest.approx([0.05, 0.1], abs=0.01)
    prior.save(tmp_path / "p.npz")
    again = PixelPrior.load(tmp_path / "p.npz")
    assert np.allclose(again.min_mahalanobis_sq(a[:5]), prior.min_mahalanobis_sq(a[:5]))


def test_prior_load_names_the_bad_file(tmp_path):
    bad = tmp_path / "pixel_prior.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(Exception, match="pixel_prior.npz"):
        PixelPrior.load(bad)


def test_config_validation_names_the_setting():
    with pytest.raises(ConfigError, match="share_kernel"):
        RefineConfig(share_kernel=4)
    with pytest.raises(ConfigError, match=r"unknown setting.*lamda \(known: .*lambda0"):
        refine_config_from_dict({"lamda": 1})
    assert refine_config_from_dict(RefineConfig().to_dict()) == RefineConfig()
