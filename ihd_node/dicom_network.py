"""The node's network layer under pynetdicom: who the node says it is, socket options, and a faster
and bounded receive path for the associations it accepts.

Shared below the stages: intake accepts associations through it, delivery opens them through it.

Why an adapter, and why this small:
- pynetdicom's two per-association threads poll: the association thread sleeps 1 ms before every look
  at its message queue, and the DUL thread sleeps 1 ms whenever it found nothing to do. Every C-STORE
  therefore waits up to ~2 ms in sleeps (request complete -> handler -> response on the wire), more than
  writing and fsyncing the instance costs. Measured with bench/bench_intake.py: a bare pynetdicom SCP
  that answers and stores nothing reached only 0.36-0.5x the speed of dcmtk's storescp.
  Here both threads block on what they wait for instead (the message queue; the socket and a wake-up
  socket pair), so they react at once and use no CPU when idle.
- pynetdicom reads a PDU 4 KB per recv() into a growing buffer, of whatever length the peer announces,
  also before any association exists: a peer could make the node buffer up to 4 GB. Here a PDU is read
  with recv_into() into one buffer of its announced size, and only after that size was checked: at most
  MAX_REQUEST_PDU before the association is accepted, at most the Max PDU Length the node announced (plus
  SLACK for sloppy peers) after it. A larger announcement closes the connection without reading it.
- C-STORE, the one message the node receives by the hundred, skips pynetdicom's general DIMSE codec:
  decoding a request's command set with pydicom, building the response as a pydicom data set and
  encoding it (UID validation by regular expression, per element bookkeeping) cost ~2 ms of CPU per
  instance on this machine, more than the durable write. FastDIMSE reads the few group-0000 elements
  of a plain C-STORE-RQ and writes the C-STORE-RSP bytes directly (the same bytes pynetdicom encodes,
  tests/test_network.py); anything else (another command, an element it does not know, a handler
  bound to the DIMSE events) goes through pynetdicom's codec unchanged. pynetdicom's standard logging
  handlers (which copy each received data set once to log "Data Set: Present") are unbound when the
  pynetdicom logger would print nothing anyway.
- Associations the node requests keep pynetdicom's threads, with one fix of its requestor loop
  (ihd_node.dicom_requestor).
- The subclasses replace only the two reactor loops, the PDU read and the C-STORE codec; states, events
  and the other PDU and DIMSE codecs stay pynetdicom's. They rely on pynetdicom 3.0 internals, so
  `adapter_available()` checks for them and falls back to the stock classes (with a log line) on a
  version that lacks them.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import time
import uuid
from io import BytesIO
from typing import Any

import pynetdicom
from pynetdicom import _config as pynetdicom_config
from pynetdicom import _handlers as pynetdicom_handlers
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from ihd_node import __version__, nodelog

# The node's own Implementation Class UID (PS3.7 D.3.3.2): a UUID-derived UID (PS3.5 B.2) fixed for the
# product; the version name changes with each release (at most 16 characters).
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:ihd-node:implementation").int)
IMPLEMENTATION_VERSION_NAME = f"IHD_NODE_{__version__}"[:16]

DEFAULT_MAX_PDU = 262144  # what the node announces by default: big enough that a slice is a few PDUs
MAX_REQUEST_PDU = 1 << 20  # the largest PDU read before an association is accepted (A-ASSOCIATE-RQ)
SLACK = 65536  # tolerated excess over the announced Max PDU Length (some peers count the header too)
_POLL_SECONDS = 0.01  # timers (ARTIM, network idle) are checked at least this often
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)


def set_nodelay(sock: object) -> None:
    """TCP_NODELAY: a C-STORE response (a few dozen bytes) must not wait for Nagle's timer."""
    raw = getattr(sock, "socket", sock)  # AssociationSocket or socket
    if isinstance(raw, socket.socket) and raw.family in (socket.AF_INET, socket.AF_INET6):
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # closed already: nothing to tune
            pass


def identify(ae: pynetdicom.AE) -> None:
    """Announce the node's Implementation Class UID and Version Name instead of pynetdicom's."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME


class FastDUL(DULServiceProvider):
    """DUL reactor that waits on its socket and a wake-up pair instead of sleeping, and bounds PDU reads."""

    def _adapt(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (the reactor has ended)
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wait(self) -> None:
        """Until the peer sent data, something was queued to send, or _POLL_SECONDS passed."""
        sock = getattr(self.socket, "socket", None)
        if sock is None or sock.fileno() < 0:
            time.sleep(0.001)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], _POLL_SECONDS)
        except (OSError, ValueError):  # closed under us: the next loop notices
            return
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def run(self) -> None:
        # Thread.run() calls the target bound in pynetdicom's __init__ (its own run_reactor); this class is
        # swapped in after that, so run() names ours explicitly.
        self.run_reactor()

    def run_reactor(self) -> None:
        """pynetdicom's loop, order of checks unchanged; only the idle sleep became _wait()."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:  # as pynetdicom: abort, bypassing the state machine
                    nodelog.error("dul.error", error=f"{type(exc).__name__}: {exc}")
                    abort = A_ABORT_RQ()
                    abort.source, abort.reason_diagnostic = 0x02, 0x00
                    try:
                        self.socket.send(abort.encode())  # type: ignore[union-attr]
                    finally:
                        self.assoc.is_aborted = True
                        self.assoc.is_established = False
                        self.assoc._kill = True
                        self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    if self.to_provider_queue.empty():
                        self._wait()
                    continue
                self.state_machine.do_action(event)
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _pdu_limit(self) -> int:
        # Sta1-3: no A-ASSOCIATE-AC sent yet (this thread sends it, so a P-DATA read later sees Sta6).
        if self.state_machine.current_state in ("Sta1", "Sta2", "Sta3"):
            return MAX_REQUEST_PDU
        announced = self.assoc.acceptor.maximum_length or 0
        return (announced + SLACK) if announced else 0xFFFFFFFF

    def _recv_into(self, buf: bytearray, start: int) -> int:
        """Fill buf from `start`; returns how many bytes are in it (short when the peer closed)."""
        sock = self.socket.socket  # type: ignore[union-attr]
        view = memoryview(buf)
        got = start
        while got < len(buf):
            n = sock.recv_into(view[got:], len(buf) - got)
            if n == 0:
                break
            got += n
        return got

    def _read_pdu_data(self) -> None:
        """One PDU from the socket: header first, then its announced length if within the limit."""
        try:
            header = bytearray(6)
            if self._recv_into(header, 0) != 6:
                self.event_queue.put("Evt17")  # closed
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                self.event_queue.put("Evt19")
                return
            limit = self._pdu_limit()
            if length > limit:
                peer = self.assoc.requestor.address_info
                nodelog.warning("pdu.too_large", peer=f"{peer.address}:{peer.port}", pdu_type=f"0x{pdu_type:02X}",
                                announced=length, limit=limit,
                                when="before association" if limit == MAX_REQUEST_PDU else "after association")
                self.socket.close()  # type: ignore[union-attr]  # Evt17: nothing of it is read
                return
            data = bytearray(6 + length)
            data[:6] = header
            if self._recv_into(data, 6) != len(data):
                self.event_queue.put("Evt17")
                return
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception:
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


# Group 0000 elements of a C-STORE-RQ the fast path understands (PS3.7 9.3.1.1), by element number.
_STORE_RQ_ELEMENTS = {0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0110: "US", 0x0700: "US", 0x0800: "US",
                      0x1000: "UI"}
_C_STORE_RQ, _C_STORE_RSP, _NO_DATA_SET = 0x0001, 0x8001, 0x0101


def parse_store_request(command: bytes) -> C_STORE | None:
    """The C-STORE primitive of a command set (implicit VR little endian), or None when it is anything else
    than a plain C-STORE-RQ with a data set (the caller then uses pynetdicom's decoder)."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos < len(command):
        if pos + 8 > len(command):
            return None
        group, element, length = struct.unpack_from("<HHL", command, pos)
        pos += 8
        vr = _STORE_RQ_ELEMENTS.get(element)
        if group != 0 or vr is None or element in values or pos + length > len(command):
            return None
        value = bytes(command[pos:pos + length])
        if (vr == "US" and length != 2) or (vr == "UL" and length != 4) or (vr == "UI" and b"\\" in value):
            return None
        values[element] = value
        pos += length
    if (values.get(0x0100) != _C_STORE_RQ.to_bytes(2, "little") or 0x0800 not in values
            or values[0x0800] == _NO_DATA_SET.to_bytes(2, "little")):
        return None
    primitive = C_STORE()
    try:  # the primitive's setters validate as they do for pynetdicom's decoder; a failure: its decoder
        if 0x0110 in values:
            primitive.MessageID = int.from_bytes(values[0x0110], "little")
        if 0x0002 in values:
            primitive.AffectedSOPClassUID = values[0x0002].decode("latin-1").rstrip("\0 ")
        if 0x1000 in values:
            primitive.AffectedSOPInstanceUID = values[0x1000].decode("latin-1").rstrip("\0 ")
        if 0x0700 in values:
            primitive.Priority = int.from_bytes(values[0x0700], "little")
    except (ValueError, TypeError):
        return None
    primitive.DataSet = BytesIO()
    return primitive


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = str(uid).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_store_response(rsp: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP as pynetdicom encodes it, or None for one that carries more than a
    status (error comment, offending element: pynetdicom's encoder then)."""
    if (rsp.MessageIDBeingRespondedTo is None or not isinstance(rsp.Status, int)
            or rsp.ErrorComment is not None or rsp.OffendingElement is not None):
        return None
    body = b""
    if rsp.AffectedSOPClassUID is not None:
        body += _element(0x0002, _uid_value(rsp.AffectedSOPClassUID))
    body += _element(0x0100, struct.pack("<H", _C_STORE_RSP))
    body += _element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo))
    body += _element(0x0800, struct.pack("<H", _NO_DATA_SET))
    body += _element(0x0900, struct.pack("<H", rsp.Status))
    if rsp.AffectedSOPInstanceUID is not None:
        body += _element(0x1000, _uid_value(rsp.AffectedSOPInstanceUID))
    return _element(0x0000, struct.pack("<L", len(body))) + body


class FastDIMSE(DIMSEServiceProvider):
    """DIMSE provider whose C-STORE requests and responses bypass pynetdicom's general codec (see the module
    docstring); every other message, and C-STOREs it does not recognise, take pynetdicom's path."""

    # A complete C-STORE is served in the DUL thread that received it, not handed to the association thread
    # and its response handed back: two thread wake-ups less per instance, which on a loaded CPU each wait
    # for a time slice. The handler only enqueues its response (send_pdu), which this thread then sends.
    inline_store = False
    _store: C_STORE | None = None  # the C-STORE-RQ whose data set is arriving
    _command: bytearray | None = None  # command fragments so far, while no pynetdicom message is open

    def _fast(self, event: Any) -> bool:
        return not self.assoc.get_handlers(event) and not pynetdicom_config.STORE_RECV_CHUNKED_DATASET

    def receive_primitive(self, primitive: P_DATA) -> None:
        if not isinstance(primitive, P_DATA) or not self._fast(evt.EVT_DIMSE_RECV):
            super().receive_primitive(primitive)
            return
        for context_id, data in primitive.presentation_data_value_list:
            self._receive_pdv(context_id, data)

    def _stock(self, context_id: int, data: bytes) -> None:
        one = P_DATA()
        one.presentation_data_value_list.append((context_id, data))
        super().receive_primitive(one)

    def _receive_pdv(self, context_id: int, data: bytes) -> None:
        header = data[0] if data else 0
        if self.message is not None or not data:  # pynetdicom is decoding this message
            self._stock(context_id, data)
            return
        if self._store is not None:
            if header & 1:  # a command fragment inside a data set: let pynetdicom judge it, as before
                self._store = None
                self._stock(context_id, data)
                return
            self._store.DataSet.write(data[1:])  # type: ignore[union-attr]
            if header & 2:  # the last fragment
                store, self._store = self._store, None
                if self.inline_store:  # served here, in the DUL thread (see FastDIMSE)
                    self.assoc._serve_request(store, context_id)
                else:
                    self.msg_queue.put((context_id, store))
            return
        if not header & 1:  # a data fragment without a command: pynetdicom's error path
            self._stock(context_id, data)
            return
        if self._command is None:
            self._command = bytearray()
        self._command += data[1:]
        if not header & 2:
            return
        command, self._command = bytes(self._command), None
        store = parse_store_request(command)
        if store is None:  # not a plain C-STORE-RQ: pynetdicom decodes the whole command set
            self._stock(context_id, b"\x03" + command)
            return
        store._context_id = context_id
        self._store = store

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = (encode_store_response(primitive) if isinstance(primitive, C_STORE)
                   and self._fast(evt.EVT_DIMSE_SENT) else None)
        if command is None or (self.maximum_pdu_size and len(command) + 7 > self.maximum_pdu_size):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)


def quiet_standard_handlers(assoc: Association) -> None:
    """Unbind pynetdicom's standard logging handlers when its logger would print none of their lines."""
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    for event, handler in ((evt.EVT_DIMSE_RECV, pynetdicom_handlers.standard_dimse_recv_handler),
                           (evt.EVT_DIMSE_SENT, pynetdicom_handlers.standard_dimse_sent_handler),
                           (evt.EVT_PDU_RECV, pynetdicom_handlers.standard_pdu_recv_handler),
                           (evt.EVT_PDU_SENT, pynetdicom_handlers.standard_pdu_sent_handler)):
        assoc.unbind(event, handler)


class FastAssociation(Association):
    """Acceptor whose reactor blocks on the DIMSE message queue instead of sleeping 1 ms per look."""

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop with its checks in the same order."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
            if ended(self):
                return


def ended(assoc: Association) -> bool:
    """pynetdicom's checks after each look at the message queue, in its order: a release asked for by the
    peer (answered), an abort, the DUL thread gone, the network idle timeout. True when the association has
    ended and its reactor loop must return. Shared by both reactor loops (FastAssociation here, the
    requestor's in ihd_node.dicom_requestor)."""
    if assoc.is_established and assoc.acse.is_release_requested():
        # Set before the A-RELEASE-RP leaves: the DUL thread sends it at once, and the peer's
        # connection close can then race EVT_RELEASED below; handlers tell it by is_released.
        assoc.is_released = True
        assoc.acse.send_release(is_response=True)
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
    elif assoc.acse.is_aborted():
        assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires, as pynetdicom does
        assoc.is_aborted = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
    elif not assoc.dul.is_alive():
        pass
    elif assoc.dul.idle_timer_expired():
        nodelog.warning("association.network_timeout", seconds=assoc.network_timeout)
        if assoc.network_timeout_response == "A-RELEASE":  # as pynetdicom: release once no send_*() runs
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc.release()
            assoc._is_paused = False
        else:
            assoc.abort()
    else:
        return False
    assoc.kill()
    return True


def adapter_available() -> bool:
    """The pynetdicom internals the adapter relies on are there (pynetdicom 3.0)."""
    dul_needs = ("_process_recv_primitive", "_is_transport_event", "_decode_pdu", "run_reactor", "send_pdu",
                 "kill_dul", "idle_timer_expired")
    assoc_needs = ("_run_reactor", "_serve_request", "kill", "get_handlers", "unbind")
    dimse_needs = ("receive_primitive", "send_msg", "msg_queue", "message", "maximum_pdu_size")
    return (pynetdicom.__version__.startswith("3.")
            and all(hasattr(DULServiceProvider, n) for n in dul_needs)
            and all(hasattr(Association, n) for n in assoc_needs)
            and all(hasattr(DIMSEServiceProvider, n) or n in ("msg_queue", "message") for n in dimse_needs)
            and hasattr(pynetdicom_handlers, "standard_dimse_recv_handler"))


class _Handler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        set_nodelay(self.request)
        if self.server.fast:  # type: ignore[attr-defined]
            assoc.__class__ = FastAssociation  # same state, other methods (no new attributes)
            assoc.dul.__class__ = FastDUL
            assoc.dul._adapt()  # type: ignore[attr-defined]
            assoc.dimse.__class__ = FastDIMSE
            assoc.dimse.inline_store = True  # type: ignore[attr-defined]
            quiet_standard_handlers(assoc)
        return assoc


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's connection handler (see the module docstring)."""

    fast = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _Handler
        super().__init__(*args, **kwargs)


def server_class(fast: bool = True) -> type[NodeServer]:
    """The server class to pass to AE.make_server; the stock reactors when `fast` is off or unavailable."""
    if fast and not adapter_available():
        nodelog.warning("network.adapter_unavailable", pynetdicom=pynetdicom.__version__,
                        note="pynetdicom's own reactors are used: slower intake, unbounded PDU reads")
        fast = False
    return type("NodeServer", (NodeServer,), {"fast": fast})
