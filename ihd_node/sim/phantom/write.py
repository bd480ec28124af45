"""Writing phantom series to disk: one folder per series, a study, or the RSNA 2019 layout."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.sim.phantom.make import make_series
from ihd_node.sim.phantom.series import RSNA_ORDER, PhantomSeries


def write_series(series: PhantomSeries, outdir: str | Path) -> list[Path]:
    """Write the series' files (in their shuffled order, so names say nothing about position)."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series.datasets):
        path = out / f"IM{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    # A longer series written here before would leave its extra files mixed in with this one.
    for stale in set(out.glob("IM?????.dcm")) - set(paths):
        stale.unlink()
    return paths


def write_study(series: Sequence[PhantomSeries], outdir: str | Path) -> list[Path]:
    """Write several series (e.g. made with one study_instance_uid) into one folder per series."""
    paths: list[Path] = []
    for i, s in enumerate(series):
        paths += write_series(s, Path(outdir) / f"series{i + 1:02d}")
    return paths


def write_rsna_layout(outdir: str | Path, n_series: int, seed: int,
                      on_series: Callable[[PhantomSeries], None] | None = None, **kw: Any) -> Path:
    """The RSNA 2019 layout: stage_2_train/ID_<sop>.dcm per slice and stage_2_train.csv (`ID,Label`, six rows
    per slice in RSNA order). Series seeds are seed, seed+1, ...; kw goes to make_series; on_series sees
    each series after it is written. Returns the CSV path."""
    out = Path(outdir)
    images = out / "stage_2_train"
    images.mkdir(parents=True, exist_ok=True)
    csv_path = out / "stage_2_train.csv"
    columns = [CLASSES.index(name) for name in RSNA_ORDER]
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label"])
        for i in range(n_series):
            s = make_series(seed + i, **kw)
            for ds in s.datasets:
                ds.save_as(images / f"ID_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            for sop, row in zip(s.sop_uids_sorted, s.labels, strict=True):
                writer.writerows([f"ID_{sop}_{name}", int(row[c])]
                                 for name, c in zip(RSNA_ORDER, columns, strict=True))
            if on_series is not None:
                on_series(s)
    return csv_path


def describe(series: PhantomSeries) -> str:
    """One line: UIDs, slices and what is drawn where."""
    found = [c for c in SUBTYPES if series.labels[:, CLASSES.index(c)].any()]
    detail = ", ".join(f"{c} ({int(series.labels[:, CLASSES.index(c)].sum())} slices)" for c in found)
    return (f"seed {series.seed}: {series.n_slices} slices, study {series.study_instance_uid}, "
            f"series {series.series_instance_uid}: {detail or 'no hemorrhage'}")
