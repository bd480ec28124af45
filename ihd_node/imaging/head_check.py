"""Is this a head CT? The header's body part when it names one, then a cheap look at the images.

The model was trained on head CT only; a chest or abdomen CT sent by a routing rule must not come back
"POSITIVE". Headers alone cannot tell: BodyPartExamined is optional and descriptions are free text, so
    1. BodyPartExamined naming another body region (CHEST, ABDOMEN, ...) refuses at once;
    2. the images decide, on nine slices spread over the stack: a head slice shows a closed
       bone ring (the skull) that encloses most of the cross-section, and what it encloses is
       intracranial-density tissue (brain, CSF, blood: about -10..100 HU) with next to no fat or air.
       Trunk slices fail this: the spinal canal is the only closed bone ring in the chest and abdomen
       and it encloses ~1% of the body; the pelvic ring encloses fat and bowel gas; a water phantom
       has no bone. One passing slice suffices, so skull-base and vertex slices need not pass.
Both `serve` (ihd_node.triage.select.judge_series) and `analyze` use this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from ihd_node.imaging.skull import HEAD_CHECK, skull_ring

# BodyPartExamined values (PS3.16 Annex L and common local spellings) that mean the head is in the scan.
HEAD_PARTS = ("HEAD", "BRAIN", "SKULL", "CRANI", "CEREBR", "KOPF", "SCHAEDEL", "SCHADEL", "HEADNECK",
              "NEURO", "ORBIT", "IAC", "SELLA")
# Values that mean a scan of another region: refused without looking at the pixels.
OTHER_PARTS = ("CHEST", "THORAX", "LUNG", "HEART", "CARDIAC", "ABDOMEN", "ABDOMENPELVIS", "PELVIS",
               "LIVER", "KIDNEY", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "KNEE", "HIP", "SHOULDER",
               "ELBOW", "WRIST", "HAND", "FOOT", "ANKLE", "LEG", "ARM", "EXTREMITY", "BREAST", "COLON",
               "AORTA", "THORAXABDOMEN", "CHESTABDOMEN", "CHESTABDPELVIS", "ABDPELVIS")

FAT_HU = (-200.0, -30.0)
MIN_ENCLOSED_MM2 = 2500.0  # intracranial area of a small child's head at the skull base is larger
MIN_ENCLOSED_SHARE = 0.35  # of the body's cross-section; a mid-level head slice reaches ~0.6-0.8
MIN_DENSITY_SHARE = 0.70  # of the enclosed area at intracranial density
MAX_FAT_SHARE = 0.05
# Fractions of the sorted stack looked at: spread over all of it, as a short stack may cover only the skull
# base (orbits and the anterior fossa floor break the ring) plus a few cerebral slices above it.
SAMPLE_AT = (0.05, 0.15, 0.27, 0.39, 0.5, 0.61, 0.73, 0.85, 0.95)


@dataclass(frozen=True)
class SliceLook:
    """What one slice shows: the share of the body inside a bone ring, and what that ring encloses."""

    enclosed_mm2: float
    enclosed_share: float  # of the body's cross-section
    density_share: float  # of the enclosed area at intracranial density
    fat_share: float

    @property
    def head_like(self) -> bool:
        return (self.enclosed_mm2 >= MIN_ENCLOSED_MM2 and self.enclosed_share >= MIN_ENCLOSED_SHARE
                and self.density_share >= MIN_DENSITY_SHARE and self.fat_share <= MAX_FAT_SHARE)


def body_part_problem(headers: Sequence[Dataset]) -> str | None:
    """The reason when BodyPartExamined names a region other than the head; None when it is absent,
    names the head, or is a value this list does not know (the images decide then)."""
    value = str(headers[0].get("BodyPartExamined", "") or "").strip().upper() if headers else ""
    compact = value.replace(" ", "").replace("_", "").replace("-", "").replace("/", "").replace("&", "")
    if not compact or any(part in compact for part in HEAD_PARTS):
        return None
    if compact in OTHER_PARTS:
        return f"BodyPartExamined {value} is not the head"
    return None


def look(hu: np.ndarray, pixel_spacing: tuple[float, float]) -> SliceLook:
    """Measure one slice (HU, rows x cols) for the skull-ring test."""
    px_mm2 = float(pixel_spacing[0]) * float(pixel_spacing[1])
    # Gaps of a few mm (sutures, foramina, thin temporal squama) closed, so the ring reads as closed.
    _, enclosed = skull_ring(hu, min(pixel_spacing), HEAD_CHECK)
    # Keep the largest enclosed region: the cranial cavity, not a vertebral canal or a sinus cell.
    labels, count = ndimage.label(enclosed)
    if count == 0:
        return SliceLook(0.0, 0.0, 0.0, 0.0)
    sizes = ndimage.sum_labels(enclosed, labels, index=np.arange(1, count + 1))
    cavity = labels == int(np.argmax(sizes)) + 1
    body = ndimage.binary_fill_holes(hu > -300.0)
    # Densities after a 3x3 median: a bone-kernel reconstruction has 30-100 HU noise in the brain (the
    # median does not smear the skull into the brain as a mean would).
    inside = ndimage.median_filter(hu.astype(np.float32), size=3)[cavity]
    n = max(int(cavity.sum()), 1)
    lo, hi = HEAD_CHECK.soft_hu
    return SliceLook(
        enclosed_mm2=n * px_mm2,
        enclosed_share=n / max(int(body.sum()), 1),
        density_share=float(((inside >= lo) & (inside <= hi)).sum()) / n,
        fat_share=float(((inside >= FAT_HU[0]) & (inside <= FAT_HU[1])).sum()) / n,
    )


def sample_indices(n: int) -> list[int]:
    """The slices (indices into the sorted stack) the image check looks at, the middle of the stack first:
    one passing slice decides, and mid-cerebral slices pass most surely (the skull base and vertex may not),
    so a head costs one look instead of nine (~0.5 s of a 32-slice study's time to result)."""
    chosen = sorted({min(n - 1, max(0, int(round(f * (n - 1))))) for f in SAMPLE_AT}) if n else []
    return sorted(chosen, key=lambda i: (abs(2 * i - (n - 1)), i))


def head_problem(images: Iterable[np.ndarray], pixel_spacing: tuple[float, float]) -> str | None:
    """None as soon as one of the sampled slices looks like a head, else the reason (best slice's figures).

    `images` may be lazy (a generator reading each slice when needed): slices after a passing one are
    neither read nor measured."""
    looks = []
    for hu in images:
        looks.append(look(hu, pixel_spacing))
        if looks[-1].head_like:
            return None
    if not looks:
        return "no image to check for a head"
    best = max(looks, key=lambda lk: (lk.enclosed_share, lk.density_share))
    lo, hi = HEAD_CHECK.soft_hu
    return (f"does not look like a head CT: no sampled slice shows a skull ring around intracranial-density "
            f"tissue (best of {len(looks)}: {best.enclosed_share:.0%} of the body inside a bone ring, "
            f"{best.density_share:.0%} of that at {lo:g}..{hi:g} HU, {best.fat_share:.0%} fat)")
