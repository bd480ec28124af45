"""The node's wiring: which threads run in this process, what each is given, start-up and clean shutdown.

Threads (one job each, all state in the database so a restart resumes):
- pynetdicom's SCP threads: receive into the spool (ihd_node.intake.receiver);
- assembler: completes series, judges them (ihd_node.triage.select), queues the eligible ones (with
  series.selection best_per_study: the best of each study, ihd_node.triage.study);
- housekeeping: spool retention (ihd_node.node.retention) and the orphan sweep (ihd_node.node.recovery);
- ONE inference worker (ihd_node.node.worker): owns the model (torch is imported there only), analyses queued
  series, writes the result files and records analysis + outbox rows in one transaction;
- delivery: sends due outbox rows (ihd_node.delivery.sender.Outbox);
- alerts (when alerts.channels is set): announces positive findings (ihd_node.delivery.alerts.AlertOutbox);
- heartbeat: books that the process is alive, and the "degraded" episodes (ihd_node.node.loops).
Series wait in an AnalysisQueue (ihd_node.node.queue): in memory for the single `ihd-node serve`, or the job
queue of a multi-machine node on PostgreSQL (`serve --roles receive,deliver`, `ihd-node worker`), where
delivery (with alerts) runs in one deliverer at a time. Every loop outlives database errors (node/loops.py).
Result files lie under <storage>/results/<SeriesUID>/r<revision>/{SR,SC}_<SOPInstanceUID>.dcm;
revision 0 is the first analysis of a series, each re-analysis (late instances) adds one.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ihd_node import __version__, nodelog
from ihd_node.audit import events
from ihd_node.config import Config, summary
from ihd_node.delivery.alerts import AlertOutbox
from ihd_node.delivery.sender import Outbox
from ihd_node.errors import UserError
from ihd_node.imaging.headers import FrameGroupsError, series_header_cache
from ihd_node.intake.mpps import MppsScp
from ihd_node.intake.receiver import Admission, Receiver
from ihd_node.intake.recorder import DatabaseRecorder
from ihd_node.intake.spool import Spool
from ihd_node.monitoring.watch import DriftWatch
from ihd_node.node.audit import AuditSender, attach_login_audit, audited_count, record_start
from ihd_node.node.cluster import DeliveryLease
from ihd_node.node.loops import Health, run_loop, supervised
from ihd_node.node.queue import STOP_JOIN_SECONDS, AnalysisQueue, ClusterQueue, LocalQueue
from ihd_node.node.recovery import OrphanSweep, Recovery
from ihd_node.node.retention import Retention
from ihd_node.node.worker import AnalysisWorker
from ihd_node.site import site_value
from ihd_node.store import Database, NodeRun, open_database, utcnow
from ihd_node.store.work import join
from ihd_node.triage.assembler import Assembler
from ihd_node.triage.completion import CompletionJudge, MppsList
from ihd_node.triage.select import judge_series
from ihd_node.triage.study import StudyChoice

ROLES = ("receive", "deliver", "analyse")
HOUSEKEEPING_SECONDS = 1.0
AUDIT_DRAIN_SECONDS = 3.0  # at a clean stop, the pending audit messages get this long to reach the collector


def server_ssl_context(tls: Any) -> ssl.SSLContext | None:
    """Inbound DICOM TLS from node.tls (None when off)."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates:
        context.load_verify_locations(str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else (
        ssl.CERT_OPTIONAL if tls.ca_certificates else ssl.CERT_NONE)
    return context


class Node:
    """The whole node in one process. `start()` returns once it listens; `stop()` shuts it down cleanly.

    `predictor` replaces the configured model (tests, benchmarks); anything with
    `predict(hu, explain, max_cam_slices) -> Prediction` and `identity`.
    """

    def __init__(self, config: Config, *, predictor: Any | None = None,
                 roles: Sequence[str] | None = None) -> None:
        self.config = config
        self.predictor = predictor
        # roles=None: the whole node in this process with its in-memory queue (any database). Named roles: a
        # member of a multi-machine node sharing PostgreSQL and the job queue with the others.
        unknown = set(roles or ()) - set(ROLES)
        if unknown:
            raise UserError(f"unknown role(s) {', '.join(sorted(unknown))}; roles are {', '.join(ROLES)}")
        self.roles = tuple(r for r in ROLES if roles is None or r in roles)
        self.clustered = roles is not None
        self.queue: AnalysisQueue = LocalQueue()  # a ClusterQueue once start() has joined the cluster
        self.db: Database | None = None
        self.spool: Spool | None = None
        self.receiver: Receiver | None = None
        self.results_dir = Path(config.storage.results_dir)
        self.health = Health()
        self._stop = threading.Event()
        self._wake_delivery = threading.Event()
        self._wake_alerts = threading.Event()
        self._wake_audit = threading.Event()
        self._audit: AuditSender | None = None
        self._model_ready = threading.Event()
        self._model_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._choice: StudyChoice | None = None  # set in start() when series.selection is best_per_study
        self._headers = series_header_cache()  # the judge and the study choice read the same series in turn
        self._stopping = False
        self._run: NodeRun | None = None
        self._predictor_loaded: Any = None
        self.web: Any = None
        self.drift: DriftWatch | None = None
        self.site = ""

    # -- life cycle ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.receiver.port if self.receiver else self.config.node.port

    def start(self) -> Node:
        cfg = self.config
        for line in summary(cfg):
            nodelog.info("config", line=line)
        storage = Path(cfg.storage.dir)
        try:
            storage.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.results_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.results_dir, 0o700)
        except OSError as exc:
            raise UserError(f"storage.dir {storage} cannot be used: {exc.strerror or exc} ({exc.filename}); "
                            "create it for the ihd-node user or choose another storage.dir") from None
        try:
            self.site = site_value(storage)  # this installation's Device Observer UID depends on it
        except (OSError, ValueError) as exc:
            raise UserError(f"storage.dir {storage}: cannot read or create the site value: {exc}") from None
        self.spool = Spool(cfg.storage.spool_dir)
        if self.clustered and cfg.database_url.startswith("sqlite"):
            raise UserError("roles in separate processes share PostgreSQL and its job queue: set database.url to "
                            "postgresql+psycopg://user:password@host/dbname, or run plain `ihd-node serve`")
        self.db = open_database(cfg.database_url)
        db = self.db
        self._run = db.start_run(host=socket.gethostname(), pid=os.getpid(), version=__version__,
                                 heartbeat_seconds=cfg.node.heartbeat_seconds)
        nodelog.info("node.run", node_id=self._run.node_id)
        db.configure_audit(cfg)  # IHE ATNA: every stage records through db.audit (node/audit.py)
        db.audit_wake = self._wake_audit.set
        record_start(db, cfg)
        if "deliver" in self.roles:  # one sender per process that delivers; messages wait in the database
            self._audit = AuditSender(db, cfg)
            self._loop("audit", self._audit.step, self._wake_audit)
        self._spawn("heartbeat", lambda: run_loop("heartbeat", self._beat, self._stop, self.health))
        if self.clustered:
            join(db, self._run.id, list(self.roles), cfg.model.device if "analyse" in self.roles else None)
            self.queue = ClusterQueue(cfg, db, member=self._member_name(), run_id=self._run.id, spawn=self._spawn)
        if cfg.series.selection == "best_per_study":
            self._choice = StudyChoice(db, cfg.series, self._enqueue, self.queue.is_queued, self._headers)
        if "receive" in self.roles:
            quarantine = Path(cfg.storage.dir) / "quarantine"
            Recovery(db, self.spool, quarantine, self.judge, clustered=self.clustered).run()

        if "analyse" in self.roles:
            self._spawn("inference", self._inference)
            self._model_ready.wait()
            if self._model_error is not None:
                err = self._model_error
                error = err if isinstance(err, UserError) else UserError(
                    f"the model could not be loaded ({type(err).__name__}: {err}); check model.checkpoint "
                    "and model.device in the config")
                self.stop(f"start-up failed: {error}")
                raise error

        if "receive" in self.roles:
            assembler = Assembler(db, cfg.series, self.judge, judge=self._completion_judge())

            def assemble() -> float:
                assembler.tick()
                return assembler.seconds_to_next()

            retention = Retention(cfg, db, self.spool, self.results_dir)
            orphans = OrphanSweep(db, self.queue, self.judge)

            def housekeeping() -> float:
                retention()
                orphans()
                return HOUSEKEEPING_SECONDS

            self._loop("assembler", assemble)
            self._loop("housekeeping", housekeeping)
        if "deliver" in self.roles:
            self._start_delivery()
            if cfg.monitoring.drift:  # the drift watch (ihd_node.monitoring.watch) runs beside delivery
                self.drift = DriftWatch(db, cfg)
                self._loop("drift", self.drift.step)
        if "receive" not in self.roles:
            db.log_event("node", f"started roles={','.join(self.roles)} member={self._member_name()}")
            return self

        admission = Admission(ae_title=cfg.node.ae_title, allowed_calling_aets=cfg.node.allowed_calling_aets,
                              allowed_networks=cfg.node.allowed_addresses, refuse_reason=self._busy)
        self.receiver = Receiver(
            self.spool, DatabaseRecorder(db), admission, host=cfg.node.host, port=cfg.node.port,
            ssl_context=server_ssl_context(cfg.node.tls), min_free_bytes=cfg.storage.min_free_mb << 20,
            max_associations=cfg.node.max_associations, acse_timeout=cfg.node.acse_timeout,
            dimse_timeout=cfg.node.dimse_timeout, network_timeout=cfg.node.network_timeout,
            max_pdu=cfg.node.max_pdu, mpps=MppsScp(db, cfg.series.mpps_trusted))
        try:
            self.receiver.start()
        except OSError as exc:
            error = UserError(f"cannot listen on {cfg.node.host}:{cfg.node.port} ({exc}); another program uses "
                              "the port or the address is not on this machine: change node.port / node.host")
            self.stop(f"start-up failed: {error}")
            raise error from None
        self._start_web()
        roles = f" roles={','.join(self.roles)} member={self._member_name()}" if self.clustered else ""
        db.log_event("node", f"started ae={cfg.node.ae_title} port={self.receiver.port} "
                     f"destinations={len(cfg.destinations)}{roles}")
        return self

    def _start_delivery(self) -> None:
        assert self.db is not None
        outbox = Outbox(self.db, self.config, wake=self._wake_delivery.set)
        alerts = AlertOutbox(self.db, self.config, self.results_dir) if self.config.alerts.channels else None
        if self.clustered:
            self._spawn("delivery", lambda: self._deliver_with_lease(outbox, alerts))
            return

        def deliver() -> float:
            outbox.run_once(wait=False)  # a slow destination is sent in its own thread; the others go on
            return outbox.seconds_to_next()

        self._loop("delivery", deliver, self._wake_delivery)
        if alerts is not None:
            db = self.db

            def alert() -> float:
                alerts.run_once()
                when = db.next_alert_time()
                return 1.0 if when is None else max(0.0, min(1.0, (when - utcnow()).total_seconds()))

            self._loop("alerts", alert, self._wake_alerts)

    # -- web: /healthz, /metrics, console --------------------------------------------------------------
    def _start_web(self) -> None:
        if not self.config.web.enabled:
            return
        assert self.db is not None
        try:
            from ihd_node.web.app import make_web_server
        except ModuleNotFoundError as exc:  # an environment installed before the console's dependencies
            self.db.log_event("web", f"console not started: the Python package {exc.name} is missing; install "
                              "ihd-node's dependencies again (pip install -e .)", level="WARNING")
            return
        try:
            web = make_web_server(self)
            attach_login_audit(web, self.db)  # console log-ins -> 110114 User Authentication
            self.web = web.start()
        except OSError as exc:
            # The console is for admins; DICOM intake matters more than a busy port, so the node runs on.
            self.db.log_event("web", f"console not started: cannot listen on {self.config.web.host}:"
                              f"{self.config.web.port} ({exc.strerror or exc}); change web.port", level="WARNING")

    def model_name(self) -> str | None:
        """The loaded model's name and version (None while none is loaded)."""
        if not self._model_ready.is_set() or self._model_error is not None or self._predictor_loaded is None:
            return None
        ident = self._predictor_loaded.identity
        return f"{ident.name} {ident.version}"

    def dead_threads(self) -> list[str]:
        return [t.name for t in self._threads if not t.is_alive()] if not self._stopping else []

    def degraded(self) -> str | None:
        """Why the node is degraded now (its loops meet errors, typically the database is away); None if not."""
        return self.health.reason()

    def queue_depth(self) -> int:
        return self.queue.depth()

    def wake_delivery(self) -> None:
        self._wake_delivery.set()

    def reanalyse(self, series_uid: str) -> tuple[bool, str]:
        """Analyse a finished series again (the console's action): a new revision, whose SR replaces the
        last one and which alerts again when positive. Returns (done, what happened in words)."""
        from ihd_node.web.console import REANALYSABLE

        assert self.db is not None
        series = self.db.get_series(series_uid)
        if series is None:
            return False, "no such series"
        if series.spool_removed is not None:
            return False, "its received files were removed (retention.spool_keep_hours); send the series again"
        if not self.db.set_series_state(series_uid, "complete", "re-analysis requested", expect=REANALYSABLE):
            return False, f"not re-analysed: the series is {series.state} (only {', '.join(REANALYSABLE)} ones)"
        self._enqueue(series_uid, "re-analysis requested")
        return True, "queued for re-analysis"

    def _completion_judge(self) -> CompletionJudge:
        """The evidence the assembler weighs before calling a quiet series complete (see completion.py)."""
        assert self.db is not None
        db, rules = self.db, self.config.series
        counted = [d for d in self.config.dicom_destinations if d.count_instances]

        def mpps_lists(series_uid: str) -> list[MppsList]:
            return [MppsList(uid, sops) for uid, sops in db.mpps_lists(series_uid)]

        def pacs_count(study_uid: str, series_uid: str) -> list[tuple[str, int | None]]:
            # None where a destination could not be asked: the judge holds the series for it (fail closed)
            return [(dest.name, audited_count(db, dest, self.config.node.ae_title, study_uid, series_uid))
                    for dest in counted]

        return CompletionJudge(check_geometry=rules.check_geometry, check_coverage=rules.check_coverage,
                               mpps_lists=mpps_lists, pacs_count=pacs_count if counted else None)

    def _beat(self) -> float:
        """Book that this process is alive, so `ihd-node status` can tell running from gone; then the health."""
        assert self.db is not None and self._run is not None
        self.db.heartbeat(self._run.id)
        self.health.book(self.db)
        return self.config.node.heartbeat_seconds

    def stop(self, reason: str = "stopped") -> None:
        """Stop accepting, let the current analysis and send finish, close the database."""
        if self._stopping:
            return
        self._stopping = True
        if self.web is not None:
            self.web.stop()
        if self.receiver is not None:
            self.receiver.stop()  # new associations are refused (_busy), open ones aborted: senders resend
        self._stop.set()
        self._wake_delivery.set()
        self._wake_alerts.set()
        self._wake_audit.set()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                nodelog.warning("stop.thread_still_running", thread=thread.name,
                                note="its series is resumed at the next start")
        self.queue.close()
        if self.db is not None:
            try:
                self.db.log_event("node", reason)
                self.db.audit(events.application_activity(False, reason=reason,
                                                          failed=reason.startswith("start-up failed")))
                if self._audit is not None:
                    self._audit.drain(AUDIT_DRAIN_SECONDS)
                    self._audit.close()
                if self._run is not None:
                    self.db.stop_run(self._run.id, reason)
            except Exception as exc:  # the database may be the reason for stopping
                nodelog.warning("stop.not_recorded", error=f"{type(exc).__name__}: {exc}")
            finally:
                self.db.close()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=supervised(name, target, self._stop), name=f"ihd-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _loop(self, name: str, step: Callable[[], float], wake: threading.Event | None = None) -> None:
        self._spawn(name, lambda: run_loop(name, step, self._stop, self.health, wake))

    def _busy(self) -> str | None:
        if self._stopping:
            return "the node is shutting down"
        waiting = self.queue.depth()
        if waiting >= self.config.analysis.max_queue:
            return f"{waiting} series wait for analysis (analysis.max_queue {self.config.analysis.max_queue})"
        return None

    # -- selection and queue -------------------------------------------------------------------------
    def judge(self, series_uid: str) -> None:
        """A complete series: ignored (with the reason) or eligible; then the study's choice, or queued."""
        study_uid = self._judge(series_uid)
        if self._choice is not None and study_uid is not None:
            self._choice.decide(study_uid)  # also after an ignored one: the study may now be complete

    def _judge(self, series_uid: str) -> str | None:
        """Judge one series; eligible ones are queued at once only with series.selection every_series."""
        assert self.db is not None
        series = self.db.get_series(series_uid)
        study_uid = series.study_instance_uid if series else None
        paths = [i.path for i in self.db.series_instances(series_uid)]
        try:
            refs = self._headers(paths)
        except FrameGroupsError as exc:  # a damaged Enhanced CT from the sender: bad input, not a node failure
            if self.db.set_series_state(series_uid, "ignored", str(exc), expect="complete"):
                self.db.log_event("ignored", str(exc), series_instance_uid=series_uid, study_instance_uid=study_uid)
            return study_uid
        except Exception as exc:
            reason = f"an instance file cannot be read ({type(exc).__name__}: {exc})"
            if series is not None and series.spool_removed is not None:
                reason = ("late instance after the series' files were removed (retention.spool_keep_hours); "
                          "the series cannot be analysed again")
            if self.db.set_series_state(series_uid, "failed", reason, expect="complete"):
                self.db.log_event("error", reason, level="ERROR", series_instance_uid=series_uid,
                                  study_instance_uid=study_uid)
            return study_uid
        verdict = judge_series(refs, self.config.series)
        if not verdict.ok:
            if self.db.set_series_state(series_uid, "ignored", verdict.reason, expect="complete"):
                self.db.log_event("ignored", verdict.reason, series_instance_uid=series_uid,
                                  study_instance_uid=study_uid)
        elif self._choice is None:
            self._enqueue(series_uid, verdict.reason)
        return study_uid

    def _enqueue(self, series_uid: str, why: str) -> None:
        self.queue.put(series_uid, why)

    # -- inference -----------------------------------------------------------------------------------
    def _inference(self) -> None:
        """The inference thread: load the model (start() waits for it), then analyse what the queue hands over."""
        assert self.db is not None
        worker = AnalysisWorker(self.config, self.db, self.queue, results_dir=self.results_dir, site=self.site,
                                choice=self._choice, health=self.health, stop=self._stop,
                                results_ready=self._results_ready, predictor=self.predictor)
        if not self._model_ready.is_set():
            try:
                predictor = worker.load_predictor()
                if self.predictor is None and not self.clustered:  # tests that pass their own skip this
                    worker.warm_up(predictor)
            except BaseException as exc:
                self._model_error = exc
                self._model_ready.set()
                return
            self._predictor_loaded = predictor
            self._model_ready.set()
        self.queue.serve(lambda uid: worker.process(uid, self._predictor_loaded), self._stop)

    def _results_ready(self) -> None:
        self._wake_delivery.set()
        self._wake_alerts.set()

    # -- multi-machine roles (ihd_node.node.cluster) --------------------------------------------------------
    def _member_name(self) -> str:
        return self._run.node_id if self._run is not None else "-"

    def _deliver_with_lease(self, outbox: Outbox, alerts: AlertOutbox | None) -> None:
        """One deliverer at a time over the shared outbox (and alerts); the others wait to take over."""
        lease = DeliveryLease(self.config.database_url)

        def deliver() -> float:
            if not lease.held():
                return 2.0
            outbox.run_once()
            if alerts is not None:
                alerts.run_once()
            return outbox.seconds_to_next(cap=0.5)

        try:
            run_loop("delivery", deliver, self._stop, self.health)
        finally:
            lease.close()
