"""Node runs (who holds the work, heartbeat) and the audit trail of events."""

from __future__ import annotations

import json
import logging
from datetime import datetime

from sqlalchemy import select, update

from ihd_node.store.engine import DatabaseEngine
from ihd_node.store.schema import Event, NodeRun, utcnow

log = logging.getLogger("ihd_node.events")


class RunStore(DatabaseEngine):
    """Units of work on node runs and events."""

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
