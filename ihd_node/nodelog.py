"""One log line per event, `level event key=value ...`, to stdout: journald adds the time stamps.

Only UIDs, AE titles, addresses, states and numbers are logged; never patient names or birth dates.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("ihd_node")


def _value(value: object) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
    return text


def kv(event: str, **fields: object) -> str:
    return " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)])


def debug(event: str, **fields: object) -> None:
    if LOGGER.isEnabledFor(logging.DEBUG):
        LOGGER.debug(kv(event, **fields))


def info(event: str, **fields: object) -> None:
    LOGGER.info(kv(event, **fields))


def warning(event: str, **fields: object) -> None:
    LOGGER.warning(kv(event, **fields))


def error(event: str, **fields: object) -> None:
    LOGGER.error(kv(event, **fields))


def setup(level: int = logging.INFO, timestamps: bool = False) -> None:
    """Route the node's log to stdout; time stamps only when not under journald."""
    handler = logging.StreamHandler(sys.stdout)
    fmt = "%(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(("%(asctime)s " if timestamps else "") + fmt))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its per-PDU chatter is not our event log
