"""What the admin commands on the log database (status, log, retry) share: opening the database the node
made (never creating one), times as ISO text, and lines that fit a 100-column terminal.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ihd_node.config import load_config
from ihd_node.store import Database

WIDTH = 100  # the terminal width `status` and `log` fit (issue 7 item 16)


def open_existing(config_path: str) -> Database:
    """The node's log database, never created here: a root-owned new file would lock the service out."""
    config = load_config(config_path)
    db = Database(config.database_url, create=False)
    db.check_schema()  # a schema from another version would answer wrongly or not at all
    db.configure_audit(config)  # what a command records (retract, labels) names this installation
    return db


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds")


def seconds_between(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier).total_seconds(), 3)


def short_time(value: str | None) -> str:
    """An ISO time as `YYYY-MM-DD HH:MM:SS UTC` (status lines must fit 100 columns)."""
    return "-" if not value else value[:19].replace("T", " ") + " UTC"


def age(seconds: float | None) -> str:
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


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip()] + [fmt.format(*r).rstrip() for r in cells]


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 object`, `3 objects`."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def clip(text: str | None, width: int) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "~"


def fit(text: str, indent: str = "      ") -> str:
    """Wrap a long line to WIDTH columns (continuation lines indented); UIDs are never broken."""
    lead = text[: len(text) - len(text.lstrip("\n"))]
    body = text[len(lead):]
    if len(body) <= WIDTH:
        return text
    # Only words longer than a whole line are broken (never a UID: at most 64 characters).
    return lead + textwrap.fill(body, WIDTH, subsequent_indent=indent,
                                break_on_hyphens=False)


def cluster_data(config_path: str, db: Database) -> dict[str, Any]:
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
