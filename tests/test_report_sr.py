"""The TID 1500 SR: validates with dciodvfy, renders with dsrdump, says what was found, stable UIDs."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace

import pytest
from pydicom.sr.codedict import codes
from test_report_common import (
    SPARSE_DROPPED,
    dciodvfy,
    make_prediction,
    make_volume,
    needs,
    reread,
    write,
)

from ihd_node.classes import CLASSES
from ihd_node.report import build_results
from ihd_node.report.sr import FINDING_CODES, SR_SERIES_DESCRIPTION, build_sr

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
FINDING_VALUES = {code.value for code in FINDING_CODES.values()}


def dsrdump(path) -> str:
    run = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def content_items(ds, value_type: str) -> list:
    """All content items of one value type, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == value_type:
            found.append(item)
        found.extend(content_items(item, value_type))
    return found


def finding_groups(sr) -> dict[str, object]:
    """The per-class (TID 1501, no region) measurement groups keyed by the finding code value."""
    groups = {}
    for item in content_items(sr, "CONTAINER"):
        if item.ConceptNameCodeSequence[0].CodeValue != "125007":  # Measurement Group
            continue
        if any(c.ValueType == "SCOORD" for c in item.ContentSequence):
            continue  # a region group (TID 1410)
        for child in item.ContentSequence:
            # 121071 = Finding
            if child.ValueType == "CODE" and child.ConceptNameCodeSequence[0].CodeValue == "121071":
                groups[child.ConceptCodeSequence[0].CodeValue] = item
    return groups


def group_images(group) -> list[str]:
    return [c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for c in group.ContentSequence if c.ValueType == "IMAGE"]


def group_presence(group) -> str:
    for c in group.ContentSequence:
        if c.ValueType == "CODE" and c.ConceptCodeSequence[0].CodeValue in ("52101004", "272519000"):
            return c.ConceptCodeSequence[0].CodeMeaning
    raise AssertionError("no Present/Absent item")


def check_dciodvfy(path) -> None:
    errors, warnings = dciodvfy(path)
    print("\n".join(warnings))
    assert not errors, "\n".join(errors)


@pytest.fixture
def positive(tmp_path):
    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    prediction = make_prediction(6, {"intraparenchymal": [2, 3]})
    return volume, prediction


def test_positive_sr_structure(positive, tmp_path):
    volume, prediction = positive
    sr = reread(build_sr(volume, prediction), tmp_path / "sr.dcm")
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == volume.study_instance_uid
    assert sr.SeriesInstanceUID != volume.series_instance_uid
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report (TID 1500)
    purpose = [eq.PurposeOfReferenceCodeSequence[0].CodeValue for eq in sr.ContributingEquipmentSequence]
    assert "109102" in purpose  # the algorithm as processing equipment
    # Device observer context.
    uidrefs = {i.ConceptNameCodeSequence[0].CodeValue: i.UID for i in content_items(sr, "UIDREF")}
    assert "121012" in uidrefs  # Device Observer UID
    # One group per class, present only for ICH and the positive subtype, images = the positive slices.
    groups = finding_groups(sr)
    assert set(groups) == {FINDING_CODES[c].value for c in CLASSES}
    positive_uids = [volume.slices[i].sop_instance_uid for i in (2, 3)]
    for cls in CLASSES:
        group = groups[FINDING_CODES[cls].value]
        if cls in ("any", "intraparenchymal"):
            assert group_presence(group) == "Present"
            assert sorted(group_images(group)) == sorted(positive_uids)
        else:
            assert group_presence(group) == "Absent"
            assert group_images(group) == []
    # Every evaluated slice is evidence.
    evidence = [r.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for r in series.ReferencedSOPSequence]
    assert sorted(evidence) == sorted(s.sop_instance_uid for s in volume.slices)
    texts = " ".join(t.TextValue for t in content_items(sr, "TEXT"))
    assert "NOT FOR DIAGNOSTIC USE" in texts.upper() and "threshold=0.5000" in texts
    # Every group names where the finding lies: (363698007, SCT, "Finding Site") = intracranial structure.
    for group in groups.values():
        sites = [c.ConceptCodeSequence[0] for c in group.ContentSequence
                 if c.ConceptNameCodeSequence[0].CodeValue == "363698007"]
        assert [(s.CodeValue, s.CodingSchemeDesignator) for s in sites] == [("128319008", "SCT")]
    # Present/Absent from CID 241 (SNOMED CT), not the retired DCM 121053/121054.
    evaluations = {c.ConceptCodeSequence[0].CodeValue for g in groups.values() for c in g.ContentSequence
                   if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue in FINDING_VALUES}
    assert evaluations == {"52101004", "272519000"}


@needs("dciodvfy")
@needs("dsrdump")
def test_positive_sr_validates_and_renders(positive, tmp_path):
    volume, prediction = positive
    path = write(build_sr(volume, prediction), tmp_path / "sr.dcm")
    check_dciodvfy(path)
    text = dsrdump(path)
    assert re.search(r'"Cerebral hemorrhage"\)=\(52101004,SCT,"Present"\)', text), text
    assert re.search(r'"Intracranial hemorrhage"\)=\(52101004,SCT,"Present"\)', text), text
    assert re.search(r'"Subdural hemorrhage"\)=\(272519000,SCT,"Absent"\)', text), text
    assert "intraparenchymal" in text and "NOT FOR DIAGNOSTIC USE" in text.upper()
    assert "UNVERIFIED" in text


@needs("dciodvfy")
@needs("dsrdump")
def test_negative_sr_says_absent(tmp_path):
    volume = make_volume(tmp_path, n=5)
    prediction = make_prediction(5)
    sr = build_sr(volume, prediction)
    path = write(sr, tmp_path / "sr.dcm")
    check_dciodvfy(path)
    groups = finding_groups(reread(sr, tmp_path / "again.dcm"))
    assert all(group_presence(g) == "Absent" and group_images(g) == [] for g in groups.values())
    text = dsrdump(path)
    # Six in the TID 1501 groups, six more in the document-level Qualitative Evaluations.
    assert text.count('(272519000,SCT,"Absent")') == 2 * len(CLASSES)
    assert '(52101004,SCT,"Present")' not in text
    assert "No intracranial hemorrhage detected" in text


@needs("dciodvfy")
def test_sparse_source_still_validates(tmp_path):
    volume = make_volume(tmp_path, n=4, bleed_slices=(1,), sparse=True)
    assert all(k not in volume.headers[0] for k in SPARSE_DROPPED)
    prediction = make_prediction(4, {"subdural": [1]})
    sr = reread(build_sr(volume, prediction), tmp_path / "sr.dcm")
    for keyword in SPARSE_DROPPED:
        assert keyword in sr, keyword
        assert sr[keyword].value in (None, "", b""), (keyword, sr[keyword].value)
    check_dciodvfy(tmp_path / "sr.dcm")
    assert all(k not in volume.headers[0] for k in SPARSE_DROPPED)  # the source headers are untouched


def test_uids_are_deterministic(positive):
    volume, prediction = positive
    a, b = build_sr(volume, prediction), build_sr(volume, prediction)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert [i.UID for i in content_items(a, "UIDREF")] == [i.UID for i in content_items(b, "UIDREF")]
    other_model = replace(prediction, model=replace(prediction.model, version="9.9"))
    c = build_sr(volume, other_model)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    assert len(a.SOPInstanceUID) <= 64


@needs("dciodvfy")
def test_revision_references_predecessor(positive, tmp_path):
    volume, prediction = positive
    first = build_sr(volume, prediction)
    second = build_sr(volume, prediction, revision=1, predecessor=first, instance_number=2)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    study = second.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == first.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    ref = series.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPClassUID == first.SOPClassUID
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    check_dciodvfy(write(second, tmp_path / "sr2.dcm"))


def test_slabs_reference_all_original_slices(tmp_path):
    volume = make_volume(tmp_path, n=8, spacing_mm=2.5, bleed_slices=(2, 3))
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    prediction = make_prediction(4, {"subarachnoid": [1]})
    sr = build_sr(volume, prediction, slice_groups=groups)
    refs = finding_groups(sr)[FINDING_CODES["subarachnoid"].value]
    assert sorted(group_images(refs)) == sorted(volume.slices[i].sop_instance_uid for i in (2, 3))
    with pytest.raises(ValueError, match="slice_groups"):
        build_sr(volume, prediction)
    with pytest.raises(ValueError, match="slice_groups"):
        build_sr(volume, prediction, slice_groups=groups[:3])


@needs("dciodvfy")
def test_build_results_in_source_study(positive, tmp_path):
    volume, prediction = positive
    results = build_results(volume, prediction, max_secondary_captures=1)
    assert len(results.secondary_captures) == 2  # the summary and one slice
    assert [d.StudyInstanceUID for d in results.all()] == [volume.study_instance_uid] * 5  # + SEG, key images
    assert results.sr.SeriesInstanceUID != results.secondary_captures[0].SeriesInstanceUID
    assert results.sr.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurementReport.value
    for i, ds in enumerate(results.all()):
        check_dciodvfy(write(ds, tmp_path / f"r{i}.dcm"))


@needs("dciodvfy")
@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_values_highdicom_refuses_are_repaired(tmp_path):
    """PatientSex "U" and dashed dates occur in the wild; they must not cost the study its results."""
    volume = make_volume(tmp_path, n=3, bleed_slices=(1,))
    volume.headers[0].PatientSex = "U"
    volume.headers[0].PatientBirthDate = "1970-01-02"
    results = build_results(volume, make_prediction(3, {"epidural": [1]}))
    sr = reread(results.sr, tmp_path / "sr.dcm")
    assert sr.PatientSex in (None, "") and sr.PatientBirthDate == "19700102"
    assert volume.headers[0].PatientSex == "U"
    check_dciodvfy(tmp_path / "sr.dcm")


def region_groups(sr) -> list:
    return [item for item in content_items(sr, "CONTAINER")
            if item.ConceptNameCodeSequence[0].CodeValue == "125007"
            and any(c.ValueType == "SCOORD" for c in item.ContentSequence)]


def test_regions_outline_the_finding_on_its_key_slices(positive, tmp_path):
    """One TID 1410 group per present finding and key slice: closed polyline around the heat, labelled."""
    import numpy as np

    from ihd_node.report.regions import region_mask

    volume, prediction = positive
    sr = reread(build_sr(volume, prediction), tmp_path / "sr.dcm")
    regions = region_groups(sr)
    assert len(regions) == 2  # intraparenchymal on slices 2 and 3; `any` is not drawn beside its subtype
    size = volume.hu.shape[1]
    for group, index, probability in zip(regions, (2, 3), (0.95, 0.85), strict=True):
        items = {c.ConceptNameCodeSequence[0].CodeValue: c for c in group.ContentSequence}
        assert items["112039"].TextValue == f"Intraparenchymal hemorrhage {100 * probability:.0f} %"  # tracking id
        assert items["121071"].ConceptCodeSequence[0].CodeValue == FINDING_CODES["intraparenchymal"].value
        (scoord,) = [c for c in group.ContentSequence if c.ValueType == "SCOORD"]
        assert scoord.GraphicType == "POLYLINE"
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == volume.slices[index].sop_instance_uid
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
        assert (points[0] == points[-1]).all() and 4 <= len(points) <= 65
        inside = region_mask(points, (size, size))
        heat = prediction.heatmaps[(index, "intraparenchymal")]
        assert inside[int(0.45 * size), int(0.35 * size)]  # the blob's peak (row, column)
        assert heat[inside].min() >= 0.4 and heat[~inside].max() <= 0.55  # the >= half-peak core
        (num,) = [c for c in group.ContentSequence if c.ValueType == "NUM"]  # named by the finding
        assert num.ConceptNameCodeSequence[0].CodeMeaning == "Cerebral hemorrhage"
        assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(100 * probability, abs=1e-3)
        assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    # The Image Library (TID 1600, 111028) lists every evaluated image.
    (library,) = [c for c in sr.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "111028"]
    listed = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content_items(library, "IMAGE")]
    assert sorted(listed) == sorted(s.sop_instance_uid for s in volume.slices)


def test_summary_in_a_doctors_words(positive):
    from ihd_node.report.sr import summary_text

    volume, prediction = positive
    text = summary_text(volume, prediction)
    # Instance numbers run backwards in this series: slices 2 and 3 are images 4 and 3; the bleed is drawn
    # on the image's left, the patient's right.
    assert text.startswith("Intracranial hemorrhage suspected: intraparenchymal (95 %), right hemisphere, "
                           "images 3-4 of series 3. Not for diagnostic use."), text
    assert "any" not in text.split()
    negative = summary_text(volume, make_prediction(6))
    assert negative.startswith("No intracranial hemorrhage detected. Not for diagnostic use.")


def _without_stamps(ds) -> bytes:
    """The data set as written, its creation stamps blanked (highdicom takes them from the clock)."""
    from io import BytesIO

    import pydicom

    ds = pydicom.dcmread(BytesIO(_bytes(ds)))
    stamps = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime"}

    def blank(dataset, elem) -> None:
        if elem.keyword in stamps:
            elem.value = ""

    ds.walk(blank)
    return _bytes(ds)


def _bytes(ds) -> bytes:
    from io import BytesIO

    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_sr_equals_highdicoms_plain_build(positive, tmp_path, monkeypatch):
    """comprehensive_3d_sr skips highdicom's copy of the content tree: the SR must be the same, element for
    element, as the plain hd.sr.Comprehensive3DSR call gives (which also checks every referenced image is
    evidence), for a first result and a revision naming its predecessor."""
    import highdicom as hd

    import ihd_node.report.sr as sr_module

    volume, prediction = positive
    first = build_sr(volume, prediction)
    revised = build_sr(volume, prediction, revision=1, predecessor=first)
    monkeypatch.setattr(sr_module, "comprehensive_3d_sr",
                        lambda *, evidence, content, **kw: hd.sr.Comprehensive3DSR(evidence=evidence,
                                                                                   content=content, **kw))
    plain_first = build_sr(volume, prediction)
    plain_revised = build_sr(volume, prediction, revision=1, predecessor=plain_first)
    assert len(region_groups(first)) == 2  # the regions (SCOORD items) are part of what is compared
    assert _without_stamps(first) == _without_stamps(plain_first)
    assert _without_stamps(revised) == _without_stamps(plain_revised)


def _written(item) -> bytes:
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.ContentSequence = [item]
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def test_image_library_equals_highdicoms(tmp_path):
    """image_library builds the TID 1600 library as plain data sets (highdicom's classes cost 8 ms per
    image): the same bytes as hd.sr.ImageLibrary for classic CT, Enhanced CT frames, headers without a
    frame of reference or with SpacingBetweenSlices, and two frames of reference (two groups)."""
    import copy

    import highdicom as hd
    import pydicom
    from enhanced_ct import enhanced_from_slices
    from test_report_common import write_ct_series

    from ihd_node.imaging.volume import load_volume
    from ihd_node.report.sr import image_library

    paths = write_ct_series(tmp_path / "classic", n=4, size=32)
    classic = load_volume(paths).headers
    enhanced_path = tmp_path / "enhanced.dcm"
    enhanced_from_slices([pydicom.dcmread(p) for p in paths]).save_as(enhanced_path, enforce_file_format=True)
    frames = load_volume([enhanced_path]).headers
    assert str(frames[0].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2.1" and len(frames) == 4
    odd = [copy.deepcopy(h) for h in classic]
    del odd[0].FrameOfReferenceUID
    odd[1].SpacingBetweenSlices = 2.5
    odd[2].FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.99"
    for headers in (classic, frames, odd):
        assert _written(image_library(headers)) == _written(hd.sr.ImageLibrary(headers)[0])


def test_image_library_sits_where_highdicom_puts_it(positive):
    """After Procedure Reported, before Imaging Measurements; one entry per evaluated image."""
    volume, prediction = positive
    sr = build_sr(volume, prediction)
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence]
    library = names.index("111028")
    assert names[library - 1] == "121058"  # Procedure reported
    assert names[library + 1] == "126010"  # Imaging Measurements
    groups = sr.ContentSequence[library].ContentSequence
    assert sum(len(g.ContentSequence) for g in groups) == volume.n_slices
