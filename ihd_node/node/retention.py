"""Retention: received files (and Grad-CAM images; SRs stay for revisions) of finished series are removed."""

from __future__ import annotations

import time
from pathlib import Path

from ihd_node import nodelog
from ihd_node.config import Config
from ihd_node.intake.spool import Spool
from ihd_node.store import Database, utcnow

RETENTION_EVERY_SECONDS = 60.0


class Retention:
    def __init__(self, config: Config, db: Database, spool: Spool, results_dir: Path) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.results_dir = results_dir
        self._last = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        # At least as often as the keep time, so a short one (0 = "remove at once") is honoured.
        every = min(RETENTION_EVERY_SECONDS, max(1.0, self.config.retention.spool_keep_hours * 3600.0))
        if now - self._last < every:
            return
        self._last = now
        for series in self.db.spool_expired(utcnow(), self.config.retention.spool_keep_hours):
            uid = series.series_instance_uid
            self.spool.remove_series(series.study_instance_uid, uid)
            for sc in (self.results_dir / uid).glob("r*/SC_*.dcm"):
                sc.unlink(missing_ok=True)
            self.db.mark_spool_removed(uid)
            nodelog.info("retention.spool_removed", series=uid, state=series.state)
