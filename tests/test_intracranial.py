"""The intracranial mask: inside the skull, never bone, scalp or air; holds the bleeds of the phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from ihd_node.imaging.intracranial import intracranial_mask
from ihd_node.sim.phantom import make_series
from tests.test_report_common import head_slice


def test_crude_head_mask_is_the_brain_inside_the_ring() -> None:
    hu = head_slice(128, 0, bleed=True)
    mask = intracranial_mask(hu)
    assert mask.any()
    np.testing.assert_array_equal(mask, (hu > -500) & (hu < 300))


def test_no_skull_no_intracranial_space() -> None:
    assert not intracranial_mask(np.full((64, 64), 40.0, np.float32)).any()
    assert not intracranial_mask(np.full((64, 64), -1000.0, np.float32)).any()
    with pytest.raises(ValueError):
        intracranial_mask(np.zeros((2, 8, 8)))


def test_phantom_bleeds_lie_inside_and_bone_and_air_outside() -> None:
    inside = total = 0
    for k, subtype in enumerate(["epidural", "subdural", "subarachnoid", "intraparenchymal"]):
        series = make_series(7_100_000 + k, subtypes=[subtype], n_slices=12, size=256)
        for hu, bits in zip(series.hu, series.masks, strict=True):
            mask = intracranial_mask(hu, 256 / 512 * 1.0)
            assert not (mask & (hu >= 300)).any() and not (mask & (hu < -50)).any()
            # Lesion pixels with blood density (the masks also cover partial-volume bone at the table).
            blood = (bits != 0) & (hu > 40) & (hu < 120)
            if blood.any():
                assert mask.any()
            inside += int((blood & mask).sum())
            total += int(blood.sum())
    assert total > 500
    assert inside / total >= 0.95, f"{inside}/{total}"
