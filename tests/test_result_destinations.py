"""A node with all four destination kinds, end to end on loopback, against real peers nobody here wrote:

- dicom: Orthanc by C-STORE; dicomweb: a second Orthanc with its DICOMweb plugin by STOW-RS (QIDO-RS lists
  what it stored);
- hl7: the `hl7` package's asyncio MLLP server (tests/test_clinical_transports.Listener), every ORU it got
  validated strictly as ORU_R01 v2.5.1 by hl7apy;
- fhir: an http.server endpoint answering as a FHIR server does (conditional update by identifier), the
  bundles validated with fhir.resources (R4B).

A positive and a negative phantom (the shipped model) give one ORU per study (TQ1 S / R, one coded OBX per
class), one FHIR transaction per study, the SR and captures in both Orthancs; `ihd-node retract` then gives
the rejection note in both (dciodvfy clean), the withdrawn ORU and the entered-in-error report. An ACK AE is
rejected and not retried; no ACK is retried, then sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from heads import full_head
from loopback import destination, node_config, running_node
from orthanc import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc
from test_clinical_messages import segments, strict, validate_fhir
from test_clinical_transports import TOKEN, FhirServer, Listener, qido
from test_report_common import dciodvfy
from waiting import poll_until

from ihd_node.classes import CLASSES
from ihd_node.commands.status import format_status, status_data
from ihd_node.report.codes import FINDING_CODES
from ihd_node.sim.mini_pacs import free_port, send_datasets
from ihd_node.store import FHIR_BUNDLE, HL7_ORU

pytestmark = pytest.mark.skipif(ORTHANC_BINARY is None or DICOMWEB_PLUGIN is None,
                                reason="Orthanc and its DICOMweb plugin not installed (orthanc, orthanc-dicomweb)")
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
CT = "1.2.840.10008.5.1.4.1.1.2"


class World:
    """The peers, the node and the two studies it has analysed and delivered."""

    def __init__(self, root: Path) -> None:
        self.root = root
        node_port = free_port()
        self.pacs = Orthanc(root / "pacs", ai_ae_title="IHD_AI", ai_port=node_port).start()
        self.web = Orthanc(root / "web", ai_ae_title="IHD_AI", ai_port=node_port, dicomweb=True).start()
        self.ris = Listener().start()
        self.ehr = FhirServer()
        threading.Thread(target=self.ehr.serve_forever, daemon=True).start()
        (root / "ehr.token").write_text(TOKEN + "\n")
        self.destinations = [
            destination("pacs", self.pacs.aet, self.pacs.dicom_port),
            {"name": "web", "kind": "dicomweb", "url": f"http://127.0.0.1:{self.web.http_port}/dicom-web"},
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": self.ris.port, "timeout": 3.0,
             "sending_facility": "RADIOLOGY", "receiving_application": "RIS", "receiving_facility": "HOSPITAL"},
            {"name": "ehr", "kind": "fhir", "url": f"http://127.0.0.1:{self.ehr.server_address[1]}/fhir",
             "auth": {"token_file": str(root / "ehr.token")}},
        ]
        self.config = node_config(root / "node", self.destinations, port=node_port,
                                  series={"quiet_seconds": 0.5, "max_wait_seconds": 30.0},
                                  analysis={"max_secondary_captures": 2},
                                  delivery={"retry_initial_seconds": 0.5, "retry_max_seconds": 1.0})
        self.config_file = root / "config.yaml"
        self.config_file.write_text(yaml.safe_dump({
            "storage": {"dir": str(self.config.storage.dir)}, "database": {"url": self.config.database_url},
            "destinations": self.destinations}))
        self.positive = full_head(91, ["subdural"], n_slices=24, size=128)
        self.negative = full_head(92, [], n_slices=24, size=128)

    def send(self, node, series) -> None:
        assert send_datasets(series.datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                             calling_aet="CT1") == [0] * len(series.datasets)

    def rows(self, node, series) -> list:
        return node.db.study_detail(series.study_instance_uid).series[0].deliveries

    def delivered(self, node, series) -> bool:
        row = node.db.get_series(series.series_instance_uid)
        return row is not None and row.state == "delivered"

    def stop(self) -> None:
        self.ris.stop()
        self.ehr.shutdown()
        self.ehr.server_close()
        self.pacs.stop()
        self.web.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("destinations"))
    try:
        with running_node(w.config) as node:  # the shipped model: positive and negative as the phantoms are
            w.node = node
            for series in (w.positive, w.negative):
                w.send(node, series)
            assert poll_until(lambda: w.delivered(node, w.positive) and w.delivered(node, w.negative), 240), \
                [(d.destination, d.status, d.last_error) for s in (w.positive, w.negative) for d in w.rows(node, s)]
            yield w
    finally:
        w.stop()


def oru_of(world: World, series) -> list[str]:
    return [m for m in world.ris.received if series.study_instance_uid in m]


def test_sr_and_captures_by_c_store_and_stow_rs(world: World) -> None:
    for series in (world.positive, world.negative):
        sent = {d.sop_instance_uid for d in world.rows(world.node, series) if d.destination == "pacs"}
        classes = {d.sop_class_uid for d in world.rows(world.node, series) if d.destination == "pacs"}
        # the SR, the summary capture (and for the positive: slice captures and key images)
        assert len(sent) >= 2 and CT not in classes and any(".88." in c for c in classes)
        assert {d.sop_instance_uid for d in world.rows(world.node, series) if d.destination == "web"} == sent
        at_pacs = {world.pacs.get(f"/instances/{i}/tags?simplify")["SOPInstanceUID"]
                   for i in world.pacs.get("/instances")}
        assert sent <= at_pacs
        listed = {i["00080018"]["Value"][0] for s in qido(world.web, f"/studies/{series.study_instance_uid}/series")
                  for i in qido(world.web, f"/studies/{series.study_instance_uid}/series/"
                                f"{s['0020000E']['Value'][0]}/instances")}
        assert listed == sent


def test_one_oru_per_study_valid_and_prioritised(world: World) -> None:
    for series, priority in ((world.positive, "S"), (world.negative, "R")):
        messages = oru_of(world, series)
        assert len({segments(m, "MSH")[0][9] for m in messages}) == 1, messages  # one control ID: one result
        message = messages[-1]
        strict(message)
        assert segments(message, "TQ1")[0][9].split("^")[0] == priority
        assert segments(message, "OBR")[0][25] == "P"
        coded = [o for o in segments(message, "OBX") if o[2] == "CWE"]
        assert [o[3].split("^")[0] for o in coded] == [FINDING_CODES[c].value for c in CLASSES]
        rows = [d for d in world.rows(world.node, series) if d.destination == "ris"]
        assert [(r.sop_class_uid, r.status, r.sop_instance_uid) for r in rows] == \
            [(HL7_ORU, "sent", segments(message, "MSH")[0][9])]


def test_one_fhir_transaction_per_study(world: World) -> None:
    assert world.ehr.created == 14  # a DiagnosticReport and six Observations per study, nothing twice
    for series in (world.positive, world.negative):
        rows = [d for d in world.rows(world.node, series) if d.destination == "ehr"]
        assert [(r.sop_class_uid, r.status) for r in rows] == [(FHIR_BUNDLE, "sent")]
        bundle = json.loads(Path(rows[0].path).read_bytes())
        validate_fhir(bundle)
        assert bundle["type"] == "transaction"
        report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
        assert report["status"] == "preliminary"


def test_the_oru_leaves_no_later_than_the_sr(world: World) -> None:
    for series in (world.positive, world.negative):
        rows = world.rows(world.node, series)
        oru = next(r for r in rows if r.destination == "ris")
        sr = next(r for r in rows if r.destination == "pacs" and ".88." in r.sop_class_uid)
        assert oru.id < sr.id  # queued first: handed to its sender first
        assert oru.delivered_at <= sr.delivered_at + (sr.delivered_at - sr.created_at)


def test_retraction_reaches_every_destination(world: World) -> None:
    node, series = world.node, world.positive
    exe = Path(sys.executable).parent / "ihd-node"
    proc = subprocess.run([str(exe), "retract", "--config", str(world.config_file), series.series_instance_uid,
                           "--reason", "wrong patient"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

    def notices_sent() -> bool:
        rows = [d for d in world.rows(node, series) if d.sop_class_uid in (KOS, HL7_ORU, FHIR_BUNDLE)]
        return len(rows) >= 6 and all(d.status == "sent" for d in rows if d.status != "cancelled") and \
            {d.destination for d in rows if d.sop_class_uid == KOS and d.status == "sent"} == {"pacs", "web"}

    assert poll_until(notices_sent, 60), [(d.destination, d.status, d.last_error) for d in world.rows(node, series)]
    # the rejection note in both PACS (C-STORE and STOW-RS), valid
    for orthanc in (world.pacs, world.web):
        found = [i for i in orthanc.get("/instances")
                 if orthanc.get(f"/instances/{i}/tags?simplify")["SOPClassUID"] == KOS
                 and "withdrawn" in orthanc.get(f"/instances/{i}/tags?simplify").get("SeriesDescription", "")]
        assert len(found) == 1
        path = world.root / f"kos-{orthanc.http_port}.dcm"
        path.write_bytes(orthanc.download(found[0]))
        assert dciodvfy(path)[0] == []
        assert pydicom.dcmread(path).ConceptNameCodeSequence[0].CodeValue == "113037"
    # the withdrawn ORU: strictly valid, every OBX W, the reason said
    withdrawn = [m for m in oru_of(world, series) if segments(m, "OBX")[0][11] == "W"]
    assert len({segments(m, "MSH")[0][9] for m in withdrawn}) == 1
    strict(withdrawn[-1])
    assert any("wrong patient" in n[3] for n in segments(withdrawn[-1], "NTE"))
    # the FHIR report and its observations: entered-in-error, nothing new created
    assert world.ehr.created == 14
    mine = [r["resource"] for r in world.ehr.resources.values()
            if series.study_instance_uid in json.dumps(r["resource"])]
    assert mine and {r["status"] for r in mine} == {"entered-in-error"}
    bundle = json.loads(next(Path(d.path) for d in world.rows(node, series)
                             if d.destination == "ehr" and "retracted" in d.path).read_bytes())
    validate_fhir(bundle)


def test_ack_ae_is_rejected_and_no_ack_is_retried(world: World) -> None:
    node = world.node
    series = full_head(93, [], n_slices=24, size=128)
    world.ris.answers = ["AE:Unknown order ACC"]
    world.send(node, series)

    def ris_row():
        rows = [d for d in world.rows(node, series) if d.destination == "ris"] \
            if node.db.study_detail(series.study_instance_uid) else []
        return rows[0] if rows else None

    assert poll_until(lambda: ris_row() is not None and ris_row().status != "pending", 120)
    row = ris_row()
    assert row.status == "rejected" and "Unknown order ACC" in row.last_error
    time.sleep(2.0)  # well past retry_initial_seconds: a rejection is not retried
    assert ris_row().attempts == 1 and ris_row().status == "rejected"
    assert node.db.get_series(series.series_instance_uid).state == "failed"
    status = status_data(node.db, kinds={d["name"]: d.get("kind", "dicom") for d in world.destinations})
    assert [d["kind"] for d in status["failed_deliveries"]] == ["hl7"]
    assert "rejected by ris (hl7) after 1 attempt" in format_status(status)

    world.ris.answers = ["none"]  # `ihd-node retry`: the first try gets no ACK (3 s timeout), the next one AA
    assert node.db.requeue_failed_deliveries(series.series_instance_uid) == {series.series_instance_uid: 1}
    node.wake_delivery()
    assert poll_until(lambda: ris_row().status == "sent", 30)
    detail = node.db.study_detail(series.study_instance_uid).series[0]
    outcomes = [a.outcome for a in detail.attempts[ris_row().id]]
    assert outcomes == ["rejected", "retry", "sent"]
    assert node.db.get_series(series.series_instance_uid).state == "delivered"
