"""The SQL that the node's wiring, workers and cluster queue need (ihd_node.node): free functions over a Database.

The job queue's rows (procrastinate_jobs) are read here too, so that no SQL lives outside ihd_node.store.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Connection, Engine

from ihd_node.store.database import Database
from ihd_node.store.schema import Delivery, Event, NodeRun, Series

HEALTH_EVENT = "health"  # the events kind of "degraded" / "recovered" notes (ihd_node.node.loops)


def pending_deliveries(db: Database) -> int:
    with db.read_session() as s:
        return int(s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status == "pending")) or 0)


def settled_series(db: Database, states: tuple[str, ...], before: datetime) -> list[Series]:
    """Series in one of `states` whose row has not changed since `before` (orphan candidates)."""
    with db.read_session() as s:
        return list(s.scalars(select(Series).where(Series.state.in_(states), Series.updated <= before)
                              .order_by(Series.last_received)))


# ---------------------------------------------------------------- node runs: membership, throughput, health


def join(db: Database, run_id: int, roles: list[str], device: str | None) -> None:
    """Note this process's roles on its node_runs row (whose heartbeat ihd_node.node.wiring writes)."""
    with db.session() as s:
        s.execute(update(NodeRun).where(NodeRun.id == run_id).values(roles=",".join(roles), device=device))


def job_done(db: Database, run_id: int, seconds: float) -> None:
    with db.session() as s:
        s.execute(update(NodeRun).where(NodeRun.id == run_id).values(
            jobs_done=NodeRun.jobs_done + 1, busy_seconds=NodeRun.busy_seconds + seconds))


def cluster_members(db: Database, now: datetime) -> list[NodeRun]:
    """Live members of a multi-machine node (runs with roles and a heartbeat in the last hour)."""
    with db.read_session() as s:
        return list(s.scalars(select(NodeRun).where(NodeRun.roles.is_not(None), NodeRun.stopped_at.is_(None),
                                                    NodeRun.heartbeat_at >= now - timedelta(hours=1))
                              .order_by(NodeRun.started_at)))


def last_health_event(db: Database, since: datetime) -> Event | None:
    """The newest "degraded"/"recovered" note booked since `since` (the current run's start)."""
    with db.read_session() as s:
        return s.scalars(select(Event).where(Event.kind == HEALTH_EVENT, Event.at >= since)
                         .order_by(Event.id.desc()).limit(1)).first()


# ---------------------------------------------------------------- the cluster's job queue (procrastinate_jobs)


def live_job_keys(engine: Engine, queue: str) -> set[str]:
    """Queueing locks of the jobs waiting or running in `queue`."""
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT queueing_lock FROM procrastinate_jobs WHERE status IN ('todo', 'doing') "
            "AND queue_name = :q"), {"q": queue}).scalars())


def job_waits_or_runs(engine: Engine, key: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM procrastinate_jobs WHERE queueing_lock = :k AND status IN ('todo', 'doing')"),
            {"k": key}).scalar())


def waiting_jobs_by_priority(engine: Engine, queue: str) -> list[tuple[int, int]]:
    """(priority, count) of the jobs waiting in `queue`."""
    with engine.connect() as conn:
        return [(int(p), int(n)) for p, n in conn.execute(text(
            "SELECT priority, count(*) FROM procrastinate_jobs WHERE status = 'todo' AND queue_name = :q "
            "GROUP BY priority"), {"q": queue}).all()]


def other_job_running(engine: Engine, key: str, job_id: int) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM procrastinate_jobs WHERE queueing_lock = :k AND status = 'doing' AND id <> :id"),
            {"k": key, "id": job_id}).scalar())


def drop_stalled_job(engine: Engine, job_id: int) -> None:
    """A stalled job that cannot go back to the queue (an identical one waits already): failed."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = :id AND status = 'doing'"),
                     {"id": job_id})


# ---------------------------------------------------------------- the one deliverer's advisory lock


def ping(conn: Connection) -> None:
    conn.execute(text("SELECT 1"))


def try_advisory_lock(conn: Connection, key: int) -> bool:
    got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
    conn.commit()
    return got

