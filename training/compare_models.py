"""Several checkpoints on the same cross-generator cohorts (training/crossgen.py), each series made once and
analysed by every model as the node runs it: the before/after table of a retrained model.

    python -m training.compare_models OLD.pt NEW.pt [--generator b,a] [--n 8] [--n-a 2] [--workers 2]
        [--out FILE.json] [--store-into NEW.pt]

--store-into writes the figures of the last checkpoint into that checkpoint's provenance["validation"]
(the layout the phantom recipe writes; the model card and `ihd-node performance` read it there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ihd_node.classes import CLASSES
from training.crossgen import crossgen_metrics, format_report, iter_cohort, node_input
from training.metrics import jsonable
from training.progress import progress

DESCRIPTIONS = {"a": "generator A (ihd_node.sim.phantom, default phantoms), held-out seeds",
                "b": "generator B (ihd_node.sim.generator_b), written independently, never trained on"}


def compare(checkpoints: list[str], generator: str, n_per_kind: int, workers: int, limit: int | None = None
            ) -> list[dict[str, Any]]:
    """One crossgen-style report per checkpoint on one generator's cohort."""
    from ihd_node.model.pipeline import Predictor

    predictors = [Predictor.load(c, device="cpu") for c in checkpoints]
    started = time.monotonic()
    labels: list[np.ndarray] = []
    probs: list[list[np.ndarray]] = [[] for _ in predictors]
    kinds: dict[str, int] = {}
    for series in progress(iter_cohort(generator, n_per_kind, 0, None, workers, limit), desc=f"generator {generator}"):
        hu, slab_labels = node_input(series)
        labels.append(slab_labels.max(axis=0))
        for k, p in enumerate(predictors):
            pred = p.predict(hu, explain=False, pixel_spacing_mm=series.pixel_spacing_mm)
            probs[k].append(np.asarray(pred.series_probabilities, dtype=np.float64))
        key = "+".join(series.subtypes) or "negative"
        kinds[key] = kinds.get(key, 0) + 1
    seconds = round(time.monotonic() - started, 1)
    return [{"generator": generator, "checkpoint": str(c), "model": f"{p.name} {p.version}",
             "n_series": len(labels), "n_per_kind": n_per_kind, "composition": kinds, "seconds": seconds,
             "thresholds": dict(p.thresholds),
             "classes": crossgen_metrics(np.stack(labels), np.stack(probs[k]), p.thresholds)}
            for k, (c, p) in enumerate(zip(checkpoints, predictors, strict=True))]


def as_validation(report: dict[str, Any]) -> dict[str, Any]:
    """A crossgen report in the checkpoint's provenance["validation"][GEN] layout."""
    kinds = report["composition"]
    pairs = sum(v for k, v in kinds.items() if "+" in k)
    single = sum(kinds.values()) - pairs - kinds.get("negative", 0)
    gen = report["generator"]
    return {"description": f"{DESCRIPTIONS[gen]}; {kinds.get('negative', 0)} negative, {single} with one subtype, "
                           f"{pairs} with two",
            "series": report["n_series"], "composition": kinds, "classes": report["classes"],
            "command": f"python -m training crossgen --checkpoint CHECKPOINT --generator {gen} "
                       f"--n {report['n_per_kind']}"}


def side_by_side(reports: list[dict[str, Any]]) -> str:
    lines = [f"generator {reports[0]['generator'].upper()}, {reports[0]['n_series']} series: "
             + " | ".join(r["model"] for r in reports),
             f"  {'class':<17}" + " | ".join(f"{'AUC':>6}{'sens':>6}{'spec':>6}{'absent':>7}{'ECE':>6}"
                                             for _ in reports)]
    for c in CLASSES:
        cells = []
        for r in reports:
            m = r["classes"][c]
            cells.append("".join(f"{v:>6.3f}" if isinstance(v, float) else f"{'n/a':>6}"
                                 for v in (m["auc"], m["sensitivity"], m["specificity"]))
                         + f"{m['called_when_absent']:>7.3f}{m['ece']:>6.3f}")
        lines.append(f"  {c:<17}" + " | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.compare_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--generator", default="b,a")
    parser.add_argument("--n", type=int, default=8, help="series per kind on B (8: 60 series)")
    parser.add_argument("--n-a", type=int, default=2, help="series per kind on A (2: 22 series)")
    parser.add_argument("--workers", type=int, default=2, help="processes making phantoms")
    parser.add_argument("--limit", type=int, help="only the first N series of each cohort (smoke tests)")
    parser.add_argument("--out", type=Path, help="all reports as JSON")
    parser.add_argument("--store-into", type=Path, help="store the last checkpoint's figures in its provenance")
    args = parser.parse_args(argv)
    everything: dict[str, list[dict[str, Any]]] = {}
    for gen in [g.strip().lower() for g in args.generator.split(",") if g.strip()]:
        reports = compare(args.checkpoints, gen, args.n if gen == "b" else args.n_a, args.workers, args.limit)
        everything[gen] = reports
        for r in reports:
            print(format_report(r), flush=True)
        print(side_by_side(reports), flush=True)
        if args.out:
            args.out.write_text(json.dumps(jsonable(everything), indent=1))
    if args.store_into:
        from training.evaluate import store_provenance

        validation = {gen.upper(): as_validation(reports[-1]) for gen, reports in sorted(everything.items())}
        store_provenance(args.store_into, {"validation": jsonable(validation)})
        print(f"stored the figures of {args.checkpoints[-1]} in {args.store_into}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
