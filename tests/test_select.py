"""Eligibility rules on real headers written and read back by pydicom (headers only)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ihd_node.config import SeriesConfig, default_config
from ihd_node.imaging.headers import tilt_degrees
from ihd_node.triage.select import check_series, read_headers

CT = "1.2.840.10008.5.1.4.1.1.2"


def ct_header(i: int, series_uid: str, *, rows: int = 64, cols: int = 64, tilt_deg: float = 0.0,
              image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"), modality: str = "CT",
              description: str = "HEAD", thickness: float = 5.0) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.ImageType = list(image_type)
    t = math.radians(tilt_deg)
    ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(t), math.sin(t)]
    ds.ImagePositionPatient = [0, 0, i * thickness]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = rows, cols
    ds.InstanceNumber = i + 1
    return ds


def series(n: int = 12, **kw) -> list[Dataset]:
    uid = generate_uid()
    return [ct_header(i, uid, **kw) for i in range(n)]


def test_axial_ct_series_is_eligible_after_a_round_trip_through_files(tmp_path: Path) -> None:
    paths = []
    for i, ds in enumerate(series(12)):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PixelData = b"\0\0" * 64 * 64
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    headers = read_headers(paths)
    assert all("PixelData" not in h for h in headers)  # headers only
    result = check_series(headers)
    assert result.ok, result.reason
    assert "12 slices" in result.reason


@pytest.mark.parametrize(("headers", "expected"), [
    (series(12, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "localizer"),
    (series(4), "too few slices: 4 < 10"),
    (series(12, tilt_deg=90.0), "not axial"),
    (series(12, modality="MR"), "modality MR is not CT"),
    (series(12, thickness=12.0), "too thick"),
])
def test_ineligible_series_have_a_reason(headers: list[Dataset], expected: str) -> None:
    result = check_series(headers)
    assert not result.ok
    assert expected in result.reason


def test_mixed_sizes_and_orientations_are_ignored() -> None:
    mixed = series(12)
    mixed[3].Rows = 128
    assert "differ in size" in check_series(mixed).reason
    turned = series(12)
    turned[5].ImageOrientationPatient = [1, 0, 0, 0, 0, 1]
    assert "differ in orientation" in check_series(turned).reason


def test_gantry_tilt_within_tolerance_is_axial() -> None:
    tilted = series(12, tilt_deg=15.0)
    assert abs(tilt_degrees(tilted[0]) - 15.0) < 1e-6
    assert check_series(tilted).ok
    strict = SeriesConfig(axial_tolerance_degrees=10.0)
    assert "15 degrees" in check_series(tilted, strict).reason


def test_description_rules_and_missing_geometry(tmp_path: Path) -> None:
    rules = default_config(tmp_path, series={"description_exclude": "bone|scout"}).series
    assert check_series(series(12, description="HEAD 5mm"), rules).ok
    assert not check_series(series(12, description="Head BONE"), rules).ok
    broken = series(12)
    del broken[2].ImagePositionPatient
    assert "lack ImagePositionPatient" in check_series(broken).reason
    mixed = series(12)
    mixed[3].SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # a frame header of an Enhanced CT among slices
    assert "mixes CT Image Storage and Enhanced CT" in check_series(mixed).reason
    mr = series(12)
    mr[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    assert "is not CT Image Storage or Enhanced CT" in check_series(mr).reason


def test_recent_headers_reads_a_series_once(tmp_path):
    """The judge and the study choice read the same series one after the other: the second read is the
    first's result. Other paths (a late or resent instance) are read afresh; a failed read is not kept."""
    from ihd_node.imaging.headers import VolumeError, series_header_cache
    from ihd_node.sim.phantom import make_series, write_series

    paths = [str(p) for p in write_series(make_series(8, n_slices=10, size=64), tmp_path / "s")]
    recent = series_header_cache(keep=2)
    first = recent(paths)
    assert len(first) == 10 and recent(list(paths)) is first and recent.reads == 1
    assert len(recent(paths[:9])) == 9 and recent.reads == 2  # other files: read
    assert len(recent(paths[:8])) == 8 and recent.reads == 3
    again = recent(paths)  # pushed out by the two after it: read again
    assert again is not first and len(again) == 10 and recent.reads == 4
    with pytest.raises(VolumeError):
        recent([str(tmp_path / "missing.dcm")])
    with pytest.raises(VolumeError):
        recent([str(tmp_path / "missing.dcm")])
    assert recent.reads == 4  # the failed reads were not kept (nor counted)
