"""Key Object Selection: the key images ("Of Interest") list exactly the slices with findings (with frame
numbers for an Enhanced CT), the IOCM rejection note lists the withdrawn results; both validate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from test_report_common import dciodvfy, make_prediction, make_volume, needs, reread, write, write_ct_series

from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE
from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results
from ihd_node.report.kos import KOS_SOP_CLASS, key_image_slices, key_images, key_object_selection, rejection_note
from tests.enhanced_ct import enhanced_from_slices


def listed(kos) -> list[tuple[str, str, tuple[int, ...]]]:
    """(value type, SOP instance UID, frame numbers) of every reference in the document's content."""
    out = []
    for item in kos.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            ref = item.ReferencedSOPSequence[0]
            value = ref.get("ReferencedFrameNumber")
            many = isinstance(value, list | pydicom.multival.MultiValue)
            frames = () if value is None else tuple(int(f) for f in (value if many else [value]))
            out.append((item.ValueType, str(ref.ReferencedSOPInstanceUID), frames))
    return out


def description(kos) -> str:
    return next(i.TextValue for i in kos.ContentSequence if i.ValueType == "TEXT")


def check_valid(path: Path) -> None:
    errors, warnings = dciodvfy(path)
    print("\n".join(warnings))
    assert not errors, "\n".join(errors)
    run = subprocess.run(["dsrdump", "-Ee", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "E:" not in run.stderr, run.stderr


@pytest.fixture
def positive(tmp_path):
    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    prediction = make_prediction(6, {"subdural": [2, 3]})
    return volume, prediction


@needs("dciodvfy")
@needs("dsrdump")
def test_key_images_list_the_positive_slices(positive, tmp_path):
    volume, prediction = positive
    kos = key_images(volume, prediction)
    back = reread(kos, tmp_path / "kos.dcm")
    check_valid(tmp_path / "kos.dcm")
    assert back.SOPClassUID == KOS_SOP_CLASS and back.Modality == "KO"
    assert back.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    assert back.StudyInstanceUID == volume.study_instance_uid
    assert back.SeriesInstanceUID != volume.series_instance_uid
    assert back.PatientID == volume.headers[0].PatientID and back.PatientName == volume.headers[0].PatientName
    assert NOT_FOR_DIAGNOSTIC_USE in back.SeriesDescription and NOT_FOR_DIAGNOSTIC_USE in description(back)
    assert sorted(uid for _, uid, _ in listed(back)) == sorted(volume.slices[i].sop_instance_uid for i in (2, 3))
    assert all(kind == "IMAGE" and frames == () for kind, _, frames in listed(back))
    evidence = {i.ReferencedSOPInstanceUID for s in back.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {volume.slices[i].sop_instance_uid for i in (2, 3)}
    # highdicom reads it back as a KOS with the same references.
    doc = hd.ko.KeyObjectSelectionDocument.from_dataset(back)
    assert doc.content.get_references() and len(doc.content.get_references()) == 2
    # A re-run gives the same document UIDs.
    again = key_images(volume, prediction)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (kos.SOPInstanceUID, kos.SeriesInstanceUID)


def test_negative_has_no_key_images(tmp_path):
    volume = make_volume(tmp_path, n=4)
    assert key_images(volume, make_prediction(4)) is None


def test_slabs_list_every_original_slice_of_a_positive_slab(tmp_path):
    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    prediction = make_prediction(3, {"subdural": [1]})
    groups = [[0, 1], [2, 3], [4, 5]]
    assert key_image_slices(volume, prediction, groups) == [2, 3]
    kos = key_images(volume, prediction, slice_groups=groups)
    assert {uid for _, uid, _ in listed(kos)} == {volume.slices[i].sop_instance_uid for i in (2, 3)}


@needs("dciodvfy")
@needs("dsrdump")
def test_enhanced_ct_key_images_name_their_frames(tmp_path):
    files = write_ct_series(tmp_path / "classic", n=6, bleed_slices=(2, 3))
    enhanced = enhanced_from_slices([pydicom.dcmread(f) for f in files])
    path = write(enhanced, tmp_path / "enhanced.dcm")
    volume = load_volume([path])
    positives = [1, 4]
    kos = key_images(volume, make_prediction(6, {"epidural": positives}))
    write(kos, tmp_path / "kos.dcm")
    check_valid(tmp_path / "kos.dcm")
    expected = tuple(sorted(volume.slices[i].frame_number for i in positives))
    assert None not in expected
    assert listed(reread(kos, tmp_path / "kos2.dcm")) == [("IMAGE", enhanced.SOPInstanceUID, expected)]


@needs("dciodvfy")
@needs("dsrdump")
def test_rejection_note_lists_the_withdrawn_results(positive, tmp_path):
    volume, prediction = positive
    results = build_results(volume, prediction).all()
    note = rejection_note(volume.headers[0], results, reason="the model version was withdrawn", series_number=77)
    write(note, tmp_path / "note.dcm")
    check_valid(tmp_path / "note.dcm")
    back = pydicom.dcmread(tmp_path / "note.dcm")
    assert back.ConceptNameCodeSequence[0].CodeValue == "113037"
    assert back.StudyInstanceUID == volume.study_instance_uid and back.SeriesNumber == 77
    assert back.SeriesInstanceUID not in {r.SeriesInstanceUID for r in results}
    assert [uid for _, uid, _ in listed(back)] == [r.SOPInstanceUID for r in results]
    assert listed(back)[0][0] == "COMPOSITE"  # the SR: not an image
    assert "the model version was withdrawn" in description(back)
    again = rejection_note(volume.headers[0], results, reason="the model version was withdrawn", series_number=77)
    assert again.SOPInstanceUID == note.SOPInstanceUID


def test_objects_of_another_study_are_refused(positive):
    volume, prediction = positive
    other = pydicom.Dataset()
    other.StudyInstanceUID, other.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    other.SOPClassUID, other.SOPInstanceUID = KOS_SOP_CLASS, "1.2.3.4.5"
    with pytest.raises(ValueError, match="not the source's"):
        key_object_selection(volume.headers[0], [other], title=hd.sr.CodedConcept("113000", "DCM", "Of Interest"),
                             description="x", series_number=1)


def test_result_series_numbers_of_every_kind_follow_the_sr():
    from ihd_node.uids import result_series_number, result_series_numbers

    sr, sc = result_series_numbers(30, 2)
    assert [result_series_number(30, 2, k) for k in ("sr", "sc", "seg", "kos", "rejection")] == \
        [sr, sc, sr + 2, sr + 3, sr + 4]
    assert result_series_number(30, 3, "sr") > result_series_number(30, 2, "rejection")
    with pytest.raises(ValueError, match="unknown result kind"):
        result_series_number(30, 0, "pm")
