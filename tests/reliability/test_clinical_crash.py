"""kill -9 of the node with a message in flight to an HL7 or FHIR destination: after the restart each
destination holds exactly one current result.

- HL7: the node SIGKILLs itself at `delivery.answered`, after the listener's ACK AA came back and before
  the outbox booked it. The restart sends the ORU again with the same control ID (MSH-10), which is how an
  MLLP receiver recognises a duplicate: one distinct message for the study.
- FHIR: the node is killed from outside while the endpoint holds its transaction POST (received, not yet
  answered); the endpoint then applies it. The restart POSTs the same Bundle again: its conditional
  updates match the resources by identifier, so nothing new is created (7 resources, as after one send).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from conftest import wait_until as poll_until
from faults import crash_env, done, make_study, start, store, wait_exit
from test_clinical_transports import TOKEN, FhirHandler, FhirServer, Listener

KILLED = -signal.SIGKILL
N = 24


def segments(message: str, name: str) -> list[list[str]]:
    return [s.split("|") for s in message.split("\r") if s.startswith(name + "|")]


def hl7_destination(listener: Listener) -> dict:
    return {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": listener.port, "timeout": 5.0,
            "sending_facility": "RADIOLOGY", "receiving_application": "RIS", "receiving_facility": "HOSPITAL"}


def test_kill_between_the_ack_and_its_booking(tmp_path: Path, make_node) -> None:
    listener = Listener().start()
    try:
        study = make_study(tmp_path / "study", seed=31, n_slices=N)
        node = make_node(None, destinations=[hl7_destination(listener)])
        node.start(extra_env=crash_env("delivery.answered", 1))
        assert store(study.files, node.port) == [0x0000] * N
        assert wait_exit(node, 120) == KILLED
        assert len(listener.received) == 1  # the RIS has it and acknowledged it ...
        assert node.query("SELECT status FROM deliveries WHERE destination = 'ris'") == [("pending",)]  # ... unbooked
        start(node)
        assert node.wait_state(study.series_uid, ("delivered",), 60) == "delivered", node.log()[-3000:]
        ids = [segments(m, "MSH")[0][9] for m in listener.received]
        assert len(listener.received) == 2 and len(set(ids)) == 1  # sent again, as the same message
        assert node.query("SELECT status, attempts FROM deliveries WHERE destination = 'ris'") == [("sent", 1)]
        print(f"\nFIGURE hl7 kill at delivery.answered: received {len(ids)} copies of control ID {ids[0]}")
        done(node)
    finally:
        listener.stop()


class HoldingHandler(FhirHandler):
    def do_POST(self) -> None:  # noqa: N802
        server: HoldingFhirServer = self.server  # type: ignore[assignment]
        server.arrived.set()
        server.release.wait(60)
        try:
            super().do_POST()
        except OSError:  # the node is gone: the answer has nowhere to go; the update is applied all the same
            pass


class HoldingFhirServer(FhirServer):
    """The first POST is held (received, not answered) until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.RequestHandlerClass = HoldingHandler
        self.arrived = threading.Event()
        self.release = threading.Event()


def test_kill_between_the_fhir_post_and_its_answer(tmp_path: Path, make_node) -> None:
    server = HoldingFhirServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        token = tmp_path / "ehr.token"
        token.write_text(TOKEN)
        study = make_study(tmp_path / "study", seed=32, n_slices=N)
        node = make_node(None, destinations=[{"name": "ehr", "kind": "fhir", "timeout": 30.0,
                                              "url": f"http://127.0.0.1:{server.server_address[1]}/fhir",
                                              "auth": {"token_file": str(token)}}])
        node.start()
        assert store(study.files, node.port) == [0x0000] * N
        assert server.arrived.wait(120), node.log()[-3000:]
        node.kill9()  # the POST is in the server's hands, its answer not yet sent
        server.release.set()
        assert poll_until(lambda: server.created == 7, 10)  # the EHR applied it; the node never heard back
        assert node.query("SELECT status FROM deliveries WHERE destination = 'ehr'") == [("pending",)]
        start(node)
        assert node.wait_state(study.series_uid, ("delivered",), 60) == "delivered", node.log()[-3000:]
        assert server.created == 7 and len(server.resources) == 7  # one report + six observations, once
        assert {r["version"] for r in server.resources.values()} == {2}  # the re-send updated them in place
        assert node.query("SELECT status FROM deliveries WHERE destination = 'ehr'") == [("sent",)]
        print(f"\nFIGURE fhir kill mid-POST: {server.created} resources created, versions "
              f"{sorted({r['version'] for r in server.resources.values()})}")
        done(node)
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
