"""Domain randomization of the phantom generator (`make_series(..., randomize=True)`, issue 21): wider
anatomy, lesions and scanner, deterministic, and the default phantoms untouched."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

from ihd_node.classes import CLASSES, SUBTYPES
from ihd_node.sim import phantom

T = phantom.TISSUE
CLEAN = {"noise_sigma": 0.0, "blur_mm": 0.0, "partial_volume": False}


def _mask(series: phantom.PhantomSeries, subtype: str) -> np.ndarray:
    return (series.masks & (1 << SUBTYPES.index(subtype))) != 0


def test_randomized_is_deterministic_and_leaves_the_default_alone() -> None:
    a = phantom.make_series(31, subtypes=["intraventricular"], size=96, randomize=True)
    b = phantom.make_series(31, subtypes=["intraventricular"], size=96, randomize=True)
    assert np.array_equal(a.hu, b.hu) and a.series_instance_uid == b.series_instance_uid
    plain = phantom.make_series(31, subtypes=["intraventricular"], size=96)
    default = phantom.make_series(31, subtypes=["intraventricular"], size=96, randomize=False)
    assert np.array_equal(plain.hu, default.hu) and plain.series_instance_uid == default.series_instance_uid
    assert plain.series_instance_uid != a.series_instance_uid  # other content, other UIDs
    assert a.hu.shape[1:] == plain.hu.shape[1:] and not np.array_equal(a.hu[: len(plain.hu)], plain.hu[: len(a.hu)])


def test_randomized_places_every_asked_subtype_with_consistent_labels() -> None:
    for k, subtype in enumerate(SUBTYPES):
        s = phantom.make_series(500 + k, subtypes=[subtype], size=96, randomize=True)
        assert s.subtypes == (subtype,)
        col = s.labels[:, CLASSES.index(subtype)]
        assert col.any() and np.array_equal(col.astype(bool), _mask(s, subtype).any(axis=(1, 2)))
        others = [c for c in SUBTYPES if c != subtype]
        assert not s.labels[:, [CLASSES.index(c) for c in others]].any()
    mixed = phantom.make_series(77, subtypes=["intraparenchymal", "intraventricular"], size=96, randomize=True)
    assert mixed.subtypes == ("intraparenchymal", "intraventricular")


def test_randomized_ranges_are_wider_than_the_default() -> None:
    """Blood below the default's 55 HU, slice spacing outside 4-6 mm, and intraparenchymal clots right
    against a ventricle (the default keeps them away), over a handful of seeds."""
    blood, spacings, touching = [], [], 0
    for k in range(10):
        s = phantom.make_series(900 + k, subtypes=["intraparenchymal"], size=112, randomize=True, **CLEAN)
        m = _mask(s, "intraparenchymal")
        blood.append(float(np.median(s.hu[m])))
        spacings.append(s.slice_spacing)
        near = binary_dilation(m, iterations=2, structure=np.ones((1, 3, 3), bool)) & (s.tissue == T["ventricle"])
        touching += bool(near.any())
    assert min(blood) < 52.0 and max(blood) > 70.0, blood
    assert min(spacings) < 4.0 and max(spacings) > 6.0, spacings
    assert touching >= 2, touching
    ivh = [phantom.make_series(950 + k, subtypes=["intraventricular"], size=112, randomize=True, **CLEAN)
           for k in range(4)]
    for s in ivh:  # intraventricular blood always sits in the ventricles (blood next to ventricle CSF)
        m = _mask(s, "intraventricular")
        near = binary_dilation(m, iterations=2, structure=np.ones((1, 3, 3), bool))
        assert (near & ((s.tissue == T["ventricle"]) | (s.tissue == T["calcification"]))).any() or m.sum() < 40
