"""make_case and cohort_b: labelled series of generator B."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.errors import UserError
from ihd_node.sim.generator_b.anatomy import BRAIN, HeadB, draw_head
from ihd_node.sim.generator_b.lesions import MAKERS, LesionB
from ihd_node.sim.generator_b.scanner import INTRACRANIAL, ScanB, artifacts, draw_scan, reconstruct

# A subtype is labelled on a slice when its mask (occupancy >= 0.5 averaged over the slice thickness)
# covers at least this area: below it a human reader could not call it either.
MIN_AREA_MM2 = 10.0


@dataclass(frozen=True)
class CaseB:
    """One series of generator B, slices in spatial order (inferior to superior)."""

    hu: np.ndarray  # (n, rows, cols) float32 HU
    pixel_spacing_mm: float
    slice_spacing_mm: float
    slice_labels: np.ndarray  # (n, 6) uint8, CLASSES order ("any" = any subtype)
    series_labels: np.ndarray  # (6,) uint8
    masks: np.ndarray  # (n, rows, cols) uint8, bit k set where SUBTYPES[k] is drawn
    seed: int
    subtypes: tuple[str, ...]
    kernel: str
    tilt_deg: float
    noise_sigma: float

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


def _render(head: HeadB, scan: ScanB, lesions: Sequence[LesionB]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean HU (n, s, s) averaged over each slice's sub-planes, the lesion masks (bit per subtype) and
    the tissue codes of each slice's central plane (where cupping and streaks apply)."""
    n, s = scan.n_slices, scan.size
    hu = np.zeros((n, s, s), dtype=np.float32)
    masks = np.zeros((n, s, s), dtype=np.uint8)
    codes = np.zeros((n, s, s), dtype=np.uint8)
    subs = scan.sub_planes()
    for k in range(n):
        occ_sum = {les.subtype: np.zeros(s * s, dtype=np.float32) for les in lesions}
        for j, off in enumerate(subs):
            pts = scan.plane_points(k, off)
            val, code = head.evaluate(pts)
            idx = np.flatnonzero(np.isin(code, INTRACRANIAL))
            if j == len(subs) // 2:
                codes[k] = code.reshape(s, s)
            p, v = pts[idx], val[idx]
            brain = np.isin(code[idx], BRAIN)
            for les in lesions:
                occ = les.occupancy.sample(p)
                if les.edema is not None:
                    v -= les.edema_drop * les.edema.sample(p) * brain
                hit = np.flatnonzero(occ > 0)
                if hit.size:
                    v[hit] = v[hit] * (1 - occ[hit]) + les.hu.sample(p[hit]) * occ[hit]
                    occ_sum[les.subtype][idx] += occ
            val[idx] = v
            hu[k] += val.reshape(s, s)
        hu[k] /= len(subs)
        for les in lesions:
            drawn = (occ_sum[les.subtype] / len(subs) >= 0.5).reshape(s, s)
            masks[k][drawn] |= np.uint8(1 << SUBTYPES.index(les.subtype))
    return hu, masks, codes


def _labels(masks: np.ndarray, pixel_mm: float) -> np.ndarray:
    min_px = max(1, int(np.ceil(MIN_AREA_MM2 / pixel_mm ** 2)))
    labels = np.zeros((masks.shape[0], len(CLASSES)), dtype=np.uint8)
    for j, sub in enumerate(SUBTYPES):
        area = ((masks & (1 << j)) > 0).reshape(masks.shape[0], -1).sum(axis=1)
        labels[:, CLASSES.index(sub)] = area >= min_px
    labels[:, 0] = labels[:, 1:].max(axis=1)
    return labels


def make_case(seed: int, subtypes: Sequence[str] = (), *, n_slices: int | None = None, size: int = 256,
              **scanner: float | str) -> CaseB:
    """One labelled series from generator B, deterministic for its arguments.

    subtypes: the SUBTYPES to place (empty = negative); each is guaranteed on at least one labelled slice.
    n_slices: None covers the head from the posterior fossa to the vertex at the drawn slice thickness;
    a number centres that many slices on the cranial cavity. scanner overrides: slice_mm, native_pixel_mm
    (spacing at 512 px), tilt_deg, kernel (soft, standard, sharp), noise_sigma (HU).
    """
    chosen = tuple(sub for sub in SUBTYPES if sub in set(subtypes))
    unknown = set(subtypes) - set(SUBTYPES)
    if unknown:
        raise UserError(f"unknown subtype(s) {sorted(unknown)}; use {', '.join(SUBTYPES)}")
    if not 32 <= size <= 1024:
        raise UserError(f"size must be 32-1024 pixels, got {size}")
    key = int(seed) & 0xFFFFFFFFFFFF
    head = draw_head(np.random.default_rng([key, 0xB1]))
    scan_rng = np.random.default_rng([key, 0xB3])
    bottom = float(head.floor[2]) + 4.0
    top = float(head.centre_z + head.semi[2] * 0.97)
    scan = draw_scan(scan_rng, size, bottom, top, n_slices, **scanner)
    for attempt in range(8):
        lesion_rng = np.random.default_rng([key, 0xB2, attempt])
        lesions = [MAKERS[sub](lesion_rng, head) for sub in chosen]
        clean, masks, codes = _render(head, scan, lesions)
        labels = _labels(masks, scan.pixel_mm)
        if all(labels[:, CLASSES.index(sub)].any() for sub in chosen):
            break
    else:
        raise UserError(f"generator B seed {seed}: could not place {', '.join(chosen)} on {scan.n_slices} "
                        f"slices; use more slices or another seed")
    noise_rng = np.random.default_rng([key, 0xB4])
    hu = np.empty_like(clean)
    for k in range(scan.n_slices):
        hu[k] = reconstruct(noise_rng, scan, artifacts(noise_rng, scan, clean[k], codes[k]))
    return CaseB(hu=hu, pixel_spacing_mm=float(scan.pixel_mm), slice_spacing_mm=float(scan.thickness_mm),
                 slice_labels=labels, series_labels=labels.max(axis=0), masks=masks, seed=int(seed),
                 subtypes=chosen, kernel=scan.kernel, tilt_deg=float(np.degrees(scan.tilt)),
                 noise_sigma=float(scan.noise_sigma))


def cohort_plan(n_per_kind: int = 8, seed: int = 0) -> list[tuple[int, tuple[str, ...]]]:
    """(case seed, subtypes) of a cohort: round(1.25 * n_per_kind) negatives, n_per_kind of each subtype
    alone and every pair of subtypes ceil(n_per_kind / 8) times (n_per_kind 8: 10 + 40 + 10 = 60 series)."""
    kinds: list[tuple[str, ...]] = [()] * int(round(1.25 * n_per_kind))
    for sub in SUBTYPES:
        kinds += [(sub,)] * n_per_kind
    kinds += [pair for pair in combinations(SUBTYPES, 2)] * int(np.ceil(n_per_kind / 8))
    base = 7_000_000 + 10_000 * int(seed)
    return [(base + i, kind) for i, kind in enumerate(kinds)]


def cohort_b(n_per_kind: int = 8, seed: int = 0, **kwargs: object) -> Iterator[CaseB]:
    """The cases of cohort_plan, made one at a time (kwargs go to make_case)."""
    for case_seed, kind in cohort_plan(n_per_kind, seed):
        yield make_case(case_seed, kind, **kwargs)  # type: ignore[arg-type]
