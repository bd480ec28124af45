"""The audit trail end to end, with a real syslog collector (Debian's rsyslogd with its TLS module, run as
this user; tests/syslog_collector.py): a running node receives a phantom study, analyses it, sends the
results, is called by a refused peer, sees console log-ins that succeed and fail, and has the result
retracted from the console. The collector's file must then hold the expected messages, each valid against
the PS3.15 schema, none with a patient name or birth date. Then the collector is stopped for 30 s while the
node keeps making audit messages, started again, and none may be lost (every database row reached it; a
message written just before the connection broke may arrive twice, see ihd_node/node/audit.py). Last, UDP.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from heads import full_head
from loopback import destination, node_config, running_node, tiny_predictor
from lxml import etree
from pynetdicom import AE
from syslog_collector import GTLS, RSYSLOGD, Collector
from waiting import poll_until
from webclient import basic, http

from ihd_node.audit import events, schema_errors
from ihd_node.config import default_config
from ihd_node.node.audit import AuditSender
from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_datasets
from ihd_node.store import open_database
from ihd_node.web.server import hash_password

pytestmark = pytest.mark.skipif(RSYSLOGD is None or not GTLS,
                                reason="rsyslog and rsyslog-gnutls are not installed (.ci/packages)")

USER, PASSWORD = "admin", "correct horse battery"
OUTAGE_SECONDS = 30.0
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def parsed(message: str) -> etree._Element:
    return etree.fromstring(Collector.xml_of(message).encode("utf-8"))


def summary(root: etree._Element) -> tuple[str, str, str, tuple[str, ...]]:
    ident = root.find("EventIdentification")
    return (ident.find("EventID").get("csd-code"), ident.get("EventActionCode"), ident.get("EventOutcomeIndicator"),
            tuple(t.get("csd-code") for t in ident.findall("EventTypeCode")))


def participant(root: etree._Element, user_id: str) -> etree._Element | None:
    return next((p for p in root.findall("ActiveParticipant") if p.get("UserID") == user_id), None)


def call(url: str, password: str = PASSWORD, form: dict | None = None) -> int:
    return http(url, auth=basic(USER, password), form=form)[0]


def refused_association(port: int, calling: str = "INTRUDER") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="NOT_THE_NODE")
    refused = assoc.is_rejected
    if assoc.is_established:
        assoc.release()
    return refused


def login(node, ok: bool) -> None:
    """A console log-in attempt over HTTP; the web server reports it through the hook the node installed."""
    status = call(f"http://127.0.0.1:{node.web.port}/", PASSWORD if ok else "wrong password")
    assert status == (200 if ok else 401)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("audit")
    collector = Collector(root / "collector").start()
    (root / "users").write_text(f"{USER}:operator:{hash_password(PASSWORD, iterations=1000)}\n")
    try:
        with MiniPACS(root / "pacs", ae_title="PACS") as pacs:
            config = node_config(root / "node", [destination("pacs", "PACS", pacs.port)],
                                 series={"quiet_seconds": 0.5, "max_wait_seconds": 20.0},
                                 analysis={"max_secondary_captures": 1},
                                 web={"port": free_port(), "auth": {"users_file": str(root / "users")}},
                                 audit={"syslog": f"tls://127.0.0.1:{collector.tls_port}",
                                        "ca_certificates": str(collector.cert), "retry_max_seconds": 1.0,
                                        "site_id": "TEST-SITE", "patient_ids": True})
            with running_node(config, tiny_predictor()) as node:
                yield SimpleNamespace(collector=collector, node=node, pacs=pacs, root=root)
    finally:
        collector.stop()


def all_sent(node) -> bool:
    return node.db.audit_counts().get("pending", 0) == 0


def test_round_trip_gives_the_expected_valid_messages(world) -> None:
    node, collector = world.node, world.collector
    series = full_head(91, n_slices=24, size=64)
    uid, study_uid = series.series_instance_uid, series.study_instance_uid
    first = series.datasets[0]
    assert send_datasets(series.datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                         calling_aet="CT1") == [0] * 24
    assert poll_until(lambda: node.db.get_series(uid).state == "delivered", 90)
    assert refused_association(node.port)
    login(node, ok=True)
    login(node, ok=False)
    base = f"http://127.0.0.1:{node.web.port}"
    assert call(base + "/actions/retract", form={"series": uid, "reason": "wrong side"}) == 200
    assert node.db.get_series(uid).state == "retracted"
    assert poll_until(lambda: any(o.sop_class_uid == KOS for o in world.pacs.objects(study_uid)), 30)
    # its delivery pass is audited too: the results' pass and the rejection note's
    assert poll_until(lambda: len(node.db.audit_messages(event="instances-sent")) >= 2, 30)

    assert poll_until(lambda: all_sent(node) and len(collector.messages()) >= len(node.db.audit_messages()), 30)
    messages = collector.messages()
    roots = []
    for message in messages:
        assert message.startswith("<85>1 ") and " ihd-node " in message and " IHE+RFC-3881 - " in message
        assert schema_errors(Collector.xml_of(message)) == [], message
        roots.append(parsed(message))
    assert node.db.audit_counts()["invalid"] == 0
    names = {str(first.PatientName), str(first.get("PatientBirthDate", "") or "")} - {""}
    for name in names:  # the house rule: no patient name or birth date in any audit message
        assert not any(name in m for m in messages), name
    by_summary = {}
    for root in roots:
        by_summary.setdefault(summary(root), []).append(root)

    assert ("110100", "E", "0", ("110120",)) in by_summary  # start
    assert ("110113", "E", "0", ("110131",)) in by_summary  # the configuration of the first run
    received = [r for r in by_summary[("110104", "C", "0", ())]
                if r.find(f".//ParticipantObjectIdentification[@ParticipantObjectID='{study_uid}']") is not None]
    assert len(received) == 1
    ct1 = participant(received[0], "CT1")
    assert ct1.get("UserIsRequestor") == "true" and ct1.find("RoleIDCode").get("csd-code") == "110153"
    assert ct1.get("NetworkAccessPointID") == "127.0.0.1"
    assert received[0].find(".//SOPClass").get("NumberOfInstances") == "24"
    assert received[0].find(f".//ParticipantObjectIdentification[@ParticipantObjectID='{first.PatientID}']") \
        is not None
    sent = [r for r in by_summary[("110104", "R", "0", ())]
            if r.find(f".//ParticipantObjectIdentification[@ParticipantObjectID='{study_uid}']") is not None]
    assert sent and participant(sent[0], "PACS").find("RoleIDCode").get("csd-code") == "110152"
    # every object the PACS holds of the study (SR, capture, then the rejection note) in some 110104 message
    assert sum(int(s.get("NumberOfInstances")) for r in sent for s in r.iter("SOPClass")) == \
        len(world.pacs.objects(study_uid))
    refused = by_summary[("110113", "E", "4", ("110126",))]
    assert participant(refused[0], "INTRUDER") is not None
    assert participant(by_summary[("110114", "E", "0", ("110122",))][0], USER).get("UserIsRequestor") == "true"
    assert participant(by_summary[("110114", "E", "4", ("110122",))][0], USER) is not None
    retraction = by_summary[("110103", "D", "0", ())][0]
    assert participant(retraction, USER).get("UserIsRequestor") == "true"  # the console user, by name
    assert retraction.find(f".//ParticipantObjectIdentification[@ParticipantObjectID='{first.PatientID}']") \
        is not None  # the patient, remembered from the receive


def test_nothing_is_lost_while_the_collector_is_down(world) -> None:
    node, collector = world.node, world.collector
    assert poll_until(lambda: all_sent(node), 30)
    collector.stop()
    made = 0
    until = time.monotonic() + OUTAGE_SECONDS
    while time.monotonic() < until:  # the node goes on making audit messages
        assert refused_association(node.port)
        login(node, ok=False)
        made += 2
        time.sleep(1.0)
    pending = node.db.audit_counts().get("pending", 0)
    assert pending >= made  # they waited in the database
    collector.start()
    assert poll_until(lambda: all_sent(node), 30)
    time.sleep(0.5)  # the collector's file is flushed per transaction; give the last one a moment
    received = Counter(Collector.xml_of(m) for m in collector.messages())
    rows = node.db.audit_messages(limit=100000)
    missing = [r.id for r in rows if r.xml not in received]
    assert missing == [], f"{len(missing)} audit messages never reached the collector"
    duplicates = sum(n - 1 for n in received.values())
    print(f"outage {OUTAGE_SECONDS:g} s: {made} messages made meanwhile, {pending} pending at the restart, "
          f"{len(rows)} rows in all, {duplicates} received twice")
    assert duplicates <= 5  # only those written just before the connection broke (node/audit.py)


def test_udp_collector_gets_the_messages(world, tmp_path: Path) -> None:
    collector = world.collector
    config = default_config(tmp_path, audit={"syslog": f"udp://127.0.0.1:{collector.udp_port}"})
    db = open_database(config.database_url)
    sender = AuditSender(db, config)
    try:
        db.audit(events.application_activity(True, launched_by="udp-test"))
        assert sender.step() >= 0 and db.audit_counts() == {"sent": 1, "invalid": 0}
        assert poll_until(lambda: any("udp-test" in m for m in collector.messages(udp=True)), 10)
        message = next(m for m in collector.messages(udp=True) if "udp-test" in m)
        assert schema_errors(Collector.xml_of(message)) == []
    finally:
        sender.close()
        db.close()
