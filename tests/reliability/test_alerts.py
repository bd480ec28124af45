"""Alerts of positive findings (issue 12) reach a real HTTP webhook receiver (stdlib http.server) and a real
SMTP server with STARTTLS (aiosmtpd, test certificate): exactly one per channel for a positive series, also
when the node is SIGKILLed after the analysis is committed and before the alert is sent; none for a
negative series; no patient name, ID or birth date in any of them by default.
"""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from certs import have_openssl, make_test_certs
from conftest import wait_until
from faults import crash_env, done, make_study, start, store, wait_exit

from ihd_node.sim.mini_pacs import free_port

aiosmtpd = pytest.importorskip("aiosmtpd", reason="aiosmtpd (dev extra) is needed for the SMTP alert test")
from aiosmtpd.controller import Controller  # noqa: E402

pytestmark = pytest.mark.skipif(not have_openssl(), reason="the openssl command makes the SMTP test certificate")
N = 24  # slices per study: a full head (faults.make_study), as the shipped completion evidence wants
KILLED = -signal.SIGKILL


class Hooks:
    """A local webhook receiver: every POST body, by path."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hooks.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.mails.append((bool(session.ssl), envelope.content.decode(errors="replace")))
        return "250 OK"

    def __init__(self) -> None:
        self.mails: list[tuple[bool, str]] = []


@pytest.fixture(scope="module")
def receivers(tmp_path_factory: pytest.TempPathFactory):
    certs = make_test_certs(tmp_path_factory.mktemp("smtp-certs"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port(), tls_context=context, require_starttls=True)
    smtp.start()
    hooks = Hooks()
    yield hooks, mailbox, smtp.port, certs
    hooks.close()
    smtp.stop()


def alerts_config(hooks: Hooks, smtp_port: int, certs) -> dict:
    return {"console_url": "http://127.0.0.1:8080",
            "viewer_url": "http://ohif.test/viewer?StudyInstanceUIDs={StudyInstanceUID}",
            "channels": [
                {"name": "hook", "kind": "webhook", "url": f"{hooks.url}/generic"},
                {"name": "teams", "kind": "teams", "url": f"{hooks.url}/teams"},
                {"name": "slack", "kind": "slack", "url": f"{hooks.url}/slack"},
                {"name": "mail", "kind": "email", "smtp_host": "127.0.0.1", "smtp_port": smtp_port,
                 "ca_certificates": str(certs.ca_cert), "sender": "ihd@test", "recipients": ["er@test"]}]}


def test_one_alert_per_channel_across_kill9_and_no_patient_data(tmp_path: Path, pacs, make_node, receivers):
    hooks, mailbox, smtp_port, certs = receivers
    hooks.posts.clear()
    mailbox.mails.clear()
    study = make_study(tmp_path / "study", seed=31, n_slices=N)
    node = make_node(pacs, alerts=alerts_config(hooks, smtp_port, certs))
    # The node SIGKILLs itself when the first alert is due: the analysis (and its alert rows) are committed.
    start(node, extra_env=crash_env("alert.sending"))
    assert store(study.files, node.port) == [0x0000] * N
    assert wait_exit(node) == KILLED, node.log()[-2000:]
    assert hooks.posts == [] and mailbox.mails == []
    assert node.query("SELECT count(*) FROM alerts WHERE status = 'pending'")[0][0] == 4

    start(node)
    assert wait_until(lambda: len(hooks.posts) == 3 and len(mailbox.mails) == 1, 60), node.log()[-3000:]
    time.sleep(1.5)  # a duplicate would come now
    assert sorted(path for path, _ in hooks.posts) == ["/generic", "/slack", "/teams"]
    assert len(mailbox.mails) == 1 and mailbox.mails[0][0], "the mail was not sent over STARTTLS"
    rows = node.query("SELECT channel, status, attempts, revision FROM alerts ORDER BY channel")
    assert rows == [("hook", "sent", 1, 1), ("mail", "sent", 1, 1), ("slack", "sent", 1, 1), ("teams", "sent", 1, 1)]

    ds = pydicom.dcmread(study.files[0])
    generic = dict(hooks.posts)["/generic"]
    assert generic["accession_number"] == ds.AccessionNumber
    assert generic["study_date"] == f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}"
    assert generic["viewer_url"] == f"http://ohif.test/viewer?StudyInstanceUIDs={study.study_uid}"
    assert generic["console_url"].endswith(f"/study/{study.study_uid}")
    assert generic["findings"] and all(f["finding"].endswith("hemorrhage") or "type not determined" in f["finding"]
                                       for f in generic["findings"])
    assert generic["not_for_diagnostic_use"] is True and "patient" not in generic
    assert dict(hooks.posts)["/teams"]["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert "Subdural hemorrhage" in dict(hooks.posts)["/slack"]["text"] or "hemorrhage" in dict(hooks.posts)[
        "/slack"]["text"]
    everything = json.dumps(hooks.posts) + mailbox.mails[0][1]
    name = str(ds.PatientName)
    for secret in (name, name.replace("^", " "), str(ds.PatientID), str(ds.get("PatientBirthDate", "")) or "@@"):
        assert secret not in everything, f"patient data {secret!r} in an alert"
    assert "any" not in [f["finding"] for f in generic["findings"]]
    sent_events = node.query("SELECT count(*) FROM events WHERE kind = 'alert' AND message LIKE 'sent to %'")
    assert sent_events[0][0] == 4
    done(node)


def test_no_alert_for_a_negative_series(tmp_path: Path, pacs, make_node, receivers):
    hooks, mailbox, smtp_port, certs = receivers
    hooks.posts.clear()
    mailbox.mails.clear()
    study = make_study(tmp_path / "study", seed=32, n_slices=N)
    # Thresholds above anything the tiny model says: the same kind of phantom is negative here.
    node = make_node(pacs, alerts=alerts_config(hooks, smtp_port, certs),
                     analysis={"thresholds": dict.fromkeys(("any", "epidural", "intraparenchymal", "intraventricular",
                                                             "subarachnoid", "subdural"), 0.999)})
    start(node)
    assert store(study.files, node.port) == [0x0000] * N
    assert node.wait_state(study.series_uid, ("delivered",), 90) == "delivered", node.log()[-3000:]
    assert node.query("SELECT positive_classes FROM analyses") == [("",)]
    time.sleep(1.5)
    assert hooks.posts == [] and mailbox.mails == []
    assert node.query("SELECT count(*) FROM alerts")[0][0] == 0
    done(node)


def test_include_patient_data_switch(tmp_path: Path, make_node, receivers):
    """alerts.include_patient_data: the alert (not the log database) carries name, ID and birth date."""
    hooks, mailbox, smtp_port, certs = receivers
    hooks.posts.clear()
    study = make_study(tmp_path / "study", seed=33, n_slices=N)
    node = make_node(None, alerts={"include_patient_data": True,
                                   "channels": [{"name": "hook", "kind": "webhook", "url": f"{hooks.url}/p"}]})
    start(node)
    assert store(study.files, node.port) == [0x0000] * N
    assert wait_until(lambda: len(hooks.posts) == 1, 90), node.log()[-3000:]
    ds = pydicom.dcmread(study.files[0])
    patient = hooks.posts[0][1]["patient"]
    assert patient["name"] == str(ds.PatientName) and patient["ID"] == str(ds.PatientID)
    assert str(ds.PatientName) in hooks.posts[0][1]["text"]
    # ... and still nowhere in the log database.
    dump = "\n".join(str(row) for table in ("events", "alerts", "series", "studies")
                     for row in node.query(f"SELECT * FROM {table}"))
    assert str(ds.PatientName) not in dump and str(ds.PatientID) not in dump
    done(node)
