"""`ihd-node analyze`: run the model on DICOM files or folders without the network, for checks and audits."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ihd_node.analysis import SeriesAnalysis, analyze_series
from ihd_node.classes import CLASSES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.dicom.volume import VolumeError, group_series


def series_summary(analysis: SeriesAnalysis, seconds: float) -> dict:
    """The JSON shape of one analysed series (documented in the README)."""
    prediction = analysis.prediction
    per_slice = analysis.original_slice_probabilities()
    return {
        "study_instance_uid": analysis.volume.study_instance_uid,
        "series_instance_uid": analysis.volume.series_instance_uid,
        "n_slices": analysis.volume.n_slices,
        "n_model_slices": len(analysis.slice_groups),
        "probabilities": prediction.probabilities(),
        "positive": prediction.positive_classes(),
        "thresholds": {c: prediction.threshold(c) for c in CLASSES},
        "slices": [
            {"sop_instance_uid": s.sop_instance_uid,
             "probabilities": {c: float(p) for c, p in zip(CLASSES, per_slice[i], strict=True)}}
            for i, s in enumerate(analysis.volume.slices)
        ],
        "model": {"name": prediction.model.name, "version": prediction.model.version},
        "seconds": round(seconds, 3),
    }


def write_results(analysis: SeriesAnalysis, out_dir: Path) -> list[Path]:
    """Write the SR and the Grad-CAM secondary captures the node would send, one folder per series."""
    from ihd_node.report import build_results

    results = build_results(analysis.volume, analysis.prediction, slice_groups=analysis.slice_groups)
    folder = out_dir / analysis.volume.series_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in [results.sr, *results.secondary_captures]:
        path = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def print_table(summaries: list[dict], rejected: list[tuple[str, str]]) -> None:
    for s in summaries:
        print(f"series {s['series_instance_uid']}  ({s['n_slices']} slices, {s['seconds']:.2f} s)")
        for cls in CLASSES:
            p = s["probabilities"][cls]
            flag = "POSITIVE" if cls in s["positive"] else ""
            print(f"  {cls:<18} {p:6.3f}  {flag}")
        for path in s.get("written", []):
            print(f"  wrote {path}")
    for path, reason in rejected:
        print(f"skipped {path}: {reason}")
    print(NOT_FOR_DIAGNOSTIC_USE)


def analyze_command(args: argparse.Namespace) -> int:
    from ihd_node.model.pipeline import Predictor

    groups = group_series(args.paths)
    rejected = [(str(p), reason) for p, reason in groups.rejected]
    if not groups.series:
        print("no usable CT series among the given files", file=sys.stderr)
    predictor = (Predictor.load(args.model, device=args.device, explain=args.explain)
                 if groups.series else None)
    summaries = []
    for series_uid, paths in groups.series.items():
        started = time.perf_counter()
        try:
            analysis = analyze_series(paths, predictor, explain=not args.no_gradcam and bool(args.out))
        except VolumeError as exc:
            rejected.append((f"series {series_uid}", str(exc)))
            continue
        summary = series_summary(analysis, time.perf_counter() - started)
        if args.out:
            summary["written"] = [str(p) for p in write_results(analysis, Path(args.out))]
        summaries.append(summary)
    if args.json:
        json.dump({"series": summaries,
                   "rejected": [{"path": p, "reason": r} for p, r in rejected],
                   "note": NOT_FOR_DIAGNOSTIC_USE}, sys.stdout, indent=2)
        print()
    else:
        print_table(summaries, rejected)
    return 0 if summaries or not groups.series else 1
