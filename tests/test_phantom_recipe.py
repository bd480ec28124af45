"""The shipped model's recipe end to end on a tiny model (issue 21): randomized phantoms, the three
stages, calibration and the sensitivity policy stored in the checkpoint, held-out generator A and the
independent generator B evaluated through the node's Predictor, the figures in provenance["validation"],
the model card, the reliability diagrams and `model describe`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ihd_node.classes import CLASSES
from ihd_node.commands.cli import main as cli_main
from ihd_node.model.checkpoint import load_checkpoint
from ihd_node.model.presets import tiny_config
from training.phantom_recipe import Recipe, run_recipe, series_plan


def tiny_recipe() -> Recipe:
    return replace(Recipe(), train_series=10, val_series=10, test_series=6, crossgen_per_kind=1, crossgen_size=64,
                   train_sizes=(64,), test_size=64, cnn_epochs=1, cnn_epoch_size=48, batch_size=8, seq_epochs=1)


def test_training_series_mix_randomized_and_default() -> None:
    recipe = Recipe()
    plans = [series_plan(i, recipe.train_seed, recipe) for i in range(200)]
    share = sum(p[2] for p in plans) / len(plans)
    assert 0.75 < share < 0.95  # mostly randomized, some default phantoms (the demo's and the tests')


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    out = root / "weights" / "model.pt"
    run_recipe(out, root / "work", tiny_recipe(), workers=1, threads=2, verbose=False,
               config=tiny_config("mobilenet_v3_small", 64))
    return out


def test_recipe_stores_calibration_policy_and_figures_on_a_and_b(built: Path) -> None:
    loaded = load_checkpoint(built)
    assert loaded.calibration.method == "platt" and len(loaded.calibration.scale) == len(CLASSES)
    policy = loaded.thresholds_policy
    assert policy["method"] == "sensitivity" and policy["target_sensitivity"] == 0.95
    assert policy["validation_scans"] == 10 and set(policy["validation"]) == set(CLASSES)
    validation = loaded.provenance["validation"]
    assert set(validation) == {"A", "B"}
    for gen in ("A", "B"):
        assert validation[gen]["series"] >= 16  # negatives, each subtype alone, every pair
        for c in CLASSES:
            m = validation[gen]["classes"][c]
            assert {"auc", "sensitivity", "specificity", "threshold", "ece", "called_when_absent"} <= set(m)
            assert m["threshold"] == pytest.approx(loaded.thresholds[c], abs=1e-6)
            assert 0.0 <= m["ece"] <= 1.0
    card = (built.parent / "MODEL_CARD.md").read_text()
    assert "not for diagnostic use" in card.lower() and "No real patient data" in card
    assert "| A AUC |" in card and "| B AUC |" in card and "Platt" in card and "Policy:" in card
    svg = (built.parent / "reliability.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") + svg.count("<circle") > 6


def test_model_describe_shows_calibration_policy_and_both_generators(built: Path, capsys) -> None:
    assert cli_main(["model", "describe", str(built)]) == 0
    text = capsys.readouterr().out
    assert "calibration Platt per class" in text and "chosen by per class, the highest threshold" in text
    assert "validation  generator A, " in text and "validation  generator B, " in text
    assert cli_main(["model", "describe", str(built), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["calibration"]["method"] == "platt" and d["thresholds_policy"]["method"] == "sensitivity"
