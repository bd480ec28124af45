"""The `audit:` section: where the IHE ATNA audit messages go (RFC 5424 syslog over TLS, RFC 5425, or UDP,
RFC 5426) and how this installation names itself in them. Without `syslog` the messages are still made and
kept in the log database (table audit_messages); they are sent once a collector is configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from ihd_node.config.fields import Bool, FilePath, Num, Section, setting

SYSLOG_SCHEMES = ("tls", "udp")


@dataclass(frozen=True)
class SyslogTarget:
    scheme: str  # tls / udp
    host: str
    port: int


def parse_syslog(value: str) -> SyslogTarget:
    """`tls://host:6514` or `udp://host:514` (the port defaults to 6514 for TLS, 514 for UDP)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in SYSLOG_SCHEMES:
        raise ValueError(f"{value!r} does not start with tls:// or udp://; write e.g. tls://collector.example:6514 "
                         "(syslog over TLS, RFC 5425) or udp://collector.example:514 (RFC 5426)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r} has a port that is not a number 1-65535") from None
    if not parts.hostname:
        raise ValueError(f"{value!r} names no host; write {parts.scheme}://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"{value!r} has more than scheme, host and port; write {parts.scheme}://HOST:PORT")
    return SyslogTarget(parts.scheme, parts.hostname, port or (6514 if parts.scheme == "tls" else 514))


def _syslog(value: str | None) -> str | None:
    if value is not None:
        parse_syslog(value)
    return value


def _token(value: str | None) -> str | None:
    if value is not None and (not value.strip() or any(c.isspace() for c in value.strip())):
        raise ValueError("is empty or has spaces; use a short identifier without spaces")
    return value.strip() if value else value


SyslogURL = Annotated[str | None, Field(strict=True), AfterValidator(_syslog)]
Token = Annotated[str | None, Field(strict=True), AfterValidator(_token)]


class AuditConfig(Section):
    syslog: SyslogURL = setting(
        None, "The audit collector: `tls://HOST:PORT` (RFC 5425, the server certificate verified against "
        "`ca_certificates`) or `udp://HOST:PORT` (RFC 5426, unprotected; for a collector on the same host or "
        "network segment). Unset: messages are kept in the log database only.", "tls://collector.example:6514")
    ca_certificates: FilePath = setting(
        None, "PEM CA bundle that signed the collector's certificate (tls://); unset = the system CAs.",
        "/etc/ihd-node/tls/audit-ca.crt")
    certificate: FilePath = setting(
        None, "PEM client certificate, if the collector asks for one (mutual TLS).", "/etc/ihd-node/tls/node.crt")
    private_key: FilePath = setting(None, "PEM private key of the client certificate.", "/etc/ihd-node/tls/node.key")
    source_id: Token = setting(
        None, "AuditSourceID of this installation, unique in the enterprise; unset = ihd-node@<host name>.",
        "ihd-node-ct-ward")
    site_id: Token = setting(None, "AuditEnterpriseSiteID: the hospital or site the node belongs to.", "st-elsewhere")
    patient_ids: Bool = setting(
        False, "Name the patient, by Patient ID only, in the audit messages (PS3.15 A.5.3 asks for it); the log "
        "database then holds patient IDs in its audit tables. Off: the messages name studies only and no patient "
        "ID is stored anywhere. Never a name or birth date either way.")
    retry_max_seconds: Num = setting(
        30.0, "Longest wait between tries while the collector is unreachable (messages wait in the database).",
        30, gt=0)
    timeout: Num = setting(10.0, "Seconds to connect to the collector and to write to it.", 10, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> AuditConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together; set both or neither")
        udp = self.syslog is not None and parse_syslog(self.syslog).scheme == "udp"
        if udp and (self.ca_certificates or self.certificate):
            raise ValueError("ca_certificates/certificate are for tls://; a udp:// collector uses no TLS: use "
                             "tls://HOST:6514, or remove them")
        return self

    @property
    def target(self) -> SyslogTarget | None:
        return parse_syslog(self.syslog) if self.syslog else None


def describe(audit: Any) -> str:
    """The summary line check-config and the start-up log show."""
    if not audit.syslog:
        return "audit: IHE ATNA messages kept in the log database; no collector (set audit.syslog to send them)"
    t = audit.target
    how = "TLS, RFC 5425" if t.scheme == "tls" else "UDP, RFC 5426, unprotected"
    return f"audit: IHE ATNA messages to {t.host}:{t.port} ({how}), kept in the log database as well"
