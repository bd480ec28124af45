"""What the SR and the secondary captures share: the source headers made safe, and the slab mapping."""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

import ihd_node
from ihd_node.classes import CLASSES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

MANUFACTURER = "ihd-node"

# Type 2 attributes of the Patient and General Study modules that highdicom reads from the source (some
# with plain attribute access) and that must be present, even empty, in every result object.
TYPE2_SOURCE_ATTRIBUTES: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def _date(value: object) -> str:
    """A DA value highdicom accepts: YYYYMMDD from 1970-01-01 or 1970.01.01, else empty."""
    digits = "".join(ch for ch in str(value or "") if ch.isdigit())
    return digits if len(digits) == 8 else ""


# The character set highdicom is handed: it validates SpecificCharacterSet against a list that lacks the
# code-extension forms (empty first value, "\\ISO 2022 IR 87"), GB18030-style terms with extensions and
# "ISO_IR 6". The text is decoded first, so this label only has to be one highdicom accepts; the results
# are labelled with result_character_set() afterwards (set_character_set).
BUILD_CHARACTER_SET = "ISO_IR 192"
UTF8 = "ISO_IR 192"
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})


def _charset_terms(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet")
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v or "").strip() for v in values]


def _values_of(elem: DataElement) -> list[str]:
    """The decoded text values of one element (not of a sequence's items)."""
    if elem.VR not in _TEXT_VRS or elem.value is None or elem.keyword == "SpecificCharacterSet":
        return []
    values = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
    return [str(v) for v in values if v not in (None, "")]


def _texts(ds: Dataset) -> list[str]:
    """Every decoded text value of a data set, nested sequences included."""
    out = []
    for elem in ds.iterall():
        out.extend(_values_of(elem))
    return out


def _wide_elements(result: Dataset) -> list[DataElement]:
    """The top-level elements (a sequence whole) that hold any non-ASCII text.

    The results' own text (SR content, captions, UIDs, codes) is ASCII; only what came from the source
    (names, descriptions) may not be. Only these elements need the write-and-read check (see _round_trips).
    """
    wide = []
    for elem in result:
        if elem.keyword in ("PixelData", "SpecificCharacterSet"):
            continue
        if elem.VR == "SQ":
            texts = [t for item in elem.value or [] for t in _texts(item)]
        else:
            texts = _values_of(elem)
        if not all(t.isascii() for t in texts):
            wide.append(elem)
    return wide


# Printable ASCII and the control characters text VRs allow; the backslash is left out because it is the
# value delimiter of multi-valued VRs, and PN's "^" and "=" because they separate its components and groups.
_ASCII_PROBE = "".join(chr(c) for c in range(32, 127) if chr(c) not in "\\^=") + "\t\n\r\f"


@lru_cache(maxsize=64)
def _ascii_round_trips(terms: tuple[str, ...]) -> bool:
    """Whether pydicom writes ASCII text in these terms and reads it back unchanged, in every text VR.

    True for every set pydicom knows (single-byte sets and UTF-8 are ASCII-compatible; ISO 2022 sets keep
    ASCII in G0); checked once per set instead of assumed, so that a set where it is not true falls back
    to checking every element."""
    probe = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe's lengths and characters are not valid for every VR
        for vr, keyword in (("LO", "StudyDescription"), ("SH", "StationName"), ("CS", "BodyPartExamined"),
                            ("LT", "AdditionalPatientHistory"), ("ST", "InstitutionAddress"),
                            ("UT", "ImageComments"), ("UC", "StrainDescription")):
            probe.add_new(keyword, vr, _ASCII_PROBE)
        probe.add_new("PatientName", "PN", "Abc Def^Ghi-Jkl.^Mno, Pq^'R(s)t'^123=Abc^Def")
    return _round_trips(list(probe), list(terms))


def _round_trips(elements: list[DataElement], terms: list[str]) -> bool:
    """Whether pydicom writes every text of these elements in these character set terms and reads it back
    equal."""
    probe = Dataset()
    for elem in elements:
        probe.add(elem)  # shared, not copied: writing does not change an element
    before = _texts(probe)
    if terms:
        probe.SpecificCharacterSet = terms
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "replacement characters": judged by the comparison below
            write_dataset(buffer, probe)
            back = read_dataset(BytesIO(buffer.getvalue()), is_implicit_VR=False, is_little_endian=True)
            back.decode()
    except (UnicodeError, LookupError, ValueError):
        return False
    return _texts(back) == before


def result_character_set(source: Dataset, result: Dataset) -> list[str]:
    """The SpecificCharacterSet to write a result in: the source's own, whenever it can carry the text.

    Keeping the source's terms keeps the copied names byte-identical to the source (dcentvfy compares
    bytes), including the ISO 2022 code-extension forms. Sources with no value or "ISO_IR 6" (not a
    defined term, read as the default repertoire) stay on the default repertoire when all text is ASCII.
    Unknown terms, or text the source's set cannot encode, give UTF-8 (ISO_IR 192), which can carry any
    decoded text. [] means "no SpecificCharacterSet" (default repertoire).

    "Can carry" is a real write and read by pydicom, of the elements with non-ASCII text only: ASCII text
    reads back unchanged in the sets where _ascii_round_trips says so (all that pydicom knows), and an
    SR's thousands of ASCII content items made checking everything the slowest part of the report.
    """
    terms = _charset_terms(source)
    wide = _wide_elements(result)
    if all(t in ("", "ISO_IR 6") for t in terms):
        return [UTF8] if wide else []
    if any(t not in python_encoding for t in terms):
        return [UTF8]
    if not _ascii_round_trips(tuple(terms)):
        wide = [elem for elem in result if elem.keyword not in ("PixelData", "SpecificCharacterSet")]
    if not wide:
        return terms
    return terms if _round_trips(wide, terms) else [UTF8]


def set_character_set(result: Dataset, source: Dataset) -> None:
    """Label a built result with result_character_set(); pydicom encodes its (decoded) text on writing."""
    terms = result_character_set(source, result)
    if not terms:
        if "SpecificCharacterSet" in result:
            del result.SpecificCharacterSet
    else:
        result.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]


# Patient and study attributes (PS3.3 Patient, General Study and Patient Study modules) that the results
# repeat from the source when it has them, so that every object of the study says the same about its
# patient and study (dcentvfy checks exactly this). highdicom copies only the Type 1/2 core.
IDENTITY_ATTRIBUTES: tuple[str, ...] = (
    # Patient
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID", "PatientBirthTime",
    "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup", "PatientComments",
    "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "QualityControlSubject",
    # General Study
    "StudyDescription", "IssuerOfAccessionNumberSequence", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingService",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
    "AdditionalPatientHistory", "AdmissionID", "IssuerOfAdmissionIDSequence", "PregnancyStatus",
    "SmokingStatus", "MedicalAlerts", "Allergies",
    # SOP Common: the results' dates and times are then written in this offset too (see _now).
    "TimezoneOffsetFromUTC",
)
# Dates and times highdicom stamps with the machine's local clock.
_CREATION_STAMPS: tuple[tuple[str, str], ...] = (
    ("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime"),
    ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
)


def _offset(source: Dataset) -> dt.timezone | None:
    """The source's TimezoneOffsetFromUTC as a timezone; None when absent or malformed."""
    return timezone_of(str(source.get("TimezoneOffsetFromUTC", "") or ""))


def timezone_of(text: str) -> dt.timezone | None:
    """A DICOM timezone offset ("+0900", "-0330") as a timezone; None when empty or malformed."""
    text = (text or "").strip()
    if len(text) != 5 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    hours, minutes = int(text[1:3]), int(text[3:])
    if hours > 14 or minutes > 59:
        return None
    sign = 1 if text[0] == "+" else -1
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


def copy_identity(result: Dataset, source: Dataset, now: dt.datetime | None = None) -> None:
    """Repeat the source's identity attributes in a result; write its creation stamps in the source's zone.

    `source` is a decoded header (with_type2). Without TimezoneOffsetFromUTC in the source the stamps
    stay in the node's local time, as DICOM reads times that carry no offset.
    """
    for keyword in IDENTITY_ATTRIBUTES:
        if keyword in source and source[keyword].value not in (None, "", []):
            setattr(result, keyword, deepcopy(source[keyword].value))
    zone = _offset(source)
    if zone is None:
        return
    local = (now or dt.datetime.now(dt.UTC)).astimezone(zone)
    for date_kw, time_kw in _CREATION_STAMPS:
        if date_kw in result:
            setattr(result, date_kw, local.strftime("%Y%m%d"))
            setattr(result, time_kw, local.strftime("%H%M%S.%f"))


def finish_result(result: Dataset, source: Dataset) -> None:
    """What every result needs after highdicom built it: the source's identity, then its character set."""
    # Only the identity attributes are copied and decoded: an Enhanced CT header holds every frame's groups.
    identity = Dataset()
    for keyword in ("SpecificCharacterSet", *IDENTITY_ATTRIBUTES):
        if keyword in source:
            identity[keyword] = deepcopy(source[keyword])
    identity.decode()
    copy_identity(result, identity)
    set_character_set(result, source)


def _decoded(ds: Dataset) -> Dataset:
    """A copy whose text is Python str, decoded with the source's own character set by pydicom."""
    out = deepcopy(ds)
    out.decode()  # a PersonName keeps the bytes it came in; pydicom writes them again in the same set
    out.SpecificCharacterSet = BUILD_CHARACTER_SET
    return out


def with_type2(ds: Dataset) -> Dataset:
    """A decoded copy of a source header that highdicom can build from, without changing what is valid.

    Text is decoded with the source's character set and the copy labelled BUILD_CHARACTER_SET (see
    set_character_set for the label the results get). Missing Type 2 patient/study attributes are added
    empty (sparse sources: anonymisers, some modalities). Values highdicom refuses and would fail the
    whole result on (PatientSex "U", dates with dashes) are repaired or emptied: empty is DICOM's way to
    say "unknown".
    """
    out = _decoded(ds)
    for keyword in TYPE2_SOURCE_ATTRIBUTES:
        if keyword not in out:
            setattr(out, keyword, None)
    sex = str(out.PatientSex or "").strip().upper()
    out.PatientSex = sex if sex in ("M", "F", "O") else None
    for keyword in ("PatientBirthDate", "StudyDate"):
        if out[keyword].value:
            out[keyword].value = _date(out[keyword].value) or None
    return out


# Transfer syntaxes whose pixel data went through lossy compression, with the PS3.3 C.7.6.1.1.5.1
# method term. JPEG 2000 and HTJ2K "lossy allowed" count as lossy unless the header says "00".
LOSSY_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
    "1.2.840.10008.1.2.4.112": "ISO_18181_1",  # JPEG XL
}
MAYBE_LOSSLESS = frozenset({"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.112"})


@dataclass(frozen=True)
class LossyHistory:
    """How a source image was lossy compressed, for Lossy Image Compression Method/Ratio (same length,
    or no ratios when one is not known)."""

    methods: tuple[str, ...]
    ratios: tuple[str, ...]


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value in (None, ""):
        return []
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip() for v in values if str(v).strip()]


def _ratio(header: Dataset, path: Path | None) -> str | None:
    """Uncompressed over stored pixel bytes of one file, as a DS; None when it cannot be told."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            pydicom.dcmread(f, stop_before_pixels=True)
            start = f.tell()
            stored = os.fstat(f.fileno()).st_size - start
        frames = int(header.get("NumberOfFrames", 1) or 1)
        raw = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1) or 1) \
            * ((int(header.BitsAllocated) + 7) // 8) * frames
    except (OSError, AttributeError, TypeError, ValueError, InvalidDicomError):
        return None
    return f"{raw / stored:.2f}"[:16] if stored > 0 else None


def lossy_history(header: Dataset, path: Path | None = None) -> LossyHistory | None:
    """The lossy compression a source image went through (its header and its transfer syntax), or None.

    PS3.3 C.7.6.1.1.5: once lossy, an image and everything derived from it stay "01", with the earlier
    methods and ratios kept in order and this file's own compression appended.
    """
    said = str(header.get("LossyImageCompression", "") or "").strip()
    meta = getattr(header, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    by_syntax = syntax in LOSSY_TRANSFER_SYNTAXES and not (syntax in MAYBE_LOSSLESS and said == "00")
    if said != "01" and not by_syntax:
        return None
    methods, ratios = _values(header, "LossyImageCompressionMethod"), _values(header, "LossyImageCompressionRatio")
    if by_syntax and LOSSY_TRANSFER_SYNTAXES[syntax] not in methods[-1:]:
        methods.append(LOSSY_TRANSFER_SYNTAXES[syntax])
        ratio = _ratio(header, path)
        ratios = ratios + [ratio] if ratio is not None else ratios
    if len(ratios) != len(methods):
        ratios = []  # the values must pair up; an unknown one leaves the (Type 3) ratio out
    return LossyHistory(tuple(methods), tuple(ratios))


def mark_lossy(result: Dataset, history: LossyHistory | None) -> None:
    """An image derived from a lossy source says so (PS3.3 C.7.6.1.1.5), with its method and ratio."""
    if history is None:
        result.LossyImageCompression = "00"
        return
    result.LossyImageCompression = "01"
    if history.methods:
        result.LossyImageCompressionMethod = list(history.methods)
    if history.ratios:
        result.LossyImageCompressionRatio = list(history.ratios)


def volume_lossy(volume: Volume) -> LossyHistory | None:
    """The first lossy slice's history: a series counts as lossy when any of its slices is."""
    for header, info in zip(volume.headers, volume.slices, strict=True):
        history = lossy_history(header, info.path)
        if history is not None:
            return history
    return None


def check_groups(volume: Volume, prediction: Prediction,
                 slice_groups: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Model slice -> original slice indices; identity when the model saw the original slices."""
    n_model = int(prediction.slice_probabilities.shape[0])
    if slice_groups is None:
        if n_model != volume.n_slices:
            raise ValueError(f"prediction has {n_model} slices but the volume {volume.n_slices}; "
                             "pass slice_groups when slices were combined into slabs")
        return [[i] for i in range(n_model)]
    groups = [[int(i) for i in g] for g in slice_groups]
    if len(groups) != n_model:
        raise ValueError(f"slice_groups has {len(groups)} entries but the prediction {n_model} slices")
    for g in groups:
        if not g or min(g) < 0 or max(g) >= volume.n_slices:
            raise ValueError(f"slice group {g} is empty or outside the volume's {volume.n_slices} slices")
    return groups


def positive_slices(prediction: Prediction) -> list[int]:
    """Model slices where any class reaches its threshold, highest `any` probability first."""
    hits = {i for cls in CLASSES for i in prediction.positive_slices(cls)}
    any_col = prediction.slice_probabilities[:, CLASSES.index("any")]
    return sorted(hits, key=lambda i: (-float(any_col[i]), i))


def contributing_equipment(prediction: Prediction) -> hd.ContributingEquipment:
    """Names the algorithm as the equipment that created this object from the source images.

    DCM 109102 "Processing Equipment" = equipment that processed instances to create new ones
    (109103 "Modifying Equipment" is for changing existing instances, which we never do).
    """
    model = prediction.model
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name[:64],
        software_versions=[f"ihd-node {ihd_node.__version__}"[:64], f"model {model.version}"[:64]],
        contribution_description=f"ICH detection and Grad-CAM by {model.name} {model.version}; "
                                 f"{NOT_FOR_DIAGNOSTIC_USE}"[:1024],
    )


def series_description(base: str, revision: int) -> str:
    """The results' SeriesDescription; a re-analysis says which revision it is, so a viewer tells them apart."""
    return base if revision == 0 else f"{base} (revision {revision + 1})"
