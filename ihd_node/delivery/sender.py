"""C-STORE SCU for results, driven by the durable outbox in the database; and `ihd-node echo`.

Delivery policy (ihd_node.store.database.classify_status books each answer; documented in the README):
- 0x0000, 0x0001 and warnings 0xBxxx (0xB000, 0xB006, 0xB007) = sent.
- 0xA7xx (out of resources: the PACS disk is full) and no answer at all (connection refused, timeout,
  A-ASSOCIATE-RJ, abort, connection lost) = retried with exponential backoff from
  delivery.retry_initial_seconds to retry_max_seconds; failed with the last reason once the object has
  waited give_up_after_seconds.
- Any other status (0xA9xx, 0xCxxx, 0x0122, 0x0124, 0x0110, ...) = rejected at once: the PACS has looked
  at the object and said no, and sending the same bytes again cannot change that, so there is no loop.
- The destination accepts the association but not the object's SOP class: booked as 0x0122 (SOP class
  not supported), i.e. rejected; a result file that cannot be read: booked as 0x0110, rejected.
- An SR is offered in the destination's `sr_class` and every simpler SR class in the same association;
  it goes out as the best class the destination accepted (a re-labelled copy with its own UID), and the
  log database records which.
One association per destination carries all objects that are due for it.

Destinations of the other kinds (hl7, fhir, dicomweb) are sent by ihd_node.delivery.dispatch and booked
here the same way. Each destination is sent in its own thread: an EHR that takes its 30 s timeout, or a
RIS that is down, never holds the PACS copy (the loop does not wait for a busy destination, it skips it).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom import uid as tsuid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyFind
from pynetdicom.sop_class import Verification

from ihd_node import faults, nodelog
from ihd_node.config import Config
from ihd_node.delivery.tls import tls_client_context
from ihd_node.dicom_network import identify
from ihd_node.dicom_requestor import on_outgoing_connection
from ihd_node.sr_classes import SR_CLASS_NAMES, SR_CLASSES, as_sr_class, sr_fallbacks
from ihd_node.store import AttemptResult, Database, Delivery, utcnow

NOT_SUPPORTED = 0x0122  # booked when the destination did not accept the SOP class's presentation context
PROCESSING_FAILURE = 0x0110  # booked when a result file cannot be read


@dataclass(frozen=True)
class SendResult:
    """One object's answer: the DIMSE status (None = no answer) and what happened in words."""

    path: Path
    status: int | None
    detail: str
    sent_as: str = ""  # for an SR sent as another class than its file's: that class's name
    sent_uid: str = ""  # and the SOP Instance UID it went out with


class NoAssociation(Exception):
    """The destination could not be reached or refused the association (transient for the outbox)."""


def describe(status: int | None) -> str:
    if status is None:
        return "no answer"
    if status == 0x0000:
        return "success"
    kind = ("warning" if 0xB000 <= status <= 0xBFFF else "out of resources" if 0xA700 <= status <= 0xA7FF
            else "failure")
    return f"{kind} 0x{status:04X}"


# Transfer syntaxes offered for every object after its file's own (ihd_node.conformance documents them).
FALLBACK_SYNTAXES: tuple[str, ...] = (tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian)
ECHO_CONTEXTS: list[tuple[str, list[str]]] = [(str(Verification), [tsuid.ImplicitVRLittleEndian])]
COUNT_CONTEXTS: list[tuple[str, list[str]]] = [(str(StudyFind), [tsuid.ExplicitVRLittleEndian,
                                                                  tsuid.ImplicitVRLittleEndian])]


def requested_contexts(objects: Sequence[tuple[str, str]], sr_class: str = "comprehensive3d"
                       ) -> list[tuple[str, list[str]]]:
    """The presentation contexts the SCU proposes for objects given as (SOP class, file transfer syntax).

    One context per transfer syntax, the file's own first: the destination then accepts the file's syntax
    where it can, and the object goes out as written. With all syntaxes in one context the acceptor picks
    one (pynetdicom's own list puts Implicit VR first) and pynetdicom re-encodes the object on the way:
    every element decoded, ~6 s for the 68,000-element SR of a 300-slice study. An SR is offered in
    `sr_class` and every simpler SR class (sr_fallbacks)."""
    sr_offer = sr_fallbacks(sr_class)
    contexts: list[tuple[str, list[str]]] = []
    for sop_class, own in objects:
        syntaxes = [own] + [t for t in FALLBACK_SYNTAXES if t != own]
        classes = [SR_CLASSES[c] for c in sr_offer] if sop_class in SR_CLASSES.values() else [sop_class]
        for abstract_syntax in classes:
            for syntax in syntaxes:
                if (abstract_syntax, [syntax]) not in contexts:
                    contexts.append((abstract_syntax, [syntax]))
    return contexts


def _associate(calling_aet: str, dest: object, contexts: Sequence[tuple[str, list[str]]]):
    ae = AE(ae_title=calling_aet)
    identify(ae)
    timeout = float(getattr(dest, "timeout", 30.0))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    context = tls_client_context(getattr(dest, "tls", None))
    tls_args = (context, str(dest.host)) if context else None
    try:
        assoc = ae.associate(str(dest.host), int(dest.port), ae_title=str(dest.ae_title), tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_outgoing_connection)])
    except (OSError, ssl.SSLError) as exc:
        raise NoAssociation(f"cannot connect: {exc}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        detail = f"result {rsp.result_str}, source {rsp.source_str}, reason {rsp.reason_str}" if rsp else ""
        raise NoAssociation(f"association rejected ({detail})")
    if assoc.is_aborted and assoc.acceptor.primitive is None:  # pynetdicom reports a failed connect this way
        raise NoAssociation(f"cannot connect to {dest.host}:{dest.port} (refused, unreachable or timed out)")
    if assoc.is_aborted:
        raise NoAssociation("association aborted by the destination")
    raise NoAssociation(f"no association with {dest.ae_title}@{dest.host}:{dest.port} (refused or timed out)")


def send_files(calling_aet: str, dest: object, paths: Sequence[Path],
               on_result: Callable[[SendResult], None] | None = None) -> list[SendResult]:
    """Send files over one association; raises NoAssociation when none could be made.

    A connection lost half-way marks the unsent objects 'retry'. `on_result` is called with each answer as
    soon as it is known (the outbox books it at once, so a crash later in the batch resends only the
    object in flight, not the ones already answered).
    """
    datasets = []
    results: list[SendResult] = []

    def add(result: SendResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    for path in paths:
        try:
            datasets.append((Path(path), pydicom.dcmread(path)))
        except Exception as exc:  # a damaged result file cannot become good by retrying
            add(SendResult(Path(path), PROCESSING_FAILURE, f"result file unreadable: {exc}"))
    sr_class = str(getattr(dest, "sr_class", "comprehensive3d"))
    sr_offer = sr_fallbacks(sr_class)
    contexts = requested_contexts([(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets],
                                  sr_class)
    if not datasets:
        return results
    assoc = _associate(calling_aet, dest, contexts)
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for path, ds in datasets:
            sent_as = ""
            if str(ds.SOPClassUID) in SR_CLASSES.values():
                usable = [c for c in sr_offer if SR_CLASSES[c] in accepted]
                if usable and SR_CLASSES[usable[0]] != str(ds.SOPClassUID):
                    ds = as_sr_class(ds, usable[0])
                    sent_as = usable[0]
            if str(ds.SOPClassUID) not in accepted:
                offered = ", ".join(SR_CLASS_NAMES[c] for c in sr_offer) \
                    if str(ds.SOPClassUID) in SR_CLASSES.values() else str(ds.SOPClassUID)
                add(SendResult(path, NOT_SUPPORTED, f"destination refused SOP class {offered} (nothing sent)"))
                continue
            if not assoc.is_established:
                add(SendResult(path, None, "association lost during the send"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except Exception as exc:
                add(SendResult(path, None, f"send failed: {type(exc).__name__}: {exc}"))
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if status == 0x0000:
                faults.point("delivery.stored")
            add(SendResult(path, status, describe(status) if status is not None
                           else "no response (timeout or connection lost)", sent_as=sent_as,
                           sent_uid=str(ds.SOPInstanceUID) if sent_as else ""))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def echo(calling_aet: str, dest: object) -> tuple[bool, str]:
    """C-ECHO one destination: (ok, what happened)."""
    started = time.perf_counter()
    try:
        assoc = _associate(calling_aet, dest, ECHO_CONTEXTS)
    except NoAssociation as exc:
        return False, str(exc)
    try:
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()
    if status != 0x0000:
        return False, "no C-ECHO response" if status is None else f"C-ECHO status 0x{status:04X}"
    return True, f"{(time.perf_counter() - started) * 1000:.0f} ms"


def series_count_query(study_uid: str, series_uid: str) -> Any:
    """The C-FIND identifier of the completion check's instance count (also what its audit message shows)."""
    from pydicom.dataset import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.NumberOfSeriesRelatedInstances = ""
    return query


def encoded_query(query: Any) -> bytes:
    """The identifier as sent (Explicit VR Little Endian), for the audit message's ParticipantObjectQuery."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, query)
    return buffer.getvalue()


def count_series_instances(dest: object, calling_aet: str, study_uid: str, series_uid: str) -> int | None:
    """NumberOfSeriesRelatedInstances the destination reports for one series (Study Root C-FIND, SERIES
    level); 0 when it does not know the series, None when it cannot be asked (logged)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyFind

    query = series_count_query(study_uid, series_uid)
    try:
        assoc = _associate(calling_aet, dest, COUNT_CONTEXTS)
    except NoAssociation as exc:
        nodelog.warning("count.no_association", destination=getattr(dest, "name", "?"), error=str(exc))
        return None
    counts: list[int] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyFind):
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None or code not in (0x0000, 0xFF00, 0xFF01):
                nodelog.warning("count.failed", destination=getattr(dest, "name", "?"),
                                status="no answer" if code is None else f"0x{code:04X}")
                return None
            if code in (0xFF00, 0xFF01) and identifier is not None:
                value = identifier.get("NumberOfSeriesRelatedInstances")
                if value not in (None, ""):
                    counts.append(int(value))
    finally:
        if assoc.is_established:
            assoc.release()
    return max(counts, default=0)


class Outbox:
    """Delivers due outbox rows, one thread (and one association) per destination, and books every attempt."""

    def __init__(self, db: Database, config: Config, wake: Callable[[], None] | None = None) -> None:
        self.db = db
        self.config = config
        self.wake = wake  # called when a destination's send ends: its next rows may be due at once
        self._busy: set[str] = set()
        self._settled: dict[str, list[tuple[Delivery, str, str | None]]] = {}  # destination -> this pass
        self._lock = threading.Lock()

    def run_once(self, now: datetime | None = None, wait: bool = True) -> int:
        """One pass over the due rows: each destination's rows in a thread of their own (the destination
        with the oldest due row first: a result's HL7/FHIR message rows are queued before its SR). With
        `wait` false (the delivery loop) a destination still busy from an earlier pass is left alone and the
        pass returns at once; returns how many rows were handed to a send (with wait: booked)."""
        due = self.db.due_deliveries(now=now)
        by_dest: dict[str, list[Delivery]] = {}
        for row in due:
            by_dest.setdefault(row.destination, []).append(row)
        threads = []
        handed = 0
        for name, rows in by_dest.items():
            with self._lock:
                if name in self._busy:
                    continue
                self._busy.add(name)
            handed += len(rows)
            thread = threading.Thread(target=self._deliver_then_free, args=(name, rows),
                                      name=f"ihd-send-{name}", daemon=True)
            thread.start()
            threads.append(thread)
        if wait:
            for thread in threads:
                thread.join()
        return handed

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._busy)

    def _deliver_then_free(self, name: str, rows: list[Delivery]) -> None:
        try:
            self._deliver(name, rows)
        except Exception as exc:  # noqa: BLE001 - the loop must live on; the rows stay due and are retried
            nodelog.error("delivery.send_failed", destination=name, error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._busy.discard(name)
            if self.wake is not None:
                self.wake()

    def _deliver(self, name: str, rows: list[Delivery]) -> int:
        # Answers that are not "sent" are logged once per destination and pass, not once per object: a PACS
        # outage is one problem, and 16 captures x every retry drowned the journal (issue 7 item 16).
        problems: list[tuple[Delivery, AttemptResult, str | None]] = []
        with self._lock:
            self._settled[name] = []  # what _book booked in this pass, for its audit messages
        try:
            self._deliver_rows(name, rows, problems)
        finally:
            self._log_problems(name, problems)
            with self._lock:
                settled = self._settled.pop(name, [])
            self._audit_pass(name, settled)
        return len(rows)

    def _audit_pass(self, name: str, settled: list[tuple[Delivery, str, str | None]]) -> None:
        """Per study, what this pass delivered to (or gave up on at) `name`: IHE ATNA audit messages."""
        from ihd_node.delivery.audited import settled_events

        try:
            dest = self.config.destination(name)
        except KeyError:
            return
        for event in settled_events(dest, settled):
            self.db.audit(event)

    def _deliver_rows(self, name: str, rows: list[Delivery],
                      problems: list[tuple[Delivery, AttemptResult, str | None]]) -> None:
        def book_one(row: Delivery, status: int | None, error: str | None, seconds: float,
                     now: datetime | None = None, sent_as: str = "", sent_uid: str = "") -> None:
            res = self._book(row, status, error, seconds, now, sent_as=sent_as, sent_uid=sent_uid)
            if res.delivery_status != "sent":
                problems.append((row, res, error))

        try:
            dest = self.config.destination(name)
        except KeyError:
            now = utcnow()
            for row in rows:  # an admin may put it back; until then it is retried, then fails
                book_one(row, None, f"destination {name!r} is no longer in the config", 0.0, now)
            return
        if dest.kind != "dicom":
            self._dispatch(dest, rows, problems)
            return
        started = last = time.perf_counter()
        by_path = {str(Path(r.path)): r for r in rows}
        booked: set[int] = set()

        def book(result: SendResult) -> None:
            # Booked as each answer comes: the outbox row says "sent" as soon as the PACS has the object.
            nonlocal last
            row = by_path.get(str(result.path))
            if row is None or row.id in booked:
                return
            now = time.perf_counter()
            seconds, last = now - last, now
            booked.add(row.id)
            book_one(row, result.status, None if result.status == 0 else result.detail, seconds,
                     sent_as=result.sent_as, sent_uid=result.sent_uid)

        try:
            send_files(self.config.node.ae_title, dest, [Path(r.path) for r in rows], on_result=book)
        except NoAssociation as exc:
            seconds = time.perf_counter() - started
            now = utcnow()  # one time for the batch: its rows stay due together, one retry pass each time
            for row in rows:
                if row.id not in booked:
                    book_one(row, None, str(exc), seconds, now)
            return
        for row in rows:
            if row.id not in booked:
                book_one(row, None, "not attempted", 0.0)

    def _dispatch(self, dest: Any, rows: list[Delivery],
                  problems: list[tuple[Delivery, AttemptResult, str | None]]) -> None:
        from ihd_node.delivery.dispatch import send_rows

        def book(row: Delivery, outcome: Any, seconds: float) -> None:
            code = f" [{outcome.code}]" if getattr(outcome, "code", None) else ""
            error = None if outcome.outcome == "sent" else f"{outcome.detail}{code}"
            res = self._book(row, None, error, seconds, outcome=outcome.outcome, detail=f"{outcome.detail}{code}")
            if res.delivery_status != "sent":
                problems.append((row, res, error))

        send_rows(dest, rows, book)

    @staticmethod
    def _log_problems(name: str, problems: list[tuple[Delivery, AttemptResult, str | None]]) -> None:
        """One WARNING per destination and outcome for this pass (per-object detail at DEBUG)."""
        by_outcome: dict[str, list[tuple[Delivery, AttemptResult, str | None]]] = {}
        for item in problems:
            by_outcome.setdefault(item[1].delivery_status, []).append(item)
        for outcome, items in by_outcome.items():
            errors = sorted({e or "" for _, _, e in items})
            fields: dict[str, object] = {"destination": name, "objects": len(items),
                                         "attempt": max(row.attempts + 1 for row, _, _ in items),
                                         "error": errors[0] if len(errors) == 1 else
                                         f"{errors[0]} (and {len(errors) - 1} other errors)"}
            if outcome == "pending":
                nexts = [res.next_attempt_at for _, res, _ in items if res.next_attempt_at is not None]
                retry_in = (min(nexts) - utcnow()).total_seconds() if nexts else None
                nodelog.warning("delivery.retry", **fields, retry_in_s=retry_in)
            else:
                nodelog.warning(f"delivery.{outcome}", **fields)

    def _book(self, row: Delivery, status: int | None, error: str | None, seconds: float,
              now: datetime | None = None, sent_as: str = "", sent_uid: str = "", outcome: str | None = None,
              detail: str = "") -> AttemptResult:
        res = self.db.record_attempt(row.id, status=status, error=error, policy=self.config.delivery,
                                     seconds=seconds, now=now, outcome=outcome)
        with self._lock:
            self._settled.get(row.destination, []).append((row, res.delivery_status, error))
        faults.point("delivery.booked")
        if sent_as:
            # Which SR class this PACS got, in the log database: the object it holds has another class and UID.
            series = self.db.get_series(res.series_instance_uid)
            self.db.log_event("delivery", f"SR for {row.destination} sent as {SR_CLASS_NAMES[sent_as]} "
                              f"(SOP Instance UID {sent_uid}; the destination did not accept the classes "
                              f"before it), status {describe(status)}",
                              series_instance_uid=res.series_instance_uid,
                              study_instance_uid=series.study_instance_uid if series else None)
        fields = {"destination": row.destination, "sop": row.sop_instance_uid,
                  "status": detail or describe(status),
                  "attempt": row.attempts + 1, "outcome": res.delivery_status}
        if res.delivery_status == "sent":
            nodelog.info("delivery.sent", **fields)
        else:
            nodelog.debug(f"delivery.{res.delivery_status}", **fields, error=error)
        if res.series_state:
            level = "INFO" if res.series_state == "delivered" else "WARNING"
            series = self.db.get_series(res.series_instance_uid)
            self.db.log_event("delivery", f"series {res.series_state}"
                              + (f": {series.reason}" if series and series.reason else ""), level=level,
                              series_instance_uid=res.series_instance_uid,
                              study_instance_uid=series.study_instance_uid if series else None)
        return res

    def seconds_to_next(self, cap: float = 1.0) -> float:
        if self.busy:  # its rows are still due: no spinning on them; new results and its end wake the loop
            return min(cap, 0.25)
        when = self.db.next_delivery_time()
        if when is None:
            return cap
        return max(0.0, min(cap, (when - utcnow()).total_seconds()))

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """The delivery thread: send what is due, sleep until the next row is due or `wake` is set."""
        while not stop.is_set():
            wake.clear()  # before the pass: a wake-up during it is not lost
            try:
                self.run_once(wait=False)
                wait = self.seconds_to_next()
            except Exception as exc:
                nodelog.error("delivery.loop_failed", error=f"{type(exc).__name__}: {exc}")
                wait = 1.0
            wake.wait(wait)
