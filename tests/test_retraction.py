"""Retraction end to end on loopback: a node sends a phantom's SR and captures to a PACS (real C-STORE
associations), the result is retracted, and the PACS receives an IHE IOCM rejection note (a KOS titled DCM
113037 listing the SR and every capture) that dciodvfy accepts; the series shows as retracted in the store,
`ihd-node status` and `ihd-node log`; a late instance does not analyse it again, the console's re-analyse
does; retracting twice, an unknown or an unanalysed series, or without a reason is refused with why. And the
outbox's fairness: a destination that accepts the connection and then never answers does not hold the PACS
copy (each destination is sent in its own thread)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import yaml
from heads import full_head
from loopback import destination, node_config, running_node, tiny_predictor
from test_clinical_messages import segments, strict
from test_report_common import dciodvfy, needs
from waiting import poll_until

from ihd_node.commands.log import format_log, log_data
from ihd_node.commands.status import format_status, status_data
from ihd_node.config import default_config
from ihd_node.retraction import RetractionRefused, message_id, retract
from ihd_node.sim.mini_pacs import MiniPACS, send_datasets

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
QUIET = 0.5


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "ihd-node"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


@needs("dciodvfy")
def test_retraction_sends_a_rejection_note_and_stops_late_reanalysis(tmp_path: Path) -> None:
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        config = node_config(tmp_path / "node", [destination("pacs", "PACS", pacs.port)],
                             series={"quiet_seconds": QUIET, "max_wait_seconds": 20.0},
                             analysis={"max_secondary_captures": 2})
        config_file = tmp_path / "config.yaml"  # the same node for the CLI
        config_file.write_text(yaml.safe_dump({
            "storage": {"dir": str(config.storage.dir)}, "database": {"url": config.database_url},
            "destinations": [destination("pacs", "PACS", pacs.port)]}))
        with running_node(config, tiny_predictor()) as node:
            series = full_head(81, ["subdural"], n_slices=24, size=64)
            uid = series.series_instance_uid
            late, first = series.datasets[-1], series.datasets[:-1]
            assert send_datasets(first, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                 calling_aet="CT1") == [0] * len(first)
            assert poll_until(lambda: node.db.get_series(uid).state == "delivered", 60)
            sent = {o.sop_instance_uid: o.sop_class_uid for o in pacs.objects()}
            assert len(sent) >= 2  # the SR and at least the summary capture

            refused = cli("retract", "--config", str(config_file), uid, "--reason", "  ")
            assert refused.returncode == 2 and "give the reason" in refused.stderr
            proc = cli("retract", "--config", str(config_file), uid, "--reason", "wrong patient (RIS ticket 42)")
            assert proc.returncode == 0, proc.stderr
            assert "pacs: IOCM rejection note (KOS)" in proc.stdout and "the running node sends" in proc.stdout

            def rejection_notes() -> list:
                return [o for o in pacs.objects() if o.sop_class_uid == KOS and o.sop_instance_uid not in sent]

            assert poll_until(lambda: len(rejection_notes()) == 1, 20)
            note = rejection_notes()[0]
            errors, _ = dciodvfy(note.path)
            assert errors == [], errors
            kos = pydicom.dcmread(note.path)
            title = kos.ConceptNameCodeSequence[0]
            assert (title.CodeValue, title.CodingSchemeDesignator) == ("113037", "DCM")
            listed = {item.ReferencedSOPInstanceUID: item.ReferencedSOPClassUID
                      for study in kos.CurrentRequestedProcedureEvidenceSequence
                      for ser in study.ReferencedSeriesSequence for item in ser.ReferencedSOPSequence}
            assert listed == sent  # every object the result sent: the SR, all captures, the key images
            assert "wrong patient (RIS ticket 42)" in str(kos.ContentSequence[-1].get("TextValue", "")) \
                or any("wrong patient" in str(i.get("TextValue", "")) for i in kos.ContentSequence)

            row = node.db.get_series(uid)
            assert row.state == "retracted" and "wrong patient" in row.reason
            analysis = node.db.latest_analysis(uid)
            assert analysis.retracted_by.endswith("(ihd-node retract)") and analysis.retraction_reason
            status = status_data(node.db)
            assert status["retracted"][0]["series_instance_uid"] == uid
            assert "Retracted results" in format_status(status)
            assert "RETRACTED" in format_log(log_data(node.db, timedelta(hours=1)))

            again = cli("retract", "--config", str(config_file), uid, "--reason", "again")
            assert again.returncode == 2 and "was retracted already" in again.stderr
            assert "Traceback" not in again.stderr
            unknown = cli("retract", "--config", str(config_file), "1.2.3.4", "--reason", "x")
            assert unknown.returncode == 2 and "no series 1.2.3.4" in unknown.stderr

            # A late slice is recorded, but the retracted result is not replaced by a new analysis.
            assert send_datasets([late], host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                 calling_aet="CT1") == [0]
            time.sleep(QUIET + 2.0)
            row = node.db.get_series(uid)
            assert row.state == "retracted" and row.n_instances == 24 and row.revision == 1
            # Asked for: the console's re-analyse takes it (a new revision, sent as a revision).
            ok, why = node.reanalyse(uid)
            assert ok, why
            assert poll_until(lambda: node.db.get_series(uid).state == "delivered", 60)
            assert node.db.get_series(uid).revision == 2
            with pytest.raises(RetractionRefused, match="no series"):
                retract(config, node.db, "9.9.9", reason="x", who="test", results_dir=config.storage.results_dir)


def test_unanalysed_series_is_not_retractable(tmp_path: Path) -> None:
    config = node_config(tmp_path / "node", [], series={"quiet_seconds": 30.0})
    with running_node(config, tiny_predictor()) as node:
        series = full_head(82, n_slices=24, size=64)
        assert send_datasets(series.datasets[:3], host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                             calling_aet="CT1") == [0] * 3
        with pytest.raises(RetractionRefused, match="was never analysed: there is no result to retract"):
            retract(config, node.db, series.series_instance_uid, reason="x", who="t",
                    results_dir=config.storage.results_dir)


def test_a_silent_destination_does_not_hold_the_pacs_copy(tmp_path: Path) -> None:
    # Accepts TCP connections (the kernel's backlog) and never answers: each send waits its full timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
            config = node_config(tmp_path / "node", [
                destination("silent", "SILENT", silent.getsockname()[1], timeout=30.0),  # listed first
                destination("pacs", "PACS", pacs.port)],
                series={"quiet_seconds": QUIET, "max_wait_seconds": 20.0}, analysis={"max_secondary_captures": 1})
            with running_node(config, tiny_predictor()) as node:
                series = full_head(83, n_slices=24, size=64)
                uid = series.series_instance_uid
                assert send_datasets(series.datasets, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                                     calling_aet="CT1") == [0] * len(series.datasets)
                assert poll_until(lambda: node.db.get_series(uid).state == "delivering", 60)
                finished = node.db.get_series(uid).analysis_finished
                assert poll_until(lambda: len(pacs.objects()) >= 2, 15)
                took = max(o.received_at for o in pacs.objects()) - finished.timestamp()
                assert took < 10.0, f"the PACS copy waited {took:.1f} s for the silent destination"
                detail = node.db.study_detail(series.study_instance_uid).series[0]
                rows = {d.destination: d.status for d in detail.deliveries}
                assert rows["silent"] == "pending"  # still in its 30 s timeout

                # This result predates any HL7 destination (no clinical.json): a retraction builds the
                # withdrawn ORU from the SR file alone.
                assert not list((node.results_dir / uid).glob("r0/clinical.json"))
                with_ris = default_config(tmp_path / "other", destinations=[
                    {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 2575, "sending_facility": "RAD",
                     "receiving_application": "RIS", "receiving_facility": "HOSP"}])
                done = retract(with_ris, node.db, uid, reason="test", who="t", results_dir=node.results_dir)
                assert done.notices == {"ris": "withdrawn ORU (W)"} and not done.skipped
                oru = (node.results_dir / uid / "r0" / "ORU_retracted_ris.hl7").read_bytes().decode()
                strict(oru)
                assert segments(oru, "MSH")[0][9] == message_id(uid, 0, "retracted")
                assert {o[11] for o in segments(oru, "OBX")} == {"W"}
                assert any("RESULT WITHDRAWN" in n[3] for n in segments(oru, "NTE"))
    finally:
        silent.close()
