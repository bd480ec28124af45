"""Boxes of values on a regular grid in the head frame (millimetres), sampled at arbitrary points.

Smooth random fields (brain texture, gyral and sulcal patterns, lesion outlines) and small solid shapes
(ventricles, lesions) live on such boxes; a slice samples them by trilinear interpolation at its pixel
positions, so one 3-D shape appears consistently on every slice (and tilted planes) that cut it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates


@dataclass
class Box:
    """values[ix, iy, iz] at origin + step * (ix, iy, iz) millimetres (x, y, z of the head frame)."""

    values: np.ndarray
    origin: np.ndarray
    step: float

    @property
    def upper(self) -> np.ndarray:
        return self.origin + self.step * (np.array(self.values.shape) - 1)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates of the grid along x, y and z (for building values with broadcasting)."""
        return tuple(self.origin[k] + self.step * np.arange(self.values.shape[k]) for k in range(3))  # type: ignore[return-value]

    def points(self) -> np.ndarray:
        """(nx, ny, nz, 3) coordinates of every grid point."""
        x, y, z = self.axes()
        return np.stack(np.meshgrid(x, y, z, indexing="ij"), axis=-1)

    def sample(self, pts: np.ndarray, outside: float = 0.0) -> np.ndarray:
        """Trilinear values at pts (m, 3); `outside` beyond the box."""
        out = np.full(len(pts), outside, dtype=np.float32)
        idx = (pts - self.origin) / self.step
        top = np.array(self.values.shape) - 1
        inside = np.all((idx >= 0) & (idx <= top), axis=1)
        if inside.any():
            out[inside] = map_coordinates(self.values, idx[inside].T, order=1, mode="nearest")
        return out


def empty_box(lo: np.ndarray, hi: np.ndarray, step: float, dtype: type = np.float32) -> Box:
    lo = np.asarray(lo, dtype=np.float64)
    shape = np.maximum(2, np.ceil((np.asarray(hi, dtype=np.float64) - lo) / step).astype(int) + 1)
    return Box(np.zeros(tuple(shape), dtype=dtype), lo, float(step))


def noise_box(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, step: float,
              sigma_mm: float) -> Box:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    return noise_like(rng, empty_box(lo, hi, step), sigma_mm)


def noise_like(rng: np.random.Generator, like: Box, sigma_mm: float) -> Box:
    """noise_box on exactly the grid of `like`."""
    box = Box(np.zeros(like.values.shape, dtype=np.float32), like.origin.copy(), like.step)
    step = box.step
    raw = rng.standard_normal(box.values.shape).astype(np.float32)
    field = gaussian_filter(raw, sigma_mm / step, mode="wrap")
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    box.values = field.astype(np.float32)
    return box


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((np.asarray(x, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)
