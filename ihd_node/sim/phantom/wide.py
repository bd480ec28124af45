"""Domain randomization ("wide" phantoms, `make_series(..., randomize=True)`): much wider ranges of
anatomy, lesion density, shape, texture and position, and of the scanner (slice thickness, tilt, noise
level and kernel, streaks, cupping, motion), so that a model trained on them learns the compartment a
bleed lies in rather than the quirks of one generator.

Everything here is drawn from its own random stream, and only when asked for: the default phantoms (tests,
the demo) stay exactly as they were for every seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from ihd_node.sim.phantom.head import Waves, uniform
from ihd_node.sim.phantom.series import TISSUE

STREAM = 0x3D0  # make_series' stream number for the randomization (the others: 0x1CD, 0x1E5, 0x2F1)


@dataclass(frozen=True)
class Wide:
    """One series' randomization, drawn once by draw_wide."""

    head_scale: float  # multiplies the cranial cavity's width (about 50-88 mm semi-axis instead of 60-76)
    aspect: float  # multiplies its length/width ratio
    height: float  # multiplies its height
    skull: float  # multiplies the skull thickness
    ventricles: float  # multiplies the ventricle size (atrophy, hydrocephalus, slit ventricles)
    asymmetry: float  # left/right ventricle width ratio
    brain_hu: float  # offset of grey/white matter (scanner calibration, age)
    variation: dict[str, Any]  # geometry and finish choices, passed to make_series' variation keywords
    kernel: str  # "smooth" (correlated noise) or "sharp" (high-pass noise, bone kernels)
    streaks: float  # beam-hardening streaks per slice (mean)
    streak_hu: float  # their strength
    cupping: float  # HU added at the centre relative to the periphery (beam hardening: negative)
    motion: float  # share of slices with a motion ghost (0: none)
    periventricular: float  # chance that an intraparenchymal bleed sits against a ventricle

    def lesion_hu(self, rng: np.random.Generator) -> float:
        """Acute (55-90 HU) mostly, else hyperacute or subacute down to 42 HU, rarely down to 30 HU."""
        u = rng.uniform()
        return uniform(rng, 55.0, 90.0) if u < 0.55 else uniform(rng, 42.0 if u < 0.9 else 30.0, 90.0)

    def mottle(self, rng: np.random.Generator) -> Waves | None:
        """Fine texture inside a clot (retraction, serum, mixed ages): None for a homogeneous one."""
        if rng.uniform() < 0.3:
            return None
        return Waves.draw(rng, 4, (2.5, 10.0), uniform(rng, 1.0, 5.0))


def draw_wide(seed: int) -> Wide:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, STREAM])
    thin_kernel = rng.uniform() < 0.35
    variation = {
        "slice_spacing": uniform(rng, 2.5, 7.5),
        "tilt_deg": 0.0 if rng.uniform() < 0.4 else float(rng.choice([-1.0, 1.0])) * uniform(rng, 3.0, 30.0),
        "noise_sigma": float(np.exp(rng.uniform(math.log(1.5), math.log(16.0)))),
        "blur_mm": uniform(rng, 0.15, 0.5) if thin_kernel else uniform(rng, 0.3, 1.2),
        "partial_volume": bool(rng.uniform() < 0.6),
        "rotation_deg": float(np.clip(rng.normal(0.0, 14.0), -40, 40)),
    }
    return Wide(
        head_scale=uniform(rng, 0.84, 1.14), aspect=uniform(rng, 0.9, 1.1), height=uniform(rng, 0.88, 1.1),
        skull=float(np.exp(rng.uniform(math.log(0.6), math.log(1.6)))),
        ventricles=float(np.exp(rng.normal(0.0, 0.35))), asymmetry=float(np.exp(rng.normal(0.0, 0.18))),
        brain_hu=uniform(rng, -5.0, 5.0), variation=variation, kernel="sharp" if thin_kernel else "smooth",
        streaks=0.0 if rng.uniform() < 0.5 else uniform(rng, 0.3, 2.5), streak_hu=uniform(rng, 8.0, 40.0),
        cupping=uniform(rng, -10.0, 5.0), motion=0.0 if rng.uniform() < 0.8 else uniform(rng, 0.1, 0.6),
        periventricular=uniform(rng, 0.2, 0.6),
    )


def wide_noise(rng: np.random.Generator, size: int, sigma: float, corr: float, kernel: str) -> np.ndarray:
    """Unit-variance noise texture times sigma: smooth (low-pass) or sharp (high-pass, grainy)."""
    noise = rng.standard_normal((size, size), dtype=np.float32)
    if kernel == "sharp":
        noise = noise - np.float32(0.8) * gaussian_filter(noise, 1.0)
    elif corr > 0.05:
        noise = gaussian_filter(noise, corr)
    return noise * np.float32(sigma / max(float(noise.std()), 1e-6))


def wide_artifacts(rng: np.random.Generator, wide: Wide, img: np.ndarray, tis: np.ndarray, ps: float) -> np.ndarray:
    """Beam-hardening cupping and streaks inside the head, and motion ghosts, on one slice (HU)."""
    size = img.shape[0]
    head = (tis != TISSUE["air"]) & (tis != TISSUE["device"]) & (tis != TISSUE["padding"])
    if not head.any():
        return img
    rows, cols = np.nonzero(head)
    cy, cx = float(rows.mean()), float(cols.mean())
    radius = max(float(np.sqrt(((rows - cy) ** 2 + (cols - cx) ** 2).mean())) * 1.4, 8.0)
    yy = np.arange(size, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(size, dtype=np.float32)[None, :] - np.float32(cx)
    if wide.cupping:
        r2 = (yy * yy + xx * xx) * np.float32(1.0 / (radius * radius))
        img = img + np.where(head, np.float32(wide.cupping) * np.clip(1.0 - r2, 0.0, 1.0), 0.0).astype(np.float32)
    bone = np.count_nonzero(tis == TISSUE["bone"]) * ps * ps
    # Streaks run between dense bone: more of them where there is more bone on the slice (skull base).
    count = int(rng.poisson(wide.streaks * min(bone / 2500.0, 2.0))) if wide.streaks else 0
    for _ in range(min(count, 12)):
        angle = rng.uniform(0.0, math.pi)
        off = np.float32(rng.normal(0.0, radius * 0.3))
        dist = xx * np.float32(math.sin(angle)) - yy * np.float32(math.cos(angle)) - off
        width = np.float32(uniform(rng, 0.6, 2.5) / max(ps, 0.2) * 0.5 + 0.5)
        sign = -1.0 if rng.uniform() < 0.7 else 1.0
        streak = np.float32(sign * wide.streak_hu * uniform(rng, 0.3, 1.0)) * np.exp(-(dist / width) ** 2)
        img = img + np.where(head, streak, 0.0).astype(np.float32)
    if wide.motion and rng.uniform() < wide.motion:
        shift = rng.normal(0.0, 2.5 / max(ps, 0.2), size=2).round().astype(int)
        w = np.float32(uniform(rng, 0.15, 0.45))
        img = (1 - w) * img + w * np.roll(img, tuple(shift), axis=(0, 1))
    return img.astype(np.float32)
