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

Each check that holds a series back returns a reason; the assembler logs it and keeps the series waiting
until `series.max_wait_seconds`, after which the result goes out marked PRELIMINARY with those reasons.
Header values are cached per spool file (a file's path names its content hash), so a series of 300+
slices costs one header read per instance, not one per tick.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from ihd_node import nodelog
from ihd_node.imaging.skull import skull_ring

# Header elements the checks read; pydicom stops parsing once it has these (no pixel data).
GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "SOPInstanceUID",
                 "PixelSpacing", "Rows", "Columns"]
GAP_FACTOR = 1.5  # a step this much larger than the spacing around it is a gap (missing slices)
# Coverage: an end slice "reaches past the intracranial space" when its intracranial area is at most this
# share of the widest sampled section (the cranial cavity narrows to nothing at the vertex and below the
# foramen magnum; mid-cerebrum sections are 100-200 cm2).
END_AREA_SHARE = 0.25
MIN_WIDEST_CM2 = 40.0  # below this no sampled slice shows a cranial cavity: coverage cannot be judged
INTERIOR_SAMPLES = 7  # slices between the ends whose pixels are read to find the widest section
BONE_HU, SOFT_LO_HU, SOFT_HI_HU = 200.0, 0.0, 100.0
CLOSE_MM = 5.0  # closes foramina and partial-volume breaks in the skull ring
MAX_WORK_PIXELS = 256  # images are subsampled to at most this many pixels a side for the area estimate


@dataclass(frozen=True)
class SliceGeometry:
    """Where one instance lies, read once from its header."""

    path: str
    sop_instance_uid: str
    position: float | None  # mm along the slice normal; None when the header lacks it
    normal: tuple[float, float, float] | None
    instance_number: int | None
    pixel_spacing: float | None


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
            return "; ".join(self.holds)
        return f"checks passed: {', '.join(self.passed)}" if self.passed else "no evidence either way"


class HeaderCache:
    """SliceGeometry per spool file, least recently used dropped beyond `size` entries."""

    def __init__(self, size: int = 20000) -> None:
        self.size = size
        self._items: OrderedDict[str, SliceGeometry] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # header reads done (tests and the benchmark check the cache works)

    def get(self, path: str | Path) -> SliceGeometry:
        key = str(path)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        geometry = read_geometry(key)
        with self._lock:
            self.reads += 1
            self._items[key] = geometry
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return geometry


def read_geometry(path: str) -> SliceGeometry:
    """The position of one slice from its header only (stop_before_pixels, only the tags needed)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=GEOMETRY_TAGS)
    normal = position = spacing = None
    number = None
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        n = np.cross(iop[:3], iop[3:])
        if np.linalg.norm(n) > 1e-6:
            n = n / np.linalg.norm(n)
            normal = (float(n[0]), float(n[1]), float(n[2]))
            position = float(np.dot([float(v) for v in ds.ImagePositionPatient], n))
    except (AttributeError, TypeError, ValueError, IndexError):
        pass  # eligibility (select.py) rejects such a series with its own reason
    try:
        number = int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        number = None
    try:
        spacing = float(ds.PixelSpacing[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        spacing = None
    return SliceGeometry(path, str(ds.get("SOPInstanceUID", "")), position, normal, number, spacing)


def sorted_stack(slices: Sequence[SliceGeometry]) -> list[SliceGeometry]:
    """Slices with a position, along the normal of the first, duplicate positions dropped (as load_volume)."""
    usable = [s for s in slices if s.position is not None and s.normal is not None]
    if not usable:
        return []
    ref = np.asarray(usable[0].normal)
    same = [s for s in usable if abs(float(np.dot(ref, s.normal))) >= 0.999]  # type: ignore[arg-type]
    # Positions were taken along each slice's own normal; flip those whose normal points the other way.
    signed = sorted(((s.position if float(np.dot(ref, s.normal)) > 0 else -s.position), s)  # type: ignore
                    for s in same)
    out: list[SliceGeometry] = []
    last = None
    for pos, s in signed:
        if last is not None and abs(pos - last) < 1e-3:
            continue
        out.append(SliceGeometry(s.path, s.sop_instance_uid, pos, s.normal, s.instance_number, s.pixel_spacing))
        last = pos
    return out


def find_gaps(stack: Sequence[SliceGeometry]) -> list[str]:
    """Gaps in the middle of a sorted stack: a step GAP_FACTOR times the spacing on both sides of it.

    Comparing with the steps next to it (not one global spacing) keeps protocols that change spacing part
    way (fine through the posterior fossa, coarser above) from looking like a gap."""
    positions = [s.position for s in stack]
    steps = np.diff(np.asarray(positions, dtype=np.float64))
    gaps = []
    for i, step in enumerate(steps):
        left = steps[max(0, i - 3):i]
        right = steps[i + 1:i + 4]
        around = [float(np.median(x)) for x in (left, right) if len(x)]
        if not around:
            continue
        local = max(around)
        if local > 0 and step > GAP_FACTOR * local:
            missing = max(1, int(round(step / local)) - 1)
            a, b = stack[i], stack[i + 1]
            numbers = ""
            if a.instance_number is not None and b.instance_number is not None:
                numbers = f", instance numbers {a.instance_number} and {b.instance_number}"
            gaps.append(f"gap of {step:.1f} mm between slices at {a.position:.1f} and {b.position:.1f} mm"
                        f"{numbers} (spacing {local:.1f} mm: about {missing} slice(s) missing)")
    return gaps


def intracranial_area_cm2(hu: np.ndarray, pixel_spacing: float) -> float:
    """Area of soft tissue enclosed by the skull ring: the cranial cavity's section (0 where no closed ring).

    An open ring (skull base foramina, below the foramen magnum, above the vertex) gives 0, which is what
    "past the intracranial space" means for the ends of a stack."""
    step = max(1, int(np.ceil(max(hu.shape) / MAX_WORK_PIXELS)))
    image = hu[::step, ::step]
    ps = pixel_spacing * step
    _, inside = skull_ring(image, ps, BONE_HU, CLOSE_MM)
    soft = inside & (image > SOFT_LO_HU) & (image < SOFT_HI_HU)
    return float(soft.sum()) * ps * ps / 100.0


def coverage_problem(stack: Sequence[SliceGeometry], load_hu: Callable[[str], np.ndarray]) -> str | None:
    """Why the stack does not reach past the intracranial space at both ends, or None.

    Reads the pixels of both end slices and of INTERIOR_SAMPLES slices between them."""
    n = len(stack)
    if n < 3:
        return None  # too few slices to judge; eligibility (min_slices) speaks for such series
    picks = sorted({0, n - 1, *np.linspace(1, n - 2, min(INTERIOR_SAMPLES, n - 2)).round().astype(int)})
    areas = {}
    for i in picks:
        s = stack[i]
        areas[i] = intracranial_area_cm2(load_hu(s.path), s.pixel_spacing or 1.0)
    widest = max(areas[i] for i in picks if i not in (0, n - 1)) if n > 2 else 0.0
    widest = max(widest, areas[0], areas[n - 1])
    if widest < MIN_WIDEST_CM2:
        return None
    problems = []
    for end, name, where in ((n - 1, "top", "vertex"), (0, "bottom", "skull base")):
        if areas[end] > END_AREA_SHARE * widest:
            problems.append(f"{name} slice ({stack[end].position:.1f} mm) still cuts the cranial cavity "
                            f"({areas[end]:.0f} cm2 of a widest {widest:.0f} cm2): the stack does not reach "
                            f"the {where}")
    return "; ".join(problems) or None


def _load_hu(path: str) -> np.ndarray:
    from ihd_node.imaging.volume import to_hu  # decoding plug-ins are imported only when pixels are needed

    return to_hu(pydicom.dcmread(path))


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
                 cache: HeaderCache | None = None, load_hu: Callable[[str], np.ndarray] = _load_hu) -> None:
        self.check_geometry = check_geometry
        self.check_coverage = check_coverage
        self.mpps_lists = mpps_lists
        self.pacs_count = pacs_count
        self.headers = cache or HeaderCache()
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
            try:  # the MPPS and PACS holds above are kept whatever happens here
                stack = sorted_stack([self._header(path) for _, path in instances])
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
        return Evidence(holds=tuple(holds), passed=tuple(passed))

    def _header(self, path: str) -> SliceGeometry:
        try:
            return self.headers.get(path)
        except Exception as exc:  # name the file: an admin looks for it in the spool
            raise UnreadableHeader(f"{Path(path).name}: {type(exc).__name__}: {exc}") from exc
