"""`ihd-node log`: studies received recently, with their findings and the time each stage took.

It only reads the log database (never creates or changes it), so an admin may run it while the node
serves. Output names studies by accession number and UIDs only; the database holds nothing else.
"""

from __future__ import annotations

import json
import re
import textwrap
from datetime import datetime, timedelta
from typing import Any

from ihd_node.classes import CLASSES, INCOMPLETE_SERIES
from ihd_node.commands.readout import (
    WIDTH,
    cluster_data,
    fit,
    format_cluster,
    iso,
    open_existing,
    plural,
    seconds_between,
    short_time,
    text_table,
)
from ihd_node.errors import UserError
from ihd_node.store import Database, Series, utcnow

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> timedelta:
    """`30m`, `2h`, `7d` (also s and w) -> timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        raise UserError(f"--since {text!r}: use a number and a unit (s, m, h, d, w), e.g. 30m, 2h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])



def log_data(db: Database, since: timedelta, now: datetime | None = None) -> dict[str, Any]:
    """Studies with an instance received since `now - since`, newest first, with findings and timings."""
    now = now or utcnow()
    start = now - since
    recent = db.recent_studies(start)

    def one(x: Series) -> dict[str, Any]:
        a = recent.latest.get(x.id)
        entry: dict[str, Any] = {
            "series_instance_uid": x.series_instance_uid,
            "series_description": x.series_description,
            "modality": x.modality,
            "n_instances": x.n_instances,
            "state": x.state,
            "reason": x.reason,
            "calling_aet": x.calling_aet,
            "completion_rule": x.completion_rule,
            "revision": x.revision,
            "first_received": iso(x.first_received),
            "last_received": iso(x.last_received),
            "completed": iso(x.completed),
            "analysis_started": iso(x.analysis_started),
            "analysis_finished": iso(x.analysis_finished),
            "delivered": iso(x.delivered),
            "time_to_result_seconds": seconds_between(
                x.delivered or (x.analysis_finished if x.state == "analyzed" else None), x.last_received
            ),
            "findings": None,
            "incomplete_series": None,
            "probabilities": None,
            "model": None,
            "stages": {
                "wait_seconds": seconds_between(x.completed, x.last_received),
                "queue_seconds": seconds_between(x.analysis_started, x.completed),
                "analysis_seconds": seconds_between(x.analysis_finished, x.analysis_started),
                "load_seconds": None,
                "inference_seconds": None,
                "gradcam_seconds": None,
                "report_seconds": None,
                "delivery_seconds": seconds_between(x.delivered, x.analysis_finished),
            },
        }
        if a is not None:
            probs = a.probabilities()
            entry["findings"] = {c: round(probs[c], 4) for c in a.positives()}
            entry["probabilities"] = {c: round(probs[c], 4) for c in CLASSES}
            entry["model"] = f"{a.model_name} {a.model_version}"
            entry["sr_sop_instance_uid"] = a.sr_sop_instance_uid
            # Analysed before all its images may have arrived: the result says INCOMPLETE SERIES (why, else None).
            completion = db.latest_completion(x.series_instance_uid)
            entry["incomplete_series"] = completion.preliminary if completion is not None else None
            entry["retracted"] = None if a.retracted_at is None else {
                "at": iso(a.retracted_at), "by": a.retracted_by, "reason": a.retraction_reason}
            for k in ("load", "inference", "gradcam", "report"):
                entry["stages"][f"{k}_seconds"] = getattr(a, f"{k}_seconds")
        return entry

    by_study: dict[int, list[dict[str, Any]]] = {}
    for x in recent.series:
        by_study.setdefault(x.study_id, []).append(one(x))
    return {
        "generated_at": iso(now),
        "since": iso(start),
        "studies": [
            {
                "study_instance_uid": st.study_instance_uid,
                "accession_number": st.accession_number,
                "first_received": iso(st.first_received),
                "last_received": iso(st.last_received),
                "series": by_study.get(st.id, []),
            }
            for st in recent.studies
        ],
    }


def _findings_text(x: dict[str, Any]) -> str:
    if x["findings"] is None:
        return x["reason"] or ""
    partial = f"{INCOMPLETE_SERIES}: " if x.get("incomplete_series") else ""
    if not x["findings"]:
        return f"{partial}negative (any {x['probabilities']['any']:.2f})"
    return partial + ", ".join(f"{c} {p:.2f}" for c, p in x["findings"].items())


def _stages_text(st: dict[str, float | None]) -> str:
    names = (
        ("wait", "wait_seconds"),
        ("queue", "queue_seconds"),
        ("load", "load_seconds"),
        ("infer", "inference_seconds"),
        ("cam", "gradcam_seconds"),
        ("report", "report_seconds"),
        ("send", "delivery_seconds"),
    )
    return " ".join(f"{short} {st[key]:.1f}" for short, key in names if st.get(key) is not None)


def format_log(data: dict[str, Any]) -> str:
    """One block per series: a table line, then its description and UID, then its stages; <= 100 columns."""
    studies = data["studies"]
    lines = [f"{plural(len(studies), 'study', 'studies')} since {short_time(data['since'])}"]
    entries = [(st, x) for st in studies for x in st["series"]]
    rows = []
    for st, x in entries:
        ttr = x["time_to_result_seconds"]
        rows.append(((x["last_received"] or "")[5:19].replace("T", " "), st["accession_number"], x["state"],
                     "-" if ttr is None else f"{ttr:.1f} s", ""))
    if not rows:
        return "\n".join(lines)
    table = text_table(("LAST IMAGE", "ACCESSION", "STATE", "RESULT IN", "FINDINGS"), rows)
    lines.append(table[0] + "  (times UTC)")
    column = len(table[0]) - len("FINDINGS")
    for (_st, x), row in zip(entries, table[1:], strict=True):
        findings = textwrap.wrap(_findings_text(x) or "-", max(WIDTH - column, 30),
                                 break_long_words=False)
        lines.append(row.ljust(column) + findings[0])
        lines += [" " * column + more for more in findings[1:]]
        lines.append(fit(f"    {x['series_description'] or '-'} ({plural(x['n_instances'], 'image')}), "
                         f"series {x['series_instance_uid']}"))
        stages = _stages_text(x["stages"])
        if stages:
            lines.append(fit(f"    stages (s): {stages}"))
        if x.get("retracted"):
            r = x["retracted"]
            lines.append(fit(f"    RETRACTED {short_time(r['at'])} by {r['by']}: {r['reason']}"))
    return "\n".join(lines)


def log_command(args: Any) -> int:
    since = parse_since(args.since)
    db = open_existing(args.config)
    try:
        data = log_data(db, since)
        data.update(cluster_data(args.config, db))
    finally:
        db.close()
    print(json.dumps(data, indent=2) if args.json else format_log(data) + format_cluster(data))
    return 0
