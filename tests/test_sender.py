"""The outbox sender against real SCPs on loopback (pynetdicom MiniPACS, dcmtk storescp) and a real
SQLite outbox: delivery, retry while the PACS is down, rejection without a loop, give-up, echo."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from ihd_node.classes import CLASSES
from ihd_node.commands.echo import echo_command
from ihd_node.config import Config, default_config
from ihd_node.delivery.sender import Outbox
from ihd_node.intake.spool import write_dataset_atomic
from ihd_node.sim.mini_pacs import MiniPACS, free_port
from ihd_node.store import Database, Delivery, DeliveryAttempt, ResultObject, open_database

STUDY = "1.2.826.0.1.3680043.8.498.77"


def result_file(folder: Path, sop_class: str) -> ResultObject:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, generate_uid()
    if sop_class == SecondaryCaptureImageStorage:
        ds.Modality = "OT"
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    else:
        ds.Modality = "SR"
    path = folder / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
    write_dataset_atomic(path, ds)
    return ResultObject(ds.SOPInstanceUID, sop_class, path)


def queue_results(db: Database, folder: Path, destinations: list[str]) -> str:
    """A series analysed and its SR + one SC put into the outbox, as the worker does."""
    series_uid = generate_uid()
    db.record_instance(study_instance_uid=STUDY, series_instance_uid=series_uid,
                       sop_instance_uid=generate_uid(), sop_class_uid=CTImageStorage,
                       path=str(folder / "slice.dcm"), size=1, sha256="0" * 64)
    db.set_series_state(series_uid, "analyzing")
    objects = [result_file(folder, Comprehensive3DSRStorage),
               result_file(folder, SecondaryCaptureImageStorage)]
    db.finish_analysis(series_uid, model_name="tiny", model_version="0",
                       probabilities=dict.fromkeys(CLASSES, 0.1), positive_classes=[],
                       thresholds=dict.fromkeys(CLASSES, 0.5), n_slices=1, objects=objects,
                       destinations=destinations)
    return series_uid


def make_config(tmp: Path, port: int, **delivery: float) -> Config:
    return default_config(tmp, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                              "port": port, "timeout": 5}],
                          delivery={"retry_initial_seconds": 0.3, "retry_max_seconds": 1.0, **delivery})


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'ihd.sqlite'}")
    yield database
    database.close()


def deliveries(db: Database) -> list[Delivery]:
    with db.read_session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def attempts(db: Database) -> list[DeliveryAttempt]:
    with db.read_session() as s:
        return list(s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)))


def test_delivers_sr_and_sc_to_a_pynetdicom_scp(tmp_path: Path, db: Database) -> None:
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        config = make_config(tmp_path, pacs.port)
        series_uid = queue_results(db, tmp_path, ["pacs"])
        assert Outbox(db, config).run_once() == 2
        got = pacs.objects(STUDY)
        assert sorted(o.sop_class_uid for o in got) == sorted([Comprehensive3DSRStorage,
                                                               SecondaryCaptureImageStorage])
    assert [d.status for d in deliveries(db)] == ["sent", "sent"]
    assert db.get_series(series_uid).state == "delivered"
    assert Outbox(db, config).run_once() == 0  # nothing left to do


def test_objects_go_out_in_their_own_transfer_syntax(tmp_path: Path, db: Database) -> None:
    """Each transfer syntax is its own presentation context, so a destination that takes the file's syntax
    gets the object as written (no re-encoding by pynetdicom; seconds for a 300-slice study's SR). Before,
    one context offered all syntaxes and pynetdicom's acceptor chose Implicit VR for these Explicit VR files."""
    import pydicom

    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        config = make_config(tmp_path, pacs.port)
        queue_results(db, tmp_path, ["pacs"])
        assert Outbox(db, config).run_once() == 2
        got = pacs.objects(STUDY)
    assert len(got) == 2
    for obj in got:
        assert pydicom.dcmread(obj.path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def deliver_to_storescp(tmp_path: Path, db: Database, *options: str, env: dict | None = None) -> list[Path]:
    """Queue two results for a dcmtk storescp started with `options` and deliver them; the files it wrote."""
    port = free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    scp = subprocess.Popen(["storescp", *options, "-aet", "PACS", "-od", str(out), str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = make_config(tmp_path, port)
        series_uid = queue_results(db, tmp_path, ["pacs"])
        outbox = Outbox(db, config)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and db.get_series(series_uid).state != "delivered":
            outbox.run_once()  # storescp may need a moment to listen: the outbox just retries
            time.sleep(0.1)
        assert db.get_series(series_uid).state == "delivered"
        return list(out.iterdir())
    finally:
        scp.terminate()
        scp.wait(10)


@pytest.mark.skipif(shutil.which("storescp") is None, reason="dcmtk not installed")
def test_a_destination_that_takes_only_implicit_vr_still_gets_them(tmp_path: Path, db: Database) -> None:
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    stored = deliver_to_storescp(tmp_path, db, "+xi")
    assert len(stored) == 2
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in stored} == {ImplicitVRLittleEndian}


def test_retries_while_the_pacs_is_down_then_delivers(tmp_path: Path, db: Database) -> None:
    port = free_port()
    config = make_config(tmp_path, port)
    series_uid = queue_results(db, tmp_path, ["pacs"])
    outbox = Outbox(db, config)
    assert outbox.run_once() == 2
    rows = deliveries(db)
    assert [d.status for d in rows] == ["pending", "pending"] and all(d.attempts == 1 for d in rows)
    assert "cannot connect" in rows[0].last_error
    assert outbox.run_once() == 0  # backoff: not due yet
    with MiniPACS(tmp_path / "pacs", ae_title="PACS", port=port) as pacs:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(pacs.objects()) < 2:
            outbox.run_once()
            time.sleep(0.05)
        assert len(pacs.objects(STUDY)) == 2
    assert [d.status for d in deliveries(db)] == ["sent", "sent"]
    assert db.get_series(series_uid).state == "delivered"
    assert [a.outcome for a in attempts(db)].count("retry") == 2


def test_a_refusing_pacs_causes_no_loop(tmp_path: Path, db: Database) -> None:
    with MiniPACS(tmp_path / "pacs", ae_title="PACS", status=0xA900) as pacs:
        config = make_config(tmp_path, pacs.port)
        series_uid = queue_results(db, tmp_path, ["pacs"])
        outbox = Outbox(db, config)
        assert outbox.run_once() == 2
        time.sleep(0.4)
        assert outbox.run_once() == 0  # rejected rows are never retried
    rows = deliveries(db)
    assert [(d.status, d.last_status, d.attempts) for d in rows] == [("rejected", 0xA900, 1)] * 2
    series = db.get_series(series_uid)
    assert series.state == "failed" and "pacs" in series.reason


def test_warning_statuses_count_as_delivered(tmp_path: Path, db: Database) -> None:
    with MiniPACS(tmp_path / "pacs", ae_title="PACS", status=0xB007) as pacs:
        config = make_config(tmp_path, pacs.port)
        series_uid = queue_results(db, tmp_path, ["pacs"])
        assert Outbox(db, config).run_once() == 2
    assert [(d.status, d.last_status) for d in deliveries(db)] == [("sent", 0xB007)] * 2
    assert db.get_series(series_uid).state == "delivered"


def test_gives_up_after_the_configured_time(tmp_path: Path, db: Database) -> None:
    config = make_config(tmp_path, free_port(), retry_initial_seconds=0.1, retry_max_seconds=0.1,
                         give_up_after_seconds=0.3)
    series_uid = queue_results(db, tmp_path, ["pacs"])
    outbox = Outbox(db, config)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(d.status == "pending" for d in deliveries(db)):
        outbox.run_once()
        time.sleep(0.05)
    rows = deliveries(db)
    assert [d.status for d in rows] == ["failed", "failed"] and "gave up" in rows[0].last_error
    assert db.get_series(series_uid).state == "failed"


@pytest.mark.skipif(shutil.which("storescp") is None, reason="dcmtk not installed")
def test_dcmtk_storescp_receives_the_results(tmp_path: Path, db: Database) -> None:
    assert len(deliver_to_storescp(tmp_path, db, env={**os.environ, "TCP_NODELAY": "1"})) == 2


def test_echo_command_reports_each_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    down = free_port()
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"storage: {{dir: {tmp_path / 'state'}}}\n"
            "destinations:\n"
            f"  - {{name: up, ae_title: PACS, host: 127.0.0.1, port: {pacs.port}}}\n"
            f"  - {{name: down, ae_title: PACS, host: 127.0.0.1, port: {down}, timeout: 2}}\n")
        code = echo_command(argparse.Namespace(config=str(config)))
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[0].startswith("OK up PACS@127.0.0.1:")
    assert out[1].startswith("FAILED down PACS@127.0.0.1:") and "connect" in out[1]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_to_a_destination(tmp_path: Path, db: Database) -> None:
    import ssl

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from tests.test_receiver import make_certs

    certs = make_certs(tmp_path / "tls")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(certs["server.crt"]), str(certs["server.key"]))
    got: list[str] = []
    scp = AE(ae_title="PACS")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    handlers = [(evt.EVT_C_STORE, lambda event: got.append(event.dataset.SOPInstanceUID) or 0x0000)]
    srv = scp.start_server(("127.0.0.1", port), block=False, ssl_context=server, evt_handlers=handlers)
    try:
        config = default_config(tmp_path, destinations=[{
            "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
            "tls": {"enabled": True, "ca_certificates": str(certs["ca.crt"]),
                    "certificate": str(certs["client.crt"]), "private_key": str(certs["client.key"])}}])
        series_uid = queue_results(db, tmp_path, ["pacs"])
        assert Outbox(db, config).run_once() == 2
        assert len(got) == 2 and db.get_series(series_uid).state == "delivered"
    finally:
        srv.shutdown()
