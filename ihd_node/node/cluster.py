"""Growing past one box: the analysis job queue and the heartbeats of a multi-machine node.

Only when roles run in separate processes on PostgreSQL (`ihd-node serve --roles receive,deliver`,
`ihd-node worker`); the single `ihd-node serve` keeps its in-memory queue. The queue is procrastinate
(a PostgreSQL job queue: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, locks, priorities); it carries only
ids, never pixels: workers read the instances from the shared storage.dir.

- One job per (series, revision): its queueing lock is the idempotency key (series UID + model + the
  settings that change results), so a repeated "series complete" while the job waits collapses into it;
  a re-analysis after late instances is a new job, run after the first one (lock = the study).
- Priority: STAT (cluster.stat_priorities on Requested Procedure Priority, cluster.stat_accession_patterns
  on the AccessionNumber) before normal.
- Every process has its node_runs row (heartbeat, roles, jobs done: `ihd-node status`).
- A worker killed mid-job: procrastinate's worker heartbeat goes stale; every worker's sweep puts the
  stalled job back to "todo" and another worker runs it. The series, left "analyzing" by the dead
  worker, is taken over when no other job of that key is running. Results stay exactly once at the PACS
  through what already guarantees it: deterministic result UIDs and the outbox.
- Receivers re-submit series that are "complete" (or "analyzing") with no live job: a crash between the
  completion and the submit, or a PostgreSQL outage at that moment, loses nothing.
- Delivery: one deliverer at a time sends (a PostgreSQL advisory lock held on its own connection, lost
  when the process or the server dies): two deliverers never send one outbox row twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError

from ihd_node import nodelog
from ihd_node.config import Config
from ihd_node.store import Database, utcnow, work

if TYPE_CHECKING:  # procrastinate is imported where jobs are submitted or run: `status` needs only SQL
    import procrastinate

QUEUE = "analysis"
TASK = "ihd_node.analyse_series"
PRIORITY = {"stat": 10, "normal": 0}  # procrastinate runs higher numbers first
DELIVERY_LOCK_KEY = 7_140_002  # pg advisory lock: the one active deliverer


def conninfo(database_url: str) -> str:
    """libpq's form of the SQLAlchemy URL (procrastinate opens its own psycopg connections)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def make_app(database_url: str, handler: Callable[..., None] | None = None) -> procrastinate.App:
    """The procrastinate app with the one task. Deferring processes register no handler."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo(database_url)))

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("this process submits analysis jobs, it does not run them")

    # Database errors (PostgreSQL restarting) are retried; anything else fails the series (with a reason).
    retry = procrastinate.RetryStrategy(max_attempts=20, wait=2, retry_exceptions={DBAPIError})
    app.task(name=TASK, queue=QUEUE, pass_context=True, retry=retry)(handler or refuse)
    return app


def job_key(series_uid: str, identity: str) -> str:
    return f"{series_uid}/{identity}"


def analysis_identity(config: Config) -> str:
    """Model + the settings that change results, as a short hash (part of each job's idempotency key)."""
    checkpoint = config.model.checkpoint_path
    if checkpoint == "default":  # ihd_node.model.checkpoint.DEFAULT_CHECKPOINT, without importing torch here
        checkpoint = Path(__file__).resolve().parent / "weights" / "default.pt"
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:12]
    a, s = config.analysis, config.series
    # model.explain picks what the heatmaps explain (decision or CNN): other captures, so another job.
    settings = json.dumps({"thresholds": a.thresholds, "gradcam": a.gradcam, "max_sc": a.max_secondary_captures,
                           "thin": s.thin_slice_mm, "slab": s.slab_mm, "explain": config.model.explain},
                          sort_keys=True)
    return f"{digest}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def priority_of(header: Dataset, config: Config) -> str:
    """STAT by the source's Requested Procedure Priority or AccessionNumber (cluster.*), else normal."""
    rules = config.cluster
    wanted = {p.strip().upper() for p in rules.stat_priorities}
    found = [str(header.get("RequestedProcedurePriority", "") or "")]
    for item in header.get("RequestAttributesSequence", None) or []:
        found.append(str(item.get("RequestedProcedurePriority", "") or ""))
    if wanted and any(v.strip().upper() in wanted for v in found):
        return "stat"
    accession = str(header.get("AccessionNumber", "") or "")
    if accession and any(re.search(p, accession) for p in rules.stat_accession_patterns):
        return "stat"
    return "normal"


class JobQueue:
    """The submitting side (receivers): one call per eligible series."""

    def __init__(self, config: Config, db: Database) -> None:
        self.config = config
        self.db = db
        self.identity = analysis_identity(config)
        self.app = make_app(config.database_url)
        self._open = False

    def open(self) -> JobQueue:
        self.app.open()
        self._open = True
        return self

    def close(self) -> None:
        if self._open:
            self.app.close()
            self._open = False

    def submit(self, series_uid: str, study_uid: str, priority: str = "normal") -> bool:
        """Queue the series' analysis; False when an identical job already waits (collapsed into it)."""
        series = self.db.get_series(series_uid)
        revision = series.revision if series else 0
        from procrastinate.exceptions import AlreadyEnqueued

        task = self.app.tasks[TASK]
        try:
            job_id = task.configure(lock=study_uid, queueing_lock=job_key(series_uid, self.identity),
                                    priority=PRIORITY[priority]).defer(series_uid=series_uid, revision=revision)
        except AlreadyEnqueued:
            return False
        nodelog.info("analysis.queued", series=series_uid, job=job_id, priority=priority, revision=revision)
        return True

    def is_queued(self, series_uid: str) -> bool:
        """A job for the series waits or runs (the study choice does not queue it twice)."""
        return work.job_waits_or_runs(self.db.engine, job_key(series_uid, self.identity))

    def depth(self) -> int:
        return sum(queue_depth(self.db.engine).values())

    def live_series(self) -> Callable[[str], bool]:
        """A test "has this series a job waiting or running", on one snapshot of the queue (orphan sweep)."""
        live = work.live_job_keys(self.db.engine, QUEUE)
        return lambda series_uid: job_key(series_uid, self.identity) in live


def queue_depth(engine: Engine) -> dict[str, int]:
    """Jobs waiting, by priority name (PostgreSQL with the queue's schema; {} elsewhere)."""
    if engine.dialect.name != "postgresql":
        return {}
    names = {v: k for k, v in PRIORITY.items()}
    rows = work.waiting_jobs_by_priority(engine, QUEUE)
    depth = dict.fromkeys(PRIORITY, 0)
    for priority, count in rows:
        name = names.get(priority, str(priority))
        depth[name] = depth.get(name, 0) + int(count)
    return depth


def requeue_stalled(app: procrastinate.App, engine: Engine, stalled_seconds: float) -> list[int]:
    """Jobs "doing" on a worker whose heartbeat stopped (killed, machine gone): back to "todo".

    procrastinate finds them (get_stalled_jobs) but leaves what to do to the application."""
    async def find() -> list[int]:
        async with app.open_async():
            jobs = await app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=stalled_seconds)
            return [job.id for job in jobs if job.id is not None]

    stalled = asyncio.run(find())
    if not stalled:
        return []
    requeued = []
    with app.open():
        for job_id in stalled:
            try:
                app.job_manager.retry_job_by_id(job_id, retry_at=utcnow())
                requeued.append(job_id)
            except Exception as exc:  # another worker's sweep was first, or an identical job already waits
                work.drop_stalled_job(engine, job_id)
                nodelog.info("analysis.stalled_job_dropped", job=job_id, why=f"{type(exc).__name__}: {exc}")
    for job_id in requeued:
        nodelog.warning("analysis.stalled_job_requeued", job=job_id,
                        note=f"its worker sent no heartbeat for {stalled_seconds:.0f} s")
    return requeued


# ---------------------------------------------------------------- membership (node_runs)


def stalled_after(config: Config) -> float:
    """Seconds without a heartbeat after which a worker counts as dead (never under 3 beats + 2 s)."""
    return max(config.cluster.stalled_seconds, 3 * config.node.heartbeat_seconds + 2)


@dataclass(frozen=True)
class MemberView:
    member: str
    roles: str
    device: str | None
    alive: bool
    seconds_since_heartbeat: float
    jobs_done: int
    jobs_per_minute: float | None  # over the process's life so far
    seconds_per_job: float | None


def cluster_view(db: Database, now: datetime | None = None) -> dict[str, Any]:
    """What `ihd-node status` shows of a multi-machine node; {} for a single process."""
    now = now or utcnow()
    rows = work.cluster_members(db, now)
    if not rows:
        return {}
    members = []
    for m in rows:
        life = max((m.heartbeat_at - m.started_at).total_seconds(), 1e-6)
        worker = "analyse" in (m.roles or "")
        members.append(MemberView(
            m.node_id, m.roles or "", m.device, m.alive(now), round((now - m.heartbeat_at).total_seconds(), 1),
            m.jobs_done, round(m.jobs_done * 60.0 / life, 2) if worker else None,
            round(m.busy_seconds / m.jobs_done, 2) if m.jobs_done else None))
    return {"members": [m.__dict__ for m in members], "queue": queue_depth(db.engine)}


# ---------------------------------------------------------------- the one deliverer


class DeliveryLease:
    """Held by at most one process: a session-level advisory lock on a connection of its own."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url, pool_pre_ping=True)
        self._conn: Connection | None = None

    def held(self) -> bool:
        """True while this process is the deliverer; tries to become it otherwise."""
        try:
            if self._conn is not None:
                work.ping(self._conn)  # the server still knows us: the lock is still ours
                return True
            conn = self.engine.connect()
            if work.try_advisory_lock(conn, DELIVERY_LOCK_KEY):
                self._conn = conn
                nodelog.info("delivery.lease_taken")
                return True
            conn.close()
        except Exception as exc:
            nodelog.warning("delivery.lease_lost", error=f"{type(exc).__name__}: {exc}")
            self.release()
        return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()  # closing the session releases the lock
            except Exception:  # noqa: BLE001 - the connection is gone anyway
                pass
            self._conn = None

    def close(self) -> None:
        self.release()
        self.engine.dispose()
