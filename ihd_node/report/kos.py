"""Key Object Selection documents (PS3.3 A.35.4, TID 2010): key images, and IHE IOCM rejection notes.

- `key_images`: "Of Interest" (DCM 113000), the source slices on which the model found something, so a
  PACS key-image view opens on them (instance and, for an Enhanced CT source, frame number).
- `rejection_note`: "Rejected for Patient Safety Reasons" (DCM 113037), listing result objects the node
  sent and now retracts (IHE IOCM): a PACS that supports IOCM hides them.
- `key_object_selection`: the generic builder both use (highdicom's KeyObjectSelectionDocument, with the
  frame numbers highdicom does not write added to the image references).

Every document is in the source's study, in its own series, with the source's patient and study
identity (as the SR and the captures), and says "NOT FOR DIAGNOSTIC USE" in its description. UIDs not
given are derived from what the document lists, so building it again gives the same document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE
from ihd_node.report.source import (
    MANUFACTURER,
    TYPE2_SOURCE_ATTRIBUTES,
    check_groups,
    contributing_equipment,
    finish_result,
    positive_slices,
    series_description,
    with_type2,
)
from ihd_node.uids import ResultSettings, derived_uid, result_series_number, result_uid
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
OF_INTEREST = codes.DCM.OfInterest  # DCM 113000
REJECTED_FOR_PATIENT_SAFETY = codes.DCM.RejectedForPatientSafetyReasons  # DCM 113037
KEY_IMAGES_SERIES_DESCRIPTION = f"ICH AI Key Images - {NOT_FOR_DIAGNOSTIC_USE}"
REJECTION_SERIES_DESCRIPTION = f"ICH AI Results withdrawn - {NOT_FOR_DIAGNOSTIC_USE}"
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def _references(referenced: Sequence[Dataset]) -> list[Dataset]:
    """One minimal header per referenced instance (first seen order): its UIDs, and Rows/Columns for an
    image (highdicom then writes an IMAGE item, else a COMPOSITE one). A multi-frame source flattened
    into one header per frame appears once."""
    seen: dict[str, Dataset] = {}
    for ds in referenced:
        missing = [k for k in _UIDS if not str(ds.get(k, "") or "").strip()]
        if missing:
            raise ValueError(f"a referenced object lacks {', '.join(missing)}; pass the headers of the "
                             "instances to list (the objects themselves or their header copies)")
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue
        ref = Dataset()
        for keyword in _UIDS:
            setattr(ref, keyword, str(ds[keyword].value))
        if "Rows" in ds and "Columns" in ds:
            ref.Rows, ref.Columns = ds.Rows, ds.Columns
        seen[uid] = ref
    return list(seen.values())


def _add_frames(kos: Dataset, frames: Mapping[str, Sequence[int]]) -> None:
    """Referenced Frame Number on the image items of the listed multi-frame instances (TID 2010 IMAGE)."""
    for item in kos.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        ref = item.ReferencedSOPSequence[0]
        numbers = sorted({int(n) for n in frames.get(str(ref.ReferencedSOPInstanceUID), ())})
        if numbers:
            ref.ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]


def key_object_selection(source_header: Dataset, referenced: Sequence[Dataset], *, title: Code | hd.sr.CodedConcept,
                         description: str, series_number: int, instance_number: int = 1,
                         sop_instance_uid: str | None = None, series_instance_uid: str | None = None,
                         frames: Mapping[str, Sequence[int]] | None = None,
                         series_text: str | None = None,
                         equipment: Sequence[hd.ContributingEquipment] | None = None) -> Dataset:
    """A Key Object Selection document in the source's study listing `referenced` under `title`.

    `referenced`: headers of the instances to list (SOP class/instance, series and study UIDs; all in the
    source's study); `frames`: per SOP Instance UID the frame numbers to name (multi-frame images).
    `description` goes into the Key Object Description item, with "NOT FOR DIAGNOSTIC USE" appended when
    it does not say so; `series_text` is the SeriesDescription (default: the title, not for diagnostic use).
    Without UIDs given, they are derived from the title, the study and what is listed.
    """
    refs = _references(referenced)
    if not refs:
        raise ValueError("a key object selection must list at least one object")
    study = str(source_header.StudyInstanceUID)
    others = sorted({str(r.StudyInstanceUID) for r in refs} - {study})
    if others:
        raise ValueError(f"referenced objects are in study {', '.join(others)}, not the source's {study}; "
                         "a key object selection lists objects of its own study only")
    frames = {str(k): [int(n) for n in v] for k, v in (frames or {}).items()}
    title_code = hd.sr.CodedConcept(title.value, title.scheme_designator, title.meaning)
    if NOT_FOR_DIAGNOSTIC_USE.lower() not in description.lower():
        description = f"{description.rstrip()} {NOT_FOR_DIAGNOSTIC_USE}".strip()
    listed = [(str(r.SOPInstanceUID), tuple(sorted(set(frames.get(str(r.SOPInstanceUID), ()))))) for r in refs]
    if sop_instance_uid is None:
        sop_instance_uid = derived_uid("ihd-node", "kos", study, title_code.value, title_code.scheme_designator,
                                       description, sorted(listed))
    if series_instance_uid is None:
        series_instance_uid = derived_uid("ihd-node", "kos-series", study, title_code.value,
                                          title_code.scheme_designator, sorted(listed))
    # highdicom takes the patient and study from the first evidence item: the source's (decoded) identity.
    identity = with_type2(source_header)
    first = Dataset()
    first.update(refs[0])
    for keyword in ("SpecificCharacterSet", *TYPE2_SOURCE_ATTRIBUTES):
        if keyword in identity:
            first[keyword] = identity[keyword]
    content = hd.ko.KeyObjectSelection(document_title=title_code, referenced_objects=refs,
                                       description=description[:1024])
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[first, *refs[1:]], content=content, series_instance_uid=series_instance_uid,
        series_number=int(series_number), sop_instance_uid=sop_instance_uid, instance_number=int(instance_number),
        manufacturer=MANUFACTURER, contributing_equipment=list(equipment) if equipment else None,
    )
    _add_frames(kos, frames)
    kos.SeriesDescription = (series_text or f"ICH AI {title_code.meaning} - {NOT_FOR_DIAGNOSTIC_USE}")[:64]
    finish_result(kos, source_header)
    return kos


def incomplete_series_text(prediction: Prediction) -> str:
    """'INCOMPLETE SERIES: <why>.' for a result on a series that may be incomplete, else ''."""
    return f"INCOMPLETE SERIES: {prediction.incomplete}." if prediction.incomplete else ""


def key_image_slices(volume: Volume, prediction: Prediction,
                     slice_groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The original slices (volume order) of every model slice where a finding is present."""
    groups = check_groups(volume, prediction, slice_groups)
    return sorted({o for m in positive_slices(prediction) for o in groups[m]})


def key_images(volume: Volume, prediction: Prediction, *, slice_groups: Sequence[Sequence[int]] | None = None,
               revision: int = 0, settings: str | None = None, series_number: int | None = None) -> Dataset | None:
    """"Of Interest" (DCM 113000) listing the source slices with findings (instance, and frame of an
    Enhanced CT); None when no slice has a finding (a negative series has no key images)."""
    chosen = key_image_slices(volume, prediction, slice_groups)
    if not chosen:
        return None
    model = prediction.model
    if settings is None:
        settings = ResultSettings(model.thresholds).key()
    if series_number is None:
        series_number = result_series_number(volume.headers[0].get("SeriesNumber"), revision, "kos")
    frames: dict[str, list[int]] = {}
    for o in chosen:
        s = volume.slices[o]
        if s.frame_number is not None:
            frames.setdefault(s.sop_instance_uid, []).append(s.frame_number)
    classes = [c for c in prediction.positive_classes() if c != "any"] or ["type not determined"]
    description = (f"Images where {model.name} {model.version} suspects intracranial hemorrhage "
                   f"({', '.join(classes)}); research software output, not verified by a physician.")
    description = " ".join(t for t in (incomplete_series_text(prediction), description) if t)
    uid_of = lambda role: result_uid(volume.series_instance_uid, model.name, model.version, role, 0,  # noqa: E731
                                     revision, settings=settings)
    return key_object_selection(
        volume.headers[0], [volume.headers[o] for o in chosen], title=OF_INTEREST, description=description,
        series_number=series_number, instance_number=revision + 1, sop_instance_uid=uid_of("kos"),
        series_instance_uid=uid_of("kos-series"), frames=frames,
        series_text=series_description(KEY_IMAGES_SERIES_DESCRIPTION, revision),
        equipment=[contributing_equipment(prediction)],
    )


def rejection_note(source_header: Dataset, rejected: Sequence[Dataset], *, reason: str, series_number: int,
                   instance_number: int = 1, sop_instance_uid: str | None = None,
                   series_instance_uid: str | None = None) -> Dataset:
    """IHE IOCM rejection note: "Rejected for Patient Safety Reasons" (DCM 113037) listing `rejected`
    (the node's SR, captures, SEG, KOS of one result set), in the source's study, in its own series.

    `reason` goes into the Key Object Description (a person reads it: why the results were withdrawn).
    """
    return key_object_selection(
        source_header, rejected, title=REJECTED_FOR_PATIENT_SAFETY,
        description=f"AI results withdrawn: {reason.strip() or 'no reason given'}.",
        series_number=series_number, instance_number=instance_number, sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid, series_text=REJECTION_SERIES_DESCRIPTION,
    )
