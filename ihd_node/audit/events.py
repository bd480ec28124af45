"""The node's audit events, one builder each (PS3.15 A.5.3 names the event IDs, roles and objects).

Every stage builds its event here and hands it to `Database.audit` (ihd_node.store.audit), which renders,
validates and queues it. Which PS3.15 event was chosen, and why, is said at each builder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ihd_node.audit.message import (
    APPLICATION,
    APPLICATION_ACTIVITY,
    APPLICATION_LAUNCHER,
    APPLICATION_START,
    APPLICATION_STOP,
    DESTINATION,
    EXPORT,
    IMPORT,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    LOGIN,
    LOGOUT,
    MINOR_FAILURE,
    NODE_AUTHENTICATION,
    NODE_ID,
    QUERY,
    ROLE_QUERY,
    ROLE_REPORT,
    ROLE_SECURITY_RESOURCE,
    SECURITY_ALERT,
    SERIOUS_FAILURE,
    SOFTWARE_CONFIGURATION,
    SOP_CLASS_UID,
    SOURCE,
    SUCCESS,
    URI,
    USE_OF_RESTRICTED_FUNCTION,
    USER_AUTHENTICATION,
    AuditEvent,
    Code,
    OtherObject,
    Participant,
    StudyObject,
)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
CONSOLE_ROLES = "99IHDNODE"  # local coding scheme of the console's roles (viewer, operator, admin)


def _aet(title: str) -> str:
    return f"AETITLES={title}"


def _user(user: str, address: str | None = None, requestor: bool = True) -> Participant:
    return Participant(user or "unknown", requestor, address=address)


def application_activity(start: bool, *, launched_by: str | None = None, reason: str | None = None,
                         failed: bool = False) -> AuditEvent:
    """Node start or stop (110100, type Application Start/Stop): the node as Application (110150), the OS
    user who launched it as Application Launcher (110151)."""
    launcher = (Participant(launched_by, True, (APPLICATION_LAUNCHER,)),) if launched_by else ()
    return AuditEvent("application-start" if start else "application-stop", APPLICATION_ACTIVITY, "E",
                      outcome=SERIOUS_FAILURE if failed else SUCCESS, outcome_text=reason,
                      types=(APPLICATION_START if start else APPLICATION_STOP,), node_roles=(APPLICATION,),
                      participants=launcher)


def instances_received(calling_aet: str, address: str, studies: Sequence[StudyObject], *,
                       outcome_text: str | None = None) -> AuditEvent:
    """Instances of one or more studies received on one association (110104, action C): the peer is the
    Source (110153) and the requestor, the node the Destination (110152). One message per study."""
    return AuditEvent("instances-received", INSTANCES_TRANSFERRED, "C",
                      outcome=MINOR_FAILURE if outcome_text else SUCCESS, outcome_text=outcome_text,
                      node_roles=(DESTINATION,),
                      participants=(Participant(calling_aet or "unknown", True, (SOURCE,), address,
                                                alternative_user_id=_aet(calling_aet)),),
                      studies=tuple(studies))


def instances_sent(destination: str, peer_aet: str, address: str, study: StudyObject, *,
                   failure: str | None = None, user: str | None = None) -> AuditEvent:
    """A study's result objects sent to one C-STORE destination (110104, action R): the node is the Source
    and the requestor, the destination the Destination. `failure` (rejected/given up) makes it a serious
    failure with the reason. `user`: a console user who asked for the re-send."""
    extra = (_user(user),) if user else ()
    return AuditEvent("instances-sent", INSTANCES_TRANSFERRED, "R",
                      outcome=SERIOUS_FAILURE if failure else SUCCESS,
                      outcome_text=f"destination {destination}: {failure}" if failure else f"destination {destination}",
                      node_roles=(SOURCE,), node_requestor=not user,
                      participants=(Participant(peer_aet, False, (DESTINATION,), address,
                                                alternative_user_id=_aet(peer_aet)), *extra),
                      studies=(study,))


def export(destination: str, kind: str, target: str, study: StudyObject, *, failure: str | None = None,
           message_ids: Iterable[str] = ()) -> AuditEvent:
    """Results leaving the node other than by C-STORE (110106 Export, action R): an HL7 ORU over MLLP, a FHIR
    transaction Bundle, DICOMweb STOW-RS. The receiving system (its URL or host) is the Destination."""
    details = tuple(("MessageID", m) for m in message_ids)
    return AuditEvent("export", EXPORT, "R", outcome=SERIOUS_FAILURE if failure else SUCCESS,
                      outcome_text=f"{kind} to {destination}" + (f": {failure}" if failure else ""),
                      node_roles=(SOURCE,), node_requestor=True,
                      participants=(Participant(target, False, (DESTINATION,), _host_of(target)),),
                      studies=(study,),
                      objects=(OtherObject(destination, NODE_ID, role=ROLE_REPORT, name=f"{kind} {destination}",
                                           details=details),) if details else ())


def association_refused(calling_aet: str, address: str, reason: str) -> AuditEvent:
    """An association (or TLS handshake) refused (110113 Security Alert, type Node Authentication 110126):
    the peer's AE title and address; minor failure: the peer may retry correctly."""
    return AuditEvent("association-refused", SECURITY_ALERT, "E", outcome=MINOR_FAILURE, outcome_text=reason,
                      types=(NODE_AUTHENTICATION,), node_roles=(APPLICATION,),
                      participants=(Participant(calling_aet or address, True, address=address,
                                                alternative_user_id=_aet(calling_aet) if calling_aet else None),))


def configuration_changed(path: str, old_hash: str | None, new_hash: str, *, by: str | None = None) -> AuditEvent:
    """The effective configuration differs from the previous run's (110113 Security Alert, type Software
    Configuration 110131: the node's software settings changed; the Security Configuration type would claim
    more than we know). The file is the object, with both hashes."""
    details = (("OldConfigurationSHA256", old_hash or "none (first run)"), ("NewConfigurationSHA256", new_hash))
    return AuditEvent("configuration-changed", SECURITY_ALERT, "E", types=(SOFTWARE_CONFIGURATION,),
                      node_roles=(APPLICATION,), participants=(_user(by),) if by else (),
                      objects=(OtherObject(path, URI, role=ROLE_SECURITY_RESOURCE, details=details),))


def user_authentication(user: str | None, success: bool, address: str, method: str, reason: str = "", *,
                        role: str | None = None, logout: bool = False) -> AuditEvent:
    """A console log-in (or log-out) attempt (110114 User Authentication, type Login 110122 / Logout 110123):
    the person (the user name given; "unknown" without one) from `address`, by `method` (basic, token,
    oidc), with the console role granted (a local code); a failed attempt is a minor failure (the user may
    retry) with the reason."""
    text = f"{method}" + (f": {reason}" if reason else "")
    roles = (Code(role, CONSOLE_ROLES, f"console role {role}"),) if role else ()
    return AuditEvent("user-authentication", USER_AUTHENTICATION, "E", outcome=SUCCESS if success else MINOR_FAILURE,
                      outcome_text=text, types=(LOGOUT if logout else LOGIN,), node_roles=(APPLICATION,),
                      participants=(Participant(user or "unknown", True, roles, address=address),))


def pacs_query(destination: str, peer_aet: str, address: str, study_uid: str, query: bytes, *,
               answered: bool, detail: str = "") -> AuditEvent:
    """The completion check's C-FIND for a series' instance count (110112 Query, action E): the node is the
    Source and requestor, the PACS the Destination; the object is the query (its SOP class, the query
    dataset as sent), plus the study it asked about."""
    return AuditEvent("query", QUERY, "E", outcome=SUCCESS if answered else MINOR_FAILURE,
                      outcome_text=f"series instance count from {destination}" + (f": {detail}" if detail else ""),
                      node_roles=(SOURCE,), node_requestor=True,
                      participants=(Participant(peer_aet, False, (DESTINATION,), address,
                                                alternative_user_id=_aet(peer_aet)),),
                      studies=(StudyObject(study_uid),),
                      objects=(OtherObject(STUDY_ROOT_FIND, SOP_CLASS_UID, role=ROLE_QUERY, query=query,
                                           details=(("TransferSyntax", "1.2.840.10008.1.2.1"),)),))


def retraction(user: str, study: StudyObject, series_uid: str, reason: str, *,
               failure: str | None = None) -> AuditEvent:
    """A result taken back (110103 DICOM Instances Accessed, action D). Why this event: the node marks its
    own result instances as withdrawn (a rejection KOS, corrections to HL7/FHIR) and the study itself stays;
    110105 DICOM Study Deleted is for deleting whole studies, which this is not. The person who asked is
    the requestor (UserIsRequestor true)."""
    return AuditEvent("retraction", INSTANCES_ACCESSED, "D", outcome=SERIOUS_FAILURE if failure else SUCCESS,
                      outcome_text=(failure or reason)[:1000], node_roles=(APPLICATION,),
                      participants=(_user(user),), studies=(study,),
                      objects=(OtherObject(series_uid, dcm_series_uid(), role=ROLE_REPORT,
                                           name="retracted result series"),))


def dcm_series_uid() -> Code:
    # DCM 112002 "Series Instance UID" (CID 404 offers only Study/SOP Class/Node ID; the DCM code is the
    # one DICOM uses for a series UID elsewhere)
    return Code("112002", "DCM", "Series Instance UID")


def labels_import(user: str | None, file: str, studies: Sequence[StudyObject], *, count: int,
                  failure: str | None = None) -> AuditEvent:
    """Radiologists' reads imported from a file (110107 Import, action C): the operator is the requestor,
    the file the imported object, each study whose read was imported an object."""
    return AuditEvent("labels-import", IMPORT, "C", outcome=MINOR_FAILURE if failure else SUCCESS,
                      outcome_text=failure or f"{count} read(s) imported", node_roles=(DESTINATION,),
                      participants=(_user(user or "unknown"),), studies=tuple(studies),
                      objects=(OtherObject(file, URI, details=(("Reads", str(count)),)),))


def console_action(user: str, address: str | None, action: str, study: StudyObject | None, *,
                   done: bool, detail: str) -> AuditEvent:
    """A console action that changes what the node does (re-send, re-analyse): 110113 Security Alert of type
    Use of Restricted Function (110132), naming the console user as requestor."""
    return AuditEvent(f"console-{action}", SECURITY_ALERT, "E", outcome=SUCCESS if done else MINOR_FAILURE,
                      outcome_text=f"{action}: {detail}"[:1000], types=(USE_OF_RESTRICTED_FUNCTION,),
                      node_roles=(APPLICATION,), participants=(_user(user, address),),
                      studies=(study,) if study else ())


def _host_of(target: str) -> str | None:
    from urllib.parse import urlsplit

    if "://" in target:
        return urlsplit(target).hostname
    return target.rsplit(":", 1)[0] if target else None

