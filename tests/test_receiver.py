"""The SCP on loopback with a real SQLite database: storing, admission, bad UIDs, duplicates, syntaxes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from ihd_node.intake.receiver import Admission, Receiver
from ihd_node.intake.recorder import DatabaseRecorder
from ihd_node.intake.spool import Spool, file_preamble
from ihd_node.store import Database, Event, open_database

NODE_AET = "IHD_AI"


def ct_dataset(series_uid: str, index: int, *, study_uid: str = "1.2.826.0.1.3680043.8.498.1", size: int = 32,
               sop_uid: str | None = None, seed: int = 0, sop_class: str = CTImageStorage,
               modality: str = "CT") -> Dataset:
    """A small but complete CT Image Storage instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = modality
    ds.PatientName, ds.PatientID = "Test^Patient", "P1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 5.0 * index]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 5.0
    ds.InstanceNumber = index + 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    rng = np.random.default_rng(seed + index)
    ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
    return ds


@dataclass
class Setup:
    root: Path
    db: Database
    spool: Spool
    receiver: Receiver

    @property
    def port(self) -> int:
        return self.receiver.port

    def events(self, kind: str) -> list[Event]:
        with self.db.read_session() as s:
            return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def start_receiver(root: Path, **admission: object) -> Setup:
    db = open_database(f"sqlite:///{root / 'ihd.sqlite'}")
    spool = Spool(root / "spool")
    min_free = int(admission.pop("min_free_bytes", 0))
    adm = Admission(ae_title=NODE_AET, **admission)  # type: ignore[arg-type]
    receiver = Receiver(spool, DatabaseRecorder(db), adm, host="127.0.0.1", port=0, min_free_bytes=min_free)
    return Setup(root, db, spool, receiver.start())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Setup]:
    setup = start_receiver(tmp_path)
    yield setup
    setup.receiver.stop()
    setup.db.close()


def send(port: int, datasets: list[Dataset], *, calling: str = "PACS", called: str = NODE_AET,
         syntaxes: list[str] | None = None) -> list[int]:
    ae = AE(ae_title=calling)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, syntaxes or [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def spool_files(setup: Setup) -> list[Path]:
    return sorted(p for p in setup.spool.root.rglob("*") if p.is_file())


def test_echo_and_store_write_atomic_owner_only_files_and_rows(node: Setup) -> None:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()

    series_uid = generate_uid()
    datasets = [ct_dataset(series_uid, i) for i in range(3)]
    assert send(node.port, datasets) == [0, 0, 0]
    files = spool_files(node)
    assert len(files) == 3 and not any(f.name.startswith(".tmp-") for f in files)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(node.spool.root.stat().st_mode) == 0o700
    for f in files:
        stored = pydicom.dcmread(f)
        original = next(d for d in datasets if d.SOPInstanceUID == stored.SOPInstanceUID)
        assert stored.PixelData == original.PixelData
        assert f.parent.name == series_uid
    series = node.db.get_series(series_uid)
    assert series.state == "received" and series.n_instances == 3 and series.calling_aet == "PACS"
    instances = node.db.series_instances(series_uid)
    assert {i.path for i in instances} == {str(f) for f in files}
    # The release is recorded (for the quiet rule) right after the peer got its A-RELEASE-RP.
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)
    assert [e.message.split()[0] for e in node.events("association")] == ["accepted", "released"] * 2


@pytest.mark.parametrize(("kwargs", "calling", "called", "rsd", "words"), [
    ({}, "PACS", "OTHER_AE", (1, 1, 7), "called AE title"),
    ({"allowed_calling_aets": ["PACS"]}, "EVIL", NODE_AET, (1, 1, 3), "calling AE title 'EVIL'"),
    ({"allowed_networks": ["10.0.0.0/8"]}, "PACS", NODE_AET, (1, 1, 1), "source address 127.0.0.1"),
    ({"refuse_reason": lambda: "33 series wait"}, "PACS", NODE_AET, (2, 3, 2), "local limit exceeded"),
])
def test_refused_associations_are_logged_with_peer_and_reason(tmp_path: Path, kwargs: dict, calling: str,
                                                             called: str, rsd: tuple, words: str) -> None:
    setup = start_receiver(tmp_path, **kwargs)
    try:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", setup.port, ae_title=called)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == rsd
        [event] = setup.events("rejected")
        assert words in event.message and event.level == "WARNING"
        assert event.calling_aet == calling and event.peer_address.startswith("127.0.0.1:")
        # A permitted peer is still served after a refusal.
        if not kwargs:
            ok = AE(ae_title="PACS")
            ok.add_requested_context(Verification)
            assoc = ok.associate("127.0.0.1", setup.port, ae_title=NODE_AET)
            assert assoc.is_established
            assoc.release()
    finally:
        setup.receiver.stop()
        setup.db.close()


def test_allowed_peer_passes_the_checks(tmp_path: Path) -> None:
    setup = start_receiver(tmp_path, allowed_calling_aets=["PACS"], allowed_networks=["127.0.0.0/8", "::1"])
    try:
        assert send(setup.port, [ct_dataset(generate_uid(), 0)]) == [0]
    finally:
        setup.receiver.stop()
        setup.db.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_uids_with_path_characters_never_become_paths(node: Setup) -> None:
    bad_series = ct_dataset("../../escaped", 0)
    bad_study = ct_dataset(generate_uid(), 1, study_uid="1.2/../../x")
    bad_sop = ct_dataset(generate_uid(), 2, sop_uid="1.2.3/../../../y")
    too_long = ct_dataset("1." + "2" * 70, 3)
    assert send(node.port, [bad_series, bad_study, bad_sop, too_long]) == [0xC000] * 4
    assert spool_files(node) == []
    assert sorted(p.name for p in node.root.iterdir()) == ["ihd.sqlite", "ihd.sqlite-shm", "ihd.sqlite-wal",
                                                             "spool"]
    assert all("not a valid UID" in e.message for e in node.events("rejected"))
    assert send(node.port, [ct_dataset(generate_uid(), 0)]) == [0]  # still serving


def test_same_sop_uid_twice_is_idempotent_and_new_content_is_kept_beside(node: Setup) -> None:
    series_uid = generate_uid()
    first = ct_dataset(series_uid, 0, seed=1)
    assert send(node.port, [first, first]) == [0, 0]
    assert send(node.port, [first]) == [0]
    assert len(spool_files(node)) == 1
    assert node.db.get_series(series_uid).n_instances == 1

    changed = ct_dataset(series_uid, 0, seed=2, sop_uid=first.SOPInstanceUID)
    assert send(node.port, [changed]) == [0]
    files = spool_files(node)
    assert len(files) == 2  # both kept
    [instance] = node.db.series_instances(series_uid)
    assert pydicom.dcmread(instance.path).PixelData == changed.PixelData  # the newest is analysed
    warned = [e for e in node.events("received") if e.level == "WARNING"]
    assert len(warned) == 1 and "other content" in warned[0].message


def test_other_sop_classes_are_answered_success_and_recorded_as_ignored(node: Setup) -> None:
    mr = ct_dataset(generate_uid(), 0, sop_class=MRImageStorage, modality="MR")
    enhanced = ct_dataset(generate_uid(), 0, sop_class=EnhancedCTImageStorage)
    assert send(node.port, [mr, enhanced]) == [0, 0]
    assert len(spool_files(node)) == 1  # Enhanced CT is spooled for analysis (its frames are the slices)
    mr_series = node.db.get_series(mr.SeriesInstanceUID)
    assert mr_series.state == "ignored" and "not CT Image Storage" in mr_series.reason
    assert node.db.get_series(enhanced.SeriesInstanceUID).state == "received"
    assert len(node.events("ignored")) == 1


def test_low_disk_refuses_with_out_of_resources(tmp_path: Path) -> None:
    setup = start_receiver(tmp_path, min_free_bytes=1 << 62)
    try:
        assert send(setup.port, [ct_dataset(generate_uid(), 0)]) == [0xA700]
        assert spool_files(setup) == []
        assert "min_free_mb" in setup.events("rejected")[0].message
    finally:
        setup.receiver.stop()
        setup.db.close()


def test_database_failure_keeps_the_file_and_asks_for_a_resend(node: Setup) -> None:
    con = sqlite3.connect(node.root / "ihd.sqlite")
    con.execute("DROP TABLE instances")
    con.commit()
    con.close()
    ds = ct_dataset(generate_uid(), 0)
    assert send(node.port, [ds]) == [0xA700]
    [kept] = spool_files(node)  # on disk for the start-up re-index (tests/test_service.py)
    assert ds.SOPInstanceUID in kept.name


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_transfer_syntaxes_are_stored_as_received(node: Setup, syntax: str) -> None:
    ds = ct_dataset(generate_uid(), 0, size=64)
    original = ds.pixel_array.copy()
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax == ExplicitVRBigEndian:  # pydicom writes OW bytes as they are: give them in big endian
            ds.PixelData = original.astype(">i2").tobytes()
    assert send(node.port, [ds], syntaxes=[syntax]) == [0]
    [path] = spool_files(node)
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(stored.pixel_array, original)


@pytest.mark.parametrize("uids", [(str(CTImageStorage), "1.2.3", ExplicitVRLittleEndian),
                                  (str(EnhancedCTImageStorage), "1.2.34", ImplicitVRLittleEndian),
                                  (str(CTImageStorage), generate_uid(), str(DeflatedExplicitVRLittleEndian))])
def test_the_spool_files_header_is_the_one_pynetdicom_writes(uids: tuple[str, str, str]) -> None:
    """The receiver writes preamble and File Meta itself (file_preamble), byte for byte pynetdicom's."""
    sop_class, sop, syntax = uids
    meta = encode_file_meta(create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=syntax))
    assert file_preamble(sop_class, sop, syntax) == b"\0" * 128 + b"DICM" + meta


def test_a_spool_file_is_the_header_and_the_data_set_as_received(node: Setup) -> None:
    ds = ct_dataset(generate_uid(), 0, size=64)
    assert send(node.port, [ds]) == [0]
    [path] = spool_files(node)
    raw = path.read_bytes()
    head = file_preamble(str(CTImageStorage), ds.SOPInstanceUID, str(ds.file_meta.TransferSyntaxUID))
    assert raw.startswith(head)
    assert pydicom.dcmread(path).PixelData == ds.PixelData
    assert len(raw) - len(head) > 64 * 64 * 2  # the data set follows, pixel data included


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_dcmtk_storescu_sends_a_series(node: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    series_uid = generate_uid()
    for i in range(4):
        ct_dataset(series_uid, i).save_as(folder / f"{i}.dcm", enforce_file_format=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    command = ["storescu", "-aet", "CT_SCANNER", "-aec", NODE_AET, "+sd", "127.0.0.1", str(node.port),
               str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    series = node.db.get_series(series_uid)
    assert series.n_instances == 4 and series.calling_aet == "CT_SCANNER"


def make_certs(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI, EC keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=ihd-test-ca")
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", None)):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text((san or "basicConstraints=CA:FALSE") + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_inbound_with_client_certificates(tmp_path: Path) -> None:
    import ssl

    from ihd_node.config import default_config
    from ihd_node.node.wiring import server_ssl_context

    certs = make_certs(tmp_path / "tls")
    tls = default_config(tmp_path, node={"tls": {
        "enabled": True, "certificate": str(certs["server.crt"]), "private_key": str(certs["server.key"]),
        "ca_certificates": str(certs["ca.crt"]), "require_client_certificate": True}}).node.tls
    db = open_database(f"sqlite:///{tmp_path / 'ihd.sqlite'}")
    receiver = Receiver(Spool(tmp_path / "spool"), DatabaseRecorder(db), Admission(ae_title=NODE_AET),
                        host="127.0.0.1", port=0, ssl_context=server_ssl_context(tls)).start()
    try:
        def echo(with_client_cert: bool) -> bool:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca.crt"]))
            if with_client_cert:
                context.load_cert_chain(str(certs["client.crt"]), str(certs["client.key"]))
            ae = AE(ae_title="PACS")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title=NODE_AET,
                                 tls_args=(context, "127.0.0.1"))
            if not assoc.is_established:
                return False
            ok = int(assoc.send_c_echo().Status) == 0
            assoc.release()
            return ok

        assert echo(with_client_cert=True)
        assert not echo(with_client_cert=False)
        ae = AE(ae_title="PACS")  # plain TCP to a TLS port gets nowhere
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 3
        assert not ae.associate("127.0.0.1", receiver.port, ae_title=NODE_AET).is_established
    finally:
        receiver.stop()
        db.close()


def test_an_aborted_association_keeps_its_series_waiting_for_evidence(node: Setup) -> None:
    """A-ABORT half-way is no release: the series does not complete by the quiet rule, it waits (reason
    recorded) for max_wait; an association that was open when the node stopped counts as aborted too."""
    from datetime import timedelta

    from ihd_node.config import SeriesConfig
    from ihd_node.intake.recorder import abort_open_associations
    from ihd_node.store import utcnow
    from ihd_node.triage.assembler import Assembler

    aborted, left_open = generate_uid(), generate_uid()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert [int(assoc.send_c_store(ct_dataset(aborted, i)).Status) for i in range(2)] == [0, 0]
    assoc.abort()
    assert wait_for(lambda: any(e.message.startswith(("aborted", "closed without release"))
                                for e in node.events("association")))
    series = node.db.get_series(aborted)
    assert series.association_released is None
    assert series.reason.startswith("waiting for the rest of the series: its association")

    still = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)  # open while the node "dies"
    try:
        assert int(still.send_c_store(ct_dataset(left_open, 0)).Status) == 0
        assert abort_open_associations(node.db) == 2  # the start-up recovery's call
        assert "was open when the node stopped" in node.db.get_series(left_open).reason
        assert node.db.get_series(left_open).association_released is None
    finally:
        still.abort()

    assembler = Assembler(node.db, SeriesConfig(quiet_seconds=0.5, max_wait_seconds=10.0), lambda uid: None)
    assert assembler.tick(now=utcnow() + timedelta(seconds=5)) == []  # quiet, but not released
    done = assembler.tick(now=utcnow() + timedelta(seconds=10.5))
    assert {(d.series_instance_uid, d.rule) for d in done} == {(aborted, "max_wait"), (left_open, "max_wait")}
