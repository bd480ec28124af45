"""The end of stage 3: CNN + selector + BiLSTM in one checkpoint, with the per-class calibration and the
thresholds fitted on the validation split (WORK/model.pt, or model-oof.pt with out-of-fold BiLSTM
features). The validation scans' labels and uncalibrated probabilities are kept in WORK/export_val.npz."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.calibrate import class_figures, fit_platt, format_figures, policy_text, thresholds_by_policy
from training.data import ScanStore
from training.metrics import evaluate_scans, format_metrics, jsonable
from training.options import TrainingError, TrainOptions, load_state, log, resolve_device
from training.stages.features import load_selector
from training.stages.oof import oof_provenance
from training.stages.sequence import ScanFeatures, sequence_folder, sequence_probabilities

if TYPE_CHECKING:
    from ihd_node.model.calibration import Calibration


def export_checkpoint(opts: TrainOptions, store: ScanStore, splits: dict[str, list[str]],
                      out: Path | None = None) -> Path:
    """Assemble CNN + selector + BiLSTM into one checkpoint, thresholds chosen on the validation split."""
    from ihd_node.model.checkpoint import save_checkpoint
    from ihd_node.model.network import IhdModel

    cnn_state = load_state(opts.work / "cnn" / "state.pt")
    seq_state = load_state(sequence_folder(opts) / "state.pt")
    if not (cnn_state and cnn_state.get("done") and seq_state and seq_state.get("done")):
        raise TrainingError("export needs finished cnn, features and sequence stages")
    model = IhdModel(opts.config)
    model.cnn.load_state_dict(cnn_state["model"])
    model.selector.load_state_dict(load_selector(opts).state_dict())
    model.sequence.load_state_dict(seq_state["model"])
    model.eval()

    device = resolve_device(opts.device)
    data = ScanFeatures(opts, store)
    val = splits.get("val") or splits["train"]
    seq = model.sequence.to(device)
    labels, probs = sequence_probabilities(seq, data, val, device)
    scan_labels = np.stack([y.max(axis=0) for y in labels])
    scan_probs = np.stack([p.max(axis=0) for p in probs])
    np.savez(opts.work / "export_val.npz", labels=scan_labels, probs=scan_probs)
    calibration, policy = calibrate(opts, scan_labels, scan_probs, len(val))
    thresholds = policy.pop("thresholds")
    val_metrics = evaluate_scans(labels, [calibration.apply(p) for p in probs], thresholds)
    log(opts, "validation split, chosen thresholds:\n" + format_metrics(val_metrics))
    log(opts, "validation split (calibrated, in-sample):\n" + format_figures(policy["validation"]))
    model.to("cpu")
    provenance = {
        "data": opts.trained_on or f"scans in {opts.work / 'cache'}",
        "date": time.strftime("%Y-%m-%d"),
        "splits": {k: len(v) for k, v in splits.items()},
        "training": {k: v for k, v in opts.jsonable().items() if k not in ("config", "verbose")},
        "history": {"cnn": cnn_state.get("history", []), "sequence": seq_state.get("history", [])},
        "threshold_method": policy["policy"],
        "metrics": {"validation": jsonable(val_metrics)},
    }
    if opts.bilstm_features == "oof":
        provenance["bilstm_features"] = oof_provenance(opts, seq, data, val, thresholds, device)
    path = out or opts.work / ("model-oof.pt" if opts.bilstm_features == "oof" else "model.pt")
    save_checkpoint(path, model, thresholds=thresholds, name=opts.name, version=opts.version,
                    provenance=provenance, calibration=calibration, thresholds_policy=policy)
    log(opts, f"checkpoint written: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def calibrate(opts: TrainOptions, scan_labels: np.ndarray, scan_probs: np.ndarray, n_val: int
              ) -> tuple[Calibration, dict[str, Any]]:
    """The calibration and the thresholds policy (with the thresholds and the in-sample figures)."""
    from ihd_node.model.calibration import Calibration

    where = f"{n_val} validation scans, scan level"
    if opts.calibration == "platt":
        calibration = fit_platt(scan_labels, scan_probs, where)
    elif opts.calibration == "none":
        calibration = Calibration(fitted_on="")
    else:
        raise TrainingError(f"unknown calibration {opts.calibration!r}; use platt or none")
    cal = calibration.apply(scan_probs)
    thresholds = thresholds_by_policy(scan_labels, cal, opts.threshold_method, opts.target_sensitivity,
                                      opts.min_specificity)
    figures = class_figures(scan_labels, cal, thresholds)
    text = policy_text(opts.threshold_method, opts.target_sensitivity, opts.min_specificity)
    policy = {"method": opts.threshold_method, "policy": text,
              "validation_scans": n_val, "thresholds": thresholds,
              "validation": {c: {k: v for k, v in m.items() if k != "reliability"} for c, m in figures.items()}}
    if opts.threshold_method == "sensitivity":
        policy["target_sensitivity"] = opts.target_sensitivity
        policy["min_specificity"] = opts.min_specificity
    return calibration, policy
