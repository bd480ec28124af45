"""Fault injection for the reliability tests (tests/reliability): inert unless an environment variable is set.

IHD_NODE_CRASH_AT="<point>[:N][,<point>[:N]...]"
    The process SIGKILLs itself the N-th time (default: the first) any thread passes <point>: no clean-up,
    no flush, no atexit - exactly what `kill -9` or the OOM killer does.
IHD_NODE_PAUSE_AT="<point>[:N][,...]"
    The thread that passes <point> the N-th time logs `fault.paused point=<point>` and blocks for ever, so a
    test can `kill -9` the process from outside at a known place (other threads keep running).
IHD_NODE_SLOW_AT="<point>[:N]" with IHD_NODE_SLOW_SECONDS=S
    The thread that passes <point> the N-th time logs `fault.slowed` and sleeps S seconds (default 10), so a
    test can take the database away while that thread is at a known place (it then carries on).
IHD_NODE_FAIL_AT="<point>[:N][,...]"
    From the N-th time on, every pass of <point> raises InjectedFault: a step that keeps failing (an
    unreadable file, a bug), to check that the failure ends in a recorded state with its reason.

Before acting, a `fault.crash` / `fault.paused` / `fault.failed` line is written to the log (once), so a test
can tell that the point was reached. The points (where they sit, and what the state is there):

    receive.spooled    ihd_node.intake.spool.write_atomic: a received instance's file is renamed into place and
                       fsynced; its database row is not written and its C-STORE not answered yet
    analysis.started   ihd_node.node.worker: the series is "analyzing"; the model has not run yet
    analysis.written   ihd_node.node.worker: the result files (SR, captures) are written; the analysis and
                       its outbox rows are not committed yet
    delivery.stored    ihd_node.delivery.sender: the destination answered a C-STORE with success; the answer
                       is not booked in the outbox yet (the object is in the PACS, the node does not know)
    delivery.booked    ihd_node.delivery.sender: one answer was booked in the outbox
    delivery.answered  ihd_node.delivery.dispatch: an hl7, fhir or dicomweb destination answered (ACK, HTTP
                       status); the answer is not booked yet (the RIS/EHR has the message, the node does not know)
    alert.sending      ihd_node.delivery.alerts: an alert row is due (the analysis is committed); nothing sent yet
    alert.accepted     ihd_node.delivery.alerts: the receiving server accepted the alert; not booked yet
    completion.judge   ihd_node.triage.assembler: the completion checks of a quiet series are about to run
    study.profile      ihd_node.triage.study: the profile of a complete series is about to be built
"""

from __future__ import annotations

import os
import signal
import threading

from ihd_node import nodelog

CRASH_ENV = "IHD_NODE_CRASH_AT"
SLOW_ENV = "IHD_NODE_SLOW_AT"
PAUSE_ENV = "IHD_NODE_PAUSE_AT"
FAIL_ENV = "IHD_NODE_FAIL_AT"
POINTS = ("receive.spooled", "analysis.started", "analysis.written", "delivery.stored", "delivery.booked",
          "delivery.answered", "alert.sending", "alert.accepted", "completion.judge", "study.profile")


class InjectedFault(RuntimeError):
    """Raised at a point armed by IHD_NODE_FAIL_AT."""


def _parse(text: str | None) -> dict[str, int]:
    specs: dict[str, int] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
        specs[name] = int(nth) if nth else 1
    return specs


_CRASH = _parse(os.environ.get(CRASH_ENV))
_SLOW = _parse(os.environ.get(SLOW_ENV))
_SLOW_SECONDS = float(os.environ.get("IHD_NODE_SLOW_SECONDS", "10"))
_PAUSE = _parse(os.environ.get(PAUSE_ENV))
_FAIL = _parse(os.environ.get(FAIL_ENV))
_counts: dict[str, int] = {}
_lock = threading.Lock()


def point(name: str) -> None:
    """A named place where a test may kill or pause the process; does nothing unless configured."""
    if not _CRASH and not _PAUSE and not _SLOW and not _FAIL:
        return
    with _lock:
        _counts[name] = count = _counts.get(name, 0) + 1
    if _CRASH.get(name) == count:
        nodelog.warning("fault.crash", point=name, count=count)
        os.kill(os.getpid(), signal.SIGKILL)
    if _PAUSE.get(name) == count:
        nodelog.warning("fault.paused", point=name, count=count)
        threading.Event().wait()  # until the test kills the process
    if _SLOW.get(name) == count:
        nodelog.warning("fault.slowed", point=name, count=count, seconds=_SLOW_SECONDS)
        threading.Event().wait(_SLOW_SECONDS)
    if name in _FAIL and count >= _FAIL[name]:
        if count == _FAIL[name]:
            nodelog.warning("fault.failed", point=name, count=count)
        raise InjectedFault(f"fault injected at {name} (pass {count})")
