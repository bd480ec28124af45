"""Builders shared by the report tests (small real CT series written by pydicom) and tests of the UIDs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ihd_node.classes import CLASSES
from ihd_node.imaging.volume import Volume, load_volume
from ihd_node.uids import derived_uid, result_uid
from ihd_node.values.prediction import ModelIdentity, Prediction

SPARSE_DROPPED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")
MODEL = ModelIdentity(name="ihd-test-model", version="0.0.1",
                      thresholds={c: 0.5 for c in CLASSES}, trained_on="phantom")


def head_slice(size: int, z: int, bleed: bool) -> np.ndarray:
    """HU image of a crude head: air, skull ring, brain, and a 70 HU bleed in the right hemisphere."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.hypot((yy - c) / (0.42 * size), (xx - c) / (0.36 * size))
    hu = np.full((size, size), -1000.0, np.float32)
    hu[r < 1.0] = 1000.0
    hu[r < 0.9] = 32.0 + (z % 3)
    if bleed:
        hu[np.hypot(yy - 0.45 * size, xx - 0.35 * size) < 0.08 * size] = 70.0
    return hu


def write_ct_series(outdir: Path, n: int = 6, size: int = 128, spacing_mm: float = 5.0,
                    bleed_slices: tuple[int, ...] = (), sparse: bool = False) -> list[Path]:
    """CT Image Storage files (instance numbers reversed), or sparse ones missing Type 2 attributes."""
    outdir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for z in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "Test^Report", "RPT001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "1", "ACC1"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, n - z
        ds.Manufacturer, ds.PositionReferenceIndicator = "Phantom Scanner Co", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-0.5 * size * 0.5, -0.5 * size * 0.5, 10.0 + z * spacing_mm]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], spacing_mm
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        hu = head_slice(size, z, z in bleed_slices)
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        if sparse:
            for keyword in SPARSE_DROPPED:
                delattr(ds, keyword)
        path = outdir / f"slice{z:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_prediction(n: int, positive: dict[str, list[int]] | None = None, size: int = 128) -> Prediction:
    """Per-slice probabilities low everywhere except the given (class -> slices); heatmaps on those pairs."""
    probs = np.full((n, len(CLASSES)), 0.03, np.float32)
    heatmaps: dict[tuple[int, str], np.ndarray] = {}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    blob = np.exp(-((yy - 0.45 * size) ** 2 + (xx - 0.35 * size) ** 2) / (2 * (0.07 * size) ** 2))
    for cls, slices in (positive or {}).items():
        for k, i in enumerate(slices):
            p = 0.95 - 0.1 * k
            probs[i, CLASSES.index(cls)] = p
            probs[i, 0] = max(probs[i, 0], p)
            heatmaps[(i, cls)] = blob.copy()
            heatmaps[(i, "any")] = blob.copy()
    return Prediction(slice_probabilities=probs, series_probabilities=probs.max(axis=0), model=MODEL,
                      heatmaps=heatmaps, seconds=0.1)


def make_volume(tmp_path: Path, **kw) -> Volume:
    return load_volume(write_ct_series(tmp_path / "src", **kw))


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) lines that dciodvfy prints for one file."""
    run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if "Error" in ln], [ln for ln in lines if "Warning" in ln]


def needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed (dicom3tools/dcmtk)")


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def reread(ds: Dataset, path: Path) -> Dataset:
    return pydicom.dcmread(write(ds, path))


# ---- UIDs -------------------------------------------------------------------------------------------

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def test_result_uids_are_valid_and_deterministic():
    series = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678901234"
    seen = set()
    for role in ("sr", "sr-series", "sc", "sc-series", "tracking", "device"):
        for index in range(3):
            for revision in range(2):
                uid = result_uid(series, "m", "1.0", role, index, revision)
                assert uid == result_uid(series, "m", "1.0", role, index, revision)
                assert len(uid) <= 64 and UID_RE.match(uid), uid
                seen.add(uid)
    # device UIDs ignore index/revision; every other combination is distinct
    assert len(seen) == 5 * 3 * 2 + 1
    assert result_uid(series, "m", "1.0", "sr") != result_uid(series, "m", "1.1", "sr")
    assert derived_uid("a", "bc") != derived_uid("ab", "c")


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="role"):
        result_uid("1.2.3", "m", "1", "segmentation")
