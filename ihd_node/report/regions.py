"""Where the model places a finding on a slice, as a closed outline in image coordinates.

The decision heatmap (already cut to the intracranial space) is thresholded; its largest connected part is
traced along pixel edges (so the outline encloses exactly those pixels), simplified to a few dozen
vertices, and written as (column, row) points with the DICOM convention that (0, 0) is the top-left
corner of the top-left pixel. The Segmentation stores the same pixels (attention_mask). Pure numpy + scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ihd_node.values.prediction import Prediction

REGION_LEVEL = 0.5  # of the map's peak: the core the model looks at, not its faint surroundings
MAX_VERTICES = 64


def largest_part(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == int(np.argmax(sizes)) + 1


def _trace(mask: np.ndarray) -> np.ndarray:
    """The outer boundary of one 4-connected blob as pixel-corner points (x=column, y=row), closed.

    Walks the directed edges between blob pixels and the outside, keeping the blob on the right hand.
    """
    padded = np.pad(mask, 1)
    rows, cols = np.nonzero(padded)
    # Edges as (start corner, end corner), corners in padded (x, y); the blob lies to the right.
    nxt: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        if not padded[r - 1, c]:
            nxt.setdefault((c, r), []).append((c + 1, r))  # top edge, left to right
        if not padded[r, c + 1]:
            nxt.setdefault((c + 1, r), []).append((c + 1, r + 1))  # right edge, downwards
        if not padded[r + 1, c]:
            nxt.setdefault((c + 1, r + 1), []).append((c, r + 1))  # bottom edge, right to left
        if not padded[r, c - 1]:
            nxt.setdefault((c, r + 1), []).append((c, r))  # left edge, upwards
    # The top-left corner of the topmost, leftmost pixel lies on the outer boundary.
    start = (int(cols[np.lexsort((cols, rows))][0]), int(rows.min()))
    path = [start]
    current, previous_dir = start, (1, 0)
    for _ in range(4 * mask.size + 4):
        options = nxt[current]
        if len(options) == 1:
            target = options[0]
        else:  # a pinch point: turn right first, so the outer boundary stays outer
            def turn(p: tuple[int, int], d=previous_dir, cur=current) -> int:
                step = (p[0] - cur[0], p[1] - cur[1])
                cross = d[0] * step[1] - d[1] * step[0]
                return 0 if cross > 0 else 1 if cross == 0 else 2
            target = min(options, key=turn)
        options.remove(target)
        previous_dir = (target[0] - current[0], target[1] - current[1])
        current = target
        path.append(current)
        if current == start:
            break
    points = np.asarray(path, dtype=np.float64) - 1.0  # undo the padding
    return _drop_collinear(points)


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Keep only the corners of a closed staircase path (first == last)."""
    keep = [0]
    for i in range(1, len(points) - 1):
        a, b, c = points[i - 1], points[i], points[i + 1]
        if (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0:
            keep.append(i)
    keep.append(len(points) - 1)
    return points[keep]


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on an open path (the closed outline is split at its first point)."""
    if len(points) <= 2:
        return points
    start, end = points[0], points[-1]
    seg = end - start
    length = float(np.hypot(*seg))
    rel = points - start
    if length == 0:
        dist = np.hypot(rel[:, 0], rel[:, 1])
    else:
        dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / length
    k = int(np.argmax(dist))
    if dist[k] <= tolerance:
        return np.vstack([start, end])
    return np.vstack([_simplify(points[:k + 1], tolerance)[:-1], _simplify(points[k:], tolerance)])


def attention_mask(heatmap: np.ndarray, level: float = REGION_LEVEL) -> np.ndarray | None:
    """The model's attention region on one slice: the largest connected part of the heatmap at or above
    `level` of its peak, holes filled, as a boolean (rows, cols) mask; None when there is none (or it is
    one pixel).

    The one definition of "the region": the SR's outline traces exactly these pixels and the
    Segmentation stores them, so the two always show the same place.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2 or not np.isfinite(heat).all() or heat.max() <= 0:
        return None
    # Holes filled: the outline runs along the outer boundary only, so it encloses them too.
    blob = ndimage.binary_fill_holes(largest_part(heat >= level * float(heat.max())))
    if blob.sum() < 2:
        return None
    return blob


@dataclass(frozen=True)
class AttentionRegion:
    """One class's attention region on one key slice: the model slice it explains, the original slice it
    is shown on (a slab's middle slice, as on the capture) and its pixels."""

    cls: str
    model_slice: int
    slice_index: int
    mask: np.ndarray


def attention_regions(prediction: Prediction, groups: Sequence[Sequence[int]],
                      classes: Sequence[str]) -> list[AttentionRegion]:
    """Every region the results show, class by class (in `classes` order), then by model slice: one per
    (slice, class) heatmap with a non-empty attention_mask. `groups` maps model slice -> original slices."""
    out = []
    for cls in classes:
        for index in sorted(i for (i, c) in prediction.heatmaps if c == cls):
            mask = attention_mask(prediction.heatmaps[(index, cls)])
            if mask is None:
                continue  # no heat inside the skull on this slice: nothing to show
            group = groups[index]
            out.append(AttentionRegion(cls, index, int(group[len(group) // 2]), mask))
    return out


def outline_of(mask: np.ndarray) -> np.ndarray:
    """Closed polyline (n, 2) of (column, row) along the outer boundary of a region's pixels, simplified
    (Douglas-Peucker, from half a pixel up) to at most MAX_VERTICES vertices."""
    points = _trace(mask)
    tolerance = 0.5
    simple = _simplify(points, tolerance)
    while len(simple) > MAX_VERTICES:
        tolerance *= 1.5
        simple = _simplify(points, tolerance)
    return simple.astype(np.float32)


def outline(heatmap: np.ndarray, level: float = REGION_LEVEL) -> np.ndarray | None:
    """Closed polyline (n, 2) of (column, row) around the hottest part of a heatmap, or None when empty."""
    mask = attention_mask(heatmap, level)
    return None if mask is None else outline_of(mask)


def region_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside a closed polyline: to check an outline against its heatmap."""
    from PIL import Image, ImageDraw

    # PIL's polygon fill uses pixel centres at integer coordinates: shift by half a pixel.
    image = Image.new("1", (shape[1], shape[0]), 0)
    ImageDraw.Draw(image).polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in points], fill=1)
    return np.asarray(image, dtype=bool)
