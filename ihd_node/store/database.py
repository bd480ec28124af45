"""The one entry object of the store: `Database`, put together from the per-area classes.

Callers hold one `Database` per process and call its units of work (`db.record_instance(...)`,
`db.finish_analysis(...)`, `db.audit(event)`, ...); which module a method lives in is the store's own business.
"""

from __future__ import annotations

from ihd_node.store.audit import AuditStore
from ihd_node.store.intake import IntakeStore
from ihd_node.store.monitoring import MonitoringStore
from ihd_node.store.outbox import OutboxStore
from ihd_node.store.queries import QueryStore
from ihd_node.store.reads import ReadStore
from ihd_node.store.retraction import RetractionStore
from ihd_node.store.runs import RunStore
from ihd_node.store.series import SeriesStore


class Database(IntakeStore, SeriesStore, OutboxStore, RetractionStore, RunStore, QueryStore, ReadStore,
               MonitoringStore, AuditStore):
    """One per process. Methods are units of work; each opens and closes its own session."""


def open_database(url: str) -> Database:
    """Open (creating if needed) the log database and its tables: what `serve`, `status` and `log` call."""
    db = Database(url)
    db.create_all()
    return db
