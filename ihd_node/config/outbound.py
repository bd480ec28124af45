"""Sections for what the node sends: DICOM destinations (with TLS), the outbox retry policy, and
alert channels."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, field_validator, model_validator

from ihd_node.config.fields import AETitle, Bool, FilePath, Host, Num, Port, Section, named_once, setting


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


class Destination(Section):
    name: str = setting(..., "Short name used in the log database and `ihd-node status`.", "pacs")
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

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError("is not a short name (1-64 letters, digits, `_`, `.`, `-`)")
        return value


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
