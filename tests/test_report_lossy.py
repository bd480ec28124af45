"""Images derived from a lossy source say so (PS3.3 C.7.6.1.1.5), and so does the SR.

The source is compressed for real by dcmtk's dcmcjpeg (JPEG Extended, 12 bit, lossy), once as dcmcjpeg
writes it (LossyImageCompression 01 with its ratio and method) and once with those attributes removed,
when only the transfer syntax tells.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_report_common import dciodvfy, make_prediction, needs, reread, write_ct_series

from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results

LOSSY_KEYWORDS = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")


def jpeg_series(folder: Path, n: int = 3, keep_header: bool = True) -> list[Path]:
    """A 12-bit CT series compressed with dcmcjpeg +ee (JPEG Extended, lossy, 1.2.840.10008.1.2.4.51)."""
    paths = write_ct_series(folder / "raw", n=n, size=64)
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        ds.PixelData = ds.pixel_array.astype(np.int32).clip(0, 4095).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        target = folder / path.name
        subprocess.run(["dcmcjpeg", "+ee", str(path), str(target)], check=True, capture_output=True, timeout=60)
        if not keep_header:
            ds = pydicom.dcmread(target)
            for keyword in LOSSY_KEYWORDS:
                delattr(ds, keyword)
            ds.save_as(target)
        out.append(target)
    return out


@needs("dcmcjpeg")
@pytest.mark.parametrize("keep_header", [True, False], ids=["header-says-01", "transfer-syntax-only"])
def test_captures_and_sr_of_a_jpeg_source_say_lossy(tmp_path, keep_header):
    paths = jpeg_series(tmp_path / "src", keep_header=keep_header)
    source = pydicom.dcmread(paths[0])
    assert source.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    results = build_results(load_volume(paths), make_prediction(3, {"subdural": [1]}, size=64))
    sc = reread(results.secondary_captures[0], tmp_path / "sc.dcm")
    assert sc.LossyImageCompression == "01"
    assert str(sc.LossyImageCompressionMethod) == "ISO_10918_1"
    ratio = float(sc.LossyImageCompressionRatio)
    if keep_header:
        assert ratio == pytest.approx(float(source.LossyImageCompressionRatio))
    assert ratio > 1.0
    text = " ".join(str(i.TextValue) for i in results.sr.ContentSequence[-1].ContentSequence if "TextValue" in i)
    assert "lossy compressed (ISO_10918_1" in text


@needs("dciodvfy")
def test_lossless_source_stays_unmarked_and_validates(tmp_path):
    paths = write_ct_series(tmp_path / "src", n=3, size=64)
    results = build_results(load_volume(paths), make_prediction(3, {"subdural": [1]}, size=64))
    sc = reread(results.secondary_captures[0], tmp_path / "sc.dcm")
    assert sc.LossyImageCompression == "00" and "LossyImageCompressionMethod" not in sc
    assert "lossy" not in str(results.sr.ContentSequence[-1].ContentSequence[0].TextValue)
    assert not dciodvfy(tmp_path / "sc.dcm")[0]


@needs("dcmcjpeg")
@needs("dciodvfy")
def test_lossy_capture_validates(tmp_path):
    paths = jpeg_series(tmp_path / "src")
    results = build_results(load_volume(paths), make_prediction(3, {"subdural": [1]}, size=64))
    path = tmp_path / "sc.dcm"
    reread(results.secondary_captures[0], path)
    errors, _ = dciodvfy(path)
    assert not errors, "\n".join(errors)
