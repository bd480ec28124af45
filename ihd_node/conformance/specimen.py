"""A specimen result set: the objects the report stage really builds, from a small synthetic head CT.

The conformance statement describes the created SOP instances (classes, transfer syntaxes, templates, codes)
by reading these objects instead of a hand-kept list, so the statement changes when the code does. The CT is
synthetic (a skull ring, brain and one bleed) and the prediction is made up: no model runs and no patient
data is involved. All finding classes but one are present and one is absent, so every object kind and code
appears.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ihd_node.classes import CLASSES
from ihd_node.imaging.volume import load_volume
from ihd_node.report import ResultObjects, build_results
from ihd_node.report.kos import rejection_note
from ihd_node.uids import derived_uid
from ihd_node.values.prediction import ModelIdentity, Prediction

SLICES = 6
SIZE = 64
ABSENT_CLASS = "intraventricular"
SPECIMEN_MODEL = ModelIdentity(name="specimen", version="0", thresholds=dict.fromkeys(CLASSES, 0.5))


@dataclass
class Specimen:
    """The result objects of one positive series, and the rejection note that would withdraw them."""

    results: ResultObjects
    rejection_note: Dataset

    def objects(self) -> list[Dataset]:
        return [*self.results.all(), self.rejection_note]


def _uid(*parts: str) -> str:
    return derived_uid("ihd-node", "conformance-specimen", *parts)


def _slice(z: int) -> np.ndarray:
    """HU image: air, skull ring, brain, a 70 HU bleed on the middle slices."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    c = (SIZE - 1) / 2
    r = np.hypot((yy - c) / (0.42 * SIZE), (xx - c) / (0.36 * SIZE))
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)
    hu[r < 1.0], hu[r < 0.9] = 1000.0, 32.0
    if 2 <= z <= 3:
        hu[np.hypot(yy - 0.45 * SIZE, xx - 0.35 * SIZE) < 0.08 * SIZE] = 70.0
    return hu


def _write_series(folder: Path) -> list[Path]:
    paths = []
    for z in range(SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, _uid("image", str(z))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Specimen^Synthetic", "SPECIMEN", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid("study"), _uid("series")
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = _uid("frame"), ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "synthetic"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-16.0, -16.0, 5.0 * z], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.KVP = [0.5, 0.5], 5.0, 120
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (_slice(z) + 1024).astype(np.int16).tobytes()
        path = folder / f"{z:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _prediction() -> Prediction:
    """Every class but one present on slices 2-3, with a heatmap over the bleed (regions, SEG and KOS get
    made); the absent one makes the SR say Absent too."""
    present = [c for c in CLASSES if c != ABSENT_CLASS]
    probs = np.full((SLICES, len(CLASSES)), 0.03, np.float32)
    probs[2:4, [CLASSES.index(c) for c in present]] = 0.9
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    blob = np.exp(-((yy - 0.45 * SIZE) ** 2 + (xx - 0.35 * SIZE) ** 2) / (2 * (0.07 * SIZE) ** 2))
    heatmaps = {(i, c): blob.copy() for i in (2, 3) for c in present}
    return Prediction(slice_probabilities=probs, series_probabilities=probs.max(axis=0), model=SPECIMEN_MODEL,
                      heatmaps=heatmaps, explained="decision")


def build_specimen() -> Specimen:
    """Build the specimen (about 2 s of CPU: highdicom builds the SR, captures, SEG and KOS)."""
    with tempfile.TemporaryDirectory(prefix="ihd-conformance-") as tmp:
        volume = load_volume(_write_series(Path(tmp)))
    results = build_results(volume, _prediction(), max_secondary_captures=1)
    note = rejection_note(volume.headers[0], results.all(), reason="specimen", series_number=99999999,
                          sop_instance_uid=_uid("rejection"), series_instance_uid=_uid("rejection-series"))
    return Specimen(results, note)
