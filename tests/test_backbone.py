"""Backbone loading: the lukemelas -> timm key remap and stage selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradad.errors import CheckpointError, ConfigError
from gradad.training.backbone import (
    FeatureExtractor,
    load_imagenet_classifier,
    packaged_weights_path,
    remap_lukemelas_to_timm,
)
from gradad.training.config import BackboneConfig

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_remap_loads_every_tensor(name: str) -> None:
    state = torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    remapped = remap_lukemelas_to_timm(state, model)
    assert len(remapped) == len(state)
    missing, unexpected = model.load_state_dict(remapped, strict=False)
    assert missing == [] and unexpected == []
    # Every tensor arrived unchanged, not just its name.
    for key, tensor in remapped.items():
        assert torch.equal(model.state_dict()[key], tensor)


def test_classifier_recognises_a_real_photo() -> None:
    data = pytest.importorskip("skimage.data")
    import cv2

    from gradad.training.features import to_tensor

    model = load_imagenet_classifier("tf_efficientnet_lite0")
    cat = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)  # Chelsea the cat
    cup = cv2.resize(data.coffee(), (224, 224), interpolation=cv2.INTER_AREA)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    with torch.no_grad():
        logits = model(to_tensor(np.stack([cat, cup]), mean, std))
    top = logits.argmax(1).tolist()
    assert top[0] in (281, 282, 285)  # tabby / tiger cat / Egyptian cat
    assert top[1] in (967, 968)  # espresso / cup


def test_feature_extractor_stride8_alignment() -> None:
    fe = FeatureExtractor(BackboneConfig())
    assert fe.channels == 40 + 112
    assert not any(p.requires_grad for p in fe.parameters())
    fe.train()  # must stay in eval mode (frozen BN statistics)
    assert not fe.training
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        out = fe(x)
    assert out.shape == (2, 152, 16, 12)


def test_feature_extractor_runs_no_block_after_its_last_feature() -> None:
    """timm's feature model would also run lite0's blocks 5-6 (unused by x); the extractor drops them, gives the
    features of the full feature model bit for bit, and still loads weights saved with those blocks."""
    fe = FeatureExtractor(BackboneConfig())
    assert len(fe.body.blocks) == 5  # blocks 0-4: block 4 gives the stride-16 features
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    full.load_state_dict({k[len("body."):]: v for k, v in fe.state_dict().items()}, strict=False)
    full.eval()
    ran = []
    for i, block in enumerate(fe.body.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f8, f16 = full(x)
        out = fe(x)
    assert ran == [0, 1, 2, 3, 4]
    expected = torch.cat([f8, torch.nn.functional.interpolate(f16, size=f8.shape[-2:], mode="bilinear",
                                                              align_corners=False)], dim=1)
    assert torch.equal(out, expected)
    old_file = {f"body.{k}": v for k, v in full.state_dict().items()}  # with blocks 5-6
    assert any(k.startswith("body.blocks.6.") for k in old_file)
    fe.load_state_dict(old_file)
    with pytest.raises(RuntimeError, match="Unexpected"):
        fe.load_state_dict({**old_file, "body.other.weight": torch.zeros(1)})


def test_missing_local_weights_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_imagenet_classifier("efficientnet_b0", str(tmp_path / "nope.pth"))


def test_corrupt_local_weights_file_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read backbone weights"):
        load_imagenet_classifier("efficientnet_b0", str(bad))


def test_local_weights_file_for_other_timm_models(tmp_path) -> None:
    src = timm.create_model("efficientnet_b0", pretrained=False)
    path = tmp_path / "b0.pth"
    torch.save(src.state_dict(), path)
    loaded = load_imagenet_classifier("efficientnet_b0", str(path))
    key = "blocks.3.0.conv_pw.weight"
    assert torch.equal(loaded.state_dict()[key], src.state_dict()[key])
    fe = FeatureExtractor(BackboneConfig(name="efficientnet_b0", weights=str(path)))
    assert fe.channels == 40 + 112


def test_unknown_backbone_and_wrong_stages() -> None:
    with pytest.raises(ConfigError, match="backbone"):
        load_imagenet_classifier("no_such_net", "none")
    with pytest.raises(ConfigError, match="strides"):
        FeatureExtractor(BackboneConfig(out_indices=(1, 2)))
