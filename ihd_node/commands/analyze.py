"""`ihd-node analyze`: run the model on DICOM files or folders without the network, for checks and audits.

Each series is judged by the node's own eligibility rules (ihd_node.triage.select.judge_series with the
default `series` settings): what `serve` would ignore is refused with the reason, unless --force, and
then every output says the series was forced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ihd_node.classes import CLASSES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.config import SeriesConfig
from ihd_node.errors import UserError
from ihd_node.imaging.volume import VolumeError, group_series, slice_headers
from ihd_node.node.analysis import SeriesAnalysis, analyze_series
from ihd_node.triage.select import Eligibility, judge_series

FORCED_NOTE = "FORCED: the node would not analyse this series ({reason}); this result is outside its rules"


def series_summary(analysis: SeriesAnalysis, seconds: float, verdict: Eligibility | None = None) -> dict:
    """The JSON shape of one analysed series (documented in the README)."""
    prediction = analysis.prediction
    per_slice = analysis.original_slice_probabilities()
    forced = verdict is not None and not verdict.ok
    return {
        "study_instance_uid": analysis.volume.study_instance_uid,
        "series_instance_uid": analysis.volume.series_instance_uid,
        "eligible": not forced,
        "forced": forced,
        "eligibility": verdict.reason if verdict is not None else None,
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


def write_results(analysis: SeriesAnalysis, out_dir: Path, explain: str = "decision") -> list[Path]:
    """Write the results the node would send (SR, Grad-CAM captures, SEG, key images), one folder per series."""
    from ihd_node.report import ResultSettings, build_results, result_file_name

    settings = ResultSettings(dict(analysis.prediction.model.thresholds), explain=explain)
    results = build_results(analysis.volume, analysis.prediction, slice_groups=analysis.slice_groups,
                            settings=settings)
    folder = out_dir / analysis.volume.series_instance_uid
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for ds in results.all():
            path = folder / result_file_name(ds)
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    except OSError as exc:  # e.g. the disk filled up half-way
        raise UserError(f"--out {out_dir}: cannot write {exc.filename or folder}: {exc.strerror or exc}; "
                        "free space or choose another folder") from None
    return written


def check_out_dir(out: str) -> Path:
    """--out must be a folder this user can write (created if missing): checked before any analysis."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc}); "
                        "choose a folder you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder is not writable by this user; choose another")
    return path


def print_table(summaries: list[dict], rejected: list[tuple[str, str]], refused: list[tuple[str, str]]) -> None:
    for s in summaries:
        n = s["n_slices"]
        print(f"series {s['series_instance_uid']}  ({n} slice{'' if n == 1 else 's'}, {s['seconds']:.2f} s)")
        if s["forced"]:
            print("  " + FORCED_NOTE.format(reason=s["eligibility"]))
        for cls in CLASSES:
            p = s["probabilities"][cls]
            flag = "POSITIVE" if cls in s["positive"] else ""
            print(f"  {cls:<18} {p:6.3f}  {flag}")
        for path in s.get("written", []):
            print(f"  wrote {path}")
    for path, reason in rejected:
        print(f"skipped {path}: {reason}")
    for uid, reason in refused:
        print(f"refused series {uid}: {reason} (the node would not analyse it; --force analyses it anyway)")
    print(NOT_FOR_DIAGNOSTIC_USE)


def analyze_command(args: argparse.Namespace) -> int:
    out_dir = check_out_dir(args.out) if args.out else None
    groups = group_series(args.paths)
    rejected = [(str(p), reason) for p, reason in groups.rejected]
    refused: list[tuple[str, str]] = []
    chosen: list[tuple[str, list[Path], Eligibility]] = []
    for series_uid, paths in groups.series.items():
        try:
            verdict = judge_series(slice_headers(paths), SeriesConfig())
        except VolumeError as exc:
            verdict = Eligibility(False, str(exc))
        if verdict.ok or args.force:
            chosen.append((series_uid, paths, verdict))
        else:
            refused.append((series_uid, verdict.reason))
    if not chosen:
        print("nothing to analyse: no eligible CT series among the given files"
              + (" (--force analyses refused series anyway)" if refused else ""), file=sys.stderr)
    predictor = None
    if chosen:  # torch is imported only when there is something to analyse
        from ihd_node.model.pipeline import Predictor

        predictor = Predictor.load(args.model, device=args.device, explain=args.explain)
    summaries = []
    for series_uid, paths, verdict in chosen:
        started = time.perf_counter()
        try:
            analysis = analyze_series(paths, predictor, explain=not args.no_gradcam and bool(args.out))
        except VolumeError as exc:
            rejected.append((f"series {series_uid}", str(exc)))
            continue
        summary = series_summary(analysis, time.perf_counter() - started, verdict)
        if out_dir is not None:
            summary["written"] = [str(p) for p in write_results(analysis, out_dir, args.explain)]
        summaries.append(summary)
    if args.json:
        json.dump({"series": summaries,
                   "rejected": [{"path": p, "reason": r} for p, r in rejected],
                   "refused": [{"series_instance_uid": u, "reason": r} for u, r in refused],
                   "note": NOT_FOR_DIAGNOSTIC_USE}, sys.stdout, indent=2)
        print()
    else:
        print_table(summaries, rejected, refused)
    return 0 if summaries else 1
