"""Turn the files of one CT series into a volume in Hounsfield units, slices sorted along the patient axis.

Sorting uses the position along the slice normal (ImagePositionPatient . normal of
ImageOrientationPatient), never file name or InstanceNumber, which scanners and PACS reorder.

Enhanced CT (and Legacy Converted Enhanced CT) put a whole series in one multi-frame file: each frame
becomes one slice, its geometry and rescale taken from the per-frame functional groups, else the shared
ones (PS3.3 C.7.6.16). `slice_headers` flattens those into one header per slice, so eligibility and
loading treat both kinds alike.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from ihd_node.errors import UserError
from ihd_node.values.volume import SliceInfo, Volume  # noqa: F401  (the typed value this stage makes)

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
        iop, ipp, spacing = (_numbers(ds, k) for k in (
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


def _numbers(ds: Dataset, keyword: str) -> list[float]:
    """A multi-valued decimal attribute as floats; raises TypeError/ValueError when it is not numbers."""
    value = ds[keyword].value
    return [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]


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
    order = sorted(range(len(headers)), key=lambda i: positions[i])
    # Duplicate positions (the same slice sent twice under two UIDs) would make the stack lie: keep the first.
    kept: list[int] = []
    for i in order:
        if kept and abs(positions[i] - positions[kept[-1]]) < 1e-3:
            continue
        kept.append(i)

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
    spacing = _numbers(headers[0], "PixelSpacing")  # checked by slice_problem
    return Volume(
        study_instance_uid=str(headers[0].StudyInstanceUID),
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        slices=slices,
        hu=hu,
        pixel_spacing=(spacing[0], spacing[1]),
        slice_spacing=slice_spacing,
        headers=sorted_headers,
    )


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
