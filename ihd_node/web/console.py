"""The admin's console: server-rendered pages (Jinja2) over the log database, and two audited actions.

Pages: `/` (series in flight and recent; filters positive / failed / last 24 h), `/study/<StudyUID>` (each
series: state, stage times, findings, deliveries and their attempts, alerts, the capture thumbnail,
events), `/thumb/<SeriesUID>.png`. Actions (POST, the operator role, logged as `audit` events naming the user
and role): re-send a series' failed deliveries, re-analyse a series, retract a series' result (with the reason;
who and why go into the event log). No patient name, ID or birth date is shown: the database
does not hold them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import numpy as np
import pydicom
from PIL import Image

from ihd_node import __version__
from ihd_node.audit import StudyObject, events
from ihd_node.classes import CLASSES, FINDING_NAMES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.store import IN_FLIGHT_STATES, Analysis, Series, utcnow
from ihd_node.web.admin import admin_routes
from ihd_node.web.auth import allows
from ihd_node.web.health import readiness
from ihd_node.web.performance_page import performance_routes, study_reads
from ihd_node.web.reads_import import reads_import_routes
from ihd_node.web.server import Request, Response, WebServer, disk_free, text

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
FILTERS = {"all": "all", "positive": "positive", "failed": "failed"}
THUMB_SIZE = 256


@dataclass(frozen=True)
class Row:
    """One series on the list page."""

    series: Series
    analysis: Analysis | None
    deliveries: dict[str, int]  # status -> count, latest analysis
    alerts: dict[str, int]

    @property
    def positive(self) -> bool:
        return bool(self.analysis and self.analysis.positive_classes)

    @property
    def failed(self) -> bool:
        return self.series.state == "failed" or bool(self.deliveries.get("failed") or self.deliveries.get("rejected"))


def seconds(a: datetime | None, b: datetime | None) -> str:
    if a is None or b is None:
        return ""
    return f"{max(0.0, (b - a).total_seconds()):.1f} s"


def stages(s: Series) -> list[tuple[str, str]]:
    """Time spent in each stage of one series (empty where it has not happened)."""
    return [("receiving", seconds(s.first_received, s.last_received)),
            ("waiting for completeness", seconds(s.last_received, s.completed)),
            ("queued", seconds(s.completed, s.analysis_started)),
            ("analysis", seconds(s.analysis_started, s.analysis_finished)),
            ("delivery", seconds(s.analysis_finished, s.delivered)),
            ("time to result", seconds(s.last_received, s.delivered or (s.analysis_finished if s.state == "analyzed"
                                                                       else None)))]


def findings(analysis: Analysis | None) -> list[dict[str, Any]]:
    if analysis is None:
        return []
    probs, positives = analysis.probabilities(), set(analysis.positives())
    return [{"code": c, "words": FINDING_NAMES[c] + (" (overall)" if c == "any" else ""), "p": probs[c],
             "positive": c in positives} for c in CLASSES]


def local(when: datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else ""


TEMPLATES.filters["local"] = local
TEMPLATES.filters["pct"] = lambda p: f"{p:.0%}"
TEMPLATES.filters["q"] = lambda value: quote(str(value), safe="")


def console_routes(node: Any, server: WebServer) -> dict[tuple[str, str], Any]:
    db, cfg = node.db, node.config
    results_dir = Path(node.results_dir)

    def render(name: str, request: Request, **context: Any) -> Response:
        """A page for this caller: `can(role)` hides what their role may not use (the server refuses it anyway)."""
        who = request.principal
        body = TEMPLATES.get_template(name).render(
            node=cfg.node.ae_title, version=__version__, refresh=cfg.web.refresh_seconds,
            warning=NOT_FOR_DIAGNOSTIC_USE, user=request.user, role=request.role,
            can=lambda need: allows(request.role, need), can_logout=who is not None and who.method == "oidc",
            **context)
        return Response(200, body.encode())

    def health() -> dict[str, Any]:
        checks = readiness(db, Path(cfg.storage.spool_dir), cfg.storage.min_free_mb, node.model_name,
                           node.dead_threads)
        runs = db.node_runs(limit=5)
        now = utcnow()
        free = disk_free(Path(cfg.storage.spool_dir))
        return {"checks": checks, "ready": all(c.ok for c in checks), "queue": node.queue_depth(),
                "runs": [(r, r.alive(now)) for r in runs], "model": node.model_name() or "not loaded",
                "free_mb": None if free is None else free >> 20, "min_free_mb": cfg.storage.min_free_mb}

    def rows(updated_since: datetime | None, limit: int = 200) -> list[Row]:
        return [Row(x.series, x.analysis, x.deliveries, x.alerts) for x in db.series_overview(updated_since, limit)]

    def index(request: Request) -> Response:
        which = FILTERS.get(request.query.get("filter", "all"), "all")
        recent = request.query.get("hours") == "24"
        found = rows(utcnow() - timedelta(hours=24) if recent else None)
        if which == "positive":
            found = [r for r in found if r.positive]
        elif which == "failed":
            found = [r for r in found if r.failed]
        in_flight = [r for r in found if r.series.state in IN_FLIGHT_STATES]
        done = [r for r in found if r not in in_flight]
        return render("index.html", request, in_flight=in_flight, done=done, which=which, recent=recent,
                      health=health())

    def study(request: Request) -> Response:
        study_uid = request.path.removeprefix("/study/")
        detail = db.study_detail(study_uid)
        if detail is None:
            return text(404, "no such study in the log database\n")
        blocks = [{"series": x.series, "analysis": x.analysis, "findings": findings(x.analysis),
                   "incomplete": incomplete(x.series.series_instance_uid, x.analysis),
                   "stages": stages(x.series), "deliveries": x.deliveries, "attempts": x.attempts, "alerts": x.alerts,
                   "thumbnail": capture(x.series.series_instance_uid, x.analysis) is not None,
                   "can_resend": any(d.status in ("failed", "rejected") for d in x.deliveries),
                   "can_reanalyse": x.series.state in REANALYSABLE and x.series.spool_removed is None,
                   "can_retract": x.analysis is not None and x.analysis.retracted_at is None}
                  for x in detail.series]
        return render("study.html", request, study=detail.study, blocks=blocks, events=detail.events,
                      notice=request.query.get("done"), **study_reads(db, study_uid))

    def incomplete(series_uid: str, analysis: Analysis | None) -> str | None:
        """Why the analysed series may have been incomplete (its result says INCOMPLETE SERIES), else None."""
        completion = db.latest_completion(series_uid) if analysis is not None else None
        return completion.preliminary if completion is not None else None

    def capture(series_uid: str, analysis: Analysis | None) -> Path | None:
        """The summary capture of the latest analysis (the report's instance 1, negatives included; one marked
        summary wins). None before an analysis or once retention removed the captures."""
        if analysis is None:
            return None
        files = sorted((results_dir / series_uid / f"r{analysis.revision - 1}").glob("SC_*.dcm"))
        if not files:
            return None
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if "SUMMARY" in " ".join(ds.get("ImageType", [])) or "summary" in str(ds.get("ImageComments", "")).lower():
                return path
        return min(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).get("InstanceNumber", 0) or 0))

    def thumb(request: Request) -> Response:
        series_uid = request.path.removeprefix("/thumb/").removesuffix(".png")
        path = capture(series_uid, db.latest_analysis(series_uid))
        if path is None:
            return text(404, "no capture for this series (not analysed, or removed by retention)\n")
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        image = Image.fromarray(pixels.astype(np.uint8), "RGB" if pixels.ndim == 3 else "L")
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        out = io.BytesIO()
        image.save(out, "PNG")
        return Response(200, out.getvalue(), "image/png")

    def back(series: Series | None, note: str) -> Response:
        where = f"/study/{quote(series.study_instance_uid, safe='')}?done={quote(note)}" if series else "/"
        return Response(303, b"", "text/plain", {"Location": where})

    def resend(request: Request) -> Response:
        uid = request.form.get("series", "")
        series = db.get_series(uid)
        if series is None:
            return text(404, "no such series\n")
        done = db.requeue_failed_deliveries(uid)
        count = done.get(uid, 0)
        db.log_event("audit", f"re-send of failed deliveries by {request.actor}: {count} re-queued",
                     series_instance_uid=uid, study_instance_uid=series.study_instance_uid)
        db.audit(events.console_action(request.user or "unknown", request.address, "resend",
                                       StudyObject(series.study_instance_uid), done=True,
                                       detail=f"series {uid}: {count} failed deliveries re-queued"))
        node.wake_delivery()
        return back(series, f"{count} deliveries re-queued")

    def reanalyse(request: Request) -> Response:
        uid = request.form.get("series", "")
        series = db.get_series(uid)
        if series is None:
            return text(404, "no such series\n")
        ok, why = node.reanalyse(uid)
        db.log_event("audit", f"re-analysis by {request.actor}: {why}", level="INFO" if ok else "WARNING",
                     series_instance_uid=uid, study_instance_uid=series.study_instance_uid)
        db.audit(events.console_action(request.user or "unknown", request.address, "reanalyse",
                                       StudyObject(series.study_instance_uid), done=ok, detail=f"series {uid}: {why}"))
        return back(series, why)

    def retract_result(request: Request) -> Response:
        from ihd_node.retraction import RetractionRefused, retract

        uid = request.form.get("series", "")
        series = db.get_series(uid)
        if series is None:
            return text(404, "no such series\n")
        try:
            done = retract(cfg, db, uid, reason=request.form.get("reason", ""), who=f"{request.user} (console)",
                           results_dir=results_dir)
        except RetractionRefused as exc:
            db.log_event("audit", f"retraction by {request.actor} refused: {exc}", level="WARNING",
                         series_instance_uid=uid, study_instance_uid=series.study_instance_uid)
            return back(series, f"not retracted: {exc}")
        db.log_event("audit", f"retraction by {request.actor}: {done.summary()}", level="WARNING",
                     series_instance_uid=uid, study_instance_uid=series.study_instance_uid)
        node.wake_delivery()
        return back(series, "result retracted; the notices are queued")

    return {("GET", "/"): index, ("GET", "/study/"): study, ("GET", "/thumb/"): thumb,
            ("POST", "/actions/resend"): resend, ("POST", "/actions/reanalyse"): reanalyse,
            ("POST", "/actions/retract"): retract_result,
            **performance_routes(node, server, render), **admin_routes(node, render),
            **reads_import_routes(db, render)}


# "retracted": a late instance leaves it alone; re-analysis is the explicit way to a new result.
REANALYSABLE = ("analyzed", "delivered", "failed", "retracted")
OBJECT_NAMES = {"hl7-oru": "HL7 ORU", "fhir-bundle": "FHIR bundle", "1.2.840.10008.5.1.4.1.1.88.59": "KOS"}


def object_name(sop_class_uid: str) -> str:
    """What an outbox row carries, in a word, for the deliveries table."""
    return OBJECT_NAMES.get(sop_class_uid) or ("SR" if ".88." in sop_class_uid else "capture")


TEMPLATES.globals["object_name"] = object_name
