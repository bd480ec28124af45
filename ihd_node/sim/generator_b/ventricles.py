"""Ventricles as a union of tubes along spline skeletons: lateral ventricles (frontal horn, body, atrium,
occipital and temporal horns), a slit third ventricle and a small fourth ventricle.

Each side has its own size and jitter, so the system is asymmetric; the size factor spans slit-like
young ventricles to the wide ventricles of atrophy or hydrocephalus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline

from ihd_node.sim.generator_b.grid import Box, empty_box

STEP_MM = 0.75

# (x (for the left side; mirrored for the right), y, z, radius) control points, mm, before scaling.
_BODY = ((9.0, -32.0, 12.0, 2.5), (11.0, -18.0, 18.0, 4.5), (13.0, 2.0, 21.0, 3.5), (20.0, 22.0, 16.0, 5.5),
         (23.0, 30.0, 10.0, 6.0))
_OCCIPITAL = ((23.0, 30.0, 10.0, 6.0), (21.0, 40.0, 8.0, 3.5), (17.0, 50.0, 7.0, 1.5))
_TEMPORAL = ((23.0, 30.0, 10.0, 5.0), (28.0, 20.0, -2.0, 3.0), (30.0, 4.0, -12.0, 2.2),
             (27.0, -10.0, -17.0, 1.5))


@dataclass
class Ventricles:
    occupancy: Box  # 0..1, 1 inside the ventricular system
    atria: list[np.ndarray]  # centre of each atrium (choroid plexus sites)
    size: float  # overall size factor


def _tube_points(ctrl: np.ndarray, per_mm: float = 1.5) -> np.ndarray:
    """Points (x, y, z, r) every ~1/per_mm mm along a cubic spline through the control points."""
    seg = np.linalg.norm(np.diff(ctrl[:, :3], axis=0), axis=1)
    t = np.concatenate([[0.0], np.cumsum(seg)])
    spline = CubicSpline(t, ctrl, bc_type="natural")
    return spline(np.linspace(0.0, t[-1], max(4, int(t[-1] * per_mm))))


def _paint(box: Box, tubes: list[np.ndarray]) -> None:
    """Soft union of spheres: each voxel holds max over spheres of a 1-voxel ramp across the surface."""
    for pts in tubes:
        for x, y, z, r in pts:
            r = max(r, 0.8)
            centre = np.array([x, y, z])
            lo = np.maximum(np.floor((centre - r - 1.5 - box.origin) / box.step).astype(int), 0)
            hi = np.minimum(np.ceil((centre + r + 1.5 - box.origin) / box.step).astype(int) + 1,
                            np.array(box.values.shape))
            if np.any(hi <= lo):
                continue
            axes = [box.origin[k] + box.step * np.arange(lo[k], hi[k]) - centre[k] for k in range(3)]
            d = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
            occ = np.clip((r - d) / box.step + 0.5, 0.0, 1.0).astype(np.float32)
            view = box.values[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            np.maximum(view, occ, out=view)


def draw_ventricles(rng: np.random.Generator, scale: np.ndarray, midline: float) -> Ventricles:
    """scale: (sx, sy, sz) of the brain relative to an average adult; midline: x of the septum."""
    size = float(rng.choice([rng.uniform(0.75, 1.1), rng.uniform(1.1, 1.6)], p=[0.7, 0.3]))
    side_scale = {+1: size * rng.uniform(0.85, 1.15), -1: size * rng.uniform(0.85, 1.15)}
    tubes: list[np.ndarray] = []
    atria: list[np.ndarray] = []
    for side in (+1, -1):
        s = side_scale[side]
        jitter = rng.normal(0.0, 1.5, size=(3,))
        for part in (_BODY, _OCCIPITAL, _TEMPORAL):
            ctrl = np.array(part, dtype=np.float64)
            ctrl[:, 0] = side * (ctrl[:, 0] * (0.8 + 0.2 * s)) + midline
            ctrl[:, :3] *= np.array([1.0, scale[1], scale[2]])
            ctrl[:, :3] += jitter + rng.normal(0.0, 0.8, size=ctrl[:, :3].shape)
            ctrl[:, 3] *= s ** 1.3
            if part is _OCCIPITAL and rng.uniform() < 0.3:  # occipital horns are often short or absent
                ctrl = ctrl[:2]
                ctrl[-1, 3] *= 0.6
            tubes.append(_tube_points(ctrl))
            if part is _BODY:
                atria.append(tubes[-1][-1][:3].copy())
    # Third ventricle: a midline slit between the thalami; fourth: a small tent in the posterior fossa.
    w3 = 1.0 + 1.2 * (size - 0.75)
    third = np.array([[midline, y, z, w3] for y, z in ((-8.0, -2.0), (0.0, 2.0), (8.0, 4.0), (14.0, 2.0))])
    third[:, 1:3] *= [scale[1], scale[2]]
    fourth = np.array([[midline, 30.0 * scale[1], -30.0 * scale[2], 2.5 * size],
                       [midline, 34.0 * scale[1], -38.0 * scale[2], 3.0 * size]])
    tubes += [_tube_points(third, 3.0), _tube_points(fourth, 3.0)]
    allpts = np.concatenate(tubes)
    lo = allpts[:, :3].min(axis=0) - allpts[:, 3].max() - 3
    hi = allpts[:, :3].max(axis=0) + allpts[:, 3].max() + 3
    box = empty_box(lo, hi, STEP_MM)
    _paint(box, tubes)
    return Ventricles(occupancy=box, atria=atria, size=size)
