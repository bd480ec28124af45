"""The console's /performance page (local performance and drift, ihd_node.web.performance_view) and the
radiologist's read form.

The read form (`/read/<StudyUID>`, POST `/actions/read`) is the reader's own judgement: it shows the study
(accession, series) but not the model's result, and no answer is pre-filled; once saved, the study page shows
the read beside the model's call. Saving needs the operator role, records the user as entered_by and books an
`audit` event naming the user and role. A later read of the same study and finding replaces the earlier one;
both stay in the history.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from ihd_node import nodelog
from ihd_node.audit import StudyObject, events
from ihd_node.classes import CLASSES, FINDING_NAMES
from ihd_node.monitoring import PerformanceReport, local_performance
from ihd_node.monitoring.drift import DriftReport, drift_report
from ihd_node.store import READ_VALUES, Database, NewRead, utcnow
from ihd_node.web.performance_view import performance_context
from ihd_node.web.server import Request, Response, WebServer, text

VALUE_WORDS = {"present": "present", "absent": "absent", "not_assessed": "not assessed"}


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """`30d`, `12w`, `24h` back from now, or an ISO date/time (local time when no zone); None when empty."""
    value = (value or "").strip()
    if not value:
        return None
    now = now or utcnow()
    match = re.fullmatch(r"(\d+)\s*([hdw])", value)
    if match:
        n, unit = int(match.group(1)), match.group(2)
        return now - timedelta(hours=n) * {"h": 1, "d": 24, "w": 168}[unit]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when.astimezone() if when.tzinfo is None else when).astimezone(UTC)


class CardCache:
    """The configured checkpoint's model card (metadata), read once; None when it cannot be read."""

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint
        self._lock = threading.Lock()
        self._done = False
        self._card: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            if not self._done:
                self._done = True
                try:
                    from ihd_node.model.checkpoint import read_checkpoint

                    _, data = read_checkpoint(self.checkpoint)
                    data.pop("state_dict", None)
                    self._card = data
                except Exception as exc:  # noqa: BLE001 - the page shows "none found" instead
                    nodelog.warning("performance.no_model_card", error=f"{type(exc).__name__}: {exc}")
            return self._card


def reports(db: Database, config: Any, card: dict[str, Any] | None, since: datetime | None = None
            ) -> tuple[PerformanceReport, DriftReport | None]:
    perf = local_performance(db, since=since, model_card=card)
    drift = drift_report(db, config.monitoring) if config.monitoring.drift else None
    return perf, drift


def study_reads(db: Database, study_uid: str) -> dict[str, Any]:
    """What the study page's reads block (templates/reads.html) shows: the current reads and the history."""
    current = db.current_reads([study_uid]).get(study_uid, {})
    return {"reads_current": [(c, FINDING_NAMES[c], current.get(c)) for c in CLASSES],
            "reads_history": db.read_history(study_uid), "read_words": VALUE_WORDS}


def performance_routes(node: Any, server: WebServer, render: Any) -> dict[tuple[str, str], Any]:
    """`render(template, request, **context)` is the console's (ihd_node.web.console)."""
    db, cfg = node.db, node.config
    cards = CardCache(cfg.model.checkpoint_path)

    def performance(request: Request) -> Response:
        since = parse_since(request.query.get("since"))
        perf, drift = reports(db, cfg, cards.get(), since)
        return render("performance.html", request, episodes=db.drift_episodes(10),
                      **performance_context(perf, drift))

    def read_form(request: Request) -> Response:
        study_uid = request.path.removeprefix("/read/")
        detail = db.study_detail(study_uid)
        if detail is None:
            return text(404, "no such study in the log database\n")
        return render("read_form.html", request, study=detail.study, series=[x.series for x in detail.series],
                      findings=[(c, FINDING_NAMES[c]) for c in CLASSES], values=VALUE_WORDS,
                      now=datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M"))

    def save_read(request: Request) -> Response:
        study_uid = request.form.get("study", "")
        if db.study_detail(study_uid) is None:
            return text(404, "no such study\n")
        reader = (request.form.get("reader") or request.user or "").strip()[:128]
        read_at = parse_since(request.form.get("read_at")) or utcnow()
        reads = []
        for c in CLASSES:
            value = request.form.get(f"finding_{c}", "")
            if value == "":
                continue
            if value not in READ_VALUES:
                return text(400, f"finding_{c}: {value!r} is not one of {', '.join(READ_VALUES)}\n")
            reads.append(NewRead(study_uid, c, value, reader or None, read_at))
        if not reads:
            return text(400, "no finding was answered; choose present, absent or not assessed for at least one\n")
        db.add_reads(reads, source="console", entered_by=request.user)
        said = ", ".join(f"{r.finding}={r.value}" for r in reads)
        db.log_event("audit", f"read entered by {request.actor} (reader {reader or 'not named'}): {said}",
                     study_instance_uid=study_uid)
        db.audit(events.labels_import(request.user, "console read form", [StudyObject(study_uid)], count=len(reads)))
        note = f"read saved: {said}"
        return Response(303, b"", "text/plain", {"Location": f"/study/{quote(study_uid, safe='')}"
                                                              f"?done={quote(note)}#reads"})

    return {("GET", "/performance"): performance, ("GET", "/read/"): read_form,
            ("POST", "/actions/read"): save_read}
