"""Reading the real RSNA 2019 files for training: a relaxed header check, a header index cached in the work
folder, and a scan loader that drops single bad slices instead of whole scans.

The node's reader (ihd_node.imaging.volume) stays strict, as a DICOM node must be: it wants SOPClassUID = CT
Image Storage and valid UIDs. The RSNA files have neither (no SOPClassUID, no ImageType, InstanceNumber,
SliceThickness or dates; UIDs are `ID_<hex>`), so training decides "is this a CT slice" from Modality, the
file meta's MediaStorageSOPClassUID or, when both are silent, from the label file naming the slice.
Sorting, HU conversion (with the BitsStored-12 quirk) and the thin-slice slabs are the node's own
functions, so training sees what inference sees.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from ihd_node.imaging.headers import CT_IMAGE_STORAGE
from ihd_node.imaging.volume import VolumeError, combine_thin_slices, slice_normal, to_hu

# The node's defaults (config series.thin_slice_mm / series.slab_mm): slices thinner than THIN_SLICE_MM are
# averaged into SLAB_MM slabs, at inference and therefore here.
THIN_SLICE_MM = 3.0
SLAB_MM = 5.0
HEADER_INDEX = "headers.jsonl"


@contextlib.contextmanager
def lenient_uids() -> Iterator[None]:
    """`ID_<hex>` is no valid UID: read such files without a warning per file (training only). pydicom
    converts values when they are first used, so the whole use of a data set runs inside this."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = old


def _floats(ds: Dataset, keyword: str) -> list[float]:
    value = ds[keyword].value
    return [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]


def training_slice_problem(ds: Dataset, labelled: bool = True) -> str | None:
    """Why a header is not a usable CT slice for training, or None. Short fixed reasons (they are counted).

    CT is decided by Modality; without one, by the file meta's SOP class or by the label file (labelled).
    UIDs are not checked for syntax.
    """
    modality = str(ds.get("Modality", "") or "")
    if modality and modality != "CT":
        return f"modality {modality} is not CT"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    media_class = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", "") or "")
    if sop_class and sop_class != CT_IMAGE_STORAGE:
        return "SOP class is not CT Image Storage"
    if not modality and media_class != CT_IMAGE_STORAGE and not labelled:
        return "neither Modality nor file meta says CT"
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                    "PixelSpacing", "Rows", "Columns"):
        if keyword not in ds or ds[keyword].value in (None, ""):
            return f"attribute {keyword} missing"
    try:
        iop, ipp, spacing = (_floats(ds, k) for k in ("ImageOrientationPatient", "ImagePositionPatient",
                                                      "PixelSpacing"))
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (TypeError, ValueError):
        return "geometry attributes malformed"
    if len(iop) != 6 or len(ipp) != 3 or not np.isfinite(iop + ipp).all():
        return "geometry attributes malformed"
    if len(spacing) != 2 or not (np.isfinite(spacing).all() and min(spacing) > 0):
        return "geometry attributes malformed"
    if not (16 <= rows <= 4096 and 16 <= cols <= 4096):
        return "impossible image size"
    if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType") or []]:
        return "localizer (scout) image"
    return None


def read_any_header(path: Path) -> Dataset:
    """A header without pixel data; VolumeError with a short reason for files that cannot be read."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise VolumeError("not DICOM") from None
    except Exception:  # pydicom raises many types for damaged files
        raise VolumeError("unreadable DICOM header") from None


# ---------------------------------------------------------------------------------------------- index


@dataclass
class HeaderRecord:
    """What training needs from one file's header, cached in WORK/headers.jsonl (one JSON line per file)."""

    path: str
    size: int
    mtime_ns: int
    series: str | None
    patient: str
    problem: str | None


def header_record(path: str, labelled: bool = True) -> HeaderRecord:
    """Read one header (runs in worker processes)."""
    with lenient_uids():
        return _header_record(path, labelled)


def _header_record(path: str, labelled: bool) -> HeaderRecord:
    st = os.stat(path)
    try:
        ds = read_any_header(Path(path))
    except VolumeError as exc:
        return HeaderRecord(path, st.st_size, st.st_mtime_ns, None, "", str(exc))
    problem = training_slice_problem(ds, labelled)
    return HeaderRecord(path, st.st_size, st.st_mtime_ns, None if problem else str(ds.SeriesInstanceUID),
                        str(ds.get("PatientID", "") or ""), problem)


class HeaderIndex:
    """Headers read once: a file whose size and mtime are unchanged is not read again by later runs.

    Records are appended as they are read, so an interrupted indexing keeps what it did (a torn last
    line is ignored).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, HeaderRecord] = {}
        if path.is_file():
            with path.open() as fh:
                for line in fh:
                    try:
                        rec = HeaderRecord(**json.loads(line))
                    except (ValueError, TypeError):
                        continue
                    self.records[rec.path] = rec

    def fresh(self, path: str) -> HeaderRecord | None:
        rec = self.records.get(path)
        if rec is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return rec if (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns) else None

    def add(self, records: Sequence[HeaderRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            for rec in records:
                self.records[rec.path] = rec
                fh.write(json.dumps(asdict(rec)) + "\n")


# ---------------------------------------------------------------------------------------------- scans


@dataclass
class LoadedScan:
    """One scan as the model sees it: HU slices (slabs for thin series) in spatial order, and per model
    slice the file stems it covers."""

    hu: np.ndarray  # (n, rows, cols) float32
    members: list[list[str]]  # per model slice, the stems of the original slices (several for a slab)
    slice_spacing: float
    dropped: list[tuple[str, str]]  # (path, short reason) of slices left out


def load_training_scan(paths: Sequence[str], thin_slice_mm: float = THIN_SLICE_MM,
                       slab_mm: float = SLAB_MM) -> LoadedScan:
    """Read, sort along the slice normal, convert to HU and slab one scan, as ihd_node.node.analysis does.

    Unlike the node's load_volume, a slice that cannot be decoded, or whose size or orientation differs
    from the rest, is dropped with its reason; the scan fails only when nothing usable is left.
    """
    with lenient_uids():
        return _load_training_scan(paths, thin_slice_mm, slab_mm)


def _load_training_scan(paths: Sequence[str], thin_slice_mm: float, slab_mm: float) -> LoadedScan:
    dropped: list[tuple[str, str]] = []
    full: list[tuple[str, Dataset]] = []
    for p in paths:
        try:
            full.append((p, pydicom.dcmread(p)))
        except InvalidDicomError:
            dropped.append((p, "not DICOM"))
        except Exception:
            dropped.append((p, "unreadable DICOM"))
    if not full:
        raise VolumeError("no readable slice")
    sizes = [(int(ds.Rows), int(ds.Columns)) for _, ds in full]
    common = max(set(sizes), key=sizes.count)
    normal = slice_normal(full[0][1])
    kept: list[tuple[float, str, Dataset]] = []
    for (p, ds), size in zip(full, sizes, strict=True):
        if size != common:
            dropped.append((p, "image size differs from the rest of the scan"))
        elif abs(float(np.dot(slice_normal(ds), normal))) < 0.999:
            dropped.append((p, "orientation differs from the rest of the scan"))
        else:
            kept.append((float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)), p, ds))
    kept.sort(key=lambda t: t[0])
    slices: list[np.ndarray] = []
    stems: list[str] = []
    positions: list[float] = []
    for pos, p, ds in kept:
        if positions and abs(pos - positions[-1]) < 1e-3:
            dropped.append((p, "duplicate slice position"))
            continue
        try:
            slices.append(to_hu(ds))
        except VolumeError:
            dropped.append((p, "pixel data cannot be decoded"))
            continue
        stems.append(Path(p).stem)
        positions.append(pos)
    if not slices:
        raise VolumeError("no decodable slice")
    hu = np.stack(slices).astype(np.float32)
    steps = np.diff(positions)
    spacing = float(np.median(steps)) if len(steps) else 5.0
    groups = [[i] for i in range(len(stems))]
    if 0 < spacing < thin_slice_mm:
        hu, groups = combine_thin_slices(hu, spacing, target_mm=slab_mm)
    return LoadedScan(hu=hu, members=[[stems[i] for i in g] for g in groups], slice_spacing=spacing,
                      dropped=dropped)
