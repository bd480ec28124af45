"""Sections for what the node sends: destinations of four kinds (DICOM C-STORE with TLS, HL7 v2 over MLLP,
FHIR R4, DICOMweb STOW-RS), the outbox retry policy, and alert channels.

`destinations:` entries are a union discriminated on `kind`; an entry without `kind` is a DICOM one, so
configs written before the other kinds existed stay valid."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from ihd_node.config.fields import (
    AETitle,
    Bool,
    FilePath,
    Host,
    Num,
    Port,
    Section,
    existing_file,
    named_once,
    setting,
)


class OutboundTLS(Section):
    enabled: Bool = setting(False, "Use DICOM TLS to this destination.")
    ca_certificates: FilePath = setting(
        None, "PEM CA bundle to verify the destination; unset = system CAs.", "/etc/ihd-node/tls/pacs-ca.crt"
    )
    certificate: FilePath = setting(
        None, "PEM client certificate, if the destination asks for one.", "/etc/ihd-node/tls/node.crt"
    )
    private_key: FilePath = setting(
        None, "PEM private key of the client certificate.", "/etc/ihd-node/tls/node.key"
    )

    @model_validator(mode="after")
    def _pair(self) -> OutboundTLS:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together; set both or neither")
        return self


def _short_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("is not a short name (1-64 letters, digits, `_`, `.`, `-`)")
    return value


ShortName = Annotated[str, AfterValidator(_short_name)]
NAME_DOC = "Short name used in the log database and `ihd-node status`."


def _readable_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """An existing file (relative = next to the config) that this user can read: a token or password file
    the node could not read would fail every send, so check-config says so at once."""
    value = existing_file(value, info)
    if value is not None and (info.context or {}).get("check_files"):
        try:
            with value.open("rb") as handle:
                empty = not handle.read(1)
        except OSError as exc:
            raise ValueError(f"cannot be read ({exc.strerror or exc}); make it readable by the ihd-node "
                             "user (e.g. chown ihd-node, chmod 600)") from None
        if empty:
            raise ValueError("is empty; put the token or password into it")
    return value


SecretFile = Annotated[Path | None, AfterValidator(_readable_file)]


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) < 10:
        raise ValueError("is not an http:// or https:// URL; give the server's base URL")
    return value.rstrip("/")


HttpUrl = Annotated[str, Field(strict=True), AfterValidator(_http_url)]


class DicomDestination(Section):
    name: ShortName = setting(..., NAME_DOC, "pacs")
    kind: Literal["dicom"] = setting("dicom", "`dicom` (C-STORE; the default), `hl7`, `fhir` or `dicomweb`.")
    ae_title: AETitle = setting(..., "The destination's AE title (called AE).", "PACS")
    host: Host = setting(..., "Host name or IP address of the destination.", "127.0.0.1")
    port: Port = setting(..., "The destination's DICOM port.", 4242)
    timeout: Num = setting(30.0, "Seconds for connect, association and each C-STORE.", 30, gt=0)
    count_instances: Bool = setting(
        False,
        "Before a quiet series is judged complete, ask this destination (C-FIND) how many instances of the "
        "series it holds, and wait while the node has fewer.",
    )
    tls: OutboundTLS = setting(OutboundTLS, "DICOM TLS to this destination.")
    sr_class: Literal["comprehensive3d", "comprehensive", "enhanced"] = setting(
        "comprehensive3d", "SR class offered first; when the destination does not accept it in association "
        "negotiation, the next simpler one (comprehensive, then enhanced) is sent, and the log says which.",
        "comprehensive3d",
    )


Destination = DicomDestination  # the name older code and tests use for a C-STORE destination


def _namespace(value: str) -> str:
    if not value.strip() or len(value) > 20:
        raise ValueError("must have 1 to 20 characters (an HL7 v2.5.1 namespace ID, HD.1)")
    return value


Namespace = Annotated[str, Field(strict=True), AfterValidator(_namespace)]
OrderNumber = Literal["accession", "placer", "filler", "sr_uid", "none"]


class Hl7Destination(Section):
    name: ShortName = setting(..., NAME_DOC, "ris")
    kind: Literal["hl7"] = setting(..., "`hl7`: an ORU^R01 (HL7 v2.5.1) per result over MLLP.", "hl7")
    host: Host = setting(..., "Host name or IP address of the MLLP listener (RIS or interface engine).",
                         "ris.hospital.example")
    port: Port = setting(..., "The MLLP listener's port.", 2575)
    timeout: Num = setting(30.0, "Seconds for connect, send and the ACK.", 30, gt=0)
    sending_application: Namespace = setting("IHD-NODE", "MSH-3 Sending Application (1-20 characters).",
                                             "IHD-NODE")
    sending_facility: Namespace = setting(..., "MSH-4 Sending Facility (1-20 characters).", "RADIOLOGY")
    receiving_application: Namespace = setting(..., "MSH-5 Receiving Application (1-20 characters).", "RIS")
    receiving_facility: Namespace = setting(..., "MSH-6 Receiving Facility (1-20 characters).", "HOSPITAL")
    include_patient_data: Bool = setting(
        True, "Send the patient name, birth date and sex in PID (the RIS matches on them); false sends the "
        "name as an explicit null and leaves birth date and sex out.")
    placer_order_number: OrderNumber = setting(
        "accession", "What ORC-2/OBR-2 (placer order number) carries: `accession` (the study's accession "
        "number), `placer` / `filler` (the order numbers the source images carry), `sr_uid` (the SR's SOP "
        "Instance UID) or `none`.", "accession")
    filler_order_number: OrderNumber = setting(
        "sr_uid", "What ORC-3/OBR-3 (filler order number) carries; the same choices.", "sr_uid")
    tls: OutboundTLS = setting(OutboundTLS, "TLS to the MLLP listener (MLLP over TLS).")


class HttpAuth(Section):
    token_file: SecretFile = setting(
        None, "File holding a bearer token, sent as `Authorization: Bearer <token>`.", "/etc/ihd-node/ehr.token")
    username: str | None = setting(None, "HTTP basic user (dicomweb; with password_file).", "ihd-node")
    password_file: SecretFile = setting(None, "File holding the HTTP basic password.", "/etc/ihd-node/pacs.pass")

    @model_validator(mode="after")
    def _one_way(self) -> HttpAuth:
        if self.token_file is not None and (self.username or self.password_file):
            raise ValueError("give token_file or username + password_file, not both")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together; set both or neither")
        return self


class FhirDestination(Section):
    name: ShortName = setting(..., NAME_DOC, "ehr")
    kind: Literal["fhir"] = setting(..., "`fhir`: a FHIR R4 transaction Bundle per result.", "fhir")
    url: HttpUrl = setting(..., "The FHIR server's base URL (the Bundle is POSTed there).",
                           "https://fhir.hospital.example/r4")
    auth: HttpAuth = setting(HttpAuth, "How the node authenticates (token_file: bearer token).")
    timeout: Num = setting(30.0, "Seconds for connect and the answer.", 30, gt=0)
    ca_certificates: FilePath = setting(
        None, "PEM CA bundle to verify the server; unset = the system's.", "/etc/ihd-node/ehr-ca.crt")
    patient_identifier_system: str = setting(
        "", "Identifier system (URI) of the DICOM Patient ID in the EHR (its MRN system), for the conditional "
        "references on the patient; empty = from the study's Issuer of Patient ID qualifiers (an OID as "
        "urn:oid:...), else no system.", "urn:oid:2.16.840.1.113883.2.4.6.3")
    include_patient_data: Bool = setting(
        True, "Put the patient's name into the report's subject display; false: the identifier only (the "
        "birth date is never sent).")

    @model_validator(mode="after")
    def _basic(self) -> FhirDestination:
        if self.auth.username is not None:
            raise ValueError("auth of a fhir destination is token_file; basic login is for dicomweb")
        return self


class DicomWebDestination(Section):
    name: ShortName = setting(..., NAME_DOC, "cloud")
    kind: Literal["dicomweb"] = setting(..., "`dicomweb`: the SR and captures by STOW-RS.", "dicomweb")
    url: HttpUrl = setting(..., "The DICOMweb service root (STOW-RS posts to <url>/studies).",
                           "https://pacs.hospital.example/dicom-web")
    auth: HttpAuth = setting(HttpAuth, "token_file (bearer) or username + password_file (basic); none = open.")
    timeout: Num = setting(30.0, "Seconds for connect and the answer.", 30, gt=0)
    ca_certificates: FilePath = setting(
        None, "PEM CA bundle to verify the server; unset = the system's.", "/etc/ihd-node/pacs-ca.crt")
    send_captures: Bool = setting(True, "Send the Grad-CAM secondary captures with the SR (false: the SR and the "
                                  "other structured objects only: key images, segmentation).")


def destination_kind(value: Any) -> str:
    """The `kind` of a destination mapping or model; none given = dicom."""
    kind = value.get("kind", "dicom") if isinstance(value, dict) else getattr(value, "kind", "dicom")
    return str(kind)


DESTINATION_KINDS: dict[str, type[Section]] = {
    "dicom": DicomDestination, "hl7": Hl7Destination, "fhir": FhirDestination, "dicomweb": DicomWebDestination,
}
AnyDestination = Annotated[
    Annotated[DicomDestination, Tag("dicom")] | Annotated[Hl7Destination, Tag("hl7")]
    | Annotated[FhirDestination, Tag("fhir")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(destination_kind),
]
MESSAGE_KINDS = ("hl7", "fhir")  # destinations that get one message per result, not the DICOM objects


class DeliveryConfig(Section):
    retry_initial_seconds: Num = setting(5.0, "Wait before the first retry; doubles per attempt.", 5, gt=0)
    retry_max_seconds: Num = setting(300.0, "Longest wait between retries.", 300, gt=0)
    give_up_after_seconds: Num = setting(
        86400.0, "An object not delivered this long after it was queued is marked failed.", 86400, gt=0
    )

    @model_validator(mode="after")
    def _order(self) -> DeliveryConfig:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds is below retry_initial_seconds; make it larger")
        return self


def _url_template(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        value.format(StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3", AccessionNumber="A1")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"is not a valid template ({exc}); use {{StudyInstanceUID}}, {{SeriesInstanceUID}} or "
            "{AccessionNumber} as placeholders"
        ) from None
    return value


UrlTemplate = Annotated[str | None, AfterValidator(_url_template)]


class AlertChannel(Section):
    name: str = setting(..., "Short name used in the log database (one alert per series, revision and channel).", "er")
    kind: Literal["webhook", "teams", "slack", "email"] = setting(
        ..., "`webhook` (generic JSON POST), `teams` / `slack` (incoming-webhook formats) or `email` (SMTP).",
        "teams",
    )
    url: str | None = setting(None, "The webhook's URL (webhook, teams, slack).", "https://hooks.example.org/T0/B0")
    timeout: Num = setting(10.0, "Seconds for connect and answer.", 10, gt=0)
    smtp_host: str | None = setting(None, "SMTP server (email).", "smtp.example.org")
    smtp_port: Port = setting(587, "SMTP port (email; 587 = submission with STARTTLS).", 587)
    starttls: Bool = setting(True, "Upgrade the SMTP connection with STARTTLS before sending (email).")
    ca_certificates: FilePath = setting(
        None, "PEM CA bundle to verify the SMTP or HTTPS server; unset = the system's.", "/etc/ihd-node/ca.crt"
    )
    username: str | None = setting(None, "SMTP login user (email); unset = no login.", "ihd-node")
    password_file: FilePath = setting(None, "File holding the SMTP password (email).", "/etc/ihd-node/smtp.pass")
    sender: str | None = setting(None, "From address (email).", "ihd-node@hospital.example")
    recipients: list[str] = setting(list, "To addresses (email).", ["er-radiology@hospital.example"])

    @model_validator(mode="after")
    def _complete(self) -> AlertChannel:
        if self.kind == "email":
            if not self.smtp_host or not self.sender or not self.recipients:
                raise ValueError("kind email needs smtp_host, sender and recipients; set them")
        elif not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"kind {self.kind} needs url (http:// or https://); set it")
        return self


class AlertsConfig(Section):
    channels: list[AlertChannel] = setting(list, "Where a positive finding is announced; empty = no alerts.")
    console_url: str | None = setting(
        None, "Base URL of the node's web console as the reader reaches it; adds a link to the study page.",
        "https://ihd-node.hospital.example",
    )
    viewer_url: UrlTemplate = setting(
        None, "Viewer link template; placeholders {StudyInstanceUID}, {SeriesInstanceUID}, {AccessionNumber}.",
        "https://ohif.hospital.example/viewer?StudyInstanceUIDs={StudyInstanceUID}",
    )
    include_patient_data: Bool = setting(
        False, "Also put patient name, ID and birth date in alerts (see the README's warning first).",
    )

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: list[AlertChannel]) -> list[AlertChannel]:
        return named_once(value, "channel")

    def channel(self, name: str) -> AlertChannel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)
