"""When is a series complete? A periodic tick over the database, so the decision survives restarts.

DICOM has no "end of series" message. A series is complete when
- "quiet":    the association that last brought it has ended (released or aborted) and no instance
              of it arrived for series.quiet_seconds, or
- "max_wait": no instance arrived for series.max_wait_seconds, even with the association still open
              (PACS that keep one association open for hours, or a sender that died),
whichever comes first. The rule that fired is stored with the series and logged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from ihd_node import nodelog
from ihd_node.config import SeriesConfig
from ihd_node.db import Candidate, Database, utcnow

TICK_SECONDS = 0.25  # upper bound on the delay the tick adds to the quiet period


class Assembler:
    """Moves series from "received" to "complete" and hands each to `on_complete(series_uid)`."""

    def __init__(self, db: Database, rules: SeriesConfig, on_complete: Callable[[str], None], *,
                 tick_seconds: float = TICK_SECONDS) -> None:
        self.db = db
        self.rules = rules
        self.on_complete = on_complete
        self.tick_seconds = tick_seconds

    def tick(self, now: datetime | None = None) -> list[Candidate]:
        """Complete every series that is due now; returns those completed by this tick."""
        now = now or utcnow()
        done = []
        for cand in self.db.series_to_complete(now, self.rules.quiet_seconds, self.rules.max_wait_seconds):
            # Compare-and-set: a late instance may have reopened it since the query.
            if not self.db.mark_complete(cand.series_instance_uid, cand.rule, when=now,
                                         last_received=cand.last_received):
                continue
            series = self.db.get_series(cand.series_instance_uid)
            waited = (now - series.last_received).total_seconds() if series else 0.0
            why = ("association ended and quiet for" if cand.rule == "quiet" else "no instance for")
            self.db.log_event("complete", f"rule={cand.rule} ({why} {waited:.1f} s) "
                              f"instances={series.n_instances if series else '?'}",
                              series_instance_uid=cand.series_instance_uid,
                              study_instance_uid=series.study_instance_uid if series else None)
            done.append(cand)
            try:
                self.on_complete(cand.series_instance_uid)
            except Exception as exc:  # one bad series must not stop the tick for the others
                nodelog.error("complete.handoff_failed", series=cand.series_instance_uid,
                              error=f"{type(exc).__name__}: {exc}")
        return done

    def seconds_to_next(self) -> float:
        """How long the loop may sleep: until the next series can complete, at most one tick."""
        when = self.db.next_completion_time(self.rules.quiet_seconds, self.rules.max_wait_seconds)
        if when is None:
            return self.tick_seconds
        return max(0.0, min(self.tick_seconds, (when - utcnow()).total_seconds()))

    def run(self, stop: threading.Event, also: Callable[[], None] | None = None) -> None:
        """The loop of the assembler thread; `also` runs every tick (e.g. spool retention)."""
        while not stop.is_set():
            try:
                self.tick()
                if also is not None:
                    also()
                wait = self.seconds_to_next()
            except Exception as exc:  # database briefly locked or gone: log, wait, try again
                nodelog.error("assembler.tick_failed", error=f"{type(exc).__name__}: {exc}")
                wait = 1.0
            stop.wait(max(wait, 0.02))
