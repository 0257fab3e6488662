"""PatchCore baseline: coreset selection and nearest-neighbour scoring."""

from __future__ import annotations

import torch

from gradad.benchmarks.patchcore import PatchCore, PatchCoreConfig, greedy_coreset, patch_features
from gradad.training.config import ModelConfig
from gradad.training.model import AnomalyHead


def test_greedy_coreset_covers_every_cluster() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    idx = greedy_coreset(points, 4, projection_dim=2)
    assert len(set(idx.tolist())) == 4
    clusters = {int(i) // 50 for i in idx}
    assert clusters == {0, 1, 2, 3}  # farthest-point selection hits each cluster once


def test_patchcore_scores_an_outlier_patch_highest() -> None:
    cfg = ModelConfig(smoothing="none", score_pool=1)
    head = AnomalyHead(cfg, (8, 8))
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(6, 4, 8, 8, generator=gen) * 0.1
    model = PatchCore(PatchCoreConfig(coreset_ratio=0.5, projection_dim=4, neighbourhood=1), head).fit(train)
    assert model.bank.shape == (192, 4)
    test = train[:2].clone()
    test[1, :, 3, 5] += 5.0
    scores, maps = model.predict(test)
    assert scores[1] > scores[0] + 4.0
    assert maps.shape == (2, 1, 8, 8)
    assert torch.argmax(maps[1, 0]).item() == 3 * 8 + 5
    # A training image is close to the bank everywhere (coreset keeps half the patches).
    assert scores[0] < 0.5


def test_patch_features_neighbourhood_mean() -> None:
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 9.0
    p = patch_features(x, 3).view(3, 3)
    assert p[1, 1] == 1.0 and p[0, 0] == 9.0 / 4  # borders average only the valid cells


def test_patchcore_graph_on_onnx_runtime_matches_patchcore_predict(tmp_path) -> None:
    """The latency benchmark times PatchCore on ONNX Runtime through PatchCoreGraph: it must compute what
    PatchCore.predict does (matrix-product distances vs cdist), end to end from uint8 pixels."""
    import numpy as np

    from gradad.benchmarks.patchcore import PATCHCORE_HEAD, PatchCoreGraph
    from gradad.export.graph import ExportModule
    from gradad.export.onnx_export import export_onnx_fp32
    from gradad.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from gradad.training.backbone import FeatureExtractor
    from gradad.training.config import preset_config

    cfg = preset_config("tiny")
    cfg.backbone.weights = "none"
    size = cfg.data.image_size
    extractor = FeatureExtractor(cfg.backbone).eval()
    head = AnomalyHead(PATCHCORE_HEAD, (size, size))
    bank = torch.randn(50, extractor.channels, generator=torch.Generator().manual_seed(1))
    reference = PatchCore(PatchCoreConfig(), head)
    reference.bank = bank
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    module = ExportModule(PatchCoreGraph(extractor, bank, head, PatchCoreConfig().neighbourhood),
                          extractor.mean, extractor.std).eval()
    with torch.no_grad():
        x = (images.float() - module.mean) * module.inv_std
        want_s, want_m = reference.predict(extractor(x))
    export_onnx_fp32(module, tmp_path / "patchcore.onnx")
    got_s, got_m = OnnxRuntimeBackend(tmp_path / "patchcore.onnx", ["cpu"], 1).infer(images.numpy())
    np.testing.assert_allclose(got_s, want_s.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got_m, want_m[:, 0].numpy(), rtol=1e-3, atol=1e-3)
