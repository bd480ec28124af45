"""Result objects for one analysed series: a TID 1500 SR, Grad-CAM secondary captures and, for a positive
series, a Segmentation of the model's attention regions and a Key Object Selection of the key images (no
torch here).

UIDs are derived from the source series, the model identity, the content-changing settings and the
revision (see uids.py), so building the results again gives the same objects. A revision (late images,
re-analysis) is a new result set: new SR and SC series, and the new SR names the earlier one in its
PredecessorDocumentsSequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from ihd_node import nodelog
from ihd_node.report.kos import key_images
from ihd_node.report.sc import SC_SERIES_DESCRIPTION, build_secondary_captures
from ihd_node.report.seg import SegmentationSourceError, segmentation
from ihd_node.report.sr import SR_SERIES_DESCRIPTION, build_sr
from ihd_node.report.sr_segments import add_segment_references
from ihd_node.uids import ResultSettings
from ihd_node.values.prediction import Prediction
from ihd_node.values.volume import Volume

__all__ = ["ResultObjects", "ResultSettings", "build_results", "build_sr", "build_secondary_captures",
           "result_file_name",
           "SR_SERIES_DESCRIPTION", "SC_SERIES_DESCRIPTION"]


# File name prefix by Modality: a capture's Modality is OT, which named the files OT_ in one place and SC_
# in the other; the node's retention and console find the captures by SC_.
_FILE_KINDS = {"SR": "SR", "SEG": "SEG", "KO": "KO"}


def result_file_name(ds: Dataset) -> str:
    """`SR_`, `SC_`, `SEG_` or `KO_<SOPInstanceUID>.dcm`: one naming for `serve` and `analyze --out`."""
    kind = _FILE_KINDS.get(str(ds.Modality), "SC")
    return f"{kind}_{ds.SOPInstanceUID}.dcm"


@dataclass
class ResultObjects:
    """What goes back to the PACS for one series."""

    sr: Dataset
    secondary_captures: list[Dataset]
    segmentation: Dataset | None = None  # the attention regions as an overlay (positive series only)
    key_images: Dataset | None = None  # "Of Interest" key object selection (positive series only)
    left_out: list[str] = field(default_factory=list)  # objects not made, with why (the node books them)

    def all(self) -> list[Dataset]:
        """SR first (the node reads objects[0] as the SR), then the captures, the Segmentation and the key
        images: the order they are worth sending in."""
        extra = [ds for ds in (self.segmentation, self.key_images) if ds is not None]
        return [self.sr, *self.secondary_captures, *extra]


def build_results(volume: Volume, prediction: Prediction, *, max_secondary_captures: int = 16,
                  slice_groups: Sequence[Sequence[int]] | None = None, revision: int = 0,
                  predecessor: Dataset | None = None, settings: ResultSettings | None = None,
                  site: str = "") -> ResultObjects:
    """SR (revision > 0 with `predecessor` points at the earlier SR), up to N captures, and for a positive
    series the Segmentation (referenced from the SR) and the key images.

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
    try:
        seg = segmentation(volume, prediction, slice_groups=slice_groups, revision=revision, settings=key)
    except SegmentationSourceError as exc:  # the SR, captures and key images still go out
        nodelog.warning("report.segmentation_skipped", series=volume.series_instance_uid, reason=str(exc))
        seg, left_out = None, [f"no Segmentation: {exc}"]
    else:
        left_out = []
    if seg is not None:
        add_segment_references(sr, seg[0], seg[1], prediction)
    kos = key_images(volume, prediction, slice_groups=slice_groups, revision=revision, settings=key)
    return ResultObjects(sr=sr, secondary_captures=scs, segmentation=None if seg is None else seg[0],
                         key_images=kos, left_out=left_out)
