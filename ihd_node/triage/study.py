"""The study-level choice (series.selection: best_per_study): one analysed series per study.

It consumes the verdicts on complete series (the node calls `decide` after judging each one, whether it
was eligible, ignored or failed) and never judges completeness itself, so any completion rule composes
with it. While a series of the study is still being received the eligible ones wait ("complete", with
that reason). When none is, the eligible series are ranked (ihd_node.triage.choice) together with the
series already analysed for the study:
- the best one is queued, unless it is already analysed or queued;
- every other eligible series becomes "not_chosen" with the reason (the first criterion that differs);
- a later series that ranks above the analysed one is analysed too: the study gets a new result, whose
  SR names the earlier one as its predecessor; the earlier series keeps its delivered result.
If the chosen series then fails to load, the decision runs again without it. A candidate whose profile
cannot be built (an unreadable file) fails with the reason and an event, never left waiting in "complete".
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ihd_node import faults, nodelog
from ihd_node.config import SeriesConfig
from ihd_node.imaging.volume import SliceHeader, slice_headers
from ihd_node.store import Database, Series
from ihd_node.store.arrivals import study_series
from ihd_node.triage.choice import UNKNOWN, SeriesProfile, profile, rank, why_lower

ANALYSED = ("analyzing", "analyzed", "delivering", "delivered")
WAITING_REASON = "eligible; waiting for {n} other series of the study before choosing"


class StudyChoice:
    def __init__(self, db: Database, rules: SeriesConfig, enqueue: Callable[[str, str], None],
                 is_queued: Callable[[str], bool],
                 read_headers: Callable[[list[str]], list[SliceHeader]] = slice_headers) -> None:
        self.db = db
        self.read_headers = read_headers  # the node's series_header_cache: the judge has just read these files
        self.rules = rules
        self.enqueue = enqueue
        self.is_queued = is_queued
        self._lock = threading.Lock()  # the assembler, start-up recovery and the worker (on failure) decide

    def study_series(self, study_uid: str) -> list[Series]:
        return study_series(self.db, study_uid)

    def decide(self, study_uid: str) -> None:
        with self._lock:
            self._decide(study_uid)

    def _decide(self, study_uid: str) -> None:
        series = self.study_series(study_uid)
        receiving = [x for x in series if x.state == "received"]
        candidates = [x for x in series if x.state == "complete"
                      or (x.state == "not_chosen" and x.spool_removed is None)]
        if not candidates:
            return
        if receiving:
            for x in candidates:
                if x.state == "complete" and not self.is_queued(x.series_instance_uid):
                    self.db.set_series_state(x.series_instance_uid, "complete",
                                             WAITING_REASON.format(n=len(receiving)), expect="complete")
            return
        analysed = [x for x in series if x.state in ANALYSED and x.spool_removed is None]
        profiles: dict[str, SeriesProfile] = {}
        for x in [*candidates, *analysed]:
            try:
                faults.point("study.profile")
                refs = self.read_headers([i.path for i in self.db.series_instances(x.series_instance_uid)])
                profiles[x.series_instance_uid] = profile(
                    refs, axial_tolerance_degrees=self.rules.axial_tolerance_degrees,
                    measure_noise=len(candidates) + len(analysed) > 1)
            except Exception as exc:  # a series that cannot be ranked must not wait for ever in "complete"
                self._profile_failed(x, study_uid, f"{type(exc).__name__}: {exc}")
        if not profiles:
            return
        ranked = rank(list(profiles.values()))
        best = ranked[0]
        state = {x.series_instance_uid: x.state for x in series}
        for other in ranked[1:]:
            uid = other.series_instance_uid
            if state[uid] in ANALYSED:
                continue  # its result was sent; the better series' result revises it (logged below)
            reason = f"not chosen: {why_lower(other, best)}"
            if self.db.set_series_state(uid, "not_chosen", reason, expect=("complete", "not_chosen")) \
                    and state[uid] == "complete":
                self.db.log_event("not_chosen", reason, series_instance_uid=uid, study_instance_uid=study_uid)
        uid = best.series_instance_uid
        if state[uid] in ANALYSED:
            return
        if state[uid] == "not_chosen":
            self.db.set_series_state(uid, "complete", None, expect="not_chosen")
        why = f"chosen: best of {len(ranked)} eligible series ({_summary(best)})"
        earlier = [p for p in ranked[1:] if state[p.series_instance_uid] in ANALYSED]
        if earlier:
            why += f"; ranks above the analysed {earlier[0].label()} ({why_lower(earlier[0], best)}): " \
                   "the study gets a new result"
        if not self.is_queued(uid):
            self.db.set_series_state(uid, "complete", why[:1000], expect="complete")
            self.db.log_event("chosen", why, series_instance_uid=uid, study_instance_uid=study_uid)
            self.enqueue(uid, why)

    def _profile_failed(self, series: Series, study_uid: str, error: str) -> None:
        """A candidate whose profile cannot be built fails with the reason (retry or a resend starts it
        again); an analysed one keeps its state and result, and is left out of the ranking."""
        uid = series.series_instance_uid
        nodelog.warning("choice.profile_failed", series=uid, error=error)
        if series.state in ANALYSED:
            return
        reason = f"cannot be profiled for the study choice ({error})"[:1000]
        if self.db.set_series_state(uid, "failed", reason, expect=("complete", "not_chosen")):
            self.db.log_event("error", reason, level="ERROR", series_instance_uid=uid, study_instance_uid=study_uid)


def _summary(p: SeriesProfile) -> str:
    parts = [p.label(), f"{p.kernel} kernel ({p.kernel_evidence})"]
    if p.thickness_mm is not None:
        parts.append(f"{p.thickness_mm:g} mm")
    parts.append(f"{p.coverage_mm:.0f} mm coverage")
    if p.kernel == UNKNOWN and p.noise_hu is not None:
        parts.append(f"noise {p.noise_hu:.1f} HU")
    return ", ".join(parts)
