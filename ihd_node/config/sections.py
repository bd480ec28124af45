"""The node's typed configuration, read from config.yaml.

Every section forbids unknown keys, so a typo stops the node at start instead of silently using a
default. Errors become one `ConfigError` whose lines each name the key path, the file, the bad value
and the fix. Only the keys of the issue-3 example are needed; everything else has a default.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError


class ConfigError(UserError):
    """The config file is missing, not YAML, or holds an unknown key or a bad value."""


# ---------------------------------------------------------------- value types with their own messages


def _ae_title(value: str) -> str:
    # Leading/trailing spaces are not significant in the AE VR (PS3.5 6.2); compare stripped titles.
    title = value.strip(" ")
    if not title:
        raise ValueError("is empty or all spaces (an AE title has 1-16 characters)")
    if len(title) > 16:
        raise ValueError(f"is {len(title)} characters long (an AE title has at most 16)")
    if "\\" in title or any(ord(c) < 32 or ord(c) == 127 for c in title):
        raise ValueError("contains a backslash or a control character, which AE titles may not")
    if not title.isascii():
        raise ValueError("contains non-ASCII characters, which AE titles may not")
    return title


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("is not a port number (1-65535)")
    return value


def _host(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; give a host name or IP address")
    return value.strip()


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError("is not an IP address or CIDR network") from None
    return value.strip()


def _regex(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None
    return value


def _named_once(items: list[Any], what: str) -> list[Any]:
    """`items` unchanged when no two share a `name`; else the error naming the first repeated one."""
    names = [item.name for item in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"name `{dupes[0]}` is used twice; give each {what} its own name")
    return items


def _relative_to_config(value: Path | None, info: ValidationInfo) -> Path | None:
    # Relative paths in a file mean "next to the file", not "wherever the service was started from".
    if value is None:
        return None
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


def _existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    value = _relative_to_config(value, info)
    if value is not None and (info.context or {}).get("check_files") and not value.is_file():
        raise ValueError("does not exist or is not a file; give the path of an existing file")
    return value


# Numbers and switches are strict so that `port: yes` or `gradcam: 1` are errors, not silent coercions.
Int = Annotated[int, Field(strict=True)]
Num = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
AETitle = Annotated[str, Field(strict=True), AfterValidator(_ae_title)]
Port = Annotated[int, Field(strict=True), AfterValidator(_port)]
Host = Annotated[str, Field(strict=True), AfterValidator(_host)]
Network = Annotated[str, Field(strict=True), AfterValidator(_network)]
Regex = Annotated[str | None, AfterValidator(_regex)]
LocalPath = Annotated[Path, AfterValidator(_relative_to_config)]
FilePath = Annotated[Path | None, AfterValidator(_existing_file)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------- sections


def _f(default: Any = ..., doc: str = "", example: Any = None, **kw: Any) -> Any:
    """A Field with its meaning and one example; both feed error messages and docs/configuration.md."""
    examples = [example] if example is not None else None
    if callable(default) and not isinstance(default, (str, int, float, Path)):
        return Field(default_factory=default, description=doc, examples=examples, **kw)
    return Field(default, description=doc, examples=examples, **kw)


class InboundTLS(_Section):
    enabled: Bool = _f(False, "Accept DICOM TLS on the node's port (then only TLS).")
    certificate: FilePath = _f(None, "PEM server certificate (chain).", "/etc/ihd-node/tls/node.crt")
    private_key: FilePath = _f(None, "PEM private key of the certificate.", "/etc/ihd-node/tls/node.key")
    ca_certificates: FilePath = _f(
        None, "PEM CA bundle used to verify client certificates.", "/etc/ihd-node/tls/ca.crt"
    )
    require_client_certificate: Bool = _f(
        False, "Refuse clients without a certificate signed by `ca_certificates`."
    )

    @model_validator(mode="after")
    def _complete(self) -> InboundTLS:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("enabled is true but certificate or private_key is not set; set both")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate is true but ca_certificates is not set; set it")
        return self


class NodeConfig(_Section):
    ae_title: AETitle = _f("IHD_AI", "The node's own AE title; calls to another title are refused.", "IHD_AI")
    host: Host = _f("0.0.0.0", "Address to listen on (0.0.0.0 = all IPv4 interfaces).", "0.0.0.0")
    port: Port = _f(11112, "TCP port to listen on.", 11112)
    allowed_calling_aets: list[AETitle] = _f(list, "Calling AE titles let in; empty = any.", ["PACS", "CT1"])
    allowed_addresses: list[Network] = _f(
        list, "Peer IP addresses or CIDR networks let in; empty = any.", ["10.0.0.0/8", "192.168.1.20"]
    )
    max_associations: Int = _f(10, "Concurrent inbound associations.", 10, ge=1)
    acse_timeout: Num = _f(30.0, "Seconds to wait for association messages.", 30, gt=0)
    dimse_timeout: Num = _f(30.0, "Seconds to wait for DIMSE messages.", 30, gt=0)
    network_timeout: Num = _f(30.0, "Seconds of silence before an idle association is closed.", 30, gt=0)
    max_pdu: Int = _f(262144, "Max PDU Length the node announces, bytes; a larger PDU closes the connection.",
                      262144, ge=4096, le=16777216)
    heartbeat_seconds: Num = _f(
        10.0, "How often the running node books a heartbeat (`ihd-node status` tells running from stopped).", 10,
        gt=0,
    )
    tls: InboundTLS = _f(InboundTLS, "DICOM TLS for inbound associations.")

    def address_allowed(self, address: str) -> bool:
        """True when `address` (a peer IP) is in allowed_addresses, or that list is empty."""
        if not self.allowed_addresses:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.allowed_addresses)

    def calling_aet_allowed(self, aet: str) -> bool:
        return not self.allowed_calling_aets or aet.strip(" ") in self.allowed_calling_aets


class StorageConfig(_Section):
    dir: LocalPath = _f(
        Path("/var/lib/ihd-node"), "State directory: spool, results, database.", "/var/lib/ihd-node"
    )
    min_free_mb: Int = _f(1024, "Below this many free MB new data is refused (status 0xA700).", 1024, ge=0)

    @property
    def spool_dir(self) -> Path:
        """Received instances, one folder per series."""
        return self.dir / "spool"

    @property
    def results_dir(self) -> Path:
        """SR and secondary captures waiting in the outbox."""
        return self.dir / "results"


class DatabaseConfig(_Section):
    url: str | None = _f(
        None,
        "SQLAlchemy URL of the log database; unset = `sqlite:///<storage.dir>/ihd.sqlite`. "
        "PostgreSQL: `postgresql+psycopg://user:password@host/dbname`.",
        "sqlite:////var/lib/ihd-node/ihd.sqlite",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url  # parse exactly as the engine will
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not an SQLAlchemy database URL") from None
        _check_database_driver(url)
        base = (info.context or {}).get("base_dir")
        db = url.database
        if url.get_backend_name() == "sqlite" and db and db != ":memory:" and base is not None:
            if not Path(db).is_absolute():  # a relative SQLite file lies next to the config, like other paths
                return url.set(database=str(Path(base) / db)).render_as_string(hide_password=False)
        return value


def _check_database_driver(url: Any) -> None:
    """The URL's database kind must be known to SQLAlchemy and its Python driver installed here.

    Otherwise `serve` would pass the config check and fail opening the database (issue 7 item 11)."""
    from sqlalchemy.exc import NoSuchModuleError

    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"names the database kind `{url.drivername}`, which SQLAlchemy does not know; use "
            "sqlite:////path/ihd.sqlite or postgresql+psycopg://user@host/db"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = getattr(exc, "name", None) or str(exc)
        raise ValueError(
            f"needs the Python driver `{module}`, which is not installed; install it into ihd-node's "
            f"environment (pip install {module}) or choose an installed driver in the URL"
        ) from None


class SeriesConfig(_Section):
    quiet_seconds: Num = _f(
        2.0,
        "A series is complete this long after its last instance, once the "
        "association that brought it is released.",
        2,
        ge=0,
    )
    max_wait_seconds: Num = _f(
        120.0,
        "A series is complete this long after its last instance even if the association is still open, "
        "or while the completion checks still hold it back; then its result is marked PRELIMINARY.",
        120,
        gt=0,
    )
    check_geometry: Bool = _f(
        True,
        "Hold a quiet series back while its slices leave a gap in the middle (instances still missing).",
    )
    check_coverage: Bool = _f(
        True,
        "Hold a quiet series back while its stack does not reach past the cranial cavity at both ends "
        "(skull base and vertex).",
    )
    trust_mpps: list[AETitle] = _f(
        lambda: ["*"],
        "Calling AE titles whose MPPS COMPLETED instance lists the node waits for; `*` = any; "
        "empty = MPPS is answered but not used.",
        ["CT1"],
    )
    modalities: list[str] = _f(lambda: ["CT"], "Modalities analyzed.", ["CT"])
    require_axial: Bool = _f(True, "Only axial series (slice normal near the head-foot axis).")
    axial_tolerance_degrees: Num = _f(
        30.0,
        "Largest angle between slice normal and head-foot axis still called axial (gantry tilt reaches ~30°).",
        30,
        ge=0,
        le=90,
    )
    min_slices: Int = _f(10, "Fewer slices: ignored.", 10, ge=1)
    max_slices: Int = _f(1000, "More slices: ignored.", 1000, ge=1)
    min_slice_thickness_mm: Num | None = _f(None, "Thinner slices: ignored; unset = no limit.", 0.5, ge=0)
    max_slice_thickness_mm: Num | None = _f(10.0, "Thicker slices: ignored; unset = no limit.", 10, gt=0)
    exclude_localizers: Bool = _f(True, "Ignore series whose ImageType says LOCALIZER.")
    selection: Literal["best_per_study", "every_series"] = _f(
        "best_per_study",
        "best_per_study: once no series of the study is still arriving, analyse only its best eligible "
        "series (soft-tissue kernel, axial, 2.5-5 mm, head coverage; README: study-level choice) and record "
        "the others as not_chosen with the reason; every_series: analyse each eligible series.",
    )
    require_head: Bool = _f(
        True,
        "Ignore series that are not a head CT: BodyPartExamined naming another region, or no sampled "
        "slice showing a skull ring around intracranial-density tissue (README: eligibility).",
    )
    description_include: Regex = _f(
        None,
        "If set, only series whose SeriesDescription matches this regex (case-insensitive search).",
        "head|brain",
    )
    description_exclude: Regex = _f(
        None,
        "Series whose SeriesDescription matches this regex (case-insensitive search) are ignored.",
        "bone|scout|dose",
    )
    thin_slice_mm: Num = _f(3.0, "Slices thinner than this are combined into slabs.", 3.0, gt=0)
    slab_mm: Num = _f(
        5.0, "Target slab thickness for thin-slice series (the model was trained on ~5 mm).", 5.0, gt=0
    )

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        if not value or any(not m.strip() for m in value):
            raise ValueError("must list at least one modality code; use e.g. [CT]")
        return [m.strip().upper() for m in value]

    @model_validator(mode="after")
    def _consistent(self) -> SeriesConfig:
        if self.max_wait_seconds < self.quiet_seconds:
            raise ValueError("max_wait_seconds is below quiet_seconds; make it larger")
        if self.max_slices < self.min_slices:
            raise ValueError("max_slices is below min_slices; make it larger")
        lo, hi = self.min_slice_thickness_mm, self.max_slice_thickness_mm
        if lo is not None and hi is not None and hi < lo:
            raise ValueError("max_slice_thickness_mm is below min_slice_thickness_mm; make it larger")
        return self

    def mpps_trusted(self, calling_aet: str | None) -> bool:
        """Whether an MPPS from this calling AE title is evidence of which instances a series has."""
        return "*" in self.trust_mpps or (calling_aet or "").strip() in self.trust_mpps

    def description_allowed(self, description: str | None) -> bool:
        """Apply description_include/description_exclude to a SeriesDescription."""
        text = description or ""
        if self.description_include and not re.search(self.description_include, text, re.IGNORECASE):
            return False
        return not (self.description_exclude and re.search(self.description_exclude, text, re.IGNORECASE))


class OutboundTLS(_Section):
    enabled: Bool = _f(False, "Use DICOM TLS to this destination.")
    ca_certificates: FilePath = _f(
        None, "PEM CA bundle to verify the destination; unset = system CAs.", "/etc/ihd-node/tls/pacs-ca.crt"
    )
    certificate: FilePath = _f(
        None, "PEM client certificate, if the destination asks for one.", "/etc/ihd-node/tls/node.crt"
    )
    private_key: FilePath = _f(
        None, "PEM private key of the client certificate.", "/etc/ihd-node/tls/node.key"
    )

    @model_validator(mode="after")
    def _pair(self) -> OutboundTLS:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together; set both or neither")
        return self


class Destination(_Section):
    name: str = _f(..., "Short name used in the log database and `ihd-node status`.", "pacs")
    ae_title: AETitle = _f(..., "The destination's AE title (called AE).", "PACS")
    host: Host = _f(..., "Host name or IP address of the destination.", "127.0.0.1")
    port: Port = _f(..., "The destination's DICOM port.", 4242)
    timeout: Num = _f(30.0, "Seconds for connect, association and each C-STORE.", 30, gt=0)
    count_instances: Bool = _f(
        False,
        "Before a quiet series is judged complete, ask this destination (C-FIND) how many instances of the "
        "series it holds, and wait while the node has fewer.",
    )
    tls: OutboundTLS = _f(OutboundTLS, "DICOM TLS to this destination.")
    sr_class: Literal["comprehensive3d", "comprehensive", "enhanced"] = _f(
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


class ModelSection(_Section):
    checkpoint: str = _f(
        "default", "`default` (the shipped model) or the path of a checkpoint file.", "default", min_length=1
    )
    device: str = _f("auto", "`auto` (a GPU when present), `cpu`, `cuda` or `cuda:N`.", "auto")
    explain: Literal["decision", "cnn"] = _f(
        "decision", "What the Grad-CAM heatmaps explain: `decision` (the final BiLSTM output of the slice, "
        "back-propagated through the sequence model) or `cnn` (the paper's per-slice CNN).", "decision"
    )

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str, info: ValidationInfo) -> str:
        if value == "default":
            return value
        return str(_existing_file(Path(value), info))

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("is not a device: auto, cpu, cuda or cuda:N")
        return value

    @property
    def checkpoint_path(self) -> str | Path:
        """What Predictor.load takes: the string "default" or a Path."""
        return self.checkpoint if self.checkpoint == "default" else Path(self.checkpoint)


class AnalysisConfig(_Section):
    max_queue: Int = _f(
        32, "Series waiting for the model; above it new associations are refused (busy).", 32, ge=1
    )
    max_secondary_captures: Int = _f(16, "Most Grad-CAM images sent per series.", 16, ge=0)
    gradcam: Bool = _f(True, "Make Grad-CAM secondary captures for positive slices.")
    thresholds: dict[str, Num] = _f(
        dict, "Per-class probability thresholds that override the model's.", {"any": 0.4}
    )

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for name, thr in value.items():
            if name not in CLASSES:
                raise ValueError(f"has unknown class `{name}`; classes are {', '.join(CLASSES)}")
            if not 0.0 < thr < 1.0:
                raise ValueError(f"has threshold {thr} for {name}; use a probability between 0 and 1")
        return value


class DeliveryConfig(_Section):
    retry_initial_seconds: Num = _f(5.0, "Wait before the first retry; doubles per attempt.", 5, gt=0)
    retry_max_seconds: Num = _f(300.0, "Longest wait between retries.", 300, gt=0)
    give_up_after_seconds: Num = _f(
        86400.0, "An object not delivered this long after it was queued is marked failed.", 86400, gt=0
    )

    @model_validator(mode="after")
    def _order(self) -> DeliveryConfig:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds is below retry_initial_seconds; make it larger")
        return self

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after `attempts` failed tries (exponential, capped)."""
        return min(self.retry_initial_seconds * 2.0 ** max(attempts - 1, 0), self.retry_max_seconds)


class ClusterConfig(_Section):
    stat_priorities: list[str] = _f(
        list,
        "Values of the source's Requested Procedure Priority (0040,1003) that make a series' analysis job "
        "STAT (run before normal jobs). Empty: none. Used when roles run in separate processes.",
        ["STAT"],
    )
    stat_accession_patterns: list[Regex] = _f(
        list, "Regular expressions; an AccessionNumber matching one makes the job STAT.", ["^ER"]
    )
    stalled_seconds: Num = _f(
        30.0,
        "A worker silent this long is taken for dead: its job is run again by another worker. At least "
        "3 x node.heartbeat_seconds + 2 is used.",
        30,
        gt=0,
    )


class RetentionConfig(_Section):
    spool_keep_hours: Num = _f(
        24.0,
        "Hours to keep a series' received files after its results were "
        "delivered (or it was ignored); 0 = remove at once.",
        24,
        ge=0,
    )


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _f(
        "INFO", "Lowest level written to stdout.", "INFO"
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


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


class AlertChannel(_Section):
    name: str = _f(..., "Short name used in the log database (one alert per series, revision and channel).", "er")
    kind: Literal["webhook", "teams", "slack", "email"] = _f(
        ..., "`webhook` (generic JSON POST), `teams` / `slack` (incoming-webhook formats) or `email` (SMTP).",
        "teams",
    )
    url: str | None = _f(None, "The webhook's URL (webhook, teams, slack).", "https://hooks.example.org/T0/B0")
    timeout: Num = _f(10.0, "Seconds for connect and answer.", 10, gt=0)
    smtp_host: str | None = _f(None, "SMTP server (email).", "smtp.example.org")
    smtp_port: Port = _f(587, "SMTP port (email; 587 = submission with STARTTLS).", 587)
    starttls: Bool = _f(True, "Upgrade the SMTP connection with STARTTLS before sending (email).")
    ca_certificates: FilePath = _f(
        None, "PEM CA bundle to verify the SMTP or HTTPS server; unset = the system's.", "/etc/ihd-node/ca.crt"
    )
    username: str | None = _f(None, "SMTP login user (email); unset = no login.", "ihd-node")
    password_file: FilePath = _f(None, "File holding the SMTP password (email).", "/etc/ihd-node/smtp.pass")
    sender: str | None = _f(None, "From address (email).", "ihd-node@hospital.example")
    recipients: list[str] = _f(list, "To addresses (email).", ["er-radiology@hospital.example"])

    @model_validator(mode="after")
    def _complete(self) -> AlertChannel:
        if self.kind == "email":
            if not self.smtp_host or not self.sender or not self.recipients:
                raise ValueError("kind email needs smtp_host, sender and recipients; set them")
        elif not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"kind {self.kind} needs url (http:// or https://); set it")
        return self


class AlertsConfig(_Section):
    channels: list[AlertChannel] = _f(list, "Where a positive finding is announced; empty = no alerts.")
    console_url: str | None = _f(
        None, "Base URL of the node's web console as the reader reaches it; adds a link to the study page.",
        "https://ihd-node.hospital.example",
    )
    viewer_url: UrlTemplate = _f(
        None, "Viewer link template; placeholders {StudyInstanceUID}, {SeriesInstanceUID}, {AccessionNumber}.",
        "https://ohif.hospital.example/viewer?StudyInstanceUIDs={StudyInstanceUID}",
    )
    include_patient_data: Bool = _f(
        False, "Also put patient name, ID and birth date in alerts (see the README's warning first).",
    )

    @field_validator("channels")
    @classmethod
    def _unique(cls, value: list[AlertChannel]) -> list[AlertChannel]:
        return _named_once(value, "channel")

    def channel(self, name: str) -> AlertChannel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)


class WebAuth(_Section):
    token_file: FilePath = _f(
        None, "File holding a bearer token (`Authorization: Bearer TOKEN`; scripts, Prometheus).",
        "/etc/ihd-node/web.token",
    )
    users_file: FilePath = _f(
        None, "Basic-auth users, one `user:hash` a line (`ihd-node web-user FILE USER` writes them).",
        "/etc/ihd-node/web.users",
    )

    @property
    def configured(self) -> bool:
        return self.token_file is not None or self.users_file is not None


class WebConfig(_Section):
    enabled: Bool = _f(True, "Serve the web console, /healthz and /metrics.")
    host: Host = _f("127.0.0.1", "Address of the console; anything but loopback needs `auth`.", "127.0.0.1")
    port: Annotated[int, Field(strict=True, ge=0, le=65535)] = _f(
        8112, "TCP port of the console (0 = any free port).", 8112
    )
    refresh_seconds: Int = _f(5, "How often the console pages reload themselves.", 5, ge=1)
    auth: WebAuth = _f(WebAuth, "Who may see the console and use its actions (re-send, re-analyse).")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @model_validator(mode="after")
    def _auth_beyond_loopback(self) -> WebConfig:
        if self.enabled and not self.loopback and not self.auth.configured:
            raise ValueError(
                f"host {self.host} is reachable from other machines but auth is not set; set auth.token_file "
                "or auth.users_file, or keep host 127.0.0.1 (TLS: put a reverse proxy in front, see the README)"
            )
        return self


class Config(_Section):
    node: NodeConfig = _f(NodeConfig, "How the node listens and whom it lets in.")
    storage: StorageConfig = _f(StorageConfig, "Where received data lies.")
    database: DatabaseConfig = _f(DatabaseConfig, "The log database.")
    series: SeriesConfig = _f(SeriesConfig, "When a series is complete and which series are analyzed.")
    destinations: list[Destination] = _f(list, "Where results are sent (C-STORE).")
    model: ModelSection = _f(ModelSection, "Which model runs where.")
    analysis: AnalysisConfig = _f(AnalysisConfig, "Queue and result options.")
    delivery: DeliveryConfig = _f(DeliveryConfig, "Outbox retry policy (result deliveries and alerts).")
    alerts: AlertsConfig = _f(AlertsConfig, "Notifications of positive findings.")
    web: WebConfig = _f(WebConfig, "The web console, /healthz and /metrics.")
    retention: RetentionConfig = _f(RetentionConfig, "Spool clean-up.")
    cluster: ClusterConfig = _f(ClusterConfig, "Job priorities and heartbeats of a multi-machine node.")
    logging: LoggingConfig = _f(LoggingConfig, "Log output.")

    _source: Path | None = PrivateAttr(default=None)  # the file it was read from, for messages

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `node:` with nothing under it reads as null in YAML: treat it as "all defaults".
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _derived(self) -> Config:
        if self.database.url is None:
            self.database.url = f"sqlite:///{self.storage.dir / 'ihd.sqlite'}"
        return self

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        return _named_once(value, "destination")

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def database_url(self) -> str:
        assert self.database.url is not None  # filled in by _derived
        return self.database.url

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


# ---------------------------------------------------------------- loading and messages


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key `{key}` appears twice in one section; keep one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `list[Destination]` or `InboundTLS | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _field_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """(model holding the last key of loc, that key's FieldInfo or None)."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        info = model.model_fields.get(str(part))
        model = _model_in(info.annotation) if info is not None else None
    last = loc[-1] if loc else None
    if model is None or not isinstance(last, str):
        return model, None
    return model, model.model_fields.get(last)


def _show(value: Any) -> str:
    # YAML spelling: "text", true/false, null.
    return json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)


_NOT_A = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "text",
    "list": "a list",
    "dict": "a mapping of keys to values",
    "model": "a mapping of keys to values",
}


def _describe(err: Mapping[str, Any], where: str) -> str:
    loc = tuple(err["loc"])
    key = _key_path(loc) or "(top level)"
    model, info = _field_at(loc)
    example = info.examples[0] if info is not None and info.examples else None
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"known keys here: {', '.join(known)}"
        return f"unknown key `{key}` in {where}; {hint}"
    if kind == "missing":
        leaf = loc[-1]
        fix = f"add it, e.g. `{leaf}: {_show(example)}`" if example is not None else "add it"
        return f"{key} in {where}: missing; {fix}"
    if kind == "value_error":
        reason = str(err["ctx"]["error"])
    elif kind.split("_")[0] in _NOT_A and kind.endswith(("_type", "_parsing", "_from_float")):
        reason = f"is not {_NOT_A[kind.split('_')[0]]}"
    else:
        msg = str(err["msg"])
        reason = msg.replace("Input should", "should", 1) if msg.startswith("Input should") else msg
    value = err.get("input")
    # Whole sections or lists of them are too long to echo; the key path says where to look.
    structured = isinstance(value, Mapping) or (
        isinstance(value, list) and any(isinstance(v, Mapping) for v in value)
    )
    shown = "" if structured else f"{_show(value)} "
    fix = f"; use e.g. {_show(example)}" if example is not None and ";" not in reason else ""
    return f"{key} in {where}: {shown}{reason}{fix}"


def _validate(data: Any, where: str, base_dir: Path | None, check_files: bool) -> Config:
    try:
        return Config.model_validate(data, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as exc:
        lines = [_describe(e, where) for e in exc.errors(include_url=False)]
        if len(lines) == 1:
            raise ConfigError(lines[0]) from None
        listing = "\n".join(f"  {line}" for line in lines)
        raise ConfigError(f"{len(lines)} problems in {where}:\n{listing}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError with key, file and fix on any problem."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; start from config.yaml of the ihd-node sources") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory; give the path of the config file itself") from None
    except PermissionError:
        raise ConfigError(f"{where}: permission denied; make it readable by the ihd-node user") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8 text; save it as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        fix = "" if ";" in problem else "; fix the syntax there"
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}{fix}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: the top level must be a mapping of sections (node:, storage:, "
            f"database:, series:, destinations:, model:), not {type(data).__name__}"
        )
    config = _validate(data, where, path.resolve().parent, check_files=True)
    config._source = path
    return config


def default_config(tmpdir: str | Path, **sections: Any) -> Config:
    """A Config built in code (demo, tests): storage and database under tmpdir; sections override defaults,
    e.g. default_config(tmp, node={"port": 5104}, destinations=[{...}]). The web console takes any free port
    (many nodes run side by side in tests); `node.web.port` says which."""
    data: dict[str, Any] = {"storage": {"dir": str(tmpdir)}, "web": {"port": 0}}
    for name, value in sections.items():
        if isinstance(value, Mapping) and isinstance(data.get(name), Mapping):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return _validate(data, "default_config()", Path(tmpdir), check_files=False)


def summary(config: Config) -> list[str]:
    """A few lines an admin can check at a glance (used by check-config and at start-up)."""
    from sqlalchemy.engine import make_url

    n, s = config.node, config.series
    who = ", ".join(n.allowed_calling_aets) or "any calling AE"
    where = ", ".join(n.allowed_addresses) or "any address"
    dests = (
        ", ".join(
            f"{d.name} = {d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls.enabled else ''}"
            for d in config.destinations
        )
        or "none (results are kept, not sent)"
    )
    thick = "" if s.max_slice_thickness_mm is None else f", slices <= {s.max_slice_thickness_mm:g} mm"
    gradcam = "on" if config.analysis.gradcam else "off"
    return [
        f"node: AE {n.ae_title} on {n.host}:{n.port}, TLS {'on' if n.tls.enabled else 'off'}; "
        f"lets in {who} from {where}",
        f"storage: {config.storage.dir} (refuses data below {config.storage.min_free_mb} MB free)",
        f"database: {make_url(config.database_url).render_as_string(hide_password=True)}",
        f"series: complete {s.quiet_seconds:g} s after the last instance (at most {s.max_wait_seconds:g} s); "
        f"{'/'.join(s.modalities)}{', axial' if s.require_axial else ''}, "
        f"{s.min_slices}-{s.max_slices} slices{thick}",
        f"destinations: {dests}",
        f"model: {config.model.checkpoint} on {config.model.device}; Grad-CAM {gradcam} "
        f"(at most {config.analysis.max_secondary_captures} images per series)",
    ]


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_dir_problem(path: Path, what: str) -> str | None:
    """Why `path` (a folder the node creates or writes into) cannot be used, or None when it can."""
    import os

    if path.exists():
        if not path.is_dir():
            return f"{what} {path} is not a folder; point it at a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{what} {path} is not writable by this user; chown it to the ihd-node user or choose another"
        return None
    base = _nearest_existing(path)
    if not base.is_dir():
        return f"{what} {path} cannot be created: {base} is a file, not a folder; choose another path"
    if not os.access(base, os.W_OK | os.X_OK):
        return (f"{what} {path} cannot be created: {base} is not writable by this user; create it "
                "(owned by the ihd-node user) or choose another path")
    return None


def runtime_problems(config: Config) -> list[str]:
    """What would stop `serve` on this machine although the file itself is valid: folders it cannot create
    or write. Checked by `check-config` and at the start of `serve` (not by status/log, which only read)."""
    from sqlalchemy.engine import make_url

    where = str(config.source) if config.source else "the config"
    problems = []
    storage = _writable_dir_problem(Path(config.storage.dir), "storage.dir")
    if storage:
        problems.append(f"{storage} ({where})")
    url = make_url(config.database_url)
    db = url.database
    if url.get_backend_name() == "sqlite" and db and db != ":memory:" and not db.startswith("file:"):
        file = Path(db)
        parent_problem = _writable_dir_problem(file.parent, "the folder of the SQLite database")
        if file.is_dir():
            problems.append(f"database.url: {file} is a folder, not a database file ({where})")
        elif parent_problem and Path(config.storage.dir) not in (file.parent, *file.parent.parents):
            problems.append(f"database.url: {parent_problem} ({where})")
    return problems


def check_config_command(args: Any) -> int:
    """`ihd-node check-config FILE`: validate without starting; exit 0 when fine, 2 otherwise."""
    import sys

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"ihd-node check-config: error: {exc}", file=sys.stderr)
        return 2
    problems = runtime_problems(config)
    if problems:
        for line in problems:
            print(f"ihd-node check-config: error: {line}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK")
    for line in summary(config):
        print(f"  {line}")
    return 0


def reference_markdown() -> str:
    """The key reference table of docs/configuration.md, generated from the models so it cannot drift."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _model_in(info.annotation)
            is_list = typing.get_origin(info.annotation) is list
            if sub is not None and not is_list:
                walk(sub, f"{key}.")
                continue
            if sub is not None:
                rows.append(f"| `{key}` | list of mappings | `[]` | {info.description} |")
                walk(sub, f"{key}[].")
                continue
            if info.is_required():
                default = "required"
            else:
                value = info.get_default(call_default_factory=True)
                default = f"`{json.dumps(value if not isinstance(value, Path) else str(value))}`"
            rows.append(f"| `{key}` | {_type_name(info.annotation)} | {default} | {info.description} |")

    walk(Config, "")
    return "\n".join(rows) + "\n"


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    names = {
        int: "integer",
        float: "number",
        bool: "true/false",
        str: "text",
        Path: "path",
        type(None): "null",
    }
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))
