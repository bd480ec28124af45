"""The results repeat the source's patient and study identity, and write their times in its timezone."""

from __future__ import annotations

import datetime as dt

import pydicom
from pydicom.dataset import Dataset
from test_report_common import make_prediction, reread, write_ct_series

from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results
from ihd_node.report.source import copy_identity

IDENTITY = {
    "IssuerOfPatientID": "HOSPITAL-A",
    "StudyDescription": "CT HEAD WITHOUT CONTRAST",
    "PatientAge": "042Y",
    "PatientSex": "F",
    "PatientWeight": "61.5",
    "TimezoneOffsetFromUTC": "-0330",
}


def identified_volume(tmp_path):
    paths = write_ct_series(tmp_path / "src", n=3, size=64)
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
        ds.IssuerOfAccessionNumberSequence = [issuer]
        ds.save_as(path)
    return load_volume(paths)


def test_sr_and_captures_carry_the_identity(tmp_path):
    volume = identified_volume(tmp_path)
    before = dt.datetime.now(dt.UTC)
    results = build_results(volume, make_prediction(3, {"subdural": [1]}, size=64))
    after = dt.datetime.now(dt.UTC)
    zone = dt.timezone(-dt.timedelta(hours=3, minutes=30))
    for n, ds in enumerate(results.all()):
        ds = reread(ds, tmp_path / f"{n}.dcm")
        for keyword, value in IDENTITY.items():
            assert str(ds[keyword].value) == value, (ds.Modality, keyword)
        assert ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS-A"
        # ContentDate/Time are in the source's zone (-03:30), whatever the machine's zone is.
        stamp = dt.datetime.strptime(ds.ContentDate + ds.ContentTime.split(".")[0], "%Y%m%d%H%M%S")
        stamp = stamp.replace(tzinfo=zone)
        assert before - dt.timedelta(seconds=2) <= stamp <= after + dt.timedelta(seconds=1), ds.Modality


def test_no_timezone_leaves_local_time_and_copies_nothing_absent():
    result, source = Dataset(), Dataset()
    result.ContentDate, result.ContentTime = "20240101", "120000"
    source.StudyDescription = ""
    copy_identity(result, source, now=dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=dt.UTC))
    assert result.ContentDate == "20240101" and "StudyDescription" not in result
    source.TimezoneOffsetFromUTC = "+0900"
    copy_identity(result, source, now=dt.datetime(2030, 5, 6, 20, 8, 9, tzinfo=dt.UTC))
    assert (result.ContentDate, result.ContentTime) == ("20300507", "050809.000000")
    assert result.TimezoneOffsetFromUTC == "+0900"
