"""The SR as a stranger reads it: highdicom's TID 1500 reader finds the six findings (positive and negative
study), the layout OHIF can open (outlines first, no Derived container), probabilities in percent, the
partial-series wording, and frame numbers for an Enhanced CT source."""

from __future__ import annotations

from dataclasses import replace

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage
from test_report_common import dciodvfy, make_prediction, make_volume, needs, reread, write

from ihd_node.classes import CLASSES
from ihd_node.report import build_results
from ihd_node.report.sr import FINDING_CODES, build_sr

MEANINGS = {cls: code.meaning for cls, code in FINDING_CODES.items()}


def comment(sr) -> str:
    """The summary: the Comment (DCM 121106) in the Qualitative Evaluations container."""
    (evaluations,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    (text,) = [c.TextValue for c in evaluations.ContentSequence
               if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == "121106"]
    return text


def read_findings(path) -> dict[str, tuple[str, float, str, int]]:
    """finding meaning -> (Present/Absent, probability value, its unit, number of source images)."""
    report = hd.sr.MeasurementReport.from_sequence([pydicom.dcmread(path)])
    out = {}
    for group in report.get_image_measurement_groups():
        (evaluation,) = group.get_qualitative_evaluations()
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        out[group.finding_type.meaning] = (evaluation.value.meaning, probability.value, probability.unit.value,
                                           len(group.source_images))
    return out


@pytest.mark.parametrize("positive", [{"intraparenchymal": [2, 3]}, {}], ids=["positive", "negative"])
def test_a_tid1500_reader_lists_the_six_findings(tmp_path, positive) -> None:
    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    prediction = make_prediction(6, positive)
    findings = read_findings(write(build_sr(volume, prediction), tmp_path / "sr.dcm"))
    assert set(findings) == set(MEANINGS.values())
    present = set(prediction.positive_classes())
    assert present == ({"any", "intraparenchymal"} if positive else set())
    for cls in CLASSES:
        state, value, unit, images = findings[MEANINGS[cls]]
        assert state == ("Present" if cls in present else "Absent")
        assert unit == "%" and value == pytest.approx(100 * prediction.series_probability(cls), abs=1e-3)
        assert images == (2 if cls in present else 0)


def test_layout_a_viewer_can_open(tmp_path) -> None:
    """Imaging Measurements: the outlines first (OHIF's SR viewport opens the first measurement), then the six
    findings; no Derived Imaging Measurements; the document-level evaluations agree with the groups."""
    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    prediction = make_prediction(6, {"subdural": [2, 3]})
    sr = reread(build_sr(volume, prediction), tmp_path / "sr.dcm")
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence]
    assert "126011" not in names and names.count("126010") == 1
    (imaging,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    kinds = ["region" if any(c.ValueType == "SCOORD" for c in g.ContentSequence) else "finding"
             for g in imaging.ContentSequence]
    assert kinds == ["region", "region"] + ["finding"] * len(CLASSES)
    (evaluations,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    said = {c.ConceptNameCodeSequence[0].CodeMeaning: c.ConceptCodeSequence[0].CodeMeaning
            for c in evaluations.ContentSequence if c.ValueType == "CODE"}
    assert said == {MEANINGS[c]: "Present" if c in ("any", "subdural") else "Absent" for c in CLASSES}
    # No probability anywhere in the old {probability} unit.
    units = {e.value for e in sr.iterall() if e.keyword == "CodeValue"}
    assert "{probability}" not in units and "%" in units


@needs("dciodvfy")
def test_incomplete_series_is_partial_and_says_so_in_its_own_words(tmp_path) -> None:
    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    complete = make_prediction(6, {"subdural": [2, 3]})
    partial = replace(complete, incomplete="coverage: the top slice does not reach the vertex")
    results = build_results(volume, partial, max_secondary_captures=1)
    sr = reread(results.sr, tmp_path / "sr.dcm")
    assert sr.CompletionFlag == "PARTIAL" and sr.PreliminaryFlag == "PRELIMINARY"
    assert comment(sr).startswith("INCOMPLETE SERIES - analysed before all images may have arrived: coverage: ")
    texts = " ".join(e.value for e in sr.iterall() if e.keyword == "TextValue")
    assert "PRELIMINARY" not in texts and "may be incomplete" not in texts
    for capture in results.secondary_captures:
        assert capture.ImageComments.startswith("INCOMPLETE SERIES")
    assert not dciodvfy(tmp_path / "sr.dcm")[0]
    # Every result is PRELIMINARY (not verified by a physician); a complete one is COMPLETE.
    final = build_sr(volume, replace(complete, replaces_preliminary="1.2.3.4"))
    assert final.CompletionFlag == "COMPLETE" and final.PreliminaryFlag == "PRELIMINARY"
    text = comment(final)
    assert "replaces the INCOMPLETE SERIES result 1.2.3.4." in text and "INCOMPLETE SERIES -" not in text


@needs("dciodvfy")
def test_enhanced_ct_frames_are_named_wherever_a_slice_is(tmp_path) -> None:
    from enhanced_ct import enhanced_from_slices
    from test_report_common import write_ct_series

    from ihd_node.imaging.volume import load_volume

    paths = write_ct_series(tmp_path / "classic", n=6, size=32, bleed_slices=(2, 3))
    enhanced = tmp_path / "enhanced.dcm"
    enhanced_from_slices([pydicom.dcmread(p) for p in paths]).save_as(enhanced, enforce_file_format=True)
    volume = load_volume([enhanced])
    assert {s.sop_instance_uid for s in volume.slices} == {volume.slices[0].sop_instance_uid}
    prediction = make_prediction(6, {"subdural": [2, 3]}, size=32)
    results = build_results(volume, prediction, max_secondary_captures=2)
    sr = reread(results.sr, tmp_path / "sr.dcm")
    assert not dciodvfy(tmp_path / "sr.dcm")[0]
    frames = sorted(volume.slices[i].frame_number for i in (2, 3))
    number = volume.slices[0].instance_number
    series = volume.headers[0].SeriesNumber
    texts = comment(sr)
    assert f"image {number} frames {frames[0]}-{frames[1]} of series {series}." in texts, texts
    # Image Library: one entry per frame, each naming its frame.
    (library,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    listed = [e.ReferencedSOPSequence[0].ReferencedFrameNumber for g in library.ContentSequence
              for e in g.ContentSequence]
    assert sorted(listed) == list(range(1, 7))
    # Every reference to a source image in the groups (sources, the outlines' images, the segments' source
    # images) names a frame; the Segmentation itself is named by its segment number instead.
    (imaging,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    refs = [e.value[0] for e in imaging.iterall() if e.keyword == "ReferencedSOPSequence"]
    source_refs = [r for r in refs if r.ReferencedSOPClassUID != SegmentationStorage]
    assert source_refs and all("ReferencedFrameNumber" in r for r in source_refs)
    assert all("ReferencedSegmentNumber" in r for r in refs if r.ReferencedSOPClassUID == SegmentationStorage)
    outlined = {int(e.value) for e in imaging.iterall() if e.keyword == "ReferencedFrameNumber"}
    assert outlined == set(frames)
    # The captures name the frame they show.
    for capture in results.secondary_captures:
        assert f"image {number}, frame " in capture.ImageComments, capture.ImageComments
