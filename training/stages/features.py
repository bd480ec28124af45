"""Stage 2: the CNN's features and logits of every slice, without augmentation; the selector fitted on up to
`pca_samples` training vectors (WORK/features/{raw,logits,selected}.npy, index.json, selector.pt)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import numpy as np
import torch

from ihd_node.classes import CLASSES
from training.data import ScanStore
from training.options import TrainingError, TrainOptions, atomic_save, load_state, log, resolve_device
from training.progress import progress
from training.stages.cnn import build_cnn, cnn_outputs


def stage_features(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]]) -> dict[str, Any]:
    folder = opts.work / "features"
    index_path = folder / "index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    cnn_state = load_state(opts.work / "cnn" / "state.pt")
    if cnn_state is None or not cnn_state.get("done"):
        raise TrainingError("stage features needs a finished cnn stage; run the cnn stage first")
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("done") and index.get("cnn_run") == cnn_state["run_id"]:
            log(opts, f"stage features: finished earlier ({folder}); skipped")
            return index
        log(opts, "stage features: the CNN changed since the features were extracted; extracting again")
    device = resolve_device(opts.device)
    cnn = build_cnn(opts)
    cnn.load_state_dict(cnn_state["model"])
    cnn.to(device).eval()
    folder.mkdir(parents=True, exist_ok=True)
    scan_ids = [sid for split in ("train", "val", "test") for sid in splits.get(split, [])]
    total = sum(store.scans[s].n_slices for s in scan_ids)
    dim = opts.config.feature_dim
    raw = np.lib.format.open_memmap(folder / "raw.npy", mode="w+", dtype=np.float16, shape=(total, dim))
    logits_all = np.zeros((total, len(CLASSES)), dtype=np.float32)
    offsets: dict[str, list[int]] = {}
    pos = 0
    for sid in progress(scan_ids, desc="extracting features", enabled=opts.verbose):
        # float32, as the node runs the model: the BiLSTM learns from the features it will be given.
        logits, feats = cnn_outputs(cnn, torch.from_numpy(np.array(store.images(sid))), device, amp=False,
                                    neighbours=opts.config.neighbours)
        n = logits.shape[0]
        raw[pos:pos + n] = feats.numpy().astype(np.float16)
        logits_all[pos:pos + n] = logits.numpy()
        offsets[sid] = [pos, n]
        pos += n
    raw.flush()
    np.save(folder / "logits.npy", logits_all)

    from ihd_node.model.selection import fit_selector

    train_rows = np.concatenate([np.arange(offsets[s][0], offsets[s][0] + offsets[s][1])
                                 for s in splits["train"]])
    rng = np.random.default_rng(opts.seed)
    if len(train_rows) > opts.pca_samples:
        train_rows = np.sort(rng.choice(train_rows, size=opts.pca_samples, replace=False))
    head_weight = cnn.head.weight.detach().cpu().numpy()
    log(opts, f"fitting {opts.config.selector} selector {dim} -> {opts.config.selected_dim} on "
               f"{len(train_rows)} vectors")
    selector = fit_selector(opts.config.selector, np.asarray(raw[train_rows], dtype=np.float32),
                            opts.config.selected_dim, head_weight, seed=opts.seed,
                            weight_reading=opts.weight_reading)
    selected = np.zeros((total, opts.config.selected_dim), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, total, 8192):
            chunk = torch.from_numpy(np.asarray(raw[start:start + 8192], dtype=np.float32))
            selected[start:start + 8192] = selector(chunk).numpy()
    np.save(folder / "selected.npy", selected)
    atomic_save({"kind": selector.kind, "state": selector.state_dict()}, folder / "selector.pt")
    index = {"done": True, "config": opts.config.to_dict(), "cnn_run": cnn_state["run_id"],
             "run_id": uuid.uuid4().hex, "offsets": offsets, "total": total}
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)
    return index


def load_selector(opts: TrainOptions) -> torch.nn.Module:
    from ihd_node.model.selection import build_selector

    data = load_state(opts.work / "features" / "selector.pt")
    if data is None:
        raise TrainingError("no fitted selector; run the features stage first")
    selector = build_selector(opts.config.selector, opts.config.feature_dim, opts.config.selected_dim)
    selector.load_state_dict(data["state"])
    return selector
