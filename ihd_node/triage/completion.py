"""Evidence that a series is really complete, beyond "nothing arrived for a while".

A CT console may push images while it still reconstructs them, one association per image, with pauses:
the quiet timer alone then judges half a series complete, and a premature "no hemorrhage" is the worst
result the node can send. Before the assembler calls a quiet series complete it asks this module:

- mpps:     a trusted MPPS COMPLETED lists the series' instances: wait for all of them; once all are here
            the series is complete at once (rule "mpps"), whatever the other checks say;
- pacs:     a destination with `count_instances` holds more instances of the series (C-FIND) than the node;
- geometry: the slices do not form one contiguous run at a consistent spacing (a gap in the middle means
            instances are still missing);
- coverage: the stack does not reach past the intracranial space at both ends (skull base and vertex),
            judged on a few slices of the HU volume.
The judge gathers this evidence; ihd_node.imaging.coverage measures the stack (gaps, intracranial area).

Each check that holds a series back returns a reason; the assembler logs it and keeps the series waiting
until `series.max_wait_seconds`, after which the result goes out marked PRELIMINARY with those reasons.
Header values are cached per spool file (a file's path names its content hash), so a series of 300+
slices costs one header read per instance, not one per tick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ihd_node import nodelog
from ihd_node.imaging.coverage import coverage_problem, find_gaps, read_slice_hu, sorted_stack
from ihd_node.imaging.headers import HeaderCache, SliceGeometry, geometry_cache


@dataclass(frozen=True)
class Evidence:
    """What the checks say about one series now."""

    holds: tuple[str, ...] = ()  # one reason per check that says "incomplete", named by the check
    proof: str | None = None  # a check that proves completeness on its own ("mpps"), overriding holds
    passed: tuple[str, ...] = ()  # checks that ran and found nothing missing
    notes: tuple[str, ...] = ()  # what the checks set aside without holding back (slices at duplicate positions)

    @property
    def complete(self) -> bool:
        return self.proof is not None or not self.holds

    def describe(self) -> str:
        if self.proof:
            return f"proved by {self.proof}"
        if self.holds:
            said = "; ".join(self.holds)
        else:
            said = f"checks passed: {', '.join(self.passed)}" if self.passed else "no evidence either way"
        return "; ".join([said, *self.notes])


@dataclass(frozen=True)
class MppsList:
    """What a trusted, COMPLETED MPPS says about one series: the SOP Instance UIDs it lists."""

    mpps_uid: str
    sop_instance_uids: frozenset[str]


class CompletionJudge:
    """Runs the enabled checks for one series; results are cached until its instances or MPPS change."""

    def __init__(self, *, check_geometry: bool = True, check_coverage: bool = True,
                 mpps_lists: Callable[[str], list[MppsList]] | None = None,
                 pacs_count: Callable[[str, str], list[tuple[str, int]]] | None = None,
                 cache: HeaderCache[str, SliceGeometry] | None = None,
                 load_hu: Callable[[str], np.ndarray] = read_slice_hu) -> None:
        self.check_geometry = check_geometry
        self.check_coverage = check_coverage
        self.mpps_lists = mpps_lists
        self.pacs_count = pacs_count
        self.headers = cache or geometry_cache()
        self.load_hu = load_hu
        self._cache: dict[str, tuple[object, Evidence]] = {}

    def evidence(self, study_uid: str, series_uid: str, instances: Sequence[tuple[str, str]],
                 version: object = None) -> Evidence:
        """`instances`: (SOP Instance UID, spool path) of what the node holds. `version` keys the cache
        (e.g. the series' instance count and last arrival): same version, same evidence, no new reads."""
        key = (len(instances) if version is None else version, self._mpps_version(series_uid))
        cached = self._cache.get(series_uid)
        if cached is not None and cached[0] == key:
            return cached[1]
        result = self._judge(study_uid, series_uid, instances)
        if result.notes and (cached is None or cached[1].notes != result.notes):  # once per change, not per tick
            nodelog.warning("completion.slices_dropped", series=series_uid, dropped="; ".join(result.notes))
        self._cache[series_uid] = (key, result)
        if len(self._cache) > 5000:  # finished series are never asked again
            self._cache.pop(next(iter(self._cache)))
        return result

    def lookup(self, series_uid: str, version: object) -> Evidence | None:
        """The cached evidence when nothing changed since (a held series is asked at every tick)."""
        cached = self._cache.get(series_uid)
        if cached is not None and cached[0] == (version, self._mpps_version(series_uid)):
            return cached[1]
        return None

    def forget(self, series_uid: str) -> None:
        self._cache.pop(series_uid, None)

    def _mpps_version(self, series_uid: str) -> object:
        if self.mpps_lists is None:
            return None
        return tuple(sorted((m.mpps_uid, len(m.sop_instance_uids)) for m in self.mpps_lists(series_uid)))

    def _judge(self, study_uid: str, series_uid: str, instances: Sequence[tuple[str, str]]) -> Evidence:
        holds: list[str] = []
        passed: list[str] = []
        notes: list[str] = []
        have = {uid for uid, _ in instances}
        if self.mpps_lists is not None:
            lists = self.mpps_lists(series_uid)
            if lists:
                listed = frozenset().union(*(m.sop_instance_uids for m in lists))
                missing = listed - have
                if not missing:
                    return Evidence(proof="mpps", passed=("mpps",))
                holds.append(f"mpps: {len(missing)} of {len(listed)} instances listed by MPPS "
                             f"{lists[0].mpps_uid} not received yet")
        if self.pacs_count is not None:
            try:
                counts = self.pacs_count(study_uid, series_uid)
            except Exception as exc:  # an unreachable PACS is no evidence either way
                nodelog.warning("completion.pacs_count_failed", series=series_uid,
                                error=f"{type(exc).__name__}: {exc}")
                counts = []
            counts = [(name, n) for name, n in counts if n > 0]  # 0: the PACS does not know it (yet)
            more = [(name, n) for name, n in counts if n > len(have)]
            if more:
                name, n = max(more, key=lambda x: x[1])
                holds.append(f"pacs: destination {name} holds {n} instances of the series, the node "
                             f"{len(have)}")
            elif counts:
                passed.append("pacs")
        if self.check_geometry or self.check_coverage:
            stack, notes = sorted_stack([self.headers.get(path) for _, path in instances])
            if self.check_geometry:
                gaps = find_gaps(stack)
                if gaps:
                    holds.append("geometry: " + "; ".join(gaps))
                else:
                    passed.append("geometry")
            if self.check_coverage:
                problem = coverage_problem(stack, self.load_hu)
                if problem:
                    holds.append("coverage: " + problem)
                else:
                    passed.append("coverage")
        return Evidence(holds=tuple(holds), passed=tuple(passed), notes=tuple(notes))
