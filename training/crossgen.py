"""Cross-generator evaluation: a checkpoint run the way the node runs it over phantoms of generator B
(ihd_node.sim.generator_b, never seen in training) or over held-out phantoms of generator A
(ihd_node.sim.phantom, from a seed range training never uses): "train on A, validate on B".

Per class, at series level (series label = any slice labelled; probability = max over the model's
slices, as the node reports): ROC AUC, sensitivity and specificity at the checkpoint's thresholds with
95 % Wilson intervals, the share of series lacking the class on which it is called, expected
calibration error over 10 equal-width bins and the reliability table behind it.

    python -m training crossgen --checkpoint ihd_node/weights/default.pt --generator b --out b.json
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError
from training.metrics import binary_metrics, jsonable
from training.progress import progress

N_BINS = 10
A_SEED_BASE = 950_000  # generator A series: A_SEED_BASE + 10_000 * seed + i (training uses 10_000..)
THIN_SLICE_MM, SLAB_MM = 3.0, 5.0  # the node's defaults (config analysis.thin_slice_mm / slab_mm)


@dataclass(frozen=True)
class EvalSeries:
    """One series to evaluate: HU slices in spatial order and their labels."""

    name: str
    subtypes: tuple[str, ...]
    hu: np.ndarray  # (n, rows, cols) float32
    slice_labels: np.ndarray  # (n, 6)
    pixel_spacing_mm: float
    slice_spacing_mm: float


def cohort_kinds(n_per_kind: int) -> list[tuple[str, ...]]:
    """The mix of every cohort: negatives, each subtype alone, every pair (see generator B's cohort_plan)."""
    from ihd_node.sim.generator_b import cohort_plan

    return [kind for _, kind in cohort_plan(n_per_kind)]


def _make_b(job: tuple[int, tuple[str, ...], int]) -> EvalSeries:
    from ihd_node.sim.generator_b import make_case

    seed, kind, size = job
    case = make_case(seed, kind, size=size)
    return EvalSeries(f"B:{seed}", case.subtypes, case.hu, case.slice_labels, case.pixel_spacing_mm,
                      case.slice_spacing_mm)


def _make_a(job: tuple[int, tuple[str, ...], int]) -> EvalSeries:
    from ihd_node.imaging.volume import to_hu
    from ihd_node.sim.phantom import make_series

    seed, kind, size = job
    series = make_series(seed, subtypes=list(kind), size=size)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    hu = np.stack([to_hu(by_uid[uid]) for uid in series.sop_uids_sorted]).astype(np.float32)
    return EvalSeries(f"A:{seed}", tuple(series.subtypes), hu, np.asarray(series.labels), series.pixel_spacing,
                      series.slice_spacing)


def a_seeds(n: int, seed: int) -> list[int]:
    """Generator A seeds for a held-out cohort; refuses any overlap with the training recipe's seeds."""
    from training.phantom_recipe import Recipe

    recipe = Recipe()
    seeds = [A_SEED_BASE + 10_000 * seed + i for i in range(n)]
    train = range(recipe.train_seed, recipe.train_seed + recipe.train_series + recipe.val_series)
    if any(s in train for s in seeds):
        raise UserError(f"generator A seeds {seeds[0]}..{seeds[-1]} overlap the training seeds "
                        f"{train.start}..{train.stop - 1}; use another --seed")
    return seeds


def cohort_jobs(generator: str, n_per_kind: int, seed: int, size: int | None
                ) -> tuple[Any, list[tuple[int, tuple[str, ...], int]]]:
    """(maker, jobs) of one cohort: B at 256 px by default, A at 512 px (its held-out size)."""
    if generator == "b":
        from ihd_node.sim.generator_b import cohort_plan

        return _make_b, [(s, kind, size or 256) for s, kind in cohort_plan(n_per_kind, seed)]
    if generator == "a":
        kinds = cohort_kinds(n_per_kind)
        return _make_a, [(s, kind, size or 512) for s, kind in zip(a_seeds(len(kinds), seed), kinds, strict=True)]
    raise UserError(f"unknown generator {generator!r}; use a or b")


def iter_cohort(generator: str, n_per_kind: int, seed: int, size: int | None = None,
                workers: int = 1, limit: int | None = None) -> Iterator[EvalSeries]:
    maker, jobs = cohort_jobs(generator, n_per_kind, seed, size)
    jobs = jobs[:limit] if limit else jobs
    if workers <= 1:
        yield from map(maker, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(maker, jobs)


def node_input(series: EvalSeries, thin_slice_mm: float = THIN_SLICE_MM, slab_mm: float = SLAB_MM
               ) -> tuple[np.ndarray, np.ndarray]:
    """What the node feeds the model (thin slices averaged into ~5 mm slabs) and each slab's labels."""
    from ihd_node.imaging.volume import combine_thin_slices

    if 0 < series.slice_spacing_mm < thin_slice_mm:
        hu, groups = combine_thin_slices(series.hu, series.slice_spacing_mm, target_mm=slab_mm)
        labels = np.stack([series.slice_labels[g].max(axis=0) for g in groups])
        return hu, labels
    return series.hu, np.asarray(series.slice_labels)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = N_BINS) -> tuple[float, list[dict]]:
    """(expected calibration error, table): equal-width bins on [0, 1]; the last bin includes 1.
    ECE = sum over bins of (bin count / N) * |observed positive share - mean probability|."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows, ece = [], 0.0
    for b in range(n_bins):
        sel = index == b
        count = int(sel.sum())
        row: dict[str, Any] = {"low": b / n_bins, "high": (b + 1) / n_bins, "count": count,
                               "mean_probability": math.nan, "observed": math.nan}
        if count:
            row["mean_probability"] = float(p[sel].mean())
            row["observed"] = float(t[sel].mean())
            ece += count / len(p) * abs(row["observed"] - row["mean_probability"])
        rows.append(row)
    return (float(ece) if len(p) else math.nan), rows


def class_report(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, Any]:
    t = np.asarray(y_true).astype(bool)
    base = binary_metrics(t, y_prob, threshold)
    called = np.asarray(y_prob) >= threshold
    tp, fp = int(np.sum(called & t)), int(np.sum(called & ~t))
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    ece, table = reliability(t, y_prob)
    return {
        "auc": base["auc"], "threshold": float(threshold), "positives": n_pos, "negatives": n_neg,
        "sensitivity": base["sensitivity"], "sensitivity_ci": wilson(tp, n_pos),
        "specificity": base["specificity"], "specificity_ci": wilson(n_neg - fp, n_neg),
        "called_when_absent": fp / n_neg if n_neg else math.nan, "called_when_absent_ci": wilson(fp, n_neg),
        "ece": ece, "reliability": table,
    }


def crossgen_metrics(series_labels: np.ndarray, series_probs: np.ndarray,
                     thresholds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per-class report of series-level labels (N, 6) and probabilities (N, 6)."""
    y = np.asarray(series_labels)
    p = np.asarray(series_probs, dtype=np.float64)
    return {c: class_report(y[:, k], p[:, k], float(thresholds.get(c, 0.5))) for k, c in enumerate(CLASSES)}


def evaluate_cohort(predictor: Any, cohort: Sequence[EvalSeries] | Iterator[EvalSeries], verbose: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Series labels (N, 6), series probabilities (N, 6) and per-series records, via predictor.predict."""
    labels, probs, records = [], [], []
    for series in progress(cohort, desc="evaluating", enabled=verbose):
        hu, slab_labels = node_input(series)
        pred = predictor.predict(hu, explain=False, pixel_spacing_mm=series.pixel_spacing_mm)
        labels.append(slab_labels.max(axis=0))
        probs.append(np.asarray(pred.series_probabilities, dtype=np.float64))
        records.append({"name": series.name, "subtypes": list(series.subtypes), "slices": int(hu.shape[0]),
                        "slice_mm": series.slice_spacing_mm,
                        "probabilities": {c: round(float(v), 4) for c, v in zip(CLASSES, probs[-1], strict=True)}})
    if not labels:
        raise UserError("the cohort is empty; use --n 1 or more")
    return np.stack(labels), np.stack(probs), records


def run_crossgen(checkpoint: str | Path, generator: str = "b", n_per_kind: int = 8, seed: int = 0,
                 size: int | None = None, device: str = "cpu", workers: int = 1, verbose: bool = True,
                 limit: int | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on one generator's cohort; returns the JSON-ready report."""
    from ihd_node.model.pipeline import Predictor

    started = time.monotonic()
    predictor = Predictor.load(checkpoint, device=device)
    labels, probs, records = evaluate_cohort(predictor, iter_cohort(generator, n_per_kind, seed, size, workers, limit),
                                             verbose)
    kinds: dict[str, int] = {}
    for r in records:
        key = "+".join(r["subtypes"]) or "negative"
        kinds[key] = kinds.get(key, 0) + 1
    return {"generator": generator, "checkpoint": str(checkpoint), "model": f"{predictor.name} {predictor.version}",
            "n_series": len(records), "n_per_kind": n_per_kind, "seed": seed, "composition": kinds,
            "thresholds": dict(predictor.thresholds), "classes": crossgen_metrics(labels, probs, predictor.thresholds),
            "series": records, "seconds": round(time.monotonic() - started, 1)}


def _pct(v: float) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"


def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"generator {report['generator'].upper()}: {report['n_series']} series, {report['model']} "
             f"({report['seconds']:.0f} s)",
             f"  {'class':<17}{'AUC':>6}{'thr':>7}  {'sens % [95% CI]':<20}{'spec % [95% CI]':<20}"
             f"{'called|absent %':>16}{'ECE':>7}{'pos':>5}"]
    for c, m in report["classes"].items():
        auc = "  n/a" if m["auc"] is None or math.isnan(m["auc"]) else f"{m['auc']:.3f}"
        sens = f"{_pct(m['sensitivity'])} [{_pct(m['sensitivity_ci'][0])},{_pct(m['sensitivity_ci'][1])}]"
        spec = f"{_pct(m['specificity'])} [{_pct(m['specificity_ci'][0])},{_pct(m['specificity_ci'][1])}]"
        lines.append(f"  {c:<17}{auc:>6}{m['threshold']:>7.3f}  {sens:<20}{spec:<20}"
                     f"{_pct(m['called_when_absent']):>16}{m['ece']:>7.3f}{m['positives']:>5}")
    return "\n".join(lines)


def crossgen_command(checkpoint: Path, generator: str, n_per_kind: int, seed: int, size: int | None,
                     out: Path | None, device: str, workers: int, limit: int | None = None) -> int:
    if n_per_kind < 1:
        raise UserError(f"--n must be at least 1, got {n_per_kind}")
    for gen in [g.strip().lower() for g in generator.split(",") if g.strip()]:
        report = run_crossgen(checkpoint, gen, n_per_kind, seed, size, device, workers, limit=limit)
        print(format_report(report), flush=True)
        if out is not None:
            path = out if "," not in generator else out.with_name(f"{out.stem}-{gen}{out.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(jsonable(report), indent=1))
            print(f"wrote {path}", flush=True)
    return 0
