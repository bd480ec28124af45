"""Start-up recovery and the orphan sweep: what the database (and the spool) say is unfinished is resumed.

- recover() at start: temp files of a crash removed, spool files without a database row indexed again (one
  that cannot be read is moved to <storage.dir>/quarantine/ and booked as an event with the reason),
  associations released, series left complete or analyzing judged and queued again.
- OrphanSweep, every few seconds while the node runs, in both queues: a series complete (or analyzing) for a
  while that no queue holds and no worker analyses (a hand-off lost between the completion and the queue, a
  worker gone mid-analysis) is judged and queued again.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom

from ihd_node import nodelog
from ihd_node.intake.recorder import abort_open_associations
from ihd_node.intake.spool import Spool, dataset_bytes, sha256_hex
from ihd_node.node.loops import describe
from ihd_node.node.queue import AnalysisQueue
from ihd_node.store import Database, Series, utcnow
from ihd_node.store.work import pending_deliveries, settled_series
from ihd_node.triage.study import WAITING_REASON

ORPHAN_AFTER_SECONDS = 20.0  # a series complete (or analyzing) this long with no queue entry gets one
ORPHAN_CHECK_SECONDS = 5.0
WAITING = WAITING_REASON.split("{", 1)[0]


class Recovery:
    """Start-up recovery of one node process (`clustered`: its spool and database are shared with others)."""

    def __init__(self, db: Database, spool: Spool, quarantine_dir: Path, judge: Callable[[str], None], *,
                 clustered: bool) -> None:
        self.db = db
        self.spool = spool
        self.quarantine_dir = quarantine_dir
        self.judge = judge
        self.clustered = clustered

    def run(self) -> None:
        """Resume what the database (and the spool) say was unfinished when the last run ended."""
        # A shared spool and database: other receivers' temp files and associations are alive, and an
        # "analyzing" series may be in a live worker's hands (dead workers' jobs come back by the stalled sweep).
        removed = 0 if self.clustered else self.spool.remove_temp_files()
        reindexed = self.reindex_spool()
        left_open = 0 if self.clustered else abort_open_associations(self.db)  # they wait as after an A-ABORT
        requeued = 0
        for series in self.db.unfinished_series():
            if series.state == "analyzing" and self.clustered:
                continue
            if series.state == "analyzing":  # the worker died with it: analyse again (same result UIDs)
                self.db.set_series_state(series.series_instance_uid, "complete", expect="analyzing",
                                         completion_rule=series.completion_rule)
            if series.state in ("complete", "analyzing"):
                try:
                    self.judge(series.series_instance_uid)
                except Exception as exc:  # one bad series must not keep the node from starting
                    reason = f"cannot be judged after restart ({type(exc).__name__}: {exc})"
                    self.db.set_series_state(series.series_instance_uid, "failed", reason, expect="complete")
                    self.db.log_event("error", reason, level="ERROR",
                                      series_instance_uid=series.series_instance_uid)
                    continue
                requeued += 1
        pending = pending_deliveries(self.db)
        if removed or reindexed or left_open or requeued or pending:
            self.db.log_event("recovery", f"temp_files_removed={removed} reindexed={reindexed} "
                              f"series_resumed={left_open + requeued} deliveries_pending={pending}")

    def reindex_spool(self) -> int:
        """Spool files whose database row is missing (a crash between the rename and the commit)."""
        by_series: dict[str, list[Path]] = {}
        for path in self.spool.files():
            name = self.spool.parse(path)
            if name is not None:
                by_series.setdefault(name.series_uid, []).append(path)
        count = 0
        for series_uid, paths in by_series.items():
            # Only UIDs the database lacks: a second file of a known UID is older content kept beside it, or
            # newer content whose sender got no answer and will resend it.
            known = {i.sop_instance_uid for i in self.db.series_instances(series_uid)}
            missing = [p for p in paths if self.spool.parse(p).sop_uid not in known]  # type: ignore[union-attr]
            # Oldest first, so that of two files with one SOP Instance UID the newest ends up recorded.
            for path in sorted(missing, key=lambda p: p.stat().st_mtime):
                try:
                    self._reindex_file(path)
                    count += 1
                except Exception as exc:  # noqa: BLE001 - recorded, and the file is kept aside, never lost
                    self._quarantine(path, series_uid, describe(exc))
        return count

    def _reindex_file(self, path: Path) -> None:
        name = self.spool.parse(path)
        assert name is not None
        data = dataset_bytes(path.read_bytes())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        self.db.record_instance(
            study_instance_uid=name.study_uid, series_instance_uid=name.series_uid,
            sop_instance_uid=name.sop_uid, sop_class_uid=str(ds.get("SOPClassUID", "")), path=str(path),
            size=len(data), sha256=sha256_hex(data),
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
            accession_number=str(ds.get("AccessionNumber", "") or "") or None,
            modality=str(ds.get("Modality", "") or "") or None,
            series_description=str(ds.get("SeriesDescription", "") or "") or None,
            received_at=datetime.fromtimestamp(path.stat().st_mtime, UTC))

    def _quarantine(self, path: Path, series_uid: str, reason: str) -> None:
        """A spool file that cannot be indexed again: moved aside (kept for the admin) and booked with why."""
        target = self.quarantine_dir / path.relative_to(self.spool.root)
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if target.exists():
                target = target.with_name(f"{target.stem}.{time.time_ns()}{target.suffix}")
            shutil.move(str(path), str(target))
            where = f"moved to {target}"
        except OSError as exc:  # left where it is: the next start tries it again
            where = f"left in the spool ({exc.strerror or exc})"
        message = f"spool file {path.name} cannot be indexed again ({reason}); {where}"
        nodelog.warning("recovery.unreadable_spool_file", path=str(path), error=reason, kept=where)
        self.db.log_event("recovery", message, level="ERROR", series_instance_uid=series_uid)


def find_orphans(db: Database, live: Callable[[], Callable[[str], bool]], grace_seconds: float,
                 now: datetime | None = None) -> list[Series]:
    """Series complete (or analyzing) for `grace_seconds` with no queue entry and no running analysis.

    `live` gives a test on one snapshot of the queue, taken after the database read, so a series handed over
    meanwhile counts as live."""
    before = (now or utcnow()) - timedelta(seconds=grace_seconds)
    series = settled_series(db, ("complete", "analyzing"), before)
    if not series:
        return []
    is_live = live()
    return [s for s in series if not is_live(s.series_instance_uid)]


class OrphanSweep:
    """Queues again what fell between the completion and the queue, for the local and the cluster queue alike."""

    def __init__(self, db: Database, queue: AnalysisQueue, judge: Callable[[str], None],
                 grace_seconds: float | None = None, every_seconds: float | None = None) -> None:
        self.db = db
        self.queue = queue
        self.judge = judge
        # Read at construction (not as defaults) so that a test can shorten them for one node.
        self.grace_seconds = ORPHAN_AFTER_SECONDS if grace_seconds is None else grace_seconds
        self.every_seconds = ORPHAN_CHECK_SECONDS if every_seconds is None else every_seconds
        self._last = 0.0

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._last < self.every_seconds:
            return 0
        self._last = now
        count = 0
        for series in find_orphans(self.db, self.queue.live_series, self.grace_seconds):
            uid = series.series_instance_uid
            if series.state == "complete" and (series.reason or "").startswith(WAITING):
                continue  # held on purpose by the study choice until the study's other series are complete
            if series.state == "analyzing" and not self.db.set_series_state(
                    uid, "complete", expect="analyzing", completion_rule=series.completion_rule):
                continue
            nodelog.warning("analysis.resubmitted", series=uid, was=series.state)
            self.db.log_event("recovery", f"series was {series.state} with no analysis queued or running: "
                              "queued again", level="WARNING", series_instance_uid=uid)
            self.judge(uid)
            count += 1
        return count
