"""The SR's measurement groups (TID 1500 Imaging Measurements) and its document-level evaluations.

- One TID 1410 planar ROI group per present finding and key slice: a closed POLYLINE (SCOORD, image
  coordinates) around where the decision heatmap places it, on the source image (and frame), labelled
  "Subdural hemorrhage 97 %" (its tracking identifier), with the slice's probability and Present.
- One TID 1501 group per class (ICH and the five subtypes), no coordinates: tracking identifier, finding,
  algorithm (TID 4019: name, version, threshold), finding site, the source images (and frames) that carry
  a present finding, the series probability and Present/Absent. These are what a TID 1500 reader
  (highdicom's MeasurementReport.get_image_measurement_groups) lists, on a negative study too.
- The Qualitative Evaluations container: the summary text and Present/Absent per finding.

Probabilities are NUMs in percent (UCUM "%", e.g. 97.1234): viewers print a NUM's value with its unit code.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.sr.codedict import codes

from ihd_node.classes import CLASSES, FINDING_NAMES
from ihd_node.report.codes import (
    ABSENT,
    FINDING_CODES,
    FINDING_SITE,
    PRESENT,
    PROBABILITY_UNIT,
    QUALITATIVE_EVALUATIONS,
)
from ihd_node.report.regions import outline
from ihd_node.report.source import volume_lossy
from ihd_node.report.summary import percent, reported_classes, summary_text
from ihd_node.uids import result_uid
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import SliceInfo, Volume


def probability_value(probability: float) -> float:
    """The SR's NUM value of a probability: percent, to four decimals (0.9712345 -> 97.1235)."""
    return round(100.0 * float(probability), 4)


def _frames(s: SliceInfo) -> list[int] | None:
    return None if s.frame_number is None else [s.frame_number]  # a frame of an Enhanced CT instance


def _source_images(volume: Volume, prediction: Prediction, cls: str,
                   groups: Sequence[Sequence[int]]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """The original slices carrying a present finding (all slices of each positive slab)."""
    model_slices = prediction.positive_slices(cls)
    if not model_slices:
        # The series is called positive but no single slice reached the threshold: point at the best one.
        model_slices = [int(prediction.slice_probabilities[:, CLASSES.index(cls)].argmax())]
    originals = sorted({o for m in model_slices for o in groups[m]})
    return [hd.sr.SourceImageForMeasurementGroup(volume.slices[o].sop_class_uid, volume.slices[o].sop_instance_uid,
                                                 referenced_frame_numbers=_frames(volume.slices[o]))
            for o in originals]


def finding_group(volume: Volume, prediction: Prediction, cls: str, groups: Sequence[Sequence[int]],
                  revision: int, settings: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one class: the finding, Present/Absent and the series probability."""
    model = prediction.model
    present = cls in prediction.positive_classes()  # the consistency rule lives in Prediction
    concept = FINDING_CODES[cls]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(volume.series_instance_uid, model.name, model.version, "tracking",
                           CLASSES.index(cls), revision, settings=settings),
            identifier=f"ICH AI finding {cls}"),
        finding_type=concept,
        algorithm_id=hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                                    parameters=[f"threshold={prediction.threshold(cls):.4f}"]),
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability,
                                        value=probability_value(prediction.series_probability(cls)),
                                        unit=PROBABILITY_UNIT)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if present else ABSENT)],
        finding_sites=[hd.sr.FindingSite(anatomic_location=FINDING_SITE)],
        source_images=_source_images(volume, prediction, cls, groups) if present else None,
    )


def region_label(cls: str, probability: float) -> str:
    """'Subdural hemorrhage 97 %': a region's tracking identifier, the label a viewer shows beside it."""
    return f"{FINDING_NAMES[cls]} {percent(probability)}"


def region_groups(volume: Volume, prediction: Prediction, groups: Sequence[Sequence[int]], revision: int,
                  settings: str) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One planar ROI group per present finding and key slice (a slice with its decision heatmap)."""
    model = prediction.model
    out = []
    for cls in reported_classes(prediction):
        k = CLASSES.index(cls)
        algorithm = hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version,
            parameters=[f"threshold={prediction.threshold(cls):.4f}", f"heatmap={prediction.explained or 'none'}"],
        )
        for index in sorted(i for (i, c) in prediction.heatmaps if c == cls):
            points = outline(prediction.heatmaps[(index, cls)])
            if points is None:
                continue  # no heat inside the skull on this slice: nothing to outline
            shown = groups[index][len(groups[index]) // 2]  # a slab's middle slice, as on the capture
            s = volume.slices[shown]
            probability = float(prediction.slice_probabilities[index, k])
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points,
                source_image=hd.sr.SourceImageForRegion(s.sop_class_uid, s.sop_instance_uid,
                                                        referenced_frame_numbers=_frames(s)),
            )
            out.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=result_uid(volume.series_instance_uid, model.name, model.version, "region",
                                   k * 100000 + index, revision, settings=settings),
                    identifier=region_label(cls, probability)),
                referenced_region=region,
                finding_type=FINDING_CODES[cls],
                algorithm_id=algorithm,
                # The slice's probability, named by the finding: viewers print a NUM's name beside its value
                # and unit next to the outline (OHIF: "Subdural hemorrhage: 97.12 %").
                measurements=[hd.sr.Measurement(name=FINDING_CODES[cls], value=probability_value(probability),
                                                unit=PROBABILITY_UNIT)],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=FINDING_CODES[cls], value=PRESENT)],
            ))
    return out


def evaluations_container(volume: Volume, prediction: Prediction,
                          groups: Sequence[Sequence[int]]) -> hd.sr.ContainerContentItem:
    """TID 1500 'Qualitative Evaluations': the summary (it says not for diagnostic use), then each
    finding Present/Absent, for readers that show the document rather than its measurement groups."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    positive = prediction.positive_classes()
    container.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=summary_text(volume, prediction, [list(g) for g in groups], volume_lossy(volume)),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        *[hd.sr.CodeContentItem(name=FINDING_CODES[cls], value=PRESENT if cls in positive else ABSENT,
                                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS) for cls in CLASSES],
    ]
    return container
