"""The one analysis worker: a queued series through the model, the report and the outbox, failing closed.

Both queues (ihd_node.node.queue) hand their series to `AnalysisWorker.process`, which owns the failure
handling: an analysis that raises is booked failed with the reason (and the study's next best series gets its
turn); a database error is never the end of a series: the booking waits for the database (`persist`), and an
analysis cut short by the database goes back to the queue once it answers (the local queue) or is run again by
the job queue's retry (the cluster). Result UIDs are deterministic, so a second run sends the same objects.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy.exc import DBAPIError

from ihd_node import faults, nodelog
from ihd_node.classes import INCOMPLETE_SERIES
from ihd_node.config import Config
from ihd_node.intake.spool import write_dataset_atomic
from ihd_node.monitoring.inputs import record_inputs
from ihd_node.node.loops import Health, describe, persist
from ihd_node.node.queue import AnalysisQueue
from ihd_node.store import Database, ResultObject, Superseded, utcnow
from ihd_node.triage.study import ANALYSED, StudyChoice

DATABASE_RETRIES = 3  # analyses cut short by a database error before the series is failed with that reason


class AnalysisWorker:
    """Owns the model (torch is imported in its thread only) and analyses one series at a time."""

    def __init__(self, config: Config, db: Database, queue: AnalysisQueue, *, results_dir: Path, site: str,
                 choice: StudyChoice | None, health: Health, stop: threading.Event,
                 results_ready: Callable[[], None], predictor: Any | None = None) -> None:
        self.config = config
        self.db = db
        self.queue = queue
        self.results_dir = results_dir
        self.site = site
        self.choice = choice
        self.health = health
        self.stop = stop
        self.results_ready = results_ready  # wakes delivery and alerts
        self.predictor = predictor
        self._database_failures: dict[str, int] = {}

    def process(self, uid: str, predictor: Any) -> None:
        """Analyse one queued series; whatever happens, the series ends in a recorded state."""
        try:
            self.analyse(uid, predictor)
            self._database_failures.pop(uid, None)
        except Superseded as exc:
            nodelog.warning("analysis.superseded", series=uid, why=str(exc))
        except DBAPIError as exc:
            if self.queue.retries_jobs:
                raise  # the job is retried (or swept) and taken over; the series is still "analyzing"
            self._after_database_error(uid, exc)
            return
        except Exception as exc:  # noqa: BLE001 - any failure of one series is that series' failure
            self._book_failed(uid, f"analysis failed: {describe(exc)}")
        persist("inference", lambda: self._choose_again(uid), self.stop, self.health)

    def _book_failed(self, uid: str, reason: str) -> None:
        def book() -> None:
            if self.db.set_series_state(uid, "failed", reason, expect="analyzing"):
                self.db.log_event("analysis", reason, level="ERROR", series_instance_uid=uid)
        persist("inference", book, self.stop, self.health)

    def _after_database_error(self, uid: str, exc: DBAPIError) -> None:
        """The database went away during the analysis: analyse again once it is back (a few times at most)."""
        self.health.failed("inference", exc)
        failures = self._database_failures[uid] = self._database_failures.get(uid, 0) + 1
        if failures > DATABASE_RETRIES:
            self._database_failures.pop(uid, None)
            self._book_failed(uid, f"analysis failed: database error {failures} times: {describe(exc)}")
            persist("inference", lambda: self._choose_again(uid), self.stop, self.health)
            return
        reason = f"database error during analysis ({describe(exc)}); analysed again"

        def back_to_complete() -> bool:
            if self.db.set_series_state(uid, "complete", reason, expect="analyzing"):
                self.db.log_event("analysis", reason, level="WARNING", series_instance_uid=uid)
                return True
            series = self.db.get_series(uid)  # the error came before "analyzing" was booked
            return series is not None and series.state == "complete"

        if persist("inference", back_to_complete, self.stop, self.health):
            nodelog.warning("analysis.requeued", series=uid, why=reason)
            self.queue.put(uid, reason)

    def _choose_again(self, series_uid: str) -> None:
        """The chosen series could not be analysed: let the study's next best one have its turn."""
        series = self.db.get_series(series_uid)
        if self.choice is not None and series is not None and series.state == "failed":
            self.choice.decide(series.study_instance_uid)

    def load_predictor(self) -> Any:
        if self.predictor is not None:
            return self.predictor
        from ihd_node.model.pipeline import Predictor  # torch only in this thread's path

        predictor = Predictor.load(self.config.model.checkpoint_path, device=self.config.model.device,
                                   explain=self.config.model.explain)
        predictor.thresholds.update(self.config.analysis.thresholds)  # admin overrides per class
        ident = predictor.identity
        nodelog.info("model.loaded", name=ident.name, version=ident.version, device=str(predictor.device))
        return predictor

    def warm_up(self, predictor: Any) -> None:
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

    def analyse(self, uid: str, predictor: Any) -> None:
        from ihd_node.imaging.volume import VolumeError
        from ihd_node.node.analysis import analyze_series
        from ihd_node.report import ResultSettings, build_results, result_file_name
        from ihd_node.report.source import volume_lossy
        from ihd_node.retraction.messages import result_messages

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
        for note in result.volume.dropped:  # never silent: a slice left out of the volume is booked with why
            self.db.log_event("analysis", f"slice left out: {note}", level="WARNING",
                              series_instance_uid=uid, study_instance_uid=series.study_instance_uid)

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
        built = build_results(result.volume, result.prediction, max_secondary_captures=max_sc,
                              slice_groups=result.slice_groups, revision=revision,
                              predecessor=predecessor, settings=settings, site=self.site)
        for note in built.left_out:  # e.g. no Segmentation for a source without a Frame of Reference
            self.db.log_event("analysis", f"result object left out: {note}", level="WARNING",
                              series_instance_uid=uid, study_instance_uid=series.study_instance_uid)
        objects = built.all()
        folder = self.results_dir / uid / f"r{revision}"
        rows = []
        for ds in objects:
            path = folder / result_file_name(ds)
            write_dataset_atomic(path, ds)
            rows.append(ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path))
        problems: list[str] = []  # messages a builder refused (no Patient ID): logged below, DICOM goes out
        messages = result_messages(cfg, folder, objects[0], result.prediction, result.volume,
                                   result.slice_groups, rows, revision=revision, now=utcnow(), problems=problems)
        report_seconds = time.perf_counter() - t0
        faults.point("analysis.written")
        record_inputs(self.db, uid, result.volume)  # the input mix drift monitoring compares

        prediction = result.prediction
        analysis = self.db.finish_analysis(
            uid, model_name=prediction.model.name, model_version=prediction.model.version,
            probabilities=prediction.probabilities(), positive_classes=prediction.positive_classes(),
            thresholds=dict(prediction.model.thresholds), n_slices=result.volume.n_slices,
            n_model_slices=len(result.slice_groups), objects=rows,
            destinations=[d.name for d in cfg.dicom_destinations], messages=messages,
            alert_channels=[c.name for c in cfg.alerts.channels],
            sr_sop_instance_uid=str(objects[0].SOPInstanceUID),
            n_secondary_captures=sum(ds.Modality == "OT" for ds in objects), started=started,
            expect_started=started if self.queue.retries_jobs else None,
            source_lossy=volume_lossy(result.volume) is not None, settings_key=settings.key(),
            timings={"load": result.timings.get("load_seconds", 0.0),
                     "inference": result.timings.get("predict_seconds", 0.0), "report": report_seconds})
        self.results_ready()
        after = self.db.get_series(uid)
        if after is not None and after.last_received > started:
            # A late instance arrived while the model ran: these results go out, and the series runs again.
            self.db.set_series_state(uid, "received", "late instance during analysis",
                                     expect=("delivering", "analyzed", "delivered", "failed"))
        for problem in problems:
            self.db.log_event("delivery", problem, level="WARNING", series_instance_uid=uid,
                              study_instance_uid=series.study_instance_uid)
        positives = ",".join(prediction.positive_classes()) or "none"
        partial = f" {INCOMPLETE_SERIES}" if prediction.incomplete else ""
        self.db.log_event("analysis", f"revision={analysis.revision}{partial} positive={positives} "
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
        if self.choice is None:
            return None
        earlier = [x for x in self.choice.study_series(study_uid)
                   if x.series_instance_uid != uid and x.revision > 0 and x.state in ANALYSED]
        if not earlier:
            return None
        last = max(earlier, key=lambda x: x.analysis_finished or x.updated)
        found = sorted((self.results_dir / last.series_instance_uid / f"r{last.revision - 1}").glob("SR_*.dcm"))
        return pydicom.dcmread(found[0]) if found else None
