"""Training on files shaped like the real RSNA 2019 set (exactly its attributes, mixed encodings, a corrupt
and a non-DICOM file, duplicate CSV rows): prepare (resumable, fails loudly), the three stages on a tiny
model, evaluation on a split and on the CQ500 layout, and the checkpoint used through the node's Predictor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ihd_node.classes import CLASSES
from ihd_node.model.presets import tiny_config
from training.augment import AugmentConfig, Augmenter, to_input
from training.cli import main as training_main
from training.data import PAUSE_ENV, PROGRESS_FILE, ScanStore, read_rsna_labels
from training.fixtures import RSNA_ATTRIBUTES, RsnaFixture, write_cq500_fixture, write_rsna_fixture
from training.options import TrainOptions
from training.rsna import lenient_uids, load_training_scan
from training.run import run_stages

# Training runs on one intra-op torch thread (tests/conftest.py one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")
INPUT = 64
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> RsnaFixture:
    return write_rsna_fixture(tmp_path_factory.mktemp("rsna"), n_scans=24, seed=100, size=INPUT, n_slices=8)


def _prepare_args(fx: RsnaFixture, work: Path, *extra: str) -> list[str]:
    return ["prepare", "--data", str(fx.root), "--work", str(work), "--input-size", str(INPUT),
            "--val-fraction", "0.25", "--test-fraction", "0.15", "--seed", "1", *extra]


@pytest.fixture(scope="module")
def work(rsna: RsnaFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("work")
    assert training_main(_prepare_args(rsna, work)) == 0
    return work


def test_fixture_carries_exactly_the_real_attribute_set(rsna: RsnaFixture) -> None:
    from ihd_node.imaging.volume import slice_problem
    from ihd_node.intake.spool import valid_uid

    encodings, sizes, windows, media = set(), set(), set(), set()
    quirk = 0
    with lenient_uids():
        for stems in rsna.scans.values():
            for stem in stems:
                if stem in rsna.bad_files:
                    continue
                ds = pydicom.dcmread(rsna.root / "stage_2_train" / f"{stem}.dcm")
                assert {e.keyword for e in ds} == set(RSNA_ATTRIBUTES)
                assert ds.SOPInstanceUID == stem and stem.startswith("ID_")
                encodings.add((int(ds.PixelRepresentation), int(ds.BitsStored)))
                quirk += int(ds.BitsStored == 12 and float(ds.RescaleIntercept) > -100)
                sizes.add((int(ds.Rows), int(ds.Columns)))
                windows.add(isinstance(ds.WindowCenter, pydicom.multival.MultiValue))
                media.add("MediaStorageSOPClassUID" in ds.file_meta)
        # The node stays strict: no SOP class, and `ID_<hex>` is no UID it would accept on the network.
        assert "SOP class" in (slice_problem(ds) or "")
    assert not valid_uid(stem)
    assert encodings >= {(0, 12), (0, 16), (1, 16)} and quirk > 0
    assert len(sizes) >= 3 and (INPUT, INPUT - 8) in sizes  # larger and non-square images too
    assert windows == {True, False} and media == {True, False}
    rows = (rsna.csv_path).read_text().splitlines()[1:]
    assert len(rows) > len(set(rows))  # duplicate rows
    orders = {tuple(r.rsplit(",", 1)[0].rsplit("_", 1)[1] for r in rows[i:i + 6]) for i in range(0, 60, 6)}
    assert len(orders) > 1  # subtype order varies


def test_prepare_reads_the_real_attribute_set(rsna: RsnaFixture, work: Path) -> None:
    labels = read_rsna_labels(rsna.csv_path)
    store = ScanStore(work / "cache")
    assert set(store.scans) == set(rsna.scans) and store.size == INPUT
    # The corrupt slice is dropped (its scan stays), the non-DICOM file is left out, both with reasons.
    skipped = dict(line.split("\t") for line in (work / "skipped.txt").read_text().splitlines())
    assert sorted(skipped.values()) == ["not DICOM", "pixel data cannot be decoded"]
    assert {Path(p).stem for p in skipped} == set(rsna.bad_files)
    thin_scan = next(s for s, stems in rsna.scans.items() if len(stems) == 32)
    for scan in store.scans.values():
        images = store.images(scan.scan_id)
        assert images.shape == (scan.n_slices, 3, INPUT, INPUT) and images.dtype == np.uint8
        # Labels follow the sorted order; a slab is positive where any of its slices is.
        expected = np.stack([np.max([labels[k] for k in key.split("+")], axis=0) for key in scan.keys])
        assert np.array_equal(scan.label_array(), expected)
    # The 1.25 mm scan became 5 mm slabs of four slices, as the node would analyse it.
    assert store.scans[thin_scan].n_slices == 8
    assert all(len(k.split("+")) == 4 for k in store.scans[thin_scan].keys)
    # Splits by patient (the default): no patient on two sides, every scan somewhere.
    splits = json.loads((work / "splits.json").read_text())
    side = {}
    for split, ids in splits.items():
        for sid in ids:
            assert side.setdefault(rsna.patients[sid], split) == split
    assert sorted(sid for ids in splits.values() for sid in ids) == sorted(rsna.scans)
    assert splits["train"] and splits["val"] and splits["test"]
    assert len((work / "headers.jsonl").read_text().splitlines()) == rsna.n_files


def test_training_reader_matches_the_node(tmp_path: Path, rsna: RsnaFixture, work: Path) -> None:
    """Same input at training and inference: sort, HU, slabs as ihd_node.node.analysis; cache = prepare_slices."""
    from ihd_node.imaging.volume import combine_thin_slices, load_volume
    from ihd_node.model.preprocess import prepare_slices
    from ihd_node.sim.phantom import make_series, write_series

    s = make_series(3, n_slices=20, size=INPUT, thin=True, slice_spacing=1.0, encoding="rsna_quirk")
    write_series(s, tmp_path)
    files = sorted(str(p) for p in tmp_path.glob("*.dcm"))
    ours = load_training_scan(files)
    vol = load_volume(files)
    slabs, groups = combine_thin_slices(vol.hu, vol.slice_spacing, 5.0)
    assert np.array_equal(ours.hu, slabs) and len(groups) == len(ours.members) == 4
    assert [[Path(p).stem for p in g] for g in ours.members] == \
        [[vol.slices[i].path.stem for i in g] for g in groups]

    store = ScanStore(work / "cache")
    scan = store.scans[sorted(rsna.scans)[4]]
    loaded = load_training_scan([str(rsna.root / "stage_2_train" / f"{k}.dcm") for k in scan.keys][::-1])
    got = to_input(torch.from_numpy(np.array(store.images(scan.scan_id))))
    # uint8 storage: at most half a step of 1/255 in window units, divided by the channel std (~0.29).
    assert torch.allclose(got, prepare_slices(loaded.hu, INPUT), atol=0.5 / 255 / 0.28 + 1e-5)


def test_prepare_resumes_after_kill_and_reuses_headers(rsna: RsnaFixture, tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {**os.environ, PAUSE_ENV: "5", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training", *_prepare_args(rsna, work)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    progress = work / "cache" / PROGRESS_FILE
    deadline = time.monotonic() + 120
    try:
        while not (progress.is_file() and len(progress.read_text().splitlines()) >= 5):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "prepare did not cache 5 scans in 120 s"
            time.sleep(0.1)
        time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no clean-up, like a crash or the OOM killer
        proc.wait()
    assert not (work / "cache" / "manifest.json").exists() and not (work / "splits.json").exists()
    finished = [json.loads(line)["scan"] for line in progress.read_text().splitlines()]
    assert len(finished) == 5
    mtimes = {s["path"]: (work / "cache" / s["path"]).stat().st_mtime_ns for s in finished}

    # The rerun uses worker processes (the pool path), the killed run did not.
    out = subprocess.run([sys.executable, "-m", "training", *_prepare_args(rsna, work, "--workers", "2")],
                         cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(5 reused from an earlier run)" in out.stdout
    assert f"headers of {rsna.n_files} files reused" in out.stdout
    assert all((work / "cache" / p).stat().st_mtime_ns == t for p, t in mtimes.items())
    assert len(ScanStore(work / "cache").scans) == len(rsna.scans)


def test_dry_run_reports_scans_disk_and_time(rsna: RsnaFixture, work: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert training_main(_prepare_args(rsna, work, "--dry-run", "--workers", "4")) == 0
    out = capsys.readouterr().out
    n_slices = rsna.n_files - 1  # the non-DICOM file is left out before
    assert f"dry run: {len(rsna.scans)} scans, {n_slices} slices (1 of {rsna.n_files} files left out)" in out
    assert "GB at 64px" in out and "min with --workers 4" in out
    # The dry run fails like the real run when too many files would be left out.
    assert training_main(_prepare_args(rsna, work, "--dry-run", "--max-rejected", "0.001")) == 2
    assert f"1 of {rsna.n_files} files (0.5%) were left out" in capsys.readouterr().err


def test_prepare_fails_loudly_with_reasons(rsna: RsnaFixture, work: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # No usable file at all: non-zero, each reason with its count.
    data = tmp_path / "data"
    (data / "stage_2_train").mkdir(parents=True)
    rows = ["ID,Label"]
    for i in range(3):
        (data / "stage_2_train" / f"ID_00{i}.dcm").write_bytes(b"not dicom")
        rows += [f"ID_00{i}_{c},0" for c in CLASSES]
    with lenient_uids():
        mr = pydicom.dcmread(rsna.root / "stage_2_train" / f"{rsna.scans[sorted(rsna.scans)[0]][0]}.dcm")
        mr.Modality = "MR"
        mr.save_as(data / "stage_2_train" / "ID_mr.dcm")
    rows += [f"ID_mr_{c},0" for c in CLASSES]
    (data / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    assert training_main(["prepare", "--data", str(data), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "no usable scans among 4 files" in err
    assert "       3  not DICOM" in err and "       1  modality MR is not CT" in err
    # More than the allowed share left out: non-zero, no splits written (the cache is kept for a rerun).
    splits_before = (work / "splits.json").read_text()
    (work / "splits.json").unlink()
    try:
        assert training_main(_prepare_args(rsna, work, "--max-rejected", "0.005")) == 2
        err = capsys.readouterr().err
        assert f"2 of {rsna.n_files} files" in err and "more than --max-rejected" in err
        assert "1  pixel data cannot be decoded" in err
        assert not (work / "splits.json").exists()
    finally:
        (work / "splits.json").write_text(splits_before)


def test_augmentation_keeps_shape_and_range() -> None:
    images = torch.randint(0, 256, (4, 3, INPUT, INPUT), dtype=torch.uint8)
    out = Augmenter(AugmentConfig(), generator=torch.Generator().manual_seed(0))(images)
    assert out.shape == (4, 3, INPUT, INPUT) and torch.isfinite(out).all()
    assert torch.equal(Augmenter(AugmentConfig.off())(images), to_input(images))


def test_three_stages_resume_evaluate_and_cq500(rsna: RsnaFixture, work: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
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
    mtimes = {p: p.stat().st_mtime_ns for p in [work / "cnn" / "state.pt", work / "sequence" / "state.pt"]}
    run_stages(more)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    # The checkpoint works in the node's Predictor; evaluate reports the paper's metric and stores it.
    from ihd_node.model.checkpoint import load_checkpoint
    from ihd_node.model.pipeline import Predictor

    store = ScanStore(work / "cache")
    scan = store.scans[sorted(rsna.scans)[3]]
    loaded = load_training_scan([str(rsna.root / "stage_2_train" / f"{k}.dcm") for k in scan.keys])
    pred = Predictor.load(work / "model.pt", device="cpu").predict(loaded.hu, explain=False)
    assert pred.slice_probabilities.shape == (scan.n_slices, 6)
    capsys.readouterr()
    assert training_main(["evaluate", "--checkpoint", str(work / "model.pt"), "--work", str(work),
                          "--split", "test", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "slice level" in out and "scan level" in out and "weighted log loss" in out
    provenance = load_checkpoint(work / "model.pt").provenance
    n_test = len(json.loads((work / "splits.json").read_text())["test"])
    assert provenance["metrics"]["test"]["scan"]["n"] == n_test
    assert "validation" in provenance["metrics"]

    # Flip test-time augmentation (an option beyond the paper): the mean over the scan and its mirror image.
    from training.evaluate import FlipTTA, predict_cached

    # How much the tiny model's output moves with the mirror is the CPU kernels' rounding (a few Adam steps
    # leave it almost blind in eval mode), so what the model is given is checked, not what it makes of it.
    ids = json.loads((work / "splits.json").read_text())["test"][:2]
    model = load_checkpoint(work / "model.pt").model
    _, plain = predict_cached(model, store, ids, torch.device("cpu"), verbose=False)
    given: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _m, args: given.append(args[0].clone()))
    try:
        _, flipped = predict_cached(model, store, ids, torch.device("cpu"), verbose=False, tta="flip")
    finally:
        handle.remove()
    x = to_input(torch.from_numpy(np.array(store.images(ids[0]))))
    assert len(given) == 2 * len(ids) and torch.equal(given[0], x) and torch.equal(given[1], x.flip(-1))
    assert not torch.equal(x, x.flip(-1))
    with torch.no_grad():
        mirror = torch.sigmoid(model(x.flip(-1))).numpy()
    np.testing.assert_allclose(flipped[0], (plain[0] + mirror) / 2, rtol=0, atol=1e-6)
    predictor = Predictor.load(work / "model.pt", device="cpu")
    both = FlipTTA(predictor).predict(loaded.hu)
    np.testing.assert_allclose(both.slice_probabilities, (pred.slice_probabilities + predictor.predict(
        np.ascontiguousarray(loaded.hu[:, :, ::-1]), explain=False).slice_probabilities) / 2, atol=1e-6)
    assert training_main(["evaluate", "--checkpoint", str(work / "model.pt"), "--work", str(work),
                          "--split", "test", "--device", "cpu", "--tta", "flip"]) == 0
    assert "flip test-time augmentation" in capsys.readouterr().out
    assert load_checkpoint(work / "model.pt").provenance["metrics"]["test+flip"]["scan"]["n"] == n_test

    # External validation on the CQ500 layout: majority of three readers, scan level, the node's path.
    cq = write_cq500_fixture(tmp_path / "cq500", n_scans=6, size=INPUT)
    from training.cq500 import choose_series, read_cq500_reads

    truth = read_cq500_reads(cq.reads)
    assert {k: v.tolist() for k, v in truth.items()} == {k: v.tolist() for k, v in cq.truth.items()}
    choice = choose_series(cq.root / "CQ500CT0 CQ500CT0")
    # The node's ranking: not the 1.25 mm series, not the bone kernel (more slices, lower series number).
    assert choice.paths is not None and choice.paths[0].parent.name == "CT 5mm"
    assert len(list((cq.root / "CQ500CT0 CQ500CT0" / "Unknown Study").iterdir())) == 3
    assert training_main(["evaluate", "--checkpoint", str(work / "model.pt"), "--cq500", str(cq.root),
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CQ500 (6 scans, majority of 3 readers)" in out and "weighted log loss" in out
    assert load_checkpoint(work / "model.pt").provenance["metrics"]["cq500"]["scan"]["n"] == 6
    assert training_main(["evaluate", "--checkpoint", str(work / "model.pt"), "--cq500", str(cq.root),
                          "--device", "cpu", "--tta", "flip"]) == 0
    assert "flip test-time augmentation" in capsys.readouterr().out
    assert load_checkpoint(work / "model.pt").provenance["metrics"]["cq500+flip"]["scan"]["n"] == 6

    # A CQ500 folder with nothing usable: non-zero, with the reasons.
    empty = tmp_path / "cq_empty"
    (empty / "CQ500CT0 CQ500CT0" / "Unknown Study" / "CT 5mm").mkdir(parents=True)
    (empty / "CQ500CT0 CQ500CT0" / "Unknown Study" / "CT 5mm" / "CT000000.dcm").write_bytes(b"junk")
    (empty / "reads.csv").write_text(cq.reads.read_text())
    assert training_main(["evaluate", "--checkpoint", str(work / "model.pt"), "--cq500", str(empty),
                          "--device", "cpu", "--no-write"]) == 2
    err = capsys.readouterr().err
    assert "none of the 6 scans" in err and "5  no folder for this scan" in err and "no CT series" in err


def test_backbone_weights_imagenet_file_and_paper_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torchvision

    from ihd_node.errors import UserError
    from ihd_node.model.cnn import SliceCNN
    from training.weights import resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Offline and not in the hub cache: a clear error naming the URL and where to put the file.
    with pytest.raises(UserError) as err:
        resolve_weights("imagenet", "mobilenet_v3_small", preset="compact", from_scratch=False, download=False)
    target = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    assert str(target) in str(err.value) and "https://download.pytorch.org/" in str(err.value)
    # The file where torchvision keeps it (as a download or a copy would leave it) is used.
    reference = torchvision.models.mobilenet_v3_small(weights=None)
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    path = resolve_weights("imagenet", "mobilenet_v3_small", preset="paper", from_scratch=False, download=False)
    assert path == str(target)
    cnn = SliceCNN("mobilenet_v3_small", weights_path=path)
    assert torch.equal(cnn.backbone.features[0][0].weight, reference.features[0][0].weight)
    # The paper preset refuses random initialisation unless asked for; before touching any data.
    assert training_main(["train", "--work", str(tmp_path / "nowork"), "--preset", "paper"]) == 2
    assert "--from-scratch" in capsys.readouterr().err
    with pytest.raises(UserError, match="no such file"):
        resolve_weights(str(tmp_path / "missing.pth"), "resnet18", preset="compact", from_scratch=False)
    assert resolve_weights(None, "resnext101_32x8d", preset="paper", from_scratch=True) is None


def test_lesion_masks_train_the_auxiliary_head(tmp_path: Path) -> None:
    """Phantom masks are cached beside the images and drive the auxiliary map loss of the CNN stage."""
    from ihd_node.sim.phantom import make_series
    from training.data import mask_size, save_manifest, write_cached_scan
    from training.stages.cnn import stage_cnn

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


def test_losses_eq1_is_the_papers_plain_sum_and_weighted_the_metric() -> None:
    from training.losses import loss_function
    from training.metrics import weighted_log_loss
    from training.options import TrainingError

    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0], [-1.0, 0.0, 2.0, 1.0, -2.0, 3.0]])
    targets = torch.tensor([[1.0, 0, 1, 0, 1, 0], [0.0, 0, 0, 1, 0, 1]])
    p = torch.sigmoid(logits)
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log())
    opts = TrainOptions(work=Path("."), config=tiny_config("mobilenet_v3_small", INPUT))
    assert opts.loss == "eq1"  # the paper's default
    torch.testing.assert_close(loss_function(opts)(logits, targets), bce.sum(dim=1).mean())
    opts.loss = "weighted"
    assert float(loss_function(opts)(logits, targets)) == pytest.approx(
        weighted_log_loss(targets.numpy(), p.numpy()), rel=1e-5)
    opts.loss = "focal"
    with pytest.raises(TrainingError, match="unknown loss"):
        loss_function(opts)


def test_bilstm_on_out_of_fold_cnn_outputs(rsna: RsnaFixture, work: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Option beyond the paper (`--bilstm-features oof`): K fold CNNs give the BiLSTM's training inputs, each
    for the patients it never trained on; the checkpoint is the shipped CNN + selector + that BiLSTM."""
    import shutil

    from ihd_node.model.checkpoint import load_checkpoint
    from ihd_node.model.pipeline import Predictor
    from ihd_node.node.analysis import analyze_series
    from ihd_node.sim.phantom import make_series, write_series
    from training.stages.cnn import build_cnn, cnn_outputs
    from training.stages.features import load_selector

    w = tmp_path / "work"
    shutil.copytree(work / "cache", w / "cache")
    shutil.copy(work / "splits.json", w / "splits.json")
    splits = json.loads((w / "splits.json").read_text())
    common = ["train", "--work", str(w), "--input-size", str(INPUT), "--selected-dim", "8", "--from-scratch",
              "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--epoch-size", "48", "--lr-scale", "10",
              "--positive-share", "0.5", "--seq-epochs", "1", "--pca-samples", "2000"]
    assert training_main([*common, "--bilstm-features", "oof", "--folds", "1"]) == 2
    assert "at least 2 folds" in capsys.readouterr().err
    assert training_main(common) == 0  # the paper's in-sample run
    assert training_main([*common, "--bilstm-features", "oof", "--folds", "2"]) == 0
    assert (w / "model.pt").is_file() and (w / "model-oof.pt").is_file()

    # Folds partition the training split by patient; each training scan's BiLSTM input comes from the fold
    # CNN that did not train on any scan of its patient.
    folds = json.loads((w / "oof" / "folds.json").read_text())["folds"]
    assert len(folds) == 2 and sorted(folds[0] + folds[1]) == sorted(splits["train"])
    index = json.loads((w / "oof" / "features" / "index.json").read_text())
    for k, held_out in enumerate(folds):
        trained_on = [s for j, f in enumerate(folds) if j != k for s in f]
        assert held_out and trained_on
        assert not {rsna.patients[s] for s in trained_on} & {rsna.patients[s] for s in held_out}
        assert all(index["source"][s] == f"fold{k}" for s in held_out)
    assert all(index["source"][s] == "full" for s in splits["val"] + splits["test"])
    # The stored rows are that fold CNN's outputs through the shipped selector (recomputed here).
    opts = TrainOptions(work=w, config=load_checkpoint(w / "model.pt").config, device="cpu")
    selector, store = load_selector(opts), ScanStore(w / "cache")
    sid = folds[1][0]
    cnn = build_cnn(opts)
    cnn.load_state_dict(torch.load(w / "oof" / "fold1" / "cnn" / "state.pt", weights_only=True)["model"])
    logits, feats = cnn_outputs(cnn.eval(), torch.from_numpy(np.array(store.images(sid))), torch.device("cpu"))
    start, n = index["offsets"][sid]
    with torch.no_grad():
        np.testing.assert_allclose(np.load(w / "oof" / "features" / "selected.npy")[start:start + n],
                                   selector(feats).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.load(w / "oof" / "features" / "logits.npy")[start:start + n], logits.numpy(),
                               rtol=1e-4, atol=1e-4)

    # One CNN and selector ship in both checkpoints (the shipped CNN is trained on the whole split);
    # only the BiLSTM differs. The gap between fold and shipped features is measured and stored.
    plain, oof = load_checkpoint(w / "model.pt"), load_checkpoint(w / "model-oof.pt")
    ps, os_ = plain.model.state_dict(), oof.model.state_dict()
    assert all(torch.equal(ps[k], os_[k]) for k in ps if not k.startswith("sequence."))
    assert any(not torch.equal(ps[k], os_[k]) for k in ps if k.startswith("sequence."))
    info = oof.provenance["bilstm_features"]
    assert info["mode"] == "oof" and info["folds"] == 2 and info["fold_scans"] == [len(f) for f in folds]
    assert info["feature_gap"]["rel_rms"] > 0 and len(info["feature_gap"]["corr_per_fold"]) == 2
    assert info["validation_fold_features"]["scan"]["n"] == len(splits["val"])
    assert oof.provenance["training"]["bilstm_features"] == "oof"

    # The node loads it and analyses a DICOM series with it (Grad-CAM included); evaluate reports the metric.
    series = make_series(7, subtypes=["subdural"], n_slices=8, size=INPUT)
    write_series(series, tmp_path / "series")
    result = analyze_series(sorted((tmp_path / "series").glob("*.dcm")),
                            Predictor.load(w / "model-oof.pt", device="cpu"), max_cam_slices=1)
    assert result.prediction.slice_probabilities.shape == (8, 6)
    capsys.readouterr()
    assert training_main(["evaluate", "--checkpoint", str(w / "model-oof.pt"), "--work", str(w),
                          "--split", "test", "--device", "cpu"]) == 0
    assert "weighted log loss" in capsys.readouterr().out
    assert load_checkpoint(w / "model-oof.pt").provenance["metrics"]["test"]["scan"]["n"] == len(splits["test"])

    # A rerun finds every stage finished and changes nothing.
    states = [w / "oof" / "fold0" / "cnn" / "state.pt", w / "oof" / "sequence" / "state.pt",
              w / "oof" / "features" / "index.json"]
    mtimes = [p.stat().st_mtime_ns for p in states]
    again = [*common, "--bilstm-features", "oof", "--folds", "2", "--out", str(tmp_path / "again.pt")]
    assert training_main(again) == 0
    assert [p.stat().st_mtime_ns for p in states] == mtimes
