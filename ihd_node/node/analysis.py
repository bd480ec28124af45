"""One series through the model: load the volume, combine thin slices into slabs, predict, explain.

Shared by `ihd-node analyze` and the node's inference worker, so both judge a series the same way.
Takes the predictor as an argument and never imports torch itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ihd_node.classes import CLASSES
from ihd_node.imaging.volume import Volume, combine_thin_slices, load_volume
from ihd_node.values.prediction import Prediction


class SeriesPredictor(Protocol):
    def predict(self, hu: np.ndarray, explain: bool = True, max_cam_slices: int | None = None, *,
                pixel_spacing_mm: float = 0.5) -> Prediction: ...


@dataclass
class SeriesAnalysis:
    """The volume, the model's prediction on it, and how model slices map to the original slices."""

    volume: Volume
    prediction: Prediction
    slice_groups: list[list[int]]  # model slice index -> original slice indices (identity unless slabs)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def combined(self) -> bool:
        return any(len(g) > 1 for g in self.slice_groups)

    def original_slice_probabilities(self) -> np.ndarray:
        """(n_original_slices, 6): each original slice gets the probabilities of the slab it lies in."""
        out = np.zeros((self.volume.n_slices, len(CLASSES)), dtype=np.float32)
        for model_index, members in enumerate(self.slice_groups):
            out[members] = self.prediction.slice_probabilities[model_index]
        return out


def analyze_series(
    paths: Sequence[str | Path],
    predictor: SeriesPredictor,
    *,
    explain: bool = True,
    max_cam_slices: int | None = None,
    thin_slice_mm: float = 3.0,
    slab_mm: float = 5.0,
) -> SeriesAnalysis:
    """Load, slab and predict one series; raises VolumeError for series that cannot be loaded."""
    started = time.perf_counter()
    volume = load_volume(paths)
    loaded = time.perf_counter()
    hu, groups = volume.hu, [[i] for i in range(volume.n_slices)]
    if 0 < volume.slice_spacing < thin_slice_mm:
        hu, groups = combine_thin_slices(volume.hu, volume.slice_spacing, target_mm=slab_mm)
    prediction = predictor.predict(hu, explain=explain, max_cam_slices=max_cam_slices,
                                   pixel_spacing_mm=float(min(volume.pixel_spacing)))
    finished = time.perf_counter()
    return SeriesAnalysis(
        volume=volume,
        prediction=prediction,
        slice_groups=groups,
        timings={"load_seconds": loaded - started, "predict_seconds": finished - loaded},
    )
