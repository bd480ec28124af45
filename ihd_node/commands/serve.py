"""`ihd-node serve --config FILE [--roles ...]`: the node until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import pydicom
import pydicom.config

from ihd_node import nodelog
from ihd_node.config import load_config, runtime_problems
from ihd_node.errors import UserError
from ihd_node.node.wiring import ROLES, Node


def parse_roles(text: str | None) -> list[str] | None:
    """`--roles receive,deliver` -> the list; None (all in one process) when not given."""
    if text is None:
        return None
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise UserError(f"--roles {text!r}: use a comma list of {', '.join(ROLES)} (e.g. receive,deliver)")
    return roles


def serve_command(args: Any, roles: list[str] | None = None, device: str | None = None) -> int:
    """`ihd-node serve --config FILE [--roles ...]`: run until SIGTERM or SIGINT."""
    # Everything the node creates holds patient data: owner-only, also when started by hand (umask 022)
    # and for folders made with mkdir(parents=True), whose parents ignore the mode (the unit sets 0077 too).
    os.umask(0o077)
    # pydicom's warnings about invalid values quote the value, which may be a patient's name or birth date:
    # the node reads whatever senders send, so it does not warn about values (stdout goes to the journal).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    config = load_config(args.config)
    if roles is None:
        roles = parse_roles(getattr(args, "roles", None))
    if device:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N (N = the GPU's index)")
        config.model.device = device
    problems = runtime_problems(config)
    if problems:
        raise UserError("; ".join(problems))
    # Under systemd (JOURNAL_STREAM set) journald adds the time stamps; elsewhere the log line carries them.
    nodelog.setup(level=logging.getLevelNamesMapping()[config.logging.level],
                  timestamps=not os.environ.get("JOURNAL_STREAM"))
    stop = threading.Event()

    received: list[str] = []

    def _on_signal(signum: int, _frame: object) -> None:
        nodelog.info("signal", name=signal.Signals(signum).name)
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node = Node(config, roles=roles)
    try:
        node.start()
    except UserError as exc:
        node.stop(f"start-up failed: {exc}")
        raise
    except Exception as exc:
        # Any start-up failure is one line and exit 2 (the unit's RestartPreventExitStatus): restarting
        # cannot fix what stopped the first start, and a traceback hides the cause from the admin.
        node.stop(f"start-up failed: {type(exc).__name__}")
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"the node could not start: {type(exc).__name__}: {first}") from None
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop(f"clean stop on {received[0]}" if received else "stopped")
    return 0
