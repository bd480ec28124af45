"""The intracranial space of a head-CT slice, from its HU values alone (numpy + scipy, no model).

Grad-CAM heatmaps and SR regions are kept inside it: a bleed lies within the skull, so colour over bone,
scalp or the air around the head would only mislead. The space is what the skull encloses: soft tissue
and fluid (brain, CSF, blood) not connected to the outside of the head. Near the vertex and at the skull
base the bony ring is often open in one slice; it is closed with a small morphological closing first.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from ihd_node.imaging.skull import INTRACRANIAL, close_gaps, enclosed_by

AIR_HU = -300.0  # air cells inside the skull's outline wall the brain in like bone
MIN_FRACTION = 0.002  # enclosed soft regions smaller than this share of the image are marrow, not brain
BRAIN_FRACTION = 0.02  # less enclosed soft tissue than this: the ring is probably open, close it first


def intracranial_mask(hu: np.ndarray, pixel_spacing_mm: float = 0.5) -> np.ndarray:
    """(rows, cols) bool: the space inside the skull with soft-tissue or fluid density.

    Empty when the slice shows no closed skull (below the skull base, no head): nothing there is
    intracranial as far as this slice can tell.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"expected one slice (rows, cols), got shape {hu.shape}")
    bone = hu >= INTRACRANIAL.bone_hu
    if not bone.any():
        return np.zeros(hu.shape, dtype=bool)
    low, high = INTRACRANIAL.soft_hu
    soft = (hu >= low) & (hu <= high)
    # Air inside the skull's outline (sinus cells, air opening the table) walls the brain in like bone does.
    barrier = bone | ((hu < AIR_HU) & _convex_hull(bone))
    mask = _soft_regions(enclosed_by(barrier) & soft)
    if mask.sum() < BRAIN_FRACTION * hu.size:
        # An open ring (vertex, foramina, thin temporal bone): close gaps of a few millimetres.
        closed = _soft_regions(enclosed_by(close_gaps(barrier, pixel_spacing_mm, INTRACRANIAL.close_mm)) & soft)
        if closed.sum() > mask.sum():
            mask = closed
    if mask.sum() < BRAIN_FRACTION * hu.size:
        # Still open (the vertex cut tangentially, the foramen magnum): the skull's convex hull.
        hull = _soft_regions(_convex_hull(bone) & ~bone & soft)
        if hull.sum() > mask.sum():
            mask = hull
    return mask


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of a mask's pixels (empty for fewer than three distinct points)."""
    rows, cols = np.nonzero(mask)
    if rows.size < 3:
        return np.zeros(mask.shape, dtype=bool)
    points = np.column_stack([cols, rows]).astype(np.float64)
    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line
        return np.zeros(mask.shape, dtype=bool)
    image = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(image).polygon([tuple(points[v]) for v in hull.vertices], fill=1, outline=1)
    return np.asarray(image, dtype=bool)


def _soft_regions(mask: np.ndarray) -> np.ndarray:
    """The mask without specks: connected parts below MIN_FRACTION of the image dropped."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= MIN_FRACTION * mask.size) + 1
    return np.isin(labels, keep)
