"""Which complete series the model should see: head-CT eligibility rules on headers only.

The node receives whatever the PACS routes to it (scouts, dose reports, coronal reformats, our own
results); only axial CT stacks of a sensible size are analysed. Everything else is recorded as
"ignored" with the reason, so an admin can see why a study got no result. `judge_series` adds the
head check (ihd_node.imaging.head_check), which looks at a few images; `serve` and `analyze` both use it.
Enhanced CT frames are judged as slices (ihd_node.imaging.headers.slice_headers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ihd_node.config import SeriesConfig
from ihd_node.imaging.head_check import body_part_problem, head_problem, sample_indices
from ihd_node.imaging.headers import (
    CT_CLASSES,
    SliceHeader,
    VolumeError,
    slice_headers,
    slice_normal,
    slice_position,
    slice_thickness,
    sort_stack,
    tilt_degrees,
)
from ihd_node.imaging.volume import iter_slices_hu


@dataclass(frozen=True)
class Eligibility:
    ok: bool
    reason: str


def read_headers(paths: Iterable[str | Path]) -> list[Dataset]:
    """One flat header per slice (Enhanced CT: per frame), without pixel data; unreadable files raise."""
    return [r.ds for r in slice_headers(paths)]


def judge_series(refs: Sequence[SliceHeader], rules: SeriesConfig | None = None) -> Eligibility:
    """The node's whole verdict on one series: the header rules, then (series.require_head) the head check."""
    rules = rules or SeriesConfig()
    headers = [r.ds for r in refs]
    verdict = check_series(headers, rules)
    if not verdict.ok or not rules.require_head:
        return verdict
    problem = body_part_problem(headers)
    if problem:
        return Eligibility(False, problem)
    try:  # header values were checked by check_series
        normal = slice_normal(headers[0])
        order = sort_stack([slice_position(ds, normal) for ds in headers]).order
        sample = [refs[order[i]] for i in sample_indices(len(order))]
        spacing = [float(v) for v in headers[0].PixelSpacing]
        # Read one slice at a time: head_problem stops at the first that passes.
        problem = head_problem(iter_slices_hu(sample), (spacing[0], spacing[1]))
    except VolumeError as exc:
        return Eligibility(False, str(exc))
    if problem:
        return Eligibility(False, problem)
    return Eligibility(True, verdict.reason + ", head")


def check_series(headers: Sequence[Dataset], rules: SeriesConfig | None = None) -> Eligibility:
    """Judge one series (one header per instance, duplicates already removed) by the `series` config rules."""
    try:
        return _check_series(headers, rules or SeriesConfig())
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
        # Text, one value or nothing where numbers belong: ignore the series with the reason instead of
        # leaving it "complete" for ever (the caller has no other verdict to give it).
        return Eligibility(False, f"malformed header value ({type(exc).__name__}: {exc})"[:300])


def _check_series(headers: Sequence[Dataset], rules: SeriesConfig) -> Eligibility:
    if not headers:
        return Eligibility(False, "the series has no instances")

    modalities = {str(ds.get("Modality", "") or "missing") for ds in headers}
    bad = sorted(m for m in modalities if m not in rules.modalities)
    if bad:
        return Eligibility(False, f"modality {', '.join(bad)} is not {'/'.join(rules.modalities)}")

    classes = {str(ds.get("SOPClassUID", "")) for ds in headers}
    if not classes <= CT_CLASSES:
        others = ", ".join(sorted(classes - CT_CLASSES))
        return Eligibility(False, f"SOP class {others} is not CT Image Storage or Enhanced CT Image Storage")
    if len(classes) > 1:  # one stack is one kind of object; a mix is two reconstructions under one UID
        return Eligibility(False, "series mixes CT Image Storage and Enhanced CT instances")

    localizers = sum("LOCALIZER" in [str(v).upper() for v in ds.get("ImageType") or []] for ds in headers)
    if localizers == len(headers) and rules.exclude_localizers:
        return Eligibility(False, "localizer (scout) series")
    if localizers:  # load_volume cannot stack scouts with axial slices
        return Eligibility(False, f"series mixes {localizers} localizer image(s) with other images")

    if not rules.description_allowed(str(headers[0].get("SeriesDescription", "") or "")):
        return Eligibility(False, "series description does not pass series.description_include/_exclude")

    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        missing = sum(keyword not in ds for ds in headers)
        if missing:
            return Eligibility(False, f"{missing} instance(s) lack {keyword}")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) != 1:
        return Eligibility(False, f"slices differ in size: {', '.join(f'{r}x{c}' for r, c in sorted(sizes))}")
    rows, cols = next(iter(sizes))
    if not (16 <= rows <= 4096 and 16 <= cols <= 4096):
        return Eligibility(False, f"impossible image size {rows}x{cols}")

    try:
        normals = [slice_normal(ds) for ds in headers]
    except VolumeError:
        return Eligibility(False, "ImageOrientationPatient is malformed")
    if any(abs(float(np.dot(n, normals[0]))) < 0.999 for n in normals[1:]):
        return Eligibility(False, "slices differ in orientation; not one stack")
    tilt = tilt_degrees(headers[0]) or 0.0
    if rules.require_axial and tilt > rules.axial_tolerance_degrees:
        return Eligibility(False, f"not axial: slice normal is {tilt:.0f} degrees from the head-foot axis "
                                  f"(tolerance {rules.axial_tolerance_degrees:g})")

    n = len(headers)
    if n < rules.min_slices:
        return Eligibility(False, f"too few slices: {n} < {rules.min_slices}")
    if n > rules.max_slices:
        return Eligibility(False, f"too many slices: {n} > {rules.max_slices}")
    thick = slice_thickness(headers)
    lo, hi = rules.min_slice_thickness_mm, rules.max_slice_thickness_mm
    if thick is not None and lo is not None and thick < lo:
        return Eligibility(False, f"slices too thin: {thick:g} mm < {lo:g}")
    if thick is not None and hi is not None and thick > hi:
        return Eligibility(False, f"slices too thick: {thick:g} mm > {hi:g}")
    return Eligibility(True, f"axial CT, {n} slices of {rows}x{cols}, tilt {tilt:.0f} degrees")
