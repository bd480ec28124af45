"""`ihd-node retract SERIES_UID --reason TEXT`: take a sent result back (IOCM rejection note to the DICOM and
DICOMweb destinations, withdrawn ORU to the hl7 ones, entered-in-error report to the fhir ones)."""

from __future__ import annotations

import getpass
from typing import Any

from ihd_node.commands.readout import open_existing
from ihd_node.commands.status import node_data
from ihd_node.config import load_config
from ihd_node.retraction import retract
from ihd_node.store import utcnow


def retract_command(args: Any) -> int:
    """Book the retraction in the log database and queue its notices; the running node sends them (or the
    next start does). Refused, with why, for an unknown or unanalysed series or one retracted already."""
    config = load_config(args.config)
    db = open_existing(args.config)
    try:
        who = f"{getpass.getuser()} (ihd-node retract)"
        done = retract(config, db, args.series_uid, reason=args.reason, who=who,
                       results_dir=config.storage.results_dir)
        node = node_data(db.node_runs(), utcnow())
    finally:
        db.close()
    print(done.summary())
    if node["state"] == "running":
        print("the running node sends the notices now; follow with `ihd-node status`")
    else:
        print("no node is running on this database: the notices are sent when `ihd-node serve` starts")
    return 0
