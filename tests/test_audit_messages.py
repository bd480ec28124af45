"""The audit messages themselves (no collector): every builder gives a message the PS3.15 schema accepts with
the event ID, action, outcome, roles and objects PS3.15 A.5.3 asks for; the schema check rejects broken
ones; patients appear by ID only; the RFC 5424 framing; the `audit:` config errors; `Database.audit` keeps
every message (an invalid one with why), remembers a study's patient; the PACS count query's message."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from lxml import etree
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from ihd_node.audit import PATIENT_NAME_WITHHELD, AuditSource, StudyObject, events, render, schema_errors
from ihd_node.config import ConfigError, load_config
from ihd_node.delivery.syslog import BOM, octet_counted, rfc5424
from ihd_node.sim.mini_pacs import MiniPACS
from ihd_node.store import AuditPatient, open_database

SOURCE = AuditSource("ihd-node@test", "SITE-1", "IHD_AI", "127.0.0.1", "ihd-node:42")
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = StudyObject("1.2.826.0.1.3680043.8.498.1", ((CT, 24),), "ACC123", "PID-7")

CASES = {
    "start": (events.application_activity(True, launched_by="ihd"), "110100", "E", "0", ["110150", "110151"]),
    "stop": (events.application_activity(False, reason="stopped"), "110100", "E", "0", ["110150"]),
    "received": (events.instances_received("CT1", "10.0.0.5", [STUDY]), "110104", "C", "0", ["110152", "110153"]),
    "sent": (events.instances_sent("pacs", "PACS", "10.0.0.6", STUDY), "110104", "R", "0", ["110153", "110152"]),
    "send-failed": (events.instances_sent("pacs", "PACS", "pacs.example", STUDY, failure="rejected: 0xA900"),
                    "110104", "R", "8", ["110153", "110152"]),
    "export-hl7": (events.export("ris", "hl7", "ris.example:2575", STUDY, message_ids=["IHD1"]), "110106", "R", "0",
                   ["110153", "110152"]),
    "export-stow": (events.export("web", "dicomweb", "https://pacs.example/dicom-web", STUDY), "110106", "R", "0",
                    ["110153", "110152"]),
    "refused": (events.association_refused("EVIL", "10.9.9.9", "calling AE title 'EVIL' is not allowed"),
                "110113", "E", "4", ["110150"]),
    "config": (events.configuration_changed("/etc/ihd-node/config.yaml", "aa", "bb"), "110113", "E", "0", ["110150"]),
    "login-ok": (events.user_authentication("alice", True, "127.0.0.1", "oidc", role="operator"), "110114", "E",
                 "0", ["110150", "operator"]),
    "login-bad": (events.user_authentication(None, False, "::1", "basic", "wrong password"), "110114", "E", "4",
                  ["110150"]),
    "query": (events.pacs_query("pacs", "PACS", "127.0.0.1", STUDY.study_uid, b"\x08\x00", answered=True),
              "110112", "E", "0", ["110153", "110152"]),
    "retract": (events.retraction("alice", STUDY, "1.2.3.4", "wrong side"), "110103", "D", "0", ["110150"]),
    "labels": (events.labels_import("ops", "/srv/reads.csv", [STUDY], count=3), "110107", "C", "0", ["110152"]),
    "console": (events.console_action("alice", "127.0.0.1", "reanalyse", STUDY, done=True, detail="queued"),
                "110113", "E", "0", ["110150"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_event_is_a_valid_message_with_its_codes(name: str) -> None:
    event, event_id, action, outcome, roles = CASES[name]
    xml = render(event, SOURCE)
    assert schema_errors(xml) == []
    root = etree.fromstring(xml.encode())
    ident = root.find("EventIdentification")
    assert ident.find("EventID").get("csd-code") == event_id and ident.find("EventID").get("codeSystemName") == "DCM"
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == (action, outcome)
    assert ident.get("EventDateTime").endswith("Z")
    assert [r.get("csd-code") for r in root.iter("RoleIDCode")] == roles
    source = root.find("AuditSourceIdentification")
    assert (source.get("AuditSourceID"), source.get("AuditEnterpriseSiteID")) == ("ihd-node@test", "SITE-1")
    node = root.find("ActiveParticipant")
    assert node.get("AlternativeUserID") == "AETITLES=IHD_AI" and node.get("UserID") == "ihd-node:42"


def test_participants_name_the_peer_the_user_and_the_objects() -> None:
    received = etree.fromstring(render(CASES["received"][0], SOURCE).encode())
    peer = received.findall("ActiveParticipant")[1]
    assert (peer.get("UserID"), peer.get("UserIsRequestor"), peer.get("NetworkAccessPointID"),
            peer.get("NetworkAccessPointTypeCode")) == ("CT1", "true", "10.0.0.5", "2")
    study, patient = received.findall("ParticipantObjectIdentification")
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert (sop.get("UID"), sop.get("NumberOfInstances")) == (CT, "24")
    assert study.find("ParticipantObjectDescription/Accession").get("Number") == "ACC123"
    # the patient by ID only: the schema wants a name or a query, and the name is withheld (house rule)
    assert patient.get("ParticipantObjectID") == "PID-7" and patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert patient.find("ParticipantObjectName").text == PATIENT_NAME_WITHHELD

    login = etree.fromstring(render(CASES["login-bad"][0], SOURCE).encode())
    person = login.findall("ActiveParticipant")[1]
    assert (person.get("UserID"), person.get("UserIsRequestor"), person.get("NetworkAccessPointID")) == \
        ("unknown", "true", "::1")
    assert login.find("EventIdentification/EventTypeCode").get("csd-code") == "110122"
    assert "wrong password" in login.find("EventIdentification/EventOutcomeDescription").text

    retract = etree.fromstring(render(CASES["retract"][0], SOURCE).encode())
    assert retract.findall("ActiveParticipant")[1].get("UserID") == "alice"
    assert retract.findall("ActiveParticipant")[1].get("UserIsRequestor") == "true"

    query = etree.fromstring(render(CASES["query"][0], SOURCE).encode())
    q = [o for o in query.findall("ParticipantObjectIdentification")
         if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110181"][0]
    assert base64.b64decode(q.find("ParticipantObjectQuery").text) == b"\x08\x00"
    assert q.get("ParticipantObjectTypeCodeRole") == "24"


def test_the_schema_check_rejects_broken_messages() -> None:
    good = render(CASES["sent"][0], SOURCE)
    root = etree.fromstring(good.encode())
    root.remove(root.find("AuditSourceIdentification"))
    assert schema_errors(etree.tostring(root)) != []
    assert schema_errors(good.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"')) != []
    assert schema_errors(good.replace('EventActionCode="R"', 'EventActionCode="X"')) != []
    assert schema_errors(good.replace("<ParticipantObjectName>", "<Nope>").replace("</ParticipantObjectName>",
                                                                                    "</Nope>")) != []
    assert schema_errors("<AuditMessage>") and schema_errors("<Other/>")


def test_rfc5424_header_bom_and_octet_counting() -> None:
    message = rfc5424("<AuditMessage>é</AuditMessage>", hostname="ct ward", procid="ihd-node:42")
    header, msg = message.split(BOM, 1)
    fields = header.decode("ascii").split(" ")
    assert fields[0] == "<85>1" and fields[2:7] == ["ctward", "ihd-node", "ihd-node:42", "IHE+RFC-3881", "-"]
    assert fields[1].endswith("Z") and fields[7] == ""
    assert msg.decode("utf-8") == "<AuditMessage>é</AuditMessage>"
    framed = octet_counted(message)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(message)


@pytest.mark.parametrize(("value", "says"), [
    ("tcp://collector:514", "does not start with tls:// or udp://"),
    ("tls://:6514", "names no host"),
    ("udp://collector:99999", "port that is not a number"),
    ("tls://collector:6514/path", "more than scheme, host and port"),
])
def test_audit_config_errors_name_the_key_and_the_fix(tmp_path: Path, value: str, says: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"storage:\n  dir: {tmp_path}\naudit:\n  syslog: \"{value}\"\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "audit.syslog" in str(exc.value) and says in str(exc.value)


def test_audit_config_pairs_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    (tmp_path / "c.crt").write_text("x")
    path.write_text(f"storage:\n  dir: {tmp_path}\naudit:\n  syslog: udp://c:514\n  ca_certificates: c.crt\n")
    with pytest.raises(ConfigError, match="a udp:// collector uses no TLS"):
        load_config(path)
    path.write_text(f"storage:\n  dir: {tmp_path}\naudit:\n  syslog: tls://c\n  ca_certificates: missing.crt\n")
    with pytest.raises(ConfigError, match="audit.ca_certificates"):
        load_config(path)
    path.write_text(f"storage:\n  dir: {tmp_path}\naudit:\n  syslog: tls://c\n  certificate: c.crt\n")
    with pytest.raises(ConfigError, match="certificate and private_key go together"):
        load_config(path)
    path.write_text(f"storage:\n  dir: {tmp_path}\naudit:\n  syslog: tls://collector.example\n")
    target = load_config(path).audit.target
    assert (target.scheme, target.host, target.port) == ("tls", "collector.example", 6514)


def test_database_keeps_every_message_and_the_study_patient(tmp_path: Path, monkeypatch) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.audit_source, db.audit_patient_ids = SOURCE, True  # audit.patient_ids: true
    db.audit(CASES["received"][0])  # carries the patient ID
    # a later event of the same study without the ID still names the patient (the store remembers it)
    db.audit(events.retraction("alice", StudyObject(STUDY.study_uid), "1.2.3.4", "wrong side"))
    rows = db.audit_messages()
    assert [r.event for r in rows] == ["instances-received", "retraction"]
    assert all(r.state == "pending" and r.schema_error is None for r in rows)
    assert 'ParticipantObjectID="PID-7"' in rows[1].xml
    # a message the schema refuses is a bug: kept with why, and counted, never dropped
    import ihd_node.store.audit as store_audit

    monkeypatch.setattr(store_audit, "render", lambda *a, **k: "<AuditMessage/>")
    db.audit(CASES["stop"][0])
    assert db.audit_messages()[-1].schema_error and db.audit_counts() == {"pending": 3, "invalid": 1}
    db.close()


def test_by_default_no_patient_id_is_stored(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.audit_source = SOURCE  # audit.patient_ids left off, as shipped
    db.audit(CASES["received"][0])
    db.audit(CASES["retract"][0])
    assert all("PID-7" not in r.xml and schema_errors(r.xml) == [] for r in db.audit_messages())
    with db.read_session() as s:
        assert s.query(AuditPatient).count() == 0
    db.close()


def test_the_pacs_count_query_is_audited_answered_or_not(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ihd_node.node.audit import audited_count

    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.audit_source = SOURCE
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:  # takes C-STORE only: the C-FIND is refused
        dest = SimpleNamespace(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port, tls=None,
                               timeout=5, kind="dicom")
        assert audited_count(db, dest, "IHD_AI", STUDY.study_uid, "1.2.3.9") is None
    row = db.audit_messages(event="query")[-1]
    assert row.event_id == "110112" and row.outcome == 4 and schema_errors(row.xml) == []
    query = etree.fromstring(row.xml.encode()).find(".//ParticipantObjectQuery").text
    identifier = read_dataset(DicomBytesIO(base64.b64decode(query)), is_implicit_VR=False, is_little_endian=True)
    assert identifier.SeriesInstanceUID == "1.2.3.9" and identifier.QueryRetrieveLevel == "SERIES"
    db.close()


def test_a_delivery_pass_is_audited_per_study_and_destination() -> None:
    from types import SimpleNamespace

    from ihd_node.delivery.audited import settled_events

    def row(study: str, sop_class: str, uid: str) -> SimpleNamespace:
        return SimpleNamespace(series=SimpleNamespace(study_instance_uid=study, study=SimpleNamespace(
            accession_number="ACC")), sop_class_uid=sop_class, sop_instance_uid=uid)

    sr, sc = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
    pacs = SimpleNamespace(kind="dicom", name="pacs", ae_title="PACS", host="10.0.0.6")
    found = settled_events(pacs, [(row("1.1", sr, "a"), "sent", None), (row("1.1", sc, "b"), "sent", None),
                                  (row("1.1", sc, "c"), "pending", "timeout"),  # not settled yet: no message
                                  (row("1.2", sr, "d"), "rejected", "0xA900")])
    assert [(e.event_id.code, e.action, e.outcome) for e in found] == [("110104", "R", 0), ("110104", "R", 8)]
    assert found[0].studies[0].sop_classes == ((sc, 1), (sr, 1)) and "0xA900" in found[1].outcome_text
    ris = SimpleNamespace(kind="hl7", name="ris", host="ris.example", port=2575)
    [export] = settled_events(ris, [(row("1.1", "hl7-oru", "IHD-MSG-1"), "sent", None)])
    assert (export.event_id.code, export.action, export.studies[0].sop_classes) == ("110106", "R", ())
    xml = render(export, SOURCE)
    assert schema_errors(xml) == [] and 'UserID="ris.example:2575"' in xml
    assert base64.b64encode(b"IHD-MSG-1").decode() in xml
