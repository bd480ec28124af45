"""`ihd-node serve`: the node's threads, start-up recovery and clean shutdown.

Threads (one job each, all state in the database so a restart resumes):
- pynetdicom's SCP threads: receive into the spool (ihd_node.intake.receiver);
- assembler: completes series, judges them (ihd_node.triage.select), queues the eligible ones (with
  series.selection best_per_study: the best of each study, ihd_node.triage.study), and removes expired
  spool folders;
- ONE inference worker: owns the model (torch is imported there only), analyses queued series,
  writes the result files and records analysis + outbox rows in one transaction;
- delivery: sends due outbox rows (ihd_node.delivery.sender.Outbox);
- alerts (when alerts.channels is set): announces positive findings (ihd_node.delivery.alerts.AlertOutbox).
With PostgreSQL the same stages run as roles in separate processes (`serve --roles receive,deliver`,
`ihd-node worker`): the in-memory queue becomes the job queue of ihd_node.node.cluster, the inference thread a
queue worker, and delivery (with alerts) runs in one deliverer at a time.
Result files lie under <storage>/results/<SeriesUID>/r<revision>/{SR,SC}_<SOPInstanceUID>.dcm;
revision 0 is the first analysis of a series, each re-analysis (late instances) adds one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
from sqlalchemy import func, select

from ihd_node import __version__, faults, nodelog
from ihd_node.config import Config, load_config, runtime_problems, summary
from ihd_node.delivery.alerts import AlertOutbox
from ihd_node.delivery.sender import Outbox
from ihd_node.errors import UserError
from ihd_node.imaging.volume import FrameGroupsError, RecentHeaders
from ihd_node.intake.mpps import MppsScp
from ihd_node.intake.receiver import Admission, Receiver
from ihd_node.intake.recorder import DatabaseRecorder, abort_open_associations
from ihd_node.intake.spool import Spool, dataset_bytes, sha256_hex, write_dataset_atomic
from ihd_node.site import site_value
from ihd_node.store.database import Database, Delivery, NodeRun, ResultObject, open_database, utcnow
from ihd_node.triage.assembler import Assembler
from ihd_node.triage.completion import CompletionJudge, MppsList
from ihd_node.triage.select import judge_series
from ihd_node.triage.study import ANALYSED, StudyChoice

RETENTION_EVERY_SECONDS = 60.0
STOP_JOIN_SECONDS = 60.0  # lets a running analysis finish, within systemd's default TimeoutStopSec (90 s)
ROLES = ("receive", "deliver", "analyse")


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
        self.jobs: Any | None = None  # cluster.JobQueue when clustered and receiving
        self.db: Database | None = None
        self.spool: Spool | None = None
        self.receiver: Receiver | None = None
        self.results_dir = Path(config.storage.results_dir)
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._queue_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_delivery = threading.Event()
        self._wake_alerts = threading.Event()
        self._model_ready = threading.Event()
        self._model_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._choice: StudyChoice | None = None  # set in start() when series.selection is best_per_study
        self._headers = RecentHeaders()  # the judge and the study choice read the same series in turn
        self._last_retention = 0.0
        self._stopping = False
        self._run: NodeRun | None = None
        self._predictor_loaded: Any = None
        self.web: Any = None
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
        self._run = self.db.start_run(host=socket.gethostname(), pid=os.getpid(), version=__version__,
                                      heartbeat_seconds=cfg.node.heartbeat_seconds)
        nodelog.info("node.run", node_id=self._run.node_id)
        self._spawn("heartbeat", self._heartbeat)
        if cfg.series.selection == "best_per_study":
            self._choice = StudyChoice(self.db, cfg.series, self._enqueue, self._is_queued, self._headers)
        if self.clustered:
            self._join_cluster()
        if "receive" in self.roles:
            self.recover()

        if "analyse" in self.roles:
            self._spawn("inference", self._queue_worker if self.clustered else self._worker)
            self._model_ready.wait()
            if self._model_error is not None:
                err = self._model_error
                error = err if isinstance(err, UserError) else UserError(
                    f"the model could not be loaded ({type(err).__name__}: {err}); check model.checkpoint "
                    "and model.device in the config")
                self.stop(f"start-up failed: {error}")
                raise error

        if "receive" in self.roles:
            assembler = Assembler(self.db, cfg.series, self.judge, judge=self._completion_judge())
            self._spawn("assembler", lambda: assembler.run(self._stop, also=self._tick_extras))
        if "deliver" in self.roles:
            outbox = Outbox(self.db, cfg)
            alerts = AlertOutbox(self.db, cfg, self.results_dir) if cfg.alerts.channels else None
            if self.clustered:
                self._spawn("delivery", lambda: self._deliver_with_lease(outbox, alerts))
            else:
                self._spawn("delivery", lambda: outbox.run(self._stop, self._wake_delivery))
                if alerts is not None:
                    self._spawn("alerts", lambda: alerts.run(self._stop, self._wake_alerts))
        if "receive" not in self.roles:
            self.db.log_event("node", f"started roles={','.join(self.roles)} member={self._member_name()}")
            return self

        admission = Admission(ae_title=cfg.node.ae_title, allowed_calling_aets=cfg.node.allowed_calling_aets,
                              allowed_networks=cfg.node.allowed_addresses, refuse_reason=self._busy)
        self.receiver = Receiver(
            self.spool, DatabaseRecorder(self.db), admission, host=cfg.node.host, port=cfg.node.port,
            ssl_context=server_ssl_context(cfg.node.tls), min_free_bytes=cfg.storage.min_free_mb << 20,
            max_associations=cfg.node.max_associations, acse_timeout=cfg.node.acse_timeout,
            dimse_timeout=cfg.node.dimse_timeout, network_timeout=cfg.node.network_timeout,
            max_pdu=cfg.node.max_pdu, mpps=MppsScp(self.db, cfg.series.mpps_trusted))
        try:
            self.receiver.start()
        except OSError as exc:
            error = UserError(f"cannot listen on {cfg.node.host}:{cfg.node.port} ({exc}); another program uses "
                              "the port or the address is not on this machine: change node.port / node.host")
            self.stop(f"start-up failed: {error}")
            raise error from None
        self._start_web()
        roles = f" roles={','.join(self.roles)} member={self._member_name()}" if self.clustered else ""
        self.db.log_event("node", f"started ae={cfg.node.ae_title} port={self.receiver.port} "
                          f"destinations={len(cfg.destinations)}{roles}")
        return self

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
            self.web = make_web_server(self).start()
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

    def queue_depth(self) -> int:
        return self._queue.qsize()

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
        counted = [d for d in self.config.destinations if d.count_instances]

        def mpps_lists(series_uid: str) -> list[MppsList]:
            return [MppsList(uid, sops) for uid, sops in db.mpps_lists(series_uid)]

        def pacs_count(study_uid: str, series_uid: str) -> list[tuple[str, int]]:
            from ihd_node.delivery.sender import count_series_instances

            found = []
            for dest in counted:
                n = count_series_instances(dest, self.config.node.ae_title, study_uid, series_uid)
                if n is not None:
                    found.append((dest.name, n))
            return found

        return CompletionJudge(check_geometry=rules.check_geometry, check_coverage=rules.check_coverage,
                               mpps_lists=mpps_lists, pacs_count=pacs_count if counted else None)

    def _heartbeat(self) -> None:
        """Book that this process is alive, so `ihd-node status` can tell running from gone."""
        assert self.db is not None and self._run is not None
        while not self._stop.wait(self.config.node.heartbeat_seconds):
            try:
                self.db.heartbeat(self._run.id)
            except Exception as exc:  # a busy or briefly unreachable database must not end the node
                nodelog.warning("heartbeat.failed", error=f"{type(exc).__name__}: {exc}")

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
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                nodelog.warning("stop.thread_still_running", thread=thread.name,
                                note="its series is resumed at the next start")
        if self.jobs is not None:
            self.jobs.close()
        if self.db is not None:
            try:
                self.db.log_event("node", reason)
                if self._run is not None:
                    self.db.stop_run(self._run.id, reason)
            except Exception as exc:  # the database may be the reason for stopping
                nodelog.warning("stop.not_recorded", error=f"{type(exc).__name__}: {exc}")
            finally:
                self.db.close()

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=f"ihd-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _busy(self) -> str | None:
        if self._stopping:
            return "the node is shutting down"
        waiting = self._queue.qsize() if self.jobs is None else self._cluster_depth()
        if waiting >= self.config.analysis.max_queue:
            return f"{waiting} series wait for analysis (analysis.max_queue {self.config.analysis.max_queue})"
        return None

    # -- recovery ------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Resume what the database (and the spool) say was unfinished when the last run ended."""
        assert self.db is not None and self.spool is not None
        # A shared spool and database: other receivers' temp files and associations are alive, and an
        # "analyzing" series may be in a live worker's hands (dead workers' jobs come back by the stalled sweep).
        removed = 0 if self.clustered else self.spool.remove_temp_files()
        reindexed = self._reindex_spool()
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
        with self.db.read_session() as s:
            pending = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status == "pending"))
        if removed or reindexed or left_open or requeued or pending:
            self.db.log_event("recovery", f"temp_files_removed={removed} reindexed={reindexed} "
                              f"series_resumed={left_open + requeued} deliveries_pending={pending}")

    def _reindex_spool(self) -> int:
        """Spool files whose database row is missing (a crash between the rename and the commit)."""
        assert self.db is not None and self.spool is not None
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
                except Exception as exc:
                    nodelog.warning("recovery.unreadable_spool_file", path=str(path),
                                    error=f"{type(exc).__name__}: {exc}")
        return count

    def _reindex_file(self, path: Path) -> None:
        assert self.db is not None and self.spool is not None
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
        if self.jobs is not None:  # multi-machine: the shared job queue
            self._submit(series_uid)
            return
        with self._queue_lock:
            if series_uid in self._queued:
                return
            self._queued.add(series_uid)
        self._queue.put(series_uid)
        nodelog.info("analysis.queued", series=series_uid, waiting=self._queue.qsize(), why=why)

    def _is_queued(self, series_uid: str) -> bool:
        if self.jobs is not None:
            return self.jobs.is_queued(series_uid)
        with self._queue_lock:
            return series_uid in self._queued

    def _choose_again(self, series_uid: str) -> None:
        """The chosen series could not be analysed: let the study's next best one have its turn."""
        assert self.db is not None
        series = self.db.get_series(series_uid)
        if self._choice is not None and series is not None and series.state == "failed":
            self._choice.decide(series.study_instance_uid)

    # -- inference worker ----------------------------------------------------------------------------
    def _load_predictor(self) -> Any:
        if self.predictor is not None:
            return self.predictor
        from ihd_node.model.pipeline import Predictor  # torch only in this thread's path

        predictor = Predictor.load(self.config.model.checkpoint_path, device=self.config.model.device,
                                   explain=self.config.model.explain)
        predictor.thresholds.update(self.config.analysis.thresholds)  # admin overrides per class
        ident = predictor.identity
        nodelog.info("model.loaded", name=ident.name, version=ident.version, device=str(predictor.device))
        return predictor

    def _warm_up(self, predictor: Any) -> None:
        """One small phantom study through the whole path (volume, model, Grad-CAM, SR and captures) before
        the port opens: the first real study then pays no first-call costs — imports (highdicom, pixel
        decoders), oneDNN kernel selection for a full batch, the Grad-CAM backward pass, the model file in the
        page cache. A fresh clone's first `make demo` took 21.6 s where later ones took 2.4-4 s."""
        import tempfile

        from ihd_node.node.analysis import analyze_series
        from ihd_node.report import build_results
        from ihd_node.sim.phantom import make_series, write_series

        started = time.perf_counter()
        cfg = self.config
        try:
            with tempfile.TemporaryDirectory(prefix=".warm-up-", dir=cfg.storage.dir) as tmp:
                n = int(getattr(predictor, "batch_size", 16))  # one full CNN batch: the common shape
                paths = write_series(make_series(1, subtypes=["subdural"], n_slices=n, size=256), tmp)
                result = analyze_series(paths, predictor, explain=True, max_cam_slices=1,
                                        thin_slice_mm=cfg.series.thin_slice_mm, slab_mm=cfg.series.slab_mm)
                build_results(result.volume, result.prediction, max_secondary_captures=1,
                              slice_groups=result.slice_groups).all()
        except Exception as exc:  # a slower first study is no reason not to start
            nodelog.warning("model.warm_up_failed", error=f"{type(exc).__name__}: {exc}")
            return
        nodelog.info("model.warmed", seconds=f"{time.perf_counter() - started:.2f}",
                     heatmaps=len(result.prediction.heatmaps))

    def _worker(self) -> None:
        try:
            predictor = self._load_predictor()
            if self.predictor is None:  # the configured model (tests that pass their own skip this)
                self._warm_up(predictor)
        except BaseException as exc:
            self._model_error = exc
            self._model_ready.set()
            return
        self._predictor_loaded = predictor
        self._model_ready.set()
        while not self._stop.is_set():
            try:
                uid = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._queue_lock:
                self._queued.discard(uid)
            try:
                self._analyse(uid, predictor)
            except Exception as exc:
                assert self.db is not None
                reason = f"analysis failed: {type(exc).__name__}: {exc}"
                if self.db.set_series_state(uid, "failed", reason, expect="analyzing"):
                    self.db.log_event("analysis", reason, level="ERROR", series_instance_uid=uid)
            self._choose_again(uid)

    def _analyse(self, uid: str, predictor: Any) -> None:
        from ihd_node.imaging.volume import VolumeError
        from ihd_node.node.analysis import analyze_series
        from ihd_node.report import ResultSettings, build_results, result_file_name
        from ihd_node.report.source import volume_lossy

        assert self.db is not None
        cfg = self.config
        started = utcnow()
        if not self.db.set_series_state(uid, "analyzing", expect="complete", analysis_started=started):
            return  # reopened by a late instance, or already handled
        faults.point("analysis.started")
        series = self.db.get_series(uid)
        assert series is not None
        paths = [i.path for i in self.db.series_instances(uid)]
        max_sc = cfg.analysis.max_secondary_captures if cfg.analysis.gradcam else 0
        try:
            result = analyze_series(paths, predictor, explain=cfg.analysis.gradcam and max_sc > 0,
                                    max_cam_slices=max_sc or None, thin_slice_mm=cfg.series.thin_slice_mm,
                                    slab_mm=cfg.series.slab_mm)
        except VolumeError as exc:
            if self.db.set_series_state(uid, "failed", str(exc), expect="analyzing"):
                self.db.log_event("analysis", f"cannot analyse: {exc}", level="WARNING",
                                  series_instance_uid=uid, study_instance_uid=series.study_instance_uid)
            return

        revision = series.revision  # analyses done before this one; the report's revision counter
        t0 = time.perf_counter()
        predecessor = self._previous_sr(uid, revision, series.study_instance_uid)
        completion = self.db.latest_completion(uid)
        result.prediction = dataclasses.replace(
            result.prediction, incomplete=completion.preliminary if completion else None,
            replaces_preliminary=str(predecessor.SOPInstanceUID) if predecessor is not None and str(
                predecessor.get("CompletionFlag", "")) == "PARTIAL" else None)
        settings = ResultSettings(dict(result.prediction.model.thresholds), max_secondary_captures=max_sc,
                                  thin_slice_mm=cfg.series.thin_slice_mm, slab_mm=cfg.series.slab_mm,
                                  gradcam=cfg.analysis.gradcam, explain=cfg.model.explain)
        objects = build_results(result.volume, result.prediction, max_secondary_captures=max_sc,
                                slice_groups=result.slice_groups, revision=revision,
                                predecessor=predecessor, settings=settings, site=self.site).all()
        folder = self.results_dir / uid / f"r{revision}"
        rows = []
        for ds in objects:
            path = folder / result_file_name(ds)
            write_dataset_atomic(path, ds)
            rows.append(ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path))
        report_seconds = time.perf_counter() - t0
        faults.point("analysis.written")

        prediction = result.prediction
        analysis = self.db.finish_analysis(
            uid, model_name=prediction.model.name, model_version=prediction.model.version,
            probabilities=prediction.probabilities(), positive_classes=prediction.positive_classes(),
            thresholds=dict(prediction.model.thresholds), n_slices=result.volume.n_slices,
            n_model_slices=len(result.slice_groups), objects=rows,
            destinations=[d.name for d in cfg.destinations],
            alert_channels=[c.name for c in cfg.alerts.channels],
            sr_sop_instance_uid=str(objects[0].SOPInstanceUID),
            n_secondary_captures=len(objects) - 1, started=started,
            expect_started=started if self.clustered else None,
            source_lossy=volume_lossy(result.volume) is not None, settings_key=settings.key(),
            timings={"load": result.timings.get("load_seconds", 0.0),
                     "inference": result.timings.get("predict_seconds", 0.0), "report": report_seconds})
        self._wake_delivery.set()
        self._wake_alerts.set()
        after = self.db.get_series(uid)
        if after is not None and after.last_received > started:
            # A late instance arrived while the model ran: these results go out, and the series runs again.
            self.db.set_series_state(uid, "received", "late instance during analysis",
                                     expect=("delivering", "analyzed", "delivered", "failed"))
        positives = ",".join(prediction.positive_classes()) or "none"
        preliminary = " PRELIMINARY (series may be incomplete)" if prediction.incomplete else ""
        self.db.log_event("analysis", f"revision={analysis.revision}{preliminary} positive={positives} "
                          f"p_any={prediction.probabilities()['any']:.3f} slices={result.volume.n_slices} "
                          f"model_slices={len(result.slice_groups)} objects={len(rows)} "
                          f"seconds={(utcnow() - started).total_seconds():.2f}",
                          series_instance_uid=uid, study_instance_uid=series.study_instance_uid)

    def _previous_sr(self, uid: str, revision: int, study_uid: str) -> pydicom.Dataset | None:
        """The SR of the previous revision, for the revised SR's PredecessorDocumentsSequence; for a first
        analysis chosen over an already analysed series of the study (best_per_study), that series' SR."""
        if revision == 0:
            return self._study_previous_sr(uid, study_uid)
        found = sorted((self.results_dir / uid / f"r{revision - 1}").glob("SR_*.dcm"))
        if not found:
            nodelog.warning("analysis.no_predecessor", series=uid, revision=revision)
            return None
        return pydicom.dcmread(found[0])

    def _study_previous_sr(self, uid: str, study_uid: str) -> pydicom.Dataset | None:
        if self._choice is None:
            return None
        earlier = [x for x in self._choice.study_series(study_uid)
                   if x.series_instance_uid != uid and x.revision > 0 and x.state in ANALYSED]
        if not earlier:
            return None
        last = max(earlier, key=lambda x: x.analysis_finished or x.updated)
        found = sorted((self.results_dir / last.series_instance_uid / f"r{last.revision - 1}").glob("SR_*.dcm"))
        return pydicom.dcmread(found[0]) if found else None

    # -- multi-machine roles (ihd_node.node.cluster) --------------------------------------------------------
    def _member_name(self) -> str:
        return self._run.node_id if self._run is not None else "-"

    def _join_cluster(self) -> None:
        from ihd_node.node.cluster import JobQueue, join

        assert self.db is not None and self._run is not None
        cfg = self.config
        join(self.db, self._run.id, list(self.roles), cfg.model.device if "analyse" in self.roles else None)
        # Receivers submit; workers too, when a chosen series fails and the study's next best gets its turn.
        self.jobs = JobQueue(cfg, self.db).open()

    def _submit(self, series_uid: str) -> None:
        """Submit the series' analysis job, STAT or normal by the source's header (cluster.*)."""
        from ihd_node.node.cluster import priority_of

        assert self.db is not None and self.jobs is not None
        series = self.db.get_series(series_uid)
        instances = self.db.series_instances(series_uid)
        if series is None or not instances:
            return
        header = pydicom.dcmread(instances[0].path, stop_before_pixels=True)
        self.jobs.submit(series_uid, series.study_instance_uid, priority_of(header, self.config))

    def _cluster_depth(self) -> int:
        try:
            return self.jobs.depth()
        except Exception:  # noqa: BLE001 - the database is away: refuse nothing for that reason alone
            return 0

    def _tick_extras(self) -> None:
        self._retention()
        if self.jobs is not None:
            self._resubmit_orphans()

    def _resubmit_orphans(self) -> None:
        """Series left complete (or analyzing) with no job: a receiver or worker died at the wrong moment."""
        now = time.monotonic()
        if now - getattr(self, "_last_orphan_check", 0.0) < 5.0:
            return
        self._last_orphan_check = now
        assert self.db is not None and self.jobs is not None
        for series in self.jobs.orphans():
            uid = series.series_instance_uid
            if series.state == "analyzing" and not self.db.set_series_state(
                    uid, "complete", expect="analyzing", completion_rule=series.completion_rule):
                continue
            nodelog.warning("analysis.resubmitted", series=uid, was=series.state)
            self.judge(uid)

    def _deliver_with_lease(self, outbox: Outbox, alerts: AlertOutbox | None) -> None:
        """One deliverer at a time over the shared outbox (and alerts); the others wait to take over."""
        from ihd_node.node.cluster import DeliveryLease

        lease = DeliveryLease(self.config.database_url)
        try:
            while not self._stop.is_set():
                if not lease.held():
                    self._stop.wait(2.0)
                    continue
                try:
                    outbox.run_once()
                    if alerts is not None:
                        alerts.run_once()
                    wait = outbox.seconds_to_next(cap=0.5)
                except Exception as exc:
                    nodelog.error("delivery.loop_failed", error=f"{type(exc).__name__}: {exc}")
                    wait = 1.0
                self._stop.wait(wait)
        finally:
            lease.close()

    def _queue_worker(self) -> None:
        """Analysis jobs from the queue, one at a time, until stop; restarts its loop if PostgreSQL goes away."""
        import asyncio

        from ihd_node.node.cluster import make_app, requeue_stalled, stalled_after

        try:
            predictor = self._load_predictor()
        except BaseException as exc:
            self._model_error = exc
            self._model_ready.set()
            return
        self._model_ready.set()
        assert self.db is not None
        beat, stalled = self.config.node.heartbeat_seconds, stalled_after(self.config)

        def run_job(context: Any, series_uid: str, revision: int = 0) -> None:
            self._run_job(context.job, series_uid, predictor)

        app = make_app(self.config.database_url, run_job)
        sweeper = make_app(self.config.database_url)

        def sweep() -> None:
            while not self._stop.wait(beat):
                try:
                    requeue_stalled(sweeper, self.db.engine, stalled)
                except Exception as exc:
                    nodelog.warning("analysis.stalled_sweep_failed", error=f"{type(exc).__name__}: {exc}")

        self._spawn("stalled-sweep", sweep)

        async def work() -> None:
            async with app.open_async():
                worker = asyncio.ensure_future(app.run_worker_async(
                    queues=["analysis"], concurrency=1, install_signal_handlers=False, name=self._member_name(),
                    update_heartbeat_interval=beat, stalled_worker_timeout=stalled,
                    shutdown_graceful_timeout=STOP_JOIN_SECONDS - 5))
                while not worker.done() and not self._stop.is_set():
                    await asyncio.sleep(0.2)
                if not worker.done():
                    worker.cancel()  # procrastinate lets the running job finish first
                await asyncio.gather(worker, return_exceptions=False)

        while not self._stop.is_set():
            try:
                asyncio.run(work())
                why = "the queue worker ended"
            except BaseException as exc:  # noqa: BLE001 - PostgreSQL restarting, connection lost: start again
                why = f"{type(exc).__name__}: {exc}"
            if not self._stop.is_set():
                nodelog.error("worker.loop_failed", error=why, note="restarting in 2 s")
                self._stop.wait(2.0)

    def _run_job(self, job: Any, uid: str, predictor: Any) -> None:
        from sqlalchemy.exc import DBAPIError

        from ihd_node.node.cluster import other_job_running
        from ihd_node.store.database import Superseded

        assert self.db is not None
        series = self.db.get_series(uid)
        if series is None:
            return
        if series.state == "analyzing" and not other_job_running(self.db.engine, job.queueing_lock, job.id):
            # Its worker died mid-analysis (this is that job, put back by the stalled sweep): take it over.
            nodelog.warning("analysis.taken_over", series=uid, job=job.id, attempts=job.attempts)
            self.db.set_series_state(uid, "complete", expect="analyzing", completion_rule=series.completion_rule)
        started = time.perf_counter()
        try:
            self._analyse(uid, predictor)
        except Superseded as exc:
            nodelog.warning("analysis.superseded", series=uid, job=job.id, why=str(exc))
        except DBAPIError:
            raise  # the database is away: the job is retried (or swept) and the series is still "analyzing"
        except Exception as exc:
            reason = f"analysis failed: {type(exc).__name__}: {exc}"
            if self.db.set_series_state(uid, "failed", reason, expect="analyzing"):
                self.db.log_event("analysis", reason, level="ERROR", series_instance_uid=uid)
            self._choose_again(uid)
        finally:
            try:
                from ihd_node.node.cluster import job_done

                job_done(self.db, self._run.id, time.perf_counter() - started)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - throughput figures only
                nodelog.warning("cluster.job_count_failed", error=f"{type(exc).__name__}: {exc}")

    # -- retention -----------------------------------------------------------------------------------
    def _retention(self) -> None:
        """Remove received files (and Grad-CAM images; SRs stay for revisions) of finished series."""
        now = time.monotonic()
        # At least as often as the keep time, so a short one (0 = "remove at once") is honoured.
        every = min(RETENTION_EVERY_SECONDS, max(1.0, self.config.retention.spool_keep_hours * 3600.0))
        if now - self._last_retention < every:
            return
        self._last_retention = now
        assert self.db is not None and self.spool is not None
        for series in self.db.spool_expired(utcnow(), self.config.retention.spool_keep_hours):
            uid = series.series_instance_uid
            self.spool.remove_series(series.study_instance_uid, uid)
            for sc in (self.results_dir / uid).glob("r*/SC_*.dcm"):
                sc.unlink(missing_ok=True)
            self.db.mark_spool_removed(uid)
            nodelog.info("retention.spool_removed", series=uid, state=series.state)


def parse_roles(text: str | None) -> list[str] | None:
    """`--roles receive,deliver` -> the list; None (all in one process) when not given."""
    if text is None:
        return None
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise UserError(f"--roles {text!r}: use a comma list of {', '.join(ROLES)} (e.g. receive,deliver)")
    return roles


def worker_command(args: Any) -> int:
    """`ihd-node worker --config FILE [--device cuda:N]`: analysis jobs from the queue, nothing else."""
    return serve_command(args, roles=["analyse"], device=getattr(args, "device", None))


def serve_command(args: Any, roles: list[str] | None = None, device: str | None = None) -> int:
    """`ihd-node serve --config FILE [--roles ...]`: run until SIGTERM or SIGINT."""
    # Everything the node creates holds patient data: owner-only, also when started by hand (umask 022)
    # and for folders made with mkdir(parents=True), whose parents ignore the mode (the unit sets 0077 too).
    os.umask(0o077)
    # pydicom's warnings about invalid values quote the value, which may be a patient's name or birth date:
    # the node reads whatever senders send, so it does not warn about values (stdout goes to the journal).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    config = load_config(args.config)
    if roles is None:
        roles = parse_roles(getattr(args, "roles", None))
    if device:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N (N = the GPU's index)")
        config.model.device = device
    problems = runtime_problems(config)
    if problems:
        raise UserError("; ".join(problems))
    # Under systemd (JOURNAL_STREAM set) journald adds the time stamps; elsewhere the log line carries them.
    nodelog.setup(level=logging.getLevelNamesMapping()[config.logging.level],
                  timestamps=not os.environ.get("JOURNAL_STREAM"))
    stop = threading.Event()

    received: list[str] = []

    def _on_signal(signum: int, _frame: object) -> None:
        nodelog.info("signal", name=signal.Signals(signum).name)
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node = Node(config, roles=roles)
    try:
        node.start()
    except UserError as exc:
        node.stop(f"start-up failed: {exc}")
        raise
    except Exception as exc:
        # Any start-up failure is one line and exit 2 (the unit's RestartPreventExitStatus): restarting
        # cannot fix what stopped the first start, and a traceback hides the cause from the admin.
        node.stop(f"start-up failed: {type(exc).__name__}")
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"the node could not start: {type(exc).__name__}: {first}") from None
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop(f"clean stop on {received[0]}" if received else "stopped")
    return 0
