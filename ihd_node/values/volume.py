"""A loaded series as a plain typed value: the HU array, where each slice came from, the source headers.

Made by imaging (the loader), read by the model path, the report and the node, none of which need the
loader's code to read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SliceInfo:
    """One slice of a sorted volume: where it came from and where it lies."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    position: float  # mm along the slice normal
    instance_number: int | None
    frame_number: int | None = None  # 1-based frame of a multi-frame (Enhanced CT) instance, else None


@dataclass
class Volume:
    """A series ready for the model: HU array (n, rows, cols) in slice order plus the source headers."""

    study_instance_uid: str
    series_instance_uid: str
    slices: list[SliceInfo]
    hu: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    headers: list[Dataset] = field(repr=False)  # per slice, without pixel data, same order as slices
    # What the loader set aside, one human-readable line each (slices at duplicate positions), so that it
    # can be recorded rather than vanish.
    dropped: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.slices)
