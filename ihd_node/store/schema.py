"""The log database's tables and the types their columns use: what happened to every study, series,
instance, analysis and result delivery.

It is also the node's durable state: series states and the delivery outbox live here, so a restart
resumes from it. SQLite in WAL mode by default; queries use only portable SQLAlchemy constructs, so
any SQLAlchemy URL works. No patient name or birth date is stored, and no patient ID unless the site turns
on audit.patient_ids (then only in the audit trail: audit_messages, audit_patients). UIDs and the accession
number are enough to find a study.

Only tables and types: the migrations (ihd_node.store.migrations) import this module and nothing else
of the store.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError

# meta.schema_version: 1 = the release before Alembic; 2 = managed by Alembic (alembic_version
# holds the revision). The previous release refuses a value above 1.
SCHEMA_VERSION = 2

# Series life cycle (design.md): received -> complete -> analyzing -> delivering -> delivered;
# "analyzed" is final when there are no destinations; ignored / failed carry a reason.
SERIES_STATES = (
    "received",
    "complete",
    "analyzing",
    "analyzed",
    "delivering",
    "delivered",
    "ignored",
    "not_chosen",  # eligible, but another series of its study was analysed instead (series.selection)
    "failed",
    "retracted",  # its result was taken back (ihd-node retract); a late instance does not re-analyse it
)
UNFINISHED_STATES = ("received", "complete", "analyzing")
IN_FLIGHT_STATES = (*UNFINISHED_STATES, "delivering")  # what `ihd-node status` and the console list
SERIES_TIMES = (
    "first_received",
    "last_received",
    "association_released",
    "completed",
    "analysis_started",
    "analysis_finished",
    "delivered",
    "spool_removed",
)
DELIVERY_STATES = ("pending", "sent", "failed", "rejected", "cancelled")
# deliveries.sop_class_uid of a message row (not a DICOM object): an HL7 ORU file, a FHIR Bundle file.
HL7_ORU, FHIR_BUNDLE = "hl7-oru", "fhir-bundle"
MESSAGE_CLASSES = (HL7_ORU, FHIR_BUNDLE)
TIMING_KEYS = ("load", "inference", "gradcam", "report")


class DatabaseError(UserError):
    """The database cannot be opened or has an unexpected schema."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone: store naive UTC, read back as UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                "naive datetime given to the database; use ihd_node.store.utcnow() or an aware time"
            )
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the database itself (schema version)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    first_received: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    completion_rule: Mapped[str | None] = mapped_column(String(16))  # "quiet" or "max_wait"
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    last_association: Mapped[str | None] = mapped_column(String(64))  # id of the association that last sent
    revision: Mapped[int] = mapped_column(Integer, default=0)  # analyses done; >1 means re-analysis
    first_received: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received: Mapped[datetime] = mapped_column(UTCDateTime)
    association_released: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed: Mapped[datetime | None] = mapped_column(UTCDateTime)
    analysis_started: Mapped[datetime | None] = mapped_column(UTCDateTime)
    analysis_finished: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered: Mapped[datetime | None] = mapped_column(UTCDateTime)
    spool_removed: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(lazy="joined")

    @property
    def study_instance_uid(self) -> str:
        return self.study.study_instance_uid


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # tells "same UID, different content" from a resend
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))


class Analysis(Base):
    __tablename__ = "analyses"
    __table_args__ = (UniqueConstraint("series_id", "revision"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    # One column per class (order of ihd_node.classes.CLASSES) so admins can query with plain SQL.
    p_any: Mapped[float] = mapped_column(Float)
    p_epidural: Mapped[float] = mapped_column(Float)
    p_intraparenchymal: Mapped[float] = mapped_column(Float)
    p_intraventricular: Mapped[float] = mapped_column(Float)
    p_subarachnoid: Mapped[float] = mapped_column(Float)
    p_subdural: Mapped[float] = mapped_column(Float)
    positive_classes: Mapped[str] = mapped_column(String(128), default="")  # comma list, CLASSES order
    thresholds: Mapped[str] = mapped_column(Text, default="{}")  # JSON {class: threshold}
    # The analysed images had been lossy compressed (header LossyImageCompression 01 or a lossy transfer
    # syntax); the SR says so too. NULL for analyses recorded before this was kept.
    source_lossy: Mapped[bool | None] = mapped_column(Boolean)
    # ResultSettings.key() of the run: part of every result UID (ihd_node.uids).
    settings_key: Mapped[str | None] = mapped_column(String(64))
    n_slices: Mapped[int] = mapped_column(Integer)  # slices of the source series
    n_model_slices: Mapped[int | None] = mapped_column(Integer)  # after combining thin slices into slabs
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    n_secondary_captures: Mapped[int] = mapped_column(Integer, default=0)
    load_seconds: Mapped[float | None] = mapped_column(Float)
    inference_seconds: Mapped[float | None] = mapped_column(Float)
    gradcam_seconds: Mapped[float | None] = mapped_column(Float)
    report_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Taken back by `ihd-node retract` or the console (ihd_node.retraction): when, by whom, why.
    retracted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retracted_by: Mapped[str | None] = mapped_column(String(64))
    retraction_reason: Mapped[str | None] = mapped_column(Text)

    series: Mapped[Series] = relationship(lazy="joined")

    def probabilities(self) -> dict[str, float]:
        return {c: getattr(self, f"p_{c}") for c in CLASSES}

    def positives(self) -> list[str]:
        return [c for c in self.positive_classes.split(",") if c]


class Delivery(Base):
    """The durable outbox: one row per (result object, destination). For an hl7 or fhir destination the
    "object" is one message file (sop_instance_uid = its stable message id, sop_class_uid = MESSAGE_CLASSES)."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status of the last answer
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(lazy="joined")


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))  # sent / retry / rejected / failed
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)


class Alert(Base):
    """The alert outbox: one row per (series, analysis revision, channel), written in the analysis' own
    transaction, so a crash after the analysis cannot lose the alert and a retry cannot double it."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("series_id", "revision", "channel"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending / sent / failed / rejected
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(lazy="joined")


class Completion(Base):
    """One judgement "this series is complete": the rule that fired, the evidence, and whether the result
    must go out marked INCOMPLETE SERIES because the checks still said "incomplete" when max_wait ran out."""

    __tablename__ = "completions"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    rule: Mapped[str] = mapped_column(String(16))  # quiet / max_wait / mpps
    n_instances: Mapped[int] = mapped_column(Integer)
    evidence: Mapped[str] = mapped_column(Text)  # what the checks said
    preliminary: Mapped[str | None] = mapped_column(Text)  # why the series may be incomplete; None = complete


class Mpps(Base):
    """A Modality Performed Procedure Step the node received (N-CREATE, then N-SETs)."""

    __tablename__ = "mpps"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # IN PROGRESS / COMPLETED / DISCONTINUED
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    trusted: Mapped[int] = mapped_column(Integer, default=0)  # series.trust_mpps allowed the caller
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class MppsInstance(Base):
    """One instance an MPPS lists (PerformedSeriesSequence > ReferencedImageSequence)."""

    __tablename__ = "mpps_instances"
    __table_args__ = (UniqueConstraint("mpps_id", "sop_instance_uid"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    mpps_id: Mapped[int] = mapped_column(ForeignKey("mpps.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))


class Event(Base):
    """The audit trail admins read. UIDs as plain text: events also name series never stored."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    level: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32), index=True)
    message: Mapped[str] = mapped_column(Text)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))


class NodeRun(Base):
    """One run of `ihd-node serve`: who holds the work, and whether it is still alive (issue 7 item 12).

    The process writes `heartbeat_at` every `heartbeat_seconds`; a clean stop (SIGTERM) sets `stopped_at`.
    A run with neither a recent heartbeat nor `stopped_at` ended without a clean stop (kill -9, crash,
    power loss); the next start books it as such."""

    __tablename__ = "node_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[str] = mapped_column(String(200), unique=True)  # host:pid:start time, as logged
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    heartbeat_seconds: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    # Multi-machine mode (ihd_node.node.cluster): what this process runs, and its analysis throughput.
    roles: Mapped[str | None] = mapped_column(String(64))  # receive,deliver / analyse; None: all in one
    device: Mapped[str | None] = mapped_column(String(32))  # workers: the torch device
    jobs_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    busy_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")

    def alive(self, now: datetime) -> bool:
        """Not stopped, and a heartbeat within three periods (one missed beat is not yet death)."""
        late = (now - self.heartbeat_at).total_seconds()
        return self.stopped_at is None and late <= 3 * self.heartbeat_seconds + 2


# ---------------------------------------------------------------- drift monitoring (issue 19)


class SeriesInput(Base):
    """The acquisition facts of an analysed series that drift monitoring compares over time (the input mix):
    written when the series is analysed (a re-analysis overwrites it with the same facts)."""

    __tablename__ = "series_inputs"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), unique=True)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(64))  # ManufacturerModelName
    kernel: Mapped[str | None] = mapped_column(String(64))  # ConvolutionKernel, values joined with "\"
    enhanced: Mapped[bool] = mapped_column(Boolean)  # Enhanced CT (multi-frame) rather than classic CT
    slice_thickness: Mapped[float | None] = mapped_column(Float)  # mm
    kvp: Mapped[float | None] = mapped_column(Float)
    pixel_spacing: Mapped[float | None] = mapped_column(Float)  # mm, the smaller of row and column spacing
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DriftEpisode(Base):
    """A stretch of time in which drift was at or above monitoring.alert_psi: opened by the check that first
    saw it (which books one alert per channel), ended by the first check that finds every PSI back under
    monitoring.warning_psi."""

    __tablename__ = "drift_episodes"
    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    reason: Mapped[str] = mapped_column(Text)  # the features over the limit, in words
    worst_feature: Mapped[str] = mapped_column(String(64))
    worst_psi: Mapped[float] = mapped_column(Float)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the latest check that still saw it


class DriftAlert(Base):
    """The drift alert outbox: one row per (episode, channel), sent and retried like the finding alerts."""

    __tablename__ = "drift_alerts"
    __table_args__ = (UniqueConstraint("episode_id", "channel"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    episode_id: Mapped[int] = mapped_column(ForeignKey("drift_episodes.id"), index=True)
    channel: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending / sent / failed / rejected
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    episode: Mapped[DriftEpisode] = relationship(lazy="joined")


FINDINGS = CLASSES  # what a read is about: the model's six outputs, "any" = any intracranial hemorrhage
READ_VALUES = ("present", "absent", "not_assessed")
READ_SOURCES = ("console", "csv", "hl7")


class Read(Base):
    """A radiologist's read of one study for one finding (issue 19): the truth local performance is measured
    against. A later read of the same study and finding replaces the earlier one as current (current = True,
    the earlier one gets superseded_by); every read is kept as history."""

    __tablename__ = "reads"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    finding: Mapped[str] = mapped_column(String(32))  # FINDINGS
    value: Mapped[str] = mapped_column(String(16))  # READ_VALUES
    reader: Mapped[str | None] = mapped_column(String(128))  # who read the study
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # when they read it
    source: Mapped[str] = mapped_column(String(16))  # READ_SOURCES
    entered_by: Mapped[str | None] = mapped_column(String(128))  # who put it into the node (console user, OS user)
    entered_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    current: Mapped[bool] = mapped_column(Boolean, index=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("reads.id"))


# ---------------------------------------------------------------- audit trail, IHE ATNA (issue 22)

AUDIT_STATES = ("pending", "sent")


class AuditMessage(Base):
    """The audit outbox and archive: every DICOM audit message (PS3.15 A.5) the node made, kept after it was
    sent (and when no collector is configured). `schema_error` is set when the message failed the schema
    check: it is kept and sent all the same (fail closed: recorded with why), and the tests assert none."""

    __tablename__ = "audit_messages"
    id: Mapped[int] = mapped_column(primary_key=True)
    event: Mapped[str] = mapped_column(String(32), index=True)  # the short kind, e.g. instances-received
    event_id: Mapped[str] = mapped_column(String(16))  # the EventID code, e.g. 110104
    outcome: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    xml: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(8), index=True)  # pending / sent
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    schema_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditPatient(Base):
    """Which patient ID a study belongs to, so that every audit message about the study names the patient
    (PS3.15 A.5.3 asks for it). Written only with audit.patient_ids on: then the audit trail is the one part
    of the log database with patient IDs (a security review asks "who touched this patient's data"). Never
    names or birth dates."""

    __tablename__ = "audit_patients"
    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
