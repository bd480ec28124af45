"""Typed audit events and their DICOM audit message XML (PS3.15 A.5.1, with the conventions of A.5.2).

An `AuditEvent` says what happened, who took part and which objects it concerned; `render` turns it into
the XML of the standard's schema for one audit source (this installation). The node itself takes part in
most events: builders name its role (`node_roles`) and `render` fills in its identity from `AuditSource`,
so a stage needs to know only the peer's side.

Patients appear by ID only. The schema asks every participant object for a ParticipantObjectName or a
ParticipantObjectQuery; for a patient the name would be the patient's name, which the node never logs,
so the patient's object carries PATIENT_NAME_WITHHELD there (see README "Audit trail").
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lxml import etree

PATIENT_NAME_WITHHELD = "withheld by policy"


@dataclass(frozen=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText) as the schema's CodedValueType."""

    code: str
    system: str
    meaning: str


def dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# Event IDs (PS3.15 A.5.3, codes of PS3.16 CID 400)
APPLICATION_ACTIVITY = dcm("110100", "Application Activity")
INSTANCES_ACCESSED = dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = dcm("110104", "DICOM Instances Transferred")
EXPORT = dcm("110106", "Export")
IMPORT = dcm("110107", "Import")
QUERY = dcm("110112", "Query")
SECURITY_ALERT = dcm("110113", "Security Alert")
USER_AUTHENTICATION = dcm("110114", "User Authentication")
# Event type codes (CID 401 Audit Event Type Code)
APPLICATION_START = dcm("110120", "Application Start")
APPLICATION_STOP = dcm("110121", "Application Stop")
LOGIN = dcm("110122", "Login")
LOGOUT = dcm("110123", "Logout")
NODE_AUTHENTICATION = dcm("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = dcm("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = dcm("110132", "Use of Restricted Function")
# Active participant roles (CID 402 Audit Active Participant Role ID Code)
APPLICATION = dcm("110150", "Application")
APPLICATION_LAUNCHER = dcm("110151", "Application Launcher")
DESTINATION = dcm("110152", "Destination Role ID")
SOURCE = dcm("110153", "Source Role ID")
# Participant object ID types (CID 404 and the RFC 3881 values of A.5.1.2.4)
STUDY_INSTANCE_UID = dcm("110180", "Study Instance UID")
SOP_CLASS_UID = dcm("110181", "SOP Class UID")
NODE_ID = dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

# EventOutcomeIndicator values (A.5.1)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
# ParticipantObjectTypeCode / ...Role values used here (A.5.1.2.2)
PERSON, SYSTEM_OBJECT = 1, 2
ROLE_PATIENT, ROLE_REPORT, ROLE_JOB, ROLE_QUERY, ROLE_DATA_REPOSITORY, ROLE_SECURITY_RESOURCE = 1, 3, 20, 24, 17, 13


@dataclass(frozen=True)
class Participant:
    """An active participant other than the node itself: a peer AE, a console user, an operator."""

    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    address: str | None = None  # IP address or host name (NetworkAccessPointID)
    alternative_user_id: str | None = None  # e.g. "AETITLES=PACS"
    user_name: str | None = None


@dataclass(frozen=True)
class StudyObject:
    """A study concerned by the event: its UID, SOP classes with instance counts, accession; the patient
    ID when known (the store remembers it per study, so later events of the study name the patient too)."""

    study_uid: str
    sop_classes: tuple[tuple[str, int], ...] = ()
    accession: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True)
class OtherObject:
    """Any other participant object: a query, a configuration file, an imported file, a destination."""

    object_id: str
    id_type: Code
    type_code: int = SYSTEM_OBJECT
    role: int | None = None
    name: str | None = None
    query: bytes | None = None  # ParticipantObjectQuery (base64 in the XML); used instead of `name`
    details: tuple[tuple[str, str], ...] = ()  # ParticipantObjectDetail type/value pairs
    life_cycle: int | None = None


@dataclass(frozen=True)
class AuditEvent:
    """One audit message before it is rendered. `kind` is the short name kept in the log database."""

    kind: str
    event_id: Code
    action: str  # C R U D E
    outcome: int = SUCCESS
    outcome_text: str | None = None
    types: tuple[Code, ...] = ()
    node_roles: tuple[Code, ...] | None = ()  # the node's RoleIDCodes; None: the node is not a participant
    node_requestor: bool = False
    participants: tuple[Participant, ...] = ()
    studies: tuple[StudyObject, ...] = ()
    objects: tuple[OtherObject, ...] = ()
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def patient_ids(self) -> list[str]:
        return sorted({s.patient_id for s in self.studies if s.patient_id})


@dataclass(frozen=True)
class AuditSource:
    """This installation as an audit source, and the node as an active participant."""

    source_id: str  # AuditSourceID: unique within the enterprise (default: ihd-node@<host>)
    site_id: str | None  # AuditEnterpriseSiteID
    ae_title: str
    host: str  # the node's address as the network sees it (host name or IP)
    process: str  # the identity of the process: "ihd-node" with its pid


def _code(parent: etree._Element, tag: str, code: Code) -> None:
    etree.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning})


def _access_point(element: etree._Element, address: str | None) -> None:
    if not address:
        return
    try:
        ipaddress.ip_address(address)
        kind = "2"  # IP address
    except ValueError:
        kind = "1"  # machine name
    element.set("NetworkAccessPointID", address)
    element.set("NetworkAccessPointTypeCode", kind)


def _participant(root: etree._Element, p: Participant) -> None:
    element = etree.SubElement(root, "ActiveParticipant", {"UserID": p.user_id,
                                                           "UserIsRequestor": "true" if p.requestor else "false"})
    if p.alternative_user_id:
        element.set("AlternativeUserID", p.alternative_user_id)
    if p.user_name:
        element.set("UserName", p.user_name)
    _access_point(element, p.address)
    for role in p.roles:
        _code(element, "RoleIDCode", role)


def _iso(at: datetime) -> str:
    # xsd:dateTime in UTC with milliseconds (A.5.2.5: unambiguous as to the time zone)
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(event: AuditEvent, source: AuditSource, patients: dict[str, str] | None = None) -> str:
    """The audit message XML of `event` as reported by `source`. `patients` maps study UID -> patient ID for
    studies whose event does not carry one (what the store remembers)."""
    root = etree.Element("AuditMessage")
    ident = etree.SubElement(root, "EventIdentification", {
        "EventActionCode": event.action, "EventDateTime": _iso(event.at),
        "EventOutcomeIndicator": str(event.outcome)})
    _code(ident, "EventID", event.event_id)
    for code in event.types:
        _code(ident, "EventTypeCode", code)
    if event.outcome_text:
        etree.SubElement(ident, "EventOutcomeDescription").text = event.outcome_text
    if event.node_roles is not None:
        _participant(root, Participant(source.process, event.node_requestor, event.node_roles, source.host,
                                       alternative_user_id=f"AETITLES={source.ae_title}"))
    for p in event.participants:
        _participant(root, p)
    audit_source = etree.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source.source_id})
    if source.site_id:
        audit_source.set("AuditEnterpriseSiteID", source.site_id)
    etree.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    known = dict(patients or {})
    for study in event.studies:
        if study.patient_id:
            known[study.study_uid] = study.patient_id
    for study in event.studies:
        _study(root, study)
    for patient_id in sorted({known[s.study_uid] for s in event.studies if s.study_uid in known}):
        _object(root, OtherObject(patient_id, PATIENT_NUMBER, PERSON, ROLE_PATIENT, name=PATIENT_NAME_WITHHELD))
    for obj in event.objects:
        _object(root, obj)
    return etree.tostring(root, encoding="unicode")


def _study(root: etree._Element, study: StudyObject) -> None:
    element = etree.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": study.study_uid, "ParticipantObjectTypeCode": str(SYSTEM_OBJECT),
        "ParticipantObjectTypeCodeRole": str(ROLE_REPORT)})
    _code(element, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    # A.5.3: a study's name is required when there is no query; its UID is the only name it has here
    etree.SubElement(element, "ParticipantObjectName").text = study.study_uid
    if study.accession or study.sop_classes:
        description = etree.SubElement(element, "ParticipantObjectDescription")
        if study.accession:
            etree.SubElement(description, "Accession", {"Number": study.accession})
        for uid, count in study.sop_classes:
            etree.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})


def _object(root: etree._Element, obj: OtherObject) -> None:
    element = etree.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": obj.object_id, "ParticipantObjectTypeCode": str(obj.type_code)})
    if obj.role is not None:
        element.set("ParticipantObjectTypeCodeRole", str(obj.role))
    if obj.life_cycle is not None:
        element.set("ParticipantObjectDataLifeCycle", str(obj.life_cycle))
    _code(element, "ParticipantObjectIDTypeCode", obj.id_type)
    if obj.query is not None:
        etree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(obj.query).decode("ascii")
    else:
        etree.SubElement(element, "ParticipantObjectName").text = obj.name or obj.object_id
    for kind, value in obj.details:
        etree.SubElement(element, "ParticipantObjectDetail", {
            "type": kind, "value": base64.b64encode(value.encode("utf-8")).decode("ascii")})
