"""Stage 3: the BiLSTM trained on whole scans (one scan per batch, Adam 1e-4, 4 epochs), the CNN frozen and
its outputs precomputed by the features stage (or the out-of-fold one) (WORK/sequence/state.pt)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.data import ScanStore
from training.losses import loss_function
from training.metrics import evaluate_scans
from training.options import (
    TrainingError,
    TrainOptions,
    atomic_save,
    check_config,
    load_state,
    log,
    resolve_device,
)
from training.progress import progress

BILSTM_FEATURES = ("in_sample", "oof")


def features_folder(opts: TrainOptions) -> Path:
    """Where the BiLSTM's training inputs live: features/ (in-sample, the paper) or oof/features/."""
    return opts.work / ("oof/features" if opts.bilstm_features == "oof" else "features")


def sequence_folder(opts: TrainOptions) -> Path:
    """The BiLSTM's state; the out-of-fold run keeps its own, so both can share one CNN and work folder."""
    return opts.work / ("oof/sequence" if opts.bilstm_features == "oof" else "sequence")


class ScanFeatures:
    """Precomputed per-scan inputs of the sequence model: selected features, CNN probabilities, labels."""

    def __init__(self, opts: TrainOptions, store: ScanStore) -> None:
        folder = features_folder(opts)
        index = json.loads((folder / "index.json").read_text())
        self.offsets: dict[str, list[int]] = index["offsets"]
        self.selected = np.load(folder / "selected.npy", mmap_mode="r")
        self.logits = np.load(folder / "logits.npy", mmap_mode="r")
        self.store = store

    def get(self, sid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, n = self.offsets[sid]
        feats = torch.from_numpy(np.array(self.selected[start:start + n]))
        probs = torch.sigmoid(torch.from_numpy(np.array(self.logits[start:start + n])))
        return feats, probs, torch.from_numpy(self.store.labels(sid))


def build_sequence(opts: TrainOptions) -> torch.nn.Module:
    from ihd_node.model.sequence import SequenceHead

    c = opts.config
    torch.manual_seed(opts.seed + 1)
    return SequenceHead(c.selected_dim, c.lstm_hidden, c.lstm_layers, c.bidirectional, c.dropout,
                        c.concat_cnn_probs, num_classes=c.num_classes)


def _pad(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([b[0].shape[0] for b in batch])
    t = int(lengths.max())

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, t - x.shape[0]))

    return (torch.stack([pad(b[0]) for b in batch]), torch.stack([pad(b[1]) for b in batch]),
            torch.stack([pad(b[2]) for b in batch]), lengths)


def stage_sequence(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]]) -> dict[str, Any]:
    path = sequence_folder(opts) / "state.pt"
    state = load_state(path)
    if not (features_folder(opts) / "index.json").is_file():
        raise TrainingError(f"stage sequence needs {features_folder(opts)}; run the features stage first")
    features_run = json.loads((features_folder(opts) / "index.json").read_text())["run_id"]
    if state is not None:
        check_config(state, opts, "sequence")
        if state.get("features_run") != features_run:
            log(opts, "stage sequence: the features changed since it was trained; training it again")
            state = None
        elif state.get("done") and int(state["epoch"]) >= opts.seq_epochs:
            log(opts, f"stage sequence: finished earlier ({path}); skipped")
            return state
    device = resolve_device(opts.device)
    model = build_sequence(opts).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=opts.seq_lr * opts.lr_scale)
    epoch, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        epoch, history = int(state["epoch"]), list(state.get("history", []))
        log(opts, f"stage sequence: resuming at epoch {epoch + 1}")
    data = ScanFeatures(opts, store)
    train_ids = list(splits["train"])
    criterion = loss_function(opts)

    def save(done: bool) -> None:
        atomic_save({"config": opts.config.to_dict(), "options": opts.jsonable(), "epoch": epoch,
                      "done": done, "features_run": features_run, "history": history,
                      "model": model.state_dict(), "optimizer": optimiser.state_dict()}, path)

    while epoch < opts.seq_epochs:
        order = np.random.default_rng([opts.seed, 7, epoch]).permutation(len(train_ids))
        model.train()
        running, seen = 0.0, 0
        batches = [order[i:i + opts.seq_batch] for i in range(0, len(order), opts.seq_batch)]
        bar = progress(batches, desc=f"sequence epoch {epoch + 1}/{opts.seq_epochs}", enabled=opts.verbose)
        for idx in bar:
            feats, probs, labels, lengths = _pad([data.get(train_ids[i]) for i in idx])
            feats, probs, labels = feats.to(device), probs.to(device), labels.to(device)
            logits = model(feats, probs, lengths if len(idx) > 1 else None)
            mask = torch.arange(feats.shape[1], device=device)[None, :] < lengths.to(device)[:, None]
            loss = criterion(logits[mask], labels[mask])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if opts.seq_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opts.seq_clip)
            optimiser.step()
            running = 0.95 * running + 0.05 * loss.item() if seen else loss.item()
            seen += 1
            bar.set_postfix(loss=running)
        history.append({"epoch": epoch + 1, "train_loss": running})
        epoch += 1
        if splits.get("val"):
            metrics = evaluate_sequence(model, data, splits["val"], device)
            history[-1]["val_slice_log_loss"] = metrics["slice"]["log_loss"]
            log(opts, f"sequence epoch {epoch}: train loss {running:.4f}, val slice log loss "
                       f"{metrics['slice']['log_loss']:.4f}, val scan AUC(any) "
                       f"{metrics['scan']['classes']['any']['auc']:.3f}")
        save(done=epoch >= opts.seq_epochs)
    state = load_state(path)
    assert state is not None
    return state


@torch.no_grad()
def sequence_probabilities(model: torch.nn.Module, data: ScanFeatures, scan_ids: Sequence[str],
                           device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray]]:
    model.eval()
    labels, probs = [], []
    for sid in scan_ids:
        feats, cnn_probs, lab = data.get(sid)
        logits = model(feats[None].to(device), cnn_probs[None].to(device))[0]
        probs.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(lab.numpy())
    return labels, probs


def evaluate_sequence(model: torch.nn.Module, data: ScanFeatures, scan_ids: Sequence[str],
                      device: torch.device, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    labels, probs = sequence_probabilities(model, data, scan_ids, device)
    model.train()
    return evaluate_scans(labels, probs, thresholds)
