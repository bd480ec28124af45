"""Synthetic non-head CT (abdomen, chest, pelvis, water phantom) written as CT DICOM, for the head check.

Cross-sections in mm, drawn with the HU of real tissue: the abdomen has subcutaneous and visceral fat,
liver, bowel gas and a vertebra whose canal is the only closed bone ring; the chest has lungs, ribs as
separate bone cuts and a sternum; the pelvis has a closed bony ring around fat, bowel and bladder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def cross_section(kind: str, size: int = 128, fov_mm: float = 400.0, seed: int = 0) -> np.ndarray:
    """One slice in HU (size x size) of `kind`: abdomen, chest, pelvis or water."""
    rng = np.random.default_rng(seed)
    c = (np.arange(size) + 0.5) * fov_mm / size - fov_mm / 2
    x, y = np.meshgrid(c, c)
    hu = np.full((size, size), -1000.0)
    if kind == "water":
        hu[_ellipse(x, y, 0, 0, 100, 100)] = 0.0
        return hu + rng.normal(0, 5, hu.shape)
    a, b = (170.0, 120.0) if kind != "pelvis" else (180.0, 115.0)
    hu[_ellipse(x, y, 0, 0, a, b)] = -100.0  # subcutaneous fat
    hu[_ellipse(x, y, 0, 0, a - 15, b - 15)] = 45.0  # muscle wall / viscera
    if kind == "abdomen":
        hu[_ellipse(x, y, -60, -10, 70, 60)] = 60.0  # liver
        hu[_ellipse(x, y, 50, -20, 40, 30)] = -90.0  # visceral fat
        hu[_ellipse(x, y, 40, 30, 20, 15)] = -900.0  # bowel gas
    if kind == "chest":
        hu[_ellipse(x, y, -75, 0, 60, 85)] = -850.0  # lungs
        hu[_ellipse(x, y, 75, 0, 60, 85)] = -850.0
        for angle in np.linspace(0.3, 2 * np.pi - 0.3, 12):  # ribs: separate bone cuts
            rx, ry = (a - 22) * np.cos(angle), (b - 22) * np.sin(angle)
            hu[_ellipse(x, y, rx, ry, 7, 7)] = 900.0
        hu[_ellipse(x, y, 0, -b + 25, 14, 6)] = 700.0  # sternum
    if kind == "pelvis":
        ring = _ellipse(x, y, 0, 10, 120, 80) & ~_ellipse(x, y, 0, 10, 108, 68)
        hu[ring] = 800.0  # pelvic ring, closed
        hu[_ellipse(x, y, 0, 10, 105, 65)] = -90.0  # pelvic fat
        hu[_ellipse(x, y, 0, -20, 40, 30)] = 10.0  # bladder
        hu[_ellipse(x, y, 30, 40, 15, 10)] = -900.0  # rectal gas
    # Vertebra: body and a closed arch around the canal.
    hu[_ellipse(x, y, 0, b - 55, 22, 18)] = 700.0
    arch = _ellipse(x, y, 0, b - 25, 14, 14) & ~_ellipse(x, y, 0, b - 25, 9, 9)
    hu[arch] = 900.0
    hu[_ellipse(x, y, 0, b - 25, 9, 9)] = 20.0  # cord
    return hu + rng.normal(0, 8, hu.shape)


def write_ct_series(images: list[np.ndarray], folder: Path, *, fov_mm: float = 400.0, spacing_mm: float = 5.0,
                    body_part: str | None = None, study_uid: str | None = None) -> list[Path]:
    """Write HU images as one axial CT Image Storage series (int16, intercept -1024)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    paths = []
    for i, hu in enumerate(images):
        size = hu.shape[0]
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, generate_uid()
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "TRUNK-1", "TRUNK^TEST"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 3, i + 1, "BODY"
        if body_part:
            ds.BodyPartExamined = body_part
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-fov_mm / 2, -fov_mm / 2, -i * spacing_mm]
        ds.PixelSpacing = [fov_mm / size, fov_mm / size]
        ds.SliceThickness = spacing_mm
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.clip(np.rint(hu + 1024), -32768, 32767).astype(np.int16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
