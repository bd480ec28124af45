"""One slice normal, one stack sort: ties, duplicate positions (kept, and said what was dropped), and the
orientation errors, on phantom files and plain headers."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ihd_node.imaging.coverage import sorted_stack
from ihd_node.imaging.headers import (
    SliceGeometry,
    VolumeError,
    geometry_cache,
    slice_normal,
    slice_thickness,
    sort_stack,
    tilt_degrees,
)
from ihd_node.imaging.volume import load_volume
from ihd_node.sim.phantom import make_series
from ihd_node.triage.completion import CompletionJudge


def test_sort_stack_is_stable_and_keeps_the_first_slice_at_a_position() -> None:
    stack = sort_stack([10.0, 0.0, 10.0, 5.0, 0.0004, 10.0008])
    assert stack.order == (1, 4, 3, 0, 2, 5)  # ties (within the mm) in the order given
    assert stack.kept == (1, 3, 0)
    assert stack.duplicates == ((4, 1), (2, 0), (5, 0))
    labels = ["a", "b", "c", "d", "e", "f"]
    assert stack.dropped(labels) == [
        "2 slices at duplicate positions (0.0 mm along the slice normal): kept b, dropped e",
        "3 slices at duplicate positions (10.0 mm along the slice normal): kept a, dropped c, f"]
    assert sort_stack([]).kept == () and sort_stack([1.0, 2.0]).dropped(["a", "b"]) == []


def _header(iop: object, ipp: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Dataset:
    ds = Dataset()
    ds.ImageOrientationPatient = iop
    ds.ImagePositionPatient = list(ipp)
    return ds


def test_one_slice_normal_for_every_caller() -> None:
    assert np.allclose(slice_normal(_header([1, 0, 0, 0, 1, 0])), [0, 0, 1])
    for bad, says in (([1, 0, 0, 1, 0, 0], "parallel"), ([1, 0, 0, 0, 1], "5 values")):
        with pytest.raises(VolumeError, match=says):
            slice_normal(_header(bad))
    with pytest.raises(VolumeError, match="not numbers"):  # as a damaged file reads (pydicom refuses to set it)
        slice_normal(SimpleNamespace(ImageOrientationPatient=["x", 0, 0, 0, 1, 0]))  # type: ignore[arg-type]
    with pytest.raises(VolumeError, match="missing"):
        slice_normal(Dataset())
    # The describing callers turn an unusable orientation into "unknown".
    assert tilt_degrees(_header([1, 0, 0, 1, 0, 0])) is None
    tilted = _header([1, 0, 0, 0, float(np.cos(np.radians(20))), float(np.sin(np.radians(20)))])
    assert abs(tilt_degrees(tilted) - 20.0) < 1e-6
    steps = [_header([1, 0, 0, 0, 1, 0], (0, 0, z)) for z in (10.0, 0.0, 5.0, 15.0)]
    assert slice_thickness(steps) == 5.0
    assert slice_thickness([_header([1, 0, 0, 1, 0, 0], (0, 0, z)) for z in (0.0, 5.0)]) is None


@pytest.fixture(scope="module")
def doubled(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str, str]:
    """A 12-slice phantom whose 6th slice (by position) was also sent under a second SOP Instance UID:
    (paths, original SOP UID, duplicate SOP UID); the original's file comes first."""
    series = make_series(21, subtypes=[], n_slices=12, size=96, shuffle=False)
    folder = tmp_path_factory.mktemp("doubled")
    paths = []
    for k, ds in enumerate(series.datasets):
        paths.append(folder / f"{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    original = series.datasets[5]
    again = copy.deepcopy(original)
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    paths.append(folder / "again.dcm")
    again.save_as(paths[-1], enforce_file_format=True)
    return paths, str(original.SOPInstanceUID), str(again.SOPInstanceUID)


def test_load_volume_keeps_the_first_duplicate_and_says_what_it_dropped(doubled, caplog) -> None:
    paths, original, again = doubled
    with caplog.at_level(logging.WARNING, logger="ihd_node"):
        volume = load_volume(paths)
    assert volume.n_slices == 12 and volume.hu.shape[0] == 12
    assert original in [s.sop_instance_uid for s in volume.slices]
    assert again not in [s.sop_instance_uid for s in volume.slices]
    [line] = volume.dropped
    assert line.startswith("2 slices at duplicate positions (") and line.endswith(
        f"mm along the slice normal): kept SOP {original}, dropped SOP {again}")
    assert any("volume.slices_dropped" in r.getMessage() and again in r.getMessage() for r in caplog.records)
    # The other order of files keeps the other one: the first given wins, as before.
    swapped = load_volume([paths[-1], *paths[:-1]])
    assert swapped.dropped[0].endswith(f"kept SOP {again}, dropped SOP {original}")
    assert load_volume(paths[:-1]).dropped == []


def test_completion_evidence_notes_duplicates_instead_of_failing(doubled, caplog) -> None:
    """Two instances at exactly one position used to make the completion stack's sort raise TypeError
    (it compared SliceGeometry objects), which threw all evidence away; now the duplicate is set aside and
    named in the evidence, as load_volume does."""
    paths, original, again = doubled
    cache = geometry_cache()
    instances = [(cache.get(p).sop_instance_uid, str(p)) for p in paths]
    judge = CompletionJudge(cache=cache)
    with caplog.at_level(logging.WARNING, logger="ihd_node"):
        evidence = judge.evidence("1.2", "1.2.9", instances)
        judge.evidence("1.2", "1.2.9", instances, version="again")  # same notes: logged once
    assert "geometry" in evidence.passed and not any(h.startswith("geometry") for h in evidence.holds)
    [note] = evidence.notes
    assert note.endswith(f"kept SOP {original}, dropped SOP {again}")
    assert note in evidence.describe()
    assert sum("completion.slices_dropped" in r.getMessage() for r in caplog.records) == 1
    stack, dropped = sorted_stack([cache.get(p) for p in paths])
    assert len(stack) == 12 and dropped == [note]
    assert [s.position for s in stack] == sorted(s.position for s in stack)


def test_completion_stack_flips_slices_whose_normal_points_the_other_way() -> None:
    up, down = (0.0, 0.0, 1.0), (0.0, 0.0, -1.0)
    slices = [SliceGeometry("a", "A", 0.0, up, 1, 0.5), SliceGeometry("b", "B", -10.0, down, 3, 0.5),
              SliceGeometry("c", "C", 5.0, up, 2, 0.5), SliceGeometry("d", "D", None, None, 4, 0.5)]
    stack, dropped = sorted_stack(slices)
    assert [(s.sop_instance_uid, s.position) for s in stack] == [("A", 0.0), ("C", 5.0), ("B", 10.0)]
    assert dropped == []
