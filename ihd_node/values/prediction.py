"""The model's answer for one series, as a plain typed value (numpy only, no torch).

The report and the node read it without importing the model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ihd_node.classes import CLASSES


def positive_mask(probabilities: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    """Which classes are judged present, for one row (6,) or many rows (n, 6) of probabilities.

    The one place where probabilities become findings. Each class is compared with its own threshold,
    then THE consistency rule: a subtype present means an intracranial haemorrhage is present, so `any`
    is present whenever a subtype is, even below its own threshold (the per-class thresholds are tuned
    independently, e.g. a low intraventricular one). The SR, the captures, `analyze` and the log
    database all read findings through this function (via Prediction), never from raw thresholds.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    limits = np.asarray([float(thresholds.get(c, 0.5)) for c in CLASSES])
    mask = probs >= limits
    mask[..., 0] |= mask[..., 1:].any(axis=-1)
    return mask


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
    # Set by the node, not the model: why the series may be incomplete (max_wait ran out with the completion
    # checks still holding it back); the result then says INCOMPLETE SERIES (SR CompletionFlag PARTIAL).
    # None = judged complete.
    incomplete: str | None = None
    # The SR UID of an earlier INCOMPLETE SERIES result of the same series that this result replaces.
    replaces_preliminary: str | None = None

    def threshold(self, cls: str) -> float:
        return float(self.model.thresholds.get(cls, 0.5))

    def series_probability(self, cls: str) -> float:
        return float(self.series_probabilities[CLASSES.index(cls)])

    def probabilities(self) -> dict[str, float]:
        return {c: float(p) for c, p in zip(CLASSES, self.series_probabilities, strict=True)}

    def slice_probability_dict(self, index: int) -> dict[str, float]:
        return {c: float(p) for c, p in zip(CLASSES, self.slice_probabilities[index], strict=True)}

    def positive_classes(self) -> list[str]:
        """Classes present in the series (positive_mask's rule), in CLASSES order."""
        mask = positive_mask(self.series_probabilities, self.model.thresholds)
        return [c for c, hit in zip(CLASSES, mask, strict=True) if hit]

    def slice_positive_classes(self, index: int) -> list[str]:
        """Classes present on one model slice (positive_mask's rule), in CLASSES order."""
        mask = positive_mask(self.slice_probabilities[index], self.model.thresholds)
        return [c for c, hit in zip(CLASSES, mask, strict=True) if hit]

    def positive_slices(self, cls: str) -> list[int]:
        """Indices of the model slices on which `cls` is present (positive_mask's rule)."""
        mask = positive_mask(self.slice_probabilities, self.model.thresholds)
        return [int(i) for i in np.flatnonzero(mask[:, CLASSES.index(cls)])]
