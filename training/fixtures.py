"""Test data shaped like the real files: the RSNA 2019 layout with exactly the RSNA attribute set, and the
CQ500 layout (reads.csv with three radiologists' reads per scan). Pixels and labels come from the node's
phantom generator (ihd_node.sim.phantom), headers are rewritten to what the real data sets carry.

The RSNA files carry only these data set attributes (no SOPClassUID, ImageType, InstanceNumber,
SliceThickness, dates; UIDs are `ID_<hex>`, not valid DICOM UIDs), and the set mixes PixelRepresentation
0/1 and BitsStored 12/16 (including the BitsStored-12 intercept quirk), sizes, single and multi-valued
WindowCenter/Width, unreadable files and duplicate CSV rows in any subtype order.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ihd_node.classes import CLASSES

RSNA_ATTRIBUTES: tuple[str, ...] = (
    "SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "StudyID",
    "ImagePositionPatient", "ImageOrientationPatient", "SamplesPerPixel", "PhotometricInterpretation",
    "Rows", "Columns", "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope", "PixelData")
RSNA_SUBTYPE_ORDER = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Encodings of the real set: signed 16 bit, unsigned 16 bit, unsigned 12 bit, and the 12-bit quirk.
RSNA_ENCODINGS = ("int16", "uint16", "uint12", "rsna_quirk", "int16_zero")


def rsna_id(*parts: object) -> str:
    """`ID_` + 9 hex digits, as the RSNA files name slices, studies, series and patients."""
    return "ID_" + hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:9]


@dataclass
class RsnaFixture:
    """What was written: the data folder, per scan its slice ids and patient, and the unusable files."""

    root: Path
    csv_path: Path
    scans: dict[str, list[str]]  # SeriesInstanceUID -> slice ids (file stems) in file order
    patients: dict[str, str]  # SeriesInstanceUID -> PatientID
    bad_files: dict[str, str]  # file stem -> why it cannot be used
    n_files: int


def _rsna_dataset(src: Dataset, sop: str, study: str, series: str, patient: str, k: int,
                  crop: int = 0) -> Dataset:
    """A data set with exactly the RSNA attributes, pixels and geometry taken from a phantom slice."""
    ds = Dataset()
    ds.SOPInstanceUID = sop
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = ""
    ipp = [float(v) for v in src.ImagePositionPatient]
    iop = [float(v) for v in src.ImageOrientationPatient]
    spacing = [float(v) for v in src.PixelSpacing]
    pixels = src.pixel_array
    if crop:  # a non-square image: columns cut on both sides, the origin moves along the row direction
        pixels = np.ascontiguousarray(pixels[:, crop:-crop])
        ipp = [p + crop * spacing[1] * r for p, r in zip(ipp, iop[:3], strict=True)]
    ds.ImagePositionPatient = [f"{v:.6g}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in iop]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    for key in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, key, int(src.get(key)))
    # The real files carry one window or several (the scanner's presets); the model ignores both.
    if k % 3 == 0:
        ds.WindowCenter, ds.WindowWidth = ["00036", "00036"], ["00080", "00080"]
    else:
        ds.WindowCenter, ds.WindowWidth = "40", "80"
    ds.RescaleIntercept = src.RescaleIntercept
    ds.RescaleSlope = src.RescaleSlope
    ds.PixelData = pixels.tobytes()
    return ds


def _save(ds: Dataset, path: Path, k: int) -> None:
    meta = FileMetaDataset()
    if k % 4 != 3:  # most files name the CT class in the file meta; some do not (Modality decides)
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if k % 2 else ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    # Not enforced: the standard requires MediaStorageSOPClassUID, some real files lack it.
    ds.save_as(path, enforce_file_format=False, implicit_vr=k % 2 == 1, little_endian=True)


def write_rsna_fixture(root: Path, n_scans: int = 24, seed: int = 100, size: int = 64, n_slices: int = 8,
                       thin_scans: int = 1, corrupt: bool = True) -> RsnaFixture:
    """Write `root/stage_2_train/ID_<hex>.dcm` and `root/stage_2_train.csv` with the real set's quirks.

    Every third patient has two scans (so splits must group by patient); scan i uses the encoding
    RSNA_ENCODINGS[i % 5]; scans 5 and 11 are larger and scan 7 is not square; the first `thin_scans`
    scans have 1.25 mm slices (four times as many); two files are unusable (truncated pixel data,
    not DICOM) but labelled; some CSV rows are repeated and the subtype order varies per slice.
    """
    from pydicom import config as pydicom_config

    from ihd_node.sim.phantom import make_series

    images = root / "stage_2_train"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scans: dict[str, list[str]] = {}
    patients: dict[str, str] = {}
    rows: list[tuple[str, int]] = []
    patient_no = 0
    old_modes = (pydicom_config.settings.reading_validation_mode,
                 pydicom_config.settings.writing_validation_mode)
    # `ID_<hex>` is no valid UID: the real files carry it anyway.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        for i in range(n_scans):
            if i % 3 != 1:
                patient_no += 1
            patient = rsna_id("patient", seed, patient_no)
            thin = i < thin_scans
            scan_size = size + 16 if i in (5, 11) else size
            subtypes = None if i >= 6 else ([["subdural"], [], ["intraparenchymal", "intraventricular"],
                                              ["epidural"], [], ["subarachnoid"]][i])
            s = make_series(seed + i, subtypes=subtypes, n_slices=n_slices * 4 if thin else n_slices,
                            size=scan_size, encoding=RSNA_ENCODINGS[i % len(RSNA_ENCODINGS)],
                            slice_spacing=1.25 if thin else None, thin=thin)
            study, series = rsna_id("study", seed, i), rsna_id("series", seed, i)
            by_uid = {str(d.SOPInstanceUID): d for d in s.datasets}
            stems = []
            for k, (uid, labels) in enumerate(zip(s.sop_uids_sorted, s.labels, strict=True)):
                stem = rsna_id("sop", seed, i, uid)
                ds = _rsna_dataset(by_uid[uid], stem, study, series, patient, k, crop=4 if i == 7 else 0)
                _save(ds, images / f"{stem}.dcm", k)
                stems.append(stem)
                order = list(RSNA_SUBTYPE_ORDER)
                rng.shuffle(order)
                rows.extend((f"{stem}_{name}", int(labels[CLASSES.index(name)])) for name in order)
            scans[series] = stems
            patients[series] = patient
    finally:
        (pydicom_config.settings.reading_validation_mode,
         pydicom_config.settings.writing_validation_mode) = old_modes
    bad: dict[str, str] = {}
    if corrupt:
        # The real set has a file whose pixel data is cut short; the header still reads.
        victim = scans[sorted(scans)[2]][3]
        path = images / f"{victim}.dcm"
        path.write_bytes(path.read_bytes()[:-300])
        bad[victim] = "pixel data cannot be decoded"
        junk = rsna_id("junk", seed)
        (images / f"{junk}.dcm").write_bytes(b"this is not a DICOM file\n" * 8)
        rows.extend((f"{junk}_{name}", 0) for name in RSNA_SUBTYPE_ORDER)
        bad[junk] = "not DICOM"
    # Duplicate rows, as in the real stage_2_train.csv.
    rows.extend(rows[j] for j in rng.choice(len(rows), size=max(6, len(rows) // 50), replace=False))
    csv_path = root / "stage_2_train.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    n_files = sum(len(v) for v in scans.values()) + (1 if corrupt else 0)
    return RsnaFixture(root=root, csv_path=csv_path, scans=scans, patients=patients, bad_files=bad,
                       n_files=n_files)


# ---------------------------------------------------------------------------------------------- CQ500

CQ500_FINDINGS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                  "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift")
# reads.csv columns that carry the six model classes.
CQ500_CLASSES: dict[str, str] = {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular",
                                  "SDH": "subdural", "EDH": "epidural", "SAH": "subarachnoid"}


@dataclass
class Cq500Fixture:
    root: Path
    reads: Path
    truth: dict[str, np.ndarray]  # name -> majority vote (6,) in CLASSES order


def write_cq500_fixture(root: Path, n_scans: int = 6, seed: int = 700, size: int = 64,
                        n_slices: int = 12) -> Cq500Fixture:
    """The CQ500 layout: `CQ500CT<i> CQ500CT<i>/Unknown Study/<series>/CT*.dcm` and reads.csv
    (`name,Category,R1:ICH,...,R3:MidlineShift`). Each study has a 5 mm series; every other study also a
    thin series, the first also a bone-kernel series (the node's choice must pick the 5 mm soft one).
    One radiologist disagrees on some findings, so only the majority vote gives the truth."""
    from ihd_node.sim.phantom import make_series

    root.mkdir(parents=True, exist_ok=True)
    header = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in CQ500_FINDINGS]
    truth: dict[str, np.ndarray] = {}
    lines = []
    for i in range(n_scans):
        subtypes: Sequence[str] = [["subdural"], [], ["intraparenchymal"], [], ["subarachnoid"], []][i % 6]
        study_dir = root / f"CQ500CT{i} CQ500CT{i}" / "Unknown Study"
        s = make_series(seed + i, subtypes=list(subtypes), n_slices=n_slices, size=size, slice_spacing=5.0,
                        series_description="CT 5mm", patient_id=f"CQ500-CT-{i}")
        _write_series(s.datasets, study_dir / "CT 5mm")
        if i % 2 == 0:
            thin = make_series(seed + i, subtypes=list(subtypes), n_slices=n_slices * 4, size=size,
                               thin=True, slice_spacing=1.25, series_description="CT PLAIN THIN",
                               study_instance_uid=s.study_instance_uid, patient_id=f"CQ500-CT-{i}",
                               series_number=3)
            _write_series(thin.datasets, study_dir / "CT PLAIN THIN")
        if i == 0:  # a bone reconstruction with more slices and a lower series number: still not chosen
            bone = make_series(seed + i, subtypes=list(subtypes), n_slices=n_slices * 2, size=size,
                               slice_spacing=5.0, series_description="CT 5mm BONE",
                               study_instance_uid=s.study_instance_uid, patient_id=f"CQ500-CT-{i}",
                               series_number=1)
            _write_series(bone.datasets, study_dir / "CT 5mm BONE")
        label = s.labels.max(axis=0)
        truth[f"CQ500-CT-{i}"] = label.astype(np.uint8)
        row: list[object] = [f"CQ500-CT-{i}", "B1"]
        for r in (1, 2, 3):
            for f in CQ500_FINDINGS:
                value = int(label[CLASSES.index(CQ500_CLASSES[f])]) if f in CQ500_CLASSES else 0
                if r == 3 and f in CQ500_CLASSES and i % 2 == 1:
                    value = 1 - value  # the third reader disagrees; two of three still agree
                row.append(value)
        lines.append(row)
    reads = root / "reads.csv"
    with reads.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(lines)
    return Cq500Fixture(root=root, reads=reads, truth=truth)


def _write_series(datasets: Sequence[Dataset], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"CT{k:06d}.dcm", enforce_file_format=True)
