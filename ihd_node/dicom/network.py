"""The node's network layer under pynetdicom: who the node says it is, socket options, and a faster
and bounded receive path for the associations it accepts.

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
- The subclasses replace only the two reactor loops and the PDU read; states, events and PDU codecs
  stay pynetdicom's. They rely on pynetdicom 3.0 internals, so `adapted()` checks for them and falls back
  to the stock classes (with a log line) on a version that lacks them.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import struct
import time
import uuid
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
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


def on_outgoing_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations the node requests (sender): TCP_NODELAY on its socket."""
    if event.assoc.dul.socket is not None:
        set_nodelay(event.assoc.dul.socket)


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
            if self.is_established and self.acse.is_release_requested():
                # Set before the A-RELEASE-RP leaves: the DUL thread sends it at once, and the peer's
                # connection close can then race EVT_RELEASED below; handlers tell it by is_released.
                self.is_released = True
                self.acse.send_release(is_response=True)
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires, as pynetdicom does
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                nodelog.warning("association.network_timeout", seconds=self.network_timeout)
                self.abort()
                self.kill()
                return


def adapter_available() -> bool:
    """The pynetdicom internals the adapter relies on are there (pynetdicom 3.0)."""
    dul_needs = ("_process_recv_primitive", "_is_transport_event", "_decode_pdu", "run_reactor", "send_pdu",
                 "kill_dul", "idle_timer_expired")
    assoc_needs = ("_run_reactor", "_serve_request", "kill")
    return (pynetdicom.__version__.startswith("3.")
            and all(hasattr(DULServiceProvider, n) for n in dul_needs)
            and all(hasattr(Association, n) for n in assoc_needs))


class _Handler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        set_nodelay(self.request)
        if self.server.fast:  # type: ignore[attr-defined]
            assoc.__class__ = FastAssociation  # same state, other methods (no new attributes)
            assoc.dul.__class__ = FastDUL
            assoc.dul._adapt()  # type: ignore[attr-defined]
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
