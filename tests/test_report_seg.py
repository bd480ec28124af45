"""The Segmentation of the model's attention regions: valid, read back by highdicom with one segment per
reported finding, the same pixels the SR's outline encloses on every key slice, referenced from the SR
(TID 1411), frame-exact for an Enhanced CT, lossy when the source was, absent for a negative series."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_report_common import dciodvfy, make_prediction, make_volume, needs, write, write_ct_series
from test_report_lossy import jpeg_series

from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE
from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results
from ihd_node.report.codes import FINDING_CODES
from ihd_node.report.regions import attention_mask
from ihd_node.report.seg import SEG_SOP_CLASS, segmentation
from tests.enhanced_ct import enhanced_from_slices

FINDING = "121071"
# A pixel whose centre lies within this distance of the SR's polyline may fall either way: the outline is
# the region's pixel-edge boundary simplified (Douglas-Peucker from 0.5 px, more for long outlines).
BOUNDARY_PX = 1.0


def sr_regions(sr) -> list[tuple[str, str, int | None, np.ndarray]]:
    """(finding code, SOP instance UID, frame or None, polyline (n, 2) of column, row) of every SR outline."""
    out = []

    def walk(items):
        for item in items:
            children = list(item.get("ContentSequence", []))
            scoords = [c for c in children if c.ValueType == "SCOORD"]
            if item.ValueType == "CONTAINER" and scoords:
                finding = next(c.ConceptCodeSequence[0].CodeValue for c in children
                               if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == FINDING)
                for scoord in scoords:
                    ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
                    frame = ref.get("ReferencedFrameNumber")
                    out.append((finding, str(ref.ReferencedSOPInstanceUID), None if frame is None else int(frame),
                                np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)))
            walk(children)
    walk(sr.ContentSequence)
    return out


def rasterize(points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(inside, near): pixels whose centre is inside the closed polyline, and those within BOUNDARY_PX of it.
    Pixel (r, c) has its centre at (c + 0.5, r + 0.5) in the SR's image coordinates (PS3.3 C.18.6.1.2)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.column_stack([cols.ravel() + 0.5, rows.ravel() + 0.5])
    a, b = points[:-1], points[1:]
    # Even-odd rule: a ray from the centre towards +x crosses the outline an odd number of times.
    x, y = centres[:, None, 0], centres[:, None, 1]
    spans = (a[:, 1] > y) != (b[:, 1] > y)
    cross_x = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / np.where(b[:, 1] == a[:, 1], 1, b[:, 1] - a[:, 1])
    inside = ((spans & (x < cross_x)).sum(axis=1) % 2 == 1).reshape(shape)
    ab = b - a
    t = np.clip(((centres[:, None, :] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    nearest = a + t[..., None] * ab
    distance = np.hypot(*(centres[:, None, :] - nearest).transpose(2, 0, 1)).min(axis=1)
    return inside, (distance <= BOUNDARY_PX).reshape(shape)


def seg_frame(seg: hd.seg.Segmentation, number: int, uid: str, frame: int | None) -> np.ndarray:
    if frame is None:
        pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[number], ignore_spatial_locations=True)
    else:
        pixels = seg.get_pixels_by_source_frame(uid, [frame], segment_numbers=[number],
                                                ignore_spatial_locations=True)
    return pixels[0, :, :, 0].astype(bool)


def check_valid(path: Path) -> None:
    errors, warnings = dciodvfy(path)
    print("\n".join(warnings))
    assert not errors, "\n".join(errors)


def check_matches_sr(results, tmp_path: Path) -> hd.seg.Segmentation:
    """Every SR outline has a SEG frame of its finding's segment with the same pixels (bar the boundary),
    and the SEG holds nothing else."""
    path = write(results.segmentation, tmp_path / "seg.dcm")
    check_valid(path)
    seg = hd.seg.segread(path)
    numbers = {d.segmented_property_type.value: d.segment_number
               for d in map(seg.get_segment_description, seg.segment_numbers)}
    regions = sr_regions(pydicom.dcmread(write(results.sr, tmp_path / "sr.dcm")))
    assert regions and {f for f, *_ in regions} == set(numbers)
    covered = 0
    for finding, uid, frame, points in regions:
        mask = seg_frame(seg, numbers[finding], uid, frame)
        inside, near = rasterize(points, mask.shape)
        assert mask.any() and inside.any()
        differ = mask != inside
        assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} pixels differ away from the outline"
        assert (mask & inside).sum() / (mask | inside).sum() > 0.8
        covered += int(mask.sum())
    assert int(np.asarray(seg.pixel_array).astype(bool).sum()) == covered  # no pixel outside an outline
    return seg


@pytest.fixture
def positive(tmp_path):
    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    prediction = make_prediction(6, {"intraparenchymal": [2, 3], "subdural": [3]})
    return volume, prediction


@needs("dciodvfy")
def test_segments_are_the_srs_outlines(positive, tmp_path):
    volume, prediction = positive
    results = build_results(volume, prediction)
    seg = check_matches_sr(results, tmp_path)
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.StudyInstanceUID == volume.study_instance_uid and seg.SeriesInstanceUID != volume.series_instance_uid
    assert NOT_FOR_DIAGNOSTIC_USE in seg.SeriesDescription
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    described = {d.segmented_property_type.value: d
                 for d in map(seg.get_segment_description, seg.segment_numbers)}
    assert set(described) == {FINDING_CODES["intraparenchymal"].value, FINDING_CODES["subdural"].value}
    for d in described.values():
        assert d.SegmentLabel.startswith("AI attention: ")
        assert "not a lesion boundary" in d.SegmentDescription and NOT_FOR_DIAGNOSTIC_USE in d.SegmentDescription
        assert d.segmented_property_category.value == "49755003"
        assert d.algorithm_identification[0].AlgorithmName == prediction.model.name
        assert d.algorithm_identification[0].AlgorithmVersion == prediction.model.version
    # The slices: intraparenchymal on model slices 2 and 3, subdural on 3 (the heatmaps given).
    sub = described[FINDING_CODES["subdural"].value].segment_number
    assert seg.get_pixels_by_source_instance([volume.slices[3].sop_instance_uid], segment_numbers=[sub],
                                             ignore_spatial_locations=True).any()
    # The same region as attention_mask of the heatmap, pixel for pixel.
    mask = seg_frame(seg, sub, volume.slices[3].sop_instance_uid, None)
    assert (mask == attention_mask(prediction.heatmaps[(3, "subdural")])).all()
    # Deterministic: a re-run gives the same UIDs.
    again = build_results(volume, prediction).segmentation
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (seg.SOPInstanceUID, seg.SeriesInstanceUID)
    assert again.DimensionOrganizationSequence[0].DimensionOrganizationUID == \
        seg.DimensionOrganizationSequence[0].DimensionOrganizationUID


@needs("dciodvfy")
@needs("dsrdump")
def test_the_sr_references_the_segments(positive, tmp_path):
    volume, prediction = positive
    results = build_results(volume, prediction)
    path = write(results.sr, tmp_path / "sr.dcm")
    check_valid(path)
    run = subprocess.run(["dsrdump", "-Ee", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "E:" not in run.stderr, run.stderr
    sr = hd.sr.srread(path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    seg = results.segmentation
    assert len(groups) == len(seg.SegmentSequence) == 2
    by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    for group in groups:
        ref = group.referenced_segment
        assert ref is not None and ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = ref.referenced_segment_numbers
        segment = by_number[number]
        shown_on = {FINDING_CODES["intraparenchymal"].value: (2, 3), FINDING_CODES["subdural"].value: (3,)}
        assert {s.referenced_sop_instance_uid for s in ref.source_images_for_segmentation} == \
            {volume.slices[i].sop_instance_uid for i in shown_on[group.finding_type.value]}
        assert group.tracking_uid == segment.TrackingUID
        assert "not a lesion boundary" in group.tracking_identifier
        assert group.finding_type.value == segment.SegmentedPropertyTypeCodeSequence[0].CodeValue
        # One tracked finding with the class's first outline (OHIF merges them; alone it fails on a group
        # without coordinates).
        outlines = [g.tracking_uid for g in sr.content.get_planar_roi_measurement_groups()
                    if g.finding_type.value == group.finding_type.value]
        assert outlines and group.tracking_uid == outlines[0]
    evidence = {i.ReferencedSOPInstanceUID for s in results.sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    assert results.all()[0] is results.sr and results.all()[-2:] == [seg, results.key_images]


def test_a_negative_series_has_no_segmentation_nor_key_images(tmp_path):
    volume = make_volume(tmp_path, n=4)
    results = build_results(volume, make_prediction(4))
    assert results.segmentation is None and results.key_images is None
    assert [ds.Modality for ds in results.all()] == ["SR", "OT"]
    assert segmentation(volume, make_prediction(4)) is None


@needs("dciodvfy")
def test_enhanced_ct_segments_reference_the_frames(tmp_path):
    files = write_ct_series(tmp_path / "classic", n=6, bleed_slices=(2, 3))
    enhanced = enhanced_from_slices([pydicom.dcmread(f) for f in files])
    volume = load_volume([write(enhanced, tmp_path / "enhanced.dcm")])
    prediction = make_prediction(6, {"subdural": [1, 4]})
    results = build_results(volume, prediction)
    seg = check_matches_sr(results, tmp_path)
    frames = sorted(int(f) for item in seg.PerFrameFunctionalGroupsSequence
                    for d in item.DerivationImageSequence for s in d.SourceImageSequence
                    for f in ([s.ReferencedFrameNumber] if isinstance(s.ReferencedFrameNumber, int)
                              else s.ReferencedFrameNumber))
    assert frames == sorted(volume.slices[i].frame_number for i in (1, 4))
    assert {s.ReferencedSOPInstanceUID for item in seg.PerFrameFunctionalGroupsSequence
            for d in item.DerivationImageSequence for s in d.SourceImageSequence} == {enhanced.SOPInstanceUID}


@needs("dcmcjpeg")
@needs("dciodvfy")
def test_a_lossy_source_gives_a_lossy_segmentation(tmp_path):
    paths = jpeg_series(tmp_path / "src")
    results = build_results(load_volume(paths), make_prediction(3, {"subdural": [1]}, size=64))
    seg = pydicom.dcmread(write(results.segmentation, tmp_path / "seg.dcm"))
    check_valid(tmp_path / "seg.dcm")
    assert seg.LossyImageCompression == "01" and str(seg.LossyImageCompressionMethod) == "ISO_10918_1"


def test_a_source_it_cannot_reference_leaves_the_seg_out_with_the_reason(tmp_path, caplog):
    volume = make_volume(tmp_path, n=3, size=128)
    prediction = make_prediction(3, {"subdural": [1]}, size=64)  # heat of another size than the slices
    with caplog.at_level("WARNING"):
        results = build_results(volume, prediction)
    assert results.segmentation is None and results.key_images is not None
    assert [ds.Modality for ds in results.all()][0] == "SR"
    assert "report.segmentation_skipped" in caplog.text and "does not match the 128x128 slices" in caplog.text
    assert not hd.sr.srread(write(results.sr, tmp_path / "sr.dcm")).content.get_volumetric_roi_measurement_groups()
