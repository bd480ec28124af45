"""The head check: phantom heads of every size pass, trunk CT and a water phantom fail, and a body part in the
header that names another region refuses without looking at the images."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from ihd_node.config import SeriesConfig
from ihd_node.imaging.head_check import SAMPLE_AT, body_part_problem, head_problem, look, sample_indices
from ihd_node.imaging.volume import slice_headers
from ihd_node.sim.phantom import make_series, write_series
from ihd_node.triage.select import judge_series
from tests.trunk import cross_section, write_ct_series


@pytest.mark.parametrize(("seed", "size", "n"), [(1, 64, 10), (2, 128, 24), (3, 256, 36), (4, 512, 12)])
def test_phantom_heads_pass(seed: int, size: int, n: int) -> None:
    series = make_series(seed, n_slices=n, size=size)
    ps = float(series.datasets[0].PixelSpacing[0])
    images = [series.hu[i] for i in sample_indices(n)]
    assert head_problem(images, (ps, ps)) is None
    best = max((look(im, (ps, ps)) for im in images), key=lambda lk: lk.enclosed_share)
    assert best.enclosed_share > 0.5 and best.density_share > 0.9 and best.fat_share < 0.01


def test_a_noisy_bone_kernel_head_passes() -> None:
    series = make_series(70, n_slices=12, size=64, noise_sigma=60.0)
    ps = float(series.datasets[0].PixelSpacing[0])
    assert head_problem([series.hu[i] for i in sample_indices(12)], (ps, ps)) is None


@pytest.mark.parametrize("kind", ["abdomen", "chest", "pelvis", "water"])
@pytest.mark.parametrize("size", [64, 512])
def test_trunk_and_water_fail_with_the_figures(kind: str, size: int) -> None:
    images = [cross_section(kind, size, seed=s) for s in range(3)]
    problem = head_problem(images, (400.0 / size, 400.0 / size))
    assert problem is not None and "does not look like a head CT" in problem and "of the body inside" in problem


@pytest.mark.parametrize(("value", "refused"), [
    ("HEAD", False), ("Brain", False), ("HEADNECK", False), ("", False), ("WHOLEBODY", False),
    ("CHEST", True), ("ABDOMEN", True), ("LSPINE", True), ("ABDOMEN PELVIS", True), ("EXAMPLE", False)])
def test_body_part_examined(value: str, refused: bool) -> None:
    ds = Dataset()
    ds.BodyPartExamined = value
    assert (body_part_problem([ds]) is not None) is refused


def test_judge_series_reads_the_images_and_honours_require_head(tmp_path: Path) -> None:
    paths = write_ct_series([cross_section("abdomen", 64, seed=i) for i in range(12)], tmp_path / "abd")
    refs = slice_headers(paths)
    verdict = judge_series(refs)
    assert not verdict.ok and "does not look like a head CT" in verdict.reason
    assert judge_series(refs, SeriesConfig(require_head=False)).ok
    chest = write_ct_series([cross_section("chest", 64, seed=i) for i in range(12)], tmp_path / "chest",
                            body_part="CHEST")
    assert judge_series(slice_headers(chest)).reason == "BodyPartExamined CHEST is not the head"
    head = make_series(5, n_slices=12, size=64)
    write_series(head, tmp_path / "head")
    ok = judge_series(slice_headers(sorted((tmp_path / "head").iterdir())))
    assert ok.ok and ok.reason.endswith(", head")


def test_sample_is_the_same_nine_slices_middle_first() -> None:
    for n in (1, 2, 10, 32, 300):
        order = sample_indices(n)
        assert sorted(order) == sorted({min(n - 1, max(0, round(f * (n - 1)))) for f in SAMPLE_AT})
        assert len(order) == len(set(order))
        distances = [abs(2 * i - (n - 1)) for i in order]
        assert distances == sorted(distances)  # the middle of the stack first
    assert sample_indices(0) == []


def test_head_check_stops_at_the_first_head_slice() -> None:
    """One passing slice decides: the slices after it are neither read nor measured (a head costs one
    look instead of nine). Before, every sampled slice was read and measured."""
    series = make_series(5, n_slices=12, size=64)
    ps = float(series.datasets[0].PixelSpacing[0])
    asked = []

    def images():
        for i in sample_indices(12):
            asked.append(i)
            if len(asked) > 1:
                raise AssertionError("read a slice after one had passed")
            yield series.hu[i]

    assert head_problem(images(), (ps, ps)) is None
    assert len(asked) == 1
    # Any slice may be the one: a head slice after trunk slices still passes, as before.
    trunk = [cross_section("abdomen", 64, seed=s) for s in range(3)]
    assert head_problem([*trunk, series.hu[6]], (ps, ps)) is None
