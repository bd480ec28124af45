"""Calibration and thresholds (issue 21): Platt scaling fitted on validation scans, the sensitivity
policy, Wilson intervals, ECE; stored in the checkpoint, applied by the node's Predictor, identity for
older checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ihd_node.classes import CLASSES
from ihd_node.model.calibration import Calibration
from ihd_node.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from training.calibrate import class_figures, fit_platt, reliability, thresholds_by_policy, wilson


def _overconfident(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities whose logits are three times too large (a typical overconfident net)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, len(CLASSES)))
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    return y, 1 / (1 + np.exp(-3 * z))


def test_platt_scaling_fixes_overconfidence_and_keeps_the_ranking() -> None:
    y, p = _overconfident()
    cal = fit_platt(y, p, "test data")
    assert all(0.2 < s < 0.5 for s in cal.scale), cal.scale  # about 1/3
    q = cal.apply(p)
    for k in range(len(CLASSES)):
        assert np.array_equal(np.argsort(p[:, k], kind="stable"), np.argsort(q[:, k], kind="stable"))
        before, _ = reliability(y[:, k], p[:, k])
        after, bins = reliability(y[:, k], q[:, k])
        assert after < before / 2 and after < 0.06, (before, after)
        assert sum(b["n"] for b in bins) == len(y)
    # A perfectly separated class does not blow the scale up (Platt's smoothed targets).
    sep = np.zeros_like(y)
    sep[:50] = 1
    cal2 = fit_platt(sep, np.where(sep > 0, 0.9, 0.2), "separable")
    assert all(np.isfinite(cal2.scale)) and max(cal2.scale) < 50


def test_sensitivity_policy_picks_the_highest_threshold_that_keeps_the_target() -> None:
    rng = np.random.default_rng(1)
    y = (rng.uniform(size=(300, len(CLASSES))) < 0.3).astype(float)
    p = np.clip(y * 0.4 + rng.uniform(0.0, 0.6, size=y.shape), 0, 1)
    thr = thresholds_by_policy(y, p, "sensitivity", 0.95)
    for k, c in enumerate(CLASSES):
        t = y[:, k].astype(bool)
        sens = (p[t, k] >= thr[c]).mean()
        assert sens >= 0.95
        higher = np.unique(p[t, k][p[t, k] > thr[c]])  # any higher cut loses the target
        assert (p[t, k] >= higher[0] + 1e-12).mean() < 0.95 or len(higher) == 0
    youden = thresholds_by_policy(y, p, "youden")
    assert set(youden) == set(CLASSES)
    with pytest.raises(ValueError, match="unknown threshold method"):
        thresholds_by_policy(y, p, "median")


def test_wilson_interval_and_class_figures() -> None:
    lo, hi = wilson(19, 20)
    assert lo == pytest.approx(0.7639, abs=1e-3) and hi == pytest.approx(0.9911, abs=1e-3)
    assert wilson(0, 0) is None
    y, p = _overconfident(200)
    figs = class_figures(y, p, dict.fromkeys(CLASSES, 0.5))
    for c in CLASSES:
        m = figs[c]
        assert {"auc", "sensitivity", "specificity", "threshold", "ece", "called_when_absent"} <= set(m)
        assert m["called_when_absent"] == pytest.approx(1 - m["specificity"])
        assert m["sensitivity_ci"][0] <= m["sensitivity"] <= m["sensitivity_ci"][1]


def test_checkpoint_carries_calibration_and_policy_and_the_predictor_applies_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = IhdModel(tiny_config("mobilenet_v3_small", 64))
    thresholds = dict.fromkeys(CLASSES, 0.5)
    cal = Calibration("platt", tuple(0.5 + 0.1 * k for k in range(6)), tuple(-0.2 * k for k in range(6)), "test")
    policy = {"method": "sensitivity", "target_sensitivity": 0.95, "policy": "test policy"}
    path = save_checkpoint(tmp_path / "cal.pt", model, thresholds=thresholds, name="t", version="1",
                           provenance={}, calibration=cal, thresholds_policy=policy)
    loaded = load_checkpoint(path)
    assert loaded.calibration.scale == pytest.approx(cal.scale) and loaded.calibration.bias == pytest.approx(cal.bias)
    assert loaded.thresholds_policy["target_sensitivity"] == 0.95
    hu = np.random.default_rng(2).normal(30, 20, size=(5, 64, 64)).astype(np.float32)
    calibrated = Predictor.load(path, device="cpu").predict(hu, explain=False)
    raw = Predictor(loaded.model, thresholds, "t", "1", device="cpu").predict(hu, explain=False)
    expected = cal.apply(raw.slice_probabilities)
    assert np.allclose(calibrated.slice_probabilities, expected, atol=1e-5)
    assert np.allclose(calibrated.series_probabilities, expected.max(axis=0), atol=1e-5)
    explained = Predictor.load(path, device="cpu").predict(hu, explain=True)
    assert np.allclose(explained.slice_probabilities, expected, atol=1e-4)


def test_old_checkpoints_load_with_identity_and_bad_calibration_is_refused(tmp_path) -> None:
    model = IhdModel(tiny_config("mobilenet_v3_small", 64))
    path = save_checkpoint(tmp_path / "old.pt", model, thresholds=dict.fromkeys(CLASSES, 0.5), name="t",
                           version="1", provenance={})
    data = torch.load(path, weights_only=True)
    del data["calibration"], data["thresholds_policy"]
    data["format_version"] = 1  # as written before calibration existed
    torch.save(data, path)
    loaded = load_checkpoint(path)
    assert loaded.calibration.is_identity and loaded.thresholds_policy == {}
    data["format_version"] = 2
    data["calibration"] = {"method": "platt", "classes": {c: {"scale": -1.0, "bias": 0.0} for c in CLASSES}}
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="bad calibration"):
        load_checkpoint(path)


def test_specificity_floor_raises_a_threshold_that_would_call_too_many() -> None:
    """Where 95 % sensitivity needs a threshold below most negatives, the floor (specificity >= 0.9) wins."""
    rng = np.random.default_rng(5)
    y = np.zeros((400, len(CLASSES)))
    y[:100] = 1
    p = np.where(y > 0, rng.uniform(0.0, 1.0, y.shape), rng.uniform(0.0, 0.8, y.shape))  # poorly separated
    plain = thresholds_by_policy(y, p, "sensitivity", 0.95)
    floored = thresholds_by_policy(y, p, "sensitivity", 0.95, min_specificity=0.9)
    for k, c in enumerate(CLASSES):
        neg = y[:, k] == 0
        assert (p[neg, k] < plain[c]).mean() < 0.9  # the sensitivity target alone calls too many
        assert floored[c] > plain[c] and (p[neg, k] < floored[c]).mean() >= 0.9
        assert (p[neg, k] < floored[c] - 0.02).mean() < 0.9  # and not higher than the floor needs
