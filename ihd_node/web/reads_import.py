"""The console's import of a file of radiologists' reads (operator role): the same CSV format, checks and
all-or-nothing rule as `ihd-node labels import` (ihd_node.monitoring.labels), uploaded from the browser.

GET /reads/import shows the form; POST /actions/import-reads takes the file (multipart/form-data) and either
checks it only or imports every row, audited with the console user (an `audit` event and a 110107 Import
audit message)."""

from __future__ import annotations

from typing import Any

from ihd_node.audit import StudyObject, events
from ihd_node.monitoring.labels import MAX_BYTES, parse_labels_csv, resolve_labels
from ihd_node.store import Database
from ihd_node.web.server import Request, Response


def reads_import_routes(db: Database, render: Any) -> dict[tuple[str, str], Any]:
    def form(request: Request) -> Response:
        return render("reads_import.html", request, limit_mb=MAX_BYTES / 2**20, problems=[], outcome=None)

    def upload(request: Request) -> Response:
        data = request.files.get("file")
        name = request.form.get("file_name") or "uploaded file"
        check_only = request.form.get("check_only") == "1"

        def answer(status: int, outcome: str, problems: list[str]) -> Response:
            page = render("reads_import.html", request, limit_mb=MAX_BYTES / 2**20, problems=problems,
                          outcome=outcome)
            page.status = status
            return page

        if not data:
            return answer(400, "No file was sent: choose the CSV file of reads, then Import.", [])
        parsed = parse_labels_csv(data, max_bytes=MAX_BYTES)
        reads, problems = resolve_labels(parsed, db.find_studies)
        if problems:
            db.log_event("audit", f"reads import by {request.actor} refused: {name} has {len(problems)} problem(s); "
                                  "nothing imported", level="WARNING")
            return answer(400, f"{name}: nothing imported; fix these and send the file again:",
                          [str(p) for p in problems])
        studies = sorted({r.study_instance_uid for r in reads})
        if check_only:
            return answer(200, f"{name}: all {len(reads)} read(s) of {len(studies)} study(ies) are good; nothing "
                               "imported (check only).", [])
        db.add_reads(reads, source="csv", entered_by=request.user)
        db.log_event("audit", f"reads import by {request.actor}: {len(reads)} read(s) of {len(studies)} study(ies) "
                              f"from {name}")
        db.audit(events.labels_import(request.user, name, [StudyObject(uid) for uid in studies], count=len(reads)))
        return answer(200, f"{name}: imported {len(reads)} read(s) of {len(studies)} study(ies).", [])

    return {("GET", "/reads/import"): form, ("POST", "/actions/import-reads"): upload}
