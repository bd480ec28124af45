"""Grad-CAM secondary captures: one RGB image per positive slice, in their own series of the source study.

Each shows the brain-window slice at source resolution with the heatmaps of all classes positive on it
(the paper's readers found single-class maps incomplete), a legend and a burned-in warning.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE, SUBTYPES
from ihd_node.dicom.volume import Volume
from ihd_node.prediction import Prediction
from ihd_node.report.overlay import render
from ihd_node.report.source import (
    MANUFACTURER,
    check_groups,
    contributing_equipment,
    positive_slices,
    series_description,
    set_character_set,
    with_type2,
)
from ihd_node.report.sr import PRELIMINARY_LINE
from ihd_node.report.uids import result_uid

SC_SERIES_DESCRIPTION = f"ICH AI Grad-CAM - {NOT_FOR_DIAGNOSTIC_USE}"


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Row/column directions as PatientOrientation letters (dominant axis), required for PATIENT frames."""
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letter(vec: list[float]) -> str:
        axis = int(np.argmax(np.abs(vec)))
        positive = vec[axis] >= 0
        return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]

    return letter(iop[:3]), letter(iop[3:])


def shown_classes(prediction: Prediction, index: int) -> list[str]:
    """Classes to draw on one slice: the positive subtypes; `any` alone when no subtype is positive."""
    present = prediction.slice_positive_classes(index)
    subtypes = [c for c in SUBTYPES if c in present]
    return subtypes or [c for c in present if c == "any"]


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


def _one_capture(volume: Volume, prediction: Prediction, index: int, number: int, originals: list[int],
                 revision: int, series_number: int) -> Dataset:
    """The capture of model slice `index` (instance `number` + 1 of the SC series)."""
    model = prediction.model
    shown = originals[len(originals) // 2]  # for a slab, the middle original slice carries the picture
    probs = prediction.slice_probability_dict(index)
    classes = shown_classes(prediction, index)
    heat = {c: prediction.heatmaps[(index, c)] for c in classes if (index, c) in prediction.heatmaps}
    legend = [("any", probs["any"])] + [(c, probs[c]) for c in classes if c != "any"]
    title = f"ICH AI {model.name} {model.version} - image {shown + 1}/{volume.n_slices}"[:80]
    if prediction.incomplete:  # burned in: a viewer may show nothing but the pixels
        title = f"{PRELIMINARY_LINE} - {title}"
    pixels = render(volume.hu[shown], heat, legend, title)

    ref = with_type2(volume.headers[shown])
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(volume.series_instance_uid, model.name, model.version, "sc-series",
                                       0, revision),
        series_number=series_number,
        # Keyed by the model slice, so the capture of one slice keeps its UID whatever else is shown.
        sop_instance_uid=result_uid(volume.series_instance_uid, model.name, model.version, "sc",
                                    index, revision),
        instance_number=number + 1,
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
    sc.DerivationDescription = (f"Brain window (40/80) with Grad-CAM of {', '.join(classes) or 'none'} "
                                f"from {model.name} {model.version}; {NOT_FOR_DIAGNOSTIC_USE}")[:1024]
    sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}. " + ", ".join(f"{c} {p:.2f}" for c, p in legend)
    if prediction.incomplete:
        sc.ImageComments = f"{PRELIMINARY_LINE}: {prediction.incomplete}"[:9000] + ". " + sc.ImageComments
    sc.SourceImageSequence = _references(volume, originals)
    sc.ReferencedImageSequence = _references(volume, [shown])
    set_character_set(sc, volume.headers[shown])
    return sc


def build_secondary_captures(volume: Volume, prediction: Prediction, *, max_images: int = 16,
                             slice_groups: Sequence[Sequence[int]] | None = None, revision: int = 0,
                             series_number: int = 9902) -> list[Dataset]:
    """One SC per positive slice, highest `any` probability first, at most max_images; none when negative."""
    groups = check_groups(volume, prediction, slice_groups)
    chosen = positive_slices(prediction)[:max(0, int(max_images))]
    # Instance order follows the body (slice order), so scrolling the SC series moves head-to-foot too.
    chosen.sort()
    return [_one_capture(volume, prediction, index, number, groups[index], revision, series_number)
            for number, index in enumerate(chosen)]

