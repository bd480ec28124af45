"""When is a series complete? A periodic tick over the database, so the decision survives restarts.

DICOM has no "end of series" message. The timers say when to look:
- "quiet":    the association that last brought it has ended (released or aborted) and no instance
              of it arrived for series.quiet_seconds;
- "max_wait": no instance arrived for series.max_wait_seconds, even with the association still open
              (PACS that keep one association open for hours, or a sender that died).
With a CompletionJudge (ihd_node.triage.completion) the quiet rule is not enough on its own: while the
evidence (MPPS instance list, PACS count, slice geometry, head coverage) says instances are missing, the
series waits, each reason logged once. When max_wait runs out with evidence still saying "incomplete", the
series completes anyway and its result goes out marked INCOMPLETE SERIES (the completions table keeps why). A trusted
MPPS COMPLETED whose listed instances have all arrived completes the series at once ("mpps").
A check that cannot be made (an unreadable file, the judge itself failing) is a hold like any other
("check failed: <what>: <error>"): such a series is never completed as COMPLETE by the quiet rule.
The rule that fired is stored with the series and logged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from ihd_node import faults, nodelog
from ihd_node.classes import INCOMPLETE_SERIES
from ihd_node.config import SeriesConfig
from ihd_node.store import Candidate, Database, utcnow
from ihd_node.store.arrivals import complete_series
from ihd_node.triage.completion import CompletionJudge, Evidence, check_failed

TICK_SECONDS = 0.25  # upper bound on the delay the tick adds to the quiet period


class Assembler:
    """Moves series from "received" to "complete" and hands each to `on_complete(series_uid)`."""

    def __init__(self, db: Database, rules: SeriesConfig, on_complete: Callable[[str], None], *,
                 tick_seconds: float = TICK_SECONDS, judge: CompletionJudge | None = None) -> None:
        self.db = db
        self.rules = rules
        self.on_complete = on_complete
        self.tick_seconds = tick_seconds
        self.judge = judge
        self._held: dict[str, str] = {}  # series UID -> the reason last logged for holding it back

    def tick(self, now: datetime | None = None) -> list[Candidate]:
        """Complete every series that is due now; returns those completed by this tick."""
        live = now is None  # a real tick: "completed" is stamped after the checks ran (their cost shows)
        now = now or utcnow()
        done = []
        candidates = self.db.series_to_complete(now, self.rules.quiet_seconds, self.rules.max_wait_seconds)
        if self.judge is not None and self.judge.mpps_lists is not None:
            due = {c.series_instance_uid for c in candidates}
            candidates += [Candidate(uid, "mpps") for uid in self.db.series_with_mpps() if uid not in due]
        for cand in candidates:
            rule, preliminary, evidence = cand.rule, None, None
            if self.judge is not None:
                evidence = self._evidence(cand.series_instance_uid)
                if evidence is not None and evidence.proof:
                    rule = evidence.proof if cand.rule != "max_wait" else rule
                elif cand.rule == "mpps":
                    continue  # listed instances still missing: the timers decide
                elif evidence is not None and evidence.holds:
                    timed_out = cand.last_received is not None and (
                        now - cand.last_received).total_seconds() >= self.rules.max_wait_seconds
                    if cand.rule == "quiet" and not timed_out:
                        self._hold(cand.series_instance_uid, evidence)
                        continue
                    rule, preliminary = "max_wait", "; ".join(evidence.holds)
            # Compare-and-set: a late instance may have reopened it since the query.
            series = complete_series(self.db, cand.series_instance_uid, rule, when=utcnow() if live else now,
                                     last_received=cand.last_received, at=now, preliminary=preliminary,
                                     evidence=evidence.describe() if evidence is not None else None)
            if series is None:
                continue
            self._held.pop(cand.series_instance_uid, None)
            waited = (now - series.last_received).total_seconds()
            why = {"quiet": "association ended and quiet for", "mpps": "MPPS instances all here after"}.get(
                rule, "no instance for")
            message = f"rule={rule} ({why} {waited:.1f} s) instances={series.n_instances}"
            if evidence is not None:
                message += f"; evidence: {evidence.describe()}"
            if preliminary:
                message += f"; the result will say {INCOMPLETE_SERIES} (CompletionFlag PARTIAL)"
            self.db.log_event("complete", message, level="WARNING" if preliminary else "INFO",
                              series_instance_uid=cand.series_instance_uid,
                              study_instance_uid=series.study_instance_uid)
            done.append(Candidate(cand.series_instance_uid, rule, cand.last_received))
            try:
                self.on_complete(cand.series_instance_uid)
            except Exception as exc:  # one bad series must not stop the tick for the others
                nodelog.error("complete.handoff_failed", series=cand.series_instance_uid,
                              error=f"{type(exc).__name__}: {exc}")
        return done

    def _evidence(self, series_uid: str) -> Evidence | None:
        """The judge's verdict; None when the series is gone. A judge that fails is evidence itself."""
        assert self.judge is not None
        series = self.db.get_series(series_uid)
        if series is None:
            return None
        version = (series.n_instances, series.last_received)
        try:
            faults.point("completion.judge")
            cached = self.judge.lookup(series_uid, version)
            if cached is not None:
                return cached
            instances = [(i.sop_instance_uid, i.path) for i in self.db.series_instances(series_uid)]
            return self.judge.evidence(series.study_instance_uid, series_uid, instances, version=version)
        except Exception as exc:  # a check that cannot be made holds the series: max_wait, then INCOMPLETE SERIES
            nodelog.warning("completion.check_failed", series=series_uid, error=f"{type(exc).__name__}: {exc}")
            return Evidence(holds=(check_failed("completion judge", exc),))

    def _hold(self, series_uid: str, evidence: Evidence) -> None:
        """Log (event + series reason) what holds a series back, once per change of reason."""
        reason = "; ".join(evidence.holds)
        if self._held.get(series_uid) == reason:
            return
        self._held[series_uid] = reason
        series = self.db.get_series(series_uid)
        waiting = (f"waiting for the rest of the series (at most series.max_wait_seconds "
                   f"{self.rules.max_wait_seconds:g} s after the last instance): {reason}")  # admin.WAITING
        self.db.note_series_waiting(series_uid, waiting)
        self.db.log_event("held", f"instances={series.n_instances if series else '?'}; {reason}",
                          series_instance_uid=series_uid,
                          study_instance_uid=series.study_instance_uid if series else None)

    def seconds_to_next(self) -> float:
        """How long the loop may sleep: until the next series can complete, at most one tick."""
        if self._held:  # held series are due again at every tick (their quiet time has passed)
            return self.tick_seconds
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
