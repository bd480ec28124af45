"""The 2.5D input option end to end on files shaped like the real RSNA 2019 set: prepare, the three stages
with `--input 2.5d` on a tiny model, evaluate; the same input at training and in the node; the node
analysing a DICOM series with the 2.5D checkpoint, Grad-CAM included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ihd_node.classes import CLASSES
from ihd_node.model.checkpoint import load_checkpoint
from ihd_node.model.cnn import first_conv
from ihd_node.model.input import stack_neighbours
from training.augment import to_input
from training.cli import main as training_main
from training.data import ScanStore, SliceDataset
from training.fixtures import RsnaFixture, write_rsna_fixture
from training.rsna import load_training_scan

# Training runs on one intra-op torch thread (tests/conftest.py one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")
INPUT = 64


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> RsnaFixture:
    return write_rsna_fixture(tmp_path_factory.mktemp("rsna25"), n_scans=12, seed=300, size=INPUT, n_slices=6)


@pytest.fixture(scope="module")
def trained(rsna: RsnaFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare -> train (cnn, features, sequence) with --input 2.5d -> WORK, holding model.pt."""
    work = tmp_path_factory.mktemp("work25")
    assert training_main(["prepare", "--data", str(rsna.root), "--work", str(work), "--input-size", str(INPUT),
                          "--val-fraction", "0.25", "--test-fraction", "0.2", "--seed", "1",
                          "--max-rejected", "0.1"]) == 0
    assert training_main(["train", "--work", str(work), "--input-size", str(INPUT), "--input", "2.5d",
                          "--neighbours", "1", "--selected-dim", "8", "--device", "cpu", "--epochs", "1",
                          "--epoch-size", "32", "--batch-size", "8", "--lr-scale", "10",
                          "--positive-share", "0.5", "--seq-epochs", "1", "--pca-samples", "500"]) == 0
    return work


def _scan_files(rsna: RsnaFixture, keys: list[str]) -> list[str]:
    """The DICOM files of a cached scan (a slab's key joins its slices' keys with '+')."""
    return [str(rsna.root / "stage_2_train" / f"{k}.dcm") for key in keys for k in key.split("+")]


def test_train_all_stages_and_evaluate_with_25d_input(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_checkpoint(trained / "model.pt")
    assert loaded.config.neighbours == 1 and loaded.config.in_channels == 9
    assert first_conv(loaded.model.cnn.backbone)[2].in_channels == 9
    data = torch.load(trained / "model.pt", weights_only=True)
    assert data["preprocessing"]["input"].startswith("2.5d") and data["preprocessing"]["neighbours"] == 1
    history = loaded.provenance["history"]["cnn"]
    assert len(history) == 1 and history[0]["seconds"] > 0
    capsys.readouterr()
    assert training_main(["evaluate", "--checkpoint", str(trained / "model.pt"), "--work", str(trained),
                          "--split", "test", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "scan level" in out and "weighted log loss" in out
    n_test = len(json.loads((trained / "splits.json").read_text())["test"])
    assert load_checkpoint(trained / "model.pt").provenance["metrics"]["test"]["scan"]["n"] == n_test
    # The finished stages are reused by a rerun with the same input; another input is refused.
    assert training_main(["train", "--work", str(trained), "--input-size", str(INPUT), "--input", "2.5d",
                          "--selected-dim", "8", "--device", "cpu", "--epochs", "1", "--epoch-size", "32",
                          "--batch-size", "8", "--seq-epochs", "1", "--stages", "cnn"]) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert training_main(["train", "--work", str(trained), "--input-size", str(INPUT), "--selected-dim", "8",
                          "--device", "cpu", "--epochs", "1", "--stages", "cnn"]) == 2
    assert "another model config" in capsys.readouterr().err
    assert training_main(["train", "--work", str(trained), "--neighbours", "2", "--stages", "cnn"]) == 2
    assert "--neighbours needs --input 2.5d" in capsys.readouterr().err


def test_training_and_node_feed_the_cnn_the_same_input(rsna: RsnaFixture, trained: Path) -> None:
    """For the same slices, what the CNN gets in training (slice batches of stage 1, whole scans of the
    features stage) and in the node's Predictor is the same 9-channel input (up to the cache's uint8 step)."""
    from ihd_node.model.pipeline import Predictor
    from training.stages.cnn import cnn_outputs

    store = ScanStore(trained / "cache")
    scan = max(store.scans.values(), key=lambda s: s.n_slices)
    n = scan.n_slices
    # Stage 1: one slice at a time from the memory-mapped cache (no augmentation = to_input).
    dataset = SliceDataset(store, [scan.scan_id], neighbours=1)
    stage1 = to_input(torch.stack([dataset[i][0] for i in range(n)]))
    assert stage1.shape == (n, 9, INPUT, INPUT)

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inputs: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.inputs.append(x.clone())
            return torch.zeros(len(x), 6), torch.zeros(len(x), 4)

    recorder = Recorder()
    cnn_outputs(recorder, torch.from_numpy(np.array(store.images(scan.scan_id))), torch.device("cpu"),
                chunk=3, neighbours=1)  # chunks smaller than the scan: neighbours cross chunk borders
    assert torch.equal(torch.cat(recorder.inputs), stage1)

    predictor = Predictor.load(trained / "model.pt", device="cpu")
    predictor.batch_size = 2
    seen: list[torch.Tensor] = []
    handle = predictor._cnn_forward.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        hu = load_training_scan(_scan_files(rsna, scan.keys)).hu
        predictor.predict(hu, explain=False)
    finally:
        handle.remove()
    node = torch.cat(seen)
    assert node.shape == stage1.shape
    # uint8 storage: at most half a step of 1/255 in window units, divided by the channel std (~0.29).
    assert torch.allclose(node, stage1, atol=0.5 / 255 / 0.28 + 1e-5)
    # The centre channels are the slice itself, the outer ones its neighbours, edges repeated.
    torch.testing.assert_close(node[1:, 0:3], node[:-1, 3:6])
    torch.testing.assert_close(node[0, 0:3], node[0, 3:6])
    torch.testing.assert_close(node[-1, 6:9], node[-1, 3:6])


def _oppose(model: torch.nn.Module, a: str, b: str) -> None:
    """Class b's logit made exactly minus class a's, in the CNN's head and in the BiLSTM's classifier.

    Then d logit_b / d activations = -(d logit_a / d activations) in both Grad-CAM modes, so the two maps'
    sums before the ReLU are opposites: where one is negative the other has heat. Only the rows of b change;
    the maps of a are those of the trained weights."""
    ia, ib = CLASSES.index(a), CLASSES.index(b)
    with torch.no_grad():
        for layer in (model.cnn.head, model.sequence.classifier):
            layer.weight[ib] = -layer.weight[ia]
            layer.bias[ib] = -layer.bias[ia]


def test_node_analyses_a_series_with_the_25d_checkpoint(trained: Path, tmp_path: Path) -> None:
    """A real DICOM series through the node's analysis (strict reader, slabs, Predictor) with the trained
    2.5D checkpoint; Grad-CAM maps are those of each slice's own input, whose centre is that slice.

    Four Adam steps leave the tiny CNN almost blind in eval mode (its outputs move with the input only at
    float rounding level), so the sign of each Grad-CAM sum, and whether the ReLU leaves any heat, would
    depend on the CPU's kernels. With `epidural` wired as the exact negative of `any`, one of those two
    maps of every explained slice has heat whatever the weights and kernels."""
    from ihd_node.imaging.intracranial import intracranial_mask
    from ihd_node.model.gradcam import grad_cam, mask_heatmap
    from ihd_node.model.pipeline import Predictor
    from ihd_node.model.preprocess import prepare_slices
    from ihd_node.node.analysis import analyze_series
    from ihd_node.sim.phantom import make_series, write_series

    series = make_series(11, subtypes=["subdural"], n_slices=8, size=INPUT)
    paths = write_series(series, tmp_path / "series")
    loaded = load_checkpoint(trained / "model.pt")
    _oppose(loaded.model, "any", "epidural")
    for explain in ("decision", "cnn"):
        # every slice positive: maps for all of them
        predictor = Predictor.from_model(loaded.model, dict.fromkeys(CLASSES, 0.0), loaded.name, loaded.version,
                                         device="cpu", explain=explain)
        result = analyze_series(paths, predictor, max_cam_slices=3)
        pred = result.prediction
        assert pred.slice_probabilities.shape == (8, 6)
        assert len({i for i, _ in pred.heatmaps}) == 3 and len(pred.heatmaps) == 18
        for heat in pred.heatmaps.values():
            assert heat.shape == (INPUT, INPUT) and np.isfinite(heat).all() and heat.max() <= 1.0
        for i in {i for i, _ in pred.heatmaps}:
            assert pred.heatmaps[(i, "any")].max() > 0 or pred.heatmaps[(i, "epidural")].max() > 0
    # The CNN maps equal Grad-CAM of the CNN on each slice's stacked input, cut to that slice's head.
    hu = result.volume.hu
    x = stack_neighbours(prepare_slices(hu, INPUT), 1)
    pairs = sorted(pred.heatmaps)
    ref = grad_cam(predictor.model.cnn, x, [(i, CLASSES.index(c)) for i, c in pairs], out_size=hu.shape[1:])
    spacing = float(min(result.volume.pixel_spacing))
    for k, (i, c) in enumerate(pairs):
        want = mask_heatmap(ref[k].numpy(), intracranial_mask(hu[i], spacing))
        np.testing.assert_allclose(pred.heatmaps[(i, c)], want, atol=1e-3)


def test_25d_with_out_of_fold_bilstm(trained: Path, tmp_path: Path) -> None:
    """The two options combine: the fold CNNs of `--bilstm-features oof` take the 2.5D input too."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(trained, work)
    assert training_main(["train", "--work", str(work), "--input-size", str(INPUT), "--input", "2.5d",
                          "--selected-dim", "8", "--device", "cpu", "--epochs", "1", "--epoch-size", "32",
                          "--batch-size", "8", "--lr-scale", "10", "--positive-share", "0.5", "--seq-epochs", "1",
                          "--pca-samples", "500", "--bilstm-features", "oof", "--folds", "2"]) == 0
    oof = load_checkpoint(work / "model-oof.pt")
    assert oof.config.neighbours == 1 and first_conv(oof.model.cnn.backbone)[2].in_channels == 9
    fold = torch.load(work / "oof" / "fold1" / "cnn" / "state.pt", weights_only=True)["model"]
    assert next(v for k, v in fold.items() if k.endswith("weight") and v.ndim == 4).shape[1] == 9
