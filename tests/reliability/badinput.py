"""Helpers for the bad-input tests: small CT slices, raw C-STORE of undecodable bytes, socket garbage.

Raw C-STORE: pynetdicom sends a file's dataset bytes without decoding them when
`_config.STORE_SEND_CHUNKED_DATASET` is on and `send_c_store` gets a path. We write a valid file meta
header in front of whatever bytes we want to send, so the node receives exactly those bytes as the
C-STORE data set (truncated files, garbage, wrong encodings).
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

from ihd_node.dicom_requestor import on_outgoing_connection

# What the README documents for C-STORE (DICOM behaviour section).
SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND, UNPARSEABLE = 0x0000, 0xA700, 0xA900, 0xC000, 0xC210
DOCUMENTED_STATUSES = {SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND, UNPARSEABLE}
STUDY_ROOT = "1.2.826.0.1.3680043.8.498"


def ct_slice(
    series_uid: str,
    index: int,
    *,
    study_uid: str,
    size: int = 32,
    sop_uid: str | None = None,
    seed: int = 0,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
) -> Dataset:
    """A small, complete CT Image Storage instance (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "Bad^Input", "BI1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [0, 0, 5.0 * index]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 5.0
    ds.InstanceNumber = index + 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    rng = np.random.default_rng(seed * 1000 + index)
    ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
    return ds


def body_bytes(ds: Dataset, implicit: bool = False) -> bytes:
    """The data set as it travels in a C-STORE (no file meta)."""
    data = encode(ds, implicit, True)
    assert data is not None
    return data


def meta_file(folder: Path, body: bytes, *, sop_class: str, sop_uid: str, ts: str) -> Path:
    """A file = preamble + file meta (naming class, instance, syntax) + `body` verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    fd, name = tempfile.mkstemp(suffix=".dcm", dir=folder)
    with open(fd, "wb") as f:
        f.write(buf.getvalue() + body)
    return Path(name)


class Sender:
    """One association to the node; stores datasets or raw bytes, returns the DIMSE status (None = none)."""

    def __init__(
        self,
        port: int,
        contexts: Sequence[tuple[str, Sequence[str]]],
        *,
        called: str,
        calling: str = "BADINPUT",
        folder: Path | None = None,
    ) -> None:
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, list(syntaxes))
        self.assoc = ae.associate("127.0.0.1", port, ae_title=called,  # the requestor loop that loses no response
                                  evt_handlers=[(evt.EVT_CONN_OPEN, on_outgoing_connection)])
        self.folder = folder or Path(tempfile.mkdtemp(prefix="badinput-"))

    @property
    def ok(self) -> bool:
        return bool(self.assoc.is_established)

    def accepted(self, abstract: str, ts: str) -> bool:
        return any(
            cx.abstract_syntax == abstract and cx.transfer_syntax[0] == ts
            for cx in self.assoc.accepted_contexts
        )

    def store(self, ds: Dataset) -> int | None:
        answer = self.assoc.send_c_store(ds)
        return int(answer.Status) if "Status" in answer else None

    def store_raw(self, body: bytes, *, sop_class: str, sop_uid: str, ts: str) -> int | None:
        path = meta_file(self.folder, body, sop_class=sop_class, sop_uid=sop_uid, ts=ts)
        before = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes after the file meta as they are
        try:
            answer = self.assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = before
            path.unlink(missing_ok=True)
        return int(answer.Status) if "Status" in answer else None

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def abort(self) -> None:
        if self.assoc.is_established:
            self.assoc.abort()


@contextmanager
def sender(
    port: int,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    called: str,
    calling: str = "BADINPUT",
    folder: Path | None = None,
) -> Iterator[Sender]:
    s = Sender(port, contexts, called=called, calling=calling, folder=folder)
    assert s.ok, "association to the node was not established"
    try:
        yield s
    finally:
        s.release()


def contexts(abstract: str, *syntaxes: str) -> list[tuple[str, list[str]]]:
    """One presentation context per transfer syntax, so raw bytes can name their exact encoding."""
    return [(abstract, [ts]) for ts in (syntaxes or (ExplicitVRLittleEndian, ImplicitVRLittleEndian))]


def echo_ok(port: int, called: str) -> bool:
    """The node still answers a C-ECHO (it keeps serving)."""
    ae = AE(ae_title="BADINPUT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        answer = assoc.send_c_echo()
        return "Status" in answer and int(answer.Status) == 0
    finally:
        assoc.release()


def poke(port: int, data: bytes, seconds: float = 15.0) -> tuple[bool, bytes]:
    """Send raw bytes to the DICOM port; (closed by the node within `seconds`, what it answered)."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True, reply
            except TimeoutError:
                return False, reply
            if not chunk:
                return True, reply
            reply += chunk
    return False, reply


class Tally:
    """Counts per class of bad input and per answer, printed for docs/reliability-bad-input.md."""

    def __init__(self) -> None:
        self.answers: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, cls: str, answer: str) -> None:
        self.answers[cls][answer] += 1

    def lines(self) -> list[str]:
        out = ["| class | tried | answered |", "|---|---|---|"]
        for cls, counts in self.answers.items():
            what = "; ".join(f"{answer}: {n}" for answer, n in counts.most_common())
            out.append(f"| {cls} | {sum(counts.values())} | {what} |")
        return out


def status_name(status: int | None) -> str:
    if status is None:
        return "no answer"
    names = {
        SUCCESS: "0x0000",
        MISMATCH: "0xA900 refused (UID missing/mismatch or no pixel data)",
        CANNOT_UNDERSTAND: "0xC000 refused (invalid UID)",
        UNPARSEABLE: "0xC210 refused (cannot parse)",
        OUT_OF_RESOURCES: "0xA700 out of resources",
    }
    return names.get(status, f"0x{status:04X}")
