"""The log database: what happened to every study, series, instance, analysis and result delivery.

It is also the node's durable state: series states and the delivery outbox live here, so a restart
resumes from it. SQLite in WAL mode by default; queries use only portable SQLAlchemy constructs, so
any SQLAlchemy URL works. No patient name, birth date or patient ID is stored: UIDs and the
accession number are enough to find a study.

Threads: one engine per process, one short session per unit of work. Writers in this process take a
lock, because SQLite answers a second concurrent writer's lock upgrade with SQLITE_BUSY at once
(busy_timeout does not help there). Rows returned by the API are detached snapshots
(expire_on_commit=False); their many-to-one parents (series.study, instance.series) are loaded eagerly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
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
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import StaticPool

from ihd_node.classes import CLASSES
from ihd_node.errors import UserError

# meta.schema_version: 1 = the release before Alembic; 2 = managed by Alembic (alembic_version
# holds the revision). The previous release refuses a value above 1.
SCHEMA_VERSION = 2
log = logging.getLogger("ihd_node.events")

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
)
UNFINISHED_STATES = ("received", "complete", "analyzing")
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
TIMING_KEYS = ("load", "inference", "gradcam", "report")


class DatabaseError(UserError):
    """The database cannot be opened or has an unexpected schema."""


class Superseded(Exception):
    """finish_analysis(expect_started=...) of an analysis whose series another worker has taken over."""


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
                "naive datetime given to the database; use ihd_node.store.database.utcnow() or an aware time"
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

    series: Mapped[Series] = relationship(lazy="joined")

    def probabilities(self) -> dict[str, float]:
        return {c: getattr(self, f"p_{c}") for c in CLASSES}

    def positives(self) -> list[str]:
        return [c for c in self.positive_classes.split(",") if c]


class Delivery(Base):
    """The durable outbox: one row per (result object, destination)."""

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
    must go out PRELIMINARY because the checks still said "incomplete" when max_wait ran out."""

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


# ---------------------------------------------------------------- small result types


@dataclass(frozen=True)
class Recorded:
    """What record_instance did. `new` is False for a resend of the same UID (same or changed content)."""

    new: bool
    changed_content: bool  # same SOP Instance UID, different sha256: the row now points at the new file
    reopened: bool  # the series had left "received" and was put back (late or changed instance)
    previous_state: str | None  # the series' state before, None if the series is new


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as record_instance stores it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str | Path
    size: int
    sha256: str
    transfer_syntax: str | None = None
    calling_aet: str | None = None
    peer_address: str | None = None
    association_id: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    series_description: str | None = None
    received_at: datetime | None = None


@dataclass(frozen=True)
class Candidate:
    series_instance_uid: str
    rule: str  # "quiet" or "max_wait"
    last_received: datetime | None = None  # as seen when judged; a later instance voids the judgement


@dataclass(frozen=True)
class AttemptResult:
    delivery_status: str  # pending (will retry), sent, rejected, failed
    next_attempt_at: datetime | None
    series_instance_uid: str
    series_state: str | None  # "delivered" or "failed" when this attempt finished the series, else None


@dataclass(frozen=True)
class ResultObject:
    """One file to send: an SR or a secondary capture written under storage.results_dir."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str | Path


def classify_status(status: int | None) -> str:
    """sent (success or warning), retry (out of resources / no answer) or rejected (any other failure)."""
    if status is None:
        return "retry"
    if status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "sent"
    if 0xA700 <= status <= 0xA7FF:  # Out of Resources: the PACS may have room later
        return "retry"
    return "rejected"


# ---------------------------------------------------------------- the database


def _migrations() -> Any:
    try:
        from ihd_node.store import migrations
    except ModuleNotFoundError as exc:  # an environment installed before alembic became a dependency
        raise DatabaseError(
            f"the Python package {exc.name} is missing: install ihd-node's dependencies again "
            "(`.venv/bin/pip install -e .`; pyproject.toml lists alembic and psycopg)"
        ) from None
    return migrations


def _prepare_sqlite_file(database: str) -> None:
    # Owner-only: the database holds UIDs and accession numbers of real patients.
    path = Path(database)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)  # mkdir's mode is reduced by the umask
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # an empty file is a valid SQLite db
        os.close(fd)
        os.chmod(path, 0o600)


class Database:
    """One per process. Methods are units of work; each opens and closes its own session."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 10000, create: bool = True) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise DatabaseError(
                f"{url!r} is not an SQLAlchemy database URL; use e.g. sqlite:////var/lib/ihd-node/ihd.sqlite"
            ) from None
        self.url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
            if not parsed.database or parsed.database == ":memory:":
                kwargs["poolclass"] = StaticPool  # one shared in-memory database for all threads
            elif create:
                try:
                    _prepare_sqlite_file(parsed.database)
                except OSError as exc:
                    raise DatabaseError(
                        f"cannot create the log database {parsed.database}: {exc.strerror}; "
                        "check database.url / storage.dir and their permissions"
                    ) from None
            elif not Path(parsed.database).is_file():
                # Readers (ihd-node status/log) must not create a root-owned database the service cannot use.
                raise DatabaseError(
                    f"no log database at {parsed.database}; start the node once "
                    "(ihd-node serve) or check database.url in the config"
                )
        else:
            # A server restart closes every pooled connection: test each before use instead of failing once.
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (NoSuchModuleError, ImportError) as exc:
            raise DatabaseError(
                f"cannot open {parsed.render_as_string(hide_password=True)}: {exc}; install its driver or "
                "fix database.url (PostgreSQL: postgresql+psycopg://...)"
            ) from None
        if self.is_sqlite:
            self._sqlite_setup(busy_timeout_ms)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # A unit of work on SQLite takes the database's write lock when it begins, waiting up to busy_timeout
        # for another process's writer (`ihd-node retry` beside the node). Begun deferred, its first write
        # after a read would be refused at once if the other process committed in between.
        self._write_engine = (self.engine.execution_options(sqlite_begin="BEGIN IMMEDIATE") if self.is_sqlite
                              else self.engine)
        self._write_lock = threading.RLock()
        self._in_session = threading.local()

    def _sqlite_setup(self, busy_timeout_ms: int) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below start transactions, not pysqlite
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers (ihd-node status) never block the node
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

    # -------------------------------------------------------- plumbing

    def create_all(self) -> None:
        """Make the schema current before the node runs: create it in an empty database, migrate an older
        one where that is safe (SQLite: one process owns it), refuse anything else with what to do.

        The schema belongs to Alembic (ihd_node.store.migrations); see there for every case."""
        self._ensure_schema(create=True, upgrade=self.is_sqlite)

    def upgrade(self) -> tuple[str | None, str]:
        """`ihd-node db upgrade`: create or migrate to the newest schema. Returns (revision before, after)."""
        before, after = self._ensure_schema(create=True, upgrade=True)
        return before.current, after.current or after.head

    def check_schema(self) -> None:
        """Readers (status, log): refuse a schema this version does not run on; write nothing."""
        migrations = _migrations()
        try:
            migrations.check_schema(self.engine, where=self._where())
        except DBAPIError as exc:
            raise DatabaseError(f"cannot open the log database {self._where()}: {exc.orig}") from None

    def _where(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def _ensure_schema(self, *, create: bool, upgrade: bool) -> tuple[Any, Any]:
        migrations = _migrations()
        try:
            with self._write_lock:
                return migrations.ensure_schema(self.engine, where=self._where(), create=create, upgrade=upgrade)
        except DBAPIError as exc:  # unreachable server, no permission, a file that is not a database
            raise DatabaseError(
                f"cannot open the log database {self._where()}: {exc.orig}; check database.url and that "
                "the ihd-node user may write there"
            ) from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error. Takes the process-wide write lock."""
        with self._write_lock:
            # A session opened inside another in this thread begins deferred: the outer one holds the lock.
            outer = not getattr(self._in_session, "depth", 0)
            self._in_session.depth = getattr(self._in_session, "depth", 0) + 1
            try:
                with self._sessions(bind=self._write_engine if outer else self.engine) as s:
                    try:
                        yield s
                        s.commit()
                    except BaseException:
                        s.rollback()
                        raise
            finally:
                self._in_session.depth -= 1

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only unit of work without the write lock (admin commands, status pages).

        Closing (not rolling back) ends it: rollback would expire the rows handed out as snapshots."""
        with self._sessions() as s:
            yield s

    def journal_mode(self) -> str | None:
        if not self.is_sqlite:
            return None
        with self.engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())

    def close(self) -> None:
        self.engine.dispose()

    # -------------------------------------------------------- receiving

    def record_instance(self, **fields: Any) -> Recorded:
        """Store one received instance idempotently and keep study/series bookkeeping up to date.

        A new instance (or changed content) of a series that had already left "received" reopens it, so the
        assembler completes it again and the worker re-analyzes (revision + 1). Keywords: the fields of
        InstanceRecord.
        """
        result = self.record_instances([InstanceRecord(**fields)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def record_instances(self, records: Sequence[InstanceRecord]) -> list[Recorded | Exception]:
        """Several instances in one transaction (group commit, see InstanceBatcher); one result per record.

        If the transaction fails, each record is tried again in its own, so one bad row cannot fail the others;
        the result is then the exception of the records that still fail."""
        try:
            plain = self._record_plain(records)
            if plain is not None:
                return plain
            with self.session() as s:
                return [self._record(s, r) for r in records]
        except Exception as exc:
            if len(records) == 1:
                return [exc]
        out: list[Recorded | Exception] = []
        for r in records:
            try:
                with self.session() as s:
                    out.append(self._record(s, r))
            except Exception as exc:
                out.append(exc)
        return out

    def _record_plain(self, records: Sequence[InstanceRecord]) -> list[Recorded] | None:
        """The batch in one transaction of plain statements without an ORM session (its set-up and commit
        cost as much as the statements), when every record takes the short path; otherwise nothing is
        written and None is returned (record_instances then uses the session)."""
        with self._write_lock, self.engine.connect() as conn, conn.begin() as tx:
            out: list[Recorded] = []
            for r in records:
                rec = self._record_short(conn, r, r.received_at or utcnow())
                if rec is None:
                    tx.rollback()
                    return None
                out.append(rec)
            return out

    def _record(self, s: Session, r: InstanceRecord) -> Recorded:
        """The usual case — a new instance of a known series still in "received" — in four plain statements;
        everything else (new study or series, resend, changed content, moved or late instance) in
        _record_full. Both in session `s`, so they share its transaction."""
        now = r.received_at or utcnow()
        rec = self._record_short(s.connection(), r, now)
        if rec is None:
            s.expire_all()  # ORM objects loaded earlier in this batch may be older than the plain updates
            rec = self._record_full(s, r, now)
            s.flush()  # the plain statements of the next record do not autoflush
        return rec

    @staticmethod
    def _record_short(conn: Any, r: InstanceRecord, now: datetime) -> Recorded | None:
        """The short path's four statements, or None (nothing written) when the record needs _record_full."""
        q = _fast_record_statements()
        row = conn.execute(q.series_row, {"p_series_uid": r.series_instance_uid}).first()
        if row is None or row.state != "received" or conn.execute(
                q.instance_id, {"p_sop_uid": r.sop_instance_uid}).first() is not None:
            return None
        conn.execute(q.insert_instance, {
            "sop_instance_uid": r.sop_instance_uid, "series_id": row.id, "sop_class_uid": r.sop_class_uid,
            "path": str(r.path), "size": r.size, "sha256": r.sha256, "transfer_syntax": r.transfer_syntax,
            "calling_aet": r.calling_aet, "peer_address": r.peer_address, "received_at": now})
        conn.execute(q.update_series, {
            "p_id": row.id, "p_last": max(row.last_received, now), "p_aet": r.calling_aet or None,
            "p_association": r.association_id, "p_now": now, "p_modality": r.modality or None,
            "p_description": (r.series_description or "")[:64] or None})
        conn.execute(q.update_study if r.accession_number else q.update_study_keep_accession, {
            "p_id": row.study_id, "p_now": now, "p_accession": (r.accession_number or "")[:16]})
        return Recorded(new=True, changed_content=False, reopened=False, previous_state="received")

    @staticmethod
    def _record_full(s: Session, r: InstanceRecord, now: datetime) -> Recorded:
        """record_instance's whole logic with the ORM (first instance of a series, resends, late instances)."""
        (study_instance_uid, series_instance_uid, sop_instance_uid, sop_class_uid, path, size, sha256,
         transfer_syntax, calling_aet, peer_address, association_id, accession_number, modality,
         series_description) = (r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid, r.sop_class_uid,
                                r.path, r.size, r.sha256, r.transfer_syntax, r.calling_aet, r.peer_address,
                                r.association_id, r.accession_number, r.modality, r.series_description)
        study = s.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).one_or_none()
        if study is None:
            study = Study(study_instance_uid=study_instance_uid, first_received=now, last_received=now)
            s.add(study)
        study.last_received = max(study.last_received, now)
        if accession_number:
            study.accession_number = accession_number[:16]

        series = s.scalars(
            select(Series).where(Series.series_instance_uid == series_instance_uid)
        ).one_or_none()
        previous_state = None if series is None else series.state
        if series is None:
            series = Series(
                series_instance_uid=series_instance_uid,
                study=study,
                state="received",
                n_instances=0,
                revision=0,
                first_received=now,
                last_received=now,
                updated=now,
            )
            s.add(series)
        series.modality = modality or series.modality
        series.series_description = (series_description or series.series_description or "")[:64] or None
        s.flush()  # ids for the foreign keys below

        inst = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
        ).one_or_none()
        new = inst is None
        changed = False
        if inst is None:
            inst = Instance(sop_instance_uid=sop_instance_uid, series_id=series.id)
            s.add(inst)
            series.n_instances += 1
        else:
            changed = inst.sha256 != sha256
            if inst.series_id != series.id:
                # Same SOP UID now claimed by another series: move it, keep both counts honest.
                old = s.get(Series, inst.series_id)
                if old is not None:
                    old.n_instances -= 1
                    _reopen(old, now, "an instance moved to another series")
                series.n_instances += 1
                changed = True
        inst.series_id = series.id
        inst.sop_class_uid, inst.path, inst.size, inst.sha256 = sop_class_uid, str(path), size, sha256
        inst.transfer_syntax, inst.calling_aet, inst.peer_address = (
            transfer_syntax,
            calling_aet,
            peer_address,
        )
        inst.received_at = now

        # A resend of identical content changes nothing about completion; anything else restarts it.
        reopened = False
        if new or changed:
            series.last_received = max(series.last_received, now)
            series.calling_aet = calling_aet or series.calling_aet
            series.last_association = association_id
            series.association_released = None
            if previous_state not in (None, "received"):
                why = "changed instance" if changed else "late instance"
                reopened = _reopen(series, now, f"{why} after state {previous_state}")
        series.updated = now
        return Recorded(
            new=new, changed_content=changed, reopened=reopened, previous_state=previous_state
        )

    def association_released(self, association_id: str, when: datetime | None = None) -> int:
        """Note that an association ended; its series may now complete by the quiet rule. Returns how many."""
        when = when or utcnow()
        with self.session() as s:
            result = s.execute(
                update(Series)
                .where(Series.last_association == association_id, Series.association_released.is_(None))
                .values(association_released=when, updated=when)
            )
            return int(result.rowcount or 0)

    def release_all_associations(self, when: datetime | None = None) -> int:
        """At start-up no earlier association is alive: let its series complete by the quiet rule."""
        when = when or utcnow()
        with self.session() as s:
            result = s.execute(
                update(Series)
                .where(Series.state == "received", Series.association_released.is_(None))
                .values(association_released=when, updated=when)
            )
            return int(result.rowcount or 0)

    def series_to_complete(
        self, now: datetime, quiet_seconds: float, max_wait_seconds: float
    ) -> list[Candidate]:
        """Series in "received" that are complete now, with the rule that fired (quiet first)."""
        quiet_before = now - timedelta(seconds=quiet_seconds)
        max_before = now - timedelta(seconds=max_wait_seconds)
        with self.read_session() as s:
            rows = s.execute(
                select(Series.series_instance_uid, Series.last_received, Series.association_released)
                .where(
                    Series.state == "received",
                    (Series.last_received <= max_before)
                    | ((Series.association_released.is_not(None)) & (Series.last_received <= quiet_before)),
                )
                .order_by(Series.last_received)
            ).all()
        return [
            Candidate(uid, "quiet" if released is not None and last <= quiet_before else "max_wait", last)
            for uid, last, released in rows
        ]

    def next_completion_time(self, quiet_seconds: float, max_wait_seconds: float) -> datetime | None:
        """Earliest time at which some received series may complete (lets the assembler sleep until then)."""
        with self.read_session() as s:
            rows = s.execute(
                select(Series.last_received, Series.association_released).where(Series.state == "received")
            ).all()
        times = [
            last + timedelta(seconds=quiet_seconds if released is not None else max_wait_seconds)
            for last, released in rows
        ]
        return min(times) if times else None

    # -------------------------------------------------------- series state

    def set_series_state(
        self,
        series_instance_uid: str,
        state: str,
        reason: str | None = None,
        *,
        expect: str | Sequence[str] | None = None,
        unchanged_since: datetime | None = None,
        completion_rule: str | None = None,
        **times: datetime,
    ) -> bool:
        """Move a series to `state`; with `expect`, only if it is in that state now (compare-and-set).

        With `unchanged_since`, only if no instance arrived after that time. `times` sets time columns by
        name (completed=, analysis_started=, ...). Returns False when the series
        is missing or not in an expected state (e.g. a late instance reopened it meanwhile).
        """
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        unknown = set(times) - set(SERIES_TIMES)
        if unknown:
            raise ValueError(f"unknown series time column(s): {sorted(unknown)}")
        with self.session() as s:
            series = s.scalars(
                select(Series).where(Series.series_instance_uid == series_instance_uid)
            ).one_or_none()
            if series is None:
                return False
            if expect is not None:
                allowed = (expect,) if isinstance(expect, str) else tuple(expect)
                if series.state not in allowed:
                    return False
            if unchanged_since is not None and series.last_received > unchanged_since:
                return False
            series.state = state
            series.reason = reason
            if completion_rule is not None:
                series.completion_rule = completion_rule
            for name, value in times.items():
                setattr(series, name, value)
            series.updated = utcnow()
            return True

    def mark_complete(self, series_instance_uid: str, rule: str, when: datetime | None = None,
                      last_received: datetime | None = None) -> bool:
        """received -> complete, noting which rule fired.

        False if it is no longer "received", or an instance arrived after `last_received` (the time the
        completion was judged on): that series is not quiet after all and waits for the next tick.
        """
        return self.set_series_state(
            series_instance_uid,
            "complete",
            expect="received",
            unchanged_since=last_received,
            completion_rule=rule,
            completed=when or utcnow(),
        )

    # -------------------------------------------------------- completion evidence and MPPS

    def record_completion(self, series_instance_uid: str, *, rule: str, n_instances: int, evidence: str,
                          preliminary: str | None, at: datetime | None = None) -> None:
        with self.session() as s:
            s.add(Completion(series_instance_uid=series_instance_uid, at=at or utcnow(), rule=rule,
                             n_instances=n_instances, evidence=evidence, preliminary=preliminary))

    def latest_completion(self, series_instance_uid: str) -> Completion | None:
        with self.read_session() as s:
            return s.scalars(
                select(Completion)
                .where(Completion.series_instance_uid == series_instance_uid)
                .order_by(Completion.id.desc())
                .limit(1)
            ).one_or_none()

    def note_series_waiting(self, series_instance_uid: str, reason: str) -> bool:
        """Keep a received series' reason up to date with what holds it back (no state change)."""
        with self.session() as s:
            result = s.execute(
                update(Series)
                .where(Series.series_instance_uid == series_instance_uid, Series.state == "received")
                .values(reason=reason[:2000])
            )
            return bool(result.rowcount)

    def save_mpps(self, sop_instance_uid: str, *, status: str, calling_aet: str | None, trusted: bool,
                  study_instance_uid: str | None, instances: Sequence[tuple[str, str, str | None]] | None,
                  now: datetime | None = None) -> tuple[str | None, str]:
        """Create or update one MPPS; `instances` (series UID, SOP UID, class UID) replaces its list when
        given. Returns (previous status or None when new, status now)."""
        now = now or utcnow()
        with self.session() as s:
            row = s.scalars(select(Mpps).where(Mpps.sop_instance_uid == sop_instance_uid)).one_or_none()
            previous = None if row is None else row.status
            if row is None:
                row = Mpps(sop_instance_uid=sop_instance_uid, created_at=now, status=status)
                s.add(row)
            row.status, row.updated_at = status, now
            row.calling_aet = (calling_aet or row.calling_aet or "")[:16] or None
            row.trusted = int(trusted)
            row.study_instance_uid = study_instance_uid or row.study_instance_uid
            s.flush()
            if instances is not None:
                s.execute(MppsInstance.__table__.delete().where(MppsInstance.mpps_id == row.id))
                seen = set()
                for series_uid, sop_uid, class_uid in instances:
                    if sop_uid in seen:
                        continue
                    seen.add(sop_uid)
                    s.add(MppsInstance(mpps_id=row.id, series_instance_uid=series_uid[:64],
                                       sop_instance_uid=sop_uid[:64], sop_class_uid=(class_uid or "")[:64] or None))
            return previous, status

    def get_mpps(self, sop_instance_uid: str) -> Mpps | None:
        with self.read_session() as s:
            return s.scalars(select(Mpps).where(Mpps.sop_instance_uid == sop_instance_uid)).one_or_none()

    def mpps_instance_count(self, sop_instance_uid: str) -> int:
        with self.read_session() as s:
            return int(s.scalar(
                select(func.count()).select_from(MppsInstance).join(Mpps, Mpps.id == MppsInstance.mpps_id)
                .where(Mpps.sop_instance_uid == sop_instance_uid)) or 0)

    def mpps_lists(self, series_instance_uid: str) -> list[tuple[str, frozenset[str]]]:
        """(MPPS UID, SOP Instance UIDs listed for this series) of each trusted COMPLETED MPPS."""
        with self.read_session() as s:
            rows = s.execute(
                select(Mpps.sop_instance_uid, MppsInstance.sop_instance_uid)
                .join(MppsInstance, MppsInstance.mpps_id == Mpps.id)
                .where(MppsInstance.series_instance_uid == series_instance_uid, Mpps.status == "COMPLETED",
                       Mpps.trusted == 1)
            ).all()
        lists: dict[str, set[str]] = {}
        for mpps_uid, sop_uid in rows:
            lists.setdefault(mpps_uid, set()).add(sop_uid)
        return [(k, frozenset(v)) for k, v in sorted(lists.items())]

    def series_with_mpps(self) -> list[str]:
        """Received series that a trusted COMPLETED MPPS lists (they may be complete before the quiet time)."""
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Series.series_instance_uid)
                    .join(MppsInstance, MppsInstance.series_instance_uid == Series.series_instance_uid)
                    .join(Mpps, Mpps.id == MppsInstance.mpps_id)
                    .where(Series.state == "received", Mpps.status == "COMPLETED", Mpps.trusted == 1)
                    .distinct()
                )
            )

    def get_series(self, series_instance_uid: str) -> Series | None:
        with self.read_session() as s:
            return s.scalars(
                select(Series).where(Series.series_instance_uid == series_instance_uid)
            ).one_or_none()

    def series_instances(self, series_instance_uid: str) -> list[Instance]:
        """The series' instances (their spool paths feed load_volume)."""
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Instance)
                    .join(Series, Instance.series_id == Series.id)
                    .where(Series.series_instance_uid == series_instance_uid)
                    .order_by(Instance.id)
                )
            )

    def unfinished_series(self) -> list[Series]:
        """Series a restart must resume: received (assembler), complete and analyzing (analysis queue).

        Deliveries resume by themselves through due_deliveries()."""
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Series).where(Series.state.in_(UNFINISHED_STATES)).order_by(Series.last_received)
                )
            )

    def series_in_state(self, *states: str) -> list[Series]:
        with self.read_session() as s:
            return list(
                s.scalars(select(Series).where(Series.state.in_(states)).order_by(Series.last_received))
            )

    def spool_expired(self, now: datetime, keep_hours: float) -> list[Series]:
        """Delivered, analyzed or ignored series whose received files may go (retention.spool_keep_hours)."""
        before = now - timedelta(hours=keep_hours)
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Series).where(
                        Series.state.in_(("delivered", "analyzed", "ignored", "not_chosen")),
                        Series.spool_removed.is_(None),
                        Series.updated <= before,
                    )
                )
            )

    def mark_spool_removed(self, series_instance_uid: str, when: datetime | None = None) -> None:
        with self.session() as s:
            s.execute(
                update(Series)
                .where(Series.series_instance_uid == series_instance_uid)
                .values(spool_removed=when or utcnow())
            )

    # -------------------------------------------------------- analysis and outbox

    def finish_analysis(
        self,
        series_instance_uid: str,
        *,
        model_name: str,
        model_version: str,
        probabilities: Mapping[str, float],
        positive_classes: Sequence[str],
        thresholds: Mapping[str, float],
        n_slices: int,
        objects: Sequence[ResultObject],
        destinations: Sequence[str],
        alert_channels: Sequence[str] = (),
        n_model_slices: int | None = None,
        sr_sop_instance_uid: str | None = None,
        n_secondary_captures: int = 0,
        timings: Mapping[str, float] | None = None,
        started: datetime | None = None,
        now: datetime | None = None,
        expect_started: datetime | None = None,
        source_lossy: bool | None = None,
        settings_key: str | None = None,
    ) -> Analysis:
        """Record an analysis and enqueue its objects for every destination in ONE transaction.

        Write the result files first: after this commit the outbox may send them at any time. A crash before
        the commit leaves the series "analyzing", which a restart analyzes again (same deterministic UIDs).
        Older pending deliveries of the series are cancelled (a revised SR replaces them). If a late instance
        reopened the series during the analysis, it stays "received" (these results still go out; the next
        analysis supersedes them).

        expect_started (multi-machine workers): record it only if the series is still this analysis' - state
        analyzing (or reopened) with analysis_started unchanged - else raise Superseded: a worker thought
        dead has finished after another took its series over, and must not add a second revision."""
        now = now or utcnow()
        missing = set(CLASSES) - set(probabilities)
        if missing:
            raise ValueError(f"probabilities lack {sorted(missing)}")
        timings = dict(timings or {})
        with self.session() as s:
            series = s.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).one()
            if expect_started is not None and (
                series.state not in ("analyzing", "received") or series.analysis_started != expect_started
            ):
                raise Superseded(f"series {series_instance_uid} is {series.state}, analysis started "
                                 f"{series.analysis_started}, not {expect_started}")
            series.revision += 1
            analysis = Analysis(
                series=series,
                revision=series.revision,
                model_name=model_name,
                model_version=model_version,
                positive_classes=",".join(c for c in CLASSES if c in set(positive_classes)),
                thresholds=json.dumps(dict(thresholds), sort_keys=True),
                source_lossy=source_lossy,
                settings_key=settings_key,
                n_slices=n_slices,
                n_model_slices=n_model_slices,
                sr_sop_instance_uid=sr_sop_instance_uid,
                n_secondary_captures=n_secondary_captures,
                created_at=now,
                **{f"p_{c}": float(probabilities[c]) for c in CLASSES},
                **{f"{k}_seconds": timings.get(k) for k in TIMING_KEYS},
            )
            s.add(analysis)
            s.flush()
            s.execute(
                update(Delivery)
                .where(Delivery.series_id == series.id, Delivery.status == "pending")
                .values(status="cancelled", last_error="superseded by a newer analysis", updated_at=now)
            )
            for dest in destinations:
                for obj in objects:
                    _enqueue(s, analysis, series, dest, obj, now)
            if analysis.positive_classes:  # alerts announce positive findings only
                for channel in alert_channels:
                    s.add(Alert(analysis_id=analysis.id, series=series, revision=analysis.revision, channel=channel,
                                status="pending", attempts=0, next_attempt_at=now, created_at=now, updated_at=now))
            began = started or series.analysis_started
            reopened = series.state == "received" and began is not None and series.last_received > began
            if not reopened:  # a late instance during the analysis put it back to "received": keep that
                series.state = "delivering" if destinations and objects else "analyzed"
                series.reason = None
            series.analysis_started = started or series.analysis_started
            series.analysis_finished = now
            series.delivered = None
            series.updated = now
            return analysis

    def enqueue_delivery(
        self, analysis_id: int, destination: str, obj: ResultObject, now: datetime | None = None
    ) -> int:
        """Add one object for one destination to the outbox (idempotent per destination and SOP UID)."""
        now = now or utcnow()
        with self.session() as s:
            analysis = s.get(Analysis, analysis_id)
            if analysis is None:
                raise ValueError(f"no analysis with id {analysis_id}")
            return _enqueue(s, analysis, analysis.series, destination, obj, now).id

    def _due(self, outbox: type[Delivery] | type[Alert], now: datetime | None, limit: int) -> list[Any]:
        """Pending rows of an outbox (deliveries or alerts) whose next attempt is due, oldest first."""
        now = now or utcnow()
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(outbox)
                    .where(outbox.status == "pending", outbox.next_attempt_at <= now)
                    .order_by(outbox.next_attempt_at, outbox.id)
                    .limit(limit)
                )
            )

    def _next_attempt(self, outbox: type[Delivery] | type[Alert]) -> datetime | None:
        with self.read_session() as s:
            return s.scalar(select(func.min(outbox.next_attempt_at)).where(outbox.status == "pending"))

    def due_deliveries(self, now: datetime | None = None, limit: int = 100) -> list[Delivery]:
        """Pending outbox rows whose next attempt is due, oldest first."""
        return self._due(Delivery, now, limit)

    def next_delivery_time(self) -> datetime | None:
        return self._next_attempt(Delivery)

    def record_attempt(
        self,
        delivery_id: int,
        *,
        status: int | None,
        error: str | None = None,
        policy: Any,
        now: datetime | None = None,
        seconds: float | None = None,
    ) -> AttemptResult:
        """Book one send attempt: success/warning -> sent; refusal -> rejected (no retry); no answer or
        out-of-resources -> retry with backoff until policy.give_up_after_seconds -> failed.

        `policy` is config.DeliveryConfig (backoff(), give_up_after_seconds). When no delivery of the series'
        latest analysis is pending any more, the series becomes delivered (all sent) or failed (with why).
        """
        now = now or utcnow()
        with self.session() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                raise ValueError(f"no delivery with id {delivery_id}")
            outcome = classify_status(status)
            cancelled = d.status == "cancelled"  # superseded while this attempt was under way
            d.attempts += 1
            d.last_status = status
            d.last_error = error
            d.updated_at = now
            if outcome == "sent":
                d.status, d.delivered_at = "sent", now
            elif cancelled:
                pass
            elif outcome == "rejected":
                d.status = "rejected"
                d.last_error = error or f"refused with status 0x{status:04X}"
            elif (now - d.created_at).total_seconds() >= policy.give_up_after_seconds:
                d.status, outcome = "failed", "failed"
                d.last_error = f"gave up after {d.attempts} attempts: {error or 'no answer'}"
            else:
                d.next_attempt_at = now + timedelta(seconds=policy.backoff(d.attempts))
            s.add(
                DeliveryAttempt(
                    delivery_id=d.id, at=now, outcome=outcome, status=status, error=error, seconds=seconds
                )
            )
            s.flush()
            series_state = _settle_series(s, d.series_id, now)
            return AttemptResult(
                d.status,
                d.next_attempt_at if d.status == "pending" else None,
                d.series.series_instance_uid,
                series_state,
            )

    def cancel_pending_deliveries(self, series_instance_uid: str, reason: str) -> int:
        now = utcnow()
        with self.session() as s:
            series_id = s.scalar(select(Series.id).where(Series.series_instance_uid == series_instance_uid))
            result = s.execute(
                update(Delivery)
                .where(Delivery.series_id == series_id, Delivery.status == "pending")
                .values(status="cancelled", last_error=reason, updated_at=now)
            )
            return int(result.rowcount or 0)

    def requeue_failed_deliveries(
        self, series_instance_uid: str | None = None, now: datetime | None = None
    ) -> dict[str, int]:
        """Put failed/rejected deliveries of each series' latest analysis back into the outbox (`ihd-node
        retry`): due now, attempts and the give-up clock start afresh (the attempt history stays in
        delivery_attempts), and a series that failed because of them is "delivering" again. Only the latest
        analysis: older ones were superseded. Returns {series UID: deliveries re-queued}."""
        now = now or utcnow()
        with self.session() as s:
            query = select(Delivery).where(Delivery.status.in_(("failed", "rejected")))
            if series_instance_uid is not None:
                query = query.join(Series, Delivery.series_id == Series.id).where(
                    Series.series_instance_uid == series_instance_uid
                )
            rows = list(s.scalars(query.order_by(Delivery.id)))
            latest = dict(
                s.execute(
                    select(Analysis.series_id, func.max(Analysis.id))
                    .where(Analysis.series_id.in_({d.series_id for d in rows}))
                    .group_by(Analysis.series_id)
                ).all()
            ) if rows else {}
            done: dict[str, int] = {}
            for d in rows:
                if d.analysis_id != latest.get(d.series_id):
                    continue
                d.status, d.attempts, d.next_attempt_at = "pending", 0, now
                d.created_at = d.updated_at = now
                d.last_error = f"re-queued by `ihd-node retry`; before: {d.last_error or d.last_status}"
                series = d.series
                if series.state == "failed":
                    series.state, series.reason, series.updated = "delivering", None, now
                done[series.series_instance_uid] = done.get(series.series_instance_uid, 0) + 1
            return done

    # -------------------------------------------------------- alert outbox

    def due_alerts(self, now: datetime | None = None, limit: int = 50) -> list[Alert]:
        return self._due(Alert, now, limit)

    def next_alert_time(self) -> datetime | None:
        return self._next_attempt(Alert)

    def record_alert_attempt(
        self, alert_id: int, *, outcome: str, error: str | None, policy: Any, now: datetime | None = None
    ) -> Alert:
        """Book one alert attempt. outcome: sent, retry (backoff until policy.give_up_after_seconds, then
        failed) or rejected (the receiving server refused the content: resending cannot help)."""
        now = now or utcnow()
        with self.session() as s:
            a = s.get(Alert, alert_id)
            if a is None:
                raise ValueError(f"no alert with id {alert_id}")
            a.attempts += 1
            a.last_error = error
            a.updated_at = now
            if outcome == "sent":
                a.status, a.sent_at = "sent", now
            elif outcome == "rejected":
                a.status = "rejected"
            elif (now - a.created_at).total_seconds() >= policy.give_up_after_seconds:
                a.status = "failed"
                a.last_error = f"gave up after {a.attempts} attempts: {error or 'no answer'}"
            else:
                a.next_attempt_at = now + timedelta(seconds=policy.backoff(a.attempts))
            s.flush()
            return a

    def series_alerts(self, series_instance_uid: str) -> list[Alert]:
        with self.read_session() as s:
            return list(
                s.scalars(
                    select(Alert)
                    .join(Series, Alert.series_id == Series.id)
                    .where(Series.series_instance_uid == series_instance_uid)
                    .order_by(Alert.id)
                )
            )

    def get_analysis(self, analysis_id: int) -> Analysis | None:
        with self.read_session() as s:
            return s.get(Analysis, analysis_id)

    def latest_analysis(self, series_instance_uid: str) -> Analysis | None:
        with self.read_session() as s:
            return s.scalars(
                select(Analysis)
                .join(Series, Analysis.series_id == Series.id)
                .where(Series.series_instance_uid == series_instance_uid)
                .order_by(Analysis.revision.desc())
                .limit(1)
            ).one_or_none()

    # -------------------------------------------------------- node runs (heartbeat)

    def start_run(
        self, *, host: str, pid: int, version: str | None, heartbeat_seconds: float, now: datetime | None = None
    ) -> NodeRun:
        """Book this process as a running node; runs that never stopped cleanly are closed as such."""
        now = now or utcnow()
        with self.session() as s:
            for old in s.scalars(select(NodeRun).where(NodeRun.stopped_at.is_(None))):
                if (old.host == host and old.pid == pid) or not old.alive(now):
                    old.stopped_at = old.heartbeat_at
                    old.stop_reason = "ended without a clean stop (killed, crashed or power lost)"
            run = NodeRun(
                node_id=f"{host}:{pid}:{now.isoformat(timespec='seconds')}",
                host=host,
                pid=pid,
                version=version,
                started_at=now,
                heartbeat_at=now,
                heartbeat_seconds=heartbeat_seconds,
            )
            s.add(run)
            s.flush()
            return run

    def heartbeat(self, run_id: int, now: datetime | None = None) -> None:
        with self.session() as s:
            s.execute(update(NodeRun).where(NodeRun.id == run_id).values(heartbeat_at=now or utcnow()))

    def stop_run(self, run_id: int, reason: str, now: datetime | None = None) -> None:
        now = now or utcnow()
        with self.session() as s:
            s.execute(
                update(NodeRun)
                .where(NodeRun.id == run_id)
                .values(heartbeat_at=now, stopped_at=now, stop_reason=reason)
            )

    def node_runs(self, limit: int = 10) -> list[NodeRun]:
        """The latest runs, newest first."""
        with self.read_session() as s:
            return list(
                s.scalars(select(NodeRun).order_by(NodeRun.started_at.desc(), NodeRun.id.desc()).limit(limit))
            )

    # -------------------------------------------------------- audit trail

    def log_event(
        self,
        kind: str,
        message: str,
        *,
        level: str = "INFO",
        series_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        calling_aet: str | None = None,
        peer_address: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """One audit row AND one log line (logger "ihd_node.events"): callers need not log the event again.

        Never pass patient names or birth dates in `message`."""
        at = at or utcnow()
        level = level.upper()
        # Same shape as the node's other log lines (`event key=value ...`, see ihd_node.nodelog).
        refs = [
            (k, v)
            for k, v in (
                ("series", series_instance_uid),
                ("study", study_instance_uid),
                ("aet", calling_aet),
                ("peer", peer_address),
                ("msg", message),
            )
            if v
        ]
        line = " ".join(
            [kind, *(f"{k}={json.dumps(v) if (' ' in v or '=' in v or not v) else v}" for k, v in refs)]
        )
        log.log(logging.getLevelNamesMapping().get(level, logging.INFO), "%s", line)
        with self.session() as s:
            s.add(
                Event(
                    at=at,
                    level=level,
                    kind=kind,
                    message=message,
                    series_instance_uid=series_instance_uid,
                    study_instance_uid=study_instance_uid,
                    calling_aet=calling_aet,
                    peer_address=peer_address,
                )
            )


@dataclass(frozen=True)
class _FastRecordStatements:
    series_row: Any
    instance_id: Any
    insert_instance: Any
    update_series: Any
    update_study: Any
    update_study_keep_accession: Any


@functools.cache
def _fast_record_statements() -> _FastRecordStatements:
    """The usual-case statements of Database._record, built once with bound parameters: building them per
    instance (SQLAlchemy coercions and cache keys) cost ~1 ms of the ~1.7 ms the row took."""
    now = bindparam("p_now", type_=UTCDateTime())
    study_last = case((Study.last_received < now, now), else_=Study.last_received)
    return _FastRecordStatements(
        series_row=select(Series.id, Series.study_id, Series.state, Series.last_received).where(
            Series.series_instance_uid == bindparam("p_series_uid")),
        instance_id=select(Instance.id).where(Instance.sop_instance_uid == bindparam("p_sop_uid")),
        insert_instance=insert(Instance),
        update_series=update(Series).where(Series.id == bindparam("p_id")).values(
            n_instances=Series.n_instances + 1, last_received=bindparam("p_last", type_=UTCDateTime()),
            calling_aet=func.coalesce(bindparam("p_aet", type_=String()), Series.calling_aet),
            last_association=bindparam("p_association", type_=String()), association_released=None,
            updated=now, modality=func.coalesce(bindparam("p_modality", type_=String()), Series.modality),
            series_description=func.coalesce(bindparam("p_description", type_=String()),
                                             Series.series_description)),
        update_study=update(Study).where(Study.id == bindparam("p_id")).values(
            last_received=study_last, accession_number=bindparam("p_accession", type_=String())),
        update_study_keep_accession=update(Study).where(Study.id == bindparam("p_id")).values(
            last_received=study_last))


class InstanceBatcher:
    """Group commit for received instances: each caller returns once its row is committed, and rows that
    arrive while a transaction is running are committed together in the next one (at most max_batch).

    No timer and no extra thread: the first waiting caller commits for everyone queued (leader), so one
    sender alone still pays one transaction per instance and no added wait, and 8 concurrent senders
    share transactions."""

    def __init__(self, db: Database, max_batch: int = 64) -> None:
        self.db, self.max_batch = db, max_batch
        self._pending: list[tuple[InstanceRecord, Future[Recorded]]] = []
        self._pending_lock = threading.Lock()
        self._leader = threading.Lock()
        self.transactions = 0  # how many record_instances calls (for tests and benchmarks)

    def record(self, record: InstanceRecord) -> Recorded:
        """Commit `record` (perhaps with others); raises what recording it raised."""
        future: Future[Recorded] = Future()
        with self._pending_lock:
            self._pending.append((record, future))
        while not future.done():
            with self._leader:
                if future.done():  # an earlier leader committed it
                    break
                with self._pending_lock:
                    batch = self._pending[: self.max_batch]
                    del self._pending[: self.max_batch]
                self.transactions += 1
                try:
                    results: list[Recorded | Exception] = self.db.record_instances([r for r, _ in batch])
                except BaseException as exc:  # noqa: BLE001 (handed to every waiter, then raised)
                    results = [exc] * len(batch)  # type: ignore[list-item]
                for (_, fut), result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        return future.result()


def _reopen(series: Series, now: datetime, why: str) -> bool:
    if series.state == "received":
        return False
    series.state = "received"
    series.reason = why
    series.completed = None
    series.completion_rule = None
    series.updated = now
    return True


def _enqueue(
    s: Session, analysis: Analysis, series: Series, destination: str, obj: ResultObject, now: datetime
) -> Delivery:
    existing = s.scalars(
        select(Delivery).where(
            Delivery.destination == destination, Delivery.sop_instance_uid == obj.sop_instance_uid
        )
    ).one_or_none()
    if existing is not None:
        if existing.status != "sent" or existing.analysis_id != analysis.id:
            # Same deterministic UID from a new analysis (or a retry of a dead one): send it afresh.
            existing.analysis_id, existing.series = analysis.id, series
            existing.status, existing.next_attempt_at, existing.updated_at = "pending", now, now
            existing.path, existing.sop_class_uid = str(obj.path), obj.sop_class_uid
            existing.attempts, existing.created_at, existing.delivered_at = 0, now, None
        return existing
    row = Delivery(
        analysis_id=analysis.id,
        series=series,
        destination=destination,
        sop_instance_uid=obj.sop_instance_uid,
        sop_class_uid=obj.sop_class_uid,
        path=str(obj.path),
        status="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    s.add(row)
    s.flush()
    return row


def _settle_series(s: Session, series_id: int, now: datetime) -> str | None:
    """delivering -> delivered/failed once nothing of the latest analysis is pending."""
    series = s.get(Series, series_id)
    if series is None or series.state != "delivering":
        return None
    latest = s.scalar(select(func.max(Analysis.id)).where(Analysis.series_id == series_id))
    rows = s.execute(
        select(Delivery.status, Delivery.destination, Delivery.last_error).where(
            Delivery.analysis_id == latest
        )
    ).all()
    if any(status == "pending" for status, _, _ in rows):
        return None
    bad = [(dest, err) for status, dest, err in rows if status in ("failed", "rejected")]
    if bad:
        series.state = "failed"
        series.reason = f"{len(bad)} of {len(rows)} result deliveries failed; first: {bad[0][0]}: {bad[0][1]}"
    else:
        series.state = "delivered"
        series.delivered = now
    series.updated = now
    return series.state


def open_database(url: str) -> Database:
    """Open (creating if needed) the log database and its tables: what `serve`, `status` and `log` call."""
    db = Database(url)
    db.create_all()
    return db
