"""The node's network layer on loopback: TCP_NODELAY both ways, the node's own implementation identity,
the Max PDU Length it announces, and PDUs larger than allowed (before and after association) dropped
without being read."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from ihd_node.config import default_config
from ihd_node.db import open_database
from ihd_node.dicom.network import (
    DEFAULT_MAX_PDU,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    FastAssociation,
)
from ihd_node.dicom.receiver import Admission, DatabaseRecorder, Receiver
from ihd_node.dicom.sender import _associate
from ihd_node.spool import Spool, valid_uid

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


def test_a_4_gb_pdu_announced_before_association_is_dropped_unread(receiver: Receiver) -> None:
    """Before the fix pynetdicom kept reading the announced 4 GB (4 KB at a time, buffering all of it)
    until the network timeout (30 s here)."""
    rss_before = _rss_kb()
    with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
        assert closed_within(sock, 3.0)
    assert _rss_kb() - rss_before < 32 * 1024  # nothing of the announced size was allocated
    assoc = associate(receiver.port)  # and the node still serves
    assoc.release()


def test_a_p_data_pdu_larger_than_announced_closes_the_association(receiver: Receiver) -> None:
    assoc = associate(receiver.port)
    sock = assoc.dul.socket.socket
    sock.sendall(struct.pack(">BBL", 0x04, 0, 64 << 20))  # 64 MB P-DATA-TF against max_pdu 16384
    deadline = time.monotonic() + 3
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not assoc.is_established  # the node closed the connection without reading 64 MB
    assoc.abort()


def _rss_kb() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
