"""The node's SCP: C-ECHO and C-STORE, admission checks, and the spool write on the network path.

Why it looks like this:
- A C-STORE handler must answer fast (the PACS waits per instance), so it only validates the UIDs,
  writes the bytes as received (temp file + fsync + rename) and records a row. Pixel data is never
  decoded here.
- Admission (called AE, calling AE, source address, queue limit) is decided in EVT_REQUESTED, so a
  refusal is a proper A-ASSOCIATE-RJ and the log line can name the peer's address and AE title.
- Every storage SOP class is accepted: PACS routing rules often send whole studies, and a refused
  context makes some PACS retry the study for ever. CT Image Storage and (Legacy Converted) Enhanced CT
  are spooled; other classes are answered 0x0000 and recorded as ignored with the reason (README).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Protocol

from pydicom import uid as tsuid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ihd_node import nodelog
from ihd_node.dicom_network import DEFAULT_MAX_PDU, identify, server_class
from ihd_node.imaging.headers import CT_CLASSES
from ihd_node.intake.mpps import MPPS_SOP_CLASS, MppsScp
from ihd_node.intake.spool import Spool, file_preamble, sha256_hex, valid_uid, write_atomic

# Uncompressed, deflated and the common compressed syntaxes (all decodable by pydicom + pylibjpeg).
TRANSFER_SYNTAXES: list[str] = [
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLossless,
    tsuid.JPEGLSLossless,
    tsuid.JPEGLSNearLossless,
    tsuid.JPEG2000Lossless,
    tsuid.JPEG2000,
    tsuid.HTJ2KLossless,
    tsuid.HTJ2KLosslessRPCL,
    tsuid.HTJ2K,
    tsuid.RLELossless,
    tsuid.JPEGBaseline8Bit,  # lossy; accepted because some PACS compress on export
    tsuid.JPEGExtended12Bit,
]

MPPS_TRANSFER_SYNTAXES: list[str] = [tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian]


def accepted_contexts(mpps: bool = True) -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) the SCP accepts: Verification, every storage SOP class and, when
    it is an MPPS SCP (`serve` always is), MPPS. The one list the Receiver and the conformance statement
    read, so the statement cannot describe contexts the node does not accept."""
    contexts = [(str(Verification), [str(t) for t in DEFAULT_TRANSFER_SYNTAXES])]
    contexts += [(str(cx.abstract_syntax), list(TRANSFER_SYNTAXES)) for cx in AllStoragePresentationContexts]
    if mpps:
        contexts.append((MPPS_SOP_CLASS, list(MPPS_TRANSFER_SYNTAXES)))
    return contexts


# DIMSE statuses the handler answers (documented in the README).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk under the watermark, or the database write failed (sender retries)
DATASET_MISMATCH = 0xA900  # required UID missing, or dataset and request disagree
CANNOT_UNDERSTAND = 0xC000  # a UID that is not a valid DICOM UID (path characters, too long)
UNPARSEABLE = 0xC210  # the dataset bytes cannot be parsed
# What each status means, for the log and the conformance statement (one wording for both).
STATUS_MEANINGS: dict[int, str] = {
    SUCCESS: "stored: fsynced in the spool and recorded (also an identical resend, and an object of a class "
             "the node does not analyse, recorded as ignored and not stored)",
    OUT_OF_RESOURCES: "out of resources: free disk under storage.min_free_mb, or the log database write failed "
                      "(the file is kept and re-indexed at start); the sender should retry",
    DATASET_MISMATCH: "data set does not match SOP class: a required UID is missing, the data set's SOP "
                      "Instance/Class UID differ from the request's, or a CT image has no Pixel Data",
    CANNOT_UNDERSTAND: "cannot understand: a UID that is not a valid DICOM UID (path characters, over 64 "
                       "characters); nothing is written",
    UNPARSEABLE: "cannot understand: the data set cannot be parsed or is truncated; nothing is written",
}
# A-ASSOCIATE-RJ (result, source, reason) per refusal (PS3.8 9.3.4): result 1 permanent, 2 transient.
REFUSALS: dict[str, tuple[int, int, int]] = {
    "source address not in node.allowed_addresses": (0x01, 0x01, 0x01),
    "called AE title is not the node's": (0x01, 0x01, 0x07),
    "calling AE title not in node.allowed_calling_aets": (0x01, 0x01, 0x03),
    "analysis queue over analysis.max_queue, or the node is stopping": (0x02, 0x03, 0x02),
}



@dataclass(frozen=True)
class Peer:
    """Who is on the other side of an association."""

    key: str  # our id for the association (uuid4 hex), stored with each instance
    address: str
    port: int
    calling_aet: str
    called_aet: str


@dataclass(frozen=True)
class ReceivedInstance:
    """A C-STORE that reached the node: where it lies (or why it was not spooled) and its UIDs."""

    peer: Peer
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    sha256: str  # of the dataset bytes as received
    size: int
    path: str | None  # spool path; None when not spooled (ignored SOP class)
    ignored_reason: str | None = None
    modality: str = ""
    accession_number: str = ""
    series_description: str = ""
    patient_id: str = ""  # for the audit trail only (never logged elsewhere; never the name)


class Recorder(Protocol):
    """What the receiver needs from the node's database (ihd_node.intake.recorder.DatabaseRecorder)."""

    def event(self, kind: str, message: str, *, level: str = "INFO", peer: Peer | None = None,
              series_uid: str | None = None, study_uid: str | None = None) -> None:
        """Audit row + one log line."""
        ...

    def association_ended(self, peer: Peer, how: str) -> None:
        """`how`: "released" (its series may complete by the quiet rule), "aborted" or "closed" (no release:
        its series may lack instances and wait for evidence or max_wait)."""
        ...

    def instance_received(self, instance: ReceivedInstance) -> None:
        """Record the instance idempotently; raise if it could not be recorded."""
        ...

    def association_refused(self, peer: Peer, reason: str) -> None:
        """An association or TLS handshake refused: a security alert for the audit trail."""
        ...


@dataclass
class Admission:
    """Who may associate; empty lists mean anyone."""

    ae_title: str
    allowed_calling_aets: Sequence[str] = ()
    allowed_networks: Sequence[str] = ()  # IPs or CIDRs
    refuse_reason: Callable[[], str | None] = field(default=lambda: None)  # e.g. analysis queue over limit

    def __post_init__(self) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]

    def address_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:  # ::ffff:10.0.0.1 on dual-stack sockets
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)


DEFER_BYTES = 65536  # values longer than this (pixel data) are not read when the handler parses


def read_received(raw: bytes, transfer_syntax: str) -> Dataset | None:
    """The received data set with long values left unread (pixel data is never copied or decoded here);
    None for a deflated data set (the caller lets pynetdicom inflate it)."""
    ts = tsuid.UID(transfer_syntax)
    if ts == tsuid.DeflatedExplicitVRLittleEndian or not ts.is_transfer_syntax:
        return None
    return read_dataset(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian, defer_size=DEFER_BYTES)


def truncated(ds: Dataset, size: int | None = None) -> str | None:
    """Why the top level of a received data set shows it was cut short, or None.

    pydicom reads a value that runs past the end of the bytes without complaint (it keeps what is there),
    so a file truncated inside an element would otherwise be stored and answered with success. `size`: the
    length of the bytes, for values read_received left unread."""
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)  # a deferred value stays unread
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        if isinstance(elem.value, bytes) and len(elem.value) < elem.length:
            return f"element {elem.tag} declares {elem.length} bytes, only {len(elem.value)} arrived"
        if elem.value is None and size is not None and elem.value_tell + elem.length > size:
            return f"element {elem.tag} declares {elem.length} bytes, only {size - elem.value_tell} arrived"
    return None


def _clean_aet(value: object) -> str:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip()


class _HandshakeInConnectionThread:
    """The server's SSLContext, except that accepting a connection does not do the TLS handshake.

    pynetdicom wraps each accepted socket in its single accept loop, handshake included and with no
    timeout: one client that connects to a TLS port and stays silent would stop the node from accepting
    anyone else. The handshake is done in the connection's own thread instead (Receiver._on_conn_open)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap_socket(self, sock: socket.socket, server_side: bool = True, **_: object) -> ssl.SSLSocket:
        return self.context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)

    def __getattr__(self, name: str) -> object:
        return getattr(self.context, name)


class Receiver:
    """The SCP. `start()` listens in background threads; `stop()` closes the port and open associations."""

    def __init__(self, spool: Spool, recorder: Recorder, admission: Admission, *, host: str = "0.0.0.0",
                 port: int = 11112, ssl_context: ssl.SSLContext | None = None, min_free_bytes: int = 0,
                 max_associations: int = 16, acse_timeout: float = 30, dimse_timeout: float = 60,
                 network_timeout: float = 60, max_pdu: int = DEFAULT_MAX_PDU, mpps: MppsScp | None = None,
                 fast_network: bool = True) -> None:
        self.spool = spool
        self.recorder = recorder
        self.admission = admission
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.handshake_timeout = acse_timeout
        self.read_timeout = network_timeout or None  # a peer silent in the middle of a PDU (_on_conn_open)
        self._unrequested: dict[object, str] = {}  # connections without an A-ASSOCIATE-RQ yet: peer text
        self.min_free_bytes = min_free_bytes
        self._peers: dict[object, Peer] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.mpps = mpps  # also an MPPS SCP (N-CREATE / N-SET) when given

        ae = AE(ae_title=admission.ae_title)
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = max_pdu  # announced, and the bound on what is read (ihd_node.dicom_network)
        identify(ae)
        self.fast_network = fast_network
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = acse_timeout, dimse_timeout, network_timeout
        ae.require_called_aet = False  # checked in _on_requested, which logs who was refused
        for abstract_syntax, syntaxes in accepted_contexts(mpps is not None):
            ae.add_supported_context(abstract_syntax, syntaxes)
        self.ae = ae

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> Receiver:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_ended, ["closed"]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if self.mpps is not None:
            handlers += [(evt.EVT_N_CREATE, self._on_mpps, ["create"]), (evt.EVT_N_SET, self._on_mpps, ["set"])]
        context = _HandshakeInConnectionThread(self.ssl_context) if self.ssl_context else None
        # As AE.start_server(block=False), with the node's server class (TCP_NODELAY, faster, bounded reads).
        self._server = self.ae.make_server((self.host, self.port), ssl_context=context,  # type: ignore[arg-type]
                                           evt_handlers=handlers, server_class=server_class(self.fast_network))
        self.ae._servers.append(self._server)  # its shutdown() removes it from there
        threading.Thread(target=self._server.serve_forever, name=f"ihd-scp-{self.port}", daemon=True).start()
        self.port = int(self._server.server_address[1])
        nodelog.info("scp.listening", ae=self.admission.ae_title, host=self.host, port=self.port,
                     tls="yes" if self.ssl_context else "no")
        return self

    def stop(self) -> None:
        """Stop accepting; open associations are aborted (their senders get no success and resend)."""
        if self._server is not None:
            for assoc in list(self._server.active_associations):
                assoc.abort()
            self._server.shutdown()
            self._server = None
            nodelog.info("scp.stopped", port=self.port)

    # -- helpers -------------------------------------------------------------------------------------
    def _event(self, kind: str, message: str, *, level: str = "INFO", peer: Peer | None = None,
               series_uid: str | None = None, study_uid: str | None = None) -> None:
        try:
            self.recorder.event(kind, message, level=level, peer=peer, series_uid=series_uid,
                                study_uid=study_uid)
        except Exception as exc:  # the database is down: keep the line in the journal at least
            nodelog.error(f"{kind}.unrecorded", message=message, series=series_uid,
                          calling_ae=peer.calling_aet if peer else None,
                          peer=f"{peer.address}:{peer.port}" if peer else None,
                          error=f"{type(exc).__name__}: {exc}")

    def _refused(self, peer: Peer, reason: str) -> None:
        try:
            self.recorder.association_refused(peer, reason)
        except Exception as exc:  # the database is down: the journal line above names the peer
            nodelog.error("audit.unrecorded", what="association refused", error=f"{type(exc).__name__}: {exc}")

    def _peer(self, event: evt.Event) -> Peer | None:
        with self._lock:
            return self._peers.get(event.assoc)

    # -- association events --------------------------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        nodelog.debug("conn.open", peer=f"{event.address[0]}:{event.address[1]}")
        with self._lock:
            self._unrequested[event.assoc] = f"{event.address[0]}:{event.address[1]}"
        # pynetdicom reads a whole PDU with blocking recv() and accepted sockets have no timeout: a peer that
        # stops inside a PDU (garbage, an HTTP request, a PDU length it never sends) would hold the
        # connection's thread and an association slot for ever. With a timeout the read fails and it closes.
        event.assoc.dul.socket.socket.settimeout(self.read_timeout)
        sock = event.assoc.dul.socket.socket if self.ssl_context else None
        if not isinstance(sock, ssl.SSLSocket):
            return
        try:  # in this connection's thread, bounded by the ACSE timeout (see _HandshakeInConnectionThread)
            sock.settimeout(self.handshake_timeout)
            sock.do_handshake()
            sock.settimeout(self.read_timeout)  # idle waits poll with select(); this bounds a stalled PDU
        except (OSError, ValueError) as exc:
            peer = Peer("", str(event.address[0]), int(event.address[1]), "", "")
            reason = (f"nothing within {self.handshake_timeout:g} s" if isinstance(exc, TimeoutError)
                      else getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
            self._event("rejected", f"TLS handshake failed: {reason}", level="WARNING", peer=peer)
            self._refused(peer, f"TLS handshake failed: {reason}")
            with self._lock:  # logged here once; not again as a connection without an association
                self._unrequested.pop(event.assoc, None)
            event.assoc.dul.socket.close()  # the association ends without an A-ASSOCIATE (Evt17)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._unrequested.pop(assoc, None)
        rq = assoc.requestor
        calling = _clean_aet(rq.primitive.calling_ae_title)
        called = _clean_aet(rq.primitive.called_ae_title)
        peer = Peer(uuid.uuid4().hex, str(rq.address), int(rq.port), calling, called)
        # (result, source, diagnostic): result 1 = permanent, 2 = transient (PS3.8 9.3.4).
        refusal: tuple[str, tuple[int, int, int]] | None = None
        address, called_rj, calling_rj, busy_rj = REFUSALS.values()
        if not self.admission.address_allowed(peer.address):
            refusal = (f"source address {peer.address} is not allowed", address)
        elif called != self.admission.ae_title:
            refusal = (f"called AE title {called!r} is not {self.admission.ae_title!r}", called_rj)
        elif self.admission.allowed_calling_aets and calling not in self.admission.allowed_calling_aets:
            refusal = (f"calling AE title {calling!r} is not allowed", calling_rj)
        else:
            busy = self.admission.refuse_reason()
            if busy:
                refusal = (f"local limit exceeded: {busy}", busy_rj)
        if refusal:
            reason, rsd = refusal
            self._event("rejected", f"association refused: {reason}", level="WARNING", peer=peer)
            self._refused(peer, f"association refused: {reason}")
            assoc.acse.send_reject(*rsd)
            assoc.kill()  # as pynetdicom's own rejections do: waits until the A-ASSOCIATE-RJ has gone out
            return
        with self._lock:
            self._peers[assoc] = peer

    def _on_accepted(self, event: evt.Event) -> None:
        peer = self._peer(event)
        if peer is not None:
            self._event("association", f"accepted id={peer.key[:8]} port={peer.port} "
                        f"contexts={len(event.assoc.accepted_contexts)}", peer=peer)

    def _on_ended(self, event: evt.Event, how: str) -> None:
        if how == "closed" and getattr(event.assoc, "is_released", False):
            how = "released"  # the close overtook EVT_RELEASED (ihd_node.dicom_network.FastAssociation)
        with self._lock:
            peer = self._peers.pop(event.assoc, None)
            unrequested = self._unrequested.pop(event.assoc, None)
        if unrequested is not None:  # log only: port scans would otherwise fill the events table
            nodelog.warning("conn.closed_without_association", peer=unrequested,
                            reason="no valid A-ASSOCIATE-RQ (not a DICOM peer, garbage, or it went silent)")
        if peer is None:  # rejected, or already ended (a release is followed by the connection close)
            return
        try:
            self.recorder.association_ended(peer, how)
        except Exception as exc:  # the assembler's max-wait rule still completes its series
            nodelog.error("association.unrecorded", id=peer.key[:8], how=how,
                          error=f"{type(exc).__name__}: {exc}")
        # A release pops the peer before its connection closes, so "closed" here means no A-RELEASE.
        what = "closed without release (aborted or dropped)" if how == "closed" else how
        self._event("association", f"{what} id={peer.key[:8]}", peer=peer)

    # -- DIMSE ---------------------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        peer = self._peer(event)
        nodelog.info("echo", calling_ae=peer.calling_aet if peer else None)
        return SUCCESS

    def _on_mpps(self, event: evt.Event, what: str) -> tuple[int, Dataset | None]:
        peer = self._peer(event)
        if peer is None or self.mpps is None:
            return 0x0110, None
        try:
            handler = self.mpps.on_create if what == "create" else self.mpps.on_set
            return handler(event, peer.calling_aet)
        except Exception as exc:  # a damaged request or the database: answer a failure, log why
            self._event("error", f"MPPS N-{what.upper()} failed: {type(exc).__name__}: {exc}; answered 0x0110",
                        level="ERROR", peer=peer)
            return 0x0110, None

    def _on_store(self, event: evt.Event) -> int:
        peer = self._peer(event)
        if peer is None:  # cannot happen for an accepted association; refuse rather than guess
            return OUT_OF_RESOURCES
        try:
            return self._store(event, peer)
        except Exception as exc:  # pynetdicom would answer 0xC211; log and ask the sender to retry instead
            self._event("error", f"C-STORE failed: {type(exc).__name__}: {exc}; answered 0xA700",
                        level="ERROR", peer=peer)
            return OUT_OF_RESOURCES

    def _refuse(self, peer: Peer, status: int, reason: str, series_uid: str | None = None) -> int:
        self._event("rejected", f"C-STORE refused with 0x{status:04X}: {reason}", level="WARNING", peer=peer,
                    series_uid=series_uid)
        return status

    def _store(self, event: evt.Event, peer: Peer) -> int:
        rq = event.request
        rq_class, rq_sop = str(rq.AffectedSOPClassUID or ""), str(rq.AffectedSOPInstanceUID or "")
        if self.min_free_bytes and self.spool.free_bytes() < self.min_free_bytes:
            return self._refuse(peer, OUT_OF_RESOURCES, "free disk space is under storage.min_free_mb")

        raw = rq.DataSet.getvalue()
        try:
            ds = read_received(raw, str(event.context.transfer_syntax))
            if ds is None:
                ds = event.dataset  # deflated: pynetdicom inflates it
            cut = truncated(ds, len(raw))
            if cut:
                return self._refuse(peer, UNPARSEABLE, f"the dataset is truncated: {cut}")
            if raw and not len(ds):  # what pydicom returns for a cut inside an undefined-length element
                return self._refuse(peer, UNPARSEABLE, "no element could be read (truncated, or not DICOM)")
            values = {k: str(ds.get(k, "") or "") for k in (
                "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                "AccessionNumber", "SeriesDescription", "PatientID")}
        except Exception as exc:
            return self._refuse(peer, UNPARSEABLE, f"dataset cannot be parsed ({type(exc).__name__})")
        sop_uid, series_uid, study_uid = (values["SOPInstanceUID"], values["SeriesInstanceUID"],
                                          values["StudyInstanceUID"])
        for name in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not values[name]:
                return self._refuse(peer, DATASET_MISMATCH, f"{name} is missing")
        for name, value in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                            ("SeriesInstanceUID", series_uid), ("AffectedSOPInstanceUID", rq_sop)):
            if not valid_uid(value):
                return self._refuse(peer, CANNOT_UNDERSTAND, f"{name} {value[:80]!r} is not a valid UID")
        if sop_uid != rq_sop or (values["SOPClassUID"] and values["SOPClassUID"] != rq_class):
            return self._refuse(peer, DATASET_MISMATCH,
                                "SOP Instance/Class UID of the dataset differ from the request's", series_uid)

        sha = sha256_hex(raw)
        ignored = None if rq_class in CT_CLASSES else (
            f"SOP class {rq_class} is not CT Image Storage or Enhanced CT Image Storage")
        path = None
        if ignored is None and "PixelData" not in ds:  # also what a cut in a pixel data header leaves
            return self._refuse(peer, DATASET_MISMATCH, "CT Image Storage instance without Pixel Data "
                                "(truncated, or not an image)", series_uid)
        if ignored is None:
            target = self.spool.path_for(study_uid, series_uid, sop_uid, sha)
            if not target.exists():  # identical bytes already spooled: nothing to write (idempotent)
                rq_ts = str(event.context.transfer_syntax)
                write_atomic(target, file_preamble(rq_class, rq_sop, rq_ts) + raw)  # as encoded_dataset()
            path = str(target)

        instance = ReceivedInstance(
            peer=peer, sop_class_uid=rq_class, sop_instance_uid=sop_uid, study_instance_uid=study_uid,
            series_instance_uid=series_uid, transfer_syntax_uid=str(event.context.transfer_syntax),
            sha256=sha, size=len(raw), path=path, ignored_reason=ignored, modality=values["Modality"],
            accession_number=values["AccessionNumber"], series_description=values["SeriesDescription"],
            patient_id=values["PatientID"])
        try:
            self.recorder.instance_received(instance)
        except Exception as exc:
            # The file is on disk; start-up recovery re-indexes it. Ask the sender to retry meanwhile.
            nodelog.error("store.unrecorded", sop=sop_uid, series=series_uid, status="0xA700",
                          error=f"{type(exc).__name__}: {exc}")
            return OUT_OF_RESOURCES
        return SUCCESS
