"""The AI result as a Comprehensive 3D SR with TID 1500 (Measurement Report) as root, as IHE AIR asks.

One TID 1501 group per class (ICH and the five subtypes): tracking identifier, finding type, algorithm
(TID 4019: name, version, threshold), Present/Absent, the probability, and the source images that carry
the finding (for slabs, every original slice of the slab). Absent findings reference no images; all
evaluated images are still listed as evidence (Current Requested Procedure Evidence Sequence).

Codes (the README documents them):

    any               SCT 1386000    Intracranial hemorrhage        (DICOM/pydicom code dictionary)
    subarachnoid      SCT 21454007   Subarachnoid hemorrhage        (FSN "Subarachnoid intracranial
                                                                     hemorrhage"; tx.fhir.org expansion)
    intraparenchymal  SCT 274100004  Cerebral hemorrhage            (tx.fhir.org expansion)
    subdural          SCT 35486000   Subdural hemorrhage            (FSN "Subdural intracranial hemorrhage";
                                                                     several public code tables agree)
    epidural          99IHD EDH      Epidural hemorrhage            private: SNOMED code not verified
    intraventricular  99IHD IVH      Intraventricular hemorrhage    private: SNOMED code not verified
    procedure         SCT 303653007  Computed tomography of head
    present/absent    SCT 52101004 "Present" / SCT 272519000 "Absent" (CID 241 Present/Absent Only)
    finding site      SCT 128319008  Intracranial structure         (CID 7140; pydicom code dictionary)
    probability       DCM 122157 "Probability", unit UCUM "{probability}"
    free-text note    UMLS C0034375 "Qualitative Evaluations" container, DCM 121106 "Comment"
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ihd_node.classes import CLASSES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.dicom.volume import Volume
from ihd_node.prediction import Prediction
from ihd_node.report.source import (
    MANUFACTURER,
    check_groups,
    contributing_equipment,
    series_description,
    set_character_set,
    with_type2,
)
from ihd_node.report.uids import result_uid

PRIVATE_SCHEME = "99IHD"

FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
    "epidural": hd.sr.CodedConcept("EDH", PRIVATE_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid hemorrhage"),
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural hemorrhage"),
}
PROCEDURE_REPORTED = hd.sr.CodedConcept("303653007", "SCT", "Computed tomography of head")
# CID 241 "Present/Absent Only" (PS3.16): the SNOMED CT codes that replace the retired DCM 121053/121054.
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
# Where every finding lies (CID 7140 "Brain Structures for Reporting"); one site for all six classes.
FINDING_SITE = hd.sr.CodedConcept("128319008", "SCT", "Intracranial structure")
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "Probability")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

SR_SERIES_DESCRIPTION = f"ICH AI Results - {NOT_FOR_DIAGNOSTIC_USE}"
PRELIMINARY_LINE = "PRELIMINARY - series may be incomplete"


def _source_images(volume: Volume, prediction: Prediction, cls: str,
                   groups: list[list[int]]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """The original slices carrying a present finding (all slices of each positive slab)."""
    model_slices = prediction.positive_slices(cls)
    if not model_slices:
        # The series is called positive but no single slice reached the threshold: point at the best one.
        model_slices = [int(prediction.slice_probabilities[:, CLASSES.index(cls)].argmax())]
    originals = sorted({o for m in model_slices for o in groups[m]})
    slices = [volume.slices[o] for o in originals]
    return [hd.sr.SourceImageForMeasurementGroup(
        s.sop_class_uid, s.sop_instance_uid,
        referenced_frame_numbers=None if s.frame_number is None else [s.frame_number])  # Enhanced CT frame
        for s in slices]


def _finding_group(volume: Volume, prediction: Prediction, cls: str, groups: list[list[int]],
                   revision: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    model = prediction.model
    present = cls in prediction.positive_classes()  # the consistency rule lives in Prediction
    concept = FINDING_CODES[cls]
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version,
        parameters=[f"threshold={prediction.threshold(cls):.4f}"],
    )
    tracking = hd.sr.TrackingIdentifier(
        uid=result_uid(volume.series_instance_uid, model.name, model.version, "tracking",
                       CLASSES.index(cls), revision),
        identifier=f"ICH AI finding {cls}",
    )
    probability = hd.sr.Measurement(
        name=codes.DCM.Probability, value=round(prediction.series_probability(cls), 6),
        unit=PROBABILITY_UNIT,
    )
    evaluation = hd.sr.QualitativeEvaluation(
        name=concept, value=PRESENT if present else ABSENT,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=[evaluation],
        finding_sites=[hd.sr.FindingSite(anatomic_location=FINDING_SITE)],
        source_images=_source_images(volume, prediction, cls, groups) if present else None,
    )


def summary_text(prediction: Prediction) -> str:
    """One readable sentence for the report and for people who only see the text rendering."""
    positive = prediction.positive_classes()
    model = prediction.model
    if positive:
        found = ", ".join(f"{c} ({prediction.series_probability(c):.2f})" for c in positive)
        finding = f"Algorithm findings: {found}."
    else:
        finding = "No intracranial hemorrhage detected by the algorithm (all findings absent)."
    text = (f"{NOT_FOR_DIAGNOSTIC_USE}. Research software output from {model.name} {model.version}, "
            f"not verified by a physician. {finding}")
    if prediction.incomplete:
        text = f"{PRELIMINARY_LINE}: {prediction.incomplete}. {text}"
    if prediction.replaces_preliminary:
        text += (f" This result, on the complete series, replaces the PRELIMINARY result "
                 f"{prediction.replaces_preliminary}.")
    return text


def _note_container(prediction: Prediction) -> hd.sr.ContainerContentItem:
    """TID 1500 'Qualitative Evaluations' container with the not-for-diagnostic-use statement."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = [hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=summary_text(prediction),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )]
    return container


def build_sr(volume: Volume, prediction: Prediction, *, series_number: int = 9901, instance_number: int = 1,
             revision: int = 0, predecessor: Dataset | None = None,
             slice_groups: Sequence[Sequence[int]] | None = None, institution_name: str | None = None,
             institutional_department_name: str | None = None) -> Dataset:
    """The SR for one analysed series, in the source study, in its own (deterministic) series."""
    groups = check_groups(volume, prediction, slice_groups)
    model = prediction.model
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid(volume.series_instance_uid, model.name, model.version, "device"),
        name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=model.name[:64],
        serial_number=model.version[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.cid270.Device,
                                                      observer_identifying_attributes=device),
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[_finding_group(volume, prediction, cls, groups, revision) for cls in CLASSES],
    )
    report[0].ContentSequence.append(_note_container(prediction))

    evidence = [with_type2(volume.headers[0]), *volume.headers[1:]]
    uid = result_uid(volume.series_instance_uid, model.name, model.version, "sr", 0, revision)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=result_uid(volume.series_instance_uid, model.name, model.version, "sr-series",
                                       0, revision),
        series_number=series_number,
        sop_instance_uid=uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=prediction.incomplete is None,  # CompletionFlag PARTIAL for a PRELIMINARY result
        is_final=False,  # PreliminaryFlag PRELIMINARY: no physician has verified it
        is_verified=False,  # VerificationFlag UNVERIFIED
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[contributing_equipment(prediction)],
    )
    sr.SeriesDescription = series_description(SR_SERIES_DESCRIPTION, revision)
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    set_character_set(sr, volume.headers[0])
    return sr


def _private_scheme() -> Dataset:
    """Declares the private coding scheme, as PS3.3 C.12.1 asks of any scheme not in PS3.16."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "ihd-node private codes for ICH subtypes"
    item.CodingSchemeResponsibleOrganization = "ihd-node project"
    return item
