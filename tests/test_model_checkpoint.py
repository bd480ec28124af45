"""Checkpoint round trip (float16 and float32 storage) and a clear error for every kind of bad file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from ihd_node.model import checkpoint as ckpt
from ihd_node.model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from ihd_node.model.network import IhdModel
from ihd_node.model.preprocess import prepare_slices
from ihd_node.model.presets import get_preset, tiny_config
from ihd_node.model.selection import fit_selector

THRESHOLDS = {c: 0.3 + 0.05 * i for i, c in enumerate(CLASSES)}
PROVENANCE = {"data": "phantoms seed 1", "date": "2026-01-01",
              "metrics": {"auc_any": np.float64(0.99), "n": 3}}


class Foreign:
    """Stands in for arbitrary pickled objects the safe loader must refuse."""


def _model(**changes) -> IhdModel:
    torch.manual_seed(0)
    model = IhdModel(tiny_config(**changes))
    fitted = fit_selector("pca", np.random.default_rng(0).normal(size=(64, 512)), model.config.selected_dim)
    model.selector.load_state_dict(fitted.state_dict())  # a fitted (non-zero) selector must survive the trip
    return model.eval()


def _input() -> torch.Tensor:
    return prepare_slices(np.random.default_rng(1).uniform(-50, 150, (4, 64, 64)).astype(np.float32), 64)


def _save(path, model=None, **kw):
    return save_checkpoint(path, model or _model(), thresholds=THRESHOLDS, name="tiny", version="1.2",
                           provenance=PROVENANCE, **kw)


@pytest.mark.parametrize("half", [True, False])
def test_round_trip(tmp_path, half: bool) -> None:
    model = _model()
    path = _save(tmp_path / "m.pt", model, half=half)
    loaded = load_checkpoint(path)
    assert (loaded.name, loaded.version) == ("tiny", "1.2")
    assert loaded.thresholds == pytest.approx(THRESHOLDS)
    assert loaded.provenance == {"data": "phantoms seed 1", "date": "2026-01-01",
                                 "metrics": {"auc_any": 0.99, "n": 3}}
    assert loaded.config == model.config and loaded.path == path
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    torch.testing.assert_close(loaded.model.selector.components, model.selector.components)  # kept float32
    x = _input()
    with torch.no_grad():
        want, got = torch.sigmoid(model(x)), torch.sigmoid(loaded.model(x))
    torch.testing.assert_close(got, want, atol=3e-3 if half else 1e-6, rtol=0)


def test_round_trip_of_a_backbone_that_cannot_be_built_on_meta(tmp_path) -> None:
    torch.manual_seed(0)
    model = IhdModel(tiny_config(backbone="regnet_y_400mf")).eval()  # regnet computes widths at build time
    loaded = load_checkpoint(_save(tmp_path / "regnet.pt", model, half=False))
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))


def test_compact_checkpoint_is_small(tmp_path) -> None:
    model = IhdModel(get_preset("compact"))
    path = _save(tmp_path / "compact.pt", model)
    assert path.stat().st_size <= 15 * 1024 * 1024
    assert load_checkpoint(path).config.backbone == "mobilenet_v3_small"


def _assert_error(path, pattern: str) -> None:
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert isinstance(info.value, UserError)
    assert str(path) in str(info.value)


def test_missing_file_and_folder(tmp_path) -> None:
    _assert_error(tmp_path / "nope.pt", "no such file")
    _assert_error(tmp_path, "folder")


def test_missing_default_says_how_to_build_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ckpt, "DEFAULT_CHECKPOINT", tmp_path / "default.pt")
    with pytest.raises(CheckpointError, match="make train-phantom"):
        load_checkpoint("default")


def test_empty_and_truncated_files(tmp_path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _assert_error(empty, "empty")
    good = _save(tmp_path / "good.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _assert_error(cut, "truncated or corrupt")


def test_foreign_files(tmp_path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    _assert_error(text, "not an ihd-node checkpoint")
    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"a": 1}))
    _assert_error(raw_pickle, "not an ihd-node checkpoint")
    state_dict = tmp_path / "state.pt"
    torch.save(_model().state_dict(), state_dict)
    _assert_error(state_dict, "plain state_dict")
    objects = tmp_path / "objects.pt"
    torch.save({"format": "ihd-node-checkpoint", "thing": Foreign()}, objects)
    _assert_error(objects, "refused to load")


def test_wrong_version_and_incomplete(tmp_path) -> None:
    path = _save(tmp_path / "m.pt")
    data = torch.load(path, weights_only=True)
    data["format_version"] = 99
    torch.save(data, tmp_path / "v99.pt")
    _assert_error(tmp_path / "v99.pt", "format version 99")
    data["format_version"] = 1
    del data["thresholds"]
    torch.save(data, tmp_path / "partial.pt")
    _assert_error(tmp_path / "partial.pt", "missing")


def test_config_weights_mismatch(tmp_path) -> None:
    path = _save(tmp_path / "m.pt")
    data = torch.load(path, weights_only=True)
    data["config"]["lstm_hidden"] = 16
    torch.save(data, tmp_path / "edited.pt")
    _assert_error(tmp_path / "edited.pt", "do not match its config")
    data = torch.load(path, weights_only=True)
    data["config"]["selector"] = "magic"
    torch.save(data, tmp_path / "badconfig.pt")
    _assert_error(tmp_path / "badconfig.pt", "invalid model config")


def test_read_checkpoint_gives_metadata_without_building(tmp_path) -> None:
    path, data = read_checkpoint(_save(tmp_path / "m.pt"))
    assert data["format"] == "ihd-node-checkpoint" and data["format_version"] == 2  # 2: calibration
    assert data["classes"] == list(CLASSES) and data["weights_dtype"] == "float16"
    assert data["preprocessing"]["input_size"] == 64


def test_save_rejects_incomplete_thresholds_and_odd_provenance(tmp_path) -> None:
    with pytest.raises(ValueError, match="thresholds"):
        save_checkpoint(tmp_path / "a.pt", _model(), thresholds={"any": 0.5}, name="x", version="1",
                        provenance={})
    with pytest.raises(TypeError, match="provenance"):
        save_checkpoint(tmp_path / "b.pt", _model(), thresholds=THRESHOLDS, name="x", version="1",
                        provenance={"bad": object()})
    assert not list(tmp_path.iterdir())
