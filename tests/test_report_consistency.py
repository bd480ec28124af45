"""The consistency rule: a subtype present means an intracranial haemorrhage is present, everywhere.

Per-class thresholds are tuned independently, so a subtype can cross its (low) threshold while `any`
stays below its own. The SR, the captures and `analyze` must then all say ICH present.
"""

from __future__ import annotations

import numpy as np
from test_report_common import MODEL, make_volume
from test_report_sr import finding_groups, group_images, group_presence

from ihd_node.classes import CLASSES
from ihd_node.commands.analyze import series_summary
from ihd_node.node.analysis import SeriesAnalysis
from ihd_node.report.sc import build_secondary_captures, shown_classes
from ihd_node.report.sr import FINDING_CODES, build_sr
from ihd_node.values.prediction import ModelIdentity, Prediction, positive_mask

# The field case: intraventricular threshold 0.032, `any` at its usual 0.5.
THRESHOLDS = {**dict.fromkeys(CLASSES, 0.5), "intraventricular": 0.032}
IVH = CLASSES.index("intraventricular")


def subtype_only_prediction(n: int = 5, slices: tuple[int, ...] = (2,)) -> Prediction:
    probs = np.full((n, len(CLASSES)), 0.01, np.float32)
    for i in slices:
        probs[i, 0] = 0.2  # `any` below 0.5
        probs[i, IVH] = 0.3  # intraventricular above 0.032
    model = ModelIdentity(MODEL.name, MODEL.version, THRESHOLDS)
    return Prediction(slice_probabilities=probs, series_probabilities=probs.max(axis=0), model=model)


def test_the_rule_itself():
    mask = positive_mask(np.array([[0.2, 0.0, 0.0, 0.3, 0.0, 0.0], [0.6, 0, 0, 0, 0, 0], [0.1] * 6]),
                         THRESHOLDS)
    assert mask[0].tolist() == [True, False, False, True, False, False]  # subtype => any
    assert mask[1].tolist() == [True] + [False] * 5  # any alone stays possible (no subtype named)
    assert mask[2].tolist() == [True, False, False, True, False, False]  # 0.1 >= 0.032 still names IVH
    prediction = subtype_only_prediction()
    assert prediction.positive_classes() == ["any", "intraventricular"]
    assert prediction.slice_positive_classes(2) == ["any", "intraventricular"]
    assert prediction.positive_slices("any") == [2]


def test_sr_says_ich_present_with_the_subtype_images(tmp_path):
    volume = make_volume(tmp_path, n=5)
    prediction = subtype_only_prediction()
    groups = finding_groups(build_sr(volume, prediction))
    ich = groups[FINDING_CODES["any"].value]
    assert group_presence(ich) == "Present"
    assert group_images(ich) == [volume.slices[2].sop_instance_uid]
    assert group_presence(groups[FINDING_CODES["intraventricular"].value]) == "Present"


def test_capture_and_analyze_follow_the_rule(tmp_path):
    volume = make_volume(tmp_path, n=5)
    prediction = subtype_only_prediction()
    scs = build_secondary_captures(volume, prediction)
    assert len(scs) == 2 and shown_classes(prediction, 2) == ["intraventricular"]  # summary + one slice
    assert "Intracranial hemorrhage suspected: intraventricular" in scs[0].ImageComments
    assert "intraventricular" in scs[1].ImageComments
    summary = series_summary(SeriesAnalysis(volume, prediction, [[i] for i in range(5)]), 0.1)
    assert summary["positive"] == ["any", "intraventricular"]
