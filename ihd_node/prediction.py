"""The model's answer for one series, as a plain typed value (numpy only, no torch).

The report and the node read it without importing the model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ihd_node.classes import CLASSES


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered: goes into the SR, the log database and `analyze` output."""

    name: str
    version: str
    thresholds: dict[str, float]
    trained_on: str = ""


@dataclass
class Prediction:
    """Per-slice and per-series probabilities for the six classes, plus Grad-CAM heatmaps.

    Slice indices refer to the rows of the HU array the model was given, in sorted order.
    """

    slice_probabilities: np.ndarray  # (n_slices, 6), order of CLASSES
    series_probabilities: np.ndarray  # (6,), max over slices
    model: ModelIdentity
    # (slice, class) -> heatmap (rows, cols) in [0, 1], only for pairs judged positive
    heatmaps: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    explained: str = ""  # what the heatmaps explain: "decision" (the BiLSTM output), "cnn", "" (none made)

    def threshold(self, cls: str) -> float:
        return float(self.model.thresholds.get(cls, 0.5))

    def series_probability(self, cls: str) -> float:
        return float(self.series_probabilities[CLASSES.index(cls)])

    def probabilities(self) -> dict[str, float]:
        return {c: float(p) for c, p in zip(CLASSES, self.series_probabilities, strict=True)}

    def slice_probability_dict(self, index: int) -> dict[str, float]:
        return {c: float(p) for c, p in zip(CLASSES, self.slice_probabilities[index], strict=True)}

    def positive_classes(self) -> list[str]:
        """Classes whose series probability reaches the class threshold, in CLASSES order."""
        return [c for c in CLASSES if self.series_probability(c) >= self.threshold(c)]

    def positive_slices(self, cls: str) -> list[int]:
        """Indices of the slices whose probability for `cls` reaches its threshold."""
        column = self.slice_probabilities[:, CLASSES.index(cls)]
        return [int(i) for i in np.flatnonzero(column >= self.threshold(cls))]
