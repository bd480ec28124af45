"""Secondary captures: a summary for every series, one per positive slice, heat where it is hot, text
only in the bands around the slice."""

from __future__ import annotations

from datetime import UTC, datetime

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

from ihd_node.report.overlay import CLASS_COLOURS, LegendLine, Orientation, brain_window, render
from ihd_node.report.sc import (
    SC_SERIES_DESCRIPTION,
    build_secondary_captures,
    edge_letters,
    patient_orientation,
    slice_picture,
    source_line,
)

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SIZE = 128


def peak(shape: tuple[int, int]) -> tuple[int, int]:
    """Where make_prediction puts the centre of its heat blob."""
    return int(0.45 * shape[0]), int(0.35 * shape[1])


WHEN = datetime(2024, 1, 2, 10, 30, tzinfo=UTC)


def is_heat(pixel: np.ndarray, cls: str = "intraparenchymal") -> bool:
    """Closer to the class colour than to any grey: heat drawn there."""
    pixel = pixel.astype(int)
    return bool(np.abs(pixel - np.asarray(CLASS_COLOURS[cls])).sum() < np.abs(pixel - pixel.mean()).sum())


@pytest.fixture
def positive(tmp_path):
    volume = make_volume(tmp_path, n=6, size=SIZE, bleed_slices=(2, 3))
    prediction = make_prediction(6, {"intraparenchymal": [2, 3]}, size=SIZE)
    return volume, prediction


def test_summary_then_one_capture_per_positive_slice(positive, tmp_path):
    volume, prediction = positive
    scs = build_secondary_captures(volume, prediction, analysed_at=WHEN)
    assert len(scs) == 3
    summary = reread(scs[0], tmp_path / "summary.dcm")
    assert summary.InstanceNumber == 1
    assert "Intracranial hemorrhage suspected: intraparenchymal (95 %)" in summary.ImageComments
    for n, (sc, index) in enumerate(zip(scs[1:], (2, 3), strict=True)):
        sc = reread(sc, tmp_path / f"sc{n}.dcm")
        assert sc.SOPClassUID == SC_IMAGE_STORAGE
        assert sc.StudyInstanceUID == volume.study_instance_uid
        assert sc.SeriesInstanceUID not in (volume.series_instance_uid,)
        assert sc.SeriesDescription == SC_SERIES_DESCRIPTION
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.ConversionType == "WSD"  # drawn by software, not digitised video (DI)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.SamplesPerPixel == 3 and sc.PhotometricInterpretation == "RGB"
        assert sc.InstanceNumber == n + 2
        picture, _, _ = slice_picture(volume, prediction, index, [index], WHEN)
        pixels = sc.pixel_array
        np.testing.assert_array_equal(pixels, picture.pixels)
        # The slice at full size, unscaled, inside the frame: untouched grey away from the heat.
        r, c = peak((SIZE, SIZE))
        assert is_heat(pixels[picture.top + r, picture.left + c])
        inner = brain_window(volume.hu[index])
        assert (pixels[picture.top + 5, picture.left:picture.left + SIZE, 0] == inner[5]).all()
        source = volume.slices[index].sop_instance_uid
        assert [i.ReferencedSOPInstanceUID for i in sc.ReferencedImageSequence] == [source]
        # The source's own numbers (instance numbers run backwards in this series) and table position.
        header = volume.headers[index]
        assert f"Series 3, image {header.InstanceNumber}, z = " in sc.ImageComments
        assert f"intraparenchymal {({2: 95, 3: 85})[index]} % (threshold 50 %)" in sc.ImageComments
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1


def test_negative_series_gets_a_summary_capture(tmp_path):
    volume = make_volume(tmp_path, n=4, size=SIZE)
    (summary,) = build_secondary_captures(volume, make_prediction(4, size=SIZE), analysed_at=WHEN)
    assert "No intracranial hemorrhage detected" in summary.ImageComments
    assert "NOT FOR DIAGNOSTIC USE" in summary.ImageComments and summary.InstanceNumber == 1
    pixels = summary.pixel_array
    assert not any(is_heat(p, cls) for p in pixels.reshape(-1, 3)[::7] for cls in ("intraparenchymal",))
    # the summary exists with captures switched off too
    assert len(build_secondary_captures(volume, make_prediction(4, size=SIZE), max_images=0)) == 1


def test_source_line_and_edge_letters(positive):
    volume, _ = positive
    header = volume.headers[0]
    z = float(header.ImagePositionPatient[2])
    assert source_line(header) == f"Series 3, image {header.InstanceNumber}, z = {z:.1f} mm"
    assert edge_letters(header) == Orientation(left="R", right="L", top="A", bottom="P")


def test_cap_keeps_the_most_probable_slices(tmp_path):
    volume = make_volume(tmp_path, n=6, size=SIZE)
    # make_prediction lowers the probability along the list: slice 4 (0.95), 1 (0.85), 0 (0.75), ...
    prediction = make_prediction(6, {"subdural": [4, 1, 0, 5]}, size=SIZE)
    scs = build_secondary_captures(volume, prediction, max_images=2)[1:]
    shown = [sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID for sc in scs]
    # chosen by probability, ordered along the body
    assert shown == [volume.slices[i].sop_instance_uid for i in (1, 4)]
    assert len(build_secondary_captures(volume, prediction, max_images=0)) == 1  # the summary only


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
    for n, sc in enumerate(build_secondary_captures(volume, prediction)):
        path = write(sc, tmp_path / f"sc{n}.dcm")
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
    (_, sc) = build_secondary_captures(volume, prediction, slice_groups=groups)
    sources = [i.ReferencedSOPInstanceUID for i in sc.SourceImageSequence]
    assert sources == [volume.slices[i].sop_instance_uid for i in (2, 3, 4)]
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == volume.slices[3].sop_instance_uid


def test_heatmap_of_another_size_is_resampled(tmp_path):
    volume = make_volume(tmp_path, n=3, size=SIZE)
    prediction = make_prediction(3, {"intraparenchymal": [1]}, size=SIZE // 2)  # model saw 64 x 64
    (_, sc) = build_secondary_captures(volume, prediction, analysed_at=WHEN)
    picture, _, _ = slice_picture(volume, prediction, 1, [1], WHEN)
    assert sc.pixel_array.shape == picture.pixels.shape
    r, c = peak((SIZE, SIZE))
    assert is_heat(sc.pixel_array[picture.top + r, picture.left + c])


def test_render_draws_every_class_inside_and_all_text_outside_the_slice():
    hu = np.full((256, 256), 35.0, np.float32)
    yy, xx = np.mgrid[0:256, 0:256]
    left = np.exp(-((yy - 128) ** 2 + (xx - 70) ** 2) / 200.0)
    right = np.exp(-((yy - 128) ** 2 + (xx - 190) ** 2) / 200.0)
    legend = [LegendLine("any", 0.9, 0.4), LegendLine("subdural", 0.8, 0.5), LegendLine("epidural", 0.7, 0.5)]
    picture = render(hu, {"subdural": left, "epidural": right}, legend, ["Series 3, image 7, z = 12.5 mm"],
                     Orientation("R", "L", "A", "P"), footer=["model 1.0"])
    out, top, left_edge = picture.pixels, picture.top, picture.left
    grey = brain_window(hu)[0, 0]
    for (y, x), cls in (((128, 70), "subdural"), ((128, 190), "epidural")):
        pixel = out[top + y, left_edge + x].astype(int)
        colour = np.asarray(CLASS_COLOURS[cls])
        assert np.abs(pixel - colour).sum() < np.abs(np.full(3, grey) - colour).sum() / 2, (cls, pixel)
    inside = out[top:top + 256, left_edge:left_edge + 256]
    untouched = (np.hypot(yy - 128, xx - 70) > 40) & (np.hypot(yy - 128, xx - 190) > 40)
    assert (inside[untouched] == grey).all()  # no text, legend or band over the slice
    bottom = out[-8:, :, :].reshape(-1, 3)
    assert (bottom[:, 0] > bottom[:, 1] + 50).mean() > 0.5  # the red warning band
    assert out.shape[0] > 256 + 80 and out.shape[1] >= 256
    # text in the bands: the header above, legend below, letters at the sides
    assert (out[:top, :, :] > 200).any() and (out[top + 256:, :, :] > 200).any()
    assert (out[top:top + 256, :left_edge] > 200).any() and (out[top:top + 256, left_edge + 256:] > 200).any()


def test_patient_orientation_letters(positive):
    volume, _ = positive
    assert patient_orientation(volume.headers[0]) == ("L", "P")


def test_summary_and_captures_show_the_slices_the_model_explained(tmp_path):
    """Heatmaps exist for the model's top slices only; ties in probability must not pick one without."""
    volume = make_volume(tmp_path, n=6, size=SIZE)
    prediction = make_prediction(6, {"subdural": [4, 1, 0]}, size=SIZE)  # slice 4 most probable
    prediction.heatmaps = {k: v for k, v in prediction.heatmaps.items() if k[0] != 4}  # not explained
    summary, *slices = build_secondary_captures(volume, prediction, max_images=2, analysed_at=WHEN)
    assert summary.ReferencedImageSequence[0].ReferencedSOPInstanceUID == volume.slices[1].sop_instance_uid
    assert [sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID for sc in slices] == [
        volume.slices[i].sop_instance_uid for i in (0, 1)]


def _blend_whole_slice(grey, heatmaps):
    """blend_heatmaps as it was: every pixel of the slice blended (the reference for the boxed one)."""
    from ihd_node.report.overlay import CLASS_COLOURS, HEAT_FLOOR, MAX_ALPHA, _edge, fit_heatmap

    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    for cls, heat in heatmaps.items():
        heat = fit_heatmap(heat, grey.shape)
        colour = np.asarray(CLASS_COLOURS.get(cls, (255, 255, 255)), np.float32)
        mask = heat > HEAT_FLOOR
        alpha = np.where(mask, 0.25 + (MAX_ALPHA - 0.25) * (heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0)
        rgb = rgb * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        rgb[_edge(mask)] = colour
    return rgb


def test_heat_blended_in_its_box_equals_the_whole_slice():
    """Blending only inside the heat's bounding box gives the same picture, bit for bit: heat in the middle,
    a flat block, touching the image's edges and corner, a lower-resolution map, overlapping classes, and no heat."""
    from ihd_node.report.overlay import blend_heatmaps

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (96, 80)).astype(np.uint8)
    yy, xx = np.mgrid[0:96, 0:80].astype(np.float32)
    middle = np.exp(-((yy - 40) ** 2 + (xx - 30) ** 2) / 120.0)
    corner = np.exp(-(yy ** 2 + (xx - 79) ** 2) / 300.0)
    edge = np.clip(1.0 - yy / 20.0, 0, 1) * rng.random((96, 80)).astype(np.float32)
    small = rng.random((12, 10)).astype(np.float32)
    block = np.zeros((96, 80), np.float32)
    block[30:50, 20:60] = 0.9  # flat rows along the box's sides: their outline needs the margin
    cases = [{"subdural": middle}, {"intraparenchymal": block}, {"epidural": corner, "any": edge},
             {"subarachnoid": small}, {"any": np.zeros((96, 80), np.float32)}, {},
             {"subdural": middle, "intraventricular": corner}]
    for heatmaps in cases:
        assert np.array_equal(blend_heatmaps(grey, heatmaps), _blend_whole_slice(grey, heatmaps))
