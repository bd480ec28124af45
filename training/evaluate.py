"""Evaluation of a finished checkpoint as the paper reports it: weighted log loss, accuracy, ROC AUC,
sensitivity and specificity per class, at slice and at scan level; the numbers go into the checkpoint's
provenance so the file carries its own report card.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.augment import to_input
from training.data import ScanStore
from training.metrics import evaluate_scans, format_metrics, jsonable
from training.progress import progress


@torch.no_grad()
def predict_cached(model: torch.nn.Module, store: ScanStore, scan_ids: Sequence[str], device: torch.device,
                   verbose: bool = True, tta: str = "none") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Whole-model per-slice probabilities for cached scans (the cache holds prepare_slices' output).

    tta "flip": the mean of the probabilities of the scan and of its left-right mirror image (the whole
    model, BiLSTM included, runs on each). Not in the paper; the node does not do it.
    """
    model.eval().to(device)
    labels, probs = [], []
    for sid in progress(scan_ids, desc="evaluating", enabled=verbose):
        x = to_input(torch.from_numpy(np.array(store.images(sid))).to(device))
        p = torch.sigmoid(model(x)).float()
        if tta == "flip":
            p = (p + torch.sigmoid(model(x.flip(-1))).float()) / 2
        probs.append(p.cpu().numpy())
        labels.append(store.labels(sid))
    return labels, probs


class FlipTTA:
    """A predictor that averages the node's Predictor over the volume and its left-right mirror image
    (for `evaluate --cq500 --tta flip`); probabilities only, no heatmaps."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.thresholds = predictor.thresholds

    def predict(self, hu: np.ndarray, explain: bool = False, max_cam_slices: int | None = None,
                **geometry: Any) -> Any:
        from dataclasses import replace

        # geometry (e.g. pixel_spacing_mm) goes through as the node's analysis passes it.
        plain = self.predictor.predict(hu, explain=False, **geometry)
        mirrored = self.predictor.predict(np.ascontiguousarray(hu[:, :, ::-1]), explain=False, **geometry)
        probs = (plain.slice_probabilities + mirrored.slice_probabilities) / 2
        return replace(plain, slice_probabilities=probs, series_probabilities=probs.max(axis=0),
                       seconds=plain.seconds + mirrored.seconds)


def predict_volumes(checkpoint: str | Path, volumes: Iterable[tuple[np.ndarray, np.ndarray]],
                    device: str = "auto", verbose: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-slice probabilities through the node's own Predictor, for full-resolution HU volumes."""
    from ihd_node.model.pipeline import Predictor

    predictor = Predictor.load(checkpoint, device=device)
    labels, probs = [], []
    for hu, lab in progress(list(volumes), desc="evaluating", enabled=verbose):
        pred = predictor.predict(hu, explain=False)
        probs.append(np.asarray(pred.slice_probabilities, dtype=np.float64))
        labels.append(np.asarray(lab))
    return labels, probs


def store_metrics(checkpoint: Path, key: str, metrics: dict[str, Any]) -> None:
    """Write metrics into the checkpoint's provenance under provenance["metrics"][key] (atomically)."""
    store_provenance(checkpoint, {"metrics": {key: jsonable(metrics)}})


def store_provenance(checkpoint: Path, values: dict[str, Any]) -> None:
    """Merge values into the checkpoint's provenance (one level deep for dicts) and rewrite it atomically."""
    from ihd_node.model.checkpoint import read_checkpoint

    path, data = read_checkpoint(checkpoint)
    provenance = dict(data["provenance"])
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(provenance.get(key), dict):
            provenance[key] = {**provenance[key], **value}
        else:
            provenance[key] = value
    data["provenance"] = jsonable(provenance)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def evaluate_checkpoint(checkpoint: Path, work: Path, split: str = "test", device: str = "auto",
                        write: bool = True, verbose: bool = True, tta: str = "none") -> dict[str, Any]:
    """Evaluate a checkpoint on one split of a prepared work folder; print and (optionally) store."""
    from ihd_node.model.checkpoint import load_checkpoint
    from training.options import TrainingError, load_splits, resolve_device

    loaded = load_checkpoint(checkpoint)
    store = ScanStore(work / "cache")
    if store.size != loaded.config.input_size:
        raise TrainingError(f"the cache in {work} holds {store.size}px images, the checkpoint wants "
                            f"{loaded.config.input_size}px; prepare a cache at that size")
    ids = load_splits(work).get(split) or []
    if not ids:
        raise TrainingError(f"split {split!r} of {work} is empty; prepare with --test-fraction or use "
                            "--split val")
    labels, probs = predict_cached(loaded.model, store, ids, resolve_device(device), verbose, tta=tta)
    probs = [loaded.calibration.apply(p) for p in probs]  # as the node reports them
    metrics = evaluate_scans(labels, probs, loaded.thresholds)
    key = split if tta == "none" else f"{split}+{tta}"
    print(f"{split} split of {work} ({len(ids)} scans), checkpoint thresholds"
          f"{', flip test-time augmentation' if tta == 'flip' else ''}:\n{format_metrics(metrics)}")
    if write:
        store_metrics(checkpoint, key, metrics)
    return metrics
