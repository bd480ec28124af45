"""Synthetic head-CT series ("phantoms") with labelled intracranial hemorrhage, written as real CT DICOM.

No real head CT can be downloaded here, so tests, the demo and the shipped default model use these.
The head is an analytic 3-D model in millimetres, in a head frame (x to the patient's left, y posterior,
z superior, origin at the centre of the cranial cavity at its widest level). Every slice is a plane
through that model placed by the scanner geometry (gantry tilt, head pose, table positions), so tilted
stacks, oblique cuts near the vertex and the skull base come out geometrically consistent, and a lesion
is one 3-D shape seen on several adjacent slices.

Speed: a linear function of the pixel indices is a column vector plus a row vector (broadcast), and
small structures are evaluated only in the pixel box where they cut the plane.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian
from scipy.ndimage import gaussian_filter

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.errors import UserError

# A subtype counts on a slice only when its drawn mask covers at least this area (a few pixels at 512).
MIN_LESION_MM2 = 6.0
# stage_2_train.csv lists the six rows of a slice in this order.
RSNA_ORDER: tuple[str, ...] = (
    "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
# How pixel values are stored; see _encode. Weights are how often each is drawn when not asked for.
ENCODINGS: dict[str, float] = {"int16": 0.40, "int16_zero": 0.15, "uint16": 0.15, "uint12": 0.12,
                               "rsna_quirk": 0.12, "slope_half": 0.06}
# Codes of PhantomSeries.tissue (what each pixel is, before blur and noise).
TISSUE: dict[str, int] = {name: code for code, name in enumerate(
    ("air", "scalp", "fat", "bone", "grey", "white", "csf", "ventricle", "blood", "soft", "calcification",
     "edema", "device", "brainstem", "padding"))}
VARIATION_KEYS = frozenset({
    "slice_spacing", "thin", "pixel_spacing", "noise_sigma", "tilt_deg", "rotation_deg", "offset_mm",
    "encoding", "shuffle", "reverse_instances", "study_instance_uid", "patient_id", "series_number",
    "series_description", "headrest", "padding", "mass_effect", "blur_mm", "partial_volume"})
_UID_SALT = "ihd-node-phantom-v1"
_T = TISSUE


@dataclass(frozen=True)
class PhantomSeries:
    """One synthetic series. Arrays are in sorted spatial order (inferior to superior along the slice normal),
    the order load_volume returns; `datasets` is in shuffled file order."""

    datasets: list[Dataset]
    labels: np.ndarray  # (n, 6) uint8, CLASSES order
    masks: np.ndarray  # (n, rows, cols) uint8, bit k set where SUBTYPES[k] is drawn
    sop_uids_sorted: list[str]
    study_instance_uid: str
    series_instance_uid: str
    hu: np.ndarray  # (n, rows, cols) float32, exactly what the stored pixels decode to
    tissue: np.ndarray  # (n, rows, cols) uint8 TISSUE codes, before blur and noise
    seed: int
    subtypes: tuple[str, ...]  # the subtypes placed in the head
    pixel_spacing: float
    slice_spacing: float  # mm along the slice normal
    tilt_deg: float
    encoding: str
    partial_volume: bool  # each slice averages two planes of its slab

    @property
    def positive_classes(self) -> list[str]:
        """Classes (CLASSES order) present on at least one slice."""
        return [c for k, c in enumerate(CLASSES) if self.labels[:, k].any()]

    @property
    def n_slices(self) -> int:
        return int(self.labels.shape[0])


# -------------------------------------------------------------------------------------- randomness


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _ramp(v: np.ndarray) -> np.ndarray:
    return np.clip(v, 0.0, 1.0)


@dataclass(frozen=True)
class _Ell:
    """An ellipsoid in the head frame, optionally turned about z."""

    center: np.ndarray
    m: np.ndarray  # rows: linear maps head mm -> normalised local coordinates
    radius: float  # bounding sphere, for culling

    @staticmethod
    def make(center: Sequence[float], semi: Sequence[float], yaw_deg: float = 0.0) -> _Ell:
        semi_a = np.asarray(semi, dtype=np.float64)
        m = np.diag(1.0 / semi_a) @ _rot_z(math.radians(yaw_deg)).T
        return _Ell(np.asarray(center, dtype=np.float64), m, float(semi_a.max()))


@dataclass(frozen=True)
class _Waves:
    """A sum of plane waves cos(w . p + phase): smooth 3-D random textures."""

    w: np.ndarray  # (k, 3) rad/mm
    phase: np.ndarray  # (k,)
    amp: np.ndarray  # (k,)

    @staticmethod
    def draw(rng: np.random.Generator, k: int, wavelength: tuple[float, float], amp: float) -> _Waves:
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lengths = rng.uniform(*wavelength, size=k)
        return _Waves(dirs * (2 * np.pi / lengths)[:, None], rng.uniform(0, 2 * np.pi, k), np.full(k, amp))


# ----------------------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    """All random parameters of one head (mm, HU). Built once per series by _draw_anatomy."""

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
    sulci: _Waves
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
    texture: _Waves
    mastoid: _Waves
    hu: dict[str, float]
    shift: float = 0.0  # midline shift (mass effect), + = toward the patient's left
    nuclei: list[_Ell] = field(default_factory=list)
    ventricles: dict[str, _Ell] = field(default_factory=dict)
    cisterns: list[_Ell] = field(default_factory=list)
    calcs: list[_Ell] = field(default_factory=list)
    lower: list[tuple[str, _Ell]] = field(default_factory=list)
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


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    a = _u(rng, 60.0, 76.0)
    b = float(np.clip(a * _u(rng, 1.1, 1.3), 72.0, 95.0))
    c_up = a * _u(rng, 0.85, 1.0)
    k = b / 85.0
    atrophy = float(rng.uniform() ** 1.5)  # older brains: wider sulci, bigger ventricles
    sulc_w = 0.9 + 1.6 * atrophy  # mm
    hu = _draw_hu(rng)
    an = _Anatomy(
        a=a, b=b, c_up=c_up, c_low=c_up * _u(rng, 1.45, 1.7), egg=_u(rng, 0.0, 0.12),
        shear=_u(rng, -0.04, 0.04),
        t_mean=_u(rng, 5.0, 7.5), t_ap=_u(rng, 1.0, 3.0), t_temp=_u(rng, 1.5, 3.0),
        t_inner=_u(rng, 1.3, 2.2), t_outer=_u(rng, 1.5, 2.5), scalp=_u(rng, 3.0, 6.0),
        temporalis=_u(rng, 2.0, 7.0), fat_layer=bool(rng.uniform() < 0.5),
        csf_t=_u(rng, 0.3, 0.9) + 1.8 * atrophy, gm_t=_u(rng, 2.2, 3.2), sulc_depth=_u(rng, 9.0, 17.0),
        sulc_thr=0.1 * sulc_w, gyr_thr=0.1 * sulc_w + _u(rng, 0.45, 0.6),
        sulci=_Waves.draw(rng, 10, (13.0, 22.0), 1.0 / math.sqrt(5.0)),
        sulci_bend=rng.uniform(-0.25, 0.25, 10),
        f_ant=-_u(rng, 18.0, 25.0) * k, f_mid=-_u(rng, 38.0, 45.0) * k, f_post=-_u(rng, 54.0, 61.0) * k,
        sella_rise=_u(rng, 8.0, 13.0) * k, sph_y=-_u(rng, 0.28, 0.36), pet_y0=-_u(rng, 0.08, 0.15),
        pet_m=_u(rng, 0.25, 0.4), base_t=_u(rng, 5.0, 9.0), pet_w=_u(rng, 7.0, 11.0) * k,
        tentorium=-_u(rng, 16.0, 24.0) * k,
        texture=_Waves.draw(rng, 4, (12.0, 40.0), _u(rng, 0.4, 0.6)),
        mastoid=_Waves.draw(rng, 5, (3.0, 6.0), 0.5), hu=hu, fissure_w=_u(rng, 0.8, 1.6) + 2.0 * atrophy,
        falx_w=_u(rng, 0.7, 1.3),
    )
    _add_deep_structures(an, rng, atrophy)
    _add_lower_structures(an, rng)
    return an


def _draw_hu(rng: np.random.Generator) -> dict[str, float]:
    gm = _u(rng, 36.0, 42.0)
    wm = min(_u(rng, 26.5, 30.5), gm - 7.0)
    return {
        "air": _u(rng, -1004.0, -994.0), "scalp": _u(rng, 32.0, 52.0), "fat": _u(rng, -105.0, -70.0),
        "muscle": _u(rng, 42.0, 58.0), "cortical": _u(rng, 1350.0, 1750.0), "diploe": _u(rng, 800.0, 1000.0),
        "base": _u(rng, 1000.0, 1500.0), "gm": gm, "wm": wm, "csf": _u(rng, 3.0, 12.0),
        "cereb": gm - _u(rng, 1.0, 4.0), "stem": wm + _u(rng, 2.0, 5.0), "nuclei": gm - _u(rng, 0.0, 3.0),
        "falx": _u(rng, 48.0, 70.0), "calc": _u(rng, 110.0, 300.0), "globe": _u(rng, 8.0, 18.0),
        "edema": _u(rng, 12.0, 20.0), "cord": wm + _u(rng, 2.0, 6.0),
    }


def _add_deep_structures(an: _Anatomy, rng: np.random.Generator, atrophy: float) -> None:
    """Ventricles, deep grey nuclei, cisterns and calcifications, scaled to the head."""
    sx, sy, sz = an.a / 68.0, an.b / 85.0, an.c_up / 62.0
    vs = float(np.clip(0.8 + 0.8 * atrophy + rng.normal(0.0, 0.08), 0.65, 1.8))  # ventricle size

    def ell(c: Sequence[float], s: Sequence[float], yaw: float = 0.0) -> _Ell:
        return _Ell.make((c[0] * sx, c[1] * sy, c[2] * sz), (s[0], s[1] * sy, s[2] * sz), yaw)

    for side in (-1.0, 1.0):
        w = vs * (1.0 + rng.normal(0.0, 0.06))  # mild asymmetry is normal
        an.ventricles[f"frontal{side:+.0f}"] = ell((side * (8 + 2 * w), -24, 9), (5 * w, 14, 8.5), side * 14)
        an.ventricles[f"body{side:+.0f}"] = ell((side * (10 + 2 * w), 2, 19), (5 * w, 25, 6.5 + w), side * 4)
        an.ventricles[f"atrium{side:+.0f}"] = ell((side * (19 + 2 * w), 27, 9), (6.5 * w, 10, 9), side * -22)
        an.ventricles[f"occipital{side:+.0f}"] = ell((side * (18 + w), 44, 5), (3.5 * w, 12, 4.5), side * -12)
        an.ventricles[f"temporal{side:+.0f}"] = ell((side * 29, -4, -19), (2.5 * w, 13, 3.5), side * -12)
        an.nuclei += [ell((side * (15 + 2 * w), -19, 9), (4.5, 8, 8)),
                      ell((side * (26 + 2 * w), -4, 0), (5.5, 15, 9), side * -10),
                      ell((side * 11, 10, -1), (7.5, 12, 8))]
        if rng.uniform() < 0.55:  # choroid plexus calcification in the atria
            r = _u(rng, 1.5, 3.0)
            an.calcs.append(ell((side * (19 + 2 * w), 29, 9), (r, r, r)))
        an.sylvian.append((np.array([side * 15.0 * sx, -0.2 * an.b]),
                           _unit([side * 1.0, _u(rng, 0.25, 0.55)]), 0.95 * an.a,
                           _u(rng, 1.5, 2.5) + 2.5 * atrophy, _u(rng, -0.008, 0.008)))
    an.ventricles["third"] = ell((0, -2, -6), (1.2 + 1.3 * vs, 13, 9))
    an.ventricles["fourth"] = ell((0, 24, -40), (5 + vs, 4, 7))
    if rng.uniform() < 0.4:  # pineal calcification
        r = _u(rng, 1.5, 2.8)
        an.calcs.append(ell((0, 17, -3), (r, r, r)))
    an.stem = (0.0, 7.0 * sy, _u(rng, 11.0, 14.0), _u(rng, 9.0, 12.0))
    stem_y = an.stem[1]
    an.cisterns += [
        ell((0, -13, -22), (11 + 2 * atrophy, 9, 5)),  # suprasellar
        _Ell.make((0, stem_y - an.stem[3] - 2, -36 * sz), (9, 3 + 2 * atrophy, 16 * sz)),  # prepontine
        _Ell.make((0, stem_y + an.stem[3] + 4, -10 * sz), (10, 4 + 2 * atrophy, 6)),  # quadrigeminal
        _Ell.make((0, 0.72 * an.b, an.f_post + 6), (14, 9 + 4 * atrophy, 10)),  # cisterna magna
    ]
    an.canal = (0.0, 0.12 * an.b, _u(rng, 14.0, 17.0))


def _add_lower_structures(an: _Anatomy, rng: np.random.Generator) -> None:
    """Orbits, sinuses and mastoids below the cranial floors (in the order they are painted)."""
    k, b, a = an.k, an.b, an.a
    for side in (-1.0, 1.0):
        orbit = an.f_ant - 17 * k  # the orbits hang under the anterior fossa floor
        an.lower += [("fat", _Ell.make((side * 29 * k, -0.8 * b, orbit), (15 * k, 19 * k, 16 * k))),
                     ("globe", _Ell.make((side * 30 * k, -0.92 * b, orbit + 1.0), (11.5, 11.5, 11.5))),
                     ("air", _Ell.make((side * 25 * k, -0.62 * b, -72 * k), (13 * k, 15 * k, 15 * k))),
                     ("cells", _Ell.make((side * 0.82 * a, 0.12 * b, -52 * k), (11 * k, 12 * k, 13 * k)))]
    an.lower += [("cells", _Ell.make((0, -0.72 * b, an.f_ant - 16 * k), (10 * k, 17 * k, 12 * k))),  # ethmoid
                 ("air", _Ell.make((0, -0.8 * b, -55 * k), (8 * k, 14 * k, 18 * k))),  # nasal cavity
                 ("air", _Ell.make((0, -0.3 * b, -50 * k), (11 * k, 9 * k, 8 * k))),  # sphenoid sinus
                 ("air", _Ell.make((0, -0.22 * b, -84 * k), (13 * k, 7 * k, 14 * k)))]  # nasopharynx
    if rng.uniform() < 0.6:  # frontal sinus, inside the frontal bone
        an.lower.append(("sinus", _Ell.make((0, -an.b - 3.0, -6 * k), (_u(rng, 8, 16), 5.0, _u(rng, 7, 12)))))


# ----------------------------------------------------------------------------------------- lesions


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
    ell: _Ell
    lobes: _Waves
    rim: float  # mm of surrounding oedema (0: none)


@dataclass
class _Ventricular:
    """Intraventricular: dependent layering (blood below a level in the patient's y) and casts."""

    subtype: ClassVar[str] = "intraventricular"

    hu: float
    gravity: np.ndarray  # the patient's posterior direction (down, supine) in the head frame
    level: float | None  # blood where gravity . p > level (None: casts only)
    casts: tuple[str, ...]


@dataclass
class _Subarachnoid:
    """Subarachnoid: the CSF spaces (sulci, cisterns, fissures) inside some spheres, patchily filled."""

    subtype: ClassVar[str] = "subarachnoid"

    hu: float
    seeds: list[tuple[np.ndarray, float]]
    patch: _Waves


_Lesion = _Surface | _Blob | _Ventricular | _Subarachnoid


# ---------------------------------------------------------------------------------------- geometry


@dataclass
class _Geometry:
    """Scanner geometry of the stack (patient frame, DICOM LPS) and the head pose in it."""

    size: int
    ps: float  # pixel spacing, mm
    spacing: float  # along the slice normal, mm
    tilt: float  # gantry tilt, radians
    pose: np.ndarray  # rotation head -> patient
    origin: np.ndarray  # head-frame origin in patient mm
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    levels: np.ndarray  # head-frame z where each slice plane crosses the head's z axis
    ipp: np.ndarray  # (n, 3) ImagePositionPatient
    headrest: tuple[float, float, float, float, float, float] | None  # cx, cy, rx, ry, thickness, hu
    table: tuple[float, float, float] | None  # y, thickness, hu

    def head_plane(self, k: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q0, ei, ej): head-frame mm of pixel (0, 0) of slice k (moved offset mm along the normal) and the
        steps per row and column."""
        rt = self.pose.T
        corner = self.ipp[k] + offset * self.normal - self.origin
        return rt @ corner, rt @ (self.col * self.ps), rt @ (self.row * self.ps)

    def head_point_on_slice(self, k: int, x: float, y: float) -> np.ndarray:
        """The head-frame point with the given x, y that lies on slice k's plane."""
        n_h = self.pose.T @ self.normal
        z = self.levels[k] - (n_h[0] * x + n_h[1] * y) / n_h[2]
        return np.array([x, y, z])


def _pick(var: dict[str, Any], key: str, drawn: Any) -> Any:
    """The caller's value when given, else the random one (always drawn, so a fixed value for one
    variation leaves every other random choice of the seed as it was)."""
    value = var.get(key)
    return drawn if value is None else value


def _draw_geometry(rng: np.random.Generator, an: _Anatomy, n: int, size: int, var: dict[str, Any],
                   ventricles: bool = False) -> _Geometry:
    thin = bool(var.get("thin", False))
    # Long stacks get the thinner of the usual 4-6 mm, so they end near 19 cm like real head scans.
    thick = min(_u(rng, 4.0, 6.0), max(4.0, 190.0 / n))
    spacing = _pick(var, "slice_spacing", _u(rng, 1.0, 2.5) if thin else thick)
    tilted = rng.choice([-1.0, 1.0]) * _u(rng, 6.0, 25.0)
    tilt_deg = _pick(var, "tilt_deg", 0.0 if rng.uniform() < 0.55 else tilted)
    yaw = _pick(var, "rotation_deg", float(np.clip(rng.normal(0.0, 8.0), -25, 25)))
    pitch, roll = float(np.clip(rng.normal(0.0, 6.0), -15, 15)), float(np.clip(rng.normal(0.0, 3.0), -8, 8))
    offset = np.asarray(_pick(var, "offset_mm", rng.uniform(-15.0, 15.0, size=2)), dtype=np.float64)
    fov_center = np.array([_u(rng, -10.0, 10.0), _u(rng, -30.0, 30.0)])
    # Scanners size the field of view to the head: never cut the scalp off.
    need = 2.0 * (an.b + an.t_mean + an.t_ap + an.scalp + an.temporalis + 12.0 + float(np.abs(offset).max()))
    ps = float(_pick(var, "pixel_spacing", max(_u(rng, 0.4, 0.55), need / 512.0) * 512.0 / size))
    tilt = math.radians(float(tilt_deg))
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(tilt), -math.sin(tilt)])
    normal = np.cross(row, col)
    pose = _rot_z(math.radians(float(yaw))) @ _rot_x(math.radians(pitch)) @ _rot_y(math.radians(roll))
    origin = np.array([fov_center[0] + offset[0], fov_center[1] + offset[1], _u(rng, -120.0, 80.0)])
    n_hz = float((pose.T @ normal)[2])
    step = float(spacing) / n_hz  # head-frame z between the planes along the head axis
    levels = _coverage(rng, an, n, step, ventricles) + step * np.arange(n)
    # The table moves along z; each plane's centre stays on the table axis (x, y of the field of view).
    positions = float(normal @ origin) + levels * n_hz
    z_table = (positions - normal[1] * fov_center[1] - normal[0] * fov_center[0]) / normal[2]
    centers = np.stack([np.full(n, fov_center[0]), np.full(n, fov_center[1]), z_table], axis=1)
    ipp = centers - size * ps / 2.0 * (row + col)
    rx = an.a + an.t_mean + an.scalp + an.temporalis * 0.5 + _u(rng, 2.0, 10.0)
    ry = an.b + an.t_mean + an.scalp + _u(rng, 2.0, 10.0)
    headrest = (origin[0], origin[1], rx, ry, _u(rng, 3.0, 9.0), _u(rng, -150.0, 250.0))
    table = (origin[1] + ry + _u(rng, 15.0, 40.0), _u(rng, 6.0, 14.0), _u(rng, -300.0, 200.0))
    support = bool(_pick(var, "headrest", rng.uniform() < 0.5))
    return _Geometry(size=size, ps=ps, spacing=float(spacing), tilt=tilt, pose=pose, origin=origin, row=row,
                     col=col, normal=normal, levels=levels, ipp=ipp, headrest=headrest if support else None,
                     table=table if support else None)


def _coverage(rng: np.random.Generator, an: _Anatomy, n: int, step: float, ventricles: bool) -> float:
    """Head-frame level of the lowest slice: skull base to vertex when the stack is long enough, else a
    stretch of the cerebrum (through the ventricles when ventricular blood is asked for)."""
    bottom, top = an.f_post - 12.0, an.vertex + 2.0
    span = step * (n - 1)
    end, centre = _u(rng, -8.0, 4.0), _u(rng, -30.0, 35.0) * an.k
    if span >= top - bottom:
        return top + end - span  # extra slices reach below the skull base, as in real scans
    if ventricles:
        centre = float(np.clip(centre, -5.0 * an.k, 15.0 * an.k))
    return float(np.clip(centre - span / 2.0, bottom - 5.0, top - span))


# -------------------------------------------------------------------------------------- pixel grid


class _Grid:
    """The pixels of one slice inside a crop window, mapped to head-frame mm by a linear map."""

    def __init__(self, q0: np.ndarray, ei: np.ndarray, ej: np.ndarray, rows: slice, cols: slice, ps: float):
        self.q0, self.ei, self.ej, self.ps = q0, ei, ej, ps
        self.rows, self.cols = rows, cols
        self.i = np.arange(rows.start, rows.stop, dtype=np.float32)
        self.j = np.arange(cols.start, cols.stop, dtype=np.float32)
        self.shape = (len(self.i), len(self.j))
        n = np.cross(ei, ej)
        self.normal = n / np.linalg.norm(n)

    def lin(self, w: Sequence[float], c: float = 0.0, box: tuple[slice, slice] | None = None) -> np.ndarray:
        """w . p + c for every pixel p (in the box), as a column plus a row vector."""
        w = np.asarray(w, dtype=np.float64)
        i, j = (self.i, self.j) if box is None else (self.i[box[0]], self.j[box[1]])
        col = np.float32(float(w @ self.q0) + c) + np.float32(w @ self.ei) * i
        return col[:, None] + (np.float32(w @ self.ej) * j)[None, :]

    def wave_sum(self, waves: _Waves, box: tuple[slice, slice] | None = None) -> np.ndarray:
        """Sum of amp*cos(w . p + phase) via cos(A + B) = cosA cosB - sinA sinB (no per-pixel cosine)."""
        i, j = (self.i, self.j) if box is None else (self.i[box[0]], self.j[box[1]])
        out = np.zeros((len(i), len(j)), dtype=np.float32)
        for w, ph, amp in zip(waves.w, waves.phase, waves.amp, strict=True):
            a = (float(w @ self.q0) + ph + float(w @ self.ei) * i).astype(np.float32)
            b = (float(w @ self.ej) * j).astype(np.float32)
            ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
            out += np.float32(amp) * (ca[:, None] * cb[None, :] - sa[:, None] * sb[None, :])
        return out

    def box(self, center: np.ndarray, radius: float) -> tuple[slice, slice] | None:
        """Crop-relative pixel box where a sphere cuts this plane, or None when it misses."""
        rel = center - self.q0
        dist = float(rel @ self.normal)
        if abs(dist) >= radius:
            return None
        half = math.sqrt(radius * radius - dist * dist) / self.ps + 2.0
        ic = float(rel @ self.ei) / float(self.ei @ self.ei)
        jc = float(rel @ self.ej) / float(self.ej @ self.ej)
        r0 = max(int(ic - half) - self.rows.start, 0)
        r1 = min(int(ic + half) + 2 - self.rows.start, self.shape[0])
        c0 = max(int(jc - half) - self.cols.start, 0)
        c1 = min(int(jc + half) + 2 - self.cols.start, self.shape[1])
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ell(self, e: _Ell, box: tuple[slice, slice]) -> np.ndarray:
        """Squared normalised radius of an ellipsoid (< 1 inside) over the box."""
        q = [self.lin(row, -float(row @ e.center), box) for row in e.m]
        return q[0] * q[0] + q[1] * q[1] + q[2] * q[2]


def _shape(an: _Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
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


def _floor(an: _Anatomy, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Height of the cranial floor (anterior, middle, posterior fossa), how far in front of the petrous
    ridge a point is (1 in the middle fossa, 0 in the posterior fossa), the bone thickness below, and
    how far in front of the sphenoid ridge it is (1 in the anterior fossa)."""
    ax = np.abs(x) * np.float32(1.0 / an.a)
    ny = y * np.float32(1.0 / an.b)
    mid = _ramp((np.float32(an.pet_y0) + np.float32(an.pet_m) * ax - ny) * np.float32(25.0))
    ant = _ramp((np.float32(an.sph_y) - ny) * np.float32(20.0))
    k = np.float32(an.k)
    # Each fossa is a bowl: the floor curves up to meet the skull wall; the orbital roofs bulge up.
    post = np.float32(an.f_post) + 14.0 * k * (ax * ax + np.maximum(ny - 0.1, 0.0) ** 2 * 1.25)
    sella = _ramp(1.0 - ax * np.float32(3.0)) * np.float32(an.sella_rise)  # central base stands higher
    middle = np.float32(an.f_mid) + sella + 60.0 * k * np.maximum(ax - 0.6, 0.0) ** 2
    front = np.float32(an.f_ant) + 6.0 * k * np.maximum(1.0 - ((ax - 0.4) * 4.0) ** 2, 0.0)
    floor = post + (middle - post) * mid + (front - middle) * ant
    # Bone under the floor: thick occipital bone, thinner middle fossa, thin orbital roofs.
    thick = np.float32(an.base_t) + (3.5 - np.float32(an.base_t)) * mid - 1.5 * ant
    return floor, mid, thick, ant


def _tentorium(an: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the tentorium: a tent, highest at the midline, sloping down to the sides and back."""
    ax = np.abs(x) * np.float32(1.0 / an.a)
    ny = y * np.float32(1.0 / an.b)
    k = np.float32(an.k)
    return np.float32(an.tentorium) + 12.0 * k * _ramp(1.0 - ax * 1.4) - 14.0 * k * np.maximum(ny - 0.35, 0.0)


def _thickness(an: _Anatomy, nx: np.ndarray, ny: np.ndarray, nz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skull and scalp thickness by direction: thick frontal/occipital bone, thin temporal squama under the
    temporalis muscle."""
    temporal = nx * nx * _ramp(1.0 - np.abs(nz + np.float32(0.1)) * np.float32(2.5))
    skull = np.float32(an.t_mean) + np.float32(an.t_ap) * ny * ny - np.float32(an.t_temp) * temporal
    scalp = np.float32(an.scalp) + np.float32(an.temporalis) * temporal
    return np.clip(skull, 3.5, 11.0), scalp


# --------------------------------------------------------------------------------------- one slice


@dataclass
class _Slice:
    """Working arrays of one slice inside its crop window."""

    grid: _Grid
    hu: np.ndarray
    tis: np.ndarray
    bits: np.ndarray
    d: np.ndarray  # signed distance from the inner table, mm
    qn: tuple[np.ndarray, np.ndarray, np.ndarray]  # unit direction in ellipsoid coordinates
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    cavity: np.ndarray  # inside the cranial cavity
    csf_space: np.ndarray  # sulci, cisterns, fissures: where subarachnoid blood goes
    csf_wide: np.ndarray  # the same with sulci widened, as blood distends them
    vent: np.ndarray


def _crop(an: _Anatomy, q0: np.ndarray, ei: np.ndarray, ej: np.ndarray,
          size: int) -> tuple[slice, slice] | None:
    """Pixel window holding the head on this plane, found on a coarse grid."""
    step = max(2, size // 64)
    idx = np.arange(0, size, step, dtype=np.float32)
    p = q0[:, None, None] + ei[:, None, None] * idx[None, :, None] + ej[:, None, None] * idx[None, None, :]
    p = p.astype(np.float32)
    *_, d = _shape(an, p[0], p[1], p[2])
    inside = d < an.t_mean + an.t_ap + an.scalp + an.temporalis + 2.0
    if not inside.any():
        return None
    rr, cc = np.nonzero(inside)
    margin = 2 * step + 4
    r0, r1 = max(int(rr.min()) * step - margin, 0), min(int(rr.max()) * step + margin, size)
    c0, c1 = max(int(cc.min()) * step - margin, 0), min(int(cc.max()) * step + margin, size)
    return slice(r0, r1), slice(c0, c1)


def _render_head(an: _Anatomy, grid: _Grid) -> _Slice:
    """Scalp, skull, skull base and the brain surface with its sulci."""
    x, y, z = grid.lin((1, 0, 0)), grid.lin((0, 1, 0)), grid.lin((0, 0, 1))
    qx, qy, qz, g, d = _shape(an, x, y, z)
    inv = 1.0 / g
    qn = (qx * inv, qy * inv, qz * inv)
    skull_t, scalp_t = _thickness(an, *qn)
    h = an.hu
    hu = np.full(grid.shape, h["air"], dtype=np.float32)
    tis = np.zeros(grid.shape, dtype=np.uint8)
    zmin = float(min(z[0, 0], z[0, -1], z[-1, 0], z[-1, -1]))
    low = zmin < an.f_ant + 2.0  # the plane reaches the skull base somewhere
    if low:
        floor, mid, base_t, ant = _floor(an, x, y)
        ring_low = floor - base_t - np.float32(28.0 * an.k) * ant  # the orbital rims go below the floor
    else:
        floor, mid, base_t = np.float32(an.f_post), None, np.float32(an.base_t)
        ring_low = floor - base_t
    outer = d < skull_t + scalp_t
    hu[outer], tis[outer] = h["scalp"], _T["scalp"]
    if an.fat_layer:
        fat = outer & (d > skull_t + scalp_t * 0.35) & (d < skull_t + scalp_t * 0.65)
        hu[fat], tis[fat] = h["fat"], _T["fat"]
    above_base = z > ring_low
    bone = (d < skull_t) & above_base
    cortical = (d < an.t_inner) | (d > skull_t - an.t_outer)
    tex = grid.wave_sum(an.texture)
    hu[bone] = np.where(cortical, np.float32(h["cortical"]), h["diploe"] + 40.0 * tex)[bone]
    tis[bone] = _T["bone"]
    inside = d < 0
    cavity = inside & (z > floor)
    if low:
        _render_base(an, grid, hu, tis, (x, y, z), floor, base_t, inside, outer)
    # Brain: subarachnoid CSF over the surface, cortex ribbon, white matter, sulci.
    depth = -d - np.float32(an.csf_t)
    hu[cavity], tis[cavity] = h["csf"], _T["csf"]
    brain = cavity & (depth > 0)
    white = np.float32(h["wm"]) + tex
    grey = np.float32(h["gm"]) + tex
    if low:
        posterior = (mid < 0.5) & (z < _tentorium(an, x, y))
        white = np.where(posterior, np.float32(h["cereb"]) + tex, white)
    hu[brain] = np.where(depth < an.gm_t, grey, white)[brain]
    tis[brain] = np.where(depth < an.gm_t, _T["grey"], _T["white"])[brain]
    csf_space = cavity & ~brain
    csf_wide = csf_space.copy()
    _render_sulci(an, hu, tis, grey, brain, depth, qn, csf_space, csf_wide)
    return _Slice(grid, hu, tis, np.zeros(grid.shape, dtype=np.uint8), d, qn, x, y, z, cavity, csf_space,
                  csf_wide, np.zeros(grid.shape, dtype=bool))


def _render_base(an: _Anatomy, grid: _Grid, hu: np.ndarray, tis: np.ndarray, xyz: tuple[np.ndarray, ...],
                 floor: np.ndarray, base_t: np.ndarray, inside: np.ndarray, outer: np.ndarray) -> None:
    """Below the cranial floors: skull base, petrous ridges, face and neck soft tissue, sinuses, orbits."""
    h, (x, y, z) = an.hu, xyz
    base_top = floor - base_t
    lower = inside & (z <= base_top)
    hu[lower], tis[lower] = h["muscle"], _T["soft"]
    band = inside & (z <= floor) & (z > base_top)
    hu[band], tis[band] = h["base"], _T["bone"]
    # Petrous ridge: a bony wall between the middle and posterior fossa.
    ax = np.abs(x) * np.float32(1.0 / an.a)
    off = (y * np.float32(1.0 / an.b) - np.float32(an.pet_y0) - np.float32(an.pet_m) * ax) * np.float32(an.b)
    top = np.float32(an.f_mid + 9.0 * an.k)
    width = np.float32(an.pet_w * 0.5) * (1.0 + (top - z) * np.float32(0.08))  # a pyramid, wider below
    ridge = inside & (np.abs(off) < width) & (z < top) & (z > base_top) & (ax > 0.12) & (ax < 0.95)
    hu[ridge], tis[ridge] = h["cortical"], _T["bone"]
    region = outer & ((z <= floor) | ridge)
    for kind, e in an.lower:
        box = grid.box(e.center, e.radius)
        if box is None:
            continue
        f = grid.ell(e, box)
        if kind == "sinus":  # frontal sinus: air inside the frontal bone only
            m = (f < 1.0) & (tis[box] == _T["bone"])
            hu[box][m], tis[box][m] = h["air"], _T["air"]
            continue
        m = (f < 1.0) & region[box]
        if kind == "cells":
            cells = grid.wave_sum(an.mastoid, box) > 0.5  # mastoid or ethmoid air cells in bone
            hu[box][m] = np.where(cells, np.float32(h["air"]), np.float32(h["base"]))[m]
            tis[box][m] = np.where(cells, _T["air"], _T["bone"])[m]
        elif kind == "air":
            wall = (f < 1.3) & (f >= 1.0) & region[box]
            hu[box][wall], tis[box][wall] = h["base"], _T["bone"]
            hu[box][m], tis[box][m] = h["air"], _T["air"]
        else:
            hu[box][m], tis[box][m] = h[kind], _T["fat" if kind == "fat" else "soft"]
    # Foramen magnum and upper cervical canal: CSF around the cord, ringed by bone.
    cx, cy, cr = an.canal
    box = grid.box(np.array([cx, cy, an.f_post - 30.0]), 70.0)
    if box is not None:
        r = np.hypot(x[box] - cx, y[box] - cy)
        below = (z[box] <= floor[box]) & outer[box]
        ring = below & (r >= cr) & (r < cr + 9.0) & (z[box] < an.f_post - 2.0)
        hu[box][ring], tis[box][ring] = h["base"], _T["bone"]
        canal = below & (r < cr)
        hu[box][canal], tis[box][canal] = h["csf"], _T["csf"]


def _render_sulci(an: _Anatomy, hu: np.ndarray, tis: np.ndarray, grey_img: np.ndarray, brain: np.ndarray,
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
    flat_hu[gi], flat_tis[gi] = grey_img.ravel()[gi], _T["grey"]
    si = idx[sulcus]
    flat_hu[si], flat_tis[si] = an.hu["csf"], _T["csf"]
    csf_space.ravel()[si] = True
    csf_wide.ravel()[idx[wide]] = True


def _render_deep(an: _Anatomy, s: _Slice) -> dict[str, tuple[tuple[slice, slice], np.ndarray]]:
    """Midline fissure and falx, deep grey nuclei, brainstem, cisterns, sylvian fissures, ventricles and
    calcifications. Returns each ventricle part's drawn mask (for intraventricular casts)."""
    g, h, k = s.grid, an.hu, an.k
    parenchyma = (s.tis == _T["grey"]) | (s.tis == _T["white"])
    # Interhemispheric fissure above and in front of / behind the corpus callosum, lined by cortex.
    ax = np.abs(s.x - np.float32(an.shift))
    # No fissure through the corpus callosum, the deep nuclei and the brainstem below them.
    dy = np.abs(s.y - np.float32(0.05 * an.b)) * np.float32(1.0 / (0.42 * an.b))
    dz = np.maximum(s.z - np.float32(4.0 * k), 0.0) * np.float32(1.0 / (24.0 * k))
    deep = dy * dy + dz * dz < 1.0
    fis_zone = s.cavity & ~deep
    if float(s.z.min()) < an.tentorium + 12.0 * k:  # no falx in the posterior fossa
        fis_zone &= (s.z > _tentorium(an, s.x, s.y)) | (s.y < 0)
    lining = fis_zone & parenchyma & (ax < an.fissure_w / 2 + 0.5 * an.gm_t)
    s.hu[lining], s.tis[lining] = h["gm"], _T["grey"]
    fissure = fis_zone & (ax < an.fissure_w / 2)
    s.hu[fissure], s.tis[fissure] = h["csf"], _T["csf"]
    s.csf_space |= fissure
    s.csf_wide |= fissure
    falx = fissure & (ax < an.falx_w / 2)
    s.hu[falx], s.tis[falx] = h["falx"], _T["soft"]
    s.csf_space &= ~falx
    s.csf_wide &= ~falx
    for e in an.nuclei:
        box = g.box(e.center, e.radius)
        if box is not None:
            m = (g.ell(e, box) < 1.0) & parenchyma[box]
            s.hu[box][m], s.tis[box][m] = h["nuclei"], _T["grey"]
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
        s.hu[box][insula], s.tis[box][insula] = h["gm"], _T["grey"]
        _mark_csf(an, s, box, zone & (across < half))
    parts: dict[str, tuple[tuple[slice, slice], np.ndarray]] = {}
    for name, e in an.ventricles.items():
        box = g.box(e.center, e.radius)
        if box is None:
            continue
        m = (g.ell(e, box) < 1.0) & s.cavity[box]
        s.hu[box][m], s.tis[box][m] = h["csf"], _T["ventricle"]
        s.vent[box] |= m
        s.csf_space[box] &= ~m
        s.csf_wide[box] &= ~m
        parts[name] = (box, m)
    for e in an.calcs:
        box = g.box(e.center, e.radius)
        if box is not None:
            m = (g.ell(e, box) < 1.0) & s.cavity[box]
            s.hu[box][m], s.tis[box][m] = h["calc"], _T["calcification"]
            s.vent[box] &= ~m
    return parts


def _mark_csf(an: _Anatomy, s: _Slice, box: tuple[slice, slice], m: np.ndarray) -> None:
    s.hu[box][m], s.tis[box][m] = an.hu["csf"], _T["csf"]
    s.csf_space[box] |= m
    s.csf_wide[box] |= m


def _render_stem(an: _Anatomy, s: _Slice) -> None:
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
    s.hu[box][stem], s.tis[box][stem] = an.hu["stem"], _T["brainstem"]
    s.csf_space[box] &= ~stem
    s.csf_wide[box] &= ~stem
    cord = (e2 < (6.0 / rx) ** 2) & (zb < an.f_post) & (s.tis[box] == _T["csf"]) & ~s.cavity[box]
    s.hu[box][cord], s.tis[box][cord] = an.hu["cord"], _T["brainstem"]


# ---------------------------------------------------------------------------------- lesion drawing


def _paint(an: _Anatomy, s: _Slice, box: tuple[slice, slice] | None, m: np.ndarray, hu: float, subtype: str,
           tissue: str = "blood") -> None:
    """Blood (with a little texture) where m; the pixel's mask bit becomes this subtype's only."""
    box = box or (slice(None), slice(None))
    tex = s.grid.wave_sum(an.texture, box) if tissue == "blood" else 0.0
    val = np.clip(np.float32(hu) + 2.0 * tex, 50.0, 90.0) if tissue == "blood" else np.float32(hu)
    s.hu[box][m] = (val[m] if isinstance(val, np.ndarray) else val)
    s.tis[box][m] = _T[tissue]
    if tissue == "blood":
        s.bits[box][m] = 1 << SUBTYPES.index(subtype)


def _render_lesions(an: _Anatomy, s: _Slice, lesions: Sequence[_Lesion],
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


def _draw_sah(an: _Anatomy, s: _Slice, les: _Subarachnoid) -> None:
    for centre, radius in les.seeds:
        box = s.grid.box(centre, radius)
        if box is None:
            continue
        r2 = (s.x[box] - np.float32(centre[0])) ** 2 + (s.y[box] - np.float32(centre[1])) ** 2 \
            + (s.z[box] - np.float32(centre[2])) ** 2
        patch = s.grid.wave_sum(les.patch, box) > -0.35
        m = s.csf_wide[box] & (r2 < radius * radius) & patch & ~s.vent[box] & s.cavity[box]
        _paint(an, s, box, m, les.hu, "subarachnoid")


def _draw_ivh(an: _Anatomy, s: _Slice, les: _Ventricular,
              parts: dict[str, tuple[tuple[slice, slice], np.ndarray]]) -> None:
    for name, (box, m) in parts.items():
        blood = m & (s.tis[box] == _T["ventricle"])
        if name not in les.casts:
            if les.level is None:
                continue
            blood &= s.grid.lin(les.gravity, 0.0, box) > les.level
        _paint(an, s, box, blood, les.hu, "intraventricular")


def _draw_iph(an: _Anatomy, s: _Slice, les: _Blob) -> None:
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
    allowed = s.cavity[box] & ~s.vent[box] & (s.tis[box] != _T["bone"])
    blood = (rho < bound) & allowed
    if les.rim > 0:
        mean_r = 1.0 / float(np.mean(np.linalg.norm(e.m, axis=1)))
        rim = (rho < bound + les.rim / mean_r) & ~blood & allowed & (s.tis[box] != _T["csf"])
        _paint(an, s, box, rim, an.hu["edema"], "intraparenchymal", "edema")
    _paint(an, s, box, blood, les.hu, "intraparenchymal")


def _draw_surface(an: _Anatomy, s: _Slice, les: _Surface) -> None:
    zone = s.cavity & (s.d > -les.t_max) & (s.x * np.float32(les.side) > -2.0)
    idx = np.flatnonzero(zone)
    if idx.size == 0:
        return
    cosang = sum(s.qn[c].ravel()[idx] * np.float32(les.direction[c]) for c in range(3))
    rho = np.arccos(np.clip(cosang, -1.0, 1.0)) * np.float32(an.r_mean)
    thick = les.t_max * np.clip(1.0 - (rho / np.float32(les.extent)) ** les.power, 0.0, None)
    # The falx stops both kinds at the midline; an epidural stops at the sutures.
    thick = thick * _ramp((s.x.ravel()[idx] - np.float32(an.shift)) * np.float32(les.side / 3.0))
    y = s.y.ravel()[idx]
    lo, hi = les.sutures
    if lo is not None:
        thick = thick * _ramp((y - np.float32(lo)) * np.float32(1 / 3.0))
    if hi is not None:
        thick = thick * _ramp((np.float32(hi) - y) * np.float32(1 / 3.0))
    inside = -s.d.ravel()[idx] < thick
    m = np.zeros(s.hu.size, dtype=bool)
    m[idx[inside]] = True
    _paint(an, s, None, m.reshape(s.hu.shape), les.hu, les.subtype)


# -------------------------------------------------------------------------------- lesion placement


def _plane_distances(geo: _Geometry, point: np.ndarray) -> np.ndarray:
    """Signed distance (mm) from a head-frame point to every slice plane."""
    n_h = geo.pose.T @ geo.normal
    return float(point @ n_h) - geo.levels * n_h[2]


def _covered(geo: _Geometry, point: np.ndarray, radius: float) -> bool:
    return bool(np.min(np.abs(_plane_distances(geo, point))) < radius)


def _slices_between(geo: _Geometry, lo: float, hi: float) -> list[int]:
    return [k for k, z in enumerate(geo.levels) if lo <= z <= hi]


def _point_fields(an: _Anatomy, p: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(d, floor height, unit direction) at one head-frame point."""
    x, y, z = (np.array([v], dtype=np.float32) for v in p)
    qx, qy, qz, g, d = _shape(an, x, y, z)
    floor = _floor(an, x, y)[0]
    return float(d[0]), float(floor[0]), np.array([qx[0], qy[0], qz[0]], dtype=np.float64) / float(g[0])


def _inner_table_point(an: _Anatomy, geo: _Geometry, k: int, phi: float) -> np.ndarray | None:
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


def _place_surface(rng: np.random.Generator, an: _Anatomy, geo: _Geometry, subtype: str,
                  side: float | None = None) -> _Surface | None:
    ks = _slices_between(geo, an.f_mid + 6.0 * an.k, an.c_up - 12.0)
    for _ in range(60):
        if not ks:
            return None
        k = int(rng.choice(ks))
        sd = float(rng.choice([-1.0, 1.0])) if side is None else side
        # Mostly over the lateral convexity (temporal/parietal), sometimes frontal or occipital.
        phi = (0.0 if sd > 0 else math.pi) + sd * math.radians(_u(rng, -75.0, 75.0))
        p = _inner_table_point(an, geo, k, phi)
        if p is None or abs(p[0]) < 12.0:
            continue
        _, _, direction = _point_fields(an, p)
        if subtype == "epidural":
            coronal, lambdoid = -_u(rng, 0.1, 0.25) * an.b, _u(rng, 0.4, 0.6) * an.b
            if p[1] < coronal:
                lo, hi = None, coronal
            else:
                lo, hi = (coronal, lambdoid) if p[1] < lambdoid else (lambdoid, None)
            lo = None if lo is None else min(lo, p[1] - 14.0)
            hi = None if hi is None else max(hi, p[1] + 14.0)
            return _Surface("epidural", _u(rng, 58.0, 85.0), direction, _u(rng, 8.0, 24.0),
                            _u(rng, 20.0, 38.0), 2.0, math.copysign(1.0, p[0]), (lo, hi))
        return _Surface("subdural", _u(rng, 55.0, 82.0), direction, _u(rng, 3.0, 12.0), _u(rng, 45.0, 90.0),
                        _u(rng, 3.0, 6.0), math.copysign(1.0, p[0]), (None, None))
    return None


def _in_ventricle(an: _Anatomy, p: np.ndarray, margin: float) -> bool:
    for e in an.ventricles.values():
        q = e.m @ (p - e.center)
        if float(q @ q) < (1.0 + margin / e.radius) ** 2:
            return True
    return False


def _place_blob(rng: np.random.Generator, an: _Anatomy, geo: _Geometry) -> _Blob | None:
    semi = rng.uniform(6.0, 20.0) * rng.uniform(0.7, 1.0, size=3)  # 10-40 mm across
    rim = _u(rng, 2.0, 6.0) if rng.uniform() < 0.6 else 0.0
    lobes = _Waves.draw(rng, 4, (1.5, 3.0), _u(rng, 0.05, 0.12))
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
        return _Blob(_u(rng, 58.0, 85.0), _Ell.make(centre, semi, _u(rng, 0.0, 180.0)), lobes, rim)
    return None


def _place_ventricular(rng: np.random.Generator, an: _Anatomy, geo: _Geometry) -> _Ventricular | None:
    gravity = geo.pose.T @ np.array([0.0, 1.0, 0.0])  # supine: the dependent side is posterior
    covered = [n for n, e in an.ventricles.items() if _covered(geo, e.center, e.radius * 0.6)]
    horns = [an.ventricles[n] for n in covered if n.startswith(("occipital", "atrium"))]
    if not covered:
        return None
    level = None
    if horns and rng.uniform() < 0.8:
        deepest = max(float(gravity @ e.center) + e.radius * 0.5 for e in horns)
        level = deepest - _u(rng, 4.0, 14.0)
    casts: tuple[str, ...] = ()
    if level is None or rng.uniform() < 0.35:
        casts = (str(rng.choice(covered)),)
    return _Ventricular(_u(rng, 55.0, 82.0), gravity, level, casts)


def _place_subarachnoid(rng: np.random.Generator, an: _Anatomy, geo: _Geometry) -> _Subarachnoid | None:
    k = an.k
    seeds: list[tuple[np.ndarray, float]] = []
    basal = np.array([0.0, -13.0 * k, -20.0 * k])
    if rng.uniform() < 0.55 and _covered(geo, basal, 12.0):  # aneurysmal pattern: basal cisterns and fissures
        seeds.append((basal, _u(rng, 22.0, 32.0) * k))
        for p0, direction, length, _, _ in an.sylvian:
            if rng.uniform() < 0.75:
                mid = p0 + direction * length * _u(rng, 0.3, 0.7)
                seeds.append((np.array([mid[0], mid[1], -12.0 * k]), _u(rng, 16.0, 26.0)))
    ks = _slices_between(geo, an.f_ant, an.c_up - 8.0)
    tries = 0
    while len(seeds) < (1 if seeds else int(rng.integers(1, 3))) and ks and tries < 60:  # convexity
        tries += 1
        phi = rng.uniform(0, 2 * math.pi)
        p = _inner_table_point(an, geo, int(rng.choice(ks)), phi)
        if p is not None:
            seeds.append((p, _u(rng, 18.0, 32.0)))
    if not seeds:
        return None
    return _Subarachnoid(_u(rng, 55.0, 82.0), seeds, _Waves.draw(rng, 2, (12.0, 30.0), 0.5))


def _mass_effect(an: _Anatomy, side: float, amount: float) -> None:
    """Push the midline away from a lesion and squeeze the ventricle on its side."""
    an.shift = -side * amount
    squeeze = np.diag([1.0 / 0.65, 1.0, 1.0])
    for name, e in list(an.ventricles.items()):
        centre = e.center + np.array([an.shift, 0.0, 0.0])
        m = squeeze @ e.m if name.endswith(f"{side:+.0f}") else e.m
        an.ventricles[name] = _Ell(centre, m, e.radius)
    move = np.array([an.shift, 0.0, 0.0])
    an.calcs = [_Ell(e.center + move, e.m, e.radius) for e in an.calcs]
    an.nuclei = [_Ell(e.center + move * 0.6, e.m, e.radius) for e in an.nuclei]


def _draw_lesions(rng: np.random.Generator, an: _Anatomy, geo: _Geometry, subtypes: Sequence[str],
                  mass_effect: bool | None) -> list[_Lesion]:
    lesions: list[_Lesion] = []
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
    big = [x for x in lesions
           if (isinstance(x, _Surface) and x.t_max > (14.0 if x.subtype == "epidural" else 8.0))
           or (isinstance(x, _Blob) and x.ell.radius > 12.0)]
    if big and (rng.uniform() < 0.6 if mass_effect is None else mass_effect):
        les = big[0]
        side = les.side if isinstance(les, _Surface) else math.copysign(1.0, les.ell.center[0])
        _mass_effect(an, side, _u(rng, 2.0, 9.0))
    return lesions


# ------------------------------------------------------------------------------------------ slices


def _render_slice(an: _Anatomy, geo: _Geometry, lesions: Sequence[_Lesion], k: int,
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
            s = _render_head(an, _Grid(q0, ei, ej, crop[0], crop[1], geo.ps))
            parts = _render_deep(an, s)
            _render_lesions(an, s, lesions, parts)
            plane[crop] = s.hu
            bits[crop] |= s.bits
            if i == 0:
                tis[crop] = s.tis
        hu += plane
    hu *= np.float32(1.0 / len(offsets))
    _render_support(geo, k, hu, tis)
    return hu, tis, bits


def _render_support(geo: _Geometry, k: int, hu: np.ndarray, tis: np.ndarray) -> None:
    """Headrest and table behind the head (patient frame, so they ignore the head pose)."""
    if geo.headrest is None or geo.table is None:
        return
    idx = np.arange(geo.size, dtype=np.float32)
    px = np.float32(geo.ipp[k][0]) + idx * np.float32(geo.ps * geo.row[0])  # along columns
    py = np.float32(geo.ipp[k][1]) + idx * np.float32(geo.ps * geo.col[1])  # along rows
    cx, cy, rx, ry, thick, val = geo.headrest
    e = ((px[None, :] - cx) / rx) ** 2 + ((py[:, None] - cy) / ry) ** 2
    rest = (e >= 1.0) & (e < (1.0 + thick / ry) ** 2) & (py[:, None] > cy + 0.3 * ry) & (tis == _T["air"])
    hu[rest], tis[rest] = val, _T["device"]
    ty, tt, tval = geo.table
    rows = (py >= ty) & (py < ty + tt)
    band = rows[:, None] & (tis == _T["air"])
    hu[band], tis[band] = tval, _T["device"]


def _gauss_std(sigma: float) -> float:
    """Standard deviation of unit white noise after scipy's 2-D gaussian_filter with this sigma."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float((w * w).sum())  # separable: sqrt((sum w^2)^2)


def _min_pixels(ps: float) -> int:
    return max(2, int(round(MIN_LESION_MM2 / (ps * ps))))


def _labels_from_bits(bits: np.ndarray, min_px: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------- encoding


def _encode(hu: np.ndarray, encoding: str,
            quirk_intercept: float) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Stored pixel values, their Image Pixel / rescale attributes, and the HU they decode to (as
    ihd_node.imaging.volume.to_hu decodes them, BitsStored-12 quirk included)."""
    slope, intercept, signed, bits = 1.0, -1024.0, False, 16
    if encoding == "int16":
        stored = np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16)
        signed = True
    elif encoding == "int16_zero":
        stored, intercept, signed = np.clip(np.rint(hu), -32768, 32767).astype(np.int16), 0.0, True
    elif encoding == "slope_half":
        stored = np.clip(np.rint((hu + 1024.0) * 2.0), -32768, 32767).astype(np.int16)
        slope, signed = 0.5, True
    elif encoding == "uint16":
        stored = np.clip(np.rint(hu + 1024.0), 0, 65535).astype(np.uint16)
    elif encoding == "uint12":
        stored, bits = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16), 12
    elif encoding == "rsna_quirk":
        # HU stored directly, negatives wrapped at 12 bits, intercept > -100 in the header: the loader
        # must add 1000 with wrap at 4096 and use intercept -1000 (RSNA 2019 data has such files).
        stored = np.mod(np.rint(np.clip(hu, -1000.0, 3095.0)).astype(np.int32), 4096).astype(np.uint16)
        intercept, bits = quirk_intercept, 12
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    values = stored.astype(np.float32)
    if encoding == "rsna_quirk":
        decoded = np.mod(values + 1000.0, 4096.0) + np.float32(-1000.0)
    else:
        decoded = values * np.float32(slope) + np.float32(intercept)
    attrs = {"BitsAllocated": 16, "BitsStored": bits, "HighBit": bits - 1, "PixelRepresentation": int(signed),
             "RescaleIntercept": _ds(intercept), "RescaleSlope": _ds(slope)}
    return stored, attrs, decoded.astype(np.float32)


def _ds(v: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{v:.8g}"


# ------------------------------------------------------------------------------------------- DICOM


def _uid(*parts: object) -> str:
    """A 2.25 UID from a name-based UUID: the same seed gives the same UIDs on every run."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join([_UID_SALT, *map(str, parts)])).int}"


def _series_attrs(seed: int, content: object, rng: np.random.Generator, var: dict[str, Any],
                  geo: _Geometry) -> dict[str, Any]:
    """Attributes shared by every slice (Patient, Study, Series, Equipment, Frame of Reference, Plane).
    Patient and study attributes derive from the patient id and study UID, so series made for one study
    agree on them."""
    # The study names the content too: one seed with other subtypes is another study (its own Study UID and
    # accession number), not a second series of one study that a PACS would merge (issue 7 item 16).
    study = str(var.get("study_instance_uid") or _uid("study", *content))
    patient = str(var.get("patient_id") or seed)
    study_key = uuid.uuid5(uuid.NAMESPACE_OID, study).int
    date = dt.date(2020, 1, 1) + dt.timedelta(days=study_key % 1800)
    seconds = 7 * 3600 + study_key // 1800 % (15 * 3600)
    time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "SOPClassUID": CTImageStorage,
        "PatientName": f"PHANTOM^{patient}",
        "PatientID": patient if var.get("patient_id") else f"PHANTOM-{seed}",
        "PatientBirthDate": "",
        "PatientSex": "MFO"[uuid.uuid5(uuid.NAMESPACE_OID, patient).int % 3],
        "StudyInstanceUID": study,
        "StudyDate": date.strftime("%Y%m%d"),
        "StudyTime": time,
        "ReferringPhysicianName": "",
        "StudyID": f"PH{study_key % 10**8}",
        "AccessionNumber": f"PHA{study_key % 10**8}",
        "StudyDescription": "PHANTOM HEAD CT",
        "Modality": "CT",
        "SeriesInstanceUID": _uid("series", content, study),
        "SeriesNumber": int(var.get("series_number") or 2),
        "SeriesDescription": str(var.get("series_description") or "PHANTOM HEAD CT"),
        "SeriesDate": date.strftime("%Y%m%d"),
        "SeriesTime": time,
        "BodyPartExamined": "HEAD",
        "PatientPosition": "HFS",
        "FrameOfReferenceUID": _uid("frame", content, study),
        "PositionReferenceIndicator": "",
        "Manufacturer": "ihd-node phantom",
        "ManufacturerModelName": "synthetic head CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "AcquisitionNumber": 1,
        "ContentDate": date.strftime("%Y%m%d"),
        "ContentTime": time,
        "KVP": _ds(float(rng.choice([100.0, 120.0, 140.0]))),
        "GantryDetectorTilt": _ds(round(math.degrees(geo.tilt), 4)),
        "ImageOrientationPatient": [_ds(round(v, 6)) for v in (*geo.row, *geo.col)],
        "PixelSpacing": [_ds(round(geo.ps, 6))] * 2,
        "SliceThickness": _ds(round(geo.spacing, 4)),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": geo.size,
        "Columns": geo.size,
        "RescaleType": "HU",
        "WindowCenter": "40",
        "WindowWidth": "80",
    }


def _slice_dataset(common: dict[str, Any], pixel_attrs: dict[str, Any], stored: np.ndarray, sop_uid: str,
                   ipp: np.ndarray, instance: int, z_table: float) -> Dataset:
    ds = Dataset()
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    for keyword, value in pixel_attrs.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(round(float(v), 4)) for v in ipp]
    ds.SliceLocation = _ds(round(z_table, 4))
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "IHD_PHANTOM_1"
    ds.file_meta = meta
    return ds


# -------------------------------------------------------------------------------------- public API


def _choose_subtypes(rng: np.random.Generator, subtypes: Sequence[str] | None) -> tuple[str, ...]:
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
                size: int = 512, **variation: Any) -> PhantomSeries:
    """One synthetic head-CT series, deterministic given the arguments.

    subtypes: None = random (about half negative, else 1-2 random subtypes); [] or ["none"] = negative;
    ["any"] = 1-2 random subtypes; else the named SUBTYPES, each guaranteed on at least one slice.
    n_slices: default random 24-36. Variation keywords (None or absent = random): slice_spacing (mm along
    the normal; default 4-6, or 1-2.5 with thin=True), pixel_spacing, noise_sigma (HU), blur_mm, tilt_deg,
    rotation_deg (in-plane), offset_mm ((x, y)), encoding (one of ENCODINGS), shuffle (file order, default
    True), reverse_instances, headrest, padding, mass_effect, study_instance_uid, patient_id,
    series_number, series_description.
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
    chosen = _choose_subtypes(rng, subtypes)
    n = int(_pick({"n": n_slices}, "n", int(rng.integers(24, 37))))
    base = _draw_anatomy(rng)
    geo = _draw_geometry(rng, base, n, size, variation, "intraventricular" in chosen)
    min_px = _min_pixels(geo.ps)
    partial = bool(_pick(variation, "partial_volume", rng.uniform() < 0.5))
    # Two planes a quarter thickness either side of the centre stand in for the slab of a thick slice.
    offsets = (-geo.spacing / 4, geo.spacing / 4) if partial and geo.spacing > 2.0 else (0.0,)
    for _attempt in range(6):
        an = _copy_anatomy(base)
        lesions = _draw_lesions(lesion_rng, an, geo, chosen, variation.get("mass_effect"))
        clean = [_render_slice(an, geo, lesions, k, offsets) for k in range(n)]
        labels = np.stack([_labels_from_bits(bits, min_px) for _, _, bits in clean])
        if all(labels[:, CLASSES.index(t)].any() for t in chosen):
            break
    else:
        if subtypes is not None:  # asked for: say so; drawn at random: keep what could be placed
            raise UserError(f"phantom seed {seed}: could not place {', '.join(chosen)} on {n} slices of "
                            f"{geo.spacing:.1f} mm; use more slices (--slices) or another seed")
    placed = tuple(t for t in chosen if labels[:, CLASSES.index(t)].any())
    # UIDs name the content: the same arguments give the same UIDs, other arguments other UIDs.
    content = (seed, placed, n, size, sorted((k, repr(v)) for k, v in variation.items()))
    finish_rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, 0x2F1])
    return _finish(seed, content, finish_rng, variation, geo, placed, clean, labels, partial)


def _copy_anatomy(an: _Anatomy) -> _Anatomy:
    """Lesions may add mass effect to the anatomy: each placement attempt starts from the same head."""
    return _Anatomy(**{**an.__dict__, "ventricles": dict(an.ventricles), "calcs": list(an.calcs),
                       "nuclei": list(an.nuclei)})


def _finish(seed: int, content: object, rng: np.random.Generator, var: dict[str, Any], geo: _Geometry,
            placed: tuple[str, ...], clean: list[tuple[np.ndarray, ...]], labels: np.ndarray,
            partial: bool) -> PhantomSeries:
    """Blur, noise, padding, encoding and the DICOM datasets."""
    n, size = len(clean), geo.size
    sigma = float(_pick(var, "noise_sigma", _u(rng, 3.0, 12.0)))
    corr = _u(rng, 0.0, 1.0) * (0.5 + 0.5 * size / 512)  # noise correlation length, pixels
    blur_px = float(_pick(var, "blur_mm", _u(rng, 0.3, 0.6))) / geo.ps  # the scanner's point spread
    encoding = str(_pick(var, "encoding", rng.choice(list(ENCODINGS), p=np.array(list(ENCODINGS.values())))))
    if encoding not in ENCODINGS:
        raise UserError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    pad_value = float(rng.choice([-2000.0, -3024.0]))
    padding = bool(_pick(var, "padding", rng.uniform() < 0.35))
    # Only signed encodings can hold values below -1024 HU outside the reconstruction circle.
    pad_hu = pad_value if padding and encoding in ("int16", "int16_zero", "slope_half") else None
    quirk_intercept = float(rng.choice([0.0, 1.0]))
    reverse = bool(_pick(var, "reverse_instances", rng.uniform() < 0.4))
    common = _series_attrs(seed, content, rng, var, geo)
    yy, xx = np.mgrid[0:size, 0:size]
    outside = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 > (size / 2) ** 2
    sops = [_uid("sop", common["SeriesInstanceUID"], k) for k in range(n)]
    hu_out = np.empty((n, size, size), dtype=np.float32)
    tissue = np.empty((n, size, size), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.uint8)
    datasets: list[Dataset] = []
    norm = np.float32(1.0 / _gauss_std(corr)) if corr > 0.05 else np.float32(1.0)
    for k, (hu, tis, bits) in enumerate(clean):
        img = gaussian_filter(hu, blur_px) if blur_px > 0.05 else hu.copy()
        if sigma > 0:  # CT noise is slightly correlated (the reconstruction kernel): filtered, rescaled
            noise = rng.standard_normal((size, size), dtype=np.float32)
            img += np.float32(sigma) * (gaussian_filter(noise, corr) * norm if corr > 0.05 else noise)
        if pad_hu is not None:
            img[outside], tis[outside] = pad_hu, _T["padding"]
        stored, pixel_attrs, decoded = _encode(img, encoding, quirk_intercept)
        hu_out[k], tissue[k], masks[k] = decoded, tis, bits
        z_table = float(geo.ipp[k][2] + size * geo.ps / 2 * geo.col[2])
        instance = n - k if reverse else k + 1
        datasets.append(_slice_dataset(common, pixel_attrs, stored, sops[k], geo.ipp[k], instance, z_table))
    order = rng.permutation(n) if var.get("shuffle", True) else np.arange(n)
    return PhantomSeries(
        datasets=[datasets[i] for i in order], labels=labels, masks=masks, sop_uids_sorted=sops,
        study_instance_uid=common["StudyInstanceUID"], series_instance_uid=common["SeriesInstanceUID"],
        hu=hu_out, tissue=tissue, seed=int(seed), subtypes=placed, pixel_spacing=geo.ps,
        slice_spacing=geo.spacing, tilt_deg=math.degrees(geo.tilt), encoding=encoding, partial_volume=partial)


def write_series(series: PhantomSeries, outdir: str | Path) -> list[Path]:
    """Write the series' files (in their shuffled order, so names say nothing about position)."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series.datasets):
        path = out / f"IM{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    # A longer series written here before would leave its extra files mixed in with this one.
    for stale in set(out.glob("IM?????.dcm")) - set(paths):
        stale.unlink()
    return paths


def write_study(series: Sequence[PhantomSeries], outdir: str | Path) -> list[Path]:
    """Write several series (e.g. made with one study_instance_uid) into one folder per series."""
    paths: list[Path] = []
    for i, s in enumerate(series):
        paths += write_series(s, Path(outdir) / f"series{i + 1:02d}")
    return paths


def write_rsna_layout(outdir: str | Path, n_series: int, seed: int,
                      on_series: Callable[[PhantomSeries], None] | None = None, **kw: Any) -> Path:
    """The RSNA 2019 layout: stage_2_train/ID_<sop>.dcm per slice and stage_2_train.csv (`ID,Label`, six rows
    per slice in RSNA order). Series seeds are seed, seed+1, ...; kw goes to make_series; on_series sees
    each series after it is written. Returns the CSV path."""
    out = Path(outdir)
    images = out / "stage_2_train"
    images.mkdir(parents=True, exist_ok=True)
    csv_path = out / "stage_2_train.csv"
    columns = [CLASSES.index(name) for name in RSNA_ORDER]
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label"])
        for i in range(n_series):
            s = make_series(seed + i, **kw)
            for ds in s.datasets:
                ds.save_as(images / f"ID_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            for sop, row in zip(s.sop_uids_sorted, s.labels, strict=True):
                writer.writerows([f"ID_{sop}_{name}", int(row[c])]
                                 for name, c in zip(RSNA_ORDER, columns, strict=True))
            if on_series is not None:
                on_series(s)
    return csv_path


def describe(series: PhantomSeries) -> str:
    """One line: UIDs, slices and what is drawn where."""
    found = [c for c in SUBTYPES if series.labels[:, CLASSES.index(c)].any()]
    detail = ", ".join(f"{c} ({int(series.labels[:, CLASSES.index(c)].sum())} slices)" for c in found)
    return (f"seed {series.seed}: {series.n_slices} slices, study {series.study_instance_uid}, "
            f"series {series.series_instance_uid}: {detail or 'no hemorrhage'}")


def phantom_command(args: argparse.Namespace) -> int:
    """`ihd-node phantom OUTDIR`: write args.series series with seeds seed, seed+1, ..."""
    if args.series < 1:
        raise UserError(f"--series must be at least 1, got {args.series}")
    subtypes = args.subtypes
    if subtypes is not None:
        _choose_subtypes(np.random.default_rng(0), subtypes)  # names checked before anything is written
    out = Path(args.outdir)
    kw: dict[str, Any] = {"subtypes": subtypes, "n_slices": args.slices, "size": args.size}
    if args.rsna_layout:
        csv_path = write_rsna_layout(out, args.series, args.seed,
                                     on_series=lambda s: print(describe(s), flush=True), **kw)
        print(f"wrote {out / 'stage_2_train'} and {csv_path}")
        return 0
    for i in range(args.series):
        s = make_series(args.seed + i, **kw)
        folder = out / f"phantom_{args.seed + i}"
        write_series(s, folder)
        print(f"{describe(s)} -> {folder}")
    return 0
