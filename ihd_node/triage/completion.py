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
until `series.max_wait_seconds`, after which the result goes out marked INCOMPLETE SERIES with those reasons.
Header values are cached per spool file (a file's path names its content hash), so a series of 300+
slices costs one header read per instance, not one per tick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ihd_node import nodelog
from ihd_node.imaging.coverage import coverage_problem, find_gaps, read_slice_hu, sorted_stack
from ihd_node.imaging.headers import HeaderCache, SliceGeometry, geometry_cache

CHECK_FAILED = "check failed"


class UnreadableHeader(Exception):
    """A spool file whose header cannot be read (the message names the file)."""


def check_failed(what: str, exc: BaseException) -> str:
    """The hold reason of a check that could not be made: evidence of incompleteness, not its absence."""
    return f"{CHECK_FAILED}: {what}: {type(exc).__name__}: {exc}"[:500]


@dataclass(frozen=True)
class Evidence:
    """What the checks say about one series now."""

    holds: tuple[str, ...] = ()  # one reason per check that says "incomplete", named by the check
    proof: str | None = None  # a check that proves completeness on its own ("mpps"), overriding holds
    passed: tuple[str, ...] = ()  # checks that ran and found nothing missing
    notes: tuple[str, ...] = ()  # what the checks set aside without holding back (slices at duplicate positions)

    @property
    def failed(self) -> bool:
        """A check could not be made: that holds the series as any missing instance would."""
        return any(h.startswith(CHECK_FAILED) for h in self.holds)

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
                 pacs_count: Callable[[str, str], list[tuple[str, int | None]]] | None = None,  # None: not asked
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
        if result.failed:
            return result  # not cached: the next tick tries again (a file may be readable by then)
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
            except Exception as exc:  # a count that cannot be made is no proof that nothing is missing
                holds.append(check_failed("pacs count", exc))
                counts = []
            unasked = [name for name, n in counts if n is None]
            if unasked:
                holds.append(f"{CHECK_FAILED}: pacs count: {', '.join(unasked)} could not be asked")
            counts = [(name, n) for name, n in counts if n]  # 0: the PACS does not know it (yet)
            more = [(name, n) for name, n in counts if n > len(have)]
            if more:
                name, n = max(more, key=lambda x: x[1])
                holds.append(f"pacs: destination {name} holds {n} instances of the series, the node "
                             f"{len(have)}")
            elif counts and not unasked:
                passed.append("pacs")
        if self.check_geometry or self.check_coverage:
            try:  # the MPPS and PACS holds above are kept whatever happens here
                stack, notes = sorted_stack([self._header(path) for _, path in instances])
            except UnreadableHeader as exc:
                holds.append(f"{CHECK_FAILED}: slice headers: {exc}"[:500])
                return Evidence(holds=tuple(holds), passed=tuple(passed))
            if self.check_geometry:
                gaps = find_gaps(stack)
                if gaps:
                    holds.append("geometry: " + "; ".join(gaps))
                else:
                    passed.append("geometry")
            if self.check_coverage:
                try:
                    problem = coverage_problem(stack, self.load_hu)
                except Exception as exc:  # e.g. an end slice's pixels cannot be decoded
                    problem = check_failed("coverage", exc)
                if problem:
                    holds.append(problem if problem.startswith(CHECK_FAILED) else "coverage: " + problem)
                else:
                    passed.append("coverage")
        return Evidence(holds=tuple(holds), passed=tuple(passed), notes=tuple(notes))

    def _header(self, path: str) -> SliceGeometry:
        try:
            return self.headers.get(path)
        except Exception as exc:  # name the file: an admin looks for it in the spool
            raise UnreadableHeader(f"{Path(path).name}: {type(exc).__name__}: {exc}") from exc
