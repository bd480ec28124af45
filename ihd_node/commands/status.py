"""`ihd-node status`: is the node running, what is in flight now, and what failed.

It only reads the log database (never creates or changes it), so an admin may run it while the node
serves. Output names studies by accession number and UIDs only; the database holds nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ihd_node.commands.readout import (
    WIDTH,
    age,
    clip,
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
from ihd_node.config import load_config
from ihd_node.store import FHIR_BUNDLE, HL7_ORU, Database, Delivery, NodeRun, Series, utcnow
from ihd_node.store.work import last_health_event

WAITING = "waiting for the rest of the series"  # series.reason while the completion checks hold it back


def destination_kind(d: Delivery, kinds: Mapping[str, str]) -> str:
    """dicom / dicomweb / hl7 / fhir: from the config, else from what the row carries."""
    return kinds.get(d.destination) or MESSAGE_KIND.get(d.sop_class_uid, "dicom")


MESSAGE_KIND = {HL7_ORU: "hl7", FHIR_BUNDLE: "fhir"}


def status_data(db: Database, now: datetime | None = None,
                kinds: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What is in flight now, the outbox, failures that still need an admin, and recent retractions.
    `kinds`: destination name -> kind from the config (a row of a removed destination: guessed)."""
    now = now or utcnow()
    kinds = kinds or {}
    rows = db.status_rows()

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
            "first_received": iso(x.first_received),
            "last_received": iso(x.last_received),
            "seconds_since_last_instance": seconds_between(now, x.last_received),
            "association_open": x.association_released is None and x.state == "received",
            "objects_sent": rows.sent_by_series.get(x.id, 0),
            "objects_pending": rows.pending_by_series.get(x.id, 0),
            "reason": x.reason,
        }

    def delivery(d: Delivery) -> dict[str, Any]:
        return {
            "destination": d.destination,
            "kind": destination_kind(d, kinds),
            "series_instance_uid": d.series.series_instance_uid,
            "accession_number": d.series.study.accession_number,
            "sop_instance_uid": d.sop_instance_uid,
            "sop_class_uid": d.sop_class_uid,
            "status": d.status,
            "attempts": d.attempts,
            "last_status": d.last_status,
            "last_error": d.last_error,
            "updated_at": iso(d.updated_at),
            "next_attempt_at": iso(d.next_attempt_at) if d.status == "pending" else None,
        }

    return {
        "generated_at": iso(now),
        "database": db.url.render_as_string(hide_password=True),
        "node": with_health(db, node_data(db.node_runs(), now)),
        "in_flight": [row(x) for x in rows.in_flight],
        "outbox": {
            "pending": rows.pending,
            "oldest_pending_since": iso(rows.oldest_pending),
            "next_attempt_at": iso(rows.next_attempt),
            "retrying": [delivery(d) for d in rows.retrying],
        },
        "failed_series": [row(x) for x in rows.failed_series],
        "failed_deliveries": [delivery(d) for d in rows.failed_deliveries],
        "retracted": [{"series_instance_uid": a.series.series_instance_uid,
                       "accession_number": a.series.study.accession_number, "revision": a.revision - 1,
                       "at": iso(a.retracted_at), "by": a.retracted_by, "reason": a.retraction_reason}
                      for a in db.recent_retractions()],
    }


def node_data(runs: Sequence[NodeRun], now: datetime) -> dict[str, Any]:
    """Is a node process running on this database, and which one holds the work (newest run first)?

    state: running (heartbeat within three periods), not_responding (no clean stop, heartbeat too old:
    killed, crashed or hung), stopped (clean stop, or a run ended without one and nothing runs now) or
    never_started."""

    def run(r: NodeRun) -> dict[str, Any]:
        return {
            "node_id": r.node_id, "host": r.host, "pid": r.pid, "version": r.version,
            "started_at": iso(r.started_at), "last_heartbeat": iso(r.heartbeat_at),
            "seconds_since_heartbeat": seconds_between(now, r.heartbeat_at),
            "heartbeat_seconds": r.heartbeat_seconds,
            "stopped_at": iso(r.stopped_at), "stop_reason": r.stop_reason,
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
        "since": iso(since),
        "current": run(current) if current is not None else None,
        "running": [run(r) for r in live],
        "recent_runs": [run(r) for r in runs],
    }


def with_health(db: Database, node: dict[str, Any]) -> dict[str, Any]:
    """The running node's last "degraded"/"recovered" note (ihd_node.node.loops), None when it has none."""
    cur = node["current"]
    event = last_health_event(db, datetime.fromisoformat(cur["started_at"])) if node["state"] == "running" else None
    node["health"] = None if event is None else {"at": iso(event.at), "note": event.message}
    return node


def format_node(node: dict[str, Any]) -> list[str]:
    cur = node["current"]
    if node["state"] == "never_started":
        return ["Node: never started on this database (no heartbeat booked)"]
    where = f"{cur['host']} pid {cur['pid']}"
    if node["state"] == "running":
        lines = [f"Node: RUNNING since {short_time(cur['started_at'])} as {where} "
                 f"(heartbeat {age(cur['seconds_since_heartbeat'])} ago)"]
        lines += [f"  also running: {r['host']} pid {r['pid']} since {short_time(r['started_at'])}"
                  for r in node["running"][1:]]
        health = node.get("health")
        if health:
            word = "DEGRADED" if health["note"].startswith("degraded") else "was degraded"
            lines.append(f"  {word} (booked {short_time(health['at'])}): {health['note']}")
        return lines
    if node["state"] == "not_responding":
        return [f"Node: NOT RUNNING - {where} gave its last heartbeat {short_time(cur['last_heartbeat'])} "
                "without a clean stop (killed, crashed or hung); its work resumes at the next start"]
    return [f"Node: STOPPED since {short_time(cur['stopped_at'])} ({cur['stop_reason']}; was {where})"]


def format_status(data: dict[str, Any]) -> str:
    """The text `ihd-node status` prints; every line fits a 100-column terminal (the JSON has it all)."""
    database = data["database"]
    if len(database) > WIDTH - 10:  # a long path: keep both ends
        database = database[:30] + "..." + database[-(WIDTH - 43):]
    lines = [f"ihd-node status at {short_time(data['generated_at'])}", f"database: {database}"]
    lines += [fit(x) for x in format_node(data["node"])]
    running = data["node"]["state"] == "running"
    flight = data["in_flight"]
    lines.append(f"\nIn flight: {plural(len(flight), 'series', 'series')}" + ("" if flight else " (idle)"))
    if flight:
        rows = []
        for x in flight:
            if x["state"] == "received" and (x["reason"] or "").startswith(WAITING):
                reason = x["reason"]  # what the completion checks miss, or an association that ended unreleased
                detail = "held: " + (reason.split("): ", 1)[-1] if "): " in reason else
                                     "aborted, waits for max_wait" if "without a release" in reason else reason)
            elif x["state"] == "received":
                detail = "association open" if x["association_open"] else "waiting for quiet time"
            elif x["state"] == "delivering":
                detail = f"{x['objects_sent']} sent, {x['objects_pending']} pending"
            else:
                detail = x["reason"] or ""
            rows.append((x["state"], x["accession_number"], clip(x["series_description"], 24),
                         x["n_instances"], age(x["seconds_since_last_instance"]), clip(detail, 30)))
        table = text_table(("STATE", "ACCESSION", "SERIES", "IMAGES", "LAST IMAGE", "DETAIL"), rows)
        lines.append("  " + table[0])
        for x, row in zip(flight, table[1:], strict=True):
            lines += ["  " + row, f"    series {x['series_instance_uid']}"]
    out = data["outbox"]
    lines.append(fit(
        f"\nOutbox: {plural(out['pending'], 'object')} pending"
        + (
            f" since {short_time(out['oldest_pending_since'])}; next attempt "
            + (short_time(out["next_attempt_at"]) if running else "when the node runs again")
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
        lines.append(fit(
            f"  retrying {dest}{_kind(last)}: {plural(len(rows_), 'object')}, "
            f"{plural(last['attempts'], 'attempt')} so far, next "
            f"{short_time(last['next_attempt_at']) if running else 'when the node runs again'}: "
            f"{last['last_error'] or _status_hex(last['last_status'])}"
        ))
    failed = data["failed_series"]
    if failed:
        lines.append(f"\nFailed series: {len(failed)} (re-send with `ihd-node retry SERIES_UID` or --failed)")
        for x in failed:
            lines.append(fit(f"  {x['accession_number'] or '-'}  series {x['series_instance_uid']}: "
                             f"{x['reason']}"))
    if data["failed_deliveries"]:
        lines.append("\nFailed deliveries:")
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for d in data["failed_deliveries"]:
            groups.setdefault((d["series_instance_uid"], d["destination"], d["status"]), []).append(d)
        for (series_uid, dest, status), rows_ in groups.items():
            d = rows_[0]
            lines.append(fit(
                f"  {status} by {dest}{_kind(d)} after {plural(d['attempts'], 'attempt')}: "
                f"{plural(len(rows_), 'object')} of "
                f"series {series_uid}: {d['last_error'] or _status_hex(d['last_status'])}"
            ))
    if data.get("retracted"):
        lines.append("\nRetracted results (latest first):")
        for r in data["retracted"]:
            lines.append(fit(f"  {short_time(r['at'])} {r['accession_number'] or '-'} series "
                             f"{r['series_instance_uid']} revision {r['revision']} by {r['by']}: {r['reason']}"))
    return "\n".join(lines)


def _kind(delivery: dict[str, Any]) -> str:
    """' (hl7)' etc. after a destination's name; nothing for dicom, the usual kind (the JSON always has it)."""
    return "" if delivery["kind"] == "dicom" else f" ({delivery['kind']})"


def _status_hex(status: int | None) -> str:
    return "no answer" if status is None else f"status 0x{status:04X}"


def status_command(args: Any) -> int:
    db = open_existing(args.config)
    kinds = {d.name: d.kind for d in load_config(args.config).destinations}
    try:
        data = status_data(db, kinds=kinds)
        data.update(cluster_data(args.config, db))
    finally:
        db.close()
    print(json.dumps(data, indent=2) if args.json else format_status(data) + format_cluster(data))
    return 0
