"""The skull ring of a CT slice and what it encloses.

One measurement behind three checks, each with its own thresholds: the head check (dicom/anatomy.py:
does a bone ring enclose intracranial tissue?), the coverage check (dicom/completion.py: does the stack
reach past the cranial cavity at both ends?) and the intracranial mask that keeps Grad-CAM and SR regions
inside the skull (intracranial.py)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


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


def skull_ring(hu: np.ndarray, pixel_spacing_mm: float, bone_hu: float,
               close_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(ring, enclosed): bone above bone_hu with its gaps closed, and what it encloses."""
    ring = close_gaps(hu > bone_hu, pixel_spacing_mm, close_mm)
    return ring, enclosed_by(ring)
