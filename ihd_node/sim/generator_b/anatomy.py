"""The head of generator B: a perturbed superquadric scalp surface, a skull of direction-dependent
thickness with outer/inner tables and diploe, a skull base of three fossae, and a brain with a CSF rim,
a gyral grey/white boundary and sulcal clefts drawn from random fields, deep grey nuclei, cisterns,
Sylvian and interhemispheric fissures, a falx, and spline-skeleton ventricles with calcifications.

Frame: millimetres, x to the patient's left, y posterior, z superior; the origin is near the centre of
the cranial cavity. `evaluate` gives HU and a tissue code at any points, so slices at any tilt agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ihd_node.sim.generator_b.grid import Box, noise_box, smoothstep
from ihd_node.sim.generator_b.ventricles import Ventricles, draw_ventricles

# Tissue codes of generator B (its own vocabulary; labels never depend on them).
TISSUES_B: tuple[str, ...] = ("air", "scalp", "fat", "bone", "diploe", "soft", "csf", "sulcus", "fissure",
                              "cistern", "ventricle", "grey", "white", "deep_grey", "falx", "calcification",
                              "skull_base")
T = {name: code for code, name in enumerate(TISSUES_B)}
CSF_SPACES = (T["csf"], T["sulcus"], T["fissure"], T["cistern"])
BRAIN = (T["grey"], T["white"], T["deep_grey"])


def _monomials(u: np.ndarray) -> np.ndarray:
    """Polynomials of degree 1-3 in the unit direction (m, 3): a low-order spherical-harmonic basis."""
    x, y, z = u[:, 0], u[:, 1], u[:, 2]
    return np.stack([x, y, z, x * x - y * y, x * y, y * z, x * z, 3 * z * z - 1, x * y * z, z * (x * x - y * y),
                     y * (3 * x * x - y * y), x * (x * x - 3 * y * y)], axis=1)


@dataclass
class HeadB:
    semi: np.ndarray  # outer scalp semi-axes (x, y, z), mm
    power: float  # superquadric exponent (2 = ellipsoid, larger = boxier)
    centre_z: float  # z of the superquadric centre
    shape_coef: np.ndarray  # surface perturbation on _monomials
    scalp_mm: float
    fat_share: float  # share of the scalp that is subcutaneous fat
    skull_mm: float
    skull_coef: np.ndarray  # skull thickness perturbation on _monomials
    csf_mm: float  # convexity CSF (atrophy widens it)
    cortex_mm: float
    gyral_mm: float  # amplitude of the grey/white boundary's undulation
    sulcus_width: float  # |field| below this is a sulcus (on a unit-variance field)
    sulcus_depth: float
    floor: np.ndarray  # anterior, middle, posterior fossa floor z
    floor_mm: float
    midline: float
    hu: dict[str, float]
    texture: Box
    gyri: Box
    sulci: Box
    ventricles: Ventricles
    brain_scale: np.ndarray
    calcifications: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # centre, radius, HU

    def depth(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(depth below the scalp surface along the ray from the centre (mm, <0 outside), unit rays)."""
        rel = pts - np.array([0.0, 0.0, self.centre_z])
        r = np.linalg.norm(rel, axis=1) + 1e-9
        u = rel / r[:, None]
        q = np.abs(rel / self.semi) ** self.power
        rho = q.sum(axis=1) ** (1.0 / self.power)
        rho_p = rho / (1.0 + _monomials(u) @ self.shape_coef)
        return r * (1.0 / np.maximum(rho_p, 1e-9) - 1.0), u

    def skull_thickness(self, u: np.ndarray) -> np.ndarray:
        t = self.skull_mm * (1.0 + 0.25 * u[:, 1] ** 2 + _monomials(u) @ self.skull_coef)
        return np.clip(t, 2.5, 14.0)

    def floor_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Skull-base floor: anterior fossa high, middle fossa lateral dips, posterior fossa low."""
        ant, mid, post = self.floor
        base = ant + (post - ant) * smoothstep(y, -5.0, 35.0)
        dip = (mid - ant) * np.exp(-((y + 2.0) / 18.0) ** 2) * smoothstep(np.abs(x - self.midline), 12.0, 36.0)
        return base + dip

    def fissure_floor(self, y: np.ndarray) -> np.ndarray:
        """Lowest z of the interhemispheric fissure: above the corpus callosum centrally, to the base at
        the frontal and occipital poles."""
        s = self.brain_scale
        return 24.0 * s[2] - 60.0 * (smoothstep(-y, 32.0 * s[1], 48.0 * s[1]) + smoothstep(y, 45.0 * s[1], 60.0 * s[1]))

    def intracranial_depth(self, pts: np.ndarray) -> np.ndarray:
        """Distance below the inner table or above the skull-base floor (mm, <0 outside the cavity)."""
        depth, u = self.depth(pts)
        d_in = depth - self.scalp_mm - self.skull_thickness(u)
        return np.minimum(d_in, pts[:, 2] - self.floor_z(pts[:, 0], pts[:, 1]))

    def evaluate(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(HU float32, tissue code uint8) at points (m, 3)."""
        hu = np.full(len(pts), self.hu["air"], dtype=np.float32)
        code = np.zeros(len(pts), dtype=np.uint8)
        # Only points within the head's bounding sphere can be in it (most of a slice is air).
        near = np.flatnonzero(np.sum((pts - [0.0, 0.0, self.centre_z]) ** 2, axis=1)
                              < (1.1 * float(self.semi.max())) ** 2)
        depth, u = self.depth(pts[near])
        keep = depth >= 0
        head = near[keep]
        if head.size == 0:
            return hu, code
        p, d, uu = pts[head], depth[keep], u[keep]
        skull = self.skull_thickness(uu)
        fat = (d > self.scalp_mm * (1 - self.fat_share) * 0.5) & (d < self.scalp_mm * (0.5 + 0.5 * self.fat_share))
        c = np.where(fat, T["fat"], T["scalp"]).astype(np.uint8)
        # Tables are the outer and inner quarter of the skull; the diploe between them is less dense.
        in_bone = (d >= self.scalp_mm) & (d < self.scalp_mm + skull)
        frac = (d - self.scalp_mm) / skull
        c[in_bone] = np.where((frac[in_bone] > 0.28) & (frac[in_bone] < 0.72) & (skull[in_bone] > 4.0),
                              T["diploe"], T["bone"])
        d_in = d - self.scalp_mm - skull
        fz = self.floor_z(p[:, 0], p[:, 1])
        above = p[:, 2] - fz
        inside = (d_in >= 0) & (above >= 0)
        base_bone = (d_in >= 0) & (above < 0) & (above > -self.floor_mm)
        c[base_bone] = T["skull_base"]
        below = (d_in >= 0) & (above <= -self.floor_mm)
        c[below] = T["soft"]
        code[head] = c
        hu[head] = self._tissue_hu(c)
        for centre, semi, _name in self._air_cells():
            q = np.sum(((p[below] - centre) / semi) ** 2, axis=1) < 1
            idx = head[np.flatnonzero(below)[q]]
            code[idx], hu[idx] = T["air"], self.hu["air"] + 150
        cav = np.flatnonzero(inside)
        if cav.size:
            bc, bh = self._brain(p[cav], np.minimum(d_in[cav], above[cav]))
            code[head[cav]], hu[head[cav]] = bc, bh
        return hu, code

    def _air_cells(self) -> list[tuple[np.ndarray, np.ndarray, str]]:
        ant, mid, post = self.floor
        return [(np.array([self.midline, -48.0, ant - 22.0]), np.array([16.0, 14.0, 12.0]), "sinus"),
                (np.array([self.midline + 42.0, 18.0, mid - 14.0]), np.array([7.0, 8.0, 7.0]), "mastoid"),
                (np.array([self.midline - 42.0, 18.0, mid - 14.0]), np.array([7.0, 8.0, 7.0]), "mastoid")]

    def _tissue_hu(self, codes: np.ndarray) -> np.ndarray:
        table = np.array([self.hu.get(name, 0.0) for name in TISSUES_B], dtype=np.float32)
        return table[codes]

    def _brain(self, p: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue inside the cranial cavity at depth d below its wall."""
        tex = self.texture.sample(p)
        gyr = self.gyri.sample(p)
        sul = self.sulci.sample(p, outside=10.0)
        csf_layer = self.csf_mm * (1.0 + 0.45 * tex)
        grey_to = csf_layer + self.cortex_mm + self.gyral_mm * (1.0 + gyr)
        c = np.where(d < grey_to, T["grey"], T["white"]).astype(np.uint8)
        s = self.brain_scale
        x, y, z = p[:, 0] - self.midline, p[:, 1], p[:, 2]
        for cx, cy, cz, ax, ay, az in ((22, -2, 2, 6, 14, 9), (10, 14, 5, 8, 11, 8), (13, -16, 10, 5, 8, 8)):
            for side in (1, -1):
                q = ((x - side * cx * s[0]) / ax) ** 2 + ((y - cy * s[1]) / ay) ** 2 + ((z - cz * s[2]) / az) ** 2
                c[q < 1] = T["deep_grey"]
        sulcus = (np.abs(sul) < self.sulcus_width) & (d < self.sulcus_depth + 4 * tex) & (d > 0)
        c[sulcus] = T["sulcus"]
        # Sylvian fissures: thin clefts from the suprasellar region out to the lateral surface.
        for side in (1, -1):
            a = np.array([side * 26.0 * s[0], -9.0 * s[1]])
            b = np.array([side * 64.0 * s[0], 6.0 * s[1]])
            t = np.clip(((x - a[0]) * (b[0] - a[0]) + (y - a[1]) * (b[1] - a[1])) / np.sum((b - a) ** 2), 0, 1)
            dist = np.hypot(x - a[0] - t * (b[0] - a[0]), y - a[1] - t * (b[1] - a[1]))
            c[(dist < 0.6 + 1.6 * t) & (z > -14 * s[2] + 6 * t) & (z < 2 * s[2] + 4 * t)] = T["fissure"]
        # Perimesencephalic cistern around the midbrain and the suprasellar cistern in front of it.
        ring = (x / (17 * s[0])) ** 2 + ((y - 8 * s[1]) / (15 * s[1])) ** 2 + ((z + 14 * s[2]) / (7 * s[2])) ** 2
        mid = (x / (13.5 * s[0])) ** 2 + ((y - 8 * s[1]) / (12 * s[1])) ** 2 + ((z + 14 * s[2]) / (12 * s[2])) ** 2
        supra = (x / (9 * s[0])) ** 2 + ((y + 12 * s[1]) / (7 * s[1])) ** 2 + ((z + 15 * s[2]) / (5 * s[2])) ** 2
        c[((ring < 1) & (mid >= 1)) | (supra < 1)] = T["cistern"]
        c[d < csf_layer] = T["csf"]
        bend = 2.0 * np.sin(y / 40.0)
        fiss = (np.abs(x - bend) < 1.3) & (z > self.fissure_floor(y))
        c[fiss] = T["fissure"]
        c[(np.abs(x - bend) < 0.45) & (z > self.fissure_floor(y) + 6) & (d > 1.0)] = T["falx"]
        vent = self.ventricles.occupancy.sample(p)
        c[vent >= 0.5] = T["ventricle"]
        for centre, radius, _ in self.calcifications:
            c[np.sum((p - centre) ** 2, axis=1) < radius ** 2] = T["calcification"]
        hu = self._tissue_hu(c)
        brain = np.isin(c, BRAIN)
        hu[brain] += self.hu["texture"] * tex[brain] + 0.5 * self.hu["texture"] * gyr[brain]
        for centre, radius, value in self.calcifications:
            hit = np.sum((p - centre) ** 2, axis=1) < radius ** 2
            hu[hit] = value
        return c, hu


def draw_head(rng: np.random.Generator) -> HeadB:
    """A random adult head."""
    semi = np.array([rng.uniform(68, 82), rng.uniform(88, 104), rng.uniform(82, 96)])
    brain_scale = np.array([semi[0] / 75.0, semi[1] / 96.0, semi[2] / 89.0])
    midline = float(rng.normal(0.0, 1.0))
    hu = {"air": -1000.0, "scalp": rng.uniform(25, 55), "fat": rng.uniform(-110, -70),
          "bone": rng.uniform(1300, 1900), "diploe": rng.uniform(450, 900), "soft": rng.uniform(30, 60),
          "csf": rng.uniform(2, 12), "sulcus": 0.0, "fissure": 0.0, "cistern": 0.0, "ventricle": 0.0,
          "grey": rng.uniform(34, 42), "white": 0.0, "deep_grey": 0.0, "falx": rng.uniform(50, 80),
          "calcification": 250.0, "texture": rng.uniform(1.0, 3.0)}
    hu["skull_base"] = hu["bone"]
    hu["sulcus"] = hu["fissure"] = hu["cistern"] = hu["ventricle"] = hu["csf"]
    hu["white"] = hu["grey"] - rng.uniform(7, 13)
    hu["deep_grey"] = hu["grey"] - rng.uniform(0, 3)
    lo, hi = -semi - 5, semi + 5
    lo[2] += -10.0
    atrophy = rng.uniform(0.0, 1.0) ** 2
    vent = draw_ventricles(rng, brain_scale, midline)
    head = HeadB(
        semi=semi, power=rng.uniform(2.0, 2.6), centre_z=rng.uniform(-14, -6),
        shape_coef=rng.normal(0, 0.015, size=12), scalp_mm=rng.uniform(4, 8), fat_share=rng.uniform(0.2, 0.5),
        skull_mm=rng.uniform(4.5, 8.0), skull_coef=rng.normal(0, 0.06, size=12),
        csf_mm=1.0 + 3.0 * atrophy, cortex_mm=rng.uniform(2.0, 3.5), gyral_mm=rng.uniform(2.0, 4.0),
        sulcus_width=0.06 + 0.08 * atrophy, sulcus_depth=rng.uniform(12, 20),
        floor=np.array([rng.uniform(-22, -14), rng.uniform(-42, -34), rng.uniform(-56, -46)]),
        floor_mm=rng.uniform(7, 12), midline=midline, hu=hu,
        texture=noise_box(rng, lo, hi, 2.0, 6.0), gyri=noise_box(rng, lo, hi, 1.5, 4.5),
        sulci=noise_box(rng, lo, hi, 1.25, 3.0), ventricles=vent, brain_scale=brain_scale)
    if rng.uniform() < 0.7:  # choroid plexus calcification in the atria, usually both sides
        for atrium in vent.atria:
            if rng.uniform() < 0.85:
                centre = atrium + rng.normal(0, 1.5, 3)
                head.calcifications.append((centre, rng.uniform(1.5, 3.0), rng.uniform(120, 350)))
    if rng.uniform() < 0.5:  # pineal calcification
        centre = np.array([midline, 22.0 * brain_scale[1], 4.0 * brain_scale[2]]) + rng.normal(0, 1.0, 3)
        head.calcifications.append((centre, rng.uniform(1.5, 3.0), rng.uniform(100, 300)))
    return head
