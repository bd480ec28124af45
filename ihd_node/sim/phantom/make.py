"""make_series: one deterministic synthetic head-CT series from a seed and variation keywords."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from scipy.ndimage import gaussian_filter

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.errors import UserError
from ihd_node.sim.phantom.encode import encode_pixels, phantom_uid, series_attrs, slice_dataset
from ihd_node.sim.phantom.head import copy_anatomy, draw_anatomy, uniform
from ihd_node.sim.phantom.lesions import draw_lesions
from ihd_node.sim.phantom.lesions_wide import draw_wide_lesions
from ihd_node.sim.phantom.render import labels_from_bits, min_pixels, render_slice
from ihd_node.sim.phantom.scanner import Geometry, draw_geometry, gauss_std, pick
from ihd_node.sim.phantom.series import ENCODINGS, TISSUE, VARIATION_KEYS, PhantomSeries
from ihd_node.sim.phantom.wide import Wide, draw_wide, wide_artifacts, wide_noise


def choose_subtypes(rng: np.random.Generator, subtypes: Sequence[str] | None) -> tuple[str, ...]:
    """None: random (about half negative, else 1-2 subtypes); [] or ['none']: negative; ['any']: random
    positive."""
    draw = rng.uniform(), rng.permutation(len(SUBTYPES)), rng.uniform()  # always drawn: same stream after
    if subtypes is None:
        if draw[0] < 0.5:
            return ()
    else:
        names = [str(s).strip().lower() for s in subtypes]
        bad = [n for n in names if n not in SUBTYPES and n not in ("none", "any")]
        if bad:
            raise UserError(f"unknown hemorrhage subtype {', '.join(map(repr, bad))}; valid: "
                            f"{', '.join(SUBTYPES)}, 'none' (negative) or 'any' (random positive)")
        chosen = [n for n in SUBTYPES if n in names]
        if chosen or "any" not in names:
            return tuple(chosen)
    count = 1 if draw[2] < 0.65 else 2
    return tuple(SUBTYPES[i] for i in sorted(draw[1][:count]))


def make_series(seed: int, subtypes: Sequence[str] | None = None, n_slices: int | None = None,
                size: int = 512, randomize: bool = False, **variation: Any) -> PhantomSeries:
    """One synthetic head-CT series, deterministic given the arguments.

    subtypes: None = random (about half negative, else 1-2 random subtypes); [] or ["none"] = negative;
    ["any"] = 1-2 random subtypes; else the named SUBTYPES, each guaranteed on at least one slice.
    n_slices: default random 24-36. Variation keywords (None or absent = random): slice_spacing (mm along
    the normal; default 4-6, or 1-2.5 with thin=True), pixel_spacing, noise_sigma (HU), blur_mm, tilt_deg,
    rotation_deg (in-plane), offset_mm ((x, y)), encoding (one of ENCODINGS), shuffle (file order, default
    True), reverse_instances, headrest, padding, mass_effect, study_instance_uid, patient_id,
    series_number, series_description.
    randomize: domain randomization for training (wide.py): much wider anatomy, lesions and scanner; a
    variation given here still wins. False keeps every seed's phantom exactly as it always was.
    """
    unknown = set(variation) - VARIATION_KEYS
    if unknown:
        raise TypeError(f"make_series() got unknown variation {sorted(unknown)}; "
                        f"known: {sorted(VARIATION_KEYS)}")
    if n_slices is not None and n_slices < 1:
        raise UserError(f"--slices must be at least 1, got {n_slices}")
    if not 32 <= size <= 2048:
        raise UserError(f"--size must be between 32 and 2048 pixels, got {size}")
    # Three streams, so that lesions and acquisition choices never move the head: the same seed with other
    # subtypes is the same head with other blood, which tests (and paired training data) rely on.
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0x1CD])
    lesion_rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0x1E5])
    chosen = choose_subtypes(rng, subtypes)
    wide = draw_wide(seed) if randomize else None
    if wide is not None:
        given = {k: v for k, v in variation.items() if v is not None}
        variation = {**wide.variation, **given}
        if variation.get("thin") and "slice_spacing" not in given:
            variation.pop("slice_spacing")
    n = int(pick({"n": n_slices}, "n", int(rng.integers(24, 37))))
    base = draw_anatomy(rng, wide)
    geo = draw_geometry(rng, base, n, size, variation, "intraventricular" in chosen)
    min_px = min_pixels(geo.ps)
    partial = bool(pick(variation, "partial_volume", rng.uniform() < 0.5))
    # Two planes a quarter thickness either side of the centre stand in for the slab of a thick slice.
    offsets = (-geo.spacing / 4, geo.spacing / 4) if partial and geo.spacing > 2.0 else (0.0,)
    for _attempt in range(6):
        an = copy_anatomy(base)
        if wide is None:
            lesions = draw_lesions(lesion_rng, an, geo, chosen, variation.get("mass_effect"))
        else:
            lesions = draw_wide_lesions(lesion_rng, an, geo, chosen, variation.get("mass_effect"), wide)
        clean = [render_slice(an, geo, lesions, k, offsets) for k in range(n)]
        labels = np.stack([labels_from_bits(bits, min_px) for _, _, bits in clean])
        if all(labels[:, CLASSES.index(t)].any() for t in chosen):
            break
    else:
        if subtypes is not None:  # asked for: say so; drawn at random: keep what could be placed
            raise UserError(f"phantom seed {seed}: could not place {', '.join(chosen)} on {n} slices of "
                            f"{geo.spacing:.1f} mm; use more slices (--slices) or another seed")
    placed = tuple(t for t in chosen if labels[:, CLASSES.index(t)].any())
    # UIDs name the content: the same arguments give the same UIDs, other arguments other UIDs.
    content: tuple = (seed, placed, n, size, sorted((k, repr(v)) for k, v in variation.items()))
    content += ("randomized",) if wide is not None else ()
    finish_rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0x2F1])
    return _finish(seed, content, finish_rng, variation, geo, placed, clean, labels, partial, wide)


def _finish(seed: int, content: object, rng: np.random.Generator, var: dict[str, Any], geo: Geometry,
            placed: tuple[str, ...], clean: list[tuple[np.ndarray, ...]], labels: np.ndarray,
            partial: bool, wide: Wide | None = None) -> PhantomSeries:
    """Blur, noise, padding, encoding and the DICOM datasets."""
    n, size = len(clean), geo.size
    sigma = float(pick(var, "noise_sigma", uniform(rng, 3.0, 12.0)))
    corr = uniform(rng, 0.0, 1.0) * (0.5 + 0.5 * size / 512)  # noise correlation length, pixels
    blur_px = float(pick(var, "blur_mm", uniform(rng, 0.3, 0.6))) / geo.ps  # the scanner's point spread
    encoding = str(pick(var, "encoding", rng.choice(list(ENCODINGS), p=np.array(list(ENCODINGS.values())))))
    if encoding not in ENCODINGS:
        raise UserError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    pad_value = float(rng.choice([-2000.0, -3024.0]))
    padding = bool(pick(var, "padding", rng.uniform() < 0.35))
    # Only signed encodings can hold values below -1024 HU outside the reconstruction circle.
    pad_hu = pad_value if padding and encoding in ("int16", "int16_zero", "slope_half") else None
    quirk_intercept = float(rng.choice([0.0, 1.0]))
    reverse = bool(pick(var, "reverse_instances", rng.uniform() < 0.4))
    common = series_attrs(seed, content, rng, var, geo)
    yy, xx = np.mgrid[0:size, 0:size]
    outside = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 > (size / 2) ** 2
    sops = [phantom_uid("sop", common["SeriesInstanceUID"], k) for k in range(n)]
    hu_out = np.empty((n, size, size), dtype=np.float32)
    tissue = np.empty((n, size, size), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)
    datasets: list[Dataset] = []
    norm = np.float32(1.0 / gauss_std(corr)) if corr > 0.05 else np.float32(1.0)
    for k, (hu, tis, bits) in enumerate(clean):
        img = gaussian_filter(hu, blur_px) if blur_px > 0.05 else hu.copy()
        if wide is not None:  # randomized: artifacts and the noise texture of the kernel drawn
            img = wide_artifacts(rng, wide, img, tis, geo.ps)
            img += wide_noise(rng, size, sigma, corr, wide.kernel) if sigma > 0 else np.float32(0.0)
        elif sigma > 0:  # CT noise is slightly correlated (the reconstruction kernel): filtered, rescaled
            noise = rng.standard_normal((size, size), dtype=np.float32)
            img += np.float32(sigma) * (gaussian_filter(noise, corr) * norm if corr > 0.05 else noise)
        if pad_hu is not None:
            img[outside], tis[outside] = pad_hu, TISSUE["padding"]
        stored, pixel_attrs, decoded = encode_pixels(img, encoding, quirk_intercept)
        hu_out[k], tissue[k], masks[k] = decoded, tis, bits
        z_table = float(geo.ipp[k][2] + size * geo.ps / 2 * geo.col[2])
        instance = n - k if reverse else k + 1
        datasets.append(slice_dataset(common, pixel_attrs, stored, sops[k], geo.ipp[k], instance, z_table))
    order = rng.permutation(n) if var.get("shuffle", True) else np.arange(n)
    return PhantomSeries(
        datasets=[datasets[i] for i in order], labels=labels, masks=masks, sop_uids_sorted=sops,
        study_instance_uid=common["StudyInstanceUID"], series_instance_uid=common["SeriesInstanceUID"],
        hu=hu_out, tissue=tissue, seed=int(seed), subtypes=placed, pixel_spacing=geo.ps,
        slice_spacing=geo.spacing, tilt_deg=math.degrees(geo.tilt), encoding=encoding, partial_volume=partial)
