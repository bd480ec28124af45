"""The result as the clinical systems read it: one typed value that the HL7 ORU and the FHIR bundle are built from.

Everything about the patient and the study comes from the SR's header (the SR repeats the source CT's
identity attributes, see source.finish_result), the findings from the Prediction (positive_mask's one rule),
and the images behind each present finding from the volume's per-slice headers, exactly as the SR lists
them (every original slice of each positive model slice or slab; the best slice when the series is called
positive but no single slice reached the threshold). No pixel data, no torch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ihd_node.classes import CLASSES
from ihd_node.report.codes import FINDING_CODES, PRESENT
from ihd_node.report.source import check_groups, timezone_of
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

FINDING_CONCEPT = "121071"  # DCM "Finding": the finding type of a TID 1501 group
TRACKING_UID_CONCEPT = "112040"  # DCM "Tracking Unique Identifier"
MEASUREMENT_GROUP = "125007"  # DCM "Measurement Group"


@dataclass(frozen=True)
class SliceRef:
    """One source image (or frame) that carries a present finding."""

    sop_instance_uid: str
    instance_number: int | None
    frame_number: int | None
    series_number: int | None

    def label(self) -> str:
        """'image 14 of series 2', 'image 1 frame 7 of series 3' (the words of the SR summary)."""
        text = f"image {self.instance_number}" if self.instance_number is not None else "image"
        if self.frame_number is not None:
            text += f" frame {self.frame_number}"
        if self.series_number is not None:
            text += f" of series {self.series_number}"
        return text if text != "image" else f"image {self.sop_instance_uid}"


def _ranges(numbers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out: list[str] = []
    values = sorted(set(numbers))
    start = prev = values[0]
    for n in [*values[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def slices_text(slices: Sequence[SliceRef]) -> str:
    """The slices of one finding in a line a doctor reads: 'images 3-5, 9 of series 2',
    'image 1 frames 5-9 of series 3' (instance numbers as the source has them)."""
    by_series: dict[int | None, list[SliceRef]] = {}
    for s in slices:
        by_series.setdefault(s.series_number, []).append(s)
    parts = []
    for series, refs in by_series.items():
        where = f" of series {series}" if series is not None else ""
        unnumbered = [s.sop_instance_uid for s in refs if s.instance_number is None]
        plain = [s.instance_number for s in refs if s.instance_number is not None and s.frame_number is None]
        framed: dict[int, list[int]] = {}
        for s in refs:
            if s.instance_number is not None and s.frame_number is not None:
                framed.setdefault(s.instance_number, []).append(s.frame_number)
        if plain:
            parts.append(f"{'image' if len(plain) == 1 else 'images'} {_ranges(plain)}{where}")
        for number, frames in sorted(framed.items()):
            parts.append(f"image {number} {'frame' if len(frames) == 1 else 'frames'} {_ranges(frames)}{where}")
        parts.extend(f"image {uid}{where}" for uid in unnumbered)
    return "; ".join(parts)


@dataclass(frozen=True)
class ClassFinding:
    """One of the six outputs: present or absent by positive_mask, its series probability and threshold."""

    cls: str
    present: bool
    probability: float
    threshold: float
    slices: tuple[SliceRef, ...]  # empty for an absent finding
    tracking_uid: str = ""  # the TID 1501 group's Tracking Unique Identifier in the SR ("" if not found)


@dataclass(frozen=True)
class CodeTriple:
    """A code as DICOM writes it (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ClinicalResult:
    """What the HL7 and FHIR messages say about one analysed series; made by clinical_result()."""

    patient_id: str
    issuer_of_patient_id: str  # (0010,0021), "" when the study has none
    patient_name: str  # DICOM PN: "Yamada^Tarou=山田^太郎=やまだ^たろう"
    birth_date: str  # YYYYMMDD or ""
    sex: str  # M, F, O or ""
    accession_number: str
    study_instance_uid: str
    series_instance_uid: str  # the analysed (source) series
    sr_sop_instance_uid: str
    sr_series_instance_uid: str
    study_date: str  # DICOM DA or ""
    study_time: str  # DICOM TM or ""
    result_datetime: dt.datetime  # aware: when the SR was made
    revision: int
    incomplete: bool  # PRELIMINARY: max_wait ran out with the series possibly incomplete
    findings: tuple[ClassFinding, ...]  # six, in CLASSES order
    summary: str  # the SR's summary text (says not for diagnostic use)
    model_name: str
    model_version: str
    timezone_offset: str = ""  # the study's TimezoneOffsetFromUTC ("+0900"), "" when it has none
    # (0010,0024) Issuer of Patient ID Qualifiers: Universal Entity ID and its type (ISO = an OID, URI, ...)
    issuer_universal_id: str = ""
    issuer_universal_id_type: str = ""
    accession_issuer: str = ""  # Issuer of Accession Number: Local Namespace Entity ID
    accession_issuer_universal_id: str = ""
    accession_issuer_universal_id_type: str = ""
    placer_order_number: str = ""  # (0040,2016) when the source header carries it
    filler_order_number: str = ""  # (0040,2017) when the source header carries it
    requested_procedure_id: str = ""  # (0040,1001) from the Request Attributes Sequence
    procedure_code: CodeTriple | None = None  # the study's Procedure Code Sequence, first item
    study_description: str = ""
    sr_sop_class_uid: str = ""
    series_number: int | None = None  # of the analysed series

    @property
    def positive_classes(self) -> list[str]:
        return [f.cls for f in self.findings if f.present]

    @property
    def hemorrhage(self) -> bool:
        """Any hemorrhage present (what makes the worklist priority STAT)."""
        return any(f.present for f in self.findings)

    def finding(self, cls: str) -> ClassFinding:
        return self.findings[CLASSES.index(cls)]

    def study_datetime(self) -> dt.datetime | None:
        """Study date and time as an aware datetime: in the study's offset, else the node's local zone
        (DICOM reads a time that carries no offset as local); None without a study date."""
        date = "".join(ch for ch in self.study_date if ch.isdigit())
        if len(date) != 8:
            return None
        clock = "".join(ch for ch in self.study_time.split(".")[0] if ch.isdigit())
        clock = (clock + "000000")[:6] if clock else "000000"
        try:
            naive = dt.datetime.strptime(date + clock, "%Y%m%d%H%M%S")
        except ValueError:
            return None
        zone = timezone_of(self.timezone_offset)
        return naive.replace(tzinfo=zone) if zone is not None else naive.astimezone()


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _int(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _result_datetime(sr: Dataset) -> dt.datetime:
    """The SR's Content Date/Time (written in the study's offset when it has one); now when unreadable."""
    date, clock = _text(sr, "ContentDate"), _text(sr, "ContentTime").split(".")[0]
    zone = timezone_of(_text(sr, "TimezoneOffsetFromUTC"))
    try:
        naive = dt.datetime.strptime(date + (clock + "000000")[:6], "%Y%m%d%H%M%S")
    except ValueError:
        return dt.datetime.now(dt.UTC)
    return naive.replace(tzinfo=zone) if zone is not None else naive.astimezone()


IMAGE_LIBRARY = "111028"  # DCM "Image Library": one entry per evaluated image, nothing to read here


def _walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    """Every content item, descending into containers only (not into the Image Library, nor into an
    item's own descriptors): the groups and the summary are all a container's children."""
    for item in items:
        yield item
        if item.get("ValueType") == "CONTAINER" and _concept(item) != IMAGE_LIBRARY:
            yield from _walk(item.get("ContentSequence", []))


def _concept(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(keyword)
    return str(seq[0].CodeValue) if seq and "CodeValue" in seq[0] else ""


def tracking_uids(sr: Dataset) -> dict[str, str]:
    """Finding code value -> Tracking UID of its per-class TID 1501 group (groups without an image region)."""
    out: dict[str, str] = {}
    for item in _walk(sr.get("ContentSequence", [])):
        if item.get("ValueType") != "CONTAINER" or _concept(item) != MEASUREMENT_GROUP:
            continue
        children = list(item.get("ContentSequence", []))
        if any(c.get("ValueType") == "SCOORD" for c in children):
            continue  # a region group (TID 1410), not the class's own group
        finding = next((_concept(c, "ConceptCodeSequence") for c in children
                        if c.get("ValueType") == "CODE" and _concept(c) == FINDING_CONCEPT), "")
        uid = next((str(c.UID) for c in children
                    if c.get("ValueType") == "UIDREF" and _concept(c) == TRACKING_UID_CONCEPT), "")
        if finding and uid:
            out.setdefault(finding, uid)
    return out


def _slices(volume: Volume, prediction: Prediction, cls: str, groups: list[list[int]]) -> tuple[SliceRef, ...]:
    """The original slices the SR lists for a present finding (report.sr._source_images' rule)."""
    model_slices = prediction.positive_slices(cls)
    if not model_slices:
        model_slices = [int(prediction.slice_probabilities[:, CLASSES.index(cls)].argmax())]
    originals = sorted({o for m in model_slices for o in groups[m]})
    refs = []
    for o in originals:
        info, header = volume.slices[o], volume.headers[o]
        refs.append(SliceRef(sop_instance_uid=info.sop_instance_uid, instance_number=info.instance_number,
                             frame_number=info.frame_number, series_number=_int(header.get("SeriesNumber"))))
    return tuple(refs)


def _order_numbers(header: Dataset) -> tuple[str, str, str]:
    """Placer and filler order numbers and the requested procedure ID, when the source carries them."""
    placer, filler = _text(header, "PlacerOrderNumberImagingServiceRequest"), \
        _text(header, "FillerOrderNumberImagingServiceRequest")
    for item in header.get("ReferencedRequestSequence", []) or []:
        placer = placer or _text(item, "PlacerOrderNumberImagingServiceRequest")
        filler = filler or _text(item, "FillerOrderNumberImagingServiceRequest")
    requested = _text(header, "RequestedProcedureID")
    for item in header.get("RequestAttributesSequence", []) or []:
        requested = requested or _text(item, "RequestedProcedureID")
    return placer, filler, requested


def clinical_result(sr: Dataset, prediction: Prediction, volume: Volume,
                    slice_groups: list[list[int]] | None, summary: str, *,
                    revision: int | None = None) -> ClinicalResult:
    """The clinical view of one result: `sr` is the built SR (its header names patient, study and UIDs),
    `slice_groups` map model slice -> original slice indices (None: one model slice per original slice),
    `summary` is the SR's summary text; `revision` defaults to the SR's Instance Number - 1 (build_results'
    numbering). Names and texts are read as pydicom decodes them with the SR's character set."""
    groups = check_groups(volume, prediction, slice_groups)
    present = set(prediction.positive_classes())
    tracking = tracking_uids(sr)
    findings = tuple(
        ClassFinding(cls=cls, present=cls in present, probability=round(prediction.series_probability(cls), 6),
                     threshold=prediction.threshold(cls),
                     slices=_slices(volume, prediction, cls, groups) if cls in present else (),
                     tracking_uid=tracking.get(FINDING_CODES[cls].value, ""))
        for cls in CLASSES)
    header = volume.headers[0]
    placer, filler, requested = _order_numbers(header)
    return ClinicalResult(
        **_identity(sr),
        series_instance_uid=volume.series_instance_uid,
        revision=revision if revision is not None else max(0, (_int(sr.get("InstanceNumber")) or 1) - 1),
        incomplete=prediction.incomplete is not None,
        findings=findings,
        summary=summary,
        model_name=prediction.model.name,
        model_version=prediction.model.version,
        placer_order_number=placer,
        filler_order_number=filler,
        requested_procedure_id=requested,
        series_number=_int(header.get("SeriesNumber")),
    )


def _identity(sr: Dataset) -> dict:
    """Patient, study and SR attributes of a ClinicalResult, from the SR's header."""
    issuer_q = _first_item(sr, "IssuerOfPatientIDQualifiersSequence")
    accession_q = _first_item(sr, "IssuerOfAccessionNumberSequence")
    procedure = _first_item(sr, "ProcedureCodeSequence")
    return dict(
        patient_id=_text(sr, "PatientID"),
        issuer_of_patient_id=_text(sr, "IssuerOfPatientID"),
        patient_name=str(sr.get("PatientName", "") or ""),
        birth_date=_text(sr, "PatientBirthDate"),
        sex=_text(sr, "PatientSex").upper(),
        accession_number=_text(sr, "AccessionNumber"),
        study_instance_uid=_text(sr, "StudyInstanceUID"),
        sr_sop_instance_uid=_text(sr, "SOPInstanceUID"),
        sr_series_instance_uid=_text(sr, "SeriesInstanceUID"),
        study_date=_text(sr, "StudyDate"),
        study_time=_text(sr, "StudyTime"),
        result_datetime=_result_datetime(sr),
        timezone_offset=_text(sr, "TimezoneOffsetFromUTC"),
        issuer_universal_id=_text(issuer_q, "UniversalEntityID") if issuer_q else "",
        issuer_universal_id_type=_text(issuer_q, "UniversalEntityIDType") if issuer_q else "",
        accession_issuer=_text(accession_q, "LocalNamespaceEntityID") if accession_q else "",
        accession_issuer_universal_id=_text(accession_q, "UniversalEntityID") if accession_q else "",
        accession_issuer_universal_id_type=_text(accession_q, "UniversalEntityIDType") if accession_q else "",
        procedure_code=CodeTriple(_text(procedure, "CodeValue"), _text(procedure, "CodingSchemeDesignator"),
                                  _text(procedure, "CodeMeaning"))
        if procedure is not None and _text(procedure, "CodeValue") else None,
        study_description=_text(sr, "StudyDescription"),
        sr_sop_class_uid=_text(sr, "SOPClassUID"),
    )


def to_json(result: ClinicalResult) -> str:
    """The result as JSON (for a file beside the SR: it names the patient, so never the log database)."""
    data = dataclasses.asdict(result)
    data["result_datetime"] = result.result_datetime.isoformat()
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def from_json(text: str) -> ClinicalResult:
    """The ClinicalResult to_json() wrote, equal to the original."""
    data = json.loads(text)
    data["result_datetime"] = dt.datetime.fromisoformat(data["result_datetime"])
    data["findings"] = tuple(
        ClassFinding(**{**f, "slices": tuple(SliceRef(**s) for s in f["slices"])}) for f in data["findings"])
    if data.get("procedure_code") is not None:
        data["procedure_code"] = CodeTriple(**data["procedure_code"])
    return ClinicalResult(**data)


ALGORITHM_NAME, ALGORITHM_VERSION, ALGORITHM_PARAMETERS = "111001", "111003", "111002"
PROBABILITY_CONCEPT, SOURCE_CONCEPT, COMMENT_CONCEPT = "122157", "121112", "121106"


def _class_group(children: list[Dataset], cls: str) -> ClassFinding:
    """A ClassFinding from the items of its TID 1501 group."""
    code = FINDING_CODES[cls].value
    present, probability, threshold, uid, slices = False, 0.0, 0.5, "", []
    for item in children:
        concept, kind = _concept(item), item.get("ValueType")
        if kind == "CODE" and concept == code:
            present = _concept(item, "ConceptCodeSequence") == PRESENT.value
        elif kind == "NUM" and concept == PROBABILITY_CONCEPT and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0].CodeValue if measured.get(
                "MeasurementUnitsCodeSequence") else ""
            # The SR gives it in percent (UCUM %); older SRs as a fraction (UCUM {probability}).
            probability = float(measured.NumericValue) / (100.0 if unit == "%" else 1.0)
        elif kind == "TEXT" and concept == ALGORITHM_PARAMETERS and str(item.TextValue).startswith("threshold="):
            threshold = float(str(item.TextValue).split("=", 1)[1])
        elif kind == "UIDREF" and concept == TRACKING_UID_CONCEPT:
            uid = str(item.UID)
        elif kind == "IMAGE" and concept == SOURCE_CONCEPT and item.get("ReferencedSOPSequence"):
            ref = item.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber")
            frame = _int(frames[0] if isinstance(frames, list | tuple | MultiValue) else frames)
            slices.append(SliceRef(str(ref.ReferencedSOPInstanceUID), None, frame, None))
    return ClassFinding(cls=cls, present=present, probability=round(probability, 6), threshold=threshold,
                        slices=tuple(slices) if present else (), tracking_uid=uid)


def clinical_result_from_sr(sr: Dataset) -> ClinicalResult:
    """The ClinicalResult of an SR file alone (a retraction of a result whose clinical copy is gone).

    Everything but what only the source images hold: the images of a finding are named by their SOP
    Instance UIDs (no instance or series numbers), and the placer/filler order numbers and the requested
    procedure ID are empty. Raises ValueError when the SR is not one of this node's (no class groups).
    """
    by_code = {FINDING_CODES[c].value: c for c in CLASSES}
    groups: dict[str, list[Dataset]] = {}
    summary, model_name, model_version = "", "", ""
    for item in _walk(sr.get("ContentSequence", [])):
        if item.get("ValueType") == "TEXT" and _concept(item) == COMMENT_CONCEPT and not summary:
            summary = str(item.TextValue)
        if item.get("ValueType") != "CONTAINER" or _concept(item) != MEASUREMENT_GROUP:
            continue
        children = list(item.get("ContentSequence", []))
        if any(c.get("ValueType") == "SCOORD" for c in children):
            continue
        finding = next((_concept(c, "ConceptCodeSequence") for c in children
                        if c.get("ValueType") == "CODE" and _concept(c) == FINDING_CONCEPT), "")
        if finding in by_code:
            groups.setdefault(by_code[finding], children)
            for c in children:
                if c.get("ValueType") == "TEXT" and _concept(c) == ALGORITHM_NAME:
                    model_name = model_name or str(c.TextValue)
                elif c.get("ValueType") == "TEXT" and _concept(c) == ALGORITHM_VERSION:
                    model_version = model_version or str(c.TextValue)
    missing = [c for c in CLASSES if c not in groups]
    if missing:
        raise ValueError(f"SR {_text(sr, 'SOPInstanceUID')} has no finding group for {', '.join(missing)}: "
                         "not an SR this node made")
    evidence = sr.get("CurrentRequestedProcedureEvidenceSequence") or []
    series = [str(s.SeriesInstanceUID) for study in evidence for s in study.get("ReferencedSeriesSequence", [])]
    return ClinicalResult(
        **_identity(sr),
        series_instance_uid=series[0] if series else "",
        revision=max(0, (_int(sr.get("InstanceNumber")) or 1) - 1),
        incomplete=_text(sr, "CompletionFlag") == "PARTIAL",
        findings=tuple(_class_group(groups[c], c) for c in CLASSES),
        summary=summary,
        model_name=model_name,
        model_version=model_version,
    )
