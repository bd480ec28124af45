"""A phantom cohort with known truth, sent through a running node on loopback into a MiniPACS: what the local
performance (and drift) tests measure. Shared by several test modules: build it once per module with
run_cohort(tmp_path_factory.mktemp(...)).

The truth of a study is the classes its phantom shows on at least one slice (PhantomSeries.positive_classes),
what a radiologist reading the images would find. Small full-head phantoms and the tiny untrained model keep
it fast: the point is that the node's figures match the database and the truth, not that the model is good.
The node's completion checks of geometry and coverage are off (12 slices do not span a head; they are tested
elsewhere): a series is complete once its association is released and quiet.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from loopback import destination, node_config, running_node, tiny_predictor
from pydicom import Dataset
from waiting import poll_until

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.model.pipeline import Predictor
from ihd_node.sim.mini_pacs import MiniPACS, send_datasets
from ihd_node.sim.phantom import make_series

FINAL = ("delivered", "failed", "ignored", "analyzed")


@dataclass
class Cohort:
    root: Path
    config_path: Path  # a config file naming the node's log database: for `python -m ihd_node ... --config`
    database_url: str
    truth: dict[str, frozenset[str]]  # study UID -> the classes present (CLASSES names; "any" when any subtype)
    accession: dict[str, str]  # study UID -> accession number
    series: dict[str, str]  # study UID -> series UID
    states: dict[str, str] = field(default_factory=dict)  # series UID -> its final state
    seconds: float = 0.0  # generating, sending and analysing all of it


def cohort_plan(n_negative: int = 12, n_positive: int = 30) -> list[tuple[str, ...]]:
    """Subtypes per study: negatives, then positives with two subtypes each, cycling over the pairs so every
    subtype is in about 2 * n_positive / 5 studies (12 of 42 by default: each subtype has positives and
    negatives, with enough of both for an AUC)."""
    pairs = [(a, b) for i, a in enumerate(SUBTYPES) for b in SUBTYPES[i + 1:]]
    return [()] * n_negative + [pairs[k % len(pairs)] for k in range(n_positive)]


@functools.cache
def split_thresholds() -> tuple[tuple[str, float], ...]:
    """Thresholds among the tiny untrained model's scores (they hardly vary) on every fifth study of the default
    cohort, so a cohort gets positive and negative calls of every class: the median for `any`, the 75th
    percentile for the subtypes (`any` is called whenever a subtype is: it needs studies with no subtype
    called). The same for every cohort of a test run, so cohorts compared with each other (drift) differ only
    in what was sent."""
    predictor = tiny_predictor()
    plan = cohort_plan()
    sample = [make_series(190000 + k, list(plan[k]), n_slices=12, size=64) for k in range(0, len(plan), 5)]
    scores = [predictor.predict(p.hu, explain=False).probabilities() for p in sample]
    return tuple((c, float(np.percentile([s[c] for s in scores], 50 if c == "any" else 75))) for c in CLASSES)


def split_predictor() -> Predictor:
    """The tiny untrained model with split_thresholds()."""
    predictor = tiny_predictor()
    predictor.thresholds = dict(split_thresholds())
    return predictor


def run_cohort(root: Path, *, first_seed: int = 190000, plan: list[tuple[str, ...]] | None = None,
               n_slices: int = 12, size: int = 64, predictor: Predictor | None = None,
               tweak: Callable[[Dataset], None] | None = None, node_sections: dict[str, Any] | None = None,
               **variation: Any) -> Cohort:
    """Make the cohort's phantoms (seeds first_seed, first_seed + 1, ...), send each study over its own
    association to a running node that delivers to a MiniPACS, wait until every series is finished, stop.
    `tweak` changes each data set before sending (e.g. another ConvolutionKernel); `variation` goes to
    make_series (e.g. slice_spacing); `node_sections` overrides the node's config sections. Without
    `predictor`, the tiny model with thresholds that split its scores (split_predictor)."""
    import time

    start = time.monotonic()
    plan = cohort_plan() if plan is None else plan
    root.mkdir(parents=True, exist_ok=True)
    cohort_truth: dict[str, frozenset[str]] = {}
    accession: dict[str, str] = {}
    series_of: dict[str, str] = {}

    predictor = predictor or split_predictor()
    with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
        sections = {"series": {"quiet_seconds": 0.3, "max_wait_seconds": 30.0, "check_geometry": False,
                               "check_coverage": False},
                    "analysis": {"gradcam": False}, **(node_sections or {})}
        config = node_config(root / "node", [destination("pacs", pacs.ae_title, pacs.port)], **sections)
        with running_node(config, predictor) as node:
            for k in range(len(plan)):
                series = make_series(first_seed + k, list(plan[k]), n_slices=n_slices, size=size, **variation)
                datasets = series.datasets
                for ds in datasets:
                    ds.AccessionNumber = f"C{first_seed + k}"
                    if tweak is not None:
                        tweak(ds)
                # A long DIMSE timeout: on a machine shared by many test runs a C-STORE answer can take 30 s.
                assert send_datasets(datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                     calling_aet="CT1", timeout=120) == [0] * len(datasets)
                uid = series.study_instance_uid
                cohort_truth[uid] = frozenset(series.positive_classes)
                accession[uid] = f"C{first_seed + k}"
                series_of[uid] = series.series_instance_uid

            def finished() -> bool:
                return all((s := node.db.get_series(x)) is not None and s.state in FINAL for x in series_of.values())

            poll_until(finished, 60.0 + 3.0 * len(plan), every=0.5)
            states = {x: node.db.get_series(x).state for x in series_of.values()}
        url = config.database_url
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump({"storage": {"dir": str(root / "node" / "cli")},
                                           "database": {"url": url}}))
    assert len(set(cohort_truth)) == len(plan), "phantom seeds gave the same study twice"
    return Cohort(root, config_path, url, cohort_truth, accession, series_of, states, time.monotonic() - start)


def truth_rows(cohort: Cohort, *, not_assessed: Iterable[tuple[str, str]] = (), unread: Iterable[str] = (),
               by_accession: Iterable[str] = (), reader: str = "Dr Reader") -> list[dict[str, str]]:
    """The truth as CSV rows (one per study and class): (study, finding) pairs in `not_assessed` read as such,
    studies in `unread` left out, studies in `by_accession` named by accession number instead of UID."""
    skipped, by_acc, na = set(unread), set(by_accession), set(not_assessed)
    rows = []
    for uid, present in cohort.truth.items():
        if uid in skipped:
            continue
        for c in CLASSES:
            value = "not_assessed" if (uid, c) in na else ("1" if c in present else "0")
            key = {"accession_number": cohort.accession[uid]} if uid in by_acc else {"study_instance_uid": uid}
            rows.append({**key, "finding": c, "present": value, "reader": reader, "read_at": "2026-11-30T10:00:00Z"})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], *, encoding: str = "utf-8", newline: str = "\n") -> Path:
    columns = ["study_instance_uid", "accession_number", "finding", "present", "reader", "read_at"]
    with path.open("w", encoding=encoding, newline="") as fh:
        writer = csv.DictWriter(fh, columns, lineterminator=newline)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path
