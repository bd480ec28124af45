"""The skull ring of a CT slice and what it encloses.

One measurement behind three checks, each with its own named thresholds (below): the head check
(head_check.py: does a bone ring enclose intracranial tissue?), the coverage check (coverage.py: does the
stack reach past the cranial cavity at both ends?) and the intracranial mask that keeps Grad-CAM and SR
regions inside the skull (intracranial.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SkullThresholds:
    """How one check finds the skull and its contents."""

    bone_hu: float  # skull bone lies above this
    close_mm: float  # gaps in the ring up to about twice this are closed (sutures, foramina, partial volume)
    soft_hu: tuple[float, float]  # (low, high): intracranial tissue the check counts inside the ring


# Head check: is this a head CT at all? 300 HU takes cortical bone (1000+) and diploe (500+) but not
# enhanced vessels or calcified plaques of a trunk; 3 mm closes sutures and foramina but not the
# intercostal spaces, so a ribcage does not read as a ring; -10..100 HU is CSF to fresh blood.
HEAD_CHECK = SkullThresholds(bone_hu=300.0, close_mm=3.0, soft_hu=(-10.0, 100.0))
# Coverage: does an end slice still cut the cranial cavity? It only measures area on slices already known
# to be a head, at the skull base and vertex where thin bone is partial-volumed and the image is subsampled
# (coverage.MAX_WORK_PIXELS), so a lower bone threshold and a wider closing keep the ring closed there: an
# error towards "still inside" only holds the series back. 0..100 HU (exclusive): brain and blood.
COVERAGE = SkullThresholds(bone_hu=200.0, close_mm=5.0, soft_hu=(0.0, 100.0))
# Intracranial mask for Grad-CAM and SR regions: bone as the head check (acute blood, 50-100 HU, lies far
# below); -50..200 HU is CSF to clotted blood with room for partial volume at the inner table, so no bleed
# is cut off; the 3 mm closing is used only when the ring is open (vertex, foramina, thin temporal bone).
INTRACRANIAL = SkullThresholds(bone_hu=300.0, close_mm=3.0, soft_hu=(-50.0, 200.0))


def close_gaps(mask: np.ndarray, pixel_spacing_mm: float, close_mm: float) -> np.ndarray:
    """The mask with gaps up to about 2 x close_mm closed (sutures, foramina, partial-volume breaks).

    Padded first, so that a ring touching the image edge is not eroded there."""
    radius = max(1, int(round(close_mm / max(pixel_spacing_mm, 0.1))))
    structure = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), radius)
    padded = np.pad(mask, radius)
    return ndimage.binary_closing(padded, structure=structure)[radius:-radius, radius:-radius]


def enclosed_by(wall: np.ndarray) -> np.ndarray:
    """Pixels outside the wall that the wall cuts off from the image border."""
    return ndimage.binary_fill_holes(wall) & ~wall


def skull_ring(hu: np.ndarray, pixel_spacing_mm: float,
               thresholds: SkullThresholds) -> tuple[np.ndarray, np.ndarray]:
    """(ring, enclosed): bone above thresholds.bone_hu with its gaps closed, and what it encloses."""
    ring = close_gaps(hu > thresholds.bone_hu, pixel_spacing_mm, thresholds.close_mm)
    return ring, enclosed_by(ring)
