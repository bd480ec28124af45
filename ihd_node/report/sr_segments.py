"""The SR names the Segmentation: one TID 1411 (Volumetric ROI) group per segment, added to a built SR.

Each group sits in TID 1500's Imaging Measurements, says in its tracking identifier that the region is the
model's attention (Grad-CAM), not a lesion boundary, references the segment (Referenced Segment: the SEG
instance and segment number, and the source images it was drawn on, frames included) and the finding it
belongs to. The SEG is added to the SR's evidence.

Tracking UID: the group, its segment and the finding's first outline (TID 1410 group) share one, as one
tracked finding. This is also what keeps OHIF (3.13) working: it merges the groups of one tracking UID
and fails on a group in Imaging Measurements that has no SCOORD of its own (it reads the coordinates of
the first one unguarded); merged with an outline the group has one. No finding site here for the same
reason (OHIF would add it to the outline's label).

Applied after build_sr, as a separate step, so the SR's own layout can change without this one.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ihd_node.classes import FINDING_NAMES
from ihd_node.report.codes import FINDING_CODES, PRESENT
from ihd_node.report.seg import SegmentedRegions
from ihd_node.values.prediction import Prediction

IMAGING_MEASUREMENTS = "126010"
IMAGE_LIBRARY = "111028"
FINDING = "121071"
TRACKING_UID = "112040"
CONTENT_SEQUENCE = 0x0040A730


def segment_group_label(cls: str) -> str:
    """The tracking identifier a reader sees for a segment group: what the region is and is not."""
    return f"AI attention region (Grad-CAM), not a lesion boundary: {FINDING_NAMES[cls]}"


def _segment_item(seg: Dataset, number: int) -> Dataset:
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) == number:
            return item
    raise ValueError(f"the Segmentation has no segment {number}")


def _first_outline_uid(container: Dataset, finding: str) -> str | None:
    """The tracking UID of the first planar (SCOORD) group of this finding in Imaging Measurements."""
    for group in container.get("ContentSequence", []):
        children = list(group.get("ContentSequence", []))
        if not any(c.ValueType == "SCOORD" for c in children):
            continue
        if any(c.ValueType == "CODE" and _code(c) == FINDING and c.ConceptCodeSequence[0].CodeValue == finding
               for c in children):
            return next((str(c.UID) for c in children if c.ValueType == "UIDREF" and _code(c) == TRACKING_UID),
                        None)
    return None


def _group(seg: Dataset, cls: str, number: int, slices: list[tuple[str, str, int | None]],
           prediction: Prediction, container: Dataset) -> Dataset:
    model = prediction.model
    segment = _segment_item(seg, number)
    tracking = _first_outline_uid(container, FINDING_CODES[cls].value)
    if tracking is not None:
        segment.TrackingUID = tracking  # one tracked finding: the outline, the segment and this group
    else:
        tracking = str(segment.TrackingUID)
    sources = [hd.sr.SourceImageForSegmentation(sop_class, sop_instance,
                                                referenced_frame_numbers=None if frame is None else [frame])
               for sop_class, sop_instance, frame in slices]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking, identifier=segment_group_label(cls)),
        referenced_segment=hd.sr.ReferencedSegment(str(seg.SOPClassUID), str(seg.SOPInstanceUID), number,
                                                   source_images=sources),
        finding_type=FINDING_CODES[cls],
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version,
            parameters=[f"threshold={prediction.threshold(cls):.4f}", f"heatmap={prediction.explained or 'none'}"]),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=FINDING_CODES[cls], value=PRESENT)],
    )
    return group[0]


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _imaging_measurements(root: Dataset) -> Dataset:
    """The Imaging Measurements container of the root; made (after the Image Library) when absent."""
    items = list(root.ContentSequence)
    for item in items:
        if item.ValueType == "CONTAINER" and _code(item) == IMAGING_MEASUREMENTS:
            return item
    container = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurements,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = []
    at = next((k + 1 for k, item in enumerate(items) if _code(item) == IMAGE_LIBRARY), len(items))
    items.insert(at, container)
    root["ContentSequence"] = DataElement(CONTENT_SEQUENCE, "SQ", items)
    return container


def _add_evidence(sr: Dataset, seg: Dataset) -> None:
    """The SEG in the SR's Current Requested Procedure Evidence (same study, its own series)."""
    studies = sr.get("CurrentRequestedProcedureEvidenceSequence") or []
    study = next((s for s in studies if s.StudyInstanceUID == seg.StudyInstanceUID), None)
    if study is None:
        study = Dataset()
        study.StudyInstanceUID = seg.StudyInstanceUID
        study.ReferencedSeriesSequence = []
        studies = [*studies, study]
        sr.CurrentRequestedProcedureEvidenceSequence = studies
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = seg.SOPClassUID, seg.SOPInstanceUID
    for series in study.ReferencedSeriesSequence:
        if series.SeriesInstanceUID == seg.SeriesInstanceUID:
            if all(r.ReferencedSOPInstanceUID != seg.SOPInstanceUID for r in series.ReferencedSOPSequence):
                series.ReferencedSOPSequence.append(reference)
            return
    series = Dataset()
    series.SeriesInstanceUID = seg.SeriesInstanceUID
    series.ReferencedSOPSequence = [reference]
    study.ReferencedSeriesSequence.append(series)


def add_segment_references(sr: Dataset, seg: Dataset, regions: SegmentedRegions, prediction: Prediction) -> None:
    """Add one TID 1411 group per segment of `seg` to the SR's Imaging Measurements, and `seg` to its
    evidence; each segment's TrackingUID becomes its finding's first outline's (see the module doc). The
    SR's UIDs stay: it is the same result set's SR, built in the same run."""
    container = _imaging_measurements(sr)
    groups = [_group(seg, cls, number, regions.slices[cls], prediction, container)
              for cls, number in sorted(regions.segment_numbers.items(), key=lambda kv: kv[1])]
    container.ContentSequence = [*container.get("ContentSequence", []), *groups]
    _add_evidence(sr, seg)
