"""`ihd-node status` and `ihd-node log`: what the node is doing now, and what it did recently.

Both only read the log database (never create or change it), so an admin may run them while the node
serves. Output names studies by accession number and UIDs only; the database holds nothing else.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from ihd_node.classes import CLASSES
from ihd_node.config import load_config
from ihd_node.errors import UserError
from ihd_node.store.database import Analysis, Database, Delivery, NodeRun, Series, Study, utcnow

IN_FLIGHT = ("received", "complete", "analyzing", "delivering")
WAITING = "waiting for the rest of the series"  # series.reason while the completion checks hold it back
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> timedelta:
    """`30m`, `2h`, `7d` (also s and w) -> timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        raise UserError(f"--since {text!r}: use a number and a unit (s, m, h, d, w), e.g. 30m, 2h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _open(config_path: str) -> Database:
    config = load_config(config_path)
    db = Database(config.database_url, create=False)
    db.check_schema()  # a schema from another version would answer wrongly or not at all
    return db


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds")


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier).total_seconds(), 3)


# ---------------------------------------------------------------- status


def status_data(db: Database, now: datetime | None = None) -> dict[str, Any]:
    """What is in flight now, the outbox, and failures that still need an admin."""
    now = now or utcnow()
    with db.read_session() as s:
        series = list(
            s.scalars(select(Series).where(Series.state.in_(IN_FLIGHT)).order_by(Series.last_received))
        )
        sent = dict(
            s.execute(
                select(Delivery.series_id, func.count())
                .where(Delivery.status == "sent")
                .group_by(Delivery.series_id)
            ).all()
        )
        pending_by_series = dict(
            s.execute(
                select(Delivery.series_id, func.count())
                .where(Delivery.status == "pending")
                .group_by(Delivery.series_id)
            ).all()
        )
        pending = s.execute(
            select(func.count(), func.min(Delivery.created_at), func.min(Delivery.next_attempt_at)).where(
                Delivery.status == "pending"
            )
        ).one()
        failed_series = list(
            s.scalars(
                select(Series).where(Series.state == "failed").order_by(Series.updated.desc()).limit(50)
            )
        )
        failed_ids = [x.id for x in failed_series]
        failed_deliveries = (
            list(
                s.scalars(
                    select(Delivery)
                    .where(Delivery.status.in_(("failed", "rejected")), Delivery.series_id.in_(failed_ids))
                    .order_by(Delivery.updated_at.desc())
                    .limit(50)
                )
            )
            if failed_ids
            else []
        )
        retrying = list(
            s.scalars(
                select(Delivery)
                .where(Delivery.status == "pending", Delivery.attempts > 0)
                .order_by(Delivery.next_attempt_at)
                .limit(50)
            )
        )

    def row(x: Series) -> dict[str, Any]:
        return {
            "state": x.state,
            "series_instance_uid": x.series_instance_uid,
            "study_instance_uid": x.study.study_instance_uid,
            "accession_number": x.study.accession_number,
            "modality": x.modality,
            "series_description": x.series_description,
            "n_instances": x.n_instances,
            "calling_aet": x.calling_aet,
            "first_received": _iso(x.first_received),
            "last_received": _iso(x.last_received),
            "seconds_since_last_instance": _seconds(now, x.last_received),
            "association_open": x.association_released is None and x.state == "received",
            "objects_sent": sent.get(x.id, 0),
            "objects_pending": pending_by_series.get(x.id, 0),
            "reason": x.reason,
        }

    def delivery(d: Delivery) -> dict[str, Any]:
        return {
            "destination": d.destination,
            "series_instance_uid": d.series.series_instance_uid,
            "accession_number": d.series.study.accession_number,
            "sop_instance_uid": d.sop_instance_uid,
            "sop_class_uid": d.sop_class_uid,
            "status": d.status,
            "attempts": d.attempts,
            "last_status": d.last_status,
            "last_error": d.last_error,
            "updated_at": _iso(d.updated_at),
            "next_attempt_at": _iso(d.next_attempt_at) if d.status == "pending" else None,
        }

    count, oldest, next_at = pending
    return {
        "generated_at": _iso(now),
        "database": db.url.render_as_string(hide_password=True),
        "node": _with_health(db, node_data(db.node_runs(), now)),
        "in_flight": [row(x) for x in series],
        "outbox": {
            "pending": int(count or 0),
            "oldest_pending_since": _iso(oldest),
            "next_attempt_at": _iso(next_at),
            "retrying": [delivery(d) for d in retrying],
        },
        "failed_series": [row(x) for x in failed_series],
        "failed_deliveries": [delivery(d) for d in failed_deliveries],
    }


def node_data(runs: Sequence[NodeRun], now: datetime) -> dict[str, Any]:
    """Is a node process running on this database, and which one holds the work (newest run first)?

    state: running (heartbeat within three periods), not_responding (no clean stop, heartbeat too old:
    killed, crashed or hung), stopped (clean stop, or a run ended without one and nothing runs now) or
    never_started."""

    def run(r: NodeRun) -> dict[str, Any]:
        return {
            "node_id": r.node_id, "host": r.host, "pid": r.pid, "version": r.version,
            "started_at": _iso(r.started_at), "last_heartbeat": _iso(r.heartbeat_at),
            "seconds_since_heartbeat": _seconds(now, r.heartbeat_at),
            "heartbeat_seconds": r.heartbeat_seconds,
            "stopped_at": _iso(r.stopped_at), "stop_reason": r.stop_reason,
        }

    live = [r for r in runs if r.alive(now)]
    if live:
        state, since, current = "running", live[0].started_at, live[0]
    elif not runs:
        state, since, current = "never_started", None, None
    elif runs[0].stopped_at is None:
        state, since, current = "not_responding", runs[0].heartbeat_at, runs[0]
    else:
        state, since, current = "stopped", runs[0].stopped_at, runs[0]
    return {
        "state": state,
        "since": _iso(since),
        "current": run(current) if current is not None else None,
        "running": [run(r) for r in live],
        "recent_runs": [run(r) for r in runs],
    }


def _with_health(db: Database, node: dict[str, Any]) -> dict[str, Any]:
    """The running node's last "degraded"/"recovered" note (ihd_node.node.loops), None when it has none."""
    from ihd_node.store.work import last_health_event

    cur = node["current"]
    event = last_health_event(db, datetime.fromisoformat(cur["started_at"])) if node["state"] == "running" else None
    node["health"] = None if event is None else {"at": _iso(event.at), "note": event.message}
    return node


def format_node(node: dict[str, Any]) -> list[str]:
    cur = node["current"]
    if node["state"] == "never_started":
        return ["Node: never started on this database (no heartbeat booked)"]
    where = f"{cur['host']} pid {cur['pid']}"
    if node["state"] == "running":
        lines = [f"Node: RUNNING since {_short(cur['started_at'])} as {where} "
                 f"(heartbeat {_age(cur['seconds_since_heartbeat'])} ago)"]
        lines += [f"  also running: {r['host']} pid {r['pid']} since {_short(r['started_at'])}"
                  for r in node["running"][1:]]
        health = node.get("health")
        if health:
            word = "DEGRADED" if health["note"].startswith("degraded") else "was degraded"
            lines.append(f"  {word} (booked {_short(health['at'])}): {health['note']}")
        return lines
    if node["state"] == "not_responding":
        return [f"Node: NOT RUNNING - {where} gave its last heartbeat {_short(cur['last_heartbeat'])} "
                "without a clean stop (killed, crashed or hung); its work resumes at the next start"]
    return [f"Node: STOPPED since {_short(cur['stopped_at'])} ({cur['stop_reason']}; was {where})"]


def _short(value: str | None) -> str:
    """An ISO time as `YYYY-MM-DD HH:MM:SS UTC` (status lines must fit 100 columns)."""
    return "-" if not value else value[:19].replace("T", " ") + " UTC"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip()] + [fmt.format(*r).rstrip() for r in cells]


def format_status(data: dict[str, Any]) -> str:
    """The text `ihd-node status` prints; every line fits a 100-column terminal (the JSON has it all)."""
    database = data["database"]
    if len(database) > WIDTH - 10:  # a long path: keep both ends
        database = database[:30] + "..." + database[-(WIDTH - 43):]
    lines = [f"ihd-node status at {_short(data['generated_at'])}", f"database: {database}"]
    lines += [_fit(x) for x in format_node(data["node"])]
    running = data["node"]["state"] == "running"
    flight = data["in_flight"]
    lines.append(f"\nIn flight: {_n(len(flight), 'series', 'series')}" + ("" if flight else " (idle)"))
    if flight:
        rows = []
        for x in flight:
            if x["state"] == "received" and (x["reason"] or "").startswith(WAITING):
                detail = "held: " + x["reason"].split("): ", 1)[-1]  # what the completion checks miss
            elif x["state"] == "received":
                detail = "association open" if x["association_open"] else "waiting for quiet time"
            elif x["state"] == "delivering":
                detail = f"{x['objects_sent']} sent, {x['objects_pending']} pending"
            else:
                detail = x["reason"] or ""
            rows.append((x["state"], x["accession_number"], _clip(x["series_description"], 24),
                         x["n_instances"], _age(x["seconds_since_last_instance"]), _clip(detail, 30)))
        table = _table(("STATE", "ACCESSION", "SERIES", "IMAGES", "LAST IMAGE", "DETAIL"), rows)
        lines.append("  " + table[0])
        for x, row in zip(flight, table[1:], strict=True):
            lines += ["  " + row, f"    series {x['series_instance_uid']}"]
    out = data["outbox"]
    lines.append(_fit(
        f"\nOutbox: {_n(out['pending'], 'object')} pending"
        + (
            f" since {_short(out['oldest_pending_since'])}; next attempt "
            + (_short(out["next_attempt_at"]) if running else "when the node runs again")
            if out["pending"]
            else ""
        )
    ))
    # One line per destination (not per object): an outage of one PACS is one problem.
    by_dest: dict[str, list[dict[str, Any]]] = {}
    for d in out["retrying"]:
        by_dest.setdefault(d["destination"], []).append(d)
    for dest, rows_ in by_dest.items():
        last = max(rows_, key=lambda d: d["updated_at"] or "")
        lines.append(_fit(
            f"  retrying {dest}: {_n(len(rows_), 'object')}, {_n(last['attempts'], 'attempt')} so far, next "
            f"{_short(last['next_attempt_at']) if running else 'when the node runs again'}: "
            f"{last['last_error'] or _status_hex(last['last_status'])}"
        ))
    failed = data["failed_series"]
    if failed:
        lines.append(f"\nFailed series: {len(failed)} (re-send with `ihd-node retry SERIES_UID` or --failed)")
        for x in failed:
            lines.append(_fit(f"  {x['accession_number'] or '-'}  series {x['series_instance_uid']}: "
                              f"{x['reason']}"))
    if data["failed_deliveries"]:
        lines.append("\nFailed deliveries:")
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for d in data["failed_deliveries"]:
            groups.setdefault((d["series_instance_uid"], d["destination"], d["status"]), []).append(d)
        for (series_uid, dest, status), rows_ in groups.items():
            d = rows_[0]
            lines.append(_fit(
                f"  {status} by {dest} after {_n(d['attempts'], 'attempt')}: {_n(len(rows_), 'object')} of "
                f"series {series_uid}: {d['last_error'] or _status_hex(d['last_status'])}"
            ))
    return "\n".join(lines)


WIDTH = 100  # the terminal width `status` and `log` fit (issue 7 item 16)


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """`1 object`, `3 objects`."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


def _clip(text: str | None, width: int) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "~"


def _fit(text: str, indent: str = "      ") -> str:
    """Wrap a long line to WIDTH columns (continuation lines indented); UIDs are never broken."""
    lead = text[: len(text) - len(text.lstrip("\n"))]
    body = text[len(lead):]
    if len(body) <= WIDTH:
        return text
    # Only words longer than a whole line are broken (never a UID: at most 64 characters).
    return lead + textwrap.fill(body, WIDTH, subsequent_indent=indent,
                                break_on_hyphens=False)


def _status_hex(status: int | None) -> str:
    return "no answer" if status is None else f"status 0x{status:04X}"


def status_command(args: Any) -> int:
    db = _open(args.config)
    try:
        data = status_data(db)
        data.update(_cluster_data(args.config, db))
    finally:
        db.close()
    print(json.dumps(data, indent=2) if args.json else format_status(data) + format_cluster(data))
    return 0


def _cluster_data(config_path: str, db: Database) -> dict[str, Any]:
    """A multi-machine node (roles in separate processes): its members, queue and throughput; {} otherwise."""
    from ihd_node.node.cluster import cluster_view

    view = cluster_view(db)
    return {"cluster": view} if view else {}


def format_cluster(data: dict[str, Any]) -> str:
    view = data.get("cluster")
    if not view:
        return ""
    queue = ", ".join(f"{k} {v}" for k, v in view["queue"].items()) or "-"
    lines = ["", f"Cluster: analysis jobs waiting by priority: {queue}"]
    for m in view["members"]:
        state = "alive" if m["alive"] else f"SILENT for {m['seconds_since_heartbeat']:.0f} s"
        rate = "" if m["jobs_per_minute"] is None else (
            f", {m['jobs_done']} jobs, {m['jobs_per_minute']:.2f}/min"
            + (f", {m['seconds_per_job']:.2f} s/job" if m["seconds_per_job"] else ""))
        device = f" on {m['device']}" if m["device"] else ""
        lines.append(f"  {m['member']:<40} {m['roles']:<16} {state}{device}{rate}")
    return "\n".join(lines)


# ---------------------------------------------------------------- log


def log_data(db: Database, since: timedelta, now: datetime | None = None) -> dict[str, Any]:
    """Studies with an instance received since `now - since`, newest first, with findings and timings."""
    now = now or utcnow()
    start = now - since
    with db.read_session() as s:
        studies = list(
            s.scalars(select(Study).where(Study.last_received >= start).order_by(Study.last_received.desc()))
        )
        ids = [st.id for st in studies]
        series = (
            list(s.scalars(select(Series).where(Series.study_id.in_(ids)).order_by(Series.first_received)))
            if ids
            else []
        )
        latest: dict[int, Analysis] = {}
        if series:
            for a in s.scalars(
                select(Analysis)
                .where(Analysis.series_id.in_([x.id for x in series]))
                .order_by(Analysis.revision)
            ):
                latest[a.series_id] = a  # ordered by revision: the last one wins

    def one(x: Series) -> dict[str, Any]:
        a = latest.get(x.id)
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
            "first_received": _iso(x.first_received),
            "last_received": _iso(x.last_received),
            "completed": _iso(x.completed),
            "analysis_started": _iso(x.analysis_started),
            "analysis_finished": _iso(x.analysis_finished),
            "delivered": _iso(x.delivered),
            "time_to_result_seconds": _seconds(
                x.delivered or (x.analysis_finished if x.state == "analyzed" else None), x.last_received
            ),
            "findings": None,
            "probabilities": None,
            "model": None,
            "stages": {
                "wait_seconds": _seconds(x.completed, x.last_received),
                "queue_seconds": _seconds(x.analysis_started, x.completed),
                "analysis_seconds": _seconds(x.analysis_finished, x.analysis_started),
                "load_seconds": None,
                "inference_seconds": None,
                "gradcam_seconds": None,
                "report_seconds": None,
                "delivery_seconds": _seconds(x.delivered, x.analysis_finished),
            },
        }
        if a is not None:
            probs = a.probabilities()
            entry["findings"] = {c: round(probs[c], 4) for c in a.positives()}
            entry["probabilities"] = {c: round(probs[c], 4) for c in CLASSES}
            entry["model"] = f"{a.model_name} {a.model_version}"
            entry["sr_sop_instance_uid"] = a.sr_sop_instance_uid
            for k in ("load", "inference", "gradcam", "report"):
                entry["stages"][f"{k}_seconds"] = getattr(a, f"{k}_seconds")
        return entry

    by_study: dict[int, list[dict[str, Any]]] = {}
    for x in series:
        by_study.setdefault(x.study_id, []).append(one(x))
    return {
        "generated_at": _iso(now),
        "since": _iso(start),
        "studies": [
            {
                "study_instance_uid": st.study_instance_uid,
                "accession_number": st.accession_number,
                "first_received": _iso(st.first_received),
                "last_received": _iso(st.last_received),
                "series": by_study.get(st.id, []),
            }
            for st in studies
        ],
    }


def _findings_text(x: dict[str, Any]) -> str:
    if x["findings"] is None:
        return x["reason"] or ""
    if not x["findings"]:
        return f"negative (any {x['probabilities']['any']:.2f})"
    return ", ".join(f"{c} {p:.2f}" for c, p in x["findings"].items())


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
    lines = [f"{_n(len(studies), 'study', 'studies')} since {_short(data['since'])}"]
    entries = [(st, x) for st in studies for x in st["series"]]
    rows = []
    for st, x in entries:
        ttr = x["time_to_result_seconds"]
        rows.append(((x["last_received"] or "")[5:19].replace("T", " "), st["accession_number"], x["state"],
                     "-" if ttr is None else f"{ttr:.1f} s", ""))
    if not rows:
        return "\n".join(lines)
    table = _table(("LAST IMAGE", "ACCESSION", "STATE", "RESULT IN", "FINDINGS"), rows)
    lines.append(table[0] + "  (times UTC)")
    column = len(table[0]) - len("FINDINGS")
    for (_st, x), row in zip(entries, table[1:], strict=True):
        findings = textwrap.wrap(_findings_text(x) or "-", max(WIDTH - column, 30),
                                 break_long_words=False)
        lines.append(row.ljust(column) + findings[0])
        lines += [" " * column + more for more in findings[1:]]
        lines.append(_fit(f"    {x['series_description'] or '-'} ({_n(x['n_instances'], 'image')}), "
                          f"series {x['series_instance_uid']}"))
        stages = _stages_text(x["stages"])
        if stages:
            lines.append(_fit(f"    stages (s): {stages}"))
    return "\n".join(lines)


def log_command(args: Any) -> int:
    since = parse_since(args.since)
    db = _open(args.config)
    try:
        data = log_data(db, since)
        data.update(_cluster_data(args.config, db))
    finally:
        db.close()
    print(json.dumps(data, indent=2) if args.json else format_log(data) + format_cluster(data))
    return 0


# ---------------------------------------------------------------- retry


def retry_command(args: Any) -> int:
    """`ihd-node retry SERIES_UID | --failed`: re-queue failed and rejected result deliveries.

    Only the outbox rows change; the running node's delivery thread picks them up within a second (it
    polls the outbox), or the next start does. Nothing is analysed again."""
    config = load_config(args.config)
    db = _open(args.config)
    try:
        if args.series_uid:
            series = db.get_series(args.series_uid)
            if series is None:
                raise UserError(f"no series {args.series_uid} in the log database; `ihd-node status` lists "
                                "the failed ones")
        done = db.requeue_failed_deliveries(args.series_uid)
        if args.series_uid and not done:
            raise UserError(
                f"series {args.series_uid} ({series.state}) has no failed or rejected result delivery to "
                "re-send" + (f": {series.reason}" if series.reason else "")
                + ("; a series that failed before delivery needs the study sent again" if series.state
                   == "failed" else ""))
        if not done:
            print("no failed or rejected deliveries: nothing to re-send")
            return 0
        total = sum(done.values())
        db.log_event("retry", f"re-queued {total} result deliveries of {len(done)} series by ihd-node retry")
        known = {d.name for d in config.destinations}
        with db.read_session() as s:
            gone = sorted({d for (d,) in s.execute(select(Delivery.destination).where(
                Delivery.status == "pending", Delivery.destination.not_in(known))).all()})
        node = node_data(db.node_runs(), utcnow())
    finally:
        db.close()
    for uid, n in done.items():
        print(f"re-queued {n} object(s) of series {uid}")
    if gone:
        print(f"warning: destination(s) {', '.join(gone)} are no longer in {args.config}; "
              "those objects will fail again")
    if node["state"] == "running":
        cur = node["current"]
        print(f"the running node ({cur['host']} pid {cur['pid']}) sends them now; "
              "follow with `ihd-node status`")
    else:
        print("no node is running on this database: they are sent when `ihd-node serve` starts")
    return 0
