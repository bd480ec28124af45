"""Hemorrhage: the lesion shapes, where they are placed in the head, and how they are painted into a
slice."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ihd_node.classes import SUBTYPES
from ihd_node.sim.phantom.head import Anatomy, Ellipsoid, Waves, cavity_shape, cranial_floor, ramp, uniform
from ihd_node.sim.phantom.scanner import Geometry, Slice
from ihd_node.sim.phantom.series import TISSUE


@dataclass
class _Surface:
    """Epidural or subdural: blood between the inner table and a surface pushed in toward the brain."""

    subtype: str
    hu: float
    direction: np.ndarray  # unit vector in normalised ellipsoid coordinates at the lesion centre
    t_max: float  # mm, thickest point
    extent: float  # mm along the surface from the centre to the edge
    power: float  # 2: biconvex lens (epidural); 4: flat crescent (subdural)
    side: float  # sign of x; the falx stops both kinds at the midline
    sutures: tuple[float | None, float | None]  # y limits (mm) an epidural cannot cross


@dataclass
class _Blob:
    """Intraparenchymal: an irregular ellipsoid, optionally with an oedema rim."""

    subtype: ClassVar[str] = "intraparenchymal"

    hu: float
    ell: Ellipsoid
    lobes: Waves
    rim: float  # mm of surrounding oedema (0: none)
    mottle: Waves | None = None  # fine texture (randomized phantoms only)


@dataclass
class _Ventricular:
    """Intraventricular: dependent layering (blood below a level in the patient's y) and casts."""

    subtype: ClassVar[str] = "intraventricular"

    hu: float
    gravity: np.ndarray  # the patient's posterior direction (down, supine) in the head frame
    level: float | None  # blood where gravity . p > level (None: casts only)
    casts: tuple[str, ...]
    # Randomized phantoms only: the parts the layering reaches (None: all), casts cut by a plane
    # (part, unit normal, offset: blood where normal . p > offset), and fine texture.
    layer_parts: tuple[str, ...] | None = None
    clips: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)
    mottle: Waves | None = None


@dataclass
class _Subarachnoid:
    """Subarachnoid: the CSF spaces (sulci, cisterns, fissures) inside some spheres, patchily filled."""

    subtype: ClassVar[str] = "subarachnoid"

    hu: float
    seeds: list[tuple[np.ndarray, float]]
    patch: Waves


Lesion = _Surface | _Blob | _Ventricular | _Subarachnoid


def _plane_distances(geo: Geometry, point: np.ndarray) -> np.ndarray:
    """Signed distance (mm) from a head-frame point to every slice plane."""
    n_h = geo.pose.T @ geo.normal
    return float(point @ n_h) - geo.levels * n_h[2]


def _covered(geo: Geometry, point: np.ndarray, radius: float) -> bool:
    return bool(np.min(np.abs(_plane_distances(geo, point))) < radius)


def _slices_between(geo: Geometry, lo: float, hi: float) -> list[int]:
    return [k for k, z in enumerate(geo.levels) if lo <= z <= hi]


def _point_fields(an: Anatomy, p: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(d, floor height, unit direction) at one head-frame point."""
    x, y, z = (np.array([v], dtype=np.float32) for v in p)
    qx, qy, qz, g, d = cavity_shape(an, x, y, z)
    floor = cranial_floor(an, x, y)[0]
    return float(d[0]), float(floor[0]), np.array([qx[0], qy[0], qz[0]], dtype=np.float64) / float(g[0])


def _inner_table_point(an: Anatomy, geo: Geometry, k: int, phi: float) -> np.ndarray | None:
    """Where the ray from the head axis at angle phi (head x-y plane) meets the inner table on slice k."""
    def at(r: float) -> np.ndarray:
        return geo.head_point_on_slice(k, r * math.cos(phi), r * math.sin(phi))

    if _point_fields(an, at(0.0))[0] >= 0:
        return None
    lo, hi = 0.0, 250.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _point_fields(an, at(mid))[0] < 0 else (lo, mid)
    p = at(lo)
    _, floor, _ = _point_fields(an, p)
    return p if p[2] > floor + 6.0 else None


def _place_surface(rng: np.random.Generator, an: Anatomy, geo: Geometry, subtype: str,
                  side: float | None = None) -> _Surface | None:
    ks = _slices_between(geo, an.f_mid + 6.0 * an.k, an.c_up - 12.0)
    for _ in range(60):
        if not ks:
            return None
        k = int(rng.choice(ks))
        sd = float(rng.choice([-1.0, 1.0])) if side is None else side
        # Mostly over the lateral convexity (temporal/parietal), sometimes frontal or occipital.
        phi = (0.0 if sd > 0 else math.pi) + sd * math.radians(uniform(rng, -75.0, 75.0))
        p = _inner_table_point(an, geo, k, phi)
        if p is None or abs(p[0]) < 12.0:
            continue
        _, _, direction = _point_fields(an, p)
        if subtype == "epidural":
            coronal, lambdoid = -uniform(rng, 0.1, 0.25) * an.b, uniform(rng, 0.4, 0.6) * an.b
            if p[1] < coronal:
                lo, hi = None, coronal
            else:
                lo, hi = (coronal, lambdoid) if p[1] < lambdoid else (lambdoid, None)
            lo = None if lo is None else min(lo, p[1] - 14.0)
            hi = None if hi is None else max(hi, p[1] + 14.0)
            return _Surface("epidural", uniform(rng, 58.0, 85.0), direction, uniform(rng, 8.0, 24.0),
                            uniform(rng, 20.0, 38.0), 2.0, math.copysign(1.0, p[0]), (lo, hi))
        return _Surface("subdural", uniform(rng, 55.0, 82.0), direction, uniform(rng, 3.0, 12.0),
                        uniform(rng, 45.0, 90.0), uniform(rng, 3.0, 6.0), math.copysign(1.0, p[0]), (None, None))
    return None


def _in_ventricle(an: Anatomy, p: np.ndarray, margin: float) -> bool:
    for e in an.ventricles.values():
        q = e.m @ (p - e.center)
        if float(q @ q) < (1.0 + margin / e.radius) ** 2:
            return True
    return False


def _place_blob(rng: np.random.Generator, an: Anatomy, geo: Geometry) -> _Blob | None:
    semi = rng.uniform(6.0, 20.0) * rng.uniform(0.7, 1.0, size=3)  # 10-40 mm across
    rim = uniform(rng, 2.0, 6.0) if rng.uniform() < 0.6 else 0.0
    lobes = Waves.draw(rng, 4, (1.5, 3.0), uniform(rng, 0.05, 0.12))
    reach = float(semi.max()) * (1.0 + float(lobes.amp.sum())) + rim
    ks = _slices_between(geo, an.f_post + 8.0, an.c_up - 15.0)
    site = rng.uniform()
    for attempt in range(200):
        if site < 0.4 and attempt < 20:  # basal ganglia / thalamus, the classic hypertensive sites
            centre = an.nuclei[int(rng.integers(len(an.nuclei)))].center + rng.normal(0.0, 3.0, 3)
            if not _covered(geo, centre, float(semi.min()) * 0.4):
                continue
        else:  # lobar or cerebellar: anywhere deep enough in the parenchyma on a covered slice
            if not ks:
                return None
            k = int(rng.choice(ks))
            r, phi = an.a * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            centre = geo.head_point_on_slice(k, r * math.cos(phi), r * math.sin(phi) * an.b / an.a)
        d, floor, _ = _point_fields(an, centre)
        if d > -(reach + 6.0) or centre[2] < floor + reach + 3.0 or _in_ventricle(an, centre, 3.0):
            continue
        return _Blob(uniform(rng, 58.0, 85.0), Ellipsoid.make(centre, semi, uniform(rng, 0.0, 180.0)), lobes, rim)
    return None


def _place_ventricular(rng: np.random.Generator, an: Anatomy, geo: Geometry) -> _Ventricular | None:
    gravity = geo.pose.T @ np.array([0.0, 1.0, 0.0])  # supine: the dependent side is posterior
    covered = [n for n, e in an.ventricles.items() if _covered(geo, e.center, e.radius * 0.6)]
    horns = [an.ventricles[n] for n in covered if n.startswith(("occipital", "atrium"))]
    if not covered:
        return None
    level = None
    if horns and rng.uniform() < 0.8:
        deepest = max(float(gravity @ e.center) + e.radius * 0.5 for e in horns)
        level = deepest - uniform(rng, 4.0, 14.0)
    casts: tuple[str, ...] = ()
    if level is None or rng.uniform() < 0.35:
        casts = (str(rng.choice(covered)),)
    return _Ventricular(uniform(rng, 55.0, 82.0), gravity, level, casts)


def _place_subarachnoid(rng: np.random.Generator, an: Anatomy, geo: Geometry) -> _Subarachnoid | None:
    k = an.k
    seeds: list[tuple[np.ndarray, float]] = []
    basal = np.array([0.0, -13.0 * k, -20.0 * k])
    if rng.uniform() < 0.55 and _covered(geo, basal, 12.0):  # aneurysmal pattern: basal cisterns and fissures
        seeds.append((basal, uniform(rng, 22.0, 32.0) * k))
        for p0, direction, length, _, _ in an.sylvian:
            if rng.uniform() < 0.75:
                mid = p0 + direction * length * uniform(rng, 0.3, 0.7)
                seeds.append((np.array([mid[0], mid[1], -12.0 * k]), uniform(rng, 16.0, 26.0)))
    ks = _slices_between(geo, an.f_ant, an.c_up - 8.0)
    tries = 0
    while len(seeds) < (1 if seeds else int(rng.integers(1, 3))) and ks and tries < 60:  # convexity
        tries += 1
        phi = rng.uniform(0, 2 * math.pi)
        p = _inner_table_point(an, geo, int(rng.choice(ks)), phi)
        if p is not None:
            seeds.append((p, uniform(rng, 18.0, 32.0)))
    if not seeds:
        return None
    return _Subarachnoid(uniform(rng, 55.0, 82.0), seeds, Waves.draw(rng, 2, (12.0, 30.0), 0.5))


def _mass_effect(an: Anatomy, side: float, amount: float) -> None:
    """Push the midline away from a lesion and squeeze the ventricle on its side."""
    an.shift = -side * amount
    squeeze = np.diag([1.0 / 0.65, 1.0, 1.0])
    for name, e in list(an.ventricles.items()):
        centre = e.center + np.array([an.shift, 0.0, 0.0])
        m = squeeze @ e.m if name.endswith(f"{side:+.0f}") else e.m
        an.ventricles[name] = Ellipsoid(centre, m, e.radius)
    move = np.array([an.shift, 0.0, 0.0])
    an.calcs = [Ellipsoid(e.center + move, e.m, e.radius) for e in an.calcs]
    an.nuclei = [Ellipsoid(e.center + move * 0.6, e.m, e.radius) for e in an.nuclei]


def draw_lesions(rng: np.random.Generator, an: Anatomy, geo: Geometry, subtypes: Sequence[str],
                  mass_effect: bool | None) -> list[Lesion]:
    lesions: list[Lesion] = []
    for subtype in subtypes:
        if subtype in ("epidural", "subdural"):
            les = _place_surface(rng, an, geo, subtype)
            if les is not None and subtype == "subdural" and rng.uniform() < 0.15:
                other = _place_surface(rng, an, geo, subtype, side=-les.side)
                lesions += [other] if other is not None else []
        elif subtype == "intraparenchymal":
            les = _place_blob(rng, an, geo)
            if les is not None and rng.uniform() < 0.15:
                second = _place_blob(rng, an, geo)
                lesions += [second] if second is not None else []
        elif subtype == "intraventricular":
            les = _place_ventricular(rng, an, geo)
        else:
            les = _place_subarachnoid(rng, an, geo)
        if les is not None:
            lesions.append(les)
    return with_mass_effect(rng, an, lesions, mass_effect)


def with_mass_effect(rng: np.random.Generator, an: Anatomy, lesions: list[Lesion],
                     mass_effect: bool | None) -> list[Lesion]:
    """A big surface bleed or clot pushes the midline (60 % of the time unless `mass_effect` says)."""
    big = [x for x in lesions
           if (isinstance(x, _Surface) and x.t_max > (14.0 if x.subtype == "epidural" else 8.0))
           or (isinstance(x, _Blob) and x.ell.radius > 12.0)]
    if big and (rng.uniform() < 0.6 if mass_effect is None else mass_effect):
        les = big[0]
        side = les.side if isinstance(les, _Surface) else math.copysign(1.0, les.ell.center[0])
        _mass_effect(an, side, uniform(rng, 2.0, 9.0))
    return lesions


def _paint(an: Anatomy, s: Slice, box: tuple[slice, slice] | None, m: np.ndarray, hu: float, subtype: str,
           tissue: str = "blood", mottle: Waves | None = None) -> None:
    """Blood (with a little texture) where m; the pixel's mask bit becomes this subtype's only."""
    box = box or (slice(None), slice(None))
    tex = s.grid.wave_sum(an.texture, box) if tissue == "blood" else 0.0
    if mottle is not None and tissue == "blood":
        tex = tex + 0.5 * s.grid.wave_sum(mottle, box)
    # 50-90 HU for the default lesions (55-85 HU drawn); randomized ones reach down to 30 HU.
    lo, hi = min(50.0, hu - 8.0), max(90.0, hu + 8.0)
    val = np.clip(np.float32(hu) + 2.0 * tex, lo, hi) if tissue == "blood" else np.float32(hu)
    s.hu[box][m] = (val[m] if isinstance(val, np.ndarray) else val)
    s.tis[box][m] = TISSUE[tissue]
    if tissue == "blood":
        s.bits[box][m] = 1 << SUBTYPES.index(subtype)


def render_lesions(an: Anatomy, s: Slice, lesions: Sequence[Lesion],
                    parts: dict[str, tuple[tuple[slice, slice], np.ndarray]]) -> None:
    """Paint the lesions; later ones win overlaps, in the order SAH, IVH, IPH, SDH, EDH."""
    order = ("subarachnoid", "intraventricular", "intraparenchymal", "subdural", "epidural")
    for les in sorted(lesions, key=lambda x: order.index(x.subtype)):
        if isinstance(les, _Subarachnoid):
            _draw_sah(an, s, les)
        elif isinstance(les, _Ventricular):
            _draw_ivh(an, s, les, parts)
        elif isinstance(les, _Blob):
            _draw_iph(an, s, les)
        else:
            _draw_surface(an, s, les)


def _draw_sah(an: Anatomy, s: Slice, les: _Subarachnoid) -> None:
    for centre, radius in les.seeds:
        box = s.grid.box(centre, radius)
        if box is None:
            continue
        r2 = (s.x[box] - np.float32(centre[0])) ** 2 + (s.y[box] - np.float32(centre[1])) ** 2 \
            + (s.z[box] - np.float32(centre[2])) ** 2
        patch = s.grid.wave_sum(les.patch, box) > -0.35
        m = s.csf_wide[box] & (r2 < radius * radius) & patch & ~s.vent[box] & s.cavity[box]
        _paint(an, s, box, m, les.hu, "subarachnoid")


def _draw_ivh(an: Anatomy, s: Slice, les: _Ventricular,
              parts: dict[str, tuple[tuple[slice, slice], np.ndarray]]) -> None:
    for name, (box, m) in parts.items():
        blood = m & (s.tis[box] == TISSUE["ventricle"])
        if name not in les.casts:
            if les.level is None or (les.layer_parts is not None and name not in les.layer_parts):
                continue
            blood &= s.grid.lin(les.gravity, 0.0, box) > les.level
        elif name in les.clips:
            normal, offset = les.clips[name]
            blood &= s.grid.lin(normal, 0.0, box) > offset
        _paint(an, s, box, blood, les.hu, "intraventricular", mottle=les.mottle)


def _draw_iph(an: Anatomy, s: Slice, les: _Blob) -> None:
    e = les.ell
    reach = e.radius * (1.0 + float(les.lobes.amp.sum())) + les.rim
    box = s.grid.box(e.center, reach)
    if box is None:
        return
    q = [s.grid.lin(row, -float(row @ e.center), box) for row in e.m]
    rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) + np.float32(1e-6)
    u = np.stack([c / rho for c in q])  # unit direction from the centre, in the blob's own frame
    w, phase = les.lobes.w.astype(np.float32), les.lobes.phase.astype(np.float32)
    arg = np.tensordot(w, u, 1) + phase[:, None, None]
    bound = 1.0 + (les.lobes.amp[:, None, None] * np.cos(arg)).sum(axis=0)
    allowed = s.cavity[box] & ~s.vent[box] & (s.tis[box] != TISSUE["bone"])
    blood = (rho < bound) & allowed
    if les.rim > 0:
        mean_r = 1.0 / float(np.mean(np.linalg.norm(e.m, axis=1)))
        rim = (rho < bound + les.rim / mean_r) & ~blood & allowed & (s.tis[box] != TISSUE["csf"])
        _paint(an, s, box, rim, an.hu["edema"], "intraparenchymal", "edema")
    _paint(an, s, box, blood, les.hu, "intraparenchymal", mottle=les.mottle)


def _draw_surface(an: Anatomy, s: Slice, les: _Surface) -> None:
    zone = s.cavity & (s.d > -les.t_max) & (s.x * np.float32(les.side) > -2.0)
    idx = np.flatnonzero(zone)
    if idx.size == 0:
        return
    cosang = sum(s.qn[c].ravel()[idx] * np.float32(les.direction[c]) for c in range(3))
    rho = np.arccos(np.clip(cosang, -1.0, 1.0)) * np.float32(an.r_mean)
    thick = les.t_max * np.clip(1.0 - (rho / np.float32(les.extent)) ** les.power, 0.0, None)
    # The falx stops both kinds at the midline; an epidural stops at the sutures.
    thick = thick * ramp((s.x.ravel()[idx] - np.float32(an.shift)) * np.float32(les.side / 3.0))
    y = s.y.ravel()[idx]
    lo, hi = les.sutures
    if lo is not None:
        thick = thick * ramp((y - np.float32(lo)) * np.float32(1 / 3.0))
    if hi is not None:
        thick = thick * ramp((np.float32(hi) - y) * np.float32(1 / 3.0))
    inside = -s.d.ravel()[idx] < thick
    m = np.zeros(s.hu.size, dtype=bool)
    m[idx[inside]] = True
    _paint(an, s, None, m.reshape(s.hu.shape), les.hu, les.subtype)
