"""What the SR and the secondary captures share: the source headers made safe, and the slab mapping."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import highdicom as hd
from pydicom.dataset import Dataset
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


def with_type2(ds: Dataset) -> Dataset:
    """A copy of a source header that highdicom can build from, without changing what is valid.

    Missing Type 2 patient/study attributes are added empty (sparse sources: anonymisers, some
    modalities). Values highdicom refuses and would fail the whole result on (PatientSex "U",
    dates with dashes) are repaired or emptied: empty is DICOM's way to say "unknown".
    """
    out = deepcopy(ds)
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
