"""The model's attention regions as a DICOM Segmentation (BINARY), an overlay a viewer can toggle on the CT.

One segment per finding the SR outlines (its reported classes), with on each key slice exactly the pixels
the SR's outline encloses (regions.attention_regions / attention_mask: one definition for both). Labelled
for what it is: the region the model attended to (Grad-CAM), not a lesion boundary, not for diagnostic use.

The Segmentation references the source images (and, for an Enhanced CT, its frames): highdicom derives
the plane positions and the Derivation Image / Referenced Series sequences from them. Its UIDs are
result UIDs (uids.py), so a re-run gives the same object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import ihd_node
from ihd_node.classes import CLASSES, FINDING_NAMES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.report.codes import FINDING_CODES
from ihd_node.report.kos import incomplete_series_text
from ihd_node.report.overlay import CLASS_COLOURS
from ihd_node.report.regions import attention_regions
from ihd_node.report.source import (
    MANUFACTURER,
    check_groups,
    contributing_equipment,
    finish_result,
    mark_lossy,
    series_description,
    volume_lossy,
    with_type2,
)
from ihd_node.report.sr import reported_classes
from ihd_node.uids import ResultSettings, derived_uid, result_series_number, result_uid
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
SEG_SERIES_DESCRIPTION = f"ICH AI Attention Regions - {NOT_FOR_DIAGNOSTIC_USE}"
# SCT 49755003: the segmented property category for a finding (CID 7150).
ABNORMAL_STRUCTURE = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
SEGMENT_DESCRIPTION = f"Region the model attended to (Grad-CAM); not a lesion boundary. {NOT_FOR_DIAGNOSTIC_USE}"
CONTENT_DESCRIPTION = "AI attention regions, not lesion boundaries"  # LO: 64 characters at most
CONTENT_LABEL = "ICH_AI_ATTENTION"  # CS: 16 characters at most
# The overlay colour of each class: the captures' heat colours (Okabe-Ito), so both say the same.
SEGMENT_COLOURS: dict[str, tuple[int, int, int]] = CLASS_COLOURS


class SegmentationSourceError(ValueError):
    """The source series is not one a Segmentation can reference (the reason says why)."""


@dataclass(frozen=True)
class SegmentedRegions:
    """What the Segmentation holds, for the SR to reference: segment number per class, and per class the
    (SOP class UID, SOP instance UID, frame number or None) of every source slice with a region."""

    segment_numbers: dict[str, int]
    slices: dict[str, list[tuple[str, str, int | None]]]


def segment_label(cls: str) -> str:
    return f"AI attention: {FINDING_NAMES[cls]}"[:64]


def _segment(number: int, cls: str, prediction: Prediction, volume: Volume, revision: int,
             settings: str) -> hd.seg.SegmentDescription:
    model = prediction.model
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment_label(cls),
        segmented_property_category=ABNORMAL_STRUCTURE,
        segmented_property_type=FINDING_CODES[cls],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model.name[:64], family=codes.cid7162.ArtificialIntelligence, version=model.version[:64],
            parameters={"threshold": f"{prediction.threshold(cls):.4f}",
                        "heatmap": prediction.explained or "none"}),
        tracking_uid=result_uid(volume.series_instance_uid, model.name, model.version, "segment",
                                CLASSES.index(cls), revision, settings=settings),
        tracking_id=f"ICH AI attention {cls}",
        display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_COLOURS[cls]),
    )
    description.SegmentDescription = SEGMENT_DESCRIPTION
    return description


def _sources(volume: Volume, shown: list[int]) -> tuple[list[Dataset], list[hd.PlanePositionSequence] | None]:
    """The source images handed to highdicom for the mask's frames (one per slice in `shown`), and the
    frames' plane positions where highdicom needs them.

    Single-frame slices: only the slices with a region (highdicom references each). One Enhanced CT
    instance: that instance (read again with its functional groups), and the positions of the frames with
    a region, which highdicom matches to the source frames: the mask holds those frames only, not all.
    """
    frames = [volume.slices[i].frame_number for i in shown]
    if all(f is None for f in frames):
        headers = [volume.headers[i] for i in shown]
        return [with_type2(headers[0]), *headers[1:]], None
    instances = {volume.slices[i].sop_instance_uid for i in range(volume.n_slices)}
    if any(f is None for f in frames) or len(instances) != 1:
        raise SegmentationSourceError(
            f"the series mixes {len(instances)} multi-frame and single-frame instances; a Segmentation "
            "here references one multi-frame image or single-frame images only")
    path = volume.slices[shown[0]].path
    try:
        source = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise SegmentationSourceError(f"cannot read the Enhanced CT header {path} again: {exc}") from None
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                          [float(v) for v in volume.headers[i].ImagePositionPatient])
                 for i in shown]
    return [with_type2(source)], positions


def segmentation(volume: Volume, prediction: Prediction, *, slice_groups: Sequence[Sequence[int]] | None = None,
                 revision: int = 0, settings: str | None = None,
                 series_number: int | None = None) -> tuple[Dataset, SegmentedRegions] | None:
    """The Segmentation of the attention regions, and what it holds; None when there is no region (a
    negative series, or no heat inside the skull). Raises SegmentationSourceError for a source series it
    cannot reference (the caller records the reason and sends the other results)."""
    groups = check_groups(volume, prediction, slice_groups)
    regions = attention_regions(prediction, groups, reported_classes(prediction))
    if not regions:
        return None
    model = prediction.model
    if settings is None:
        settings = ResultSettings(model.thresholds).key()
    if series_number is None:
        series_number = result_series_number(volume.headers[0].get("SeriesNumber"), revision, "seg")
    rows, cols = volume.hu.shape[1:]
    for r in regions:
        if r.mask.shape != (rows, cols):
            raise SegmentationSourceError(f"heatmap {r.mask.shape} does not match the {rows}x{cols} slices")
    classes = list(dict.fromkeys(r.cls for r in regions))
    numbers = {cls: k + 1 for k, cls in enumerate(classes)}
    shown = sorted({r.slice_index for r in regions})
    position = {i: k for k, i in enumerate(shown)}
    sources, plane_positions = _sources(volume, shown)
    mask = np.zeros((len(shown), rows, cols, len(classes)), dtype=np.uint8)
    held: dict[str, list[tuple[str, str, int | None]]] = {cls: [] for cls in classes}
    for r in regions:
        mask[position[r.slice_index], :, :, numbers[r.cls] - 1] |= r.mask.astype(np.uint8)
        s = volume.slices[r.slice_index]
        if (s.sop_class_uid, s.sop_instance_uid, s.frame_number) not in held[r.cls]:
            held[r.cls].append((s.sop_class_uid, s.sop_instance_uid, s.frame_number))
    uid = lambda role: result_uid(volume.series_instance_uid, model.name, model.version, role, 0,  # noqa: E731
                                  revision, settings=settings)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment(numbers[c], c, prediction, volume, revision, settings) for c in classes],
            series_instance_uid=uid("seg-series"), series_number=series_number, sop_instance_uid=uid("seg"),
            instance_number=revision + 1, manufacturer=MANUFACTURER, manufacturer_model_name=model.name[:64],
            software_versions=[f"ihd-node {ihd_node.__version__}"[:64], f"model {model.version}"[:64]],
            device_serial_number=model.version[:64], content_description=CONTENT_DESCRIPTION,
            content_label=CONTENT_LABEL, omit_empty_frames=True, plane_positions=plane_positions,
            contributing_equipment=[contributing_equipment(prediction)],
        )
    except ValueError as exc:  # highdicom refuses a source it cannot reference (e.g. no Frame of Reference UID)
        raise SegmentationSourceError(f"the source series cannot be referenced by a Segmentation: {exc}") from None
    seg.SeriesDescription = series_description(SEG_SERIES_DESCRIPTION, revision)
    seg.ImageComments = " ".join(t for t in (incomplete_series_text(prediction), SEGMENT_DESCRIPTION) if t)
    _fix_dimension_uid(seg, uid("seg"))
    mark_lossy(seg, volume_lossy(volume))
    finish_result(seg, volume.headers[0])
    return seg, SegmentedRegions(numbers, held)


def _fix_dimension_uid(seg: Dataset, seg_uid: str) -> None:
    """highdicom makes a random Dimension Organization UID; derive it from the SEG's UID instead, so the
    same result is the same object byte for byte (bar its creation stamps)."""
    fixed = derived_uid("ihd-node", "seg-dimensions", seg_uid)
    for item in (*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = fixed
