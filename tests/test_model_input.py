"""The CNN's input: the paper's single slice, or 2.5D (each slice with its neighbours as channels).

Neighbour stacking at the series' ends, the widened first convolution (pretrained 3-channel weights stay
usable), the input mode in the checkpoint, and checkpoints written before the option loading as
single-slice models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ihd_node.classes import CLASSES
from ihd_node.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint
from ihd_node.model.cnn import SliceCNN, first_conv
from ihd_node.model.input import neighbour_index, stack_neighbours
from ihd_node.model.network import IhdModel
from ihd_node.model.preprocess import prepare_slices
from ihd_node.model.presets import ModelConfig, tiny_config

THRESHOLDS = dict.fromkeys(CLASSES, 0.3)


def test_neighbours_are_array_neighbours_and_edges_repeat() -> None:
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    out = stack_neighbours(x, 1)
    assert out.shape == (5, 9, 2, 2)
    # Channels: the previous slice's three windows, the slice's own, the next slice's.
    assert out[:, ::3, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert torch.equal(out[:, 3:6], x)  # the centre slice sits in the middle channels
    two = stack_neighbours(x, 2)
    assert two[0, ::3, 0, 0].tolist() == [0, 0, 0, 1, 2] and two[4, ::3, 0, 0].tolist() == [2, 3, 4, 4, 4]
    # A batch of the series (what the Predictor feeds) equals that part of the whole.
    assert torch.equal(stack_neighbours(x, 2, 3, 5), two[3:5])
    assert torch.equal(stack_neighbours(x, 0), x)
    single = torch.ones(1, 3, 2, 2)
    assert torch.equal(stack_neighbours(single, 1), single.repeat(1, 3, 1, 1))  # a one-slice series
    assert neighbour_index(3, 1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]
    with pytest.raises(ValueError, match="n, C, S, S"):
        stack_neighbours(torch.zeros(3, 4, 4), 1)


def test_widened_first_conv_keeps_pretrained_weights_usable(tmp_path: Path) -> None:
    """The 3-channel stem kernel is repeated per slice and divided by the slice count: with neighbours equal
    to the centre slice the 2.5D network computes exactly what the pretrained single-slice network does."""
    torch.manual_seed(0)
    plain = SliceCNN("resnet18")
    weights = tmp_path / "backbone.pt"
    torch.save(plain.backbone.state_dict(), weights)
    one = SliceCNN("resnet18", weights_path=weights).eval()
    wide = SliceCNN("resnet18", weights_path=weights, in_channels=9).eval()
    wide.head.load_state_dict(one.head.state_dict())
    assert first_conv(wide.backbone)[2].in_channels == 9 and first_conv(one.backbone)[2].in_channels == 3
    torch.testing.assert_close(first_conv(wide.backbone)[2].weight[:, 3:6],
                               first_conv(one.backbone)[2].weight / 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        same = wide(x.repeat(1, 3, 1, 1))
        ref = one(x)
        different = wide(torch.cat([x.flip(-1), x, x.flip(-2)], dim=1))
    torch.testing.assert_close(same[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(same[1], ref[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(different[1], ref[1], atol=1e-3)  # the neighbours do reach the features
    # Every supported family's stem is found and widened (MobileNet, EfficientNet, RegNet, ShuffleNet).
    for backbone in ("mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0"):
        cnn = SliceCNN(backbone, in_channels=9).eval()
        with torch.no_grad():
            assert cnn(torch.zeros(1, 9, 64, 64))[0].shape == (1, 6)


def test_config_and_checkpoint_record_the_input(tmp_path: Path) -> None:
    config = tiny_config("mobilenet_v3_small", neighbours=1)
    assert config.in_channels == 9
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="neighbours"):
        tiny_config(neighbours=-1)
    model = IhdModel(config).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, thresholds=THRESHOLDS, name="t", version="0",
                           provenance={}, half=False)
    data = torch.load(path, weights_only=True)
    assert data["config"]["neighbours"] == 1 and data["preprocessing"]["neighbours"] == 1
    assert data["preprocessing"]["input"].startswith("2.5d")
    loaded = load_checkpoint(path)
    assert loaded.config.neighbours == 1 and first_conv(loaded.model.cnn.backbone)[2].in_channels == 9
    hu = np.random.default_rng(2).uniform(-50, 150, (5, 64, 64)).astype(np.float32)
    x = prepare_slices(hu, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_old_checkpoint_without_input_field_loads_as_single_slice(tmp_path: Path) -> None:
    """A checkpoint written before the 2.5D option (no "neighbours" in its config, no input mode) is a
    single-slice model: it loads, builds a 3-channel stem and predicts as before."""
    model = IhdModel(tiny_config("mobilenet_v3_small")).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, thresholds=THRESHOLDS, name="old", version="0",
                           provenance={}, half=False)
    data = torch.load(path, weights_only=True)
    del data["config"]["neighbours"]
    for key in ("input", "neighbours"):
        del data["preprocessing"][key]
    torch.save(data, path)
    loaded = load_checkpoint(path)
    assert loaded.config.neighbours == 0 and first_conv(loaded.model.cnn.backbone)[2].in_channels == 3
    x = prepare_slices(np.random.default_rng(3).uniform(-50, 150, (4, 64, 64)).astype(np.float32), 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_shipped_default_model_is_a_single_slice_checkpoint() -> None:
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"{DEFAULT_CHECKPOINT} is not built here (make train-phantom)")
    data = torch.load(DEFAULT_CHECKPOINT, weights_only=True)
    assert data["config"].get("neighbours", 0) == 0  # the paper's single-slice input (absent in older files)
    loaded = load_checkpoint("default")
    assert loaded.config.neighbours == 0 and first_conv(loaded.model.cnn.backbone)[2].in_channels == 3
