"""The headers of CT slices, read once: one flat header per slice, where each slice lies, in what order.

Sorting uses the position along the slice normal (ImagePositionPatient . normal of
ImageOrientationPatient), never file name or InstanceNumber, which scanners and PACS reorder.

Enhanced CT (and Legacy Converted Enhanced CT) put a whole series in one multi-frame file: each frame
becomes one slice, its geometry and rescale taken from the per-frame functional groups, else the shared
ones (PS3.3 C.7.6.16). `slice_headers` flattens those into one header per slice, so eligibility, the
completion checks and loading treat both kinds alike. No pixel data is read here (ihd_node.imaging.volume).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from ihd_node.errors import UserError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MULTIFRAME_CT_CLASSES = frozenset({ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE})
CT_CLASSES = frozenset({CT_IMAGE_STORAGE, *MULTIFRAME_CT_CLASSES})
# Top-level elements a flattened frame header does not carry (pixels, and the groups it was built from).
_FRAME_SKIP = ("PixelData", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
               "NumberOfFrames")


class VolumeError(UserError):
    """A series cannot become a volume; the message names the cause and what to do."""


class FrameGroupsError(VolumeError):
    """An Enhanced CT whose frames cannot be described (bad input from the sender, not a node failure)."""



def read_header(path: Path) -> Dataset:
    """Read a DICOM header without pixel data; raises VolumeError naming what is wrong."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise VolumeError(
            f"{path}: not a DICOM file (no DICM preamble); only DICOM CT slices can be analysed") from None
    except Exception as exc:  # pydicom raises many types for damaged files
        raise VolumeError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc}); resend the file") from None


@dataclass(frozen=True)
class SliceHeader:
    """One slice as stored: its file, its frame (0-based) in a multi-frame file, and a flat header that has
    the slice's own ImagePositionPatient, PixelSpacing, Rescale... at the top level (no pixel data)."""

    path: Path
    frame: int | None
    ds: Dataset


def is_multiframe_ct(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) in MULTIFRAME_CT_CLASSES


def _group_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of a functional group macro sequence, or None."""
    seq = ds.get(keyword)
    return seq[0] if seq else None


def frame_headers(ds: Dataset) -> list[Dataset]:
    """An Enhanced CT header flattened into one header per frame; raises VolumeError naming what is missing.

    Each frame's attributes come from its PerFrameFunctionalGroupsSequence item, else from the
    SharedFunctionalGroupsSequence (PS3.3 C.7.6.16.1): Plane Position, Plane Orientation, Pixel Measures,
    Pixel Value Transformation and CT Image Frame Type (FrameType becomes ImageType, so scout frames read
    as LOCALIZER).
    """
    uid = ds.get("SOPInstanceUID", "?")
    try:
        n_frames = int(ds.get("NumberOfFrames") or 0)
    except (TypeError, ValueError):
        raise FrameGroupsError(f"Enhanced CT {uid}: NumberOfFrames {ds.get('NumberOfFrames')!r} is not a number; "
                          "the sender wrote a damaged header") from None
    if n_frames < 1:
        raise FrameGroupsError(f"Enhanced CT {uid}: NumberOfFrames is missing or 0; the file holds no frames")
    shared = _group_item(ds, "SharedFunctionalGroupsSequence") or Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n_frames:
        raise FrameGroupsError(f"Enhanced CT {uid}: {len(per_frame)} per-frame functional group items for "
                          f"{n_frames} frames; the file is damaged (PS3.3 C.7.6.16)")
    base = Dataset()
    for elem in ds:
        if elem.keyword not in _FRAME_SKIP:
            base.add(elem)
    flat: list[Dataset] = []
    for item in per_frame:
        frame = Dataset()
        frame.update(base)

        def group(keyword: str, item: Dataset = item) -> Dataset | None:
            return _group_item(item, keyword) or _group_item(shared, keyword)

        for sequence, keywords in (
            ("PlanePositionSequence", ("ImagePositionPatient",)),
            ("PlaneOrientationSequence", ("ImageOrientationPatient",)),
            ("PixelMeasuresSequence", ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices")),
            ("PixelValueTransformationSequence", ("RescaleIntercept", "RescaleSlope", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth")),
        ):
            found = group(sequence)
            for keyword in keywords:
                if found is not None and keyword in found:
                    frame[keyword] = found[keyword]
        frame_type = group("CTImageFrameTypeSequence")
        if frame_type is not None and "FrameType" in frame_type:
            frame.ImageType = frame_type.FrameType
        flat.append(frame)
    return flat


def slice_headers(paths: Iterable[str | Path]) -> list[SliceHeader]:
    """One flat header per slice: a classic CT file is one slice, an Enhanced CT file one per frame."""
    out: list[SliceHeader] = []
    for path in map(Path, paths):
        ds = read_header(path)
        if is_multiframe_ct(ds):
            out.extend(SliceHeader(path, i, f) for i, f in enumerate(frame_headers(ds)))
        else:
            out.append(SliceHeader(path, None, ds))
    return out


class RecentHeaders:
    """slice_headers() of the last few series read, by their files: completing a series reads its headers
    to judge it and, right after, again to choose the study's best series (300 header reads each, ~0.5 s, for
    a thin-slice study). Spool files are named by the SHA-256 of their content, so the same paths are the
    same headers; a late instance or a resent one changes the paths and is read afresh."""

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._recent: OrderedDict[tuple[str, ...], list[SliceHeader]] = OrderedDict()

    def __call__(self, paths: Iterable[str | Path]) -> list[SliceHeader]:
        key = tuple(str(p) for p in paths)
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        refs = slice_headers(key)
        with self._lock:
            self._recent[key] = refs
            while len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        return refs


def slice_problem(ds: Dataset) -> str | None:
    """Why a (flat) header is not a usable axial-type CT slice, or None when it is."""
    if ds.get("Modality", "") != "CT":
        return f"modality {ds.get('Modality', 'missing')!r} is not CT"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in CT_CLASSES:
        return f"SOP class {sop_class or 'missing'} is not CT Image Storage or Enhanced CT Image Storage"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient",
                    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if keyword not in ds:
            return f"attribute {keyword} is missing"
    try:  # damaged senders write text, one value, or nothing where numbers belong
        iop, ipp, spacing = (decimal_values(ds, k) for k in (
            "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"))
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (TypeError, ValueError):
        return "ImageOrientationPatient/ImagePositionPatient/PixelSpacing/Rows/Columns malformed"
    if len(iop) != 6 or len(ipp) != 3 or not np.isfinite(iop + ipp).all():
        return "ImageOrientationPatient/ImagePositionPatient malformed"
    if len(spacing) != 2 or not (np.isfinite(spacing).all() and min(spacing) > 0):
        return "PixelSpacing malformed"
    if rows < 16 or cols < 16 or rows > 4096 or cols > 4096:
        return f"impossible image size {rows}x{cols}"
    image_type = [str(v).upper() for v in ds.get("ImageType") or []]
    if "LOCALIZER" in image_type:
        return "localizer (scout) image"
    return None


def decimal_values(ds: Dataset, keyword: str) -> list[float]:
    """A multi-valued decimal attribute as floats; raises TypeError/ValueError when it is not numbers."""
    value = ds[keyword].value
    return [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]


def slice_normal(ds: Dataset) -> np.ndarray:
    """Unit normal of the slice plane: row direction x column direction."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise VolumeError("ImageOrientationPatient has parallel row and column vectors; the series is damaged")
    return normal / norm


def slice_position(ds: Dataset, normal: np.ndarray) -> float:
    """Distance of the slice along the normal, in mm."""
    return float(np.dot(np.asarray([float(v) for v in ds.ImagePositionPatient]), normal))
