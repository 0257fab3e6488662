"""Image-level Gaussian of pooled features added to the map's image score (training/image_gaussian.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradad.export.precision import keeps_fp32_name
from gradad.training.image_gaussian import (MIN_TRAIN_IMAGES, ImageGaussian, cross_fitted_distances,
                                            fit_image_gaussian, ledoit_wolf, mahalanobis, pooled_statistics,
                                            require_training_images, whitening)

C, HW = 6, 5


def _goods(gen: torch.Generator, n: int, offset: float) -> torch.Tensor:
    """Good images of one class: a per-image level of every channel (shared by all cells) plus cell noise."""
    return offset + 0.3 * torch.randn(n, C, 1, 1, generator=gen) + torch.randn(n, C, HW, HW, generator=gen)


def _map_score(f: torch.Tensor) -> torch.Tensor:
    """A stand-in for the map's image score whose scale differs between classes (it grows with the level)."""
    return f.abs().mean(dim=(1, 2, 3)) * 3.0


def _fit(classes: dict[str, float], n_train: int = 40, n_val: int = 12, seed: int = 0, stats: str = "mean_std"):
    gen = torch.Generator().manual_seed(seed)
    train = {c: _goods(gen, n_train, o) for c, o in classes.items()}
    val = {c: _goods(gen, n_val, o) for c, o in classes.items()}
    names = list(classes)
    fitted = fit_image_gaussian(torch.cat([train[c] for c in names]), [c for c in names for _ in range(n_train)],
                               torch.cat([val[c] for c in names]), [c for c in names for _ in range(n_val)],
                               _map_score, stats)
    module = ImageGaussian(stats)
    module.set_statistics(fitted)
    return module, fitted, gen


def test_ledoit_wolf_matches_scikit_learn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    f = torch.randn(30, 12, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.5, 3, 12)
    mean, cov, shrink = ledoit_wolf(f)
    ref = covariance.LedoitWolf().fit(f.double().numpy())
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-6)
    np.testing.assert_allclose(cov.numpy(), ref.covariance_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mean.numpy(), ref.location_, rtol=1e-9)


def test_an_image_whose_global_texture_changed_scores_above_every_good_image_at_the_same_map_score() -> None:
    """The case the map misses: every cell a little off (texture twice as rough on two channels), no cell an
    outlier. At equal map scores the Gaussian part alone must rank it above every held-out good image (the default
    models the standard deviations too)."""
    module, _, gen = _fit({"a": 0.0})
    goods = _goods(gen, 30, 0.0)
    rough = _goods(gen, 5, 0.0)
    rough[:, :2] *= 2.0
    same = torch.full((len(goods),), 1.0)
    good_scores = module(goods, same)
    rough_scores = module(rough, same[: len(rough)])
    assert rough_scores.min() > good_scores.max()
    # the map part still counts one-for-one, and the score stays in the map's units, >= 0
    lifted = module(goods, same + 2.0)
    torch.testing.assert_close(lifted - good_scores, torch.full_like(good_scores, 2.0))
    assert float(module(goods, torch.zeros(len(goods))).min()) >= 0.0


def test_a_gaussian_of_channel_means_alone_ranks_a_shifted_image_above_every_good_one() -> None:
    """A global shift of two channels' level (a stain, a lighting or material change), each cell within the normal
    spread: a Gaussian of the means alone (C dimensions) ranks it above every good image at equal map scores."""
    module, stats, gen = _fit({"a": 0.0}, stats="mean")
    assert module.stats == "mean" and stats.mean.shape == (1, C)
    goods = _goods(gen, 30, 0.0)
    shifted = _goods(gen, 5, 0.0)
    shifted[:, :2] += 1.2  # 4x the per-image level spread, about one cell-noise sigma
    same = torch.full((len(goods),), 1.0)
    assert module(shifted, same[: len(shifted)]).min() > module(goods, same).max()


def test_a_unified_fit_scores_every_image_against_its_nearest_class() -> None:
    module, stats, gen = _fit({"dark": 0.0, "bright": 6.0})
    assert stats.classes == ["bright", "dark"]  # sorted rows
    for row, offset in ((0, 6.0), (1, 0.0)):
        x = _goods(gen, 8, offset)
        s = _map_score(x)
        dist = mahalanobis(pooled_statistics(x, module.stats), stats.mean[row], stats.whiten[row])
        z_sum = (dist - stats.gauss_center[row]) / stats.gauss_scale[row] + \
            (s.double() - stats.map_center[row]) / stats.map_scale[row]
        # the sum of both z-scores, in the class's map units
        expected = (stats.map_center[row] + stats.map_scale[row] * z_sum).clamp_min(0)
        torch.testing.assert_close(module(x, s).double(), expected, rtol=1e-4, atol=1e-4)


def test_the_map_score_is_normalised_on_training_images_only_when_a_class_has_too_few_held_out_ones(caplog) -> None:
    gen = torch.Generator().manual_seed(1)
    train, val = _goods(gen, 20, 0.0), _goods(gen, 3, 0.0)
    with caplog.at_level("WARNING"):
        stats = fit_image_gaussian(train, ["a"] * 20, val, ["a"] * 3, _map_score)
    assert "incl. training ones" in stats.reference[0] and "class a has 3 validation image(s)" in caplog.text
    enough = fit_image_gaussian(train, ["a"] * 20, _goods(gen, 10, 0.0), ["a"] * 10, _map_score)
    assert enough.reference[0] == "10 validation images"


def test_few_or_identical_images_give_finite_statistics_and_too_few_are_refused_before_training() -> None:
    gen = torch.Generator().manual_seed(2)
    for f in (torch.randn(2, 12, generator=gen), torch.ones(5, 12), torch.randn(MIN_TRAIN_IMAGES, 12, generator=gen)):
        mean, cov, _ = ledoit_wolf(f)  # 2 samples: shrinkage 0, a singular covariance; identical: all zero
        assert torch.isfinite(whitening(cov)).all()
        assert torch.isfinite(mahalanobis(f, mean, whitening(cov))).all()
    assert torch.isfinite(cross_fitted_distances(torch.randn(MIN_TRAIN_IMAGES, 12, generator=gen))).all()
    with pytest.raises(ValueError, match=r"at least 4 training images per class.*nut \(3\)"):
        require_training_images(["fabric"] * 7 + ["nut"] * 3)
    require_training_images(["fabric"] * MIN_TRAIN_IMAGES)


def test_unfitted_passes_the_map_score_through_and_fitted_statistics_survive_a_state_dict_round_trip() -> None:
    x = torch.randn(4, C, HW, HW)
    s = torch.rand(4)
    assert torch.equal(ImageGaussian()(x, s), s)
    module, _, _ = _fit({"a": 0.0, "b": 4.0})
    fresh = ImageGaussian()
    fresh.load_state_dict(module.state_dict())  # strict; shapes come from the file
    torch.testing.assert_close(fresh(x, s), module(x, s))
    assert fresh.mean.shape == (2, 2 * C)
    # a state without the module's keys (a file written before it) loads unfitted, strictly
    holder = nn.Module()
    holder.image_gaussian = ImageGaussian()
    holder.load_state_dict({}, strict=True)
    assert not holder.image_gaussian.fitted


def test_the_image_gaussian_exports_to_onnx_matches_torch_and_stays_fp32(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")

    class Wrapper(nn.Module):
        def __init__(self, gaussian: ImageGaussian) -> None:
            super().__init__()
            self.image_gaussian = gaussian

        def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return self.image_gaussian(x, s)

    module, _, gen = _fit({"dark": 0.0, "bright": 6.0})
    wrapper = Wrapper(module).eval()
    x = torch.cat([_goods(gen, 3, 0.0), _goods(gen, 3, 6.0)])
    s = _map_score(x)
    path = tmp_path / "gaussian.onnx"
    torch.onnx.export(wrapper, (x, s), str(path), dynamo=False, opset_version=17, input_names=["x", "s"],
                      output_names=["score"], dynamic_axes={"x": {0: "b"}, "s": {0: "b"}, "score": {0: "b"}})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy(), "s": s.numpy()})[0]
    np.testing.assert_allclose(got, wrapper(x, s).detach().numpy(), rtol=1e-4, atol=1e-4)
    names = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMul", "ArgMin", "GatherElements")]
    assert names and all(keeps_fp32_name(n) for n in names)


def test_training_fits_the_image_gaussian_of_every_class(trained_tiny: Path) -> None:
    from gradad.training.checkpoint import load_detector, read_checkpoint

    payload = read_checkpoint(trained_tiny)
    assert sorted(payload["image_gaussian"]) == sorted(payload["classes"])
    detector, _ = load_detector(trained_tiny)
    gaussian = detector.model.image_gaussian
    assert gaussian.fitted and gaussian.mean.shape[0] == len(payload["classes"])
    x = torch.randn(2, detector.model.channels, *detector.model.feat_hw)
    with torch.no_grad():
        score, amap = detector.from_features(x)
        map_score, _ = detector.head.postprocess(detector.model.lowres_map(detector.model(x), x))
    assert not torch.allclose(score, map_score)  # the image score is no longer the map's alone
