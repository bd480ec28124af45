"""`model describe`: the paper preset is the published architecture with its real parameter count."""

from __future__ import annotations

import json

import pytest
import torch

from ihd_node.classes import CHANNEL_MEAN, CHANNEL_STD, CLASSES
from ihd_node.commands.cli import main
from ihd_node.errors import UserError
from ihd_node.model.checkpoint import save_checkpoint
from ihd_node.model.describe import describe
from ihd_node.model.network import IhdModel
from ihd_node.model.presets import PRESETS, ModelConfig, get_preset, tiny_config


def test_paper_preset_is_the_published_architecture() -> None:
    d = describe("paper")
    assert d["backbone"] == "resnext101_32x8d" and d["feature_dim"] == 2048
    assert d["selector"] == {"kind": "pca", "in_dim": 2048, "out_dim": 120}
    assert d["lstm"] == {"layers": 3, "hidden_size": 256, "bidirectional": True, "dropout": 0.3}
    assert d["concat_cnn_probabilities"] is True and d["input_size"] == 256
    assert d["classes"] == list(CLASSES)
    assert [(w["center"], w["width"]) for w in d["windows"]] == [(40, 80), (80, 200), (40, 380)]
    assert d["normalization"] == {"mean": list(CHANNEL_MEAN), "std": list(CHANNEL_STD)}
    assert 85e6 <= d["parameters"] <= 95e6


def test_compact_preset_and_counts_match_a_real_model() -> None:
    d = describe("compact")
    assert d["backbone"] == "mobilenet_v3_small" and d["selector"]["in_dim"] == 576
    torch.manual_seed(0)
    real = IhdModel(get_preset("compact"))
    assert d["parameters"] == sum(p.numel() for p in real.parameters())


def test_presets_round_trip_through_json() -> None:
    for config in PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_dict({"backbone": "resnet18"})


def test_describe_checkpoint_adds_version_thresholds_provenance(tmp_path) -> None:
    model = IhdModel(tiny_config())
    path = save_checkpoint(tmp_path / "m.pt", model, thresholds={c: 0.4 for c in CLASSES}, name="tiny",
                           version="3.0", provenance={"data": "phantoms", "metrics": {"auc": 1.0}})
    d = describe(str(path))
    assert d["name"] == "tiny" and d["version"] == "3.0" and d["source"] == "checkpoint"
    assert d["thresholds"]["any"] == pytest.approx(0.4)
    assert d["provenance"]["metrics"] == {"auc": 1.0}
    assert d["parameters"] == sum(p.numel() for p in model.parameters())


def test_unknown_name_lists_presets() -> None:
    with pytest.raises(UserError, match="neither a model preset") as info:
        describe("no-such-model")
    assert all(name in str(info.value) for name in PRESETS)


def test_cli_json_and_summary(capsys) -> None:
    assert main(["model", "describe", "paper", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "paper" and d["lstm"]["layers"] == 3
    assert main(["model", "describe", "compact"]) == 0
    assert "mobilenet_v3_small" in capsys.readouterr().out
    assert main(["model", "describe", "nonexistent"]) == 2
    assert "paper" in capsys.readouterr().err


def test_checkpoint_summary_is_readable_and_hides_training_paths(tmp_path, capsys) -> None:
    """Issue 7 item 16: a short provenance summary, not kilobytes of JSON, and no training machine paths."""
    per_class = {c: {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.7, "threshold": 0.5} for c in CLASSES}
    provenance = {
        "data": "synthetic phantoms, 420 series", "date": "2026-11-26", "splits": {"train": 420, "val": 60},
        "training": {"work": "/home/trainer/secret-project/run7", "device": "cuda", "seed": 3, "cnn_epochs": 3,
                     "cnn_lr": 1e-4, "seq_epochs": 6, "seq_lr": 5e-5, "augment": {"flip": 0.5}},
        "history": {"cnn": [{"epoch": i, "train_loss": 0.3, "seconds": 100.0} for i in range(200)]},
        "threshold_method": "youden", "recipe_seconds": 846.0,
        "metrics": {"validation": {"slice": {"n": 1791, "classes": per_class},
                                   "scan": {"n": 60, "classes": per_class}}},
        "checkpoint_dir": "C:\\Users\\trainer\\ckpt",
    }
    path = save_checkpoint(tmp_path / "m.pt", IhdModel(tiny_config()), thresholds={c: 0.4 for c in CLASSES},
                           name="tiny", version="3.0", provenance=provenance)
    assert main(["model", "describe", str(path)]) == 0
    text = capsys.readouterr().out
    assert len(text) < 2500 and max(len(line) for line in text.splitlines()) <= 100, text
    assert "trainer" not in text and "secret-project" not in text and '{"' not in text, text
    assert "trained on  synthetic phantoms, 420 series (2026-11-26)" in text
    assert "validation, 60 scans: AUC any 0.900" in text and "seed 3" in text and "history: see --json" in text
    assert main(["model", "describe", str(path), "--json"]) == 0
    full = capsys.readouterr().out
    assert "trainer" not in full and '".../run7"' in full and '".../ckpt"' in full
    assert len(json.loads(full)["provenance"]["history"]["cnn"]) == 200  # the full record stays in --json
