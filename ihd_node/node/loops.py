"""Worker loops that outlive database (and other) errors, and the node's "degraded" state while they meet them.

Every thread of the node runs its work through `run_loop` (a step, then a wait) or `persist` (one booking that
must happen): an exception is logged, noted in `Health` with its reason, and the step is tried again after a
backoff that grows to a few seconds, so a database back after an outage is used at once; a loop never ends
before `stop`. While any loop meets errors the node is degraded: /healthz says so at once, and the heartbeat
books a "degraded" / "recovered" event (kind `health`) once the database answers again, which `ihd-node status`
shows with the reason.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from ihd_node import nodelog
from ihd_node.store import Database, RetryPolicy, utcnow
from ihd_node.store.work import HEALTH_EVENT

MAX_BACKOFF_SECONDS = 5.0  # a database back after an outage is used within this
# The outboxes' retry policy, with a short cap and no give-up: a loop waits for its database, never gives up.
LOOP_RETRY = RetryPolicy(initial_seconds=0.5, max_seconds=MAX_BACKOFF_SECONDS, give_up_after_seconds=math.inf)
T = TypeVar("T")


def describe(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


@dataclass
class Episode:
    """One stretch of time in which some loop met errors; `reason` is the first error of the stretch."""

    since: datetime
    reason: str
    until: datetime | None = None
    booked: bool = False  # its "degraded" event is in the database


class Health:
    """Which loops meet errors now (name -> first error), and the episodes not yet booked as events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        self._episode: Episode | None = None
        self._ended: list[Episode] = []

    def failed(self, loop: str, exc: BaseException) -> None:
        with self._lock:
            self._failing.setdefault(loop, describe(exc))
            if self._episode is None:
                self._episode = Episode(utcnow(), f"{loop}: {describe(exc)}")

    def ok(self, loop: str) -> None:
        with self._lock:
            if self._failing.pop(loop, None) is not None and not self._failing and self._episode is not None:
                self._episode.until = utcnow()
                self._ended.append(self._episode)
                self._episode = None

    def reason(self) -> str | None:
        """Why the node is degraded now (None while every loop works)."""
        with self._lock:
            if not self._failing:
                return None
            return "; ".join(f"{loop}: {why}" for loop, why in sorted(self._failing.items()))

    def book(self, db: Database) -> None:
        """Write what happened since the last call as events (the heartbeat calls this once it got through)."""
        with self._lock:
            ended, self._ended = self._ended, []
            current = self._episode
        for episode in ended:
            assert episode.until is not None
            seconds = (episode.until - episode.since).total_seconds()
            db.log_event(HEALTH_EVENT, f"recovered: degraded from {episode.since.isoformat(timespec='seconds')} "
                         f"for {seconds:.0f} s ({episode.reason})", level="WARNING")
        if current is not None and not current.booked:
            db.log_event(HEALTH_EVENT, f"degraded since {current.since.isoformat(timespec='seconds')}: "
                         f"{current.reason}", level="ERROR")
            current.booked = True


def run_loop(name: str, step: Callable[[], float], stop: threading.Event, health: Health,
             wake: threading.Event | None = None) -> None:
    """Run `step` (returns the seconds to wait) until `stop`; errors are logged, noted and retried with backoff.

    `wake` (set also on stop) cuts the wait short."""
    failures = 0
    while not stop.is_set():
        if wake is not None:
            wake.clear()  # before the pass: a wake-up during it is not lost
        try:
            wait = step()
            failures = 0
            health.ok(name)
        except Exception as exc:  # noqa: BLE001 - the loop must outlive whatever one pass meets
            failures += 1
            wait = backoff(failures)
            health.failed(name, exc)
            nodelog.error(f"{name}.loop_failed", error=describe(exc), retry_in_s=wait)
        (wake or stop).wait(max(wait, 0.02))


def persist(name: str, call: Callable[[], T], stop: threading.Event, health: Health) -> T | None:
    """Do `call` until it succeeds (a booking that must not be lost); None if the node stops first."""
    failures = 0
    while True:
        try:
            result = call()
            health.ok(name)
            return result
        except Exception as exc:  # noqa: BLE001 - typically the database is away: wait for it
            failures += 1
            health.failed(name, exc)
            wait = backoff(failures)
            nodelog.error(f"{name}.booking_failed", error=describe(exc), retry_in_s=wait)
            if stop.wait(wait):
                return None


def backoff(failures: int) -> float:
    return LOOP_RETRY.backoff(failures)


def supervised(name: str, target: Callable[[], None], stop: threading.Event) -> Callable[[], None]:
    """A thread body that starts `target` again if it raises before stop, so that no thread dies of an error."""
    def body() -> None:
        failures = 0
        while True:
            try:
                target()
                return  # ended by itself (stop, or a start-up failure it reported)
            except Exception as exc:  # noqa: BLE001
                if stop.is_set():
                    return
                failures += 1
                wait = backoff(failures)
                nodelog.error(f"{name}.thread_failed", error=describe(exc), restart_in_s=wait)
                if stop.wait(wait):
                    return
    return body
