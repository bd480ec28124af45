"""The scanner of generator B: slice planes (gantry tilt, head yaw, table offset), partial volume over
the slice thickness, beam-hardening cupping and dark streaks between dense bone, a reconstruction kernel
applied as a modulation transfer function, and noise with a ramp-shaped power spectrum whose local
level follows the attenuation (quantum noise, higher at low dose and behind the skull base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from ihd_node.sim.generator_b.anatomy import BRAIN, CSF_SPACES, T

# Codes inside the cranial cavity (what lesions may replace and where cupping applies).
INTRACRANIAL = np.array(sorted(set(CSF_SPACES + BRAIN + (T["ventricle"], T["falx"], T["calcification"]))))

# (cutoff cycles/mm, edge boost) per reconstruction kernel.
KERNELS: dict[str, tuple[float, float]] = {"soft": (0.42, 0.0), "standard": (0.6, 0.15), "sharp": (0.95, 0.5)}
NATIVE_PX = 512  # pixel spacing is drawn for a 512 matrix; other sizes keep the field of view


@dataclass(frozen=True)
class ScanB:
    size: int
    pixel_mm: float
    thickness_mm: float  # = slice spacing (contiguous slices)
    n_slices: int
    first_mm: float  # position of the first slice centre along the normal
    tilt: float  # radians, about the x axis
    yaw: float  # radians, about the normal
    offset: np.ndarray  # field-of-view centre (x, y, z) in the head frame
    kernel: str
    noise_sigma: float  # HU at the centre of an average head
    cupping: float  # HU lost at the centre of the cranial cavity
    streaks: float  # HU of the darkest bone streak

    @property
    def row_dir(self) -> np.ndarray:
        return np.array([math.cos(self.yaw), math.sin(self.yaw), 0.0])

    @property
    def col_dir(self) -> np.ndarray:
        c = np.array([-math.sin(self.yaw), math.cos(self.yaw), 0.0])
        return c * math.cos(self.tilt) + np.array([0.0, 0.0, math.sin(self.tilt)])

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)

    def sub_planes(self) -> np.ndarray:
        """Offsets (mm along the normal) of the planes averaged into one slice: the partial volume."""
        k = int(np.clip(round(self.thickness_mm / 1.25), 1, 4))
        return ((np.arange(k) + 0.5) / k - 0.5) * self.thickness_mm

    def plane_points(self, k: int, offset: float = 0.0) -> np.ndarray:
        """(size * size, 3) head-frame positions of slice k's pixels, row-major."""
        centre = self.offset + (self.first_mm + k * self.thickness_mm + offset) * self.normal
        grid = (np.arange(self.size) - (self.size - 1) / 2.0) * self.pixel_mm
        rows = grid[:, None, None] * self.col_dir
        cols = grid[None, :, None] * self.row_dir
        return (centre + rows + cols).reshape(-1, 3)


def draw_scan(rng: np.random.Generator, size: int, bottom: float, top: float, n_slices: int | None,
              **fixed: float | str) -> ScanB:
    """Acquisition settings for a head spanning bottom..top (mm along z); `fixed` overrides draws."""
    thickness = float(fixed.get("slice_mm") or rng.choice([2.5, 3.0, 4.0, 5.0, rng.uniform(2.5, 5.0)]))
    native = float(fixed.get("native_pixel_mm") or rng.uniform(0.42, 0.55))
    tilt = math.radians(float(fixed["tilt_deg"]) if "tilt_deg" in fixed else
                        (rng.uniform(5, 25) if rng.uniform() < 0.6 else 0.0))
    span = (top - bottom) / max(math.cos(tilt), 0.5)
    if n_slices is None:
        n_slices = max(8, int(math.ceil(span / thickness)))
        first = bottom + thickness / 2
    else:
        first = (bottom + top) / 2 - (n_slices - 1) * thickness / 2 + rng.uniform(-0.5, 0.5) * thickness
    kernel = str(fixed.get("kernel") or rng.choice(list(KERNELS), p=[0.4, 0.4, 0.2]))
    low_dose = rng.uniform() < 0.25
    sigma = float(fixed["noise_sigma"]) if "noise_sigma" in fixed else (
        rng.uniform(9, 18) if low_dose else rng.uniform(3, 8))
    return ScanB(size=size, pixel_mm=native * NATIVE_PX / size, thickness_mm=thickness, n_slices=int(n_slices),
                 first_mm=first, tilt=tilt, yaw=math.radians(rng.uniform(-8, 8)),
                 offset=np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), 0.0]), kernel=kernel,
                 noise_sigma=sigma, cupping=rng.uniform(0, 8), streaks=rng.uniform(10, 45))


def _freq(size: int, pixel_mm: float) -> np.ndarray:
    f = np.fft.fftfreq(size, d=pixel_mm)
    return np.hypot(f[:, None], f[None, :])


def mtf(scan: ScanB) -> np.ndarray:
    cutoff, boost = KERNELS[scan.kernel]
    f = _freq(scan.size, scan.pixel_mm)
    return (1.0 + boost * (f / cutoff) ** 2) * np.exp(-((f / cutoff) ** 2))


def artifacts(rng: np.random.Generator, scan: ScanB, img: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Cupping inside the cranial cavity and dark streaks between dense bone of the skull base."""
    out = img.copy()
    cavity = np.isin(code, INTRACRANIAL)
    if cavity.sum() > 50:
        rr, cc = np.nonzero(cavity)
        r = np.hypot((rr - rr.mean()) / (np.ptp(rr) / 2 + 1), (cc - cc.mean()) / (np.ptp(cc) / 2 + 1))
        out[rr, cc] -= scan.cupping * np.clip(1 - r ** 2, 0, 1)
    # Streaks run between the dense bone of the skull base (petrous ridges, floors), not the vault.
    bone = code == T["skull_base"]
    share = bone.sum() / max(cavity.sum() + bone.sum(), 1)
    if share > 0.03 and cavity.sum() > 50:
        by, bx = np.nonzero(bone)
        yy, xx = np.mgrid[0:scan.size, 0:scan.size]
        head = img > -300
        for _ in range(int(rng.integers(2, 6))):
            i, j = rng.integers(len(by), size=2)
            a, b = np.array([by[i], bx[i]], float), np.array([by[j], bx[j]], float)
            length = float(np.hypot(*(b - a)))
            if length < scan.size / 10:
                continue
            t = np.clip(((yy - a[0]) * (b[0] - a[0]) + (xx - a[1]) * (b[1] - a[1])) / length ** 2, 0, 1)
            dist = np.hypot(yy - a[0] - t * (b[0] - a[0]), xx - a[1] - t * (b[1] - a[1]))
            width = rng.uniform(0.8, 2.0) * scan.size / 256
            amp = scan.streaks * min(1.0, share * 5) * rng.uniform(0.5, 1.0)
            out -= (amp * np.exp(-((dist / width) ** 2)) * head).astype(np.float32)
    return out


def reconstruct(rng: np.random.Generator, scan: ScanB, img: np.ndarray) -> np.ndarray:
    """The kernel's blur/sharpening and correlated, attenuation-dependent noise."""
    h = mtf(scan)
    out = np.real(np.fft.ifft2(np.fft.fft2(img) * h)).astype(np.float32)
    if scan.noise_sigma > 0:
        f = _freq(scan.size, scan.pixel_mm)
        white = rng.standard_normal((scan.size, scan.size))
        shaped = np.real(np.fft.ifft2(np.fft.fft2(white) * np.sqrt(f) * h))
        shaped /= max(float(shaped.std()), 1e-9)
        # More photons are absorbed along longer, denser paths: noise follows the smoothed attenuation.
        mu = np.clip(img + 1000.0, 0, None) / 1000.0
        path = gaussian_filter(mu, scan.size / 10)
        level = 0.5 + path / max(float(np.percentile(path, 99.5)), 1e-6)
        out += (scan.noise_sigma * np.sqrt(level) * shaped).astype(np.float32)
    return np.clip(out, -1024.0, 3071.0)
