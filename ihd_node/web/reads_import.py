"""The console's import of a file of radiologists' reads (operator role): the same CSV format, checks and
all-or-nothing rule as `ihd-node labels import` (ihd_node.monitoring.labels), uploaded from the browser.

GET /reads/import shows the form; POST /actions/import-reads takes the file (multipart/form-data) and either
checks it only or imports every row, audited with the console user (an `audit` event and a 110107 Import
audit message)."""

from __future__ import annotations

from typing import Any

from ihd_node.monitoring.labels import MAX_BYTES, import_reads
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
        done = import_reads(db, data, file=name, user=request.user, check_only=check_only)
        if done.problems:
            db.log_event("audit", f"reads import by {request.actor} refused: {name} has {len(done.problems)} "
                                  "problem(s); nothing imported", level="WARNING")
            return answer(400, f"{name}: nothing imported; fix these and send the file again:",
                          [str(p) for p in done.problems])
        if not done.imported:
            return answer(200, f"{name}: all {len(done.reads)} read(s) of {done.studies} study(ies) are good; "
                               "nothing imported (check only).", [])
        db.log_event("audit", f"reads import by {request.actor}: {len(done.reads)} read(s) of {done.studies} "
                              f"study(ies) from {name}")
        return answer(200, f"{name}: imported {len(done.reads)} read(s) of {done.studies} study(ies).", [])

    return {("GET", "/reads/import"): form, ("POST", "/actions/import-reads"): upload}
