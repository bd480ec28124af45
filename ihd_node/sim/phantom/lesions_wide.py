"""Lesions of the randomized phantoms (wide.py): the same compartments as lesions.py, with wider density,
size, shape, texture and position within each compartment.

- intraparenchymal: one to three overlapping lobed clots, 3-50 mm, anywhere in the parenchyma, often
  right against a ventricle (the wall stops the blood), with or without oedema;
- intraventricular: layering in any part of the ventricles (not only the occipital horns), casts of one
  to four parts, casts cut by a plane (partial filling), small or large amounts;
- epidural, subdural, subarachnoid: lesions.py's shapes with 30-90 HU and fine texture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ihd_node.sim.phantom.head import Anatomy, Ellipsoid, Waves, uniform
from ihd_node.sim.phantom.lesions import (
    Lesion,
    _Blob,
    _covered,
    _in_ventricle,
    _place_subarachnoid,
    _place_surface,
    _point_fields,
    _slices_between,
    _Ventricular,
    with_mass_effect,
)
from ihd_node.sim.phantom.scanner import Geometry
from ihd_node.sim.phantom.wide import Wide


def _support(e: Ellipsoid, direction: np.ndarray) -> float:
    """How far the ellipsoid reaches from its centre along a unit direction."""
    inv = np.linalg.inv(e.m.T @ e.m)
    return float(math.sqrt(max(float(direction @ inv @ direction), 1e-9)))


def _clot_centre(rng: np.random.Generator, an: Anatomy, geo: Geometry, reach: float,
                 near_ventricle: bool) -> np.ndarray | None:
    ks = _slices_between(geo, an.f_post + 6.0, an.c_up - 10.0)
    names = [n for n, e in an.ventricles.items() if _covered(geo, e.center, e.radius)]
    for attempt in range(200):
        if near_ventricle and names and attempt < 60:  # against a ventricle wall, on any side
            e = an.ventricles[str(rng.choice(names))]
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            centre = e.center + u * (_support(e, u) + reach * uniform(rng, 0.3, 0.9))
            if not _covered(geo, centre, reach * 0.6):
                continue
        elif rng.uniform() < 0.25 and attempt < 100:  # deep grey nuclei
            centre = an.nuclei[int(rng.integers(len(an.nuclei)))].center + rng.normal(0.0, 5.0, 3)
            if not _covered(geo, centre, reach * 0.5):
                continue
        else:
            if not ks:
                return None
            k = int(rng.choice(ks))
            r, phi = an.a * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            centre = geo.head_point_on_slice(k, r * math.cos(phi), r * math.sin(phi) * an.b / an.a)
        d, floor, _ = _point_fields(an, centre)
        # Lobar clots may come close to the cortex, never past the inner table; the centre is parenchyma.
        if d > -(0.6 * reach + 4.0) or centre[2] < floor + 0.5 * reach + 3.0 or _in_ventricle(an, centre, 0.5):
            continue
        return centre
    return None


def _place_clot(rng: np.random.Generator, an: Anatomy, geo: Geometry, wide: Wide,
                near_ventricle: bool) -> list[_Blob]:
    size = float(np.exp(rng.uniform(math.log(3.5), math.log(24.0))))  # 7-50 mm across, many small
    semi = size * rng.uniform(0.5, 1.0, size=3)
    lobes = Waves.draw(rng, int(rng.integers(3, 7)), (1.0, 3.5), uniform(rng, 0.03, 0.2))
    rim = uniform(rng, 1.0, 8.0) if rng.uniform() < 0.5 else 0.0
    reach = float(semi.max()) * (1.0 + float(lobes.amp.sum()))
    centre = _clot_centre(rng, an, geo, reach, near_ventricle)
    if centre is None:
        return []
    hu, mottle = wide.lesion_hu(rng), wide.mottle(rng)
    blobs = [_Blob(hu, Ellipsoid.make(centre, semi, uniform(rng, 0.0, 180.0)), lobes, rim, mottle)]
    for _ in range(int(rng.choice([0, 0, 1, 2]))):  # irregular: overlapping satellite lobes
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        sub = semi * rng.uniform(0.35, 0.8, size=3)
        c2 = centre + u * float(semi.min()) * uniform(rng, 0.5, 1.0)
        if _point_fields(an, c2)[0] < -3.0 and not _in_ventricle(an, c2, 0.0):
            blobs.append(_Blob(hu, Ellipsoid.make(c2, sub, uniform(rng, 0.0, 180.0)),
                               Waves.draw(rng, 3, (1.0, 3.0), uniform(rng, 0.03, 0.15)), 0.0, mottle))
    return blobs


def _place_ventricular(rng: np.random.Generator, an: Anatomy, geo: Geometry, wide: Wide) -> _Ventricular | None:
    gravity = geo.pose.T @ np.array([0.0, 1.0, 0.0])  # supine: the dependent side is posterior
    covered = [n for n, e in an.ventricles.items() if _covered(geo, e.center, e.radius * 0.5)]
    if not covered:
        return None
    mode = rng.uniform()
    level, layer_parts = None, None
    if mode < 0.6:  # layering: a fluid level in one or several parts, any of them
        chosen = [str(n) for n in rng.choice(covered, size=int(rng.integers(1, min(4, len(covered)) + 1)),
                                             replace=False)]
        e = an.ventricles[chosen[0]]
        reach = _support(e, gravity)
        level = float(gravity @ e.center) + reach - uniform(rng, 1.5, max(2.0, 1.6 * reach))
        layer_parts = tuple(chosen) if rng.uniform() < 0.7 else None
    casts: tuple[str, ...] = ()
    clips: dict[str, tuple[np.ndarray, float]] = {}
    if level is None or rng.uniform() < 0.4:
        casts = tuple(str(n) for n in rng.choice(covered, size=int(rng.integers(1, min(4, len(covered)) + 1)),
                                                replace=False))
        for name in casts:
            if rng.uniform() < 0.5:  # a partial cast: the part filled on one side of a plane
                normal = rng.normal(size=3)
                normal /= np.linalg.norm(normal)
                e = an.ventricles[name]
                clips[name] = (normal, float(normal @ e.center) + _support(e, normal) * uniform(rng, -0.6, 0.5))
    return _Ventricular(wide.lesion_hu(rng), gravity, level, casts, layer_parts, clips, wide.mottle(rng))


def draw_wide_lesions(rng: np.random.Generator, an: Anatomy, geo: Geometry, subtypes: Sequence[str],
                      mass_effect: bool | None, wide: Wide) -> list[Lesion]:
    lesions: list[Lesion] = []
    both = "intraventricular" in subtypes and "intraparenchymal" in subtypes
    for subtype in subtypes:
        if subtype in ("epidural", "subdural"):
            found = [_place_surface(rng, an, geo, subtype)]
            if found[0] is not None and subtype == "subdural" and rng.uniform() < 0.2:
                found.append(_place_surface(rng, an, geo, subtype, side=-found[0].side))
            for les in found:
                if les is not None:
                    les.hu = wide.lesion_hu(rng)
                    lesions.append(les)
        elif subtype == "intraparenchymal":
            near = rng.uniform() < (0.7 if both else wide.periventricular)  # with IVH: often an extension
            for i in range(1 if rng.uniform() < 0.8 else 2):
                lesions += _place_clot(rng, an, geo, wide, near and i == 0)
        elif subtype == "intraventricular":
            les = _place_ventricular(rng, an, geo, wide)
            lesions += [les] if les is not None else []
        else:
            sah = _place_subarachnoid(rng, an, geo)
            if sah is not None:
                sah.hu = wide.lesion_hu(rng)
                lesions.append(sah)
    return with_mass_effect(rng, an, lesions, mass_effect)
