"""What a phantom series is: the value make_series returns and the names of its tissues, encodings and
variations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from ihd_node.classes import CLASSES

# A subtype counts on a slice only when its drawn mask covers at least this area (a few pixels at 512).
MIN_LESION_MM2 = 6.0


# stage_2_train.csv lists the six rows of a slice in this order.
RSNA_ORDER: tuple[str, ...] = (
    "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


# How pixel values are stored; see encode_pixels. Weights are how often each is drawn when not asked for.
ENCODINGS: dict[str, float] = {"int16": 0.40, "int16_zero": 0.15, "uint16": 0.15, "uint12": 0.12,
                               "rsna_quirk": 0.12, "slope_half": 0.06}


# Codes of PhantomSeries.tissue (what each pixel is, before blur and noise).
TISSUE: dict[str, int] = {name: code for code, name in enumerate(
    ("air", "scalp", "fat", "bone", "grey", "white", "csf", "ventricle", "blood", "soft", "calcification",
     "edema", "device", "brainstem", "padding"))}


VARIATION_KEYS = frozenset({
    "slice_spacing", "thin", "pixel_spacing", "noise_sigma", "tilt_deg", "rotation_deg", "offset_mm",
    "encoding", "shuffle", "reverse_instances", "study_instance_uid", "patient_id", "series_number",
    "series_description", "headrest", "padding", "mass_effect", "blur_mm", "partial_volume"})


@dataclass(frozen=True)
class PhantomSeries:
    """One synthetic series. Arrays are in sorted spatial order (inferior to superior along the slice normal),
    the order load_volume returns; `datasets` is in shuffled file order."""

    datasets: list[Dataset]
    labels: np.ndarray  # (n, 6) uint8, CLASSES order
    masks: np.ndarray  # (n, rows, cols) uint8, bit k set where SUBTYPES[k] is drawn
    sop_uids_sorted: list[str]
    study_instance_uid: str
    series_instance_uid: str
    hu: np.ndarray  # (n, rows, cols) float32, exactly what the stored pixels decode to
    tissue: np.ndarray  # (n, rows, cols) uint8 TISSUE codes, before blur and noise
    seed: int
    subtypes: tuple[str, ...]  # the subtypes placed in the head
    pixel_spacing: float
    slice_spacing: float  # mm along the slice normal
    tilt_deg: float
    encoding: str
    partial_volume: bool  # each slice averages two planes of its slab

    @property
    def positive_classes(self) -> list[str]:
        """Classes (CLASSES order) present on at least one slice."""
        return [c for k, c in enumerate(CLASSES) if self.labels[:, k].any()]

    @property
    def n_slices(self) -> int:
        return int(self.labels.shape[0])
