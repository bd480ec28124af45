"""Where eligible series wait for analysis: one protocol, two homes.

- LocalQueue: in memory, the single `ihd-node serve` (any database). A restart loses nothing: start-up recovery
  and the orphan sweep (ihd_node.node.recovery) queue again what the database says is complete or analyzing.
- ClusterQueue: procrastinate's job queue on PostgreSQL (ihd_node.node.cluster), shared by the receivers that
  submit and the `ihd-node worker` processes that run the jobs.
The node and the analysis worker talk only to this protocol; which one runs is chosen once, at start.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import pydicom

from ihd_node import nodelog
from ihd_node.config import Config
from ihd_node.node.cluster import JobQueue, make_app, priority_of, requeue_stalled, stalled_after
from ihd_node.store import Database
from ihd_node.store.work import job_done, other_job_running

STOP_JOIN_SECONDS = 60.0  # lets a running analysis finish, within systemd's default TimeoutStopSec (90 s)
Handler = Callable[[str], None]


class AnalysisQueue(Protocol):
    # A database error inside a job: True when the queue itself runs the job again (procrastinate's retry),
    # False when the worker has to queue the series again once the database is back.
    retries_jobs: bool

    def put(self, series_uid: str, why: str) -> None: ...

    def is_queued(self, series_uid: str) -> bool: ...

    def depth(self) -> int: ...

    def live_series(self) -> Callable[[str], bool]:
        """A test "is this series waiting or being analysed", on one snapshot (the orphan sweep)."""
        ...

    def serve(self, handle: Handler, stop: threading.Event) -> None:
        """Hand each series to `handle`, one at a time, until `stop`."""
        ...

    def close(self) -> None: ...


class LocalQueue:
    """The in-memory queue of the single-process node: each series at most once, in arrival order."""

    retries_jobs = False

    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._running: str | None = None
        self._lock = threading.Lock()

    def put(self, series_uid: str, why: str) -> None:
        with self._lock:
            if series_uid in self._queued:
                return
            self._queued.add(series_uid)
        self._queue.put(series_uid)
        nodelog.info("analysis.queued", series=series_uid, waiting=self._queue.qsize(), why=why)

    def is_queued(self, series_uid: str) -> bool:
        with self._lock:
            return series_uid in self._queued

    def depth(self) -> int:
        return self._queue.qsize()

    def live_series(self) -> Callable[[str], bool]:
        with self._lock:
            live = set(self._queued) | ({self._running} if self._running else set())
        return live.__contains__

    def serve(self, handle: Handler, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                uid = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                self._queued.discard(uid)
                self._running = uid
            try:
                handle(uid)
            finally:
                with self._lock:
                    self._running = None

    def close(self) -> None:
        pass


class ClusterQueue:
    """procrastinate's job queue: receivers submit, `ihd-node worker` processes run (ihd_node.node.cluster)."""

    retries_jobs = True

    def __init__(self, config: Config, db: Database, *, member: str = "-", run_id: int | None = None,
                 spawn: Callable[[str, Callable[[], None]], None] | None = None) -> None:
        self.config = config
        self.db = db
        self.member = member
        self.run_id = run_id
        self.spawn = spawn
        # Receivers submit; workers too, when a chosen series fails and the study's next best gets its turn.
        self.jobs = JobQueue(config, db).open()

    def put(self, series_uid: str, why: str) -> None:
        """Submit the series' analysis job, STAT or normal by the source's header (cluster.*)."""
        series = self.db.get_series(series_uid)
        instances = self.db.series_instances(series_uid)
        if series is None or not instances:
            return
        header = pydicom.dcmread(instances[0].path, stop_before_pixels=True)
        self.jobs.submit(series_uid, series.study_instance_uid, priority_of(header, self.config))

    def is_queued(self, series_uid: str) -> bool:
        return self.jobs.is_queued(series_uid)

    def depth(self) -> int:
        try:
            return self.jobs.depth()
        except Exception:  # noqa: BLE001 - the database is away: refuse nothing for that reason alone
            return 0

    def live_series(self) -> Callable[[str], bool]:
        return self.jobs.live_series()

    def close(self) -> None:
        self.jobs.close()

    def serve(self, handle: Handler, stop: threading.Event) -> None:
        """Analysis jobs from the queue, one at a time, until stop; restarts its loop if PostgreSQL goes away."""
        import asyncio

        beat, stalled = self.config.node.heartbeat_seconds, stalled_after(self.config)

        def run_job(context: Any, series_uid: str, revision: int = 0) -> None:
            self._run_job(context.job, series_uid, handle)

        app = make_app(self.config.database_url, run_job)
        sweeper = make_app(self.config.database_url)

        def sweep() -> None:
            while not stop.wait(beat):
                try:
                    requeue_stalled(sweeper, self.db.engine, stalled)
                except Exception as exc:
                    nodelog.warning("analysis.stalled_sweep_failed", error=f"{type(exc).__name__}: {exc}")

        if self.spawn is not None:
            self.spawn("stalled-sweep", sweep)

        async def work() -> None:
            async with app.open_async():
                worker = asyncio.ensure_future(app.run_worker_async(
                    queues=["analysis"], concurrency=1, install_signal_handlers=False, name=self.member,
                    update_heartbeat_interval=beat, stalled_worker_timeout=stalled,
                    shutdown_graceful_timeout=STOP_JOIN_SECONDS - 5))
                while not worker.done() and not stop.is_set():
                    await asyncio.sleep(0.2)
                if not worker.done():
                    worker.cancel()  # procrastinate lets the running job finish first
                await asyncio.gather(worker, return_exceptions=False)

        while not stop.is_set():
            try:
                asyncio.run(work())
                why = "the queue worker ended"
            except BaseException as exc:  # noqa: BLE001 - PostgreSQL restarting, connection lost: start again
                why = f"{type(exc).__name__}: {exc}"
            if not stop.is_set():
                nodelog.error("worker.loop_failed", error=why, note="restarting in 2 s")
                stop.wait(2.0)

    def _run_job(self, job: Any, uid: str, handle: Handler) -> None:
        series = self.db.get_series(uid)
        if series is None:
            return
        if series.state == "analyzing" and not other_job_running(self.db.engine, job.queueing_lock, job.id):
            # Its worker died mid-analysis (this is that job, put back by the stalled sweep): take it over.
            nodelog.warning("analysis.taken_over", series=uid, job=job.id, attempts=job.attempts)
            self.db.set_series_state(uid, "complete", expect="analyzing", completion_rule=series.completion_rule)
        started = time.perf_counter()
        try:
            handle(uid)
        finally:
            try:
                if self.run_id is not None:
                    job_done(self.db, self.run_id, time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - throughput figures only
                nodelog.warning("cluster.job_count_failed", error=f"{type(exc).__name__}: {exc}")
