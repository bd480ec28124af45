"""The scanner: where each slice plane lies (tilt, pose, table positions, coverage), its pixel grid,
and the patient support drawn into it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ihd_node.sim.phantom.head import Anatomy, Ellipsoid, Waves, rot_x, rot_y, rot_z, uniform
from ihd_node.sim.phantom.series import TISSUE


@dataclass
class Geometry:
    """Scanner geometry of the stack (patient frame, DICOM LPS) and the head pose in it."""

    size: int
    ps: float  # pixel spacing, mm
    spacing: float  # along the slice normal, mm
    tilt: float  # gantry tilt, radians
    pose: np.ndarray  # rotation head -> patient
    origin: np.ndarray  # head-frame origin in patient mm
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    levels: np.ndarray  # head-frame z where each slice plane crosses the head's z axis
    ipp: np.ndarray  # (n, 3) ImagePositionPatient
    headrest: tuple[float, float, float, float, float, float] | None  # cx, cy, rx, ry, thickness, hu
    table: tuple[float, float, float] | None  # y, thickness, hu

    def head_plane(self, k: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q0, ei, ej): head-frame mm of pixel (0, 0) of slice k (moved offset mm along the normal) and the
        steps per row and column."""
        rt = self.pose.T
        corner = self.ipp[k] + offset * self.normal - self.origin
        return rt @ corner, rt @ (self.col * self.ps), rt @ (self.row * self.ps)

    def head_point_on_slice(self, k: int, x: float, y: float) -> np.ndarray:
        """The head-frame point with the given x, y that lies on slice k's plane."""
        n_h = self.pose.T @ self.normal
        z = self.levels[k] - (n_h[0] * x + n_h[1] * y) / n_h[2]
        return np.array([x, y, z])


def pick(var: dict[str, Any], key: str, drawn: Any) -> Any:
    """The caller's value when given, else the random one (always drawn, so a fixed value for one
    variation leaves every other random choice of the seed as it was)."""
    value = var.get(key)
    return drawn if value is None else value


def draw_geometry(rng: np.random.Generator, an: Anatomy, n: int, size: int, var: dict[str, Any],
                   ventricles: bool = False) -> Geometry:
    thin = bool(var.get("thin", False))
    # Long stacks get the thinner of the usual 4-6 mm, so they end near 19 cm like real head scans.
    thick = min(uniform(rng, 4.0, 6.0), max(4.0, 190.0 / n))
    spacing = pick(var, "slice_spacing", uniform(rng, 1.0, 2.5) if thin else thick)
    tilted = rng.choice([-1.0, 1.0]) * uniform(rng, 6.0, 25.0)
    tilt_deg = pick(var, "tilt_deg", 0.0 if rng.uniform() < 0.55 else tilted)
    yaw = pick(var, "rotation_deg", float(np.clip(rng.normal(0.0, 8.0), -25, 25)))
    pitch, roll = float(np.clip(rng.normal(0.0, 6.0), -15, 15)), float(np.clip(rng.normal(0.0, 3.0), -8, 8))
    offset = np.asarray(pick(var, "offset_mm", rng.uniform(-15.0, 15.0, size=2)), dtype=np.float64)
    fov_center = np.array([uniform(rng, -10.0, 10.0), uniform(rng, -30.0, 30.0)])
    # Scanners size the field of view to the head: never cut the scalp off.
    need = 2.0 * (an.b + an.t_mean + an.t_ap + an.scalp + an.temporalis + 12.0 + float(np.abs(offset).max()))
    ps = float(pick(var, "pixel_spacing", max(uniform(rng, 0.4, 0.55), need / 512.0) * 512.0 / size))
    tilt = math.radians(float(tilt_deg))
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(tilt), -math.sin(tilt)])
    normal = np.cross(row, col)
    pose = rot_z(math.radians(float(yaw))) @ rot_x(math.radians(pitch)) @ rot_y(math.radians(roll))
    origin = np.array([fov_center[0] + offset[0], fov_center[1] + offset[1], uniform(rng, -120.0, 80.0)])
    n_hz = float((pose.T @ normal)[2])
    step = float(spacing) / n_hz  # head-frame z between the planes along the head axis
    levels = _coverage(rng, an, n, step, ventricles) + step * np.arange(n)
    # The table moves along z; each plane's centre stays on the table axis (x, y of the field of view).
    positions = float(normal @ origin) + levels * n_hz
    z_table = (positions - normal[1] * fov_center[1] - normal[0] * fov_center[0]) / normal[2]
    centers = np.stack([np.full(n, fov_center[0]), np.full(n, fov_center[1]), z_table], axis=1)
    ipp = centers - size * ps / 2.0 * (row + col)
    rx = an.a + an.t_mean + an.scalp + an.temporalis * 0.5 + uniform(rng, 2.0, 10.0)
    ry = an.b + an.t_mean + an.scalp + uniform(rng, 2.0, 10.0)
    headrest = (origin[0], origin[1], rx, ry, uniform(rng, 3.0, 9.0), uniform(rng, -150.0, 250.0))
    table = (origin[1] + ry + uniform(rng, 15.0, 40.0), uniform(rng, 6.0, 14.0), uniform(rng, -300.0, 200.0))
    support = bool(pick(var, "headrest", rng.uniform() < 0.5))
    return Geometry(size=size, ps=ps, spacing=float(spacing), tilt=tilt, pose=pose, origin=origin, row=row,
                     col=col, normal=normal, levels=levels, ipp=ipp, headrest=headrest if support else None,
                     table=table if support else None)


def _coverage(rng: np.random.Generator, an: Anatomy, n: int, step: float, ventricles: bool) -> float:
    """Head-frame level of the lowest slice: skull base to vertex when the stack is long enough, else a
    stretch of the cerebrum (through the ventricles when ventricular blood is asked for)."""
    bottom, top = an.f_post - 12.0, an.vertex + 2.0
    span = step * (n - 1)
    end, centre = uniform(rng, -8.0, 4.0), uniform(rng, -30.0, 35.0) * an.k
    if span >= top - bottom:
        return top + end - span  # extra slices reach below the skull base, as in real scans
    if ventricles:
        centre = float(np.clip(centre, -5.0 * an.k, 15.0 * an.k))
    return float(np.clip(centre - span / 2.0, bottom - 5.0, top - span))


class Grid:
    """The pixels of one slice inside a crop window, mapped to head-frame mm by a linear map."""

    def __init__(self, q0: np.ndarray, ei: np.ndarray, ej: np.ndarray, rows: slice, cols: slice, ps: float):
        self.q0, self.ei, self.ej, self.ps = q0, ei, ej, ps
        self.rows, self.cols = rows, cols
        self.i = np.arange(rows.start, rows.stop, dtype=np.float32)
        self.j = np.arange(cols.start, cols.stop, dtype=np.float32)
        self.shape = (len(self.i), len(self.j))
        n = np.cross(ei, ej)
        self.normal = n / np.linalg.norm(n)

    def lin(self, w: Sequence[float], c: float = 0.0, box: tuple[slice, slice] | None = None) -> np.ndarray:
        """w . p + c for every pixel p (in the box), as a column plus a row vector."""
        w = np.asarray(w, dtype=np.float64)
        i, j = (self.i, self.j) if box is None else (self.i[box[0]], self.j[box[1]])
        col = np.float32(float(w @ self.q0) + c) + np.float32(w @ self.ei) * i
        return col[:, None] + (np.float32(w @ self.ej) * j)[None, :]

    def wave_sum(self, waves: Waves, box: tuple[slice, slice] | None = None) -> np.ndarray:
        """Sum of amp*cos(w . p + phase) via cos(A + B) = cosA cosB - sinA sinB (no per-pixel cosine)."""
        i, j = (self.i, self.j) if box is None else (self.i[box[0]], self.j[box[1]])
        out = np.zeros((len(i), len(j)), dtype=np.float32)
        for w, ph, amp in zip(waves.w, waves.phase, waves.amp, strict=True):
            a = (float(w @ self.q0) + ph + float(w @ self.ei) * i).astype(np.float32)
            b = (float(w @ self.ej) * j).astype(np.float32)
            ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
            out += np.float32(amp) * (ca[:, None] * cb[None, :] - sa[:, None] * sb[None, :])
        return out

    def box(self, center: np.ndarray, radius: float) -> tuple[slice, slice] | None:
        """Crop-relative pixel box where a sphere cuts this plane, or None when it misses."""
        rel = center - self.q0
        dist = float(rel @ self.normal)
        if abs(dist) >= radius:
            return None
        half = math.sqrt(radius * radius - dist * dist) / self.ps + 2.0
        ic = float(rel @ self.ei) / float(self.ei @ self.ei)
        jc = float(rel @ self.ej) / float(self.ej @ self.ej)
        r0 = max(int(ic - half) - self.rows.start, 0)
        r1 = min(int(ic + half) + 2 - self.rows.start, self.shape[0])
        c0 = max(int(jc - half) - self.cols.start, 0)
        c1 = min(int(jc + half) + 2 - self.cols.start, self.shape[1])
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ell(self, e: Ellipsoid, box: tuple[slice, slice]) -> np.ndarray:
        """Squared normalised radius of an ellipsoid (< 1 inside) over the box."""
        q = [self.lin(row, -float(row @ e.center), box) for row in e.m]
        return q[0] * q[0] + q[1] * q[1] + q[2] * q[2]


@dataclass
class Slice:
    """Working arrays of one slice inside its crop window."""

    grid: Grid
    hu: np.ndarray
    tis: np.ndarray
    bits: np.ndarray
    d: np.ndarray  # signed distance from the inner table, mm
    qn: tuple[np.ndarray, np.ndarray, np.ndarray]  # unit direction in ellipsoid coordinates
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    cavity: np.ndarray  # inside the cranial cavity
    csf_space: np.ndarray  # sulci, cisterns, fissures: where subarachnoid blood goes
    csf_wide: np.ndarray  # the same with sulci widened, as blood distends them
    vent: np.ndarray


def render_support(geo: Geometry, k: int, hu: np.ndarray, tis: np.ndarray) -> None:
    """Headrest and table behind the head (patient frame, so they ignore the head pose)."""
    if geo.headrest is None or geo.table is None:
        return
    idx = np.arange(geo.size, dtype=np.float32)
    px = np.float32(geo.ipp[k][0]) + idx * np.float32(geo.ps * geo.row[0])  # along columns
    py = np.float32(geo.ipp[k][1]) + idx * np.float32(geo.ps * geo.col[1])  # along rows
    cx, cy, rx, ry, thick, val = geo.headrest
    e = ((px[None, :] - cx) / rx) ** 2 + ((py[:, None] - cy) / ry) ** 2
    rest = (e >= 1.0) & (e < (1.0 + thick / ry) ** 2) & (py[:, None] > cy + 0.3 * ry) & (tis == TISSUE["air"])
    hu[rest], tis[rest] = val, TISSUE["device"]
    ty, tt, tval = geo.table
    rows = (py >= ty) & (py < ty + tt)
    band = rows[:, None] & (tis == TISSUE["air"])
    hu[band], tis[band] = tval, TISSUE["device"]


def gauss_std(sigma: float) -> float:
    """Standard deviation of unit white noise after scipy's 2-D gaussian_filter with this sigma."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float((w * w).sum())  # separable: sqrt((sum w^2)^2)
