"""The AI result as an SR with TID 1500 (Measurement Report) as root, as IHE AI Results asks.

The content tree (findings.py builds the groups, library.py the Image Library, summary.py the text):

    Imaging Measurement Report (DCM 126000, TID 1500)
      Language; Observer Type Device (TID 1004: UID, name, manufacturer, model, serial = model version)
      Procedure reported: Computed tomography of head
      Image Library (TID 1600) > Image Library Group per frame of reference > one entry per evaluated
        image, or per frame of a multi-frame instance (ReferencedFrameNumber), with its descriptors
      Imaging Measurements (DCM 126010)
        Measurement Group (TID 1410) per present finding and key slice: outline (SCOORD POLYLINE on the
          source image/frame), tracking identifier "Subdural hemorrhage 97 %", slice probability (%), Present
        Measurement Group (TID 1501) x 6 (ICH, five subtypes), no coordinates: finding, algorithm,
          finding site, source images/frames (present only), Probability (%), Present/Absent
      Qualitative Evaluations (UMLS C0034375): Comment (the summary), finding = Present/Absent x 6

PreliminaryFlag is always PRELIMINARY (no physician verified the result); CompletionFlag PARTIAL and the
words "INCOMPLETE SERIES" mark a result of a series analysed before all its images may have arrived.

With only 2D SCOORD regions the same content is valid as Comprehensive 3D SR (the default), Comprehensive
SR and Enhanced SR; `as_sr_class` re-labels a built SR for a PACS that accepts only an older class.

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
    probability       DCM 122157 "Probability", unit UCUM "%" (percent)
    free-text note    UMLS C0034375 "Qualitative Evaluations" container, DCM 121106 "Comment"
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ihd_node.classes import CLASSES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.report.codes import (  # noqa: F401 (FINDING_CODES and PRIVATE_SCHEME are read through sr too)
    FINDING_CODES,
    PRIVATE_SCHEME,
    PROCEDURE_REPORTED,
)
from ihd_node.report.findings import evaluations_container, finding_group, region_groups, region_label  # noqa: F401
from ihd_node.report.library import CONTENT_SEQUENCE, image_library  # noqa: F401
from ihd_node.report.source import (
    MANUFACTURER,
    check_groups,
    contributing_equipment,
    finish_result,
    series_description,
    with_type2,
)
from ihd_node.report.summary import lossy_text, reported_classes, summary_text  # noqa: F401
from ihd_node.sr_classes import SR_CLASSES, as_sr_class
from ihd_node.uids import ResultSettings, result_series_numbers, result_uid
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

SR_SERIES_DESCRIPTION = f"ICH AI Results - {NOT_FOR_DIAGNOSTIC_USE}"


def build_sr(volume: Volume, prediction: Prediction, *, series_number: int | None = None,
             instance_number: int = 1, revision: int = 0, predecessor: Dataset | None = None,
             slice_groups: Sequence[Sequence[int]] | None = None, institution_name: str | None = None,
             institutional_department_name: str | None = None, sr_class: str = "comprehensive3d",
             settings: str | None = None, site: str = "") -> Dataset:
    """The SR for one analysed series, in the source study, in its own (deterministic) series.

    `settings` is the ResultSettings key for the UIDs (default: the prediction's thresholds, default
    cap and slabs); `site` the installation's site value for the Device Observer UID; the series number
    defaults to result_series_numbers' (source series, revision).
    """
    if sr_class not in SR_CLASSES:
        raise ValueError(f"unknown SR class {sr_class!r}; use one of {', '.join(SR_CLASSES)}")
    groups = check_groups(volume, prediction, slice_groups)
    model = prediction.model
    if settings is None:
        settings = ResultSettings(prediction.model.thresholds).key()
    if series_number is None:
        series_number = result_series_numbers(volume.headers[0].get("SeriesNumber"), revision)[0]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid(volume.series_instance_uid, model.name, model.version, "device", site=site),
        name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=model.name[:64],
        serial_number=model.version[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.cid270.Device,
                                                      observer_identifying_attributes=device),
    )
    # Regions first: OHIF's SR viewport opens the first measurement, which must be an outline (see README).
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[*region_groups(volume, prediction, groups, revision, settings),
                              *[finding_group(volume, prediction, cls, groups, revision, settings)
                                for cls in CLASSES]],
        referenced_images=None,  # the Image Library is put in below (image_library)
    )
    items = list(report[0].ContentSequence)
    # TID 1600 Image Library: every evaluated image (frame), after Procedure Reported, before Imaging
    # Measurements (the last item highdicom wrote); the Qualitative Evaluations container goes last.
    items.insert(len(items) - 1, image_library(volume.headers, [s.frame_number for s in volume.slices]))
    items.append(evaluations_container(volume, prediction, groups))
    report[0]["ContentSequence"] = DataElement(CONTENT_SEQUENCE, "SQ", items)  # plain: not all hd items

    evidence = [with_type2(volume.headers[0]), *volume.headers[1:]]
    uid = result_uid(volume.series_instance_uid, model.name, model.version, "sr", 0, revision,
                     settings=settings)
    sr = comprehensive_3d_sr(
        evidence=evidence,
        content=report[0],
        series_instance_uid=result_uid(volume.series_instance_uid, model.name, model.version, "sr-series",
                                       0, revision, settings=settings),
        series_number=series_number,
        sop_instance_uid=uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=prediction.incomplete is None,  # CompletionFlag PARTIAL: INCOMPLETE SERIES
        is_final=False,  # PreliminaryFlag PRELIMINARY: no physician has verified it
        is_verified=False,  # VerificationFlag UNVERIFIED
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[contributing_equipment(prediction)],
    )
    sr.SeriesDescription = series_description(SR_SERIES_DESCRIPTION, revision)
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    finish_result(sr, volume.headers[0])
    return as_sr_class(sr, sr_class) if sr_class != "comprehensive3d" else sr


def comprehensive_3d_sr(*, evidence: Sequence[Dataset], content: Dataset, **kwargs: object) -> hd.sr.Comprehensive3DSR:
    """hd.sr.Comprehensive3DSR(evidence, content, ...) as a data set, without highdicom's copy of the tree.

    highdicom deep-copies the whole content tree and parses the copy into its own objects (for the
    `.content` property, which the node never reads), and searches the tree for references it then only
    checks against the evidence: on a 32-slice study 60 % of the report's time, growing with the Image
    Library's one entry per slice. It is handed the root container without its children here, and the
    children are put in afterwards: the data set is the same element for element (test_report_sr checks
    it against the plain call). Its `.content` holds the root only. The evidence sequences come from
    `evidence` alone, and every image the content references is one of them by construction (regions and
    library entries are made from the volume's slices, all of which are evidence).
    """
    shell = Dataset()
    for elem in content:
        if elem.keyword != "ContentSequence":
            shell.add(elem)
    shell.ContentSequence = []  # highdicom's reference search wants the attribute
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=shell, **kwargs)  # type: ignore[arg-type]
    if "ContentSequence" in content:
        sr["ContentSequence"] = content["ContentSequence"]  # the same element highdicom would have put in
    return sr


def _private_scheme() -> Dataset:
    """Declares the private coding scheme, as PS3.3 C.12.1 asks of any scheme not in PS3.16."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "ihd-node private codes for ICH subtypes"
    item.CodingSchemeResponsibleOrganization = "ihd-node project"
    return item
