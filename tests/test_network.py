"""The node's network layer on loopback: TCP_NODELAY both ways, the node's own implementation identity,
the Max PDU Length it announces, PDUs larger than allowed (before and after association) dropped
without being read, and the C-STORE codec that bypasses pynetdicom's (same bytes, same primitives)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, Verification

from ihd_node.config import default_config
from ihd_node.delivery.sender import _associate
from ihd_node.dicom_network import (
    DEFAULT_MAX_PDU,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    FastAssociation,
    FastDIMSE,
    encode_store_response,
    parse_store_request,
)
from ihd_node.dicom_requestor import RequestorAssociation, on_outgoing_connection
from ihd_node.intake.receiver import Admission, Receiver
from ihd_node.intake.recorder import DatabaseRecorder
from ihd_node.intake.spool import Spool, valid_uid
from ihd_node.store import open_database

AET = "IHD_AI"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    root = tmp_path_factory.mktemp("net")
    db = open_database(f"sqlite:///{root / 'ihd.sqlite'}")
    rx = Receiver(Spool(root / "spool"), DatabaseRecorder(db), Admission(AET), host="127.0.0.1", port=0,
                  network_timeout=30, max_pdu=16384).start()
    yield rx
    rx.stop()
    db.close()


def associate(port: int) -> object:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    return assoc


def nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def closed_within(sock: socket.socket, seconds: float, junk: bytes = b"\0" * 65536) -> bool:
    """Keeps sending junk; True once the peer has closed the connection (reset, EOF or broken pipe)."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(junk)
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                return True
        except (BlockingIOError, TimeoutError):
            continue
        except OSError:  # reset / broken pipe
            return True
    return False


def test_the_config_default_is_the_adapters_default() -> None:
    assert default_config("/tmp").node.max_pdu == DEFAULT_MAX_PDU
    assert valid_uid(IMPLEMENTATION_CLASS_UID) and len(IMPLEMENTATION_VERSION_NAME) <= 16


def test_accepted_associations_get_nodelay_the_nodes_identity_and_the_configured_max_pdu(
        receiver: Receiver) -> None:
    assoc = associate(receiver.port)
    try:
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        assert assoc.acceptor.maximum_length == 16384  # pynetdicom's default would be 16382; 0 = unbounded
        assert assoc.send_c_echo().Status == 0
        server_side = list(receiver._server.active_associations)  # type: ignore[union-attr]
        assert server_side and all(isinstance(a, FastAssociation) for a in server_side)
        assert all(isinstance(a.dimse, FastDIMSE) for a in server_side)
        assert all(nodelay(a.dul.socket.socket) for a in server_side)
    finally:
        assoc.release()


def test_dcmtk_sees_the_nodes_implementation_identity(receiver: Receiver) -> None:
    out = subprocess.run(["echoscu", "-d", "-aec", AET, "127.0.0.1", str(receiver.port)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in text
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in text


def test_outgoing_associations_get_nodelay_and_the_nodes_identity() -> None:
    seen: dict[str, object] = {}

    def on_requested(event: evt.Event) -> None:
        seen["uid"] = event.assoc.requestor.implementation_class_uid
        seen["name"] = event.assoc.requestor.implementation_version_name

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification, [ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_REQUESTED, on_requested)])
    try:
        dest = SimpleNamespace(host="127.0.0.1", port=server.server_address[1], ae_title="PACS", timeout=10,
                               tls=None)
        assoc = _associate("IHD_AI", dest, [(str(Verification), [ImplicitVRLittleEndian])])
        try:
            assert nodelay(assoc.dul.socket.socket)
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert seen == {"uid": IMPLEMENTATION_CLASS_UID, "name": IMPLEMENTATION_VERSION_NAME}


class SlowCheckpoint(threading.Event):
    """A reactor checkpoint that holds the reactor a moment after letting it pass, as a busy CPU does."""

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        time.sleep(0.02)
        return passed


@pytest.mark.parametrize("fixed", [False, True])
def test_a_requestor_reactor_never_takes_the_response_a_sender_waits_for(receiver: Receiver, fixed: bool) -> None:
    """Seen under load as one C-STORE in a few thousand answered after dimse_timeout and its association
    aborted ("Received unexpected C-STORE service message"). With the window widened, pynetdicom's own loop
    loses a response within 10 echoes (the race is real, and this test can see it); the node's requestor
    loop (bound by on_outgoing_connection, as the sender and the simulator do) loses none.

    The window, as a loaded machine opens it: the reactor has just passed its checkpoint when the sender
    pauses it (SlowCheckpoint), and the sender's thread is not scheduled at once when its response arrives
    (late_get), so the reactor's next look at the queue comes first."""

    def widen(event: evt.Event) -> None:
        checkpoint = SlowCheckpoint()
        checkpoint.set()
        event.assoc._reactor_checkpoint = checkpoint
        get_msg = event.assoc.dimse.get_msg

        def late_get(block: bool = False) -> tuple[object, object]:
            if block:
                time.sleep(0.05)
            return get_msg(block=block)

        event.assoc.dimse.get_msg = late_get

    handlers = [(evt.EVT_CONN_OPEN, widen)] + ([(evt.EVT_CONN_OPEN, on_outgoing_connection)] if fixed else [])
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AET, evt_handlers=handlers)
    assert assoc.is_established
    assert (type(assoc) is RequestorAssociation) == fixed
    statuses = []
    try:
        for _ in range(10):
            if not assoc.is_established:
                break
            answer = assoc.send_c_echo()
            statuses.append(int(answer.Status) if "Status" in answer else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    if fixed:
        assert statuses == [0x0000] * 10
    else:
        assert -1 in statuses and not assoc.is_established, statuses


def test_a_4_gb_pdu_announced_before_association_is_dropped_unread(receiver: Receiver) -> None:
    """Before the fix pynetdicom kept reading the announced 4 GB (4 KB at a time, buffering all of it)
    until the network timeout (30 s here)."""
    rss_before = _rss_kb()
    with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
        assert closed_within(sock, 15.0)  # generous for a loaded machine; the bug held it until the 30 s timeout
    assert _rss_kb() - rss_before < 32 * 1024  # nothing of the announced size was allocated
    assoc = associate(receiver.port)  # and the node still serves
    assoc.release()


def test_a_p_data_pdu_larger_than_announced_closes_the_association(receiver: Receiver) -> None:
    assoc = associate(receiver.port)
    sock = assoc.dul.socket.socket
    sock.sendall(struct.pack(">BBL", 0x04, 0, 64 << 20))  # 64 MB P-DATA-TF against max_pdu 16384
    deadline = time.monotonic() + 15  # generous; reading 64 MB would hold it until the 30 s network timeout
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not assoc.is_established  # the node closed the connection without reading 64 MB
    assoc.abort()


def _rss_kb() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


CT = str(CTImageStorage)
UIDS = ["1.2.3", "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567"]


def _store_rsp(status: int, sop: str, *, comment: str | None = None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID, rsp.Status = CT, sop, status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210])
@pytest.mark.parametrize("sop", UIDS)  # odd and even length (a UID is padded with one NUL)
def test_c_store_responses_are_the_bytes_pynetdicom_encodes(status: int, sop: str) -> None:
    rsp = _store_rsp(status, sop)
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert encode_store_response(rsp) == encode(msg.command_set, True, True)
    assert encode_store_response(_store_rsp(status, sop, comment="why")) is None  # pynetdicom encodes that


def _pdvs(primitive: object, max_pdu: int) -> list[tuple[int, bytes]]:
    msg = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    msg.primitive_to_message(primitive)
    return [pdv for p in msg.encode_msg(1, max_pdu) for pdv in p.presentation_data_value_list]


def _store_rq(sop: str, priority: int = 0, move: bool = False) -> C_STORE:
    rq = C_STORE()
    rq.MessageID, rq.Priority = 3, priority
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CT, sop
    if move:
        rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = "PACS", 9
    rq.DataSet = BytesIO(bytes(range(256)) * 300)
    return rq


def _stock_primitive(pdvs: list[tuple[int, bytes]]) -> object:
    msg = DIMSEMessage()
    for cid, data in pdvs:
        p = P_DATA()
        p.presentation_data_value_list.append((cid, data))
        if msg.decode_msg(p):
            break
    return msg.message_to_primitive()


@pytest.mark.parametrize("sop", UIDS)
@pytest.mark.parametrize("priority", [0, 1, 2])
def test_c_store_requests_decode_to_what_pynetdicom_decodes(sop: str, priority: int) -> None:
    pdvs = _pdvs(_store_rq(sop, priority), 16384)
    command = b"".join(d[1:] for _, d in pdvs if d[0] & 1)
    fast, stock = parse_store_request(command), _stock_primitive(pdvs)
    assert fast is not None
    for name in ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID", "MessageIDBeingRespondedTo"):
        assert getattr(fast, name) == getattr(stock, name), name


def test_other_commands_are_left_to_pynetdicoms_decoder() -> None:
    move = _pdvs(_store_rq(UIDS[0], move=True), 16384)  # a C-MOVE sub-operation: pynetdicom decodes it
    assert parse_store_request(b"".join(d[1:] for _, d in move if d[0] & 1)) is None
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 1, str(Verification)
    assert parse_store_request(b"".join(d[1:] for _, d in _pdvs(echo, 16384) if d[0] & 1)) is None
    assert parse_store_request(b"\0\0\0") is None  # cut short


def ct_instance(size: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = os.urandom(size * size * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize("move", [False, True])
def test_the_fast_codec_stores_every_fragment_on_a_real_association(receiver: Receiver, move: bool) -> None:
    """Data sets of many 16 KB fragments, by the fast path (plain C-STORE) and by pynetdicom's (a C-MOVE
    sub-operation carries Move Originator elements); the node keeps exactly the bytes sent."""
    ds = ct_instance(128)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AET)
    assert assoc.is_established
    try:
        kwargs = {"originator_aet": "PACS", "originator_id": 5} if move else {}
        assert assoc.send_c_store(ds, **kwargs).Status == 0
    finally:
        assoc.release()
    rows = receiver.recorder.db.series_instances(ds.SeriesInstanceUID)  # type: ignore[attr-defined]
    assert [r.sop_instance_uid for r in rows] == [ds.SOPInstanceUID]
    assert dcmread(rows[0].path).PixelData == ds.PixelData


def test_a_c_store_is_served_in_the_thread_that_received_it(tmp_path: Path) -> None:
    """No hand-off to the association thread and back (FastDIMSE.inline_store): the recorder, called from
    the C-STORE handler, runs in the association's DUL thread; a C-ECHO still takes pynetdicom's path."""
    threads: list[threading.Thread] = []

    class Recording(DatabaseRecorder):
        def instance_received(self, inst: object) -> None:
            threads.append(threading.current_thread())
            super().instance_received(inst)  # type: ignore[arg-type]

    db = open_database(f"sqlite:///{tmp_path / 'ihd.sqlite'}")
    rx = Receiver(Spool(tmp_path / "spool"), Recording(db), Admission(AET), host="127.0.0.1", port=0).start()
    try:
        ds = ct_instance(16)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", rx.port, ae_title=AET)
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0
            assert assoc.send_c_store(ds).Status == 0
            [server_side] = list(rx._server.active_associations)  # type: ignore[union-attr]
            assert threads == [server_side.dul]
        finally:
            assoc.release()
    finally:
        rx.stop()
        db.close()
