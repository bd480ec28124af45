"""Turn the files of one CT series into a volume in Hounsfield units, slices sorted along the patient axis.

Headers, their geometry and the slice order come from ihd_node.imaging.headers; this module reads the
pixels (a multi-frame Enhanced CT file once for all its frames) and makes the Volume value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ihd_node import nodelog
from ihd_node.imaging.headers import (
    SliceHeader,
    VolumeError,
    decimal_values,
    frame_headers,
    is_multiframe_ct,
    read_header,
    slice_headers,
    slice_normal,
    slice_position,
    slice_problem,
    sort_stack,
)
from ihd_node.values.volume import SliceInfo, Volume  # noqa: F401  (the typed value this stage makes)


@dataclass
class SeriesGroups:
    """Files grouped by SeriesInstanceUID, plus the files that could not be used and why."""

    series: dict[str, list[Path]]
    rejected: list[tuple[Path, str]]


def iter_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders recursively into files; keep given files as they are."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.exists():
            files.append(p)
        else:
            raise VolumeError(f"{p}: no such file or folder; check the path")
    return files


def _number(ds: Dataset, keyword: str, default: float) -> float:
    """A single decimal attribute, the default when absent or empty; raises VolumeError when malformed."""
    try:
        value = float(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise VolumeError(f"slice {ds.get('SOPInstanceUID', '?')}: {keyword} {ds.get(keyword)!r} is not a "
                          "number; the sender wrote a damaged header") from None
    if not np.isfinite(value):
        raise VolumeError(f"slice {ds.get('SOPInstanceUID', '?')}: {keyword} is not finite; damaged header")
    return value


def group_series(paths: Iterable[str | Path]) -> SeriesGroups:
    """Group files by series; files that are not usable CT slices are listed with the reason."""
    series: dict[str, list[Path]] = {}
    rejected: list[tuple[Path, str]] = []
    for path in iter_files(paths):
        try:
            ds = read_header(path)
            flat = frame_headers(ds) if is_multiframe_ct(ds) else [ds]
        except VolumeError as exc:
            rejected.append((path, str(exc).split(": ", 1)[-1]))
            continue
        problem = next(filter(None, map(slice_problem, flat)), None)
        if problem:
            rejected.append((path, problem))
            continue
        series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return SeriesGroups(series=series, rejected=rejected)


def _pixels(ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:
        raise VolumeError(
            f"slice {ds.get('SOPInstanceUID', '?')}: pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
            "send it uncompressed or in a supported transfer syntax") from None


def to_hu(ds: Dataset, pixels: np.ndarray | None = None) -> np.ndarray:
    """Pixel data in HU (float32), with the known BitsStored-12 scanner quirk corrected.

    `pixels`: this slice's frame when `ds` is a flat frame header (its rescale applies), else ds's own.
    Some scanners store unsigned 12-bit values with an intercept near 0 where -1024 was meant;
    adding 1000 with wrap at 4096 and using intercept -1000 restores the right HU (RSNA 2019 data).
    """
    if pixels is None:
        pixels = _pixels(ds)
    if pixels.ndim != 2:
        raise VolumeError(f"slice {ds.get('SOPInstanceUID', '?')}: expected one 2-D frame, got shape {pixels.shape}")
    slope = _number(ds, "RescaleSlope", 1.0)
    intercept = _number(ds, "RescaleIntercept", 0.0)
    values = pixels.astype(np.float32)
    if ds.get("BitsStored") == 12 and ds.get("PixelRepresentation", 0) == 0 and intercept > -100:
        values = np.mod(values + 1000.0, 4096.0)
        intercept = -1000.0
    return values * np.float32(slope) + np.float32(intercept)


def slices_hu(refs: Sequence[SliceHeader]) -> list[np.ndarray]:
    """The HU images of the given slices; a multi-frame file is read and decoded once for all its frames."""
    return list(iter_slices_hu(refs))


def iter_slices_hu(refs: Iterable[SliceHeader]) -> Iterator[np.ndarray]:
    """slices_hu one slice at a time, each read when asked for (a caller may stop early)."""
    frames: dict[Path, np.ndarray] = {}
    for ref in refs:
        if ref.frame is None:
            yield to_hu(ref.ds, _pixels(pydicom.dcmread(ref.path)))
            continue
        if ref.path not in frames:
            frames[ref.path] = _pixels(pydicom.dcmread(ref.path))
        stack = frames[ref.path]
        stack = stack[None] if stack.ndim == 2 else stack  # pydicom gives 2-D for a single frame
        if ref.frame >= stack.shape[0]:
            raise VolumeError(f"{ref.path}: frame {ref.frame + 1} is missing from the pixel data "
                              f"({stack.shape[0]} frames); the file is truncated")
        yield to_hu(ref.ds, stack[ref.frame])


def load_volume(paths: Sequence[str | Path]) -> Volume:
    """Load one series: read headers, sort along the patient axis, check geometry, convert to HU."""
    if not paths:
        raise VolumeError("the series has no files")
    refs = slice_headers(paths)
    if not refs:
        raise VolumeError("the series has no slices")
    headers = [r.ds for r in refs]
    for ref in refs:
        problem = slice_problem(ref.ds)
        if problem:
            where = f"{ref.path}" + (f" frame {ref.frame + 1}" if ref.frame is not None else "")
            raise VolumeError(f"{where}: {problem}")
    series_uids = {str(ds.SeriesInstanceUID) for ds in headers}
    if len(series_uids) != 1:
        raise VolumeError(f"files belong to {len(series_uids)} series; analyse one series at a time")

    normal = slice_normal(headers[0])
    for ds in headers[1:]:
        if abs(float(np.dot(slice_normal(ds), normal))) < 0.999:
            raise VolumeError("slices of the series have different orientations; it is not one stack")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) != 1:
        raise VolumeError(f"slices of the series differ in size {sorted(sizes)}; it is not one stack")

    positions = [slice_position(ds, normal) for ds in headers]
    # Duplicate positions (the same slice sent twice under two UIDs) would make the stack lie: keep the first,
    # and say which were dropped.
    stack = sort_stack(positions)
    kept = stack.kept
    dropped = stack.dropped([_label(ref) for ref in refs])
    if dropped:
        nodelog.warning("volume.slices_dropped", series=str(headers[0].SeriesInstanceUID), dropped="; ".join(dropped))

    hu = np.stack(slices_hu([refs[i] for i in kept])).astype(np.float32)
    sorted_headers = [headers[i] for i in kept]
    slices = [
        SliceInfo(
            path=refs[i].path,
            sop_instance_uid=str(headers[i].SOPInstanceUID),
            sop_class_uid=str(headers[i].SOPClassUID),
            position=positions[i],
            instance_number=_instance_number(headers[i]),
            frame_number=None if refs[i].frame is None else refs[i].frame + 1,
        )
        for i in kept
    ]
    steps = np.diff([s.position for s in slices])
    slice_spacing = float(np.median(steps)) if len(steps) else _number(headers[0], "SliceThickness", 5.0)
    spacing = decimal_values(headers[0], "PixelSpacing")  # checked by slice_problem
    return Volume(
        study_instance_uid=str(headers[0].StudyInstanceUID),
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        slices=slices,
        hu=hu,
        pixel_spacing=(spacing[0], spacing[1]),
        slice_spacing=slice_spacing,
        headers=sorted_headers,
        dropped=dropped,
    )


def _label(ref: SliceHeader) -> str:
    """How a dropped slice is named: its SOP Instance UID, and its frame in a multi-frame file."""
    frame = "" if ref.frame is None else f" frame {ref.frame + 1}"
    return f"SOP {ref.ds.get('SOPInstanceUID', '?')}{frame}"


def _instance_number(ds: Dataset) -> int | None:
    """InstanceNumber when it is an integer; it only labels slices, so a damaged one is dropped."""
    try:
        return int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        return None


def combine_thin_slices(
    hu: np.ndarray, slice_spacing: float, target_mm: float = 5.0
) -> tuple[np.ndarray, list[list[int]]]:
    """Average runs of thin slices into ~target_mm slabs, as the model was trained on ~5 mm slices.

    Returns the slab array and, per slab, the indices of the original slices it covers, so results
    can still point at the original images.
    """
    n = hu.shape[0]
    if slice_spacing <= 0 or slice_spacing >= 0.6 * target_mm or n == 0:
        return hu, [[i] for i in range(n)]
    per_slab = max(1, int(round(target_mm / slice_spacing)))
    groups = [list(range(s, min(s + per_slab, n))) for s in range(0, n, per_slab)]
    slabs = np.stack([hu[g].mean(axis=0) for g in groups]).astype(np.float32)
    return slabs, groups
