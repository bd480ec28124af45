"""Enhanced CT Image Storage (PS3.3 A.38) built from a classic CT series, for the Enhanced CT tests.

The frames are the classic slices in spatial order. Everything that may differ per frame (position,
rescale, window) goes into the Per-frame Functional Groups; orientation and pixel measures are shared,
as scanners write them. Validated with dicom3tools' dciodvfy in tests/test_enhanced_ct.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
COPIED = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
          "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
          "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime", "BodyPartExamined",
          "PatientPosition", "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer",
          "ManufacturerModelName", "ContentDate", "ContentTime")


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def enhanced_from_slices(slices: Sequence[Dataset], *, series_uid: str | None = None,
                         frame_type: str = "DERIVED") -> Dataset:
    """One Enhanced CT instance whose frames are `slices` (classic CT datasets with pixel data) sorted along
    the slice normal. Pixel values are re-encoded as signed 16 bit with the per-frame rescale of each slice."""
    iop = np.asarray([float(v) for v in slices[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(slices, key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    first = order[0]
    ds = Dataset()
    for keyword in COPIED:
        if keyword in first:
            setattr(ds, keyword, first[keyword].value)
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = [frame_type, "PRIMARY", "VOLUME", "NONE"]
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = f"{first.get('ContentDate', '20200101')}{first.get('ContentTime', '000000')}"
    ds.AcquisitionDuration = 1.0
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0001", "ihd-node tests"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(first.Rows), int(first.Columns)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = len(order)
    ds.AcquisitionContextSequence = _seq()
    ds.ContentDate, ds.ContentTime = first.get("ContentDate", "20200101"), first.get("ContentTime", "000000")
    organization = generate_uid()
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=organization))
    ds.DimensionIndexSequence = _seq(*(
        _item(DimensionIndexPointer=Tag(pointer), FunctionalGroupPointer=Tag("FrameContentSequence"),
              DimensionOrganizationUID=organization, DimensionDescriptionLabel=label)
        for pointer, label in (("StackID", "Stack"), ("InStackPositionNumber", "Position"))))
    ds.DimensionOrganizationType = "3D"
    ds.SharedFunctionalGroupsSequence = _seq(_item(
        PixelMeasuresSequence=_seq(_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)),
        PlaneOrientationSequence=_seq(_item(ImageOrientationPatient=first.ImageOrientationPatient)),
        FrameAnatomySequence=_seq(_item(
            AnatomicRegionSequence=_seq(_item(CodeValue="69536005", CodingSchemeDesignator="SCT",
                                              CodeMeaning="Head")),
            FrameLaterality="U")),
        IrradiationEventIdentificationSequence=_seq(_item(IrradiationEventUID=generate_uid())),
        CTImageFrameTypeSequence=_seq(_item(FrameType=[frame_type, "PRIMARY", "VOLUME", "NONE"],
                                            PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
                                            VolumeBasedCalculationTechnique="NONE")),
    ))
    frames, per_frame = [], []
    for k, sl in enumerate(order):
        hu = sl.pixel_array.astype(np.float64) * float(sl.get("RescaleSlope", 1) or 1) + float(
            sl.get("RescaleIntercept", 0) or 0)
        intercept = -1024.0 if k % 2 == 0 else -1000.0  # frames differ in rescale: the per-frame one must apply
        frames.append(np.clip(np.rint(hu - intercept), -32768, 32767).astype(np.int16))
        per_frame.append(_item(
            FrameContentSequence=_seq(_item(StackID="1", InStackPositionNumber=k + 1,
                                            DimensionIndexValues=[1, k + 1])),
            PlanePositionSequence=_seq(_item(ImagePositionPatient=sl.ImagePositionPatient)),
            PixelValueTransformationSequence=_seq(_item(RescaleIntercept=intercept, RescaleSlope=1,
                                                        RescaleType="HU")),
            FrameVOILUTSequence=_seq(_item(WindowCenter=40, WindowWidth=80)),
        ))
    ds.PerFrameFunctionalGroupsSequence = _seq(*per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
