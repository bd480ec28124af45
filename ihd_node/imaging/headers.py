"""The headers of CT slices, read once: one flat header per slice, where each slice lies, in what order.

Sorting uses the position along the slice normal (ImagePositionPatient . normal of
ImageOrientationPatient), never file name or InstanceNumber, which scanners and PACS reorder.

Enhanced CT (and Legacy Converted Enhanced CT) put a whole series in one multi-frame file: each frame
becomes one slice, its geometry and rescale taken from the per-frame functional groups, else the shared
ones (PS3.3 C.7.6.16). `slice_headers` flattens those into one header per slice, so eligibility, the
completion checks and loading treat both kinds alike. No pixel data is read here (ihd_node.imaging.volume).

Each geometric idea is here once: the slice normal (slice_normal), the stack order (sort_stack) and the
cache of what was read (HeaderCache: per spool file for the completion checks, per series for eligibility
and the study choice).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

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
    """Unit normal of the slice plane: row direction x column direction.

    The one place the normal is computed. Raises VolumeError when ImageOrientationPatient is missing, not six
    numbers, or has parallel row and column vectors; callers that only describe a series catch it."""
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        raise VolumeError("ImageOrientationPatient is missing or not numbers; the series is damaged") from None
    if iop.shape != (6,):
        raise VolumeError(f"ImageOrientationPatient holds {iop.size} values, not 6; the series is damaged")
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if not norm > 1e-6:  # also NaN
        raise VolumeError("ImageOrientationPatient has parallel row and column vectors; the series is damaged")
    return normal / norm


def slice_position(ds: Dataset, normal: np.ndarray) -> float:
    """Distance of the slice along the normal, in mm."""
    return float(np.dot(np.asarray([float(v) for v in ds.ImagePositionPatient]), normal))


def tilt_degrees(ds: Dataset) -> float | None:
    """Angle between the slice normal and the patient's z (foot-head) axis; None when unknown."""
    try:
        normal = slice_normal(ds)
    except VolumeError:
        return None
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def slice_thickness(headers: Sequence[Dataset]) -> float | None:
    """SliceThickness when the headers give it, else the median step between slice positions."""
    values = [float(ds.SliceThickness) for ds in headers if ds.get("SliceThickness") not in (None, "")]
    if values:
        return float(np.median(values))
    if len(headers) < 2:
        return None
    try:
        normal = slice_normal(headers[0])
    except VolumeError:
        return None
    stack = sort_stack([slice_position(ds, normal) for ds in headers])
    steps = np.diff([stack.positions[i] for i in stack.order])
    return float(np.median(steps)) if len(steps) else None


# ------------------------------------------------------------------ the order of a stack

DUPLICATE_MM = 1e-3  # two slices closer than this along the normal lie at one position (one slice sent twice)


@dataclass(frozen=True)
class Stack:
    """Slices sorted along the normal, by their positions (mm) in the order given."""

    positions: tuple[float, ...]
    order: tuple[int, ...]  # every slice, lowest position first; equal positions keep the order given
    kept: tuple[int, ...]  # `order` without the slices at a position already taken (the first one stays)
    duplicates: tuple[tuple[int, int], ...]  # (dropped, the kept slice at its position)

    def dropped(self, labels: Sequence[str]) -> list[str]:
        """One human-readable line per position that held more than one slice (labels: one per slice)."""
        by_kept: dict[int, list[int]] = {}
        for dropped, kept in self.duplicates:
            by_kept.setdefault(kept, []).append(dropped)
        return [f"{1 + len(dropped)} slices at duplicate positions ({self.positions[kept]:.1f} mm along the "
                f"slice normal): kept {labels[kept]}, dropped {', '.join(labels[i] for i in dropped)}"
                for kept, dropped in by_kept.items()]


def sort_stack(positions: Sequence[float]) -> Stack:
    """The one stack sort: by position along the normal, stable, duplicates (within DUPLICATE_MM of the slice
    kept before them) set aside, as a stack with the same slice twice would lie about its spacing."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    kept: list[int] = []
    duplicates: list[tuple[int, int]] = []
    for i in order:
        if kept and abs(positions[i] - positions[kept[-1]]) < DUPLICATE_MM:
            duplicates.append((i, kept[-1]))
            continue
        kept.append(i)
    return Stack(tuple(positions), tuple(order), tuple(kept), tuple(duplicates))


# ------------------------------------------------------------------ geometry of one spool file, and the cache

# Header elements the completion checks read; pydicom stops parsing once it has these (no pixel data).
GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "SOPInstanceUID",
                 "PixelSpacing", "Rows", "Columns"]


@dataclass(frozen=True)
class SliceGeometry:
    """Where one instance lies, read once from its header."""

    path: str
    sop_instance_uid: str
    position: float | None  # mm along the slice normal; None when the header lacks it
    normal: tuple[float, float, float] | None
    instance_number: int | None
    pixel_spacing: float | None


def read_geometry(path: str) -> SliceGeometry:
    """The position of one slice from its header only (stop_before_pixels, only the tags needed)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=GEOMETRY_TAGS)
    normal = position = spacing = None
    number = None
    try:
        n = slice_normal(ds)
        normal = (float(n[0]), float(n[1]), float(n[2]))
        position = slice_position(ds, n)
    except (VolumeError, AttributeError, TypeError, ValueError, IndexError):
        normal = position = None  # eligibility (select.py) rejects such a series with its own reason
    try:
        number = int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        number = None
    try:
        spacing = float(ds.PixelSpacing[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        spacing = None
    return SliceGeometry(path, str(ds.get("SOPInstanceUID", "")), position, normal, number, spacing)


KeyT = TypeVar("KeyT")
ValueT = TypeVar("ValueT")


class HeaderCache(Generic[KeyT, ValueT]):
    """What `read` made of a key, for the `size` keys asked for last (least recently used dropped first).

    Spool files are named by the SHA-256 of their content, so the same paths are the same headers; a late
    instance or a resent one changes the paths and is read afresh. A failed read is not kept. Thread-safe:
    the assembler, the node's judge and the study choice share one."""

    def __init__(self, read: Callable[[KeyT], ValueT], size: int,
                 key: Callable[[Any], KeyT] = lambda k: k) -> None:
        self.size = size
        self._read = read
        self._key = key
        self._items: OrderedDict[KeyT, ValueT] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # reads done (tests and the benchmark check the cache works)

    def get(self, key: Any) -> ValueT:
        k = self._key(key)
        with self._lock:
            if k in self._items:
                self._items.move_to_end(k)
                return self._items[k]
        value = self._read(k)
        with self._lock:
            self.reads += 1
            self._items[k] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    __call__ = get


def geometry_cache(size: int = 20000) -> HeaderCache[str, SliceGeometry]:
    """SliceGeometry per spool file: the completion judge asks for every instance at every new arrival, so a
    series of 300+ slices costs one header read per instance, not one per tick."""
    return HeaderCache(read_geometry, size, key=str)


def series_header_cache(keep: int = 4) -> HeaderCache[tuple[str, ...], list[SliceHeader]]:
    """slice_headers() of the last few series read, by their files: completing a series reads its headers to
    judge it and, right after, again to choose the study's best series (300 header reads each, ~0.5 s, for a
    thin-slice study)."""
    return HeaderCache(slice_headers, keep, key=lambda paths: tuple(str(p) for p in paths))
