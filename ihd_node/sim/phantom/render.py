"""One slice: the head's tissues on the slice plane, then lesions and support, and the labels they
give."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.sim.phantom.head import Anatomy, cavity_shape, cranial_floor, skull_thickness, tentorium
from ihd_node.sim.phantom.lesions import Lesion, render_lesions
from ihd_node.sim.phantom.scanner import Geometry, Grid, Slice, render_support
from ihd_node.sim.phantom.series import MIN_LESION_MM2, TISSUE


def _crop(an: Anatomy, q0: np.ndarray, ei: np.ndarray, ej: np.ndarray,
          size: int) -> tuple[slice, slice] | None:
    """Pixel window holding the head on this plane, found on a coarse grid."""
    step = max(2, size // 64)
    idx = np.arange(0, size, step, dtype=np.float32)
    p = q0[:, None, None] + ei[:, None, None] * idx[None, :, None] + ej[:, None, None] * idx[None, None, :]
    p = p.astype(np.float32)
    *_, d = cavity_shape(an, p[0], p[1], p[2])
    inside = d < an.t_mean + an.t_ap + an.scalp + an.temporalis + 2.0
    if not inside.any():
        return None
    rr, cc = np.nonzero(inside)
    margin = 2 * step + 4
    r0, r1 = max(int(rr.min()) * step - margin, 0), min(int(rr.max()) * step + margin, size)
    c0, c1 = max(int(cc.min()) * step - margin, 0), min(int(cc.max()) * step + margin, size)
    return slice(r0, r1), slice(c0, c1)


def _render_head(an: Anatomy, grid: Grid) -> Slice:
    """Scalp, skull, skull base and the brain surface with its sulci."""
    x, y, z = grid.lin((1, 0, 0)), grid.lin((0, 1, 0)), grid.lin((0, 0, 1))
    qx, qy, qz, g, d = cavity_shape(an, x, y, z)
    inv = 1.0 / g
    qn = (qx * inv, qy * inv, qz * inv)
    skull_t, scalp_t = skull_thickness(an, *qn)
    h = an.hu
    hu = np.full(grid.shape, h["air"], dtype=np.float32)
    tis = np.zeros(grid.shape, dtype=np.uint8)
    zmin = float(min(z[0, 0], z[0, -1], z[-1, 0], z[-1, -1]))
    low = zmin < an.f_ant + 2.0  # the plane reaches the skull base somewhere
    if low:
        floor, mid, base_t, ant = cranial_floor(an, x, y)
        ring_low = floor - base_t - np.float32(28.0 * an.k) * ant  # the orbital rims go below the floor
    else:
        floor, mid, base_t = np.float32(an.f_post), None, np.float32(an.base_t)
        ring_low = floor - base_t
    outer = d < skull_t + scalp_t
    hu[outer], tis[outer] = h["scalp"], TISSUE["scalp"]
    if an.fat_layer:
        fat = outer & (d > skull_t + scalp_t * 0.35) & (d < skull_t + scalp_t * 0.65)
        hu[fat], tis[fat] = h["fat"], TISSUE["fat"]
    above_base = z > ring_low
    bone = (d < skull_t) & above_base
    cortical = (d < an.t_inner) | (d > skull_t - an.t_outer)
    tex = grid.wave_sum(an.texture)
    hu[bone] = np.where(cortical, np.float32(h["cortical"]), h["diploe"] + 40.0 * tex)[bone]
    tis[bone] = TISSUE["bone"]
    inside = d < 0
    cavity = inside & (z > floor)
    if low:
        _render_base(an, grid, hu, tis, (x, y, z), floor, base_t, inside, outer)
    # Brain: subarachnoid CSF over the surface, cortex ribbon, white matter, sulci.
    depth = -d - np.float32(an.csf_t)
    hu[cavity], tis[cavity] = h["csf"], TISSUE["csf"]
    brain = cavity & (depth > 0)
    white = np.float32(h["wm"]) + tex
    grey = np.float32(h["gm"]) + tex
    if low:
        posterior = (mid < 0.5) & (z < tentorium(an, x, y))
        white = np.where(posterior, np.float32(h["cereb"]) + tex, white)
    hu[brain] = np.where(depth < an.gm_t, grey, white)[brain]
    tis[brain] = np.where(depth < an.gm_t, TISSUE["grey"], TISSUE["white"])[brain]
    csf_space = cavity & ~brain
    csf_wide = csf_space.copy()
    _render_sulci(an, hu, tis, grey, brain, depth, qn, csf_space, csf_wide)
    return Slice(grid, hu, tis, np.zeros(grid.shape, dtype=np.uint8), d, qn, x, y, z, cavity, csf_space,
                  csf_wide, np.zeros(grid.shape, dtype=bool))


def _render_base(an: Anatomy, grid: Grid, hu: np.ndarray, tis: np.ndarray, xyz: tuple[np.ndarray, ...],
                 floor: np.ndarray, base_t: np.ndarray, inside: np.ndarray, outer: np.ndarray) -> None:
    """Below the cranial floors: skull base, petrous ridges, face and neck soft tissue, sinuses, orbits."""
    h, (x, y, z) = an.hu, xyz
    base_top = floor - base_t
    lower = inside & (z <= base_top)
    hu[lower], tis[lower] = h["muscle"], TISSUE["soft"]
    band = inside & (z <= floor) & (z > base_top)
    hu[band], tis[band] = h["base"], TISSUE["bone"]
    # Petrous ridge: a bony wall between the middle and posterior fossa.
    ax = np.abs(x) * np.float32(1.0 / an.a)
    off = (y * np.float32(1.0 / an.b) - np.float32(an.pet_y0) - np.float32(an.pet_m) * ax) * np.float32(an.b)
    top = np.float32(an.f_mid + 9.0 * an.k)
    width = np.float32(an.pet_w * 0.5) * (1.0 + (top - z) * np.float32(0.08))  # a pyramid, wider below
    ridge = inside & (np.abs(off) < width) & (z < top) & (z > base_top) & (ax > 0.12) & (ax < 0.95)
    hu[ridge], tis[ridge] = h["cortical"], TISSUE["bone"]
    region = outer & ((z <= floor) | ridge)
    for kind, e in an.lower:
        box = grid.box(e.center, e.radius)
        if box is None:
            continue
        f = grid.ell(e, box)
        if kind == "sinus":  # frontal sinus: air inside the frontal bone only
            m = (f < 1.0) & (tis[box] == TISSUE["bone"])
            hu[box][m], tis[box][m] = h["air"], TISSUE["air"]
            continue
        m = (f < 1.0) & region[box]
        if kind == "cells":
            cells = grid.wave_sum(an.mastoid, box) > 0.5  # mastoid or ethmoid air cells in bone
            hu[box][m] = np.where(cells, np.float32(h["air"]), np.float32(h["base"]))[m]
            tis[box][m] = np.where(cells, TISSUE["air"], TISSUE["bone"])[m]
        elif kind == "air":
            wall = (f < 1.3) & (f >= 1.0) & region[box]
            hu[box][wall], tis[box][wall] = h["base"], TISSUE["bone"]
            hu[box][m], tis[box][m] = h["air"], TISSUE["air"]
        else:
            hu[box][m], tis[box][m] = h[kind], TISSUE["fat" if kind == "fat" else "soft"]
    # Foramen magnum and upper cervical canal: CSF around the cord, ringed by bone.
    cx, cy, cr = an.canal
    box = grid.box(np.array([cx, cy, an.f_post - 30.0]), 70.0)
    if box is not None:
        r = np.hypot(x[box] - cx, y[box] - cy)
        below = (z[box] <= floor[box]) & outer[box]
        ring = below & (r >= cr) & (r < cr + 9.0) & (z[box] < an.f_post - 2.0)
        hu[box][ring], tis[box][ring] = h["base"], TISSUE["bone"]
        canal = below & (r < cr)
        hu[box][canal], tis[box][canal] = h["csf"], TISSUE["csf"]


def _render_sulci(an: Anatomy, hu: np.ndarray, tis: np.ndarray, grey_img: np.ndarray, brain: np.ndarray,
                  depth: np.ndarray, qn: tuple[np.ndarray, ...], csf_space: np.ndarray,
                  csf_wide: np.ndarray) -> None:
    """Sulci are zero crossings of a random field of the direction from the head centre, so they run
    roughly perpendicular to the surface; grey matter lines them."""
    shell = brain & (depth < an.sulc_depth + an.gm_t + 2.0)
    idx = np.flatnonzero(shell)
    if idx.size == 0:
        return
    dep = depth.ravel()[idx]
    dirs = np.stack([c.ravel()[idx] for c in qn])  # (3, m)
    w = (an.sulci.w * an.r_mean).astype(np.float32)
    f = np.zeros(idx.size, dtype=np.float32)
    for i in range(len(w)):  # float32, one wave at a time: this is the costliest step of a slice
        arg = w[i, 0] * dirs[0] + w[i, 1] * dirs[1] + w[i, 2] * dirs[2] \
            + np.float32(an.sulci.phase[i]) + np.float32(an.sulci_bend[i]) * dep
        f += np.float32(an.sulci.amp[i]) * np.cos(arg)
    # Sulcal depth varies along the surface (reusing the last wave's phase as a smooth random field).
    limit = np.float32(an.sulc_depth) * (0.7 + 0.3 * np.sin(arg))
    af = np.abs(f)
    sulcus = (af < an.sulc_thr) & (dep < limit)
    wide = (af < an.sulc_thr * 1.8 + 0.06) & (dep < limit + 1.0)
    grey = (af < an.gyr_thr) & (dep < limit + an.gm_t)
    flat_hu, flat_tis = hu.ravel(), tis.ravel()
    gi = idx[grey & ~sulcus]
    flat_hu[gi], flat_tis[gi] = grey_img.ravel()[gi], TISSUE["grey"]
    si = idx[sulcus]
    flat_hu[si], flat_tis[si] = an.hu["csf"], TISSUE["csf"]
    csf_space.ravel()[si] = True
    csf_wide.ravel()[idx[wide]] = True


def _render_deep(an: Anatomy, s: Slice) -> dict[str, tuple[tuple[slice, slice], np.ndarray]]:
    """Midline fissure and falx, deep grey nuclei, brainstem, cisterns, sylvian fissures, ventricles and
    calcifications. Returns each ventricle part's drawn mask (for intraventricular casts)."""
    g, h, k = s.grid, an.hu, an.k
    parenchyma = (s.tis == TISSUE["grey"]) | (s.tis == TISSUE["white"])
    # Interhemispheric fissure above and in front of / behind the corpus callosum, lined by cortex.
    ax = np.abs(s.x - np.float32(an.shift))
    # No fissure through the corpus callosum, the deep nuclei and the brainstem below them.
    dy = np.abs(s.y - np.float32(0.05 * an.b)) * np.float32(1.0 / (0.42 * an.b))
    dz = np.maximum(s.z - np.float32(4.0 * k), 0.0) * np.float32(1.0 / (24.0 * k))
    deep = dy * dy + dz * dz < 1.0
    fis_zone = s.cavity & ~deep
    if float(s.z.min()) < an.tentorium + 12.0 * k:  # no falx in the posterior fossa
        fis_zone &= (s.z > tentorium(an, s.x, s.y)) | (s.y < 0)
    lining = fis_zone & parenchyma & (ax < an.fissure_w / 2 + 0.5 * an.gm_t)
    s.hu[lining], s.tis[lining] = h["gm"], TISSUE["grey"]
    fissure = fis_zone & (ax < an.fissure_w / 2)
    s.hu[fissure], s.tis[fissure] = h["csf"], TISSUE["csf"]
    s.csf_space |= fissure
    s.csf_wide |= fissure
    falx = fissure & (ax < an.falx_w / 2)
    s.hu[falx], s.tis[falx] = h["falx"], TISSUE["soft"]
    s.csf_space &= ~falx
    s.csf_wide &= ~falx
    for e in an.nuclei:
        box = g.box(e.center, e.radius)
        if box is not None:
            m = (g.ell(e, box) < 1.0) & parenchyma[box]
            s.hu[box][m], s.tis[box][m] = h["nuclei"], TISSUE["grey"]
    _render_stem(an, s)
    for e in an.cisterns:
        box = g.box(e.center, e.radius)
        if box is not None:
            _mark_csf(an, s, box, (g.ell(e, box) < 1.0) & s.cavity[box])
    for p0, direction, length, width, bend in an.sylvian:
        centre = np.array([*(p0 + direction * length / 2), -14.0 * k])
        box = g.box(centre, math.hypot(length / 2, 18.0 * k))
        if box is None:
            continue
        dx, dy = s.x[box] - np.float32(p0[0]), s.y[box] - np.float32(p0[1])
        along = dx * np.float32(direction[0]) + dy * np.float32(direction[1])
        across = dy * np.float32(direction[0]) - dx * np.float32(direction[1])
        across = np.abs(across - np.float32(bend) * along * along)  # a gently curved cleft
        half = np.float32(width / 2) * (0.5 + along * np.float32(1.0 / length))  # widest at the lateral end
        zb = s.z[box]
        zone = (along > 0) & (along < length) & (zb > -26.0 * k) & (zb < -4.0 * k) & s.cavity[box]
        insula = zone & (across < half + an.gm_t) & parenchyma[box]
        s.hu[box][insula], s.tis[box][insula] = h["gm"], TISSUE["grey"]
        _mark_csf(an, s, box, zone & (across < half))
    parts: dict[str, tuple[tuple[slice, slice], np.ndarray]] = {}
    for name, e in an.ventricles.items():
        box = g.box(e.center, e.radius)
        if box is None:
            continue
        m = (g.ell(e, box) < 1.0) & s.cavity[box]
        s.hu[box][m], s.tis[box][m] = h["csf"], TISSUE["ventricle"]
        s.vent[box] |= m
        s.csf_space[box] &= ~m
        s.csf_wide[box] &= ~m
        parts[name] = (box, m)
    for e in an.calcs:
        box = g.box(e.center, e.radius)
        if box is not None:
            m = (g.ell(e, box) < 1.0) & s.cavity[box]
            s.hu[box][m], s.tis[box][m] = h["calc"], TISSUE["calcification"]
            s.vent[box] &= ~m
    return parts


def _mark_csf(an: Anatomy, s: Slice, box: tuple[slice, slice], m: np.ndarray) -> None:
    s.hu[box][m], s.tis[box][m] = an.hu["csf"], TISSUE["csf"]
    s.csf_space[box] |= m
    s.csf_wide[box] |= m


def _render_stem(an: Anatomy, s: Slice) -> None:
    """Brainstem (an elliptic column) with the perimesencephalic CSF ring, continuing as the cord."""
    cx, cy, rx, ry = an.stem
    box = s.grid.box(np.array([cx, cy, an.f_post - 20.0]), 60.0 + 30.0 * an.k)
    if box is None:
        return
    ex = (s.x[box] - np.float32(cx)) * np.float32(1 / rx)
    ey = (s.y[box] - np.float32(cy)) * np.float32(1 / ry)
    e2 = ex * ex + ey * ey
    zb = s.z[box]
    top = -8.0 * an.k
    ring = (e2 < (1.0 + 3.0 / rx) ** 2) & (zb < top + 4.0) & (zb > -26.0 * an.k) & s.cavity[box]
    _mark_csf(an, s, box, ring)
    stem = (e2 < 1.0) & (zb < top) & s.cavity[box]
    s.hu[box][stem], s.tis[box][stem] = an.hu["stem"], TISSUE["brainstem"]
    s.csf_space[box] &= ~stem
    s.csf_wide[box] &= ~stem
    cord = (e2 < (6.0 / rx) ** 2) & (zb < an.f_post) & (s.tis[box] == TISSUE["csf"]) & ~s.cavity[box]
    s.hu[box][cord], s.tis[box][cord] = an.hu["cord"], TISSUE["brainstem"]


def render_slice(an: Anatomy, geo: Geometry, lesions: Sequence[Lesion], k: int,
                  offsets: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Noise-free HU, tissue codes and lesion bits of slice k (full frame). Several offsets along the normal
    average into one slice, as a thick CT slice averages what it spans (partial volume); tissue codes
    come from the first plane, lesion bits from any."""
    size = geo.size
    hu = np.zeros((size, size), dtype=np.float32)
    tis = np.zeros((size, size), dtype=np.uint8)
    bits = np.zeros((size, size), dtype=np.uint8)
    for i, offset in enumerate(offsets):
        plane = np.full((size, size), an.hu["air"], dtype=np.float32)
        q0, ei, ej = geo.head_plane(k, offset)
        crop = _crop(an, q0, ei, ej, size)
        if crop is not None:
            s = _render_head(an, Grid(q0, ei, ej, crop[0], crop[1], geo.ps))
            parts = _render_deep(an, s)
            render_lesions(an, s, lesions, parts)
            plane[crop] = s.hu
            bits[crop] |= s.bits
            if i == 0:
                tis[crop] = s.tis
        hu += plane
    hu *= np.float32(1.0 / len(offsets))
    render_support(geo, k, hu, tis)
    return hu, tis, bits


def min_pixels(ps: float) -> int:
    return max(2, int(round(MIN_LESION_MM2 / (ps * ps))))


def labels_from_bits(bits: np.ndarray, min_px: int) -> np.ndarray:
    """Six labels of a slice; bits of subtypes below min_px are cleared so masks and labels agree."""
    out = np.zeros(len(CLASSES), dtype=np.uint8)
    if not bits.any():
        return out
    for k in range(len(SUBTYPES)):
        bit = np.uint8(1 << k)
        hit = (bits & bit) != 0
        if np.count_nonzero(hit) >= min_px:
            out[1 + k] = 1
        else:
            bits[hit] &= ~bit
    out[0] = out[1:].max()
    return out
