"""A small receiving PACS (C-STORE SCP writing files to a folder), for the demo, tests and benchmarks.

It is not part of the node; it stands in for the hospital PACS where no real one (Orthanc) is used.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ihd_node.dicom_requestor import on_outgoing_connection


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ReceivedObject:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    received_at: float


@dataclass
class MiniPACS:
    """Stores every object it receives as <folder>/<SOPInstanceUID>.dcm and remembers when it came."""

    folder: Path
    ae_title: str = "MINIPACS"
    port: int = 0
    host: str = "127.0.0.1"
    status: int = 0x0000  # answer to every C-STORE; set to a failure code to play a refusing PACS
    received: list[ReceivedObject] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event) -> int:
        if self.status != 0x0000:
            return self.status
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(ReceivedObject(
                path=path, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                received_at=time.time()))
        return 0x0000

    def start(self) -> MiniPACS:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def objects(self, study_instance_uid: str | None = None) -> list[ReceivedObject]:
        with self._lock:
            return [o for o in self.received if study_instance_uid in (None, o.study_instance_uid)]

    def __enter__(self) -> MiniPACS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def send_datasets(datasets: list[Dataset], *, host: str, port: int, called_aet: str,
                  calling_aet: str = "MINIPACS", tls_args=None, timeout: float = 30.0,
                  barrier: threading.Barrier | None = None) -> list[int]:
    """Send data sets over one association, as a PACS routing a study would; the DIMSE status of each
    (-1 where no status came back).

    With `barrier`, the association waits after it is open until the barrier's other parties are open
    too, so that several senders really overlap (a failed association aborts the barrier).
    """
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    syntaxes: dict[str, set[str]] = {}
    for ds in datasets:  # offer each SOP class in the transfer syntaxes the data sets are encoded in
        syntaxes.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, transfer_syntaxes in sorted(syntaxes.items()):
        ae.add_requested_context(sop_class, sorted(transfer_syntaxes))
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_outgoing_connection)])
    if not assoc.is_established:
        if barrier is not None:
            barrier.abort()
        raise ConnectionError(f"association to {called_aet}@{host}:{port} was not established")
    statuses = []
    try:
        if barrier is not None:
            barrier.wait(timeout=timeout)
        for ds in datasets:
            if not assoc.is_established:  # the peer aborted it (e.g. its idle timeout): say so, not pynetdicom's
                raise ConnectionError(f"association to {called_aet}@{host}:{port} was aborted after "
                                      f"{len(statuses)} of {len(datasets)} instances")
            answer = assoc.send_c_store(ds)
            statuses.append(int(answer.Status) if "Status" in answer else -1)
    finally:
        assoc.release()
    return statuses


def send_files(paths: list[Path], *, host: str, port: int, called_aet: str, calling_aet: str = "MINIPACS",
               tls_args=None) -> list[int]:
    """Send files over one association (see send_datasets)."""
    import pydicom

    return send_datasets([pydicom.dcmread(p) for p in paths], host=host, port=port, called_aet=called_aet,
                         calling_aet=calling_aet, tls_args=tls_args)
