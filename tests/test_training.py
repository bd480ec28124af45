"""A tiny run of the three training stages on phantoms written in the RSNA 2019 layout, resume, and a
trained checkpoint used through the node's Predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ihd_node.model.presets import tiny_config
from training.augment import AugmentConfig, Augmenter, to_input
from training.cli import main as training_main
from training.data import ScanStore, read_rsna_labels
from training.train import TrainOptions, run_stages

INPUT = 64


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ihd_node.phantom import write_rsna_layout

    root = tmp_path_factory.mktemp("rsna")
    write_rsna_layout(root, n_series=8, seed=5, size=96, n_slices=10)
    return root


@pytest.fixture(scope="module")
def work(rsna: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("work")
    code = training_main(["prepare", "--data", str(rsna), "--work", str(work), "--input-size", str(INPUT),
                          "--val-fraction", "0.25", "--test-fraction", "0.0", "--seed", "1"])
    assert code == 0
    return work


def test_prepare_groups_slices_into_sorted_scans(rsna: Path, work: Path) -> None:
    labels = read_rsna_labels(rsna / "stage_2_train.csv")
    store = ScanStore(work / "cache")
    assert len(store.scans) == 8 and store.size == INPUT
    assert sum(s.n_slices for s in store.scans.values()) == len(labels)
    for scan in store.scans.values():
        images = store.images(scan.scan_id)
        assert images.shape == (scan.n_slices, 3, INPUT, INPUT) and images.dtype == np.uint8
        # Labels follow the sorted slice order and come from the CSV rows of those very files.
        assert np.array_equal(scan.label_array(), np.stack([labels[k] for k in scan.keys]))
    splits = json.loads((work / "splits.json").read_text())
    train, val = set(splits["train"]), set(splits["val"])
    assert train and val and not train & val and train | val == set(store.scans)


def test_cache_matches_inference_preprocessing(rsna: Path, work: Path) -> None:
    from ihd_node.dicom.volume import load_volume
    from ihd_node.model.preprocess import prepare_slices

    store = ScanStore(work / "cache")
    scan = next(iter(store.scans.values()))
    files = [rsna / "stage_2_train" / f"{k}.dcm" for k in scan.keys]
    vol = load_volume(files[::-1])  # any file order: load_volume sorts along the slice normal
    expected = prepare_slices(vol.hu, INPUT)
    got = to_input(torch.from_numpy(np.array(store.images(scan.scan_id))))
    # uint8 storage: at most half a step of 1/255 in window units, divided by the channel std (~0.29).
    assert torch.allclose(got, expected, atol=0.5 / 255 / 0.28 + 1e-5)


def test_augmentation_keeps_shape_and_range() -> None:
    images = torch.randint(0, 256, (4, 3, INPUT, INPUT), dtype=torch.uint8)
    out = Augmenter(AugmentConfig(), generator=torch.Generator().manual_seed(0))(images)
    assert out.shape == (4, 3, INPUT, INPUT) and torch.isfinite(out).all()
    assert torch.equal(Augmenter(AugmentConfig.off())(images), to_input(images))


def test_three_stages_resume_and_predict(rsna: Path, work: Path) -> None:
    torch.set_num_threads(2)
    config = tiny_config("mobilenet_v3_small", INPUT)
    opts = TrainOptions(work=work, config=config, device="cpu", cnn_epochs=1, batch_size=8, epoch_size=48,
                        lr_scale=10.0, positive_share=0.5, seq_epochs=1, pca_samples=2000, verbose=False)
    ckpt = run_stages(opts)
    assert ckpt is not None and ckpt.is_file()
    cnn_state = torch.load(work / "cnn" / "state.pt", weights_only=True)
    assert cnn_state["done"] and cnn_state["epoch"] == 1

    # Resume: asking for one more epoch continues the finished stage from epoch 1, keeps its history,
    # redoes the stages after it, and leaves everything else alone.
    more = TrainOptions(**{**opts.__dict__, "cnn_epochs": 2, "seq_epochs": 2})
    run_stages(more)
    cnn_state2 = torch.load(work / "cnn" / "state.pt", weights_only=True)
    assert cnn_state2["epoch"] == 2 and len(cnn_state2["history"]) == 2
    assert cnn_state2["history"][0] == cnn_state["history"][0]
    index = json.loads((work / "features" / "index.json").read_text())
    assert index["cnn_run"] == cnn_state2["run_id"]
    seq_state = torch.load(work / "sequence" / "state.pt", weights_only=True)
    assert seq_state["epoch"] == 2 and seq_state["features_run"] == index["run_id"]
    # A rerun of the finished run skips every stage (state files untouched).
    mtimes = {p: p.stat().st_mtime_ns for p in [work / "cnn" / "state.pt", work / "sequence" / "state.pt"]}
    run_stages(more)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    # The checkpoint works in the node's own Predictor and the CLI evaluation writes its metrics into it.
    from ihd_node.dicom.volume import load_volume
    from ihd_node.model.checkpoint import load_checkpoint
    from ihd_node.model.pipeline import Predictor

    store = ScanStore(work / "cache")
    scan = next(iter(store.scans.values()))
    vol = load_volume([rsna / "stage_2_train" / f"{k}.dcm" for k in scan.keys])
    pred = Predictor.load(work / "model.pt", device="cpu").predict(vol.hu, explain=False)
    assert pred.slice_probabilities.shape == (scan.n_slices, 6)
    assert training_main(["evaluate", "--checkpoint", str(work / "model.pt"), "--work", str(work),
                          "--split", "val", "--device", "cpu"]) == 0
    provenance = load_checkpoint(work / "model.pt").provenance
    n_val = len(json.loads((work / "splits.json").read_text())["val"])
    assert provenance["metrics"]["val"]["scan"]["n"] == n_val
    assert "validation" in provenance["metrics"]


def test_lesion_masks_train_the_auxiliary_head(tmp_path: Path) -> None:
    """Phantom masks are cached beside the images and drive the auxiliary map loss of the CNN stage."""
    from ihd_node.phantom import make_series
    from training.data import mask_size, save_manifest, write_cached_scan
    from training.train import stage_cnn

    torch.set_num_threads(2)
    cache = tmp_path / "cache"
    cache.mkdir()
    scans = []
    for i, subtypes in enumerate([["subdural"], [], ["intraparenchymal"], []]):
        s = make_series(40 + i, subtypes=subtypes, n_slices=10, size=96)
        scans.append(write_cached_scan(cache, s.series_instance_uid, s.series_instance_uid, s.hu,
                                       s.sop_uids_sorted, s.labels, INPUT, masks=s.masks))
    save_manifest(cache, scans, INPUT)
    store = ScanStore(cache)
    masks = store.masks(scans[0].scan_id)
    assert masks is not None and masks.shape == (10, mask_size(INPUT), mask_size(INPUT))
    # A slice labelled subdural has subdural bits in its mask, a negative scan has none.
    sdh = scans[0].label_array()[:, 5] > 0
    assert all(((masks[i] >> 4) & 1).any() for i in np.flatnonzero(sdh))
    assert not store.masks(scans[1].scan_id).any()
    splits = {"train": [s.scan_id for s in scans], "val": [], "test": []}
    opts = TrainOptions(work=tmp_path, config=tiny_config("mobilenet_v3_small", INPUT), device="cpu",
                        cnn_epochs=1, batch_size=8, epoch_size=32, lr_scale=10.0, positive_share=0.5,
                        mask_weight=1.0, bn_momentum=0.1, verbose=False)
    state = stage_cnn(opts, store, splits)
    assert state["done"] and len(state["mask_head"]) >= 2  # at least one map head (weight and bias)
    assert np.isfinite(state["history"][0]["train_loss"])
