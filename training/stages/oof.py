"""An option beyond the paper: train the BiLSTM on out-of-fold CNN outputs (`train --bilstm-features oof`).

The paper trains the BiLSTM on the outputs of the CNN for the CNN's own training slices (in-sample): on
those the CNN is more confident and more often right than on scans it has not seen, so the BiLSTM may
learn to trust it more than it should. Here the training split is cut into K folds by patient (the
split's groups); fold CNN k is fine-tuned on the other K-1 folds, exactly like the shipped CNN (same
seed, so the same initialisation, same epochs and slices per epoch), and gives the features and
probabilities of the slices of fold k, which it never saw. The BiLSTM is trained on those.

What ships stays one CNN, one selector and one BiLSTM (no node or checkpoint change): the CNN trained
on the whole training split (the in-sample run's, shared), the selector fitted on that CNN's training
features (the in-sample run's, shared), and the BiLSTM trained on the out-of-fold features mapped
through that same selector. The node therefore feeds the BiLSTM features of another CNN than the
ones it was trained on; `oof_provenance` measures that gap on the validation split (feature
distance, and the BiLSTM's metrics on the fold CNNs' features next to the shipped CNN's) and stores
it in the checkpoint. Validation and test scans always get the shipped CNN's features (thresholds and
`evaluate` judge what the node runs).

Work folder: oof/folds.json, oof/fold<k>/cnn/state.pt (resumable like the cnn stage),
oof/features/{selected,logits}.npy + index.json + val_folds.npz, oof/sequence/state.pt, model-oof.pt.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import ScanStore
from training.metrics import evaluate_scans, jsonable
from training.options import TrainingError, TrainOptions, log, resolve_device
from training.progress import progress
from training.stages.cnn import build_cnn, cnn_outputs, stage_cnn
from training.stages.features import load_selector
from training.stages.sequence import ScanFeatures


def oof_folder(opts: TrainOptions) -> Path:
    return opts.work / "oof"


def assign_folds(store: ScanStore, train_ids: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """The training split's scans in k folds; all scans of a group (patient) in one fold.

    Groups are shuffled with a fixed seed within two strata (any hemorrhage / none) and dealt out in
    turn, so every fold keeps about the split's share of positive scans.
    """
    groups: dict[str, list[str]] = {}
    for sid in train_ids:
        groups.setdefault(store.scans[sid].group, []).append(sid)
    if k < 2:
        raise TrainingError(f"--folds {k}: out-of-fold features need at least 2 folds")
    if len(groups) < k:
        raise TrainingError(f"--folds {k}: the training split has only {len(groups)} patients (groups); "
                            "use fewer folds")
    rng = np.random.default_rng([seed, 91])
    folds: list[list[str]] = [[] for _ in range(k)]
    turn = 0
    for positive in (True, False):
        names = sorted(g for g, ids in groups.items()
                       if any(store.labels(s)[:, 0].max() > 0 for s in ids) == positive)
        for i in rng.permutation(len(names)):
            folds[turn % k].extend(groups[names[i]])
            turn += 1
    return [sorted(f) for f in folds]


def load_folds(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]]) -> list[list[str]]:
    """The fold assignment of this work folder (made once, then reused so the fold CNNs can resume)."""
    path = oof_folder(opts) / "folds.json"
    train = sorted(splits["train"])
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["train"] == train and len(saved["folds"]) == opts.folds and saved["seed"] == opts.seed:
            return saved["folds"]
        raise TrainingError(f"{path}: made for another training split, --folds or --seed; delete "
                            f"{oof_folder(opts)} to train the fold CNNs again")
    folds = assign_folds(store, train, opts.folds, opts.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": opts.seed, "train": train, "folds": folds}))
    return folds


def fold_options(opts: TrainOptions, k: int) -> TrainOptions:
    """Fold CNN k: the shipped CNN's recipe (same seed and initialisation, same epochs and epoch size),
    its own state folder."""
    return replace(opts, work=oof_folder(opts) / f"fold{k}")


def fold_splits(folds: list[list[str]], k: int, splits: dict[str, list[str]]) -> dict[str, list[str]]:
    return {"train": sorted(s for j, f in enumerate(folds) if j != k for s in f), "val": splits.get("val", []),
            "test": []}


def check_held_out(store: ScanStore, trained_on: Sequence[str], held_out: Sequence[str], k: int) -> None:
    """No patient (group) of the held-out fold may be among the fold CNN's training scans."""
    shared = {store.scans[s].group for s in trained_on} & {store.scans[s].group for s in held_out}
    if shared:
        raise TrainingError(f"fold {k}: {len(shared)} patients are both in the fold CNN's training data and "
                            f"in its held-out fold (e.g. {sorted(shared)[0]}); delete {Path('oof')} in the "
                            "work folder and train again")


def _selected(selector: torch.nn.Module, feats: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return selector(feats.float()).numpy().astype(np.float32)


def stage_oof(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]]) -> dict[str, Any]:
    """Train the K fold CNNs (resumable) and write the out-of-fold inputs of the BiLSTM."""
    full_index_path = opts.work / "features" / "index.json"
    if not full_index_path.is_file() or not json.loads(full_index_path.read_text()).get("done"):
        raise TrainingError("out-of-fold features need the finished features stage (its selector)")
    full_index = json.loads(full_index_path.read_text())
    folds = load_folds(opts, store, splits)
    started = time.monotonic()
    states = []
    for k, held_out in enumerate(folds):
        sub = fold_splits(folds, k, splits)
        check_held_out(store, sub["train"], held_out, k)
        log(opts, f"fold CNN {k + 1}/{len(folds)}: {len(sub['train'])} training scans, "
                   f"{len(held_out)} held out")
        states.append(stage_cnn(fold_options(opts, k), store, sub))
    cnn_runs = [s["run_id"] for s in states]

    folder = oof_folder(opts) / "features"
    index_path = folder / "index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("done") and index.get("cnn_runs") == cnn_runs \
                and index.get("features_run") == full_index["run_id"]:
            log(opts, f"stage oof: finished earlier ({folder}); skipped")
            return index
    device = resolve_device(opts.device)
    selector = load_selector(opts)  # fitted on the shipped CNN's training features: the node's selector
    full_selected = np.load(opts.work / "features" / "selected.npy", mmap_mode="r")
    full_logits = np.load(opts.work / "features" / "logits.npy", mmap_mode="r")
    full_offsets: dict[str, list[int]] = full_index["offsets"]
    scan_ids = [sid for split in ("train", "val", "test") for sid in splits.get(split, [])]
    total = sum(store.scans[s].n_slices for s in scan_ids)
    selected = np.zeros((total, opts.config.selected_dim), dtype=np.float32)
    logits_all = np.zeros((total, 6), dtype=np.float32)
    offsets: dict[str, list[int]] = {}
    source: dict[str, str] = {}
    pos = 0
    for sid in scan_ids:  # every row first from the shipped CNN; training scans are overwritten below
        start, n = full_offsets[sid]
        selected[pos:pos + n] = full_selected[start:start + n]
        logits_all[pos:pos + n] = full_logits[start:start + n]
        offsets[sid], source[sid] = [pos, n], "full"
        pos += n

    val = list(splits.get("val") or [])
    val_n = sum(store.scans[s].n_slices for s in val)
    val_selected = np.zeros((len(folds), val_n, opts.config.selected_dim), dtype=np.float32)
    val_logits = np.zeros((len(folds), val_n, 6), dtype=np.float32)
    for k, (held_out, state) in enumerate(zip(folds, states, strict=True)):
        cnn = build_cnn(opts)
        cnn.load_state_dict(state["model"])
        cnn.to(device).eval()
        for sid in progress(held_out, desc=f"out-of-fold features, fold {k + 1}", enabled=opts.verbose):
            logits, feats = cnn_outputs(cnn, torch.from_numpy(np.array(store.images(sid))), device, amp=False)
            start, n = offsets[sid]
            selected[start:start + n] = _selected(selector, feats)
            logits_all[start:start + n] = logits.numpy()
            source[sid] = f"fold{k}"
        # The same fold CNN on the validation scans (unseen by every CNN): measures the gap between the
        # features the BiLSTM learns from and those the shipped CNN gives it in the node.
        row = 0
        for sid in val:
            logits, feats = cnn_outputs(cnn, torch.from_numpy(np.array(store.images(sid))), device, amp=False)
            n = logits.shape[0]
            val_selected[k, row:row + n] = _selected(selector, feats)
            val_logits[k, row:row + n] = logits.numpy()
            row += n
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "selected.npy", selected)
    np.save(folder / "logits.npy", logits_all)
    np.savez(folder / "val_folds.npz", selected=val_selected, logits=val_logits)
    index = {"done": True, "config": opts.config.to_dict(), "cnn_runs": cnn_runs,
             "features_run": full_index["run_id"], "run_id": uuid.uuid4().hex, "offsets": offsets,
             "total": total, "source": source, "folds": folds, "val": val,
             "fold_cnn_seconds": [sum(h.get("seconds", 0.0) for h in s.get("history", [])) for s in states],
             "seconds": round(time.monotonic() - started, 1)}
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)
    return index


def feature_gap(shipped: np.ndarray, fold: np.ndarray) -> dict[str, float]:
    """How far fold-CNN features (K, n, d) lie from the shipped CNN's (n, d) on the same slices.

    rel_rms: RMS of the difference / RMS of the shipped features around their mean (0 = identical, ~1.4
    = unrelated features of the same spread); corr: mean over the d features of the Pearson correlation.
    """
    spread = float(np.sqrt(((shipped - shipped.mean(axis=0)) ** 2).mean())) or 1.0
    rel = [float(np.sqrt(((f - shipped) ** 2).mean())) / spread for f in fold]
    corrs = []
    for f in fold:
        a, b = shipped - shipped.mean(axis=0), f - f.mean(axis=0)
        den = np.sqrt((a ** 2).sum(axis=0) * (b ** 2).sum(axis=0))
        ok = den > 0
        corrs.append(float(((a * b).sum(axis=0)[ok] / den[ok]).mean()) if ok.any() else 0.0)
    return {"rel_rms": float(np.mean(rel)), "rel_rms_per_fold": rel, "corr": float(np.mean(corrs)),
            "corr_per_fold": corrs}


@torch.no_grad()
def oof_provenance(opts: TrainOptions, seq: torch.nn.Module, data: ScanFeatures, val: Sequence[str],
                   thresholds: dict[str, float], device: torch.device) -> dict[str, Any]:
    """The train/inference mismatch of the out-of-fold BiLSTM, measured on the validation split.

    `shipped`: the BiLSTM on the shipped CNN's features (what the node runs). `fold_features`: the same
    BiLSTM on each fold CNN's features of the same scans, probabilities averaged over the folds (inputs
    like those it was trained on; also what an ensemble of the K CNNs would give).
    """
    folder = oof_folder(opts) / "features"
    index = json.loads((folder / "index.json").read_text())
    out: dict[str, Any] = {
        "mode": "oof", "folds": len(index["folds"]), "fold_scans": [len(f) for f in index["folds"]],
        "selector": "fitted on the shipped CNN's training features, applied to every fold CNN",
        "fold_cnn_seconds": index.get("fold_cnn_seconds", []),
    }
    if not index.get("val") or list(index["val"]) != list(val):
        return out
    packed = np.load(folder / "val_folds.npz")
    fold_sel, fold_logits = packed["selected"], packed["logits"]
    shipped_sel = np.concatenate([data.get(sid)[0].numpy() for sid in val])
    shipped_logits = np.concatenate([np.array(data.logits[slice(*_span(data, sid))]) for sid in val])
    out["feature_gap"] = feature_gap(shipped_sel, fold_sel)
    out["cnn_probability_gap"] = float(np.abs(1 / (1 + np.exp(-fold_logits)) -
                                              1 / (1 + np.exp(-shipped_logits))[None]).mean())
    seq.eval()
    labels, shipped_probs, fold_probs = [], [], []
    row = 0
    for sid in val:
        feats, cnn_probs, lab = data.get(sid)
        n = feats.shape[0]
        shipped_probs.append(torch.sigmoid(seq(feats[None].to(device), cnn_probs[None].to(device))[0])
                             .cpu().numpy())
        per_fold = []
        for k in range(fold_sel.shape[0]):
            f = torch.from_numpy(fold_sel[k, row:row + n])[None].to(device)
            p = torch.sigmoid(torch.from_numpy(fold_logits[k, row:row + n]))[None].to(device)
            per_fold.append(torch.sigmoid(seq(f, p)[0]).cpu().numpy())
        fold_probs.append(np.mean(per_fold, axis=0))
        labels.append(lab.numpy())
        row += n
    out["validation_shipped"] = jsonable(evaluate_scans(labels, shipped_probs, thresholds))
    out["validation_fold_features"] = jsonable(evaluate_scans(labels, fold_probs, thresholds))
    log(opts, "out-of-fold BiLSTM on the validation split: weighted log loss (slice / scan) "
               f"{_ll(out['validation_shipped'])} with the shipped CNN's features, "
               f"{_ll(out['validation_fold_features'])} with the fold CNNs' features; feature gap "
               f"rel. RMS {out['feature_gap']['rel_rms']:.3f}, corr {out['feature_gap']['corr']:.3f}")
    return out


def _span(data: ScanFeatures, sid: str) -> tuple[int, int]:
    start, n = data.offsets[sid]
    return start, start + n


def _ll(metrics: dict[str, Any]) -> str:
    return f"{metrics['slice']['log_loss']:.4f} / {metrics['scan']['log_loss']:.4f}"
