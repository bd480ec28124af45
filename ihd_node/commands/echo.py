"""`ihd-node echo --config FILE`: is each destination reachable as configured (C-ECHO)?"""

from __future__ import annotations

from typing import Any

from ihd_node.config import load_config
from ihd_node.delivery.sender import echo


def echo_command(args: Any) -> int:
    """`ihd-node echo --config FILE`: C-ECHO each destination; non-zero exit when any failed."""
    config = load_config(args.config)
    if not config.dicom_destinations:
        print("no DICOM destinations configured (destinations: in the config); nothing to check")
        return 0
    failed = 0
    others = [d.name for d in config.destinations if d.kind != "dicom"]
    if others:
        print(f"not checked (not DICOM, C-ECHO does not apply): {', '.join(others)}")
    for dest in config.dicom_destinations:
        ok, detail = echo(config.node.ae_title, dest)
        failed += not ok
        where = f"{dest.ae_title}@{dest.host}:{dest.port}{' (TLS)' if dest.tls.enabled else ''}"
        print(f"{'OK' if ok else 'FAILED'} {dest.name} {where}: {detail}")
    return 1 if failed else 0
