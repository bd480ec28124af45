"""Secondary captures, in their own series of the source study: what the ER doctor sees without an SR viewer.

Instance 1 is a summary capture for every analysed series, negatives included, so the doctor knows the
study was read: the finding in words (or "No intracranial hemorrhage detected"), model and time, on the
key slice (the most probable positive one; the middle slice when negative). Positive series add one
capture per positive slice, highest probability first up to the cap, in body order, each with the heatmaps
of all classes present on it (the paper's readers found single-class maps incomplete). The slice is shown
at full size; the source's series number, image number and table position, orientation letters, legend
(probability and threshold), model and NOT FOR DIAGNOSTIC USE lie in bands around it, never over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from ihd_node.classes import INCOMPLETE_SERIES_LINE, NOT_FOR_DIAGNOSTIC_USE, SUBTYPES
from ihd_node.report.overlay import LegendLine, Orientation, Picture, render
from ihd_node.report.source import (
    MANUFACTURER,
    check_groups,
    contributing_equipment,
    finish_result,
    lossy_history,
    mark_lossy,
    positive_slices,
    series_description,
    with_type2,
)
from ihd_node.report.summary import incomplete_text, percent
from ihd_node.uids import ResultSettings, result_series_numbers, result_uid
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

SC_SERIES_DESCRIPTION = f"ICH AI Grad-CAM - {NOT_FOR_DIAGNOSTIC_USE}"
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Row/column directions as PatientOrientation letters (dominant axis), required for PATIENT frames."""
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letter(vec: list[float]) -> str:
        axis = int(np.argmax(np.abs(vec)))
        positive = vec[axis] >= 0
        return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]

    return letter(iop[:3]), letter(iop[3:])


def edge_letters(ds: Dataset) -> Orientation:
    """Letters at the image edges: the row direction points to the right edge, the column one down."""
    if "ImageOrientationPatient" not in ds:
        return Orientation()
    right, bottom = patient_orientation(ds)
    return Orientation(left=OPPOSITE[right], right=right, top=OPPOSITE[bottom], bottom=bottom)


def _number(value: object) -> str:
    try:
        number = float(str(value))
    except (TypeError, ValueError):
        return "?"
    return str(int(number)) if number.is_integer() else f"{number:g}"


def table_position(ds: Dataset) -> float | None:
    """The slice's table position as viewers show it: SliceLocation, else ImagePositionPatient z."""
    for value in (ds.get("SliceLocation"), (ds.get("ImagePositionPatient") or [None, None, None])[2]):
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def source_line(ds: Dataset, frame: int | None = None) -> str:
    """'Series 3, image 22, z = 42.5 mm' ('Series 3, image 1, frame 7, ...' for a frame of a multi-frame
    instance): the numbers a doctor pages to in the viewer."""
    z = table_position(ds)
    where = f", z = {z:.1f} mm" if z is not None else ""
    framed = f", frame {frame}" if frame is not None else ""
    return f"Series {_number(ds.get('SeriesNumber'))}, image {_number(ds.get('InstanceNumber'))}{framed}{where}"


def shown_classes(prediction: Prediction, index: int) -> list[str]:
    """Classes to draw on one slice: the positive subtypes; `any` alone when no subtype is positive."""
    present = prediction.slice_positive_classes(index)
    subtypes = [c for c in SUBTYPES if c in present]
    return subtypes or [c for c in present if c == "any"]


def finding_words(prediction: Prediction) -> str:
    """The series' finding in a doctor's words: never the class name `any`."""
    positive = prediction.positive_classes()
    if not positive:
        return "No intracranial hemorrhage detected"
    subtypes = [c for c in positive if c != "any"]
    named = ", ".join(f"{c} ({percent(prediction.series_probability(c))})" for c in subtypes)
    if not named:
        named = f"type not determined ({percent(prediction.series_probability('any'))})"
    return f"Intracranial hemorrhage suspected: {named}"


def _model_line(prediction: Prediction, analysed_at: datetime, heat: bool) -> str:
    model = prediction.model
    kinds = {"decision": "heat: Grad-CAM of the decision", "cnn": "heat: Grad-CAM of the slice CNN"}
    what = kinds.get(prediction.explained, "") if heat else ""
    return ", ".join(t for t in (f"{model.name} {model.version}", what,
                                 analysed_at.strftime("%Y-%m-%d %H:%M %Z").strip()) if t)


def _references(volume: Volume, originals: Sequence[int]) -> list[Dataset]:
    items = []
    for o in originals:
        item = Dataset()
        item.ReferencedSOPClassUID = volume.slices[o].sop_class_uid
        item.ReferencedSOPInstanceUID = volume.slices[o].sop_instance_uid
        if volume.slices[o].frame_number is not None:  # a frame of an Enhanced CT instance
            item.ReferencedFrameNumber = volume.slices[o].frame_number
        items.append(item)
    return items


def _capture(volume: Volume, prediction: Prediction, picture: np.ndarray, *, key: str, index: int,
             number: int, originals: list[int], shown: int, revision: int, series_number: int,
             description: str, comments: str, settings: str) -> Dataset:
    model = prediction.model
    ref = with_type2(volume.headers[shown])
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(volume.series_instance_uid, model.name, model.version, "sc-series",
                                       0, revision, settings=settings),
        series_number=series_number,
        # Keyed by the model slice, so the capture of one slice keeps its UID whatever else is shown.
        sop_instance_uid=result_uid(volume.series_instance_uid, model.name, model.version, key,
                                    index, revision, settings=settings),
        instance_number=number,
        manufacturer=MANUFACTURER,
        pixel_spacing=tuple(float(v) for v in volume.pixel_spacing),
        patient_orientation=patient_orientation(ref),
        contributing_equipment=[contributing_equipment(prediction)],
    )
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # workstation: drawn by software from other images, not digitised video
    sc.BurnedInAnnotation = "YES"
    # A head is not a paired structure: saying so keeps Laterality (Type 2C) not required.
    sc.BodyPartExamined = "HEAD"
    sc.SeriesDescription = series_description(SC_SERIES_DESCRIPTION, revision)
    sc.DerivationDescription = f"{description}; {NOT_FOR_DIAGNOSTIC_USE}"[:1024]
    sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}. {comments}"[:9000]
    if prediction.incomplete:
        sc.ImageComments = incomplete_text(prediction)[:1000] + sc.ImageComments
    sc.SourceImageSequence = _references(volume, originals)
    sc.ReferencedImageSequence = _references(volume, [shown])
    finish_result(sc, volume.headers[shown])
    mark_lossy(sc, lossy_history(volume.headers[shown], volume.slices[shown].path))
    return sc


def slice_picture(volume: Volume, prediction: Prediction, index: int, originals: Sequence[int],
                  analysed_at: datetime) -> tuple[Picture, list[LegendLine], list[str]]:
    """The picture of model slice `index` with the heat of every class present on it (and its legend)."""
    shown = originals[len(originals) // 2]  # for a slab, the middle original slice carries the picture
    probs = prediction.slice_probability_dict(index)
    classes = shown_classes(prediction, index)
    heat = {c: prediction.heatmaps[(index, c)] for c in classes if (index, c) in prediction.heatmaps}
    legend = [LegendLine(c, probs[c], prediction.threshold(c)) for c in (["any"] + [c for c in classes
                                                                                    if c != "any"])]
    footer = [_model_line(prediction, analysed_at, bool(heat))]
    where = source_line(volume.headers[shown], volume.slices[shown].frame_number)
    picture = render(volume.hu[shown], heat, legend, _preliminary(prediction) + [where],
                     edge_letters(volume.headers[shown]), footer=footer)
    return picture, legend, classes


def _slice_capture(volume: Volume, prediction: Prediction, index: int, number: int, originals: list[int],
                   revision: int, series_number: int, analysed_at: datetime, settings: str) -> Dataset:
    """The capture of model slice `index`: its heat for every class present on it."""
    shown = originals[len(originals) // 2]
    picture, legend, classes = slice_picture(volume, prediction, index, originals, analysed_at)
    comments = source_line(volume.headers[shown], volume.slices[shown].frame_number) + ". " + ", ".join(
        f"{line.cls} {percent(line.probability)} (threshold {percent(line.threshold)})" for line in legend)
    return _capture(volume, prediction, picture.pixels, key="sc", index=index, number=number,
                    originals=originals, shown=shown, revision=revision, series_number=series_number,
                    description=f"Brain window (40/80) with Grad-CAM of {', '.join(classes) or 'none'} from "
                                f"{prediction.model.name} {prediction.model.version}", comments=comments,
                    settings=settings)


def _preliminary(prediction: Prediction) -> list[str]:
    """Burned in above everything on a result of a possibly incomplete series: a viewer may show only pixels."""
    return [INCOMPLETE_SERIES_LINE] if prediction.incomplete else []


def explained_first(prediction: Prediction) -> list[int]:
    """Positive slices, those with heatmaps first (the model explains only its top slices, ranked its
    own way; a capture of a positive slice without its heat would show less than the one beside it)."""
    chosen = positive_slices(prediction)
    heated = {i for i, _ in prediction.heatmaps}
    return [i for i in chosen if i in heated] + [i for i in chosen if i not in heated]


def key_slice(prediction: Prediction) -> int:
    """The summary's slice: the most probable explained positive one, the middle one of a negative series."""
    chosen = explained_first(prediction)
    return chosen[0] if chosen else len(prediction.slice_probabilities) // 2


def _summary_capture(volume: Volume, prediction: Prediction, groups: list[list[int]], revision: int,
                     series_number: int, analysed_at: datetime, settings: str) -> Dataset:
    index = key_slice(prediction)
    originals = groups[index]
    shown = originals[len(originals) // 2]
    present = prediction.positive_classes()
    heat = {c: prediction.heatmaps[(index, c)] for c in shown_classes(prediction, index)
            if (index, c) in prediction.heatmaps}
    lines = [c for c in present if c != "any"] or ["any"]
    legend = [LegendLine(c, prediction.series_probability(c), prediction.threshold(c)) for c in lines]
    ds = volume.headers[shown]
    where = source_line(ds, volume.slices[shown].frame_number)
    header = [finding_words(prediction) + ".", f"{volume.n_slices} images analysed. Shown: {where}"]
    picture = render(volume.hu[shown], heat, legend, _preliminary(prediction) + header, edge_letters(ds),
                     footer=[_model_line(prediction, analysed_at, bool(heat))])
    return _capture(volume, prediction, picture.pixels, key="sc-summary", index=0, number=1,
                    originals=originals, shown=shown, revision=revision, series_number=series_number,
                    description=f"Summary of {prediction.model.name} {prediction.model.version}: "
                                f"{finding_words(prediction)}", comments=header[0] + " " + header[1],
                    settings=settings)


def build_secondary_captures(volume: Volume, prediction: Prediction, *, max_images: int = 16,
                             slice_groups: Sequence[Sequence[int]] | None = None, revision: int = 0,
                             series_number: int | None = None, analysed_at: datetime | None = None,
                             settings: str | None = None) -> list[Dataset]:
    """The summary capture, then one per positive slice (highest `any` probability first, at most
    max_images, in body order).

    `settings` is the ResultSettings key for the UIDs (default: the prediction's thresholds and this cap);
    the series number defaults to result_series_numbers' (source series, revision).
    """
    groups = check_groups(volume, prediction, slice_groups)
    if settings is None:
        settings = ResultSettings(prediction.model.thresholds, max_secondary_captures=max_images).key()
    if series_number is None:
        series_number = result_series_numbers(volume.headers[0].get("SeriesNumber"), revision)[1]
    analysed_at = analysed_at or datetime.now(UTC)
    chosen = explained_first(prediction)[:max(0, int(max_images))]
    # Instance order follows the body (slice order), so scrolling the SC series moves head-to-foot too.
    chosen.sort()
    summary = _summary_capture(volume, prediction, groups, revision, series_number, analysed_at, settings)
    return [summary] + [_slice_capture(volume, prediction, index, number + 2, groups[index], revision,
                                       series_number, analysed_at, settings) for number, index in enumerate(chosen)]
