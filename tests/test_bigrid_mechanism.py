"""The bi-grid mechanism on small synthetic features (issue 11, items 1, 2 and 6).

Synthetic "normal" features are smooth per-position patterns with a little noise; anomalies are blocks of
features pasted from a different pattern. Nothing here uses real data.
"""

from __future__ import annotations

import logging

from pathlib import Path

import numpy as np
import pytest
import torch

from gradad.data.datasets import Sample
from gradad.evaluation.metrics import auroc
from gradad.training.config import FBPConfig, preset_config
from gradad.training.defects import DefectSet
from gradad.training.fbp import KINDS, synthesize_anomalies
from gradad.training.model import AnomalyHead, GRADModel
from gradad.training.trainer import (_split_defects, abnormal_step, coordinate_spread, make_optimizer,
                                    stage_parameters, trained_defect_files)
from gradad.training.validation import ValidationSet, fit_fusion_weight, selfcheck, validation_indices

C, H, W = 8, 12, 12


def normal_features(n: int, seed: int) -> torch.Tensor:
    """Smooth position-dependent patterns (what a good part looks like at each position) plus small noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    base = torch.stack([torch.sin(3 * xx + k) + torch.cos(2 * yy - k) for k in range(C)])
    return base.expand(n, -1, -1, -1) + 0.1 * torch.randn(n, C, H, W, generator=g)


def paste_anomaly(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3x3 block of a foreign pattern (large, random direction) in every image; returns (x, mask)."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    mask = torch.zeros(len(x), 1, H, W)
    for i in range(len(x)):
        cy, cx = (int(v) for v in torch.randint(2, H - 2, (2,), generator=g))
        x[i, :, cy - 1 : cy + 2, cx - 1 : cx + 2] += 2.0 * torch.randn(C, 1, 1, generator=g)
        mask[i, 0, cy - 1 : cy + 2, cx - 1 : cx + 2] = 1
    return x, mask


@pytest.fixture(scope="module")
def trained_abnormal_branch() -> tuple[GRADModel, torch.Tensor]:
    return train_abnormal_branch()


def train_abnormal_branch() -> tuple[GRADModel, torch.Tensor]:
    """A tiny model whose abnormal branch (own mapper, pair similarity) trained briefly on synthetic anomalies."""
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    cfg.model.global_grid_size = 2
    cfg.fbp = FBPConfig(max_block=2, intensity_std_range=(1.0, 3.0))
    model = GRADModel(C, (H, W), cfg.model)
    x = normal_features(32, seed=1)
    std = x.transpose(0, 1).reshape(C, -1).std(1)
    params = stage_parameters(model, "abnormal", cfg)
    opt = make_optimizer(model, params, cfg)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        loss = abnormal_step(model, x[torch.randint(0, 32, (8,), generator=gen)], cfg, std, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), std


def test_separate_mapper_is_trained_in_stage_1_and_the_normal_mapper_is_not() -> None:
    cfg = preset_config("tiny")
    model = GRADModel(C, (H, W), cfg.model)
    ids = {id(p) for p in stage_parameters(model, "abnormal", cfg)}
    assert all(id(p) in ids for p in model.abnormal_mapper.parameters())
    assert not any(id(p) in ids for p in model.mapper.parameters())
    normal_ids = {id(p) for p in stage_parameters(model, "normal", cfg)}
    assert all(id(p) in normal_ids for p in model.mapper.parameters())
    assert not any(id(p) in normal_ids for p in model.abnormal_mapper.parameters())
    cfg.model.abnormal_mapper = "shared"
    shared = GRADModel(C, (H, W), cfg.model)
    assert not hasattr(shared, "abnormal_mapper")
    assert all(id(p) in {id(q) for q in stage_parameters(shared, "abnormal", cfg)} for p in shared.mapper.parameters())


def test_coordinate_spread_reports_each_mapper() -> None:
    model = GRADModel(C, (H, W), preset_config("tiny").model)
    spread = coordinate_spread(model, normal_features(4, 0))
    assert set(spread) == {"normal", "abnormal"} and len(spread["normal"]["g_std"]) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_every_anomaly_kind_changes_only_masked_neighbourhoods(kind: str) -> None:
    x = normal_features(4, 0)
    cfg = FBPConfig(kinds=[kind], blur_sigma=0.0, intensity_std_range=(2.0, 2.0), blocks_per_image=(1, 1))
    out, mask = synthesize_anomalies(x, cfg, torch.ones(C), torch.Generator().manual_seed(0))
    changed = (out - x).abs().amax(dim=1, keepdim=True) > 1e-6
    assert mask.sum() > 0 and changed.any()
    assert not (changed & (mask == 0)).any()  # no blur: nothing outside the blocks moves
    if kind in ("scaled", "direction"):  # per-channel sigma units: every channel of a block cell moves
        assert ((out - x).abs()[mask.expand_as(x) > 0] > 0).all()


def test_anomaly_kinds_are_mixed_by_weight() -> None:
    x = torch.zeros(64, C, H, W)
    cfg = FBPConfig(kinds=["constant", "scaled"], kind_weights=[1.0, 0.0], blur_sigma=0.0)
    out, mask = synthesize_anomalies(x, cfg, torch.ones(C), torch.Generator().manual_seed(0))
    # Only the constant kind: every channel of a marked cell holds the same positive value.
    cells = out.permute(0, 2, 3, 1)[mask[:, 0] > 0]
    assert (cells > 0).all() and torch.allclose(cells, cells[:, :1].expand_as(cells))


def test_abnormal_score_learns_and_transfers_to_pasted_anomalies(trained_abnormal_branch) -> None:
    model, _ = trained_abnormal_branch
    x, mask = paste_anomaly(normal_features(16, seed=5), seed=6)
    with torch.no_grad():
        d = model(x).abnormal_score
    # Pasted foreign features were never a training kind: the pair similarity still ranks them above normal cells.
    assert auroc(mask.flatten().numpy().astype(int), d.flatten().numpy()) > 0.8


def test_fused_map_rises_at_anomalies_and_not_at_normal_cells(trained_abnormal_branch) -> None:
    model, _ = trained_abnormal_branch
    x, mask = paste_anomaly(normal_features(16, seed=7), seed=8)
    with torch.no_grad():
        out = model(x)
        off = model.lowres_map(out, x)  # fusion weight 0: abnormal branch off
        model.fusion_weight.fill_(1.0)
        on = model.lowres_map(out, x)
        model.fusion_weight.fill_(0.0)
    gain = on - off
    assert (gain >= 0).all()  # relu(d): the abnormal branch can only raise the map
    assert gain[mask > 0].mean() > 0.3
    # Away from the anomalies (beyond the one-cell ring that training's blurred blocks also touch) the map stays
    # where it was at most cells and rises far less than at the anomalies.
    far = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1) == 0
    assert gain[far].median() == 0
    assert gain[mask > 0].mean() > 4 * gain[far].mean()


def test_selfcheck_marks_heldout_kinds_and_fusion_fit_picks_a_positive_weight(trained_abnormal_branch) -> None:
    model, std = trained_abnormal_branch
    fbp = FBPConfig(max_block=2, intensity_std_range=(1.0, 3.0))
    val = ValidationSet.build(normal_features(12, seed=9), fbp, std)
    check = selfcheck(model, val)
    assert set(check) == set(KINDS)
    assert {k for k, v in check.items() if v["trained"]} == set(fbp.kinds)
    assert check["constant"]["trained"] is False and 0.0 <= check["noise"]["abnormal_auroc"] <= 1.0
    head = AnomalyHead(preset_config("tiny").model, (H * 4, W * 4))
    weight, table = fit_fusion_weight(model, val, head)
    assert weight > 0 and table[max(table, key=table.get)] >= table["0"]


def test_defect_holdout_keeps_one_per_folder_in_training_and_holds_out_a_share_of_each() -> None:
    sizes = {"crack": 3, "hole": 1, "cut": 6}
    samples = [Sample(Path(f"bad/{t}/{i}.png"), "defects", "train", 1, t, None) for t, n in sizes.items() for i in range(n)]
    defects = DefectSet(torch.arange(len(samples), dtype=torch.float32).reshape(-1, 1, 1, 1),
                        torch.ones(len(samples), 1, 1, 1), samples)
    train, held = defects.split(1 / 3)
    assert held is not None
    held_names = [str(s.image_path) for s in held.samples]
    assert held_names == ["bad/crack/1.png", "bad/cut/1.png", "bad/cut/4.png"]  # spread over each folder
    assert {s.defect_type for s in train.samples} == set(sizes)  # every folder still trains stage 1
    assert len(train.samples) + len(held.samples) == len(samples)
    # features follow their samples
    assert [int(v) for v in held.features.flatten()] == [samples.index(s) for s in held.samples]
    assert defects.split(0.0)[1] is None


def test_defect_holdout_log_names_a_few_held_out_files_with_their_folder(caplog: pytest.LogCaptureFixture) -> None:
    samples = [Sample(Path(f"bad/{t}/{i:03d}.png"), "defects", "train", 1, t, None) for t in ("a", "b") for i in range(60)]
    defects = DefectSet(torch.zeros(len(samples), 1, 1, 1), torch.ones(len(samples), 1, 1, 1), samples)
    with caplog.at_level(logging.INFO, logger="gradad.training.trainer"):
        _, held = _split_defects(defects, 0.5)
    assert held is not None and len(held.samples) == 60
    line = next(r.getMessage() for r in caplog.records if "held out for the self-check" in r.getMessage())
    assert "a/001.png" in line and "(48 more)" in line  # 12 named, with the folder that tells same names apart
    assert len(line) < 400


def test_fusion_fit_uses_heldout_real_defects_when_there_are_any(trained_abnormal_branch) -> None:
    model, std = trained_abnormal_branch
    fbp = FBPConfig(max_block=2, intensity_std_range=(1.0, 3.0))
    x, mask = paste_anomaly(normal_features(6, seed=11), seed=12)
    real = DefectSet(x, mask, [Sample(f"r{i}.png", "defects", "train", 1, "paste", None) for i in range(6)])
    trained = ValidationSet.build(normal_features(12, seed=9), fbp, std, real)
    assert "real" in trained.trained_kinds
    val = ValidationSet.build(normal_features(12, seed=9), fbp, std, real, defects_trained=False)
    assert "real" not in val.trained_kinds and selfcheck(model, val)["real"]["trained"] is False
    head = AnomalyHead(preset_config("tiny").model, (H * 4, W * 4))
    weight, table = fit_fusion_weight(model, val, head)
    _, real_only = fit_fusion_weight(model, val, head, kinds=["real"])
    assert table == real_only  # the default fit is the held-out real defects' fit
    assert weight > 0


def test_validation_scores_a_unified_model_class_by_class() -> None:
    """Class b's maps run 5x higher than class a's; each class's defects stand out within their class. Pooled,
    a's defects would rank below b's clean images; scored per class and averaged, detection is perfect."""
    from gradad.training.validation import _detection

    classes = ["a"] * 4 + ["b"] * 4
    level = torch.tensor([1.0] * 4 + [5.0] * 4).view(-1, 1, 1, 1)
    clean_maps = level * (1 + 0.01 * torch.rand(8, 1, H, W))
    mask = torch.zeros(8, 1, H, W)
    mask[:, :, 2:4, 2:4] = 1
    defect_maps = clean_maps + level * mask  # twice the class's level inside the defect
    maps = {"clean": (clean_maps, torch.zeros_like(clean_maps)),
            "real": (defect_maps, torch.zeros_like(defect_maps), mask)}
    val = ValidationSet(torch.zeros(8, 1, H, W), {"real": (torch.zeros(8, 1, H, W), mask)},
                        classes={"clean": classes, "real": classes})
    head = AnomalyHead(preset_config("tiny").model, (H * 4, W * 4))
    assert _detection(maps, head, 0.0, val) == pytest.approx(1.0)
    pooled = ValidationSet(val.clean, val.anomalous)
    assert _detection(maps, head, 0.0, pooled) < 0.95
    assert [(list(c), list(k)) for c, k in val.class_groups("real")] == [([0, 1, 2, 3], [0, 1, 2, 3]),
                                                                         ([4, 5, 6, 7], [4, 5, 6, 7])]
    # defects of no known class (a folder that does not name one) are ranked against every clean image
    val.classes["real"] = ["a"] * 4 + ["defects"] * 4
    assert [(list(c), list(k)) for c, k in val.class_groups("real")] == [([0, 1, 2, 3], [0, 1, 2, 3]),
                                                                         (list(range(8)), [4, 5, 6, 7])]


def test_defect_folders_name_their_class_in_the_split_layout(tmp_path: Path) -> None:
    from gradad.training.defects import defect_samples

    for rel in ("tile/crack/0.png", "tile/crack/1.png", "tire/cut/0.png", "hole/0.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    names = {str(s.image_path.relative_to(tmp_path)): s.class_name for s in defect_samples(tmp_path, None)}
    assert names == {"tile/crack/0.png": "tile", "tile/crack/1.png": "tile", "tire/cut/0.png": "tire",
                     "hole/0.png": "defects"}
    # with the training classes known, DIR/<class>/image names its class too, and unknown top folders do not
    (tmp_path / "tire" / "2.png").write_bytes(b"")
    named = {str(s.image_path.relative_to(tmp_path)): s.class_name
             for s in defect_samples(tmp_path, None, classes={"tire"})}
    assert named == {"tile/crack/0.png": "defects", "tile/crack/1.png": "defects", "tire/cut/0.png": "tire",
                     "tire/2.png": "tire", "hole/0.png": "defects"}


def test_validation_split_takes_every_kth_image_per_class_never_the_first() -> None:
    samples = [Sample(f"{c}{i}.png", c, "train", 0, "good", None) for c in ("a", "b") for i in range(20)]
    idx = validation_indices(samples, 0.1)
    assert len(idx) == 4 and {samples[i].class_name for i in idx} == {"a", "b"}
    assert 0 not in idx and 20 not in idx
    assert len(validation_indices(samples, 0.0)) == 0


def test_trained_defects_are_recorded_as_the_files_their_links_point_to(tmp_path: Path) -> None:
    """grad-refine tune compares them with test images: a tuning split's links must resolve to those."""
    test_image = tmp_path / "data" / "test" / "crack" / "000.png"
    test_image.parent.mkdir(parents=True)
    test_image.write_bytes(b"")
    link = tmp_path / "split" / "crack" / "000.png"
    link.parent.mkdir(parents=True)
    link.symlink_to(test_image)
    defects = DefectSet(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1),
                        [Sample(link, "defects", "train", 1, "crack", None)])
    assert trained_defect_files(defects) == [str(test_image.resolve())]
    assert trained_defect_files(None) == []
