"""Does a stack of slices look whole? Measures behind the completion judge (ihd_node.triage.completion).

- gaps:     the slices do not form one contiguous run at a consistent spacing (a gap in the middle means
            instances are still missing);
- coverage: the stack does not reach past the intracranial space at both ends (skull base and vertex),
            judged on a few slices of the HU volume.

The judge gathers the evidence and decides; this module only measures, from where each slice lies
(ihd_node.imaging.headers.SliceGeometry) and, for coverage, the pixels of a few of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pydicom

from ihd_node.imaging.headers import SliceGeometry, sort_stack
from ihd_node.imaging.skull import COVERAGE, skull_ring

GAP_FACTOR = 1.5  # a step this much larger than the spacing around it is a gap (missing slices)
# Coverage: an end slice "reaches past the intracranial space" when its intracranial area is at most this
# share of the widest sampled section (the cranial cavity narrows to nothing at the vertex and below the
# foramen magnum; mid-cerebrum sections are 100-200 cm2).
END_AREA_SHARE = 0.25
MIN_WIDEST_CM2 = 40.0  # below this no sampled slice shows a cranial cavity: coverage cannot be judged
INTERIOR_SAMPLES = 7  # slices between the ends whose pixels are read to find the widest section
MAX_WORK_PIXELS = 256  # images are subsampled to at most this many pixels a side for the area estimate


def sorted_stack(slices: Sequence[SliceGeometry]) -> tuple[list[SliceGeometry], list[str]]:
    """Slices with a position, along the normal of the first, duplicate positions dropped (as load_volume),
    and one line per position that held more than one slice, naming what was kept and dropped."""
    usable = [s for s in slices if s.position is not None and s.normal is not None]
    if not usable:
        return [], []
    ref = np.asarray(usable[0].normal)
    same = [s for s in usable if abs(float(np.dot(ref, s.normal))) >= 0.999]  # type: ignore[arg-type]
    # Positions were taken along each slice's own normal; flip those whose normal points the other way.
    signed = [s.position if float(np.dot(ref, s.normal)) > 0 else -s.position for s in same]  # type: ignore
    stack = sort_stack(signed)  # type: ignore[arg-type]
    kept = [dataclasses.replace(same[i], position=signed[i]) for i in stack.kept]
    return kept, stack.dropped([f"SOP {s.sop_instance_uid}" for s in same])


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
    _, inside = skull_ring(image, ps, COVERAGE)
    low, high = COVERAGE.soft_hu
    soft = inside & (image > low) & (image < high)
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


def read_slice_hu(path: str) -> np.ndarray:
    """The HU image of one single-frame slice file (the pixels coverage_problem looks at)."""
    from ihd_node.imaging.volume import to_hu  # decoding plug-ins are imported only when pixels are needed

    return to_hu(pydicom.dcmread(path))
