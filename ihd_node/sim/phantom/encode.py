"""Stored pixel encodings and the DICOM attributes of a phantom series."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from ihd_node.sim.phantom.scanner import Geometry
from ihd_node.sim.phantom.series import ENCODINGS


def encode_pixels(hu: np.ndarray, encoding: str,
            quirk_intercept: float) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Stored pixel values, their Image Pixel / rescale attributes, and the HU they decode to (as
    ihd_node.imaging.volume.to_hu decodes them, BitsStored-12 quirk included)."""
    slope, intercept, signed, bits = 1.0, -1024.0, False, 16
    if encoding == "int16":
        stored = np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16)
        signed = True
    elif encoding == "int16_zero":
        stored, intercept, signed = np.clip(np.rint(hu), -32768, 32767).astype(np.int16), 0.0, True
    elif encoding == "slope_half":
        stored = np.clip(np.rint((hu + 1024.0) * 2.0), -32768, 32767).astype(np.int16)
        slope, signed = 0.5, True
    elif encoding == "uint16":
        stored = np.clip(np.rint(hu + 1024.0), 0, 65535).astype(np.uint16)
    elif encoding == "uint12":
        stored, bits = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16), 12
    elif encoding == "rsna_quirk":
        # HU stored directly, negatives wrapped at 12 bits, intercept > -100 in the header: the loader
        # must add 1000 with wrap at 4096 and use intercept -1000 (RSNA 2019 data has such files).
        stored = np.mod(np.rint(np.clip(hu, -1000.0, 3095.0)).astype(np.int32), 4096).astype(np.uint16)
        intercept, bits = quirk_intercept, 12
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    values = stored.astype(np.float32)
    if encoding == "rsna_quirk":
        decoded = np.mod(values + 1000.0, 4096.0) + np.float32(-1000.0)
    else:
        decoded = values * np.float32(slope) + np.float32(intercept)
    attrs = {"BitsAllocated": 16, "BitsStored": bits, "HighBit": bits - 1, "PixelRepresentation": int(signed),
             "RescaleIntercept": _ds(intercept), "RescaleSlope": _ds(slope)}
    return stored, attrs, decoded.astype(np.float32)


def _ds(v: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{v:.8g}"


_UID_SALT = "ihd-node-phantom-v1"


def phantom_uid(*parts: object) -> str:
    """A 2.25 UID from a name-based UUID: the same seed gives the same UIDs on every run."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join([_UID_SALT, *map(str, parts)])).int}"


def series_attrs(seed: int, content: object, rng: np.random.Generator, var: dict[str, Any],
                  geo: Geometry) -> dict[str, Any]:
    """Attributes shared by every slice (Patient, Study, Series, Equipment, Frame of Reference, Plane).
    Patient and study attributes derive from the patient id and study UID, so series made for one study
    agree on them."""
    # The study names the content too: one seed with other subtypes is another study (its own Study UID and
    # accession number), not a second series of one study that a PACS would merge (issue 7 item 16).
    study = str(var.get("study_instance_uid") or phantom_uid("study", *content))
    patient = str(var.get("patient_id") or seed)
    study_key = uuid.uuid5(uuid.NAMESPACE_OID, study).int
    date = dt.date(2020, 1, 1) + dt.timedelta(days=study_key % 1800)
    seconds = 7 * 3600 + study_key // 1800 % (15 * 3600)
    time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "SOPClassUID": CTImageStorage,
        "PatientName": f"PHANTOM^{patient}",
        "PatientID": patient if var.get("patient_id") else f"PHANTOM-{seed}",
        "PatientBirthDate": "",
        "PatientSex": "MFO"[uuid.uuid5(uuid.NAMESPACE_OID, patient).int % 3],
        "StudyInstanceUID": study,
        "StudyDate": date.strftime("%Y%m%d"),
        "StudyTime": time,
        "ReferringPhysicianName": "",
        "StudyID": f"PH{study_key % 10**8}",
        "AccessionNumber": f"PHA{study_key % 10**8}",
        "StudyDescription": "PHANTOM HEAD CT",
        "Modality": "CT",
        "SeriesInstanceUID": phantom_uid("series", content, study),
        "SeriesNumber": int(var.get("series_number") or 2),
        "SeriesDescription": str(var.get("series_description") or "PHANTOM HEAD CT"),
        "SeriesDate": date.strftime("%Y%m%d"),
        "SeriesTime": time,
        "BodyPartExamined": "HEAD",
        "PatientPosition": "HFS",
        "FrameOfReferenceUID": phantom_uid("frame", content, study),
        "PositionReferenceIndicator": "",
        "Manufacturer": "ihd-node phantom",
        "ManufacturerModelName": "synthetic head CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "AcquisitionNumber": 1,
        "ContentDate": date.strftime("%Y%m%d"),
        "ContentTime": time,
        "KVP": _ds(float(rng.choice([100.0, 120.0, 140.0]))),
        "GantryDetectorTilt": _ds(round(math.degrees(geo.tilt), 4)),
        "ImageOrientationPatient": [_ds(round(v, 6)) for v in (*geo.row, *geo.col)],
        "PixelSpacing": [_ds(round(geo.ps, 6))] * 2,
        "SliceThickness": _ds(round(geo.spacing, 4)),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": geo.size,
        "Columns": geo.size,
        "RescaleType": "HU",
        "WindowCenter": "40",
        "WindowWidth": "80",
    }


def slice_dataset(common: dict[str, Any], pixel_attrs: dict[str, Any], stored: np.ndarray, sop_uid: str,
                   ipp: np.ndarray, instance: int, z_table: float) -> Dataset:
    ds = Dataset()
    for keyword, value in common.items():
        setattr(ds, keyword, value)
    for keyword, value in pixel_attrs.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(round(float(v), 4)) for v in ipp]
    ds.SliceLocation = _ds(round(z_table, 4))
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "IHD_PHANTOM_1"
    ds.file_meta = meta
    return ds
