"""External validation on CQ500 (Chilamkurthy et al. 2018; 491 head CTs from India, CC BY-NC-SA): the
checkpoint runs through the node's own analysis (load, thin slices into slabs, Predictor) on one series
per scan, and is scored at scan level against the majority vote of the three radiologists in reads.csv.

Layout as downloaded and unpacked: `reads.csv` (columns `name`, `Category`, then `R1:ICH`, `R1:IPH`, ...,
`R3:...`; names like `CQ500-CT-0`) and one folder per scan, `CQ500CT0 CQ500CT0/Unknown Study/<series>/`,
possibly below one more level (`qct00/`). CQ500 files are complete DICOM (SOP class, UIDs), so the node's
strict reader is used, exactly as at inference.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError

# reads.csv findings that are model classes (the others: fractures, mass effect, ... are ignored).
READ_CLASSES: dict[str, str] = {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular",
                                "SDH": "subdural", "EDH": "epidural", "SAH": "subarachnoid"}
READERS = ("R1", "R2", "R3")


class Cq500Error(UserError):
    """The CQ500 folder cannot be evaluated; the message says why."""


def scan_key(name: str) -> str:
    """`CQ500-CT-12` and the folder `CQ500CT12 CQ500CT12` both become `cq500ct12`."""
    return re.sub(r"[^a-z0-9]", "", name.strip().split(" ")[0].lower())


def read_cq500_reads(path: Path) -> dict[str, np.ndarray]:
    """reads.csv -> {name: (6,) uint8 in CLASSES order}: per class, at least two of the three readers."""
    if not path.is_file():
        raise Cq500Error(f"{path}: reads.csv not found; pass --cq500 the folder holding reads.csv and the "
                         "scan folders")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or [])
        needed = {f"{r}:{f}" for r in READERS for f in READ_CLASSES} | {"name"}
        missing = sorted(needed - fields)
        if missing:
            raise Cq500Error(f"{path}: not the CQ500 reads file, columns {missing[:4]} missing")
        truth: dict[str, np.ndarray] = {}
        for line_no, row in enumerate(reader, start=2):
            label = np.zeros(len(CLASSES), dtype=np.uint8)
            for finding, cls in READ_CLASSES.items():
                try:
                    votes = sum(int(float(row[f"{r}:{finding}"])) for r in READERS)
                except (TypeError, ValueError):
                    raise Cq500Error(f"{path}:{line_no}: {finding} reads are not 0/1") from None
                label[CLASSES.index(cls)] = 1 if votes >= 2 else 0
            truth[row["name"]] = label
    if not truth:
        raise Cq500Error(f"{path}: no rows")
    return truth


def find_scan_folders(root: Path, names: Sequence[str]) -> dict[str, Path]:
    """The folder of each named scan: the first directory (breadth first) whose name's first word matches."""
    wanted = {scan_key(n): n for n in names}
    found: dict[str, Path] = {}
    for dirpath, dirnames, _ in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            name = wanted.get(scan_key(d))
            if name is not None and name not in found:
                found[name] = Path(dirpath) / d
            else:
                keep.append(d)
        dirnames[:] = keep  # never descend into a scan folder looking for more scans
    return found


@dataclass
class SeriesChoice:
    paths: list[Path] | None
    description: str  # the chosen series, or why none could be used


def choose_series(folder: Path) -> SeriesChoice:
    """The series of a scan the node would analyse: among those `check_series` accepts, the best by the
    node's own study-level ranking (ihd_node.triage.choice: soft-tissue kernel, axial, 2.5-5 mm slices,
    coverage, noise), so a bone-kernel or thin reconstruction is not scored in place of the standard one."""
    from ihd_node.imaging.volume import group_series, slice_headers
    from ihd_node.triage.choice import profile, rank
    from ihd_node.triage.select import check_series, read_headers

    groups = group_series([folder])
    if not groups.series:
        reasons = sorted({why for _, why in groups.rejected})
        return SeriesChoice(None, "no CT series" + (f" ({'; '.join(reasons[:2])})" if reasons else ""))
    candidates: dict[str, list[Path]] = {}
    profiles = []
    verdicts = []
    for paths in groups.series.values():
        verdict = check_series(read_headers(paths))
        if not verdict.ok:
            verdicts.append(verdict.reason)
            continue
        p = profile(slice_headers(paths), measure_noise=True)
        candidates[p.series_instance_uid] = paths
        profiles.append(p)
    if not profiles:
        return SeriesChoice(None, "no eligible series (" + "; ".join(sorted(set(verdicts))[:2]) + ")")
    best = rank(profiles)[0]
    paths = sorted(candidates[best.series_instance_uid])
    return SeriesChoice(paths, f"{best.label()}, {len(paths)} slices")


def evaluate_cq500(checkpoint: Path, root: Path, device: str = "auto", max_rejected: float = 0.1,
                   write: bool = True, verbose: bool = True, tta: str = "none") -> dict[str, Any]:
    """Scan-level metrics of the checkpoint on CQ500 against the readers' majority vote."""
    from ihd_node.imaging.volume import VolumeError
    from ihd_node.model.pipeline import Predictor
    from ihd_node.node.analysis import analyze_series
    from training.evaluate import store_metrics
    from training.metrics import format_metrics, level_metrics
    from training.progress import progress
    from training.rsna import SLAB_MM, THIN_SLICE_MM

    truth = read_cq500_reads(root / "reads.csv")
    folders = find_scan_folders(root, list(truth))
    predictor: Any = Predictor.load(checkpoint, device=device)
    if tta == "flip":
        from training.evaluate import FlipTTA

        predictor = FlipTTA(predictor)
    names, probs, rejected = [], [], []
    for name in progress(sorted(truth), desc="CQ500 scans", enabled=verbose):
        folder = folders.get(name)
        if folder is None:
            rejected.append((name, "no folder for this scan"))
            continue
        choice = choose_series(folder)
        if choice.paths is None:
            rejected.append((name, choice.description))
            continue
        try:
            result = analyze_series(choice.paths, predictor, explain=False, thin_slice_mm=THIN_SLICE_MM,
                                    slab_mm=SLAB_MM)
        except VolumeError as exc:
            rejected.append((name, f"cannot load: {exc}"))
            continue
        names.append(name)
        probs.append(result.prediction.series_probabilities)
    counts: dict[str, int] = {}
    for _, why in rejected:
        counts[why] = counts.get(why, 0) + 1
    reasons = "\n".join(f"  {n:>6}  {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if not names:
        raise Cq500Error(f"{root}: none of the {len(truth)} scans in reads.csv could be evaluated; "
                         f"reasons:\n{reasons}")
    if rejected:
        print(f"{len(rejected)} of {len(truth)} scans left out:\n{reasons}")
    share = len(rejected) / len(truth)
    if share > max_rejected:
        raise Cq500Error(f"{len(rejected)} of {len(truth)} CQ500 scans ({share:.0%}) could not be evaluated, "
                         f"more than --max-rejected {max_rejected:.0%}; reasons above")
    labels = np.stack([truth[n] for n in names])
    metrics = {"scan": level_metrics(labels, np.stack(probs), predictor.thresholds)}
    print(f"CQ500 ({len(names)} scans, majority of 3 readers), checkpoint thresholds"
          f"{', flip test-time augmentation' if tta == 'flip' else ''}:\n{format_metrics(metrics)}")
    if write:
        store_metrics(checkpoint, "cq500" if tta == "none" else f"cq500+{tta}", metrics)
    return metrics
