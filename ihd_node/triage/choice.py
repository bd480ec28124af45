"""Which of a study's eligible series to analyse: one answer per study (series.selection: best_per_study).

A scanner sends one head CT as several reconstructions of the same slices (soft-tissue and bone
kernels, thin and thick). The model was trained on ~5 mm soft-tissue images, so the series are ranked
by, in this order (the first criterion that differs decides):
  1. kernel: soft tissue before unknown before bone. ConvolutionKernel first (vendor names and number
     ranges below), then SeriesDescription words; when neither tells, the image noise decides between
     otherwise equal series (bone kernels are several times noisier in brain tissue);
  2. axial before tilted beyond series.axial_tolerance_degrees (only when require_axial is off);
  3. slice thickness: 2.5-5 mm, then thinner (combined into 5 mm slabs), then thicker;
  4. coverage along the head axis, in 10 mm steps up to 120 mm (a whole brain);
  5. image noise (when measured), then the lower SeriesNumber, then the UID: a stable order.
Headers only, except the noise: one middle slice per series, and only for series whose kernel is unknown.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ihd_node.imaging.headers import (
    SliceHeader,
    VolumeError,
    slice_normal,
    slice_position,
    slice_thickness,
    sort_stack,
    tilt_degrees,
)
from ihd_node.imaging.volume import slices_hu

SOFT, UNKNOWN, BONE = "soft-tissue", "unknown", "bone"
KERNEL_ORDER = {SOFT: 0, UNKNOWN: 1, BONE: 2}
PREFERRED_MM = (2.5, 5.0)
FULL_COVERAGE_MM = 120.0

# Words in ConvolutionKernel or SeriesDescription (upper case, whole words or prefixes).
BONE_WORDS = re.compile(r"\b(BONE\w*|EDGE|SHARP\w*|DETAIL|LUNG|KNOCHEN|OSTEO\w*|SKULL\s*BASE|INNER\s*EAR)\b")
SOFT_WORDS = re.compile(r"\b(SOFT\w*|STANDARD|STND|STD|BRAIN\w*|CEREBR\w*|HIRN\w*|PARENCHYM\w*|SMOOTH\w*|"
                        r"WEICH\w*)\b")
# Siemens H/J/Hr/Hv/Br/Qr + two digits (+ letter): below 50 smooth, 60 and up sharp.
SIEMENS = re.compile(r"^(?:[A-Z][A-Z]?)(\d{2})[A-Z]?\b")
# Canon/Toshiba FCnn: FC0x-FC2x soft (FC2x head), FC3x head bone, FC5x and up sharp.
CANON = re.compile(r"^FC(\d{2})")
PHILIPS_SOFT = {"UA", "UB", "UC", "A", "B", "C", "EC"}
PHILIPS_BONE = {"D", "E", "YA", "YB", "YC", "YD", "YE", "YF", "L"}


@dataclass(frozen=True)
class SeriesProfile:
    """What the ranking looks at, per series."""

    series_instance_uid: str
    series_number: int | None
    description: str
    kernel: str  # SOFT, UNKNOWN or BONE
    kernel_evidence: str
    tilt_degrees: float
    axial: bool
    thickness_mm: float | None
    coverage_mm: float
    noise_hu: float | None = None

    def label(self) -> str:
        number = "?" if self.series_number is None else self.series_number
        return f"series {number} '{self.description or '-'}'"

    def thickness_rank(self) -> int:
        t = self.thickness_mm
        if t is None:
            return 1
        if PREFERRED_MM[0] - 1e-3 <= t <= PREFERRED_MM[1] + 1e-3:
            return 0
        return 1 if t < PREFERRED_MM[0] else 2

    def key(self) -> tuple:
        return (KERNEL_ORDER[self.kernel], not self.axial, self.thickness_rank(),
                -int(min(self.coverage_mm, FULL_COVERAGE_MM) // 10),
                self.noise_hu if self.noise_hu is not None else 0.0,
                self.series_number if self.series_number is not None else 1 << 30, self.series_instance_uid)


def kernel_of_name(kernel: str) -> str:
    """SOFT / BONE / UNKNOWN from a ConvolutionKernel value (one value of it)."""
    k = kernel.strip().upper()
    if not k:
        return UNKNOWN
    if BONE_WORDS.search(k):
        return BONE
    if SOFT_WORDS.search(k):
        return SOFT
    m = CANON.match(k)
    if m:
        n = int(m.group(1))
        return SOFT if n < 30 else BONE if n < 40 or n >= 50 else UNKNOWN
    m = SIEMENS.match(k)
    if m:
        n = int(m.group(1))
        return SOFT if n < 50 else BONE if n >= 60 else UNKNOWN
    if k in PHILIPS_SOFT:
        return SOFT
    if k in PHILIPS_BONE:
        return BONE
    return UNKNOWN


def kernel_of(headers: Sequence) -> tuple[str, str]:
    """(kind, evidence) from ConvolutionKernel, else SeriesDescription."""
    ds = headers[0]
    raw = ds.get("ConvolutionKernel") or []
    values = [raw] if isinstance(raw, str) else [str(v) for v in raw]
    for value in values:
        kind = kernel_of_name(value)
        if kind != UNKNOWN:
            return kind, f"ConvolutionKernel {value}"
    description = str(ds.get("SeriesDescription", "") or "").upper()
    if BONE_WORDS.search(description):
        return BONE, f"SeriesDescription '{ds.SeriesDescription}'"
    if SOFT_WORDS.search(description):
        return SOFT, f"SeriesDescription '{ds.SeriesDescription}'"
    return UNKNOWN, "kernel not named" + (f" (ConvolutionKernel {'/'.join(values)})" if values else "")


def image_noise(hu: np.ndarray) -> float | None:
    """Robust noise (HU) in soft tissue: MAD of the difference to a 3x3 mean, where the smoothed image is
    0-80 HU (smoothed, so that a noisy bone-kernel image still finds its brain)."""
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), 2.0)
    tissue = ndimage.binary_erosion((smooth > 0) & (smooth < 80), iterations=2)
    if tissue.sum() < 50:
        return None
    residual = (hu - ndimage.uniform_filter(hu, 3))[tissue]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


def profile(refs: Sequence[SliceHeader], *, axial_tolerance_degrees: float = 30.0,
            measure_noise: bool = False) -> SeriesProfile:
    """The ranking profile of one eligible series (refs as ihd_node.imaging.headers.slice_headers gives them)."""
    headers = [r.ds for r in refs]
    first = headers[0]
    kernel, evidence = kernel_of(headers)
    tilt = tilt_degrees(first) or 0.0
    try:
        normal = slice_normal(first)
    except VolumeError:
        normal = None
    stack = sort_stack([slice_position(ds, normal) if normal is not None else 0.0 for ds in headers])
    positions = [stack.positions[i] for i in stack.order]
    thickness = slice_thickness(headers)
    coverage = (positions[-1] - positions[0]) + (thickness or 0.0)
    noise = None
    if measure_noise:
        order = stack.order
        try:
            noise = image_noise(slices_hu([refs[order[len(order) // 2]]])[0])
        except VolumeError:
            noise = None
    try:
        number = int(first.SeriesNumber) if first.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    return SeriesProfile(
        series_instance_uid=str(first.SeriesInstanceUID), series_number=number,
        description=str(first.get("SeriesDescription", "") or ""), kernel=kernel, kernel_evidence=evidence,
        tilt_degrees=tilt, axial=tilt <= axial_tolerance_degrees, thickness_mm=thickness, coverage_mm=coverage,
        noise_hu=noise if kernel == UNKNOWN else None)


def rank(profiles: Sequence[SeriesProfile]) -> list[SeriesProfile]:
    """Best first."""
    return sorted(profiles, key=SeriesProfile.key)


def why_lower(other: SeriesProfile, best: SeriesProfile) -> str:
    """Why `other` ranks below `best`: the first criterion that differs, in words."""
    if other.kernel != best.kernel:
        return (f"{other.kernel} kernel ({other.kernel_evidence}) ranks below the {best.kernel} kernel of "
                f"{best.label()} ({best.kernel_evidence})")
    if other.axial != best.axial:
        return f"tilted {other.tilt_degrees:.0f} degrees; {best.label()} is axial"
    if other.thickness_rank() != best.thickness_rank():
        return (f"{_mm(other.thickness_mm)} slices rank below the {_mm(best.thickness_mm)} of {best.label()} "
                f"({PREFERRED_MM[0]:g}-{PREFERRED_MM[1]:g} mm preferred, then thinner, then thicker)")
    if other.key()[3] != best.key()[3]:
        return f"covers {other.coverage_mm:.0f} mm of the head; {best.label()} covers {best.coverage_mm:.0f} mm"
    if other.noise_hu is not None and best.noise_hu is not None and other.noise_hu != best.noise_hu:
        return (f"image noise {other.noise_hu:.1f} HU (kernel not named) is higher than the "
                f"{best.noise_hu:.1f} HU of {best.label()}: a sharper kernel")
    return f"equal rank; {best.label()} has the lower series number"


def _mm(value: float | None) -> str:
    return "unknown-thickness" if value is None else f"{value:g} mm"
