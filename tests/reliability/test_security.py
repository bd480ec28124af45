"""Security of the real `ihd-node serve` process, probed with real dcmtk tools and pynetdicom SCUs.

- Admission: allowed calling AE titles, allowed source addresses (an IP and a CIDR; the SCU binds to
  127.0.0.x, all of which are on Linux loopback), the called AE title. Each refusal is an A-ASSOCIATE-RJ
  with a defined (result, source, reason), and an audit row + log line with the peer's address and AE title.
- DICOM TLS inbound (server certificate, client certificates required or optional) with `echoscu +tls`,
  `storescu +tls` and pynetdicom; clients without a certificate, with a certificate of an unknown CA, plain
  TCP clients and a silent TCP connection fail cleanly and the node keeps serving. Outbound TLS to a
  TLS-only receiving PACS that requires the node's client certificate: the results arrive.
- UIDs with path characters are refused (0xC000) and nothing is written outside the spool.
- The state folder is owner-only; no patient name, birth date or patient ID reaches the log or any
  byte of the log database (main file and WAL).

The in-process versions of the admission and TLS checks are in tests/test_receiver.py; these are the
end-to-end ones across process boundaries.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from certs import CertSet, have_openssl, make_test_certs
from conftest import NODE_AET, PACS_AET, wait_until
from heads import full_head
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ihd_node.sim.mini_pacs import MiniPACS
from ihd_node.sim.phantom import make_series, write_series

# Segmentation and Key Object Selection of a positive result: sent besides the SR and captures.
OVERLAY_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.59")

needs_dcmtk = pytest.mark.skipif(shutil.which("echoscu") is None or shutil.which("storescu") is None,
                                 reason="dcmtk (echoscu, storescu) not installed")
needs_openssl = pytest.mark.skipif(not have_openssl(), reason="openssl not installed")

SLICES, SIZE = 24, 64  # a small full head (tests/heads.py): the model is the tiny random one of conftest
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PERMANENT, TRANSIENT = 0x01, 0x02
SERVICE_USER = 0x01
NO_REASON, CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x01, 0x03, 0x07


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    if not have_openssl():
        pytest.skip("openssl not installed")
    return make_test_certs(tmp_path_factory.mktemp("tls"))


# ---------------------------------------------------------------- SCU helpers


@dataclass
class Outcome:
    kind: str  # accepted, rejected, failed (no association: TLS refused, connection closed)
    rsd: tuple[int, int, int] | None = None  # (result, source, reason) of an A-ASSOCIATE-RJ
    status: int | None = None  # C-ECHO status when accepted


def echo(port: int, *, calling: str = PACS_AET, called: str = NODE_AET, source: str = "127.0.0.1",
         tls=None) -> Outcome:
    """One pynetdicom C-ECHO association from `source` (bound as the local address)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0),
                         tls_args=(tls, "127.0.0.1") if tls else None)
    if assoc.is_established:
        status = int(assoc.send_c_echo().Status)
        assoc.release()
        return Outcome("accepted", status=status)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return Outcome("rejected", (int(rj.result), int(rj.result_source), int(rj.diagnostic)))
    return Outcome("failed")


def store(port: int, datasets: list[Dataset], *, calling: str = PACS_AET, tls=None) -> list[int]:
    ae = AE(ae_title=calling)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=(tls, "127.0.0.1") if tls else None)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def dcmtk(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TCP_NODELAY": "1"})


def tls_args_dcmtk(certs: CertSet, client_certificate: bool = True) -> list[str]:
    key_and_cert = ["+tls", str(certs.client_key), str(certs.client_cert)] if client_certificate else ["+tla"]
    return [*key_and_cert, "+cf", str(certs.ca_cert)]


def assert_clean_log(node) -> None:
    """Refusals are answered, not crashes: no traceback or thread exception in the node's output."""
    log = node.log()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-4000:]


def rejected_events(node) -> list[tuple[str, str | None, str | None, str]]:
    return node.query("SELECT message, calling_aet, peer_address, level FROM events WHERE kind = 'rejected' "
                      "ORDER BY id")


# ---------------------------------------------------------------- admission


@needs_dcmtk
def test_calling_called_aet_and_source_address_admission(pacs, make_node) -> None:
    node = make_node(pacs, node={"allowed_calling_aets": ["PACS", "CT1"],
                                 "allowed_addresses": ["127.0.0.1/32", "127.0.0.8/29"]}).start()
    port = str(node.port)

    # Let in: an allowed AE title from the allowed IP and from inside the allowed CIDR.
    assert echo(node.port) == Outcome("accepted", status=0)
    assert echo(node.port, calling="CT1", source="127.0.0.9") == Outcome("accepted", status=0)
    done = dcmtk("echoscu", "-aet", "CT1", "-aec", NODE_AET, "127.0.0.1", port)
    assert done.returncode == 0, done.stderr

    # Refused: A-ASSOCIATE-RJ permanent, from the service user, with the reason the standard has.
    assert echo(node.port, source="127.0.0.2") == Outcome("rejected", (PERMANENT, SERVICE_USER, NO_REASON))
    assert echo(node.port, calling="EVIL") == Outcome("rejected", (PERMANENT, SERVICE_USER,
                                                                   CALLING_AE_NOT_RECOGNIZED))
    assert echo(node.port, called="OTHER_AE") == Outcome("rejected", (PERMANENT, SERVICE_USER,
                                                                      CALLED_AE_NOT_RECOGNIZED))
    # The same with dcmtk: a clean refusal it can name, exit status not 0.
    done = dcmtk("echoscu", "-aet", "EVIL2", "-aec", NODE_AET, "127.0.0.1", port)
    assert done.returncode != 0 and "Calling AE Title Not Recognized" in done.stderr, done.stderr
    assert "Rejected Permanent" in done.stderr
    done = dcmtk("echoscu", "-aet", "PACS", "-aec", "NOT_THE_NODE", "127.0.0.1", port)
    assert done.returncode != 0 and "Called AE Title Not Recognized" in done.stderr, done.stderr
    # A refused peer cannot store anything either (dcmtk storescu from a refused AE title).
    folder = node.root / "refused-study"
    write_series(full_head(11, None, n_slices=SLICES, size=SIZE), folder)
    done = dcmtk("storescu", "-aet", "EVIL3", "-aec", NODE_AET, "127.0.0.1", port, "+sd", str(folder))
    assert done.returncode != 0 and "Calling AE Title Not Recognized" in done.stderr, done.stderr

    # Each refusal is audited with the peer's address and AE title, and logged the same way.
    rows = rejected_events(node)
    expected = [("source address 127.0.0.2 is not allowed", "PACS", "127.0.0.2:"),
                ("calling AE title 'EVIL' is not allowed", "EVIL", "127.0.0.1:"),
                ("called AE title 'OTHER_AE' is not 'IHD_AI'", "PACS", "127.0.0.1:"),
                ("calling AE title 'EVIL2' is not allowed", "EVIL2", "127.0.0.1:"),
                ("called AE title 'NOT_THE_NODE' is not 'IHD_AI'", "PACS", "127.0.0.1:"),
                ("calling AE title 'EVIL3' is not allowed", "EVIL3", "127.0.0.1:")]
    assert len(rows) == len(expected), rows
    for (message, aet, peer, level), (words, want_aet, want_peer) in zip(rows, expected, strict=True):
        assert message == f"association refused: {words}" and level == "WARNING"
        assert aet == want_aet and peer.startswith(want_peer)
    log = node.log()
    for _, aet, peer, _ in rows:
        assert f"rejected aet={aet} peer={peer} " in log
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    assert echo(node.port) == Outcome("accepted", status=0)  # still serving
    assert node.process.poll() is None
    assert_clean_log(node)


# ---------------------------------------------------------------- TLS


@dataclass
class TLSMiniPACS(MiniPACS):
    """The MiniPACS behind DICOM TLS only (the node must present a client certificate)."""

    ssl_context: object = None
    handshakes: int = 0

    def start(self) -> TLSMiniPACS:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)

        def on_open(event: evt.Event) -> None:
            self.handshakes += 1

        self._server = ae.start_server((self.host, self.port), block=False, ssl_context=self.ssl_context,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                     (evt.EVT_CONN_OPEN, on_open)])
        return self


@needs_dcmtk
@needs_openssl
def test_tls_in_and_out_with_dcmtk_and_pynetdicom(tmp_path: Path, certs: CertSet, make_node) -> None:
    with TLSMiniPACS(tmp_path / "tls-pacs", ae_title=PACS_AET,
                     ssl_context=certs.server_context(require_client_certificate=True)) as tls_pacs:
        node = make_node(tls_pacs, node={"acse_timeout": 3.0, "tls": {
            "enabled": True, "certificate": str(certs.server_cert), "private_key": str(certs.server_key),
            "ca_certificates": str(certs.ca_cert), "require_client_certificate": True}},
            destinations=[{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": tls_pacs.port,
                           "tls": {"enabled": True, "ca_certificates": str(certs.ca_cert),
                                   "certificate": str(certs.client_cert),
                                   "private_key": str(certs.client_key)}}]).start()
        port = str(node.port)
        assert "tls=yes" in node.log()

        # A silent TCP connection (a port scanner, a stuck client), held open throughout: it must not stop
        # anyone else, and it is dropped after node.acse_timeout.
        silent = socket.create_connection(("127.0.0.1", node.port))
        time.sleep(0.2)
        assert echo(node.port, tls=certs.client_context()) == Outcome("accepted", status=0)

        # dcmtk with the client certificate: echo, then a whole study over storescu +tls.
        done = dcmtk("echoscu", *tls_args_dcmtk(certs), "-aet", "PACS", "-aec", NODE_AET, "127.0.0.1", port)
        assert done.returncode == 0, done.stderr
        series = full_head(21, None, n_slices=SLICES, size=SIZE)
        write_series(series, tmp_path / "study")
        done = dcmtk("storescu", *tls_args_dcmtk(certs), "-aet", "PACS", "-aec", NODE_AET, "127.0.0.1", port,
                     "+sd", str(tmp_path / "study"))
        assert done.returncode == 0, done.stderr

        # Refused cleanly: no client certificate (dcmtk anonymous TLS and pynetdicom), a certificate of an
        # unknown CA, plain DICOM on the TLS port (dcmtk and pynetdicom).
        done = dcmtk("echoscu", *tls_args_dcmtk(certs, client_certificate=False), "-aet", "PACS",
                     "-aec", NODE_AET, "127.0.0.1", port, timeout=30)
        assert done.returncode != 0, done.stderr
        assert echo(node.port, tls=certs.client_context(with_certificate=False)).kind == "failed"
        assert echo(node.port, tls=certs.client_context(rogue=True)).kind == "failed"
        # Refused at once, not left to echoscu's own 60 s timeouts: half of them is a deadline that only a
        # hang misses, however loaded the machine.
        t0 = time.monotonic()
        done = dcmtk("echoscu", "-to", "60", "-ta", "60", "-aet", "PACS", "-aec", NODE_AET, "127.0.0.1", port,
                     timeout=120)
        waited = time.monotonic() - t0
        assert done.returncode != 0 and waited < 30, (waited, done.stderr)
        assert echo(node.port).kind == "failed"

        # Still serving, and the study sent over TLS was analysed and its results went out over TLS.
        assert echo(node.port, tls=certs.client_context()) == Outcome("accepted", status=0)
        uid = series.series_instance_uid
        assert node.wait_state(uid, ("delivered", "failed", "ignored"), 90) == "delivered", node.log()[-3000:]
        objects = tls_pacs.objects(series.study_instance_uid)
        assert sum(o.sop_class_uid == COMPREHENSIVE_3D_SR for o in objects) == 1
        (n_sc,) = node.query("SELECT n_secondary_captures FROM analyses")[0]
        extra = sum(o.sop_class_uid in OVERLAY_CLASSES for o in objects)
        assert len(objects) - extra == 1 + n_sc and extra <= 2 and tls_pacs.handshakes >= 1
        assert node.query("SELECT count(*) FROM instances") == [(SLICES,)]
        assert node.query("SELECT DISTINCT calling_aet FROM series") == [("PACS",)]

        try:
            assert wait_until(lambda: any("nothing within 3 s" in m for m, *_ in rejected_events(node)), 10)
        finally:
            silent.close()
        # Each failed handshake is audited with the peer address (no AE title is known before TLS).
        assert wait_until(lambda: any("nothing within 3 s" in m for m, *_ in rejected_events(node)), 10)
        rows = rejected_events(node)
        assert len(rows) == 6, rows  # silent, dcmtk anonymous, no cert, rogue, dcmtk plain, pynetdicom plain
        for message, aet, peer, level in rows:
            assert message.startswith("TLS handshake failed: ") and level == "WARNING"
            assert aet is None and peer.startswith("127.0.0.1:")
        assert sum("CERTIFICATE" in m for m, *_ in rows) >= 3  # no / unknown-CA client certificate
        assert node.log().count("rejected peer=127.0.0.1:") == 6
        assert "closed_without_association" not in node.log()  # one line per refusal
        assert node.process.poll() is None
        assert node.terminate() == 0
        assert_clean_log(node)


@needs_dcmtk
@needs_openssl
def test_tls_client_certificate_optional(pacs, certs: CertSet, make_node) -> None:
    node = make_node(pacs, node={"tls": {
        "enabled": True, "certificate": str(certs.server_cert), "private_key": str(certs.server_key),
        "ca_certificates": str(certs.ca_cert), "require_client_certificate": False}}).start()
    # Without a client certificate: let in (server authentication only), by dcmtk and pynetdicom.
    done = dcmtk("echoscu", *tls_args_dcmtk(certs, client_certificate=False), "-aet", "PACS", "-aec", NODE_AET,
                 "127.0.0.1", str(node.port))
    assert done.returncode == 0, done.stderr
    assert echo(node.port, tls=certs.client_context(with_certificate=False)) == Outcome("accepted", status=0)
    assert echo(node.port, tls=certs.client_context()) == Outcome("accepted", status=0)
    # A certificate that is presented is still verified: one from an unknown CA is refused.
    assert echo(node.port, tls=certs.client_context(rogue=True)).kind == "failed"
    # The node logs the failed handshake in the connection's own thread, after the client has given up.
    assert wait_until(lambda: rejected_events(node), 10)
    [(message, _, peer, _)] = rejected_events(node)
    assert message.startswith("TLS handshake failed") and peer.startswith("127.0.0.1:")
    # dcmtk checks the node's certificate against the CA it trusts: a client trusting another CA gives up.
    done = dcmtk("echoscu", "+tla", "+cf", str(certs.folder / "rogue-ca.crt"), "-aet", "PACS", "-aec", NODE_AET,
                 "127.0.0.1", str(node.port))
    assert done.returncode != 0
    assert echo(node.port, tls=certs.client_context(with_certificate=False)).kind == "accepted"
    assert_clean_log(node)


# ---------------------------------------------------------------- UIDs as file names


def _bad_uid_datasets(good: Dataset) -> list[Dataset]:
    """Copies of a good slice with one UID made of path characters each."""
    variants = {"SOPInstanceUID": ["../../evil", "1.2/3", "1.2.3/../../../../evil2"],
                "StudyInstanceUID": ["../../../evil3"], "SeriesInstanceUID": ["..", "1.2/../../evil4"]}
    out = []
    for keyword, values in variants.items():
        for value in values:
            ds = copy.deepcopy(good)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
            out.append(ds)
    return out


def _escaped(tmp_path: Path) -> list[Path]:
    """Anything named *evil* in the test's folder or in any folder above it (up to 6 levels)."""
    found = list(tmp_path.rglob("*evil*"))
    for parent in list(tmp_path.parents)[:6]:
        found += list(parent.glob("*evil*"))
    return found


@needs_dcmtk
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_uids_with_path_characters_never_become_file_names(pacs, make_node, tmp_path: Path) -> None:
    node = make_node(pacs).start()
    series = full_head(31, None, n_slices=SLICES, size=SIZE)
    bad = _bad_uid_datasets(series.datasets[0])
    assert store(node.port, bad) == [0xC000] * len(bad)

    # dcmtk storescu sends such files as they are (-nh: go on after a failed store): refused the same way.
    folder = tmp_path / "bad-files"
    folder.mkdir()
    for i, ds in enumerate(bad[:2]):
        ds.save_as(folder / f"bad{i}.dcm", enforce_file_format=True)
    done = dcmtk("storescu", "-v", "-nh", "-aet", "PACS", "-aec", NODE_AET, "127.0.0.1", str(node.port),
                 "+sd", str(folder))
    assert done.stderr.count("Received Store Response (Error: CannotUnderstand)") == 2, \
        done.stderr

    # Nothing written: not in the spool, not beside it, not above the state folder.
    spool = node.state_dir / "spool"
    assert list(spool.rglob("*")) == []
    assert _escaped(tmp_path) == []
    # site-id: the installation's own value behind the Device Observer UID, written at first start.
    assert sorted(p.name for p in node.state_dir.iterdir()) == ["ihd.sqlite", "ihd.sqlite-shm",
                                                                   "ihd.sqlite-wal", "results", "site-id",
                                                                   "spool"]
    rows = rejected_events(node)
    assert len(rows) == len(bad) + 2
    assert all("C-STORE refused with 0xC000" in m and "is not a valid UID" in m for m, *_ in rows), rows
    assert node.query("SELECT count(*) FROM instances") == [(0,)]
    # ... and the node still takes a good study.
    assert store(node.port, series.datasets) == [0] * SLICES
    assert node.wait_state(series.series_instance_uid, ("delivered", "failed"), 60) == "delivered"
    assert len(list(spool.rglob("*.dcm"))) == SLICES and _escaped(tmp_path) == []
    assert_clean_log(node)


# ---------------------------------------------------------------- owner-only state, no patient data in logs

SECRET_NAME, SECRET_BIRTH, SECRET_ID = "ZZSECRET^NAME", "19010203", "ZZSECRETPID"


def _with_patient(datasets: list[Dataset], malformed: bool = False) -> list[Dataset]:
    """The secret patient; `malformed`: values that break their VR (pydicom warns, quoting the value)."""
    for ds in datasets:
        ds.PatientName, ds.PatientBirthDate, ds.PatientID = SECRET_NAME, SECRET_BIRTH, SECRET_ID
        if malformed:
            ds.PatientName = SECRET_NAME + "X" * 70  # a PN component over 64 characters
            ds.PatientBirthDate = SECRET_BIRTH + "-1"  # not a DA
            ds.PatientID = SECRET_ID + "\\2"  # a backslash (value separator) in an LO of VM 1
    return datasets


def _mr_instance(study_uid: str) -> Dataset:
    """An MR object in the same study: accepted and recorded as ignored (another code path that logs)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), "MR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return ds


def test_owner_only_state_and_no_patient_data_in_logs(pacs, make_node) -> None:
    node = make_node(pacs, logging={"level": "DEBUG"}).start()
    series = full_head(41, None, n_slices=SLICES, size=SIZE)
    datasets = _with_patient(series.datasets)
    mr = _with_patient([_mr_instance(series.study_instance_uid)])
    late_bad = _with_patient([make_series(42, n_slices=1, size=SIZE).datasets[0]])
    late_bad[0].SOPInstanceUID = "1.2/../x"  # refused: its refusal is logged too
    malformed = full_head(43, None, n_slices=SLICES, size=SIZE)
    _with_patient(malformed.datasets, malformed=True)
    assert store(node.port, datasets + mr, calling="PACS") == [0] * (SLICES + 1)
    assert store(node.port, late_bad) == [0xC000]
    assert store(node.port, malformed.datasets) == [0] * SLICES
    for s in (series, malformed):
        state = node.wait_state(s.series_instance_uid, ("delivered", "failed"), 60)
        assert state == "delivered", node.log()[-3000:]
        assert any(o.sop_class_uid == COMPREHENSIVE_3D_SR for o in pacs.objects(s.study_instance_uid))
    # What an admin reads: the CLI views of the database.
    cli = [subprocess.run([sys.executable, "-m", "ihd_node", *args, "--config", str(node.config_path)],
                          capture_output=True, text=True, timeout=60, env=node.env)
           for args in (["status", "--json"], ["log", "--json"], ["log"])]
    assert all(c.returncode == 0 for c in cli), [c.stderr for c in cli]

    # Owner-only: every folder 0700 and every file 0600 (spool, results, the database with its WAL and shm).
    state = node.state_dir
    wal = Path(f"{node.db_path}-wal")
    assert wal.exists()
    wal_bytes_running = wal.read_bytes()
    problems = []
    for path in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir() and mode != 0o700:
            problems.append(f"{path.relative_to(state)}: dir {mode:o}")
        elif path.is_file() and mode != 0o600:
            problems.append(f"{path.relative_to(state)}: file {mode:o}")
    assert not problems, problems
    assert any(state.glob("spool/*/*/*.dcm")) and any(state.glob("results/*/r0/SR_*.dcm"))

    assert node.terminate() == 0
    assert_clean_log(node)
    # No patient name, birth date or ID: not in the log, in the CLI views, in any text column of any table,
    # nor anywhere in the raw bytes of the database and its WAL (as it was while running, and after).
    secrets = [SECRET_NAME, "ZZSECRET", SECRET_BIRTH, SECRET_ID]
    texts = {"node log": node.log(), **{f"ihd-node {' '.join(c.args[3:-2])}": c.stdout + c.stderr for c in cli}}
    with sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"studies", "series", "instances", "analyses", "deliveries", "events"} <= set(tables)
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            texts[f"table {table}"] = "\n".join(str(v) for row in rows for v in row)
            assert columns
    raw = {"ihd.sqlite": node.db_path.read_bytes(), "ihd.sqlite-wal (running)": wal_bytes_running}
    if wal.exists():
        raw["ihd.sqlite-wal"] = wal.read_bytes()
    found = [(where, s) for where, text in texts.items() for s in secrets if s in text]
    found += [(where, s) for where, data in raw.items() for s in secrets if s.encode() in data]
    assert not found, found
    # Not vacuous: the patient data did reach the node (the spool holds the PACS data as received), and the
    # log has the DEBUG lines too.
    spooled = b"".join(p.read_bytes() for p in state.glob("spool/*/*/*.dcm"))
    assert all(s.encode() in spooled for s in secrets) and " DEBUG conn.open " in texts["node log"]
    assert "0xC000" in texts["table events"]  # the refusal was recorded, without the patient
