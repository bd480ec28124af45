"""What the SR and the secondary captures share: the source headers made safe, and the slab mapping."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from copy import deepcopy
from io import BytesIO

import highdicom as hd
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

import ihd_node
from ihd_node.classes import CLASSES, NOT_FOR_DIAGNOSTIC_USE
from ihd_node.dicom.volume import Volume
from ihd_node.prediction import Prediction

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


def _texts(ds: Dataset) -> list[str]:
    """Every decoded text value of a data set, nested sequences included."""
    out = []
    for elem in ds.iterall():
        if elem.VR not in _TEXT_VRS or elem.value is None or elem.keyword == "SpecificCharacterSet":
            continue
        values = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
        out.extend(str(v) for v in values if v not in (None, ""))
    return out


def _round_trips(result: Dataset, terms: list[str]) -> bool:
    """Whether pydicom writes every text of `result` in these character set terms and reads it back equal."""
    probe = Dataset()
    for elem in result:
        if elem.keyword not in ("PixelData", "SpecificCharacterSet"):
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
    """
    terms = _charset_terms(source)
    texts = _texts(result)
    if all(t in ("", "ISO_IR 6") for t in terms):
        return [] if all(t.isascii() for t in texts) else [UTF8]
    if any(t not in python_encoding for t in terms):
        return [UTF8]
    return terms if _round_trips(result, terms) else [UTF8]


def set_character_set(result: Dataset, source: Dataset) -> None:
    """Label a built result with result_character_set(); pydicom encodes its (decoded) text on writing."""
    terms = result_character_set(source, result)
    if not terms:
        if "SpecificCharacterSet" in result:
            del result.SpecificCharacterSet
    else:
        result.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]


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
