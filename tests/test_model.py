"""GRAD model pieces: refinement formula, grids, fusion, anomaly head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradad.training.config import ModelConfig, preset_config
from gradad.training.model import (
    AnomalyHead,
    BiGridMemory,
    GRADModel,
    SimilarityRefinement,
    similarity_refine,
    standardize_per_channel,
)


def test_refinement_matches_hand_computed_case() -> None:
    cfg = ModelConfig(refine_mask_weight=0.3)  # the paper's form, hard mask included
    # Two positions, two channels. Position 0: x_hat = (1, 0), x = (1, 1) -> m = 0.5, M = 1 (0.025 < 0.5),
    # cos = 1/sqrt(2); S = 0.3 + 0.7/sqrt(2). Position 1: x_hat = (10, 0), x = (0, 10) -> m = 100,
    # 0.05*100 = 5 >= 0.5 so M = 0, cos = 0, S = 0 -> x_ref = x_hat.
    x_hat = torch.tensor([[1.0, 10.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    x = torch.tensor([[1.0, 0.0], [1.0, 10.0]]).view(1, 2, 1, 2)
    out = similarity_refine(x_hat, x, cfg)
    s0 = 0.3 + 0.7 / math.sqrt(2)
    expected0 = [s0 * 1 + (1 - s0) * 1, s0 * 1 + (1 - s0) * 0]
    assert out[0, :, 0, 0].tolist() == pytest.approx(expected0, abs=1e-6)
    assert out[0, :, 0, 1].tolist() == pytest.approx([10.0, 0.0], abs=1e-6)


def test_the_map_refinement_has_no_jump_where_the_papers_hard_mask_switches() -> None:
    """The map's refinement (S = 0.7*cos, no hard mask) grows smoothly with the residual. The paper's mask (a = 0.3,
    M = [0.05*m < 0.5]), which stage 2's loss keeps, makes it jump about 4x where m crosses 10, which with this
    extractor lies inside the normal texture's range (median m 4.5, p99 11.6 on good MTD cells)."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 1, 1) * 4.0
    direction = torch.randn(1, 64, 1, 1)
    direction /= direction.pow(2).mean().sqrt()  # m = t^2 for x_hat = x + t*direction
    ts = torch.linspace(2.5, 4.0, 151)  # m from 6.25 to 16: crosses the paper's threshold at t = sqrt(10)
    cfg = ModelConfig()
    assert (cfg.map_refine_mask_weight, cfg.refine_mask_weight) == (0.0, 0.3)
    map_refine = SimilarityRefinement(cfg)
    smooth = torch.stack([(map_refine(x + t * direction, x) - x).norm() for t in ts])
    loss_form = torch.stack([(similarity_refine(x + t * direction, x, cfg) - x).norm() for t in ts])
    assert (smooth.diff() > 0).all() and (smooth[1:] / smooth[:-1]).max() < 1.05
    assert (loss_form[1:] / loss_form[:-1]).max() > 2.0  # the jump at m = 10


def test_stage2_loss_uses_the_papers_refinement_and_the_map_the_smooth_one() -> None:
    from gradad.training.trainer import normal_step

    cfg = preset_config("tiny").model
    model = GRADModel(16, (8, 8), cfg).eval()
    x = torch.randn(2, 16, 8, 8) * 4
    with torch.no_grad():
        x_hat = model.normal_reconstruction(x)
        loss = normal_step(model, x)
        expected = F.mse_loss(similarity_refine(x_hat, x, cfg), x)
        map_form = F.mse_loss(similarity_refine(x_hat, x, cfg, mask_weight=0.0), x)
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)
        assert float(expected) != pytest.approx(float(map_form), rel=1e-3)
        assert torch.allclose(model(x).x_ref, similarity_refine(x_hat, x, cfg, mask_weight=0.0))


def test_perfect_reconstruction_gives_zero_map() -> None:
    cfg = ModelConfig()
    x = torch.randn(2, 8, 4, 4)
    head = AnomalyHead(cfg, (32, 32))
    score, amap = head(similarity_refine(x.clone(), x, cfg), x)
    assert amap.shape == (2, 1, 32, 32)
    assert torch.allclose(amap, torch.zeros_like(amap), atol=1e-5)
    assert score.shape == (2,)


def test_head_score_is_max_of_pooled_map() -> None:
    cfg = ModelConfig(smoothing="none", score_pool=4)
    x = torch.zeros(1, 1, 8, 8)
    x_ref = torch.zeros(1, 1, 8, 8)
    x_ref[0, 0, 2, 2] = 3.0  # one feature cell off by 3
    head = AnomalyHead(cfg, (8, 8))
    score, amap = head(x_ref, x)
    assert amap[0, 0, 2, 2] == pytest.approx(3.0)
    assert score.item() == pytest.approx(3.0 / 16)  # a 4x4 window containing the single hot pixel


def test_mean_smoothing_keeps_constant_maps_constant() -> None:
    cfg = ModelConfig(smoothing="mean", smoothing_size=5)
    x = torch.zeros(1, 2, 4, 4)
    x_ref = torch.ones(1, 2, 4, 4)
    _, amap = AnomalyHead(cfg, (16, 16))(x_ref, x)
    assert torch.allclose(amap, torch.full_like(amap, math.sqrt(2)), atol=1e-5)


def test_standardize_per_channel() -> None:
    q = torch.randn(3, 5, 6, 7) * 4 + 2
    z = standardize_per_channel(q)
    assert torch.allclose(z.mean(dim=(2, 3)), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(z.std(dim=(2, 3), unbiased=False), torch.ones(3, 5), atol=1e-3)


def test_grid_sampling_reads_the_grid_at_the_coordinates() -> None:
    mem = BiGridMemory(channels=2, feat_hw=(1, 1), local_size=2, global_size=2)
    with torch.no_grad():
        mem.local_grid.copy_(torch.arange(8.0).view(1, 2, 2, 2))
        mem.global_grid.copy_(torch.arange(8.0).view(1, 2, 2, 2) * 10)
    # align_corners=False: cell centres of a 2x2 grid sit at +-0.5.
    u = torch.tensor([[[[-0.5, -0.5]]]])  # top-left cell
    g = torch.tensor([[[[0.5, 0.5]]]])  # bottom-right cell
    q = mem(g, u)
    assert q.shape == (1, 4, 1, 1)
    assert q.flatten().tolist() == pytest.approx([30.0, 70.0, 0.0, 4.0])


def test_cells_span_reads_every_global_cell_at_full_weight() -> None:
    """model.global_coord_span: with "tanh", g = +-1 lies in the zero-padding band (a quarter of the corner cell is
    read); with "cells", [-1, 1] spans the outer cell centres: the corner cell at full weight, the centre unchanged."""
    values = torch.arange(16.0).view(1, 1, 4, 4)
    for span, corner in (("tanh", 0.25 * 15.0), ("cells", 15.0)):
        mem = BiGridMemory(channels=1, feat_hw=(1, 1), local_size=2, global_size=4, global_span=span)
        with torch.no_grad():
            mem.global_grid.copy_(values)
        u = torch.zeros(1, 1, 1, 2)
        assert mem(torch.tensor([[[[1.0, 1.0]]]]), u)[0, 0].item() == pytest.approx(corner)
        assert mem(torch.zeros(1, 1, 1, 2), u)[0, 0].item() == pytest.approx(values.mean().item())
    cfg = ModelConfig(global_coord_span="cells")
    model = GRADModel(4, (2, 2), cfg)
    assert model.normal_grid.global_scale == pytest.approx(3 / 4)


def test_model_forward_shapes_and_fusion_forms() -> None:
    cfg = preset_config("tiny").model
    model = GRADModel(16, (8, 8), cfg).eval()
    x = torch.randn(2, 16, 8, 8)
    out = model(x)
    for t in (out.x_hat, out.x_hat_normal, out.x_hat_abnormal, out.x_ref):
        assert t.shape == x.shape
    assert out.abnormal_score.shape == (2, 1, 8, 8)
    # "map" form (default): the features are reconstructed by the normal branch alone.
    assert torch.equal(out.x_hat, out.x_hat_normal)
    cfg.fusion_form = "additive"
    with torch.no_grad():
        model.fusion_weight.fill_(-0.2)
    out = model(x)
    assert torch.allclose(out.x_hat, out.x_hat_normal - 0.2 * out.x_hat_abnormal, atol=1e-6)
    cfg.fusion_form = "lambda"
    with torch.no_grad():
        model.fusion_weight.fill_(0.8)
    out = model(x)
    assert torch.allclose(out.x_hat, 0.8 * out.x_hat_normal + 0.2 * out.x_hat_abnormal, atol=1e-6)


def test_coordinate_jitter_only_in_training() -> None:
    cfg = preset_config("tiny").model
    cfg.jitter_prob, cfg.jitter_std = 1.0, 0.05
    model = GRADModel(16, (8, 8), cfg)
    x = torch.randn(2, 16, 8, 8)
    model.eval()
    g1, u1 = model.coordinates(x)
    _, u2 = model.coordinates(x)
    assert torch.equal(u1, u2)
    assert g1.shape == (2, 1, 1, 2) and u1.shape == (2, 8, 8, 2)
    assert u1.abs().max() <= 1.0
    model.train()
    _, u3 = model.coordinates(x)
    assert not torch.equal(u1, u3)
    assert (u3 - u1).std().item() == pytest.approx(0.05, rel=0.3)


def test_paper_fusion_uses_basic_blocks() -> None:
    cfg = preset_config("paper").model
    model = GRADModel(8, (4, 4), cfg)
    names = {type(m).__name__ for m in model.normal_cnn}
    assert "BasicBlock" in names and len(model.normal_cnn) == 10  # 9 blocks + 1x1 projection
    assert model.normal_grid.global_grid.shape == (1, 8 * 16, 8, 8)


def test_batched_grid_sampling_equals_per_image_sampling() -> None:
    import torch.nn.functional as F

    mem = BiGridMemory(channels=6, feat_hw=(4, 5), local_size=8, global_size=4)
    g = torch.rand(3, 1, 1, 2) * 2 - 1
    u = torch.rand(3, 4, 5, 2) * 2.2 - 1.1  # some points outside [-1, 1]: zero padding
    q = mem(g, u)
    local = F.grid_sample(mem.local_grid.expand(3, -1, -1, -1), u, align_corners=False)
    glob = F.grid_sample(mem.global_grid.expand(3, -1, -1, -1), g, align_corners=False).reshape(3, 6, 4, 5)
    assert torch.allclose(q, torch.cat([glob, local], dim=1), atol=1e-6)


def test_model_files_from_before_the_separate_mapper_still_load(tmp_path) -> None:
    """A file written before model.abnormal_mapper / abnormal_score / map_scales existed loads as the model it was."""
    from gradad.training.checkpoint import model_payload, read_checkpoint

    legacy = preset_config("tiny")
    legacy.model.abnormal_mapper, legacy.model.abnormal_score = "shared", "channel0"
    legacy.model.refine_mask_weight = 0.2  # the map took the loss's weight, whatever it was
    legacy.model.image_gaussian = False
    model = GRADModel(16, (8, 8), legacy.model)
    payload = model_payload(legacy, model, {})
    for key in ("abnormal_mapper", "abnormal_score", "map_scales", "map_refine_mask_weight", "image_gaussian"):
        del payload["config"]["model"][key]
    del payload["state_dict"]["map_scale_gain"]
    payload["best"] = {"score": 0.5, "epoch": 1, "state": dict(payload["state_dict"])}  # an interrupted run's
    torch.save(payload, tmp_path / "old.pt")
    loaded = read_checkpoint(tmp_path / "old.pt")
    cfg = preset_config("tiny")
    cfg.model.abnormal_mapper = loaded["config"]["model"]["abnormal_mapper"]
    cfg.model.abnormal_score = loaded["config"]["model"]["abnormal_score"]
    cfg.model.map_scales = tuple(loaded["config"]["model"]["map_scales"])
    assert cfg.model.map_scales == (1,)  # written before the multi-scale map: the plain map, as it was
    # written before the map had its own refinement setting: the map used the loss's hard mask
    assert loaded["config"]["model"]["map_refine_mask_weight"] == 0.2
    # written before the image Gaussian: the image score stays the map's
    assert loaded["config"]["model"]["image_gaussian"] is False
    cfg.model.image_gaussian = False
    rebuilt = GRADModel(16, (8, 8), cfg.model)
    rebuilt.load_state_dict(loaded["state_dict"])  # strict: same modules as before
    rebuilt.load_state_dict(loaded["best"]["state"])  # the best epoch of an interrupted run resumes too
    # An old NORMAL-only file carried (unused) abnormal weights: they are dropped, the rest loads strictly.
    payload["config"]["model"]["abnormal_branch"] = False
    torch.save(payload, tmp_path / "old_normal_only.pt")
    normal_only = read_checkpoint(tmp_path / "old_normal_only.pt")
    cfg.model.abnormal_branch = False
    GRADModel(16, (8, 8), cfg.model).load_state_dict(normal_only["state_dict"])



def test_an_image_gaussian_that_does_not_match_its_setting_is_refused_and_old_files_keep_means_and_stds(tmp_path) -> None:
    """A file whose statistics do not have the dimensions its setting implies is refused on load (one line naming
    both); a file written before the setting existed modelled means and standard deviations, and loads so."""
    from gradad.training.backbone import FeatureExtractor
    from gradad.training.checkpoint import CheckpointError, load_detector, model_payload
    from gradad.training.image_gaussian import placeholder_statistics

    cfg = preset_config("tiny")
    cfg.backbone.weights = "none"
    cfg.model.image_gaussian, cfg.model.image_gaussian_stats = True, "mean"
    channels = FeatureExtractor(cfg.backbone).channels
    model = GRADModel(channels, (8, 8), cfg.model)
    model.image_gaussian.set_statistics(placeholder_statistics(2 * channels))  # fitted on means and stds
    payload = model_payload(cfg, model, {})
    assert payload["config"]["model"]["image_gaussian_stats"] == "mean"
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=f"{2 * channels} dimensions.*'mean'"):
        load_detector(tmp_path / "edited.pt")
    del payload["config"]["model"]["image_gaussian_stats"]  # written before the setting: means and stds, as it was
    torch.save(payload, tmp_path / "old.pt")
    detector, _ = load_detector(tmp_path / "old.pt")
    assert detector.model.image_gaussian.stats == "mean_std"
    x = torch.randn(2, channels, 8, 8)
    assert detector.model.image_gaussian(x, torch.ones(2)).shape == (2,)

def _faint_patch_features(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, x_ref, mask): iid cell noise in the residual everywhere, plus a 9x9-cell patch whose residuals share one
    direction at a third of the noise's per-cell norm (a large faint defect such as MTD's "uneven")."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = 32, 24, 24
    x = torch.randn(4, c, h, w, generator=gen)
    residual = torch.randn(4, c, h, w, generator=gen)
    mask = torch.zeros(4, 1, h, w)
    mask[:2, :, 6:15, 6:15] = 1
    direction = torch.randn(1, c, 1, 1, generator=gen)
    direction = direction / direction.norm() * residual.norm(dim=1).mean() / 3
    return x, x + residual + mask * direction, mask


def test_multiscale_map_finds_a_large_faint_defect_that_the_plain_map_misses() -> None:
    from gradad.evaluation.metrics import auroc
    from gradad.training.model import MapFusion, residual_scale_maps

    x, x_ref, mask = _faint_patch_features(0)
    assert torch.allclose(residual_scale_maps(x_ref, x, (1,))[0], AnomalyHead.lowres_map(x_ref, x))
    clean_x, clean_ref, _ = _faint_patch_features(1)
    clean_ref = clean_x + (clean_ref - clean_x) * (1 - _faint_patch_features(1)[2])  # same noise, no defect
    means = torch.stack([m.mean() for m in residual_scale_maps(clean_ref, clean_x, (1, 3, 5, 7))])
    gains = means[0] / means
    plain = MapFusion((1,))(x_ref, x)
    multi = MapFusion((1, 3, 5, 7))(x_ref, x, gains=gains)
    labels = mask.flatten().numpy().astype(int)
    assert auroc(labels, plain.flatten().numpy()) < 0.7  # the faint patch hides in the cell noise
    assert auroc(labels, multi.flatten().numpy()) > 0.9  # the rest: the patch border, blurred by pooling
    assert bool((multi >= plain - 1e-6).all())  # the plain scale is one of the maxima: a sharp defect stays


def test_multiscale_map_keeps_a_single_sharp_cell_on_top() -> None:
    from gradad.training.model import MapFusion

    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    x_ref = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    x_ref[0, :, 8, 8] += 5.0
    gains = torch.tensor([1.0, 1.5, 2.0])
    amap = MapFusion((1, 3, 5))(x_ref, x, gains=gains)
    assert int(amap[0, 0].argmax()) == 8 * 16 + 8


def test_map_scale_gains_put_every_scale_in_plain_map_units() -> None:
    from gradad.training.model import residual_scale_maps
    from gradad.training.validation import fit_map_scale_gains

    cfg = preset_config("tiny").model
    cfg.map_scales = (1, 3, 5)
    model = GRADModel(16, (8, 8), cfg)
    feats = torch.randn(24, 16, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    gains = fit_map_scale_gains(model, feats, batch=8)
    assert gains[0] == 1.0 and gains[1] > 1.0 and gains[2] > gains[1]  # pooling cancels noise: coarser = smaller
    model.eval()
    with torch.no_grad():
        x = feats.float()
        x_ref = model(x).x_ref
        means = [float(m.mean()) for m in residual_scale_maps(x_ref, x, cfg.map_scales)]
    for g, m in zip(gains, means):
        assert g * m == pytest.approx(means[0], rel=1e-3)


def test_map_scales_setting_is_parsed_and_checked() -> None:
    from gradad.errors import ConfigError
    from gradad.training.config import apply_set_options

    cfg = apply_set_options(preset_config("tiny"), ["model.map_scales=1,3,5"])
    assert cfg.model.map_scales == (1, 3, 5)
    assert apply_set_options(preset_config("tiny"), ["model.map_scales=1"]).model.map_scales == (1,)
    for bad in ("3,5", "1,2", "1,5,3"):
        cfg = apply_set_options(preset_config("tiny"), [f"model.map_scales={bad}"])
        with pytest.raises(ConfigError, match="model.map_scales"):
            cfg.validate()
