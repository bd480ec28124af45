"""SR class per destination and fallback in association negotiation, against dcmtk storescp configured
to accept only some SR classes (an association negotiation profile, as a PACS that refuses .88.34)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import CTImageStorage
from test_report_common import dciodvfy, make_prediction, make_volume

from ihd_node.classes import CLASSES
from ihd_node.config import default_config
from ihd_node.delivery.sender import Outbox
from ihd_node.intake.spool import write_dataset_atomic
from ihd_node.report import build_results
from ihd_node.sim.mini_pacs import free_port
from ihd_node.sr_classes import SR_CLASSES, as_sr_class
from ihd_node.store import Database, ResultObject, open_database

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None or shutil.which("dciodvfy") is None,
                                reason="dcmtk storescp and dicom3tools dciodvfy are needed")

PROFILES = {
    "NoComprehensive3D": ["ComprehensiveSRStorage", "EnhancedSRStorage"],
    "EnhancedOnly": ["EnhancedSRStorage"],
    "NoSR": [],
    "Everything": ["Comprehensive3DSRStorage", "ComprehensiveSRStorage", "EnhancedSRStorage",
                   "SegmentationStorage", "KeyObjectSelectionDocumentStorage"],
}
# The Segmentation and the key images: a destination without them still gets the result (SR + captures).
OPTIONAL = {"1.2.840.10008.5.1.4.1.1.66.4": "Segmentation", "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection"}


def storescp_config(path: Path) -> Path:
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]", "TransferSyntax1 = LocalEndianExplicit",
             "TransferSyntax2 = LittleEndianImplicit", "[[PresentationContexts]]"]
    for name, classes in PROFILES.items():
        lines.append(f"[{name}]")
        for n, sop in enumerate(["VerificationSOPClass", "SecondaryCaptureImageStorage", *classes], start=1):
            lines.append(f"PresentationContext{n} = {sop}\\Uncompressed")
    lines.append("[[Profiles]]")
    for name in PROFILES:
        lines += [f"[{name}]", f"PresentationContexts = {name}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    volume = make_volume(folder, n=5, size=96, bleed_slices=(2,))
    res = build_results(volume, make_prediction(5, {"subdural": [2]}, size=96), max_secondary_captures=1)
    files = []
    for ds in res.all():
        path = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        write_dataset_atomic(path, ds)
        files.append(ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), path))
    return volume, files


def deliver(tmp_path: Path, files: list[ResultObject], volume, profile: str, sr_class: str = "comprehensive3d"):
    """Queue the results, run storescp with the profile, deliver; (db, received data sets)."""
    db: Database = open_database(f"sqlite:///{tmp_path / 'ihd.sqlite'}")
    uid = volume.series_instance_uid
    db.record_instance(study_instance_uid=volume.study_instance_uid, series_instance_uid=uid,
                       sop_instance_uid=volume.slices[0].sop_instance_uid, sop_class_uid=CTImageStorage,
                       path=str(volume.slices[0].path), size=1, sha256="0" * 64)
    db.set_series_state(uid, "analyzing")
    db.finish_analysis(uid, model_name="t", model_version="0", probabilities=dict.fromkeys(CLASSES, 0.9),
                       positive_classes=["any", "subdural"], thresholds=dict.fromkeys(CLASSES, 0.5), n_slices=5,
                       objects=files, destinations=["pacs"])
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    config = default_config(tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                                     "port": port, "timeout": 5, "sr_class": sr_class}],
                            delivery={"retry_initial_seconds": 0.2, "retry_max_seconds": 0.5})
    scp = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out), "-xf",
                            str(storescp_config(tmp_path / "storescp.cfg")), profile, str(port)],
                           env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        outbox = Outbox(db, config)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and db.get_series(uid).state not in ("delivered", "failed"):
            outbox.run_once()  # storescp may need a moment to listen: the outbox just retries
            time.sleep(0.1)
    finally:
        scp.terminate()
        scp.wait(10)
    return db, [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def events(db: Database) -> list[str]:
    from sqlalchemy import text

    with db.read_session() as s:
        return [m for (m,) in s.execute(text("SELECT message FROM events WHERE kind = 'delivery'"))]


@pytest.mark.parametrize(("profile", "sr_class", "expected"), [
    ("NoComprehensive3D", "comprehensive3d", "comprehensive"),
    ("EnhancedOnly", "comprehensive3d", "enhanced"),
    ("Everything", "comprehensive3d", "comprehensive3d"),
    ("Everything", "enhanced", "enhanced"),  # configured per destination
])
def test_sr_goes_out_in_the_best_class_the_pacs_accepts(tmp_path, results, profile, sr_class, expected):
    volume, files = results
    db, received = deliver(tmp_path, files, volume, profile, sr_class)
    series = db.get_series(volume.series_instance_uid)
    assert series.state == "delivered"
    (sr,) = [ds for ds in received if ds.Modality == "SR"]
    assert sr.SOPClassUID == SR_CLASSES[expected]
    optional = [f for f in files if f.sop_class_uid in OPTIONAL]
    assert len(optional) == 2  # a positive result: Segmentation and key images
    if profile == "Everything":
        assert len(received) == len(files) and series.reason is None
    else:  # not taken, booked rejected with why, and the series says so
        assert len(received) == len(files) - len(optional)
        assert series.reason.startswith("not accepted (SOP class not supported), the SR and captures went out")
        assert all(f"pacs: {name}" in series.reason for name in OPTIONAL.values())
    errors, _ = dciodvfy(next(p for p in (tmp_path / "received").iterdir()
                              if pydicom.dcmread(p).Modality == "SR"))
    assert not errors, errors
    # The same report: the region labels and the summary survive the change of class.
    original = pydicom.dcmread(next(f.path for f in files if f.sop_class_uid == SR_CLASSES["comprehensive3d"]))
    assert sr.ContentSequence == original.ContentSequence
    logged = [m for m in events(db) if "sent as" in m]
    if expected == "comprehensive3d":
        assert not logged and sr.SOPInstanceUID == original.SOPInstanceUID
    else:
        assert sr.SOPInstanceUID == as_sr_class(original, expected).SOPInstanceUID != original.SOPInstanceUID
        (message,) = logged
        names = {"comprehensive": "Comprehensive SR", "enhanced": "Enhanced SR"}
        assert f"sent as {names[expected]}" in message and sr.SOPInstanceUID in message
    db.close()


def test_a_pacs_without_sr_rejects_it_and_says_which_classes_were_offered(tmp_path, results):
    volume, files = results
    db, received = deliver(tmp_path, files, volume, "NoSR")
    assert [ds.Modality for ds in received] == ["OT", "OT"]
    with db.read_session() as s:
        from sqlalchemy import text

        rows = s.execute(text("SELECT status, last_error FROM deliveries WHERE sop_class_uid LIKE '%.88.%' "
                              "AND sop_class_uid != '1.2.840.10008.5.1.4.1.1.88.59'")).all()  # the SR, not the KOS
    ((status, error),) = rows
    assert status == "rejected"
    assert "Comprehensive 3D SR, Comprehensive SR, Enhanced SR" in error
    db.close()


@pytest.mark.parametrize("sr_class", list(SR_CLASSES))
def test_each_class_validates(tmp_path, results, sr_class):
    _, files = results
    original = pydicom.dcmread(next(f.path for f in files if f.sop_class_uid == SR_CLASSES["comprehensive3d"]))
    path = tmp_path / "sr.dcm"
    as_sr_class(original, sr_class).save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert not errors, errors
