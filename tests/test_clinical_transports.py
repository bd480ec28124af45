"""The transports of the clinical destinations, against real things nobody here wrote.

- MLLP: the `hl7` package's asyncio MLLP server in a thread, answering AA, AE (with a reason), no ACK, an
  ACK for another message; what it received must pass hl7apy's strict ORU_R01 v2.5.1 validation.
- FHIR: an http.server endpoint that answers a transaction as a FHIR server does (conditional update:
  201 Created with a Location for a new resource, 200 for a match; 4xx with an OperationOutcome; 503),
  keeping its resources keyed by identifier so a re-send visibly creates nothing new.
- STOW-RS: Orthanc with its DICOMweb plugin stores an SR and two captures built by the report stage, and
  QIDO-RS on Orthanc lists them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hl7
import hl7.mllp
import pytest
from orthanc import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc
from test_clinical_messages import KOREAN, make_result, strict
from test_report_common import make_prediction, write_ct_series

from ihd_node.delivery.fhir_client import post_transaction
from ihd_node.delivery.mllp import send_mllp
from ihd_node.delivery.stow import stow_instances
from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results, result_file_name
from ihd_node.report.fhir import FhirSettings, build_bundle, bundle_bytes
from ihd_node.report.hl7 import Hl7Addressing, build_oru
from ihd_node.sim.mini_pacs import free_port
from tests.reliability.certs import CertSet, have_openssl, make_test_certs

NOW = dt.datetime(2026, 12, 6, 8, 30, 15, tzinfo=dt.UTC)
ADDRESSING = Hl7Addressing("IHD-NODE", "RADIOLOGY", "RIS", "HOSPITAL")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """A positive result with a Korean name (three name groups, UTF-8 on the wire)."""
    clinical, _ = make_result(tmp_path_factory.mktemp("result"), {"subdural": [2, 3]},
                              terms=KOREAN[0], name=KOREAN[1])
    return clinical


# ---- MLLP -------------------------------------------------------------------------------------------


class Listener:
    """The hl7 package's MLLP server on a loop in its own thread; answers as `self.answers` says, in turn."""

    def __init__(self) -> None:
        self.answers: list[str] = []
        self.received: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, reader, writer) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                self.received.append(str(message))
                answer = self.answers.pop(0) if self.answers else "AA"
                if answer == "none":
                    continue  # read it, say nothing
                if answer == "other":
                    ack = message.create_ack("AA")
                    ack.segment("MSA").assign_field("SOMEONE-ELSE", 2)
                else:
                    ack = message.create_ack(answer[:2])
                    if answer.startswith("AE:"):
                        ack.segment("MSA").assign_field(answer[3:], 3)
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self, tls: ssl.SSLContext | None = None) -> Listener:
        self.thread.start()

        async def serve():
            return await hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", 0, encoding="utf-8", ssl=tls)

        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def listener():
    server = Listener().start()
    yield server
    server.stop()


def test_mllp_ack_decides(listener, result):
    listener.answers = ["AA", "AE:Unknown order ACC1", "none", "other"]
    outcomes = []
    for n in range(4):
        message = build_oru(result, ADDRESSING, status="preliminary", control_id=f"IHD{n:04d}", now=NOW)
        outcomes.append(send_mllp("127.0.0.1", listener.port, message, timeout=1.5))
    assert [o.outcome for o in outcomes] == ["sent", "rejected", "retry", "retry"]
    assert outcomes[0].code == "AA" and outcomes[1].code == "AE"
    assert outcomes[1].detail == "ACK AE: Unknown order ACC1"
    assert "timed out" in outcomes[2].detail
    assert "SOMEONE-ELSE" in outcomes[3].detail and "IHD0003" in outcomes[3].detail
    # the listener got every message whole, in UTF-8, and each is a valid ORU^R01 v2.5.1
    assert len(listener.received) == 4
    for text in listener.received:
        strict(text)
    assert "홍^길동" in listener.received[0]


def test_mllp_no_listener_and_redacted_reason(listener, result):
    port = free_port()
    message = build_oru(result, ADDRESSING, status="revised", control_id="IHD0100", now=NOW)
    refused = send_mllp("127.0.0.1", port, message, timeout=1.0)
    assert refused.outcome == "retry" and "refused" in refused.detail
    # a RIS that echoes the patient's name in its error: the detail keeps the reason, not the name
    listener.answers = ["AE:Patient Hong Gildong 19700101 not found"]
    rejected = send_mllp("127.0.0.1", listener.port, message, timeout=2.0)
    assert rejected.outcome == "rejected"
    assert "Hong" not in rejected.detail and "19700101" not in rejected.detail and "not found" in rejected.detail


def test_mllp_garbage_answer_is_retried(result):
    """A server that answers with something that is no ACK: retry, and the detail says so."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"\x0bHELLO\r\x1c\x0d")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    message = build_oru(result, ADDRESSING, status="preliminary", control_id="IHD0200", now=NOW)
    outcome = send_mllp("127.0.0.1", server.getsockname()[1], message, timeout=2.0)
    thread.join(5)
    server.close()
    assert outcome.outcome == "retry" and "not an ACK" in outcome.detail


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertSet:
    if not have_openssl():
        pytest.skip("openssl not installed")
    return make_test_certs(tmp_path_factory.mktemp("certs"))


def test_mllp_over_tls(certs, result):
    server = Listener().start(tls=certs.server_context())
    try:
        message = build_oru(result, ADDRESSING, status="preliminary", control_id="IHD0300", now=NOW)
        trusted = send_mllp("127.0.0.1", server.port, message, timeout=5, tls=certs.client_context(False))
        assert trusted.outcome == "sent" and len(server.received) == 1
        untrusted = send_mllp("127.0.0.1", server.port, message, timeout=5, tls=ssl.create_default_context())
        assert untrusted.outcome == "retry" and "certificate" in untrusted.detail.lower()
        assert len(server.received) == 1
    finally:
        server.stop()


# ---- FHIR -------------------------------------------------------------------------------------------

TOKEN = "s3cret-token"


class FhirServer(ThreadingHTTPServer):
    """Resources keyed by (type, identifier), each with an id and a version; `mode` forces an error."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FhirHandler)
        self.resources: dict[tuple[str, str], dict] = {}
        self.created = 0
        self.mode = "ok"
        self.authorizations: list[str | None] = []


class FhirHandler(BaseHTTPRequestHandler):
    server: FhirServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _outcome(self, status: int, text: str) -> None:
        self._answer(status, {"resourceType": "OperationOutcome",
                              "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}]})

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        bundle = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.authorizations.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._outcome(401, "no valid bearer token")
        if self.headers.get("Content-Type") != "application/fhir+json":
            return self._outcome(415, "not FHIR JSON")
        if server.mode == "unavailable":
            return self._outcome(503, "down for maintenance")
        if server.mode == "invalid":
            return self._outcome(422, "DiagnosticReport.subject: unknown patient")
        if bundle.get("type") != "transaction":
            return self._outcome(400, "not a transaction")
        entries = []
        for entry in bundle["entry"]:
            kind, query = entry["request"]["url"].split("?identifier=")
            assert entry["request"]["method"] == "PUT"
            key = (kind, query)
            if key in server.resources:  # conditional match: update in place
                stored = server.resources[key]
                stored["version"] += 1
                stored["resource"] = entry["resource"]
                status = "200 OK"
            else:
                server.created += 1
                stored = server.resources[key] = {"id": str(server.created), "version": 1,
                                                  "resource": entry["resource"]}
                status = "201 Created"
            entries.append({"response": {"status": status,
                                         "location": f"{kind}/{stored['id']}/_history/{stored['version']}"}})
        self._answer(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})


@pytest.fixture(scope="module")
def fhir_server():
    server = FhirServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_fhir_transaction_and_resend(fhir_server, result):
    url = f"http://127.0.0.1:{fhir_server.server_address[1]}/fhir"
    body = bundle_bytes(build_bundle(result, FhirSettings(), status="preliminary", now=NOW))
    first = post_transaction(url, body, token=TOKEN, timeout=5)
    assert first.outcome == "sent" and first.code == "200" and "7 entries, 7 created" in first.detail
    assert fhir_server.authorizations[-1] == f"Bearer {TOKEN}"
    again = post_transaction(url, body, token=TOKEN, timeout=5)
    assert again.outcome == "sent" and "0 created" in again.detail
    assert fhir_server.created == 7 and len(fhir_server.resources) == 7
    # the retraction updates the same seven resources
    retraction = bundle_bytes(build_bundle(result, FhirSettings(), status="retracted", now=NOW, reason="wrong"))
    assert post_transaction(url + "/", retraction, token=TOKEN, timeout=5).outcome == "sent"
    assert fhir_server.created == 7
    assert {r["resource"]["status"] for r in fhir_server.resources.values()} == {"entered-in-error"}


def test_fhir_errors(fhir_server, result):
    url = f"http://127.0.0.1:{fhir_server.server_address[1]}/fhir"
    body = bundle_bytes(build_bundle(result, FhirSettings(), status="preliminary", now=NOW))
    unauthorised = post_transaction(url, body, token="wrong", timeout=5)
    assert (unauthorised.outcome, unauthorised.code) == ("rejected", "401")
    assert "no valid bearer token" in unauthorised.detail
    try:
        fhir_server.mode = "invalid"
        invalid = post_transaction(url, body, token=TOKEN, timeout=5)
        assert (invalid.outcome, invalid.code) == ("rejected", "422")
        assert invalid.detail == "HTTP 422: error: DiagnosticReport.subject: unknown patient"
        fhir_server.mode = "unavailable"
        down = post_transaction(url, body, token=TOKEN, timeout=5)
        assert (down.outcome, down.code) == ("retry", "503")
    finally:
        fhir_server.mode = "ok"
    nobody = post_transaction(f"http://127.0.0.1:{free_port()}/fhir", body, token=TOKEN, timeout=2)
    assert nobody.outcome == "retry" and "refused" in nobody.detail


def test_fhir_over_https(certs, result):
    server = FhirServer()
    server.socket = certs.server_context().wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/fhir"
        body = bundle_bytes(build_bundle(result, FhirSettings(), status="preliminary", now=NOW))
        sent = post_transaction(url, body, token=TOKEN, timeout=5, ca_certificates=str(certs.ca_cert))
        assert sent.outcome == "sent" and server.created == 7
        unverified = post_transaction(url, body, token=TOKEN, timeout=5)  # the system CAs do not know ours
        assert unverified.outcome == "retry" and "certificate" in unverified.detail.lower()
    finally:
        server.shutdown()
        server.server_close()


# ---- DICOMweb STOW-RS -------------------------------------------------------------------------------

needs_orthanc = pytest.mark.skipif(ORTHANC_BINARY is None or DICOMWEB_PLUGIN is None,
                                   reason="Orthanc and its DICOMweb plugin not installed (orthanc, orthanc-dicomweb)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), ai_ae_title="IHD_AI", ai_port=free_port(),
                     dicomweb=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def result_files(tmp_path_factory) -> list[Path]:
    """An SR and two captures, as the report stage writes them."""
    root = tmp_path_factory.mktemp("stow")
    volume = load_volume(write_ct_series(root / "src", n=6, size=64, bleed_slices=(2, 3)))
    objects = build_results(volume, make_prediction(6, {"subdural": [2, 3]}, size=64), max_secondary_captures=2)
    assert len(objects.secondary_captures) >= 2
    paths = []
    for ds in [objects.sr, *objects.secondary_captures[:2]]:
        path = root / result_file_name(ds)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def qido(orthanc: Orthanc, path: str) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/dicom-web{path}", timeout=30) as answer:
        return json.loads(answer.read() or b"[]")


@needs_orthanc
def test_stow_to_orthanc(orthanc, result_files):
    import pydicom

    base = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    outcomes = stow_instances(base, result_files, token=None, timeout=30)
    assert [p for p, _ in outcomes] == result_files
    assert [o.outcome for _, o in outcomes] == ["sent"] * 3, outcomes
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in result_files]
    sr, capture = headers[0], headers[1]
    listed = qido(orthanc, f"/studies/{sr.StudyInstanceUID}/series/{sr.SeriesInstanceUID}/instances")
    assert [i["00080018"]["Value"][0] for i in listed] == [sr.SOPInstanceUID]
    listed = qido(orthanc, f"/studies/{sr.StudyInstanceUID}/series/{capture.SeriesInstanceUID}/instances")
    assert sorted(i["00080018"]["Value"][0] for i in listed) == sorted(h.SOPInstanceUID for h in headers[1:])
    # the same instances again: Orthanc keeps what it has and says so per instance; nothing new appears
    again = stow_instances(base, result_files, token=None, timeout=30)
    assert [o.outcome for _, o in again] == ["sent"] * 3, again
    assert len(orthanc.get("/instances")) == 3


@needs_orthanc
def test_stow_failures(orthanc, result_files, tmp_path):
    unreachable = stow_instances(f"http://127.0.0.1:{free_port()}/dicom-web", result_files, token=None, timeout=3)
    assert {o.outcome for _, o in unreachable} == {"retry"}
    assert all("refused" in o.detail for _, o in unreachable)
    wrong_path = stow_instances(f"http://127.0.0.1:{orthanc.http_port}/no-such-root", result_files[:1],
                                token=None, timeout=10)
    assert wrong_path[0][1].outcome == "rejected" and wrong_path[0][1].code == "404"
    not_dicom = tmp_path / "not.dcm"
    not_dicom.write_bytes(b"plain text")
    mixed = stow_instances(f"http://127.0.0.1:{orthanc.http_port}/dicom-web", [not_dicom, result_files[0]],
                           token=None, timeout=30)
    assert mixed[0][1].outcome == "rejected" and "cannot read" in mixed[0][1].detail
    assert mixed[1][1].outcome == "sent"
