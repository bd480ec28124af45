"""Predictor on a tiny random model: shapes, max over slices, heatmaps exactly for the positive pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from ihd_node.model.checkpoint import save_checkpoint
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor, resolve_device
from ihd_node.model.preprocess import prepare_slices
from ihd_node.model.presets import tiny_config
from ihd_node.values.prediction import Prediction


@pytest.fixture(scope="module")
def model() -> IhdModel:
    torch.manual_seed(0)
    m = IhdModel(tiny_config(backbone="mobilenet_v3_small"))
    torch.nn.init.normal_(m.selector.components, std=0.1)
    return m.eval()


@pytest.fixture(scope="module")
def hu() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(40, 60, size=(7, 96, 80)).astype(np.float32)


def _median_thresholds(model: IhdModel, hu: np.ndarray) -> dict[str, float]:
    """Thresholds at each class's median slice probability: some pairs positive, some not."""
    probs = Predictor.from_model(model, {}, "t", "0").predict(hu, explain=False).slice_probabilities
    return {c: float(np.median(probs[:, k])) for k, c in enumerate(CLASSES)}


def test_predict_shapes_probabilities_and_heatmaps(model: IhdModel, hu: np.ndarray) -> None:
    thresholds = _median_thresholds(model, hu)
    predictor = Predictor.from_model(model, thresholds, "tiny", "0.1")
    pred = predictor.predict(hu)
    assert isinstance(pred, Prediction)
    assert pred.slice_probabilities.shape == (7, 6) and pred.series_probabilities.shape == (6,)
    assert np.all((pred.slice_probabilities >= 0) & (pred.slice_probabilities <= 1))
    np.testing.assert_array_equal(pred.series_probabilities, pred.slice_probabilities.max(axis=0))
    expected = {(i, c) for c in CLASSES for i in pred.positive_slices(c)}
    assert expected and set(pred.heatmaps) == expected
    for heat in pred.heatmaps.values():
        assert heat.shape == (96, 80) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() <= 1
    assert pred.model == predictor.identity and pred.model.name == "tiny" and pred.seconds > 0


def test_probabilities_are_the_sequence_heads_sigmoid(model: IhdModel, hu: np.ndarray) -> None:
    pred = Predictor.from_model(model, {}, "t", "0").predict(hu, explain=False)
    with torch.no_grad():
        direct = torch.sigmoid(model(prepare_slices(hu, 64))).numpy()
    np.testing.assert_allclose(pred.slice_probabilities, direct, atol=1e-5)
    assert pred.heatmaps == {}
    small = Predictor(model, {}, "t", "0", batch_size=2).predict(hu, explain=False)
    np.testing.assert_allclose(small.slice_probabilities, pred.slice_probabilities, atol=1e-5)


def test_max_cam_slices_keeps_the_strongest_slices(model: IhdModel, hu: np.ndarray) -> None:
    thresholds = _median_thresholds(model, hu)
    predictor = Predictor.from_model(model, thresholds, "t", "0")
    full = predictor.predict(hu)
    limited = predictor.predict(hu, max_cam_slices=2)
    slices = {i for i, _ in limited.heatmaps}
    assert len(slices) == 2
    probs, thr = full.slice_probabilities, np.array([thresholds[c] for c in CLASSES])
    strength = np.where(probs >= thr, probs, -1).max(axis=1)
    assert slices == set(np.argsort(-strength)[:2].tolist())
    for key, heat in limited.heatmaps.items():  # same maps as without the limit
        np.testing.assert_allclose(heat, full.heatmaps[key], atol=1e-5)
    assert predictor.predict(hu, max_cam_slices=0).heatmaps == {}


def test_load_from_checkpoint(model: IhdModel, hu: np.ndarray, tmp_path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", model, thresholds={c: 0.5 for c in CLASSES}, name="tiny",
                           version="2", provenance={"data": "random init"}, half=False)
    predictor = Predictor.load(path, device="auto")
    assert predictor.identity.trained_on == "random init" and predictor.identity.version == "2"
    assert predictor.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ref = Predictor.from_model(model, {}, "t", "0").predict(hu, explain=False)
    got = predictor.predict(hu, explain=False)
    np.testing.assert_allclose(got.slice_probabilities, ref.slice_probabilities, atol=1e-4)


def test_bad_input_and_device(model: IhdModel) -> None:
    predictor = Predictor.from_model(model, {}, "t", "0")
    with pytest.raises(UserError, match="shape"):
        predictor.predict(np.zeros((64, 64), dtype=np.float32))
    with pytest.raises(UserError, match="NaN"):
        predictor.predict(np.full((2, 64, 64), np.nan, dtype=np.float32))
    with pytest.raises(UserError, match="device"):
        resolve_device("quantum")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.parametrize("explain", ["decision", "cnn"])
def test_heatmaps_stay_inside_the_intracranial_space(model: IhdModel, explain: str) -> None:
    from ihd_node.imaging.intracranial import intracranial_mask
    from tests.test_report_common import head_slice

    hu = np.stack([head_slice(96, z, bleed=z in (2, 3)) for z in range(6)])
    predictor = Predictor.from_model(model, {c: 0.0 for c in CLASSES}, "tiny", "0.1", explain=explain)
    pred = predictor.predict(hu)
    assert pred.explained == explain and len(pred.heatmaps) == 6 * len(CLASSES)
    for (index, _cls), heat in pred.heatmaps.items():
        inside = intracranial_mask(hu[index])
        assert heat[~inside].max() == 0.0
        assert heat[inside].max() in (0.0, pytest.approx(1.0))
    assert any(h.max() > 0 for h in pred.heatmaps.values())


def test_explain_mode_is_checked(model: IhdModel) -> None:
    with pytest.raises(UserError, match="explain"):
        Predictor.from_model(model, {}, "t", "0", explain="lstm")


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_the_fused_forward_pass_gives_the_eager_results(backbone: str) -> None:
    """Without heatmaps the forward pass runs on a conv+batch-norm fused copy (issue 11): same probabilities."""
    torch.manual_seed(3)
    model = IhdModel(tiny_config(backbone))
    with torch.no_grad():  # batch-norm statistics away from 0/1, so a wrong fold would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    hu = np.random.default_rng(3).normal(40, 30, (5, 64, 64)).astype(np.float32)
    fast = Predictor.from_model(model, {}, "t", "0")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast._cnn_forward.modules())
    slow = Predictor(model, {}, "t", "0", optimize=False)
    a = fast.predict(hu, explain=False).slice_probabilities
    b = slow.predict(hu, explain=False).slice_probabilities
    assert np.abs(a - b).max() < 1e-5
    explained = fast.predict(hu, explain=True).slice_probabilities  # on the original model (Grad-CAM hooks)
    assert np.abs(explained - a).max() < 1e-5
