"""The result as an HL7 v2.5.1 ORU^R01 for the RIS: the worklist priority, the findings, and where the SR is.

One message per result (a revision replaces it, a retraction posts it as wrong); ER7 encoding, segments
joined by carriage returns, UTF-8 (MSH-18 "UNICODE UTF-8"). Layout (the README repeats it):

    MSH  |^~\\&|sending app|sending facility|receiving app|receiving facility|now||ORU^R01^ORU_R01|
         control ID|P|2.5.1|||||| UNICODE UTF-8
    PID  1; PID-3 patient ID^^^issuer (HD: namespace&universal ID&type); PID-5 the DICOM name (one
         repetition per alphabetic/ideographic/phonetic group, XPN-8 A/I/P), or "" without patient data;
         PID-7 birth date (empty without patient data); PID-8 sex
    ORC  RE; ORC-2 placer, ORC-3 filler order number (as Hl7Addressing says); ORC-9 now
    OBR  1; OBR-2/-3 as ORC; OBR-4 the study's procedure code, else SCT 303653007 "Computed tomography of
         head"; OBR-7 study date/time; OBR-18 accession number; OBR-19 requested procedure ID; OBR-22 the
         result's time (the retraction's for a retraction); OBR-24 CT; OBR-25 P / C (revision, retraction)
    NTE  "NOT FOR DIAGNOSTIC USE ..." (and, for a retraction, a second NTE with the reason)
    TQ1  1; TQ1-9 S^Stat^HL70485 when any hemorrhage is present, else R^Routine^HL70485
    OBX  per class k = 1..6 (OBX-4 sub-ID k ties a class's OBXs together):
         CWE finding code (SR's) = 52101004^Present^SCT or 272519000^Absent^SCT, OBX-8 A / N;
         NM 122157^Probability^DCM, units {probability}^Probability^UCUM;
         TX 121112^Source of Measurement^DCM: the images ("images 3, 4 of series 3"), present findings only
    OBX  TX 121106^Comment^DCM: the summary (a long text as repetitions of <= 199 characters)
    OBX  ST SRUID^SR SOP Instance UID^99IHD, ST 112002^Series Instance UID^DCM (the SR's series),
         ST 110180^Study Instance UID^DCM
    Every OBX: OBX-11 P (preliminary), C (revision), W (retraction: post original as wrong); OBX-14 study
    time; OBX-18 the model; OBX-19 the result's time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from ihd_node.classes import CLASSES, FINDING_NAMES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.report.clinical import ClinicalResult, slices_text
from ihd_node.report.codes import ABSENT, FINDING_CODES, PRESENT, PRIVATE_SCHEME, PROCEDURE_REPORTED

Status = Literal["preliminary", "revised", "retracted"]
OBR_STATUS = {"preliminary": "P", "revised": "C", "retracted": "C"}
OBX_STATUS = {"preliminary": "P", "revised": "C", "retracted": "W"}
# Which value fills the placer (ORC-2/OBR-2) and filler (ORC-3/OBR-3) order numbers.
ORDER_NUMBER_SOURCES = ("accession", "placer", "filler", "sr_uid", "none")
SEGMENT_SEPARATOR = "\r"
MAX_CONTROL_ID = 20  # MSH-10 is ST(20) in v2.5.1
MAX_NAMESPACE = 20  # HD.1 namespace ID is IS(20): MSH-3..6, the issuer in PID-3.4
MAX_TEXT = 199  # one repetition of a text OBX-5 (ST/TX component length in the v2.5.1 tables)
PROBABILITY = ("122157", "Probability", "DCM")
PROBABILITY_UNITS = ("{probability}", "Probability", "UCUM")
SOURCE_IMAGES = ("121112", "Source of Measurement", "DCM")
COMMENT = ("121106", "Comment", "DCM")
SR_INSTANCE = ("SRUID", "SR SOP Instance UID", PRIVATE_SCHEME)
SERIES_INSTANCE = ("112002", "Series Instance UID", "DCM")
STUDY_INSTANCE = ("110180", "Study Instance UID", "DCM")
SEX = {"M": "M", "F": "F", "O": "O"}


@dataclass(frozen=True)
class Hl7Addressing:
    """Who sends to whom (MSH-3..6) and what the site wants in the message.

    placer_order_number / filler_order_number choose the value of ORC-2/OBR-2 and ORC-3/OBR-3:
    "accession" (the study's accession number), "placer" / "filler" (the Placer / Filler Order Number of
    the imaging service request, when the source images carry it; empty otherwise), "sr_uid" (the SR's SOP
    Instance UID: a filler number unique to this result), "none" (left empty).
    """

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    include_patient_data: bool = True
    placer_order_number: str = "accession"
    filler_order_number: str = "sr_uid"
    processing_id: str = "P"  # MSH-11: P production, T training, D debugging

    def __post_init__(self) -> None:
        for name in ("sending_application", "sending_facility", "receiving_application", "receiving_facility"):
            value = getattr(self, name)
            if not value.strip() or len(value) > MAX_NAMESPACE:
                raise ValueError(f"{name} {value!r} must have 1 to {MAX_NAMESPACE} characters (HL7 v2.5.1 HD.1)")
        for name in ("placer_order_number", "filler_order_number"):
            if getattr(self, name) not in ORDER_NUMBER_SOURCES:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(ORDER_NUMBER_SOURCES)}")
        if self.processing_id not in ("P", "T", "D"):
            raise ValueError(f"processing_id {self.processing_id!r} is not P, T or D")


def escape(text: object) -> str:
    """Text as an ER7 field value: the delimiters | ^ & ~ \\ as \\F\\ \\S\\ \\T\\ \\R\\ \\E\\; a line break as a
    space (a bare CR would end the segment)."""
    out = (str(text).replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
           .replace("&", "\\T\\").replace("~", "\\R\\"))
    out = out.replace("\r\n", "\n").replace("\r", "\n")
    return out.replace("\n", " ")


def text_value(text: str, limit: int = MAX_TEXT) -> str:
    """A TX value as repetitions of at most `limit` escaped characters each, split between words (a
    repeated TX is one text, line after line; receivers and validators hold each repetition to 199)."""
    lines: list[str] = []
    current = ""
    for word in str(text).split():  # runs of spaces and line breaks become one space
        candidate = f"{current} {word}" if current else word
        if len(escape(candidate)) <= limit:
            current = candidate
            continue
        if current:
            lines.append(escape(current))
        while len(escape(word)) > limit:  # one overlong word: cut it
            cut = limit
            while len(escape(word[:cut])) > limit:
                cut -= 1
            lines.append(escape(word[:cut]))
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(escape(current))
    return "~".join(lines)


def _cwe(code: tuple[str, str, str]) -> str:
    return "^".join(escape(part) for part in code)


def _coded(concept) -> tuple[str, str, str]:
    return concept.value, concept.meaning, concept.scheme_designator


def _dtm(moment: dt.datetime | None) -> str:
    """DTM with its UTC offset (YYYYMMDDHHMMSS+ZZZZ); a naive time is taken as the node's local time."""
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.strftime("%Y%m%d%H%M%S%z")


def _segment(name: str, fields: dict[int, str]) -> str:
    """A segment from its non-empty fields by number (trailing empty fields left out)."""
    last = max((n for n, v in fields.items() if v), default=0)
    return "|".join([name, *(fields.get(n, "") for n in range(1, last + 1))])


def _hd(namespace: str, universal: str = "", kind: str = "") -> str:
    """HD as sub-components (inside CX-4): namespace&universal ID&type."""
    parts = [escape(namespace), escape(universal), escape(kind)]
    while parts and not parts[-1]:
        parts.pop()
    return "&".join(parts)


def person_name(dicom_pn: str) -> str:
    """PID-5 from a DICOM PN: family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    (HL7 puts the suffix before the prefix); one repetition per DICOM component group (alphabetic,
    ideographic, phonetic) with XPN-8 A / I / P when the name has more than one; '""' for no name."""
    groups = str(dicom_pn or "").split("=")
    reps = []
    for code, group in zip("AIP", groups, strict=False):
        parts = (group.split("^") + [""] * 5)[:5]
        if not any(p.strip() for p in parts):
            continue
        family, given, middle, prefix, suffix = (p.strip() for p in parts)
        components = [escape(family), escape(given), escape(middle), escape(suffix), escape(prefix), "", "",
                      code if len([g for g in groups if g.strip("^ ")]) > 1 else ""]
        while components and not components[-1]:
            components.pop()
        reps.append("^".join(components))
    return "~".join(reps) if reps else '""'


def _issuer(result: ClinicalResult) -> str:
    """PID-3.4: the issuer's namespace (HD.1, at most 20 characters) and universal ID. A longer namespace is
    left out when the universal ID names the authority; without one it is an error: dropping or cutting it
    could match another authority's patient."""
    namespace = result.issuer_of_patient_id
    if len(namespace) > MAX_NAMESPACE:
        if not result.issuer_universal_id:
            raise ValueError(f"Issuer of Patient ID {namespace!r} is longer than the {MAX_NAMESPACE} characters "
                             "HL7 v2.5.1 allows in PID-3.4 and the study names no Universal Entity ID for it")
        namespace = ""
    return _hd(namespace, result.issuer_universal_id, result.issuer_universal_id_type)


def _order_number(result: ClinicalResult, source: str, namespace: str) -> str:
    value = {"accession": result.accession_number, "placer": result.placer_order_number,
             "filler": result.filler_order_number, "sr_uid": result.sr_sop_instance_uid, "none": ""}[source]
    if not value:
        return ""
    return escape(value) + (f"^{escape(namespace)}" if namespace else "")


def _procedure(result: ClinicalResult) -> str:
    code = result.procedure_code
    if code is not None and code.value and code.scheme:
        return _cwe((code.value, code.meaning, code.scheme))
    return _cwe(_coded(PROCEDURE_REPORTED))


def build_oru(result: ClinicalResult, addressing: Hl7Addressing, *, status: Status, control_id: str,
              now: dt.datetime, reason: str = "") -> str:
    """The ORU^R01 of one result (ER7, segments joined by "\\r"); see the module's layout.

    `now` stamps MSH-7 and ORC-9 (and OBR-22 of a retraction); `reason` is the retraction's reason.
    Raises ValueError for what the RIS could not match or accept: no patient ID, a control ID over 20
    characters, an issuer over 20 characters without a universal ID, an unknown status, a retraction
    without a reason.
    """
    if status not in OBX_STATUS:
        raise ValueError(f"unknown result status {status!r}; use preliminary, revised or retracted")
    if not control_id or len(control_id) > MAX_CONTROL_ID:
        raise ValueError(f"control ID {control_id!r} must have 1 to {MAX_CONTROL_ID} characters (MSH-10)")
    if not result.patient_id:
        raise ValueError("the study has no Patient ID: the RIS cannot match an ORU without PID-3")
    if status == "retracted" and not reason.strip():
        raise ValueError("a retraction needs a reason")
    a = addressing
    observed = _dtm(result.study_datetime())
    reported = _dtm(now if status == "retracted" else result.result_datetime)
    obx_status = OBX_STATUS[status]
    segments = ["|".join(["MSH", "^~\\&", escape(a.sending_application), escape(a.sending_facility),
                          escape(a.receiving_application), escape(a.receiving_facility), _dtm(now), "",
                          "ORU^R01^ORU_R01", escape(control_id), a.processing_id, "2.5.1", "", "", "", "", "",
                          "UNICODE UTF-8"])]
    issuer = _issuer(result)
    segments.append(_segment("PID", {
        1: "1",
        3: escape(result.patient_id) + (f"^^^{issuer}" if issuer else ""),
        5: person_name(result.patient_name) if a.include_patient_data else '""',
        7: escape(result.birth_date) if a.include_patient_data else "",
        8: SEX.get(result.sex, ""),
    }))
    placer = _order_number(result, a.placer_order_number, "")
    filler = _order_number(result, a.filler_order_number, a.sending_application)
    segments.append(_segment("ORC", {1: "RE", 2: placer, 3: filler, 9: _dtm(now)}))
    segments.append(_segment("OBR", {
        1: "1", 2: placer, 3: filler, 4: _procedure(result), 7: observed,
        18: escape(result.accession_number), 19: escape(result.requested_procedure_id),
        22: reported, 24: "CT", 25: OBR_STATUS[status],
    }))
    notes = [f"{NOT_FOR_DIAGNOSTIC_USE}. Research software output ({result.model_name} {result.model_version}), "
             "not verified by a physician."]
    if status == "retracted":
        notes.append(f"RESULT WITHDRAWN (posted in error): {reason.strip()}")
    if result.incomplete:
        notes.append("PRELIMINARY - the series may be incomplete.")
    for k, note in enumerate(notes, start=1):
        segments.append(_segment("NTE", {1: str(k), 2: "L", 3: escape(note), 4: "RE^Remark^HL70364"}))
    priority = "S^Stat^HL70485" if result.hemorrhage else "R^Routine^HL70485"
    segments.append(_segment("TQ1", {1: "1", 9: priority}))

    model = f"{escape(f'{result.model_name} {result.model_version}')}^ihd-node"
    analysed = _dtm(result.result_datetime)
    observations: list[tuple[str, str, str, str, dict[int, str]]] = []
    for k, cls in enumerate(CLASSES, start=1):
        finding = result.finding(cls)
        concept = _coded(FINDING_CODES[cls])
        observations.append(("CWE", _cwe(concept), str(k), _cwe(_coded(PRESENT if finding.present else ABSENT)),
                             {8: "A" if finding.present else "N"}))
        observations.append(("NM", _cwe(PROBABILITY), str(k), f"{finding.probability:.6g}",
                             {6: _cwe(PROBABILITY_UNITS)}))
        if finding.present and finding.slices:
            observations.append(("TX", _cwe(SOURCE_IMAGES), str(k),
                                 text_value(f"{FINDING_NAMES[cls]}: {slices_text(finding.slices)}"), {}))
    observations.append(("TX", _cwe(COMMENT), "", text_value(result.summary), {}))
    observations.append(("ST", _cwe(SR_INSTANCE), "", escape(result.sr_sop_instance_uid), {}))
    observations.append(("ST", _cwe(SERIES_INSTANCE), "", escape(result.sr_series_instance_uid), {}))
    observations.append(("ST", _cwe(STUDY_INSTANCE), "", escape(result.study_instance_uid), {}))
    for n, (kind, code, sub_id, value, extra) in enumerate(observations, start=1):
        segments.append(_segment("OBX", {1: str(n), 2: kind, 3: code, 4: sub_id, 5: value, 11: obx_status,
                                         14: observed, 18: model, 19: analysed, **extra}))
        if status == "retracted" and n == 1:
            segments.append(_segment("NTE", {1: "1", 2: "L", 3: escape(f"Posted in error: {reason.strip()}"),
                                             4: "RE^Remark^HL70364"}))
    return SEGMENT_SEPARATOR.join(segments)
