"""The analytic head: random shape primitives and one head's anatomy (skull, floors, tentorium,
deep structures) in the head frame, in millimetres and HU."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def ramp(v: np.ndarray) -> np.ndarray:
    return np.clip(v, 0.0, 1.0)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in the head frame, optionally turned about z."""

    center: np.ndarray
    m: np.ndarray  # rows: linear maps head mm -> normalised local coordinates
    radius: float  # bounding sphere, for culling

    @staticmethod
    def make(center: Sequence[float], semi: Sequence[float], yaw_deg: float = 0.0) -> Ellipsoid:
        semi_a = np.asarray(semi, dtype=np.float64)
        m = np.diag(1.0 / semi_a) @ rot_z(math.radians(yaw_deg)).T
        return Ellipsoid(np.asarray(center, dtype=np.float64), m, float(semi_a.max()))


@dataclass(frozen=True)
class Waves:
    """A sum of plane waves cos(w . p + phase): smooth 3-D random textures."""

    w: np.ndarray  # (k, 3) rad/mm
    phase: np.ndarray  # (k,)
    amp: np.ndarray  # (k,)

    @staticmethod
    def draw(rng: np.random.Generator, k: int, wavelength: tuple[float, float], amp: float) -> Waves:
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lengths = rng.uniform(*wavelength, size=k)
        return Waves(dirs * (2 * np.pi / lengths)[:, None], rng.uniform(0, 2 * np.pi, k), np.full(k, amp))


@dataclass
class Anatomy:
    """All random parameters of one head (mm, HU). Built once per series by draw_anatomy."""

    a: float  # inner-table semi-axis, left-right
    b: float  # inner-table semi-axis, anterior-posterior
    c_up: float  # equator to inner vertex
    c_low: float  # ellipsoid semi-axis below the equator (the floors cut it)
    egg: float  # frontal narrower than occipital
    shear: float  # plagiocephaly
    t_mean: float
    t_ap: float
    t_temp: float
    t_inner: float
    t_outer: float
    scalp: float
    temporalis: float
    fat_layer: bool
    csf_t: float  # subarachnoid space over the convexity
    gm_t: float  # cortical ribbon
    sulc_depth: float
    sulc_thr: float
    gyr_thr: float
    sulci: Waves
    sulci_bend: np.ndarray  # rad/mm per wave: sulci wander with depth
    f_ant: float
    f_mid: float
    f_post: float
    sella_rise: float
    sph_y: float
    pet_y0: float
    pet_m: float
    base_t: float
    pet_w: float
    tentorium: float
    texture: Waves
    mastoid: Waves
    hu: dict[str, float]
    shift: float = 0.0  # midline shift (mass effect), + = toward the patient's left
    nuclei: list[Ellipsoid] = field(default_factory=list)
    ventricles: dict[str, Ellipsoid] = field(default_factory=dict)
    cisterns: list[Ellipsoid] = field(default_factory=list)
    calcs: list[Ellipsoid] = field(default_factory=list)
    lower: list[tuple[str, Ellipsoid]] = field(default_factory=list)
    stem: tuple[float, float, float, float] = (0.0, 8.0, 12.0, 10.0)  # x, y, rx, ry of the brainstem
    sylvian: list[tuple[np.ndarray, np.ndarray, float, float, float]] = field(default_factory=list)
    fissure_w: float = 1.5
    falx_w: float = 1.0
    canal: tuple[float, float, float] = (0.0, 10.0, 15.0)  # x, y, radius of the foramen magnum

    @property
    def k(self) -> float:
        return self.b / 85.0

    @property
    def r_mean(self) -> float:
        return (self.a + self.b) / 2.0

    @property
    def vertex(self) -> float:
        """Top of the scalp above the equator."""
        return self.c_up + self.t_mean + self.t_ap + self.scalp


def draw_anatomy(rng: np.random.Generator, wide: Any = None) -> Anatomy:
    """One random head; `wide` (a wide.Wide) stretches the ranges without changing what rng draws."""
    a = uniform(rng, 60.0, 76.0)
    b = float(np.clip(a * uniform(rng, 1.1, 1.3), 72.0, 95.0))
    c_up = a * uniform(rng, 0.85, 1.0)
    if wide is not None:
        ratio, height = b / a, c_up / a
        a = float(np.clip(a * wide.head_scale, 50.0, 88.0))
        b = float(np.clip(a * ratio * wide.aspect, 62.0, 108.0))
        c_up = a * height * wide.height
    k = b / 85.0
    atrophy = float(rng.uniform() ** 1.5)  # older brains: wider sulci, bigger ventricles
    sulc_w = 0.9 + 1.6 * atrophy  # mm
    hu = _draw_hu(rng)
    an = Anatomy(
        a=a, b=b, c_up=c_up, c_low=c_up * uniform(rng, 1.45, 1.7), egg=uniform(rng, 0.0, 0.12),
        shear=uniform(rng, -0.04, 0.04),
        t_mean=uniform(rng, 5.0, 7.5), t_ap=uniform(rng, 1.0, 3.0), t_temp=uniform(rng, 1.5, 3.0),
        t_inner=uniform(rng, 1.3, 2.2), t_outer=uniform(rng, 1.5, 2.5), scalp=uniform(rng, 3.0, 6.0),
        temporalis=uniform(rng, 2.0, 7.0), fat_layer=bool(rng.uniform() < 0.5),
        csf_t=uniform(rng, 0.3, 0.9) + 1.8 * atrophy, gm_t=uniform(rng, 2.2, 3.2), sulc_depth=uniform(rng, 9.0, 17.0),
        sulc_thr=0.1 * sulc_w, gyr_thr=0.1 * sulc_w + uniform(rng, 0.45, 0.6),
        sulci=Waves.draw(rng, 10, (13.0, 22.0), 1.0 / math.sqrt(5.0)),
        sulci_bend=rng.uniform(-0.25, 0.25, 10),
        f_ant=-uniform(rng, 18.0, 25.0) * k, f_mid=-uniform(rng, 38.0, 45.0) * k, f_post=-uniform(rng, 54.0, 61.0) * k,
        sella_rise=uniform(rng, 8.0, 13.0) * k, sph_y=-uniform(rng, 0.28, 0.36), pet_y0=-uniform(rng, 0.08, 0.15),
        pet_m=uniform(rng, 0.25, 0.4), base_t=uniform(rng, 5.0, 9.0), pet_w=uniform(rng, 7.0, 11.0) * k,
        tentorium=-uniform(rng, 16.0, 24.0) * k,
        texture=Waves.draw(rng, 4, (12.0, 40.0), uniform(rng, 0.4, 0.6)),
        mastoid=Waves.draw(rng, 5, (3.0, 6.0), 0.5), hu=hu, fissure_w=uniform(rng, 0.8, 1.6) + 2.0 * atrophy,
        falx_w=uniform(rng, 0.7, 1.3),
    )
    if wide is not None:
        an.t_mean *= wide.skull
        an.t_inner, an.t_outer = an.t_inner * min(wide.skull, 1.2), an.t_outer * min(wide.skull, 1.2)
        for tissue in ("gm", "wm", "cereb", "stem", "nuclei", "cord"):
            an.hu[tissue] += wide.brain_hu
    _add_deep_structures(an, rng, atrophy, wide)
    _add_lower_structures(an, rng)
    return an


def _draw_hu(rng: np.random.Generator) -> dict[str, float]:
    gm = uniform(rng, 36.0, 42.0)
    wm = min(uniform(rng, 26.5, 30.5), gm - 7.0)
    return {
        "air": uniform(rng, -1004.0, -994.0), "scalp": uniform(rng, 32.0, 52.0),
        "fat": uniform(rng, -105.0, -70.0), "muscle": uniform(rng, 42.0, 58.0),
        "cortical": uniform(rng, 1350.0, 1750.0), "diploe": uniform(rng, 800.0, 1000.0),
        "base": uniform(rng, 1000.0, 1500.0), "gm": gm, "wm": wm, "csf": uniform(rng, 3.0, 12.0),
        "cereb": gm - uniform(rng, 1.0, 4.0), "stem": wm + uniform(rng, 2.0, 5.0),
        "nuclei": gm - uniform(rng, 0.0, 3.0),
        "falx": uniform(rng, 48.0, 70.0), "calc": uniform(rng, 110.0, 300.0), "globe": uniform(rng, 8.0, 18.0),
        "edema": uniform(rng, 12.0, 20.0), "cord": wm + uniform(rng, 2.0, 6.0),
    }


def _add_deep_structures(an: Anatomy, rng: np.random.Generator, atrophy: float, wide: Any = None) -> None:
    """Ventricles, deep grey nuclei, cisterns and calcifications, scaled to the head."""
    sx, sy, sz = an.a / 68.0, an.b / 85.0, an.c_up / 62.0
    vs = float(np.clip(0.8 + 0.8 * atrophy + rng.normal(0.0, 0.08), 0.65, 1.8))  # ventricle size
    asym = {-1.0: 1.0, 1.0: 1.0}
    if wide is not None:  # slit ventricles to hydrocephalus, and visibly asymmetric ones
        vs = float(np.clip(vs * wide.ventricles, 0.45, 2.6))
        asym = {-1.0: math.sqrt(wide.asymmetry), 1.0: 1.0 / math.sqrt(wide.asymmetry)}

    def ell(c: Sequence[float], s: Sequence[float], yaw: float = 0.0) -> Ellipsoid:
        return Ellipsoid.make((c[0] * sx, c[1] * sy, c[2] * sz), (s[0], s[1] * sy, s[2] * sz), yaw)

    for side in (-1.0, 1.0):
        w = vs * (1.0 + rng.normal(0.0, 0.06)) * asym[side]  # mild asymmetry is normal
        an.ventricles[f"frontal{side:+.0f}"] = ell((side * (8 + 2 * w), -24, 9), (5 * w, 14, 8.5), side * 14)
        an.ventricles[f"body{side:+.0f}"] = ell((side * (10 + 2 * w), 2, 19), (5 * w, 25, 6.5 + w), side * 4)
        an.ventricles[f"atrium{side:+.0f}"] = ell((side * (19 + 2 * w), 27, 9), (6.5 * w, 10, 9), side * -22)
        an.ventricles[f"occipital{side:+.0f}"] = ell((side * (18 + w), 44, 5), (3.5 * w, 12, 4.5), side * -12)
        an.ventricles[f"temporal{side:+.0f}"] = ell((side * 29, -4, -19), (2.5 * w, 13, 3.5), side * -12)
        an.nuclei += [ell((side * (15 + 2 * w), -19, 9), (4.5, 8, 8)),
                      ell((side * (26 + 2 * w), -4, 0), (5.5, 15, 9), side * -10),
                      ell((side * 11, 10, -1), (7.5, 12, 8))]
        if rng.uniform() < 0.55:  # choroid plexus calcification in the atria
            r = uniform(rng, 1.5, 3.0)
            an.calcs.append(ell((side * (19 + 2 * w), 29, 9), (r, r, r)))
        an.sylvian.append((np.array([side * 15.0 * sx, -0.2 * an.b]),
                           _unit([side * 1.0, uniform(rng, 0.25, 0.55)]), 0.95 * an.a,
                           uniform(rng, 1.5, 2.5) + 2.5 * atrophy, uniform(rng, -0.008, 0.008)))
    an.ventricles["third"] = ell((0, -2, -6), (1.2 + 1.3 * vs, 13, 9))
    an.ventricles["fourth"] = ell((0, 24, -40), (5 + vs, 4, 7))
    if rng.uniform() < 0.4:  # pineal calcification
        r = uniform(rng, 1.5, 2.8)
        an.calcs.append(ell((0, 17, -3), (r, r, r)))
    an.stem = (0.0, 7.0 * sy, uniform(rng, 11.0, 14.0), uniform(rng, 9.0, 12.0))
    stem_y = an.stem[1]
    an.cisterns += [
        ell((0, -13, -22), (11 + 2 * atrophy, 9, 5)),  # suprasellar
        Ellipsoid.make((0, stem_y - an.stem[3] - 2, -36 * sz), (9, 3 + 2 * atrophy, 16 * sz)),  # prepontine
        Ellipsoid.make((0, stem_y + an.stem[3] + 4, -10 * sz), (10, 4 + 2 * atrophy, 6)),  # quadrigeminal
        Ellipsoid.make((0, 0.72 * an.b, an.f_post + 6), (14, 9 + 4 * atrophy, 10)),  # cisterna magna
    ]
    an.canal = (0.0, 0.12 * an.b, uniform(rng, 14.0, 17.0))


def _add_lower_structures(an: Anatomy, rng: np.random.Generator) -> None:
    """Orbits, sinuses and mastoids below the cranial floors (in the order they are painted)."""
    k, b, a = an.k, an.b, an.a
    for side in (-1.0, 1.0):
        orbit = an.f_ant - 17 * k  # the orbits hang under the anterior fossa floor
        an.lower += [("fat", Ellipsoid.make((side * 29 * k, -0.8 * b, orbit), (15 * k, 19 * k, 16 * k))),
                     ("globe", Ellipsoid.make((side * 30 * k, -0.92 * b, orbit + 1.0), (11.5, 11.5, 11.5))),
                     ("air", Ellipsoid.make((side * 25 * k, -0.62 * b, -72 * k), (13 * k, 15 * k, 15 * k))),
                     ("cells", Ellipsoid.make((side * 0.82 * a, 0.12 * b, -52 * k), (11 * k, 12 * k, 13 * k)))]
    an.lower += [("cells", Ellipsoid.make((0, -0.72 * b, an.f_ant - 16 * k), (10 * k, 17 * k, 12 * k))),  # ethmoid
                 ("air", Ellipsoid.make((0, -0.8 * b, -55 * k), (8 * k, 14 * k, 18 * k))),  # nasal cavity
                 ("air", Ellipsoid.make((0, -0.3 * b, -50 * k), (11 * k, 9 * k, 8 * k))),  # sphenoid sinus
                 ("air", Ellipsoid.make((0, -0.22 * b, -84 * k), (13 * k, 7 * k, 14 * k)))]  # nasopharynx
    if rng.uniform() < 0.6:  # frontal sinus, inside the frontal bone
        an.lower.append(("sinus", Ellipsoid.make((0, -an.b - 3.0, -6 * k),
                                                 (uniform(rng, 8, 16), 5.0, uniform(rng, 7, 12)))))


def copy_anatomy(an: Anatomy) -> Anatomy:
    """Lesions may add mass effect to the anatomy: each placement attempt starts from the same head."""
    return Anatomy(**{**an.__dict__, "ventricles": dict(an.ventricles), "calcs": list(an.calcs),
                       "nuclei": list(an.nuclei)})


def cavity_shape(an: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
    """Normalised ellipsoid coordinates (qx, qy, qz), their norm g, and d: the approximate signed distance
    (mm) from the inner table, negative inside the cranial cavity. Works on arrays of any shape."""
    v = y * np.float32(1.0 / an.b)
    qx = (x * np.float32(1.0 / an.a) + np.float32(an.shear) * v) * (1.0 - np.float32(an.egg) * v)
    iz = np.where(z > 0, np.float32(1.0 / an.c_up), np.float32(1.0 / an.c_low))
    qz = z * iz
    g = np.sqrt(qx * qx + v * v + qz * qz) + np.float32(1e-6)
    gx, gy, gz = qx * np.float32(1.0 / an.a), v * np.float32(1.0 / an.b), qz * iz
    # First-order distance to the level set g = 1: (g - 1) / |grad g|, with |grad g| = |(gx, gy, gz)| / g.
    d = (g - 1.0) * g / np.maximum(np.sqrt(gx * gx + gy * gy + gz * gz), np.float32(1e-6))
    return qx, v, qz, g, d


def cranial_floor(an: Anatomy, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Height of the cranial floor (anterior, middle, posterior fossa), how far in front of the petrous
    ridge a point is (1 in the middle fossa, 0 in the posterior fossa), the bone thickness below, and
    how far in front of the sphenoid ridge it is (1 in the anterior fossa)."""
    ax = np.abs(x) * np.float32(1.0 / an.a)
    ny = y * np.float32(1.0 / an.b)
    mid = ramp((np.float32(an.pet_y0) + np.float32(an.pet_m) * ax - ny) * np.float32(25.0))
    ant = ramp((np.float32(an.sph_y) - ny) * np.float32(20.0))
    k = np.float32(an.k)
    # Each fossa is a bowl: the floor curves up to meet the skull wall; the orbital roofs bulge up.
    post = np.float32(an.f_post) + 14.0 * k * (ax * ax + np.maximum(ny - 0.1, 0.0) ** 2 * 1.25)
    sella = ramp(1.0 - ax * np.float32(3.0)) * np.float32(an.sella_rise)  # central base stands higher
    middle = np.float32(an.f_mid) + sella + 60.0 * k * np.maximum(ax - 0.6, 0.0) ** 2
    front = np.float32(an.f_ant) + 6.0 * k * np.maximum(1.0 - ((ax - 0.4) * 4.0) ** 2, 0.0)
    floor = post + (middle - post) * mid + (front - middle) * ant
    # Bone under the floor: thick occipital bone, thinner middle fossa, thin orbital roofs.
    thick = np.float32(an.base_t) + (3.5 - np.float32(an.base_t)) * mid - 1.5 * ant
    return floor, mid, thick, ant


def tentorium(an: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the tentorium: a tent, highest at the midline, sloping down to the sides and back."""
    ax = np.abs(x) * np.float32(1.0 / an.a)
    ny = y * np.float32(1.0 / an.b)
    k = np.float32(an.k)
    return np.float32(an.tentorium) + 12.0 * k * ramp(1.0 - ax * 1.4) - 14.0 * k * np.maximum(ny - 0.35, 0.0)


def skull_thickness(an: Anatomy, nx: np.ndarray, ny: np.ndarray, nz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skull and scalp thickness by direction: thick frontal/occipital bone, thin temporal squama under the
    temporalis muscle."""
    temporal = nx * nx * ramp(1.0 - np.abs(nz + np.float32(0.1)) * np.float32(2.5))
    skull = np.float32(an.t_mean) + np.float32(an.t_ap) * ny * ny - np.float32(an.t_temp) * temporal
    scalp = np.float32(an.scalp) + np.float32(an.temporalis) * temporal
    return np.clip(skull, 3.5, 11.0), scalp
