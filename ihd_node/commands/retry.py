"""`ihd-node retry`: put failed and rejected result deliveries back into the outbox."""

from __future__ import annotations

from typing import Any

from ihd_node.commands.readout import open_existing
from ihd_node.commands.status import node_data
from ihd_node.config import load_config
from ihd_node.errors import UserError
from ihd_node.store import utcnow


def retry_command(args: Any) -> int:
    """`ihd-node retry SERIES_UID | --failed`: re-queue failed and rejected result deliveries.

    Only the outbox rows change; the running node's delivery thread picks them up within a second (it
    polls the outbox), or the next start does. Nothing is analysed again."""
    config = load_config(args.config)
    db = open_existing(args.config)
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
        gone = db.pending_destinations_except(known)
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
