"""Preprocessing against hand-computed values: windows, normalisation, resize, HU conversion, slice order."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ihd_node.classes import CHANNEL_MEAN, CHANNEL_STD
from ihd_node.imaging.headers import CT_IMAGE_STORAGE
from ihd_node.imaging.volume import load_volume, to_hu
from ihd_node.model.preprocess import prepare_slices, window_channels

HU = np.array([-1000.0, 0.0, 40.0, 80.0, 100.0, 180.0, 230.0, 3000.0], dtype=np.float32)
# brain 40/80 -> [0, 80]; subdural 80/200 -> [-20, 180]; soft tissue 40/380 -> [-150, 230]
BRAIN = [0, 0, 0.5, 1, 1, 1, 1, 1]
SUBDURAL = [0, 0.1, 0.3, 0.5, 0.6, 1, 1, 1]
SOFT = [0, 150 / 380, 190 / 380, 230 / 380, 250 / 380, 330 / 380, 1, 1]


def test_window_channels_clip_and_scale() -> None:
    out = window_channels(HU.reshape(1, 1, 8))
    assert out.shape == (1, 3, 1, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], BRAIN, atol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0], SUBDURAL, atol=1e-6)
    np.testing.assert_allclose(out[0, 2, 0], SOFT, atol=1e-6)


def test_prepare_without_resize_is_window_then_normalise() -> None:
    x = prepare_slices(HU.reshape(1, 1, 8).repeat(8, axis=1), input_size=8)
    assert isinstance(x, torch.Tensor) and x.shape == (1, 3, 8, 8) and x.dtype == torch.float32
    for c, expected in enumerate((BRAIN, SUBDURAL, SOFT)):
        want = (np.asarray(expected) - CHANNEL_MEAN[c]) / CHANNEL_STD[c]
        np.testing.assert_allclose(x[0, c, 3].numpy(), want, atol=1e-5)


def test_linear_resize_halving_averages_2x2_blocks_of_the_windowed_image() -> None:
    # Bilinear with half-pixel centres at exactly half size samples between 4 pixels: their mean.
    hu = np.array([[0, 80, 40, 40],
                   [40, 40, 1000, -1000],
                   [10, 10, 20, 20],
                   [10, 10, 20, 20]], dtype=np.float32)[None]
    x = prepare_slices(hu, input_size=2)
    assert x.shape == (1, 3, 2, 2)
    # brain window of each pixel / 80, then block means: (0+1+.5+.5)/4, (.5+.5+1+0)/4, .125, .25
    brain = np.array([[0.5, 0.5], [0.125, 0.25]])
    np.testing.assert_allclose(x[0, 0].numpy(), (brain - CHANNEL_MEAN[0]) / CHANNEL_STD[0], atol=1e-5)


def test_prepare_matches_numpy_reference_on_a_realistic_slice() -> None:
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1100, 2000, size=(3, 64, 48)).astype(np.float32)
    x = prepare_slices(hu, input_size=32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(window_channels(hu)), size=(32, 32),
                                          mode="bilinear", align_corners=False)
    ref = (ref - torch.tensor(CHANNEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(CHANNEL_STD).view(1, 3, 1, 1)
    assert x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


def test_prepare_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError):
        prepare_slices(np.zeros((4, 4), dtype=np.float32), 4)


def _ct(pixels: np.ndarray, *, bits_stored: int = 16, signed: bool = True, slope: float = 1.0,
        intercept: float = -1024.0, position: tuple[float, float, float] = (0.0, 0.0, 0.0),
        orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), series_uid: str = "1.2.3.4",
        instance: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def test_to_hu_slope_and_intercept() -> None:
    ds = _ct(np.array([[0, 1024], [1064, 2024]]), slope=1.0, intercept=-1024.0)
    np.testing.assert_array_equal(to_hu(ds), [[-1024, 0], [40, 1000]])
    ds = _ct(np.array([[0, 10], [20, -5]]), slope=2.0, intercept=-10.0)
    np.testing.assert_array_equal(to_hu(ds), [[-10, 10], [30, -20]])


def test_to_hu_bits_stored_12_quirk() -> None:
    # Unsigned 12-bit with intercept > -100: stored values need +1000 (mod 4096) and intercept -1000.
    pixels = np.array([[0, 1024], [3096, 4000]])
    ds = _ct(pixels, bits_stored=12, signed=False, intercept=0.0)
    # (0+1000)%4096-1000 = 0; 2024-1000 = 1024; (4096%4096)-1000 = -1000; (5000%4096)-1000 = -96
    np.testing.assert_array_equal(to_hu(ds), [[0, 1024], [-1000, -96]])
    # Same storage but a proper intercept: no correction.
    ds = _ct(pixels, bits_stored=12, signed=False, intercept=-1024.0)
    np.testing.assert_array_equal(to_hu(ds), pixels - 1024)


def test_slices_sorted_along_tilted_normal_not_by_name_or_instance(tmp_path) -> None:
    # Gantry tilt of 20 degrees: columns run along (0, cos, sin), the normal is (0, -sin, cos).
    t = np.deg2rad(20.0)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))
    normal = np.array([0.0, -np.sin(t), np.cos(t)])
    offsets = [3, 0, 4, 1, 2]  # slice k lies at 5 mm * k along the normal; files written shuffled
    paths = []
    for n, k in enumerate(offsets):
        position = tuple(float(v) for v in np.array([-100.0, -80.0, 10.0]) + 5.0 * k * normal)
        # Pixels encode the true order; InstanceNumber and file names deliberately disagree with it.
        ds = _ct(np.full((16, 16), 1024 + 10 * k), position=position, orientation=orientation,
                 instance=10 - n)
        path = tmp_path / f"{n:02d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    vol = load_volume(paths)
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [0, 10, 20, 30, 40])
    assert vol.slice_spacing == pytest.approx(5.0)
    assert [s.path.name for s in vol.slices] == ["01.dcm", "03.dcm", "04.dcm", "00.dcm", "02.dcm"]
