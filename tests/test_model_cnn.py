"""The per-slice CNN: every supported backbone's shapes, the 6-way head, CAM layer, local weights."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from ihd_node.errors import UserError
from ihd_node.model.cnn import BACKBONES, SliceCNN
from ihd_node.model.presets import BACKBONE_FEATURE_DIMS


def _build_meta(name: str) -> SliceCNN:
    try:
        with torch.device("meta"):  # shapes only: no memory, no init time
            return SliceCNN(name)
    except NotImplementedError:  # regnet computes its widths with real tensors
        return SliceCNN(name)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_logits_features_and_a_cam_layer(name: str) -> None:
    cnn = _build_meta(name)
    device = next(cnn.parameters()).device
    logits, features = cnn(torch.zeros(2, 3, 64, 64, device=device))
    assert cnn.feature_dim == BACKBONE_FEATURE_DIMS[name]
    assert tuple(logits.shape) == (2, 6) and tuple(features.shape) == (2, cnn.feature_dim)
    assert isinstance(cnn.head, nn.Linear) and cnn.head.in_features == cnn.feature_dim
    assert any(m is cnn.cam_layer for m in cnn.backbone.modules())
    # The CAM layer is reached through a property, so its weights are not duplicated in the state_dict.
    assert not any(k.startswith("cam_layer") for k in cnn.state_dict())


def test_cam_layers_resnet_last_block_of_layer4_mobilenet_small_stride16() -> None:
    cnn = _build_meta("resnext50_32x4d")
    assert cnn.cam_layer is cnn.backbone.layer4[-1]
    cnn = _build_meta("mobilenet_v3_large")
    assert cnn.cam_layer is cnn.backbone.features[-1]
    cnn = _build_meta("mobilenet_v3_small")  # the shipped default: a finer grid (see cnn.py)
    assert cnn.cam_layer is cnn.backbone.features[8]


def test_real_forward_small_input() -> None:
    torch.manual_seed(0)
    cnn = SliceCNN("resnet18").eval()
    with torch.no_grad():
        logits, features = cnn(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 6) and features.shape == (3, 512)
    torch.testing.assert_close(logits, cnn.head(features))


def test_local_backbone_weights_are_loaded_and_old_classifier_ignored(tmp_path) -> None:
    torch.manual_seed(1)
    source = tvm.resnet18(weights=None)  # stands in for a user's ImageNet file, with its 1000-way fc
    plain = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pth"  # as written by DataParallel training scripts
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        cnn = SliceCNN("resnet18", weights_path=path)
        torch.testing.assert_close(cnn.backbone.conv1.weight, source.conv1.weight)
        torch.testing.assert_close(cnn.backbone.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
        assert cnn.head.out_features == 6


def test_bad_backbone_weights_are_user_errors(tmp_path) -> None:
    other = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v3_small(weights=None).state_dict(), other)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(UserError, match="do not fit resnet18"):
        SliceCNN("resnet18", weights_path=other)
    with pytest.raises(UserError, match="notes.txt"):
        SliceCNN("resnet18", weights_path=text)
    with pytest.raises(UserError, match="no such file"):
        SliceCNN("resnet18", weights_path=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="unknown backbone"):
        SliceCNN("vgg_nonexistent")
