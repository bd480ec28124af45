"""Grad-CAM secondary captures: valid SC objects, one per positive slice, heat drawn where it is hot."""

from __future__ import annotations

import numpy as np
import pytest
from test_report_common import (
    SPARSE_DROPPED,
    dciodvfy,
    make_prediction,
    make_volume,
    needs,
    reread,
    write,
)

from ihd_node.report.overlay import CLASS_COLOURS, brain_window, render
from ihd_node.report.sc import SC_SERIES_DESCRIPTION, build_secondary_captures, patient_orientation

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SIZE = 128


def peak(shape: tuple[int, int]) -> tuple[int, int]:
    """Where make_prediction puts the centre of its heat blob."""
    return int(0.45 * shape[0]), int(0.35 * shape[1])


def is_red(pixel: np.ndarray) -> bool:
    r, g, b = (int(v) for v in pixel)
    return r > 150 and r > g + 60 and r > b + 60


@pytest.fixture
def positive(tmp_path):
    volume = make_volume(tmp_path, n=6, size=SIZE, bleed_slices=(2, 3))
    prediction = make_prediction(6, {"intraparenchymal": [2, 3]}, size=SIZE)
    return volume, prediction


def test_one_capture_per_positive_slice(positive, tmp_path):
    volume, prediction = positive
    scs = build_secondary_captures(volume, prediction)
    assert len(scs) == 2
    for n, (sc, index) in enumerate(zip(scs, (2, 3), strict=True)):
        sc = reread(sc, tmp_path / f"sc{n}.dcm")
        assert sc.SOPClassUID == SC_IMAGE_STORAGE
        assert sc.StudyInstanceUID == volume.study_instance_uid
        assert sc.SeriesInstanceUID not in (volume.series_instance_uid,)
        assert sc.SeriesDescription == SC_SERIES_DESCRIPTION
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.ConversionType == "WSD"  # drawn by software, not digitised video (DI)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.SamplesPerPixel == 3 and sc.PhotometricInterpretation == "RGB"
        assert sc.InstanceNumber == n + 1
        pixels = sc.pixel_array
        assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
        assert is_red(pixels[peak((SIZE, SIZE))]), pixels[peak((SIZE, SIZE))]
        source = volume.slices[index].sop_instance_uid
        assert [i.ReferencedSOPInstanceUID for i in sc.SourceImageSequence] == [source]
        assert [i.ReferencedSOPInstanceUID for i in sc.ReferencedImageSequence] == [source]
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1


def test_negative_prediction_gives_no_captures(tmp_path):
    volume = make_volume(tmp_path, n=4, size=SIZE)
    assert build_secondary_captures(volume, make_prediction(4, size=SIZE)) == []


def test_cap_keeps_the_most_probable_slices(tmp_path):
    volume = make_volume(tmp_path, n=6, size=SIZE)
    # make_prediction lowers the probability along the list: slice 4 (0.95), 1 (0.85), 0 (0.75), ...
    prediction = make_prediction(6, {"subdural": [4, 1, 0, 5]}, size=SIZE)
    scs = build_secondary_captures(volume, prediction, max_images=2)
    shown = [sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID for sc in scs]
    # chosen by probability, ordered along the body
    assert shown == [volume.slices[i].sop_instance_uid for i in (1, 4)]
    assert build_secondary_captures(volume, prediction, max_images=0) == []


def test_uids_are_deterministic(positive):
    volume, prediction = positive
    a = build_secondary_captures(volume, prediction)
    b = build_secondary_captures(volume, prediction)
    def uids(scs):
        return [(s.SOPInstanceUID, s.SeriesInstanceUID) for s in scs]

    assert uids(a) == uids(b)
    c = build_secondary_captures(volume, prediction, revision=1)
    assert not {s.SOPInstanceUID for s in a} & {s.SOPInstanceUID for s in c}


@needs("dciodvfy")
@pytest.mark.parametrize("sparse", [False, True])
def test_captures_validate(tmp_path, sparse):
    volume = make_volume(tmp_path, n=4, size=SIZE, bleed_slices=(1,), sparse=sparse)
    prediction = make_prediction(4, {"subdural": [1], "subarachnoid": [1]}, size=SIZE)
    (sc,) = build_secondary_captures(volume, prediction)
    path = write(sc, tmp_path / "sc.dcm")
    errors, warnings = dciodvfy(path)
    print("\n".join(warnings))
    assert not errors, "\n".join(errors)
    if sparse:
        again = reread(sc, tmp_path / "again.dcm")
        for keyword in SPARSE_DROPPED:
            assert keyword in again and again[keyword].value in (None, "", b""), keyword


def test_slab_capture_references_all_slices_of_the_slab(tmp_path):
    volume = make_volume(tmp_path, n=6, size=SIZE, spacing_mm=2.5, bleed_slices=(3,))
    groups = [[0, 1], [2, 3, 4], [5]]
    prediction = make_prediction(3, {"intraventricular": [1]}, size=SIZE)
    (sc,) = build_secondary_captures(volume, prediction, slice_groups=groups)
    sources = [i.ReferencedSOPInstanceUID for i in sc.SourceImageSequence]
    assert sources == [volume.slices[i].sop_instance_uid for i in (2, 3, 4)]
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == volume.slices[3].sop_instance_uid


def test_heatmap_of_another_size_is_resampled(tmp_path):
    volume = make_volume(tmp_path, n=3, size=SIZE)
    prediction = make_prediction(3, {"intraparenchymal": [1]}, size=SIZE // 2)  # model saw 64 x 64
    (sc,) = build_secondary_captures(volume, prediction)
    assert sc.pixel_array.shape == (SIZE, SIZE, 3)
    assert is_red(sc.pixel_array[peak((SIZE, SIZE))])


def test_render_draws_every_class_and_the_warning():
    hu = np.full((256, 256), 35.0, np.float32)
    yy, xx = np.mgrid[0:256, 0:256]
    left = np.exp(-((yy - 128) ** 2 + (xx - 70) ** 2) / 200.0)
    right = np.exp(-((yy - 128) ** 2 + (xx - 190) ** 2) / 200.0)
    legend = [("any", 0.9), ("subdural", 0.8), ("epidural", 0.7)]
    out = render(hu, {"subdural": left, "epidural": right}, legend, "title")
    grey = brain_window(hu)[0, 0]
    for (y, x), cls in (((128, 70), "subdural"), ((128, 190), "epidural")):
        pixel = out[y, x].astype(int)
        colour = np.asarray(CLASS_COLOURS[cls])
        assert np.abs(pixel - colour).sum() < np.abs(np.full(3, grey) - colour).sum() / 2, (cls, pixel)
    assert np.array_equal(out[128, 128], np.full(3, grey))  # no heat, untouched
    bottom = out[-8:, :, :].reshape(-1, 3)
    assert (bottom[:, 0] > bottom[:, 1] + 50).mean() > 0.5  # the red warning band
    assert (bottom.min(axis=1) > 200).any()  # with white text in it


def test_patient_orientation_letters(positive):
    volume, _ = positive
    assert patient_orientation(volume.headers[0]) == ("L", "P")
