"""Result objects for one analysed series: a TID 1500 SR and Grad-CAM secondary captures (no torch here).

UIDs are derived from the source series, the model identity, the content-changing settings and the
revision (see uids.py), so building the results again gives the same objects. A revision (late images,
re-analysis) is a new result set: new SR and SC series, and the new SR names the earlier one in its
PredecessorDocumentsSequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from ihd_node.report.sc import SC_SERIES_DESCRIPTION, build_secondary_captures
from ihd_node.report.sr import SR_SERIES_DESCRIPTION, build_sr
from ihd_node.uids import ResultSettings
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

__all__ = ["ResultObjects", "ResultSettings", "build_results", "build_sr", "build_secondary_captures",
           "result_file_name",
           "SR_SERIES_DESCRIPTION", "SC_SERIES_DESCRIPTION"]


def result_file_name(ds: Dataset) -> str:
    """`SR_<SOPInstanceUID>.dcm` or `SC_<SOPInstanceUID>.dcm`: one naming for `serve` and `analyze --out`
    (a capture's Modality is OT, which named the files OT_ in one place and SC_ in the other)."""
    kind = "SR" if ds.Modality == "SR" else "SC"
    return f"{kind}_{ds.SOPInstanceUID}.dcm"


@dataclass
class ResultObjects:
    """What goes back to the PACS for one series."""

    sr: Dataset
    secondary_captures: list[Dataset]

    def all(self) -> list[Dataset]:
        """SR first, then the captures: the order they are worth sending in."""
        return [self.sr, *self.secondary_captures]


def build_results(volume: Volume, prediction: Prediction, *, max_secondary_captures: int = 16,
                  slice_groups: Sequence[Sequence[int]] | None = None, revision: int = 0,
                  predecessor: Dataset | None = None, settings: ResultSettings | None = None,
                  site: str = "") -> ResultObjects:
    """SR (revision > 0 with `predecessor` points at the earlier SR) and up to N captures.

    `settings` are the content-changing settings of this run (default: the prediction's thresholds,
    this cap, default slabs); their key goes into every UID. `site` is the installation's site value.
    """
    if settings is None:
        settings = ResultSettings(prediction.model.thresholds, max_secondary_captures=max_secondary_captures)
    key = settings.key()
    sr = build_sr(volume, prediction, slice_groups=slice_groups, revision=revision, predecessor=predecessor,
                  instance_number=revision + 1, settings=key, site=site)
    scs = build_secondary_captures(volume, prediction, max_images=max_secondary_captures,
                                   slice_groups=slice_groups, revision=revision, settings=key)
    return ResultObjects(sr=sr, secondary_captures=scs)
