"""Hemorrhage models of generator B, each a 3-D occupancy (0..1) with its own density and texture:

- epidural: a biconvex lens against the inner table, tapering out at the cranial sutures it cannot cross;
- subdural: a crescent following the inner table over a long arc of one hemisphere (never across the
  midline), sometimes along the falx instead;
- subarachnoid: blood filling (and slightly widening) the sulci, fissures and basal cisterns of a few sites;
- intraparenchymal: a noise-thresholded irregular blob in grey or white matter with an oedema rim;
- intraventricular: the dependent (posterior, patient supine) part of the ventricles below a fluid level,
  or a cast filling one lateral ventricle.
Densities: acute 50-90 HU or (a fifth of them) subacute, kept at least 6 HU above grey matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, distance_transform_edt

from ihd_node.sim.generator_b.anatomy import BRAIN, CSF_SPACES, HeadB, T
from ihd_node.sim.generator_b.grid import Box, empty_box, noise_like, smoothstep


@dataclass
class LesionB:
    subtype: str
    occupancy: Box  # 0..1
    hu: Box  # density where occupied (texture included)
    edema: Box | None = None  # 0..1 rim of oedema (intraparenchymal only)
    edema_drop: float = 0.0  # HU below the brain it replaces


def _density(rng: np.random.Generator, head: HeadB, lo: float = 50.0, hi: float = 90.0) -> float:
    value = rng.uniform(lo, hi) if rng.uniform() < 0.8 else rng.uniform(40.0, 50.0)
    return float(max(value, head.hu["grey"] + 6.0))


def _textured(rng: np.random.Generator, occ: Box, value: float, amplitude: float) -> Box:
    tex = noise_like(rng, occ, rng.uniform(1.5, 3.0))
    return Box((value + amplitude * tex.values).astype(np.float32), occ.origin, occ.step)


def _ramp(signed_mm: np.ndarray, step: float) -> np.ndarray:
    """Occupancy from a signed distance (positive inside): a one-voxel ramp across the surface."""
    return np.clip(signed_mm / step + 0.5, 0.0, 1.0).astype(np.float32)


def _inner_point(head: HeadB, u0: np.ndarray) -> tuple[np.ndarray, float]:
    """The inner-table point along the ray u0 from the head centre, and its distance from the centre."""
    centre = np.array([0.0, 0.0, head.centre_z])
    probe = centre + 50.0 * u0
    depth, _ = head.depth(probe[None])
    outer = 50.0 + float(depth[0])
    radius = outer - head.scalp_mm - float(head.skull_thickness(u0[None])[0])
    return centre + radius * u0, radius


def _rays(head: HeadB, pts: np.ndarray) -> np.ndarray:
    rel = pts - np.array([0.0, 0.0, head.centre_z])
    return rel / (np.linalg.norm(rel, axis=-1, keepdims=True) + 1e-9)


def _depth_where(head: HeadB, pts: np.ndarray, where: np.ndarray) -> np.ndarray:
    """intracranial_depth at the points selected (the costly part), -1 (outside) elsewhere."""
    out = np.full(len(pts), -1.0)
    idx = np.flatnonzero(where)
    out[idx] = head.intracranial_depth(pts[idx])
    return out


def epidural(rng: np.random.Generator, head: HeadB) -> LesionB:
    side = float(rng.choice([-1.0, 1.0]))
    for _ in range(20):
        u0 = np.array([side * rng.uniform(0.5, 1.0), rng.uniform(-0.9, 0.9), rng.uniform(-0.1, 0.7)])
        u0 /= np.linalg.norm(u0)
        p0, r_in = _inner_point(head, u0)
        if p0[2] > head.floor_z(p0[:1], p0[1:2])[0] + 12:
            break
    h, reach = rng.uniform(8, 24), rng.uniform(22, 42)
    step = 0.8
    box = empty_box(p0 - reach - 6, p0 + reach + 6, step)
    pts = box.points().reshape(-1, 3)
    s = np.arccos(np.clip(_rays(head, pts) @ u0, -1, 1)) * r_in
    thick = h * np.sqrt(np.clip(1 - (s / reach) ** 2, 0, 1))
    d_in = _depth_where(head, pts, thick > 0)
    # The dura is fixed at the sutures: the lens stays within the bone its centre lies under.
    s1 = head.brain_scale[1]
    def sutures(q: np.ndarray) -> list[np.ndarray]:  # sagittal, coronal, lambdoid: signed distances
        return [q[..., 0] - head.midline, q[..., 1] - (-12 * s1 + 0.3 * q[..., 2]),
                q[..., 1] - (52 * s1 - 0.5 * q[..., 2])]

    for dist, at_centre in zip(sutures(pts), sutures(p0), strict=True):
        thick = thick * smoothstep(np.sign(at_centre) * dist, 0.0, 10.0)
    occ = _ramp(np.minimum(thick - d_in, d_in + 0.5), step) * (thick > 0.3)
    box.values = occ.reshape(box.values.shape).astype(np.float32)
    return LesionB("epidural", box, _textured(rng, box, _density(rng, head), rng.uniform(1, 4)))


def subdural(rng: np.random.Generator, head: HeadB) -> LesionB:
    side = float(rng.choice([-1.0, 1.0]))
    step = 1.0
    sx, sy, sz = head.semi
    lo = np.array([head.midline if side > 0 else -sx, -sy, head.floor[2]])
    hi = np.array([sx if side > 0 else head.midline, sy, head.centre_z + sz])
    box = empty_box(lo, hi, step)
    pts = box.points().reshape(-1, 3)
    h = rng.uniform(4, 16)
    if rng.uniform() < 0.2:  # along the falx
        dx = np.abs(pts[:, 0] - head.midline)
        y0 = rng.uniform(-30, 30)
        along = np.exp(-((pts[:, 1] - y0) / rng.uniform(25, 45)) ** 2)
        thick = (0.6 * h * along) * (pts[:, 2] > head.fissure_floor(pts[:, 1]) + 4) * (dx < 0.6 * h + 2)
        d_in = _depth_where(head, pts, thick > 0.4)
        signed = np.minimum(thick - dx, d_in)
    else:
        u = _rays(head, pts)
        az0, el0 = rng.uniform(-0.5, 0.5), rng.uniform(0.0, 0.6)
        az = np.arctan2(u[:, 1], side * u[:, 0])
        el = np.arcsin(np.clip(u[:, 2], -1, 1))
        wide, tall = rng.uniform(0.9, 1.5), rng.uniform(0.6, 1.0)
        weight = np.exp(-(((az - az0) / wide) ** 2 + ((el - el0) / tall) ** 2) ** 1.5)
        thick = h * weight * smoothstep(side * (pts[:, 0] - head.midline), 4.0, 16.0)
        d_in = _depth_where(head, pts, thick > 0.4)
        signed = np.minimum(thick - d_in, d_in + 0.5)
    occ = _ramp(signed, step) * (thick > 0.4)
    box.values = occ.reshape(box.values.shape).astype(np.float32)
    return LesionB("subdural", box, _textured(rng, box, _density(rng, head), rng.uniform(1, 4)))


def subarachnoid(rng: np.random.Generator, head: HeadB) -> LesionB:
    s = head.brain_scale
    sites = {"sylvian_left": (np.array([35.0 * s[0], -6 * s[1], -6 * s[2]]), 22.0),
             "sylvian_right": (np.array([-35.0 * s[0], -6 * s[1], -6 * s[2]]), 22.0),
             "basal": (np.array([0.0, 0.0, -14 * s[2]]), 24.0),
             "interhemispheric": (np.array([0.0, rng.uniform(-40, 20), 35 * s[2]]), 25.0)}
    u0 = np.array([rng.choice([-1, 1]) * rng.uniform(0.4, 1), rng.uniform(-0.8, 0.8), rng.uniform(0.3, 0.9)])
    u0 /= np.linalg.norm(u0)
    p0, _ = _inner_point(head, u0)
    sites["convexity"] = (p0 - 8 * u0, 28.0)
    names = list(sites)
    chosen = [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)]
    centres = np.array([sites[n][0] + [head.midline, 0, 0] for n in chosen])
    radii = np.array([sites[n][1] * rng.uniform(0.8, 1.4) for n in chosen])
    step = 1.0
    box = empty_box(centres.min(axis=0) - radii.max() - 2, centres.max(axis=0) + radii.max() + 2, step)
    pts = box.points().reshape(-1, 3)
    noise = noise_like(rng, box, 6.0).values.reshape(-1)
    near = np.zeros(len(pts), dtype=bool)
    for c, r in zip(centres, radii, strict=True):
        near |= np.linalg.norm(pts - c, axis=1) < r * (1 + 0.3 * noise)
    code = np.zeros(len(pts), dtype=np.uint8)
    code[near] = head.evaluate(pts[near])[1]
    code = code.reshape(box.values.shape)
    spaces = np.isin(code, CSF_SPACES)
    # Blood distends the spaces it fills: one voxel wider, but never into bone or the ventricles.
    spaces = binary_dilation(spaces) & np.isin(code, CSF_SPACES + BRAIN + (T["falx"],))
    box.values = (spaces.reshape(-1) & near).astype(np.float32).reshape(box.values.shape)
    return LesionB("subarachnoid", box, _textured(rng, box, _density(rng, head, 50, 80) - 5.0, 3.0))


def intraparenchymal(rng: np.random.Generator, head: HeadB) -> LesionB:
    s = head.brain_scale
    for _ in range(40):
        site = rng.uniform()
        if site < 0.45:  # deep: basal ganglia or thalamus
            base = np.array([rng.choice([-1, 1]) * rng.uniform(10, 25) * s[0], rng.uniform(-15, 18) * s[1],
                             rng.uniform(-2, 14) * s[2]])
        elif site < 0.9:  # lobar: somewhere in the hemispheres
            u0 = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-0.1, 0.8)])
            u0 /= np.linalg.norm(u0)
            base = _inner_point(head, u0)[0] - u0 * rng.uniform(14, 30)
        else:  # cerebellar
            base = np.array([rng.choice([-1, 1]) * rng.uniform(12, 28), rng.uniform(38, 52) * s[1],
                             head.floor[2] + rng.uniform(14, 24)])
        centre = base + [head.midline, 0, 0]
        _, code = head.evaluate(centre[None])
        if code[0] in BRAIN and head.intracranial_depth(centre[None])[0] > 8:
            break
    radius = rng.uniform(6, 20)
    axes = radius * rng.uniform(0.7, 1.3, size=3)
    step = 0.75
    margin = axes.max() * 1.6 + 10
    box = empty_box(centre - margin, centre + margin, step)
    pts = box.points().reshape(-1, 3)
    noise = noise_like(rng, box, rng.uniform(2.5, 5.0)).values.reshape(-1)
    q = np.sqrt(np.sum(((pts - centre) / axes) ** 2, axis=1)) + rng.uniform(0.15, 0.35) * noise
    occ = _ramp((1 - q) * radius, step)
    occ *= 1 - head.ventricles.occupancy.sample(pts)
    occ *= _ramp(head.intracranial_depth(pts) - 2.0, step)
    shape = box.values.shape
    box.values = occ.reshape(shape)
    rim = rng.uniform(2, 8)
    dist = distance_transform_edt(box.values < 0.5) * step
    edema = np.clip(1 - dist / (rim * (1 + 0.3 * noise.reshape(shape))), 0, 1) * (box.values < 0.5)
    return LesionB("intraparenchymal", box, _textured(rng, box, _density(rng, head), rng.uniform(2, 6)),
                   edema=Box(edema.astype(np.float32), box.origin, step), edema_drop=rng.uniform(5, 12))


def intraventricular(rng: np.random.Generator, head: HeadB) -> LesionB:
    vent = head.ventricles.occupancy
    box = Box(vent.values.copy(), vent.origin.copy(), vent.step)
    x, y, _ = box.axes()
    values = box.values
    side_mask = np.ones_like(values)
    if rng.uniform() < 0.35:  # one lateral ventricle only
        side = rng.choice([-1.0, 1.0])
        side_mask = smoothstep(side * (x - head.midline), 1.0, 3.0)[:, None, None] * np.ones_like(values)
    if rng.uniform() < 0.3:  # a cast
        occ = values * side_mask
    else:  # layering blood with a horizontal fluid level (patient supine: posterior is dependent)
        weights = values * side_mask
        ys = np.broadcast_to(y[None, :, None], values.shape)
        order = np.argsort(ys, axis=None)
        cum = np.cumsum(weights.reshape(-1)[order])
        level = ys.reshape(-1)[order][np.searchsorted(cum, cum[-1] * (1 - rng.uniform(0.2, 0.5)))]
        occ = weights * np.clip((ys - level) / box.step + 0.5, 0, 1)
    box.values = occ.astype(np.float32)
    return LesionB("intraventricular", box, _textured(rng, box, _density(rng, head), rng.uniform(1, 3)))


MAKERS = {"epidural": epidural, "subdural": subdural, "subarachnoid": subarachnoid,
          "intraparenchymal": intraparenchymal, "intraventricular": intraventricular}
