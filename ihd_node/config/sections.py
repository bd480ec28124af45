"""The node's typed configuration, read from config.yaml: one pydantic model per section.

Every section forbids unknown keys, so a typo stops the node at start instead of silently using a
default. Only the keys of the issue-3 example are needed; everything else has a default.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import PrivateAttr, ValidationInfo, field_validator, model_validator

from ihd_node.classes import CLASSES
from ihd_node.config.audit import AuditConfig
from ihd_node.config.fields import (
    AETitle,
    Bool,
    FilePath,
    Host,
    Int,
    LocalPath,
    Network,
    Num,
    Port,
    Regex,
    Section,
    existing_file,
    named_once,
    setting,
)
from ihd_node.config.monitoring import MonitoringConfig
from ihd_node.config.outbound import AlertsConfig, AnyDestination, DeliveryConfig, DicomDestination
from ihd_node.config.web import WebAuth, WebConfig, WebOidc  # noqa: F401 - re-exported


class InboundTLS(Section):
    enabled: Bool = setting(False, "Accept DICOM TLS on the node's port (then only TLS).")
    certificate: FilePath = setting(None, "PEM server certificate (chain).", "/etc/ihd-node/tls/node.crt")
    private_key: FilePath = setting(None, "PEM private key of the certificate.", "/etc/ihd-node/tls/node.key")
    ca_certificates: FilePath = setting(
        None, "PEM CA bundle used to verify client certificates.", "/etc/ihd-node/tls/ca.crt"
    )
    require_client_certificate: Bool = setting(
        False, "Refuse clients without a certificate signed by `ca_certificates`."
    )

    @model_validator(mode="after")
    def _complete(self) -> InboundTLS:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("enabled is true but certificate or private_key is not set; set both")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate is true but ca_certificates is not set; set it")
        return self


class NodeConfig(Section):
    ae_title: AETitle = setting("IHD_AI", "The node's own AE title; calls to another title are refused.", "IHD_AI")
    host: Host = setting("0.0.0.0", "Address to listen on (0.0.0.0 = all IPv4 interfaces).", "0.0.0.0")
    port: Port = setting(11112, "TCP port to listen on.", 11112)
    allowed_calling_aets: list[AETitle] = setting(list, "Calling AE titles let in; empty = any.", ["PACS", "CT1"])
    allowed_addresses: list[Network] = setting(
        list, "Peer IP addresses or CIDR networks let in; empty = any.", ["10.0.0.0/8", "192.168.1.20"]
    )
    max_associations: Int = setting(10, "Concurrent inbound associations.", 10, ge=1)
    acse_timeout: Num = setting(30.0, "Seconds to wait for association messages.", 30, gt=0)
    dimse_timeout: Num = setting(30.0, "Seconds to wait for DIMSE messages.", 30, gt=0)
    network_timeout: Num = setting(30.0, "Seconds of silence before an idle association is closed.", 30, gt=0)
    max_pdu: Int = setting(262144, "Max PDU Length the node announces, bytes; a larger PDU closes the connection.",
                      262144, ge=4096, le=16777216)
    heartbeat_seconds: Num = setting(
        10.0, "How often the running node books a heartbeat (`ihd-node status` tells running from stopped).", 10,
        gt=0,
    )
    tls: InboundTLS = setting(InboundTLS, "DICOM TLS for inbound associations.")

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


class StorageConfig(Section):
    dir: LocalPath = setting(
        Path("/var/lib/ihd-node"), "State directory: spool, results, database.", "/var/lib/ihd-node"
    )
    min_free_mb: Int = setting(1024, "Below this many free MB new data is refused (status 0xA700).", 1024, ge=0)

    @property
    def spool_dir(self) -> Path:
        """Received instances, one folder per series."""
        return self.dir / "spool"

    @property
    def results_dir(self) -> Path:
        """SR and secondary captures waiting in the outbox."""
        return self.dir / "results"


class DatabaseConfig(Section):
    url: str | None = setting(
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


class SeriesConfig(Section):
    quiet_seconds: Num = setting(
        2.0,
        "A series is complete this long after its last instance, once the "
        "association that brought it is released.",
        2,
        ge=0,
    )
    max_wait_seconds: Num = setting(
        120.0,
        "A series is complete this long after its last instance even if the association is still open, "
        "or while the completion checks still hold it back; then its result is marked INCOMPLETE SERIES "
        "(SR CompletionFlag PARTIAL).",
        120,
        gt=0,
    )
    check_geometry: Bool = setting(
        True,
        "Hold a quiet series back while its slices leave a gap in the middle (instances still missing).",
    )
    check_coverage: Bool = setting(
        True,
        "Hold a quiet series back while its stack does not reach past the cranial cavity at both ends "
        "(skull base and vertex).",
    )
    trust_mpps: list[AETitle] = setting(
        lambda: ["*"],
        "Calling AE titles whose MPPS COMPLETED instance lists the node waits for; `*` = any; "
        "empty = MPPS is answered but not used.",
        ["CT1"],
    )
    modalities: list[str] = setting(lambda: ["CT"], "Modalities analyzed.", ["CT"])
    require_axial: Bool = setting(True, "Only axial series (slice normal near the head-foot axis).")
    axial_tolerance_degrees: Num = setting(
        30.0,
        "Largest angle between slice normal and head-foot axis still called axial (gantry tilt reaches ~30°).",
        30,
        ge=0,
        le=90,
    )
    min_slices: Int = setting(10, "Fewer slices: ignored.", 10, ge=1)
    max_slices: Int = setting(1000, "More slices: ignored.", 1000, ge=1)
    min_slice_thickness_mm: Num | None = setting(None, "Thinner slices: ignored; unset = no limit.", 0.5, ge=0)
    max_slice_thickness_mm: Num | None = setting(10.0, "Thicker slices: ignored; unset = no limit.", 10, gt=0)
    exclude_localizers: Bool = setting(True, "Ignore series whose ImageType says LOCALIZER.")
    selection: Literal["best_per_study", "every_series"] = setting(
        "best_per_study",
        "best_per_study: once no series of the study is still arriving, analyse only its best eligible "
        "series (soft-tissue kernel, axial, 2.5-5 mm, head coverage; README: study-level choice) and record "
        "the others as not_chosen with the reason; every_series: analyse each eligible series.",
    )
    require_head: Bool = setting(
        True,
        "Ignore series that are not a head CT: BodyPartExamined naming another region, or no sampled "
        "slice showing a skull ring around intracranial-density tissue (README: eligibility).",
    )
    description_include: Regex = setting(
        None,
        "If set, only series whose SeriesDescription matches this regex (case-insensitive search).",
        "head|brain",
    )
    description_exclude: Regex = setting(
        None,
        "Series whose SeriesDescription matches this regex (case-insensitive search) are ignored.",
        "bone|scout|dose",
    )
    thin_slice_mm: Num = setting(3.0, "Slices thinner than this are combined into slabs.", 3.0, gt=0)
    slab_mm: Num = setting(
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


class ModelSection(Section):
    checkpoint: str = setting(
        "default", "`default` (the shipped model) or the path of a checkpoint file.", "default", min_length=1
    )
    device: str = setting("auto", "`auto` (a GPU when present), `cpu`, `cuda` or `cuda:N`.", "auto")
    explain: Literal["decision", "cnn"] = setting(
        "decision", "What the Grad-CAM heatmaps explain: `decision` (the final BiLSTM output of the slice, "
        "back-propagated through the sequence model) or `cnn` (the paper's per-slice CNN).", "decision"
    )

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str, info: ValidationInfo) -> str:
        if value == "default":
            return value
        return str(existing_file(Path(value), info))

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


class AnalysisConfig(Section):
    max_queue: Int = setting(
        32, "Series waiting for the model; above it new associations are refused (busy).", 32, ge=1
    )
    max_secondary_captures: Int = setting(16, "Most Grad-CAM images sent per series.", 16, ge=0)
    gradcam: Bool = setting(True, "Make Grad-CAM secondary captures for positive slices.")
    thresholds: dict[str, Num] = setting(
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


class ClusterConfig(Section):
    stat_priorities: list[str] = setting(
        list,
        "Values of the source's Requested Procedure Priority (0040,1003) that make a series' analysis job "
        "STAT (run before normal jobs). Empty: none. Used when roles run in separate processes.",
        ["STAT"],
    )
    stat_accession_patterns: list[Regex] = setting(
        list, "Regular expressions; an AccessionNumber matching one makes the job STAT.", ["^ER"]
    )
    stalled_seconds: Num = setting(
        30.0,
        "A worker silent this long is taken for dead: its job is run again by another worker. At least "
        "3 x node.heartbeat_seconds + 2 is used.",
        30,
        gt=0,
    )


class RetentionConfig(Section):
    spool_keep_hours: Num = setting(
        24.0,
        "Hours to keep a series' received files after its results were "
        "delivered (or it was ignored); 0 = remove at once.",
        24,
        ge=0,
    )


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = setting(
        "INFO", "Lowest level written to stdout.", "INFO"
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Config(Section):
    node: NodeConfig = setting(NodeConfig, "How the node listens and whom it lets in.")
    storage: StorageConfig = setting(StorageConfig, "Where received data lies.")
    database: DatabaseConfig = setting(DatabaseConfig, "The log database.")
    series: SeriesConfig = setting(SeriesConfig, "When a series is complete and which series are analyzed.")
    destinations: list[AnyDestination] = setting(
        list, "Where results are sent: `kind` dicom (C-STORE, the default), hl7 (ORU^R01 over MLLP), fhir "
        "(FHIR R4 transaction) or dicomweb (STOW-RS); see the destination kinds in docs/configuration.md.")
    model: ModelSection = setting(ModelSection, "Which model runs where.")
    analysis: AnalysisConfig = setting(AnalysisConfig, "Queue and result options.")
    delivery: DeliveryConfig = setting(DeliveryConfig, "Outbox retry policy (result deliveries and alerts).")
    alerts: AlertsConfig = setting(AlertsConfig, "Notifications of positive findings.")
    web: WebConfig = setting(WebConfig, "The web console, /healthz and /metrics.")
    retention: RetentionConfig = setting(RetentionConfig, "Spool clean-up.")
    cluster: ClusterConfig = setting(ClusterConfig, "Job priorities and heartbeats of a multi-machine node.")
    monitoring: MonitoringConfig = setting(MonitoringConfig, "Drift of the input mix and the scores after go-live.")
    audit: AuditConfig = setting(AuditConfig, "The IHE ATNA audit trail: where its syslog messages go.")
    logging: LoggingConfig = setting(LoggingConfig, "Log output.")

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
    def _unique_names(cls, value: list[AnyDestination]) -> list[AnyDestination]:
        return named_once(value, "destination")

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def database_url(self) -> str:
        assert self.database.url is not None  # filled in by _derived
        return self.database.url

    def destination(self, name: str) -> AnyDestination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    @property
    def dicom_destinations(self) -> list[DicomDestination]:
        """The C-STORE destinations (C-ECHO, C-FIND instance counts and SR classes concern only these)."""
        return [d for d in self.destinations if isinstance(d, DicomDestination)]
