"""`ihd-node status` and `ihd-node log` on a populated log database (real SQLite file, real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from ihd_node.classes import CLASSES
from ihd_node.commands.log import format_log, log_data, parse_since
from ihd_node.commands.status import format_status, status_data
from ihd_node.config import default_config
from ihd_node.errors import UserError
from ihd_node.store import Database, ResultObject, open_database, utcnow

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
NOW = utcnow()


def ago(seconds: float):
    return NOW - timedelta(seconds=seconds)


def receive(
    db: Database, study: str, series: str, n: int, t: float, acc: str, desc: str = "HEAD 5mm"
) -> None:
    for i in range(n):
        db.record_instance(
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=f"{series}.{i}",
            sop_class_uid=CT,
            path=f"/spool/{series}/{i}.dcm",
            size=500_000,
            sha256=f"{series}{i}",
            calling_aet="ORTHANC",
            association_id=f"assoc-{series}",
            accession_number=acc,
            modality="CT",
            series_description=desc,
            received_at=ago(t),
        )


def analyze(db: Database, series: str, positives: dict[str, float], t: float, dests=("pacs",)) -> None:
    probs = dict.fromkeys(CLASSES, 0.02) | positives
    db.finish_analysis(
        series,
        model_name="ihd-cnn-bilstm",
        model_version="0.1",
        probabilities=probs,
        positive_classes=list(positives),
        thresholds=dict.fromkeys(CLASSES, 0.5),
        n_slices=28,
        objects=[ResultObject(f"9.{series}.1", SR, "/results/sr.dcm")],
        destinations=list(dests),
        timings={"load": 0.3, "inference": 1.2, "gradcam": 0.5, "report": 0.2},
        started=ago(t + 2.2),
        now=ago(t),
    )


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    """A config file and a database with one study of each kind a shift produces."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage: {{dir: {tmp_path / 'state'}}}\n"
        "destinations:\n  - {name: pacs, ae_title: PACS, host: 127.0.0.1, port: 4242}\n"
    )
    db = open_database(default_config(tmp_path / "state").database_url)
    policy = default_config(tmp_path).delivery
    # 1. Positive study, delivered: last image 600 s ago, result stored 4.5 s later.
    receive(db, "1.1", "1.1.1", 28, 600, "ACC-POS")
    db.association_released("assoc-1.1.1", ago(599.5))
    db.mark_complete("1.1.1", "quiet", ago(598))
    db.set_series_state("1.1.1", "analyzing", expect="complete", analysis_started=ago(597.8))
    analyze(db, "1.1.1", {"any": 0.97, "subdural": 0.95}, t=595.8)
    [d] = db.due_deliveries(NOW)
    db.record_attempt(d.id, status=0, policy=policy, now=ago(595.5))
    # 2. Negative study, delivered.
    receive(db, "2.1", "2.1.1", 30, 300, "ACC-NEG")
    db.mark_complete("2.1.1", "max_wait", ago(180))
    db.set_series_state("2.1.1", "analyzing", analysis_started=ago(179))
    analyze(db, "2.1.1", {}, t=177)
    [d] = db.due_deliveries(NOW)
    db.record_attempt(d.id, status=0, policy=policy, now=ago(176))
    # 3. Ignored localizer series in the same study.
    receive(db, "2.1", "2.1.2", 2, 300, "ACC-NEG", desc="SCOUT")
    db.set_series_state("2.1.2", "ignored", "localizer (ImageType LOCALIZER)")
    # 4. A study whose PACS refuses the SR: failed with the reason.
    receive(db, "3.1", "3.1.1", 24, 200, "ACC-REJ")
    db.set_series_state("3.1.1", "analyzing", analysis_started=ago(197))
    analyze(db, "3.1.1", {"any": 0.8, "epidural": 0.7}, t=195)
    [d] = db.due_deliveries(NOW)
    db.record_attempt(
        d.id, status=0xA900, error="Dataset does not match SOP class", policy=policy, now=ago(194)
    )
    # 5. In flight: one series still arriving, one being delivered to a PACS that is down.
    receive(db, "4.1", "4.1.1", 12, 5, "ACC-NOW")
    receive(db, "5.1", "5.1.1", 26, 60, "ACC-RETRY")
    db.set_series_state("5.1.1", "analyzing", analysis_started=ago(57))
    analyze(db, "5.1.1", {"any": 0.6, "intraventricular": 0.55}, t=55)
    [d] = db.due_deliveries(NOW)
    db.record_attempt(d.id, status=None, error="connection refused", policy=policy, now=ago(50))
    # 6. An old study outside a 2 h window.
    receive(db, "6.1", "6.1.1", 20, 3 * 86400, "ACC-OLD")
    db.log_event(
        "rejected",
        "association from 10.9.9.9 refused: calling AE EVIL not allowed",
        level="WARNING",
        calling_aet="EVIL",
        peer_address="10.9.9.9",
    )
    db.close()
    return config


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "ihd-node"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def test_parse_since() -> None:
    assert parse_since("30m") == timedelta(minutes=30) and parse_since("2h") == timedelta(hours=2)
    assert parse_since("7d") == timedelta(days=7) and parse_since("1.5h") == timedelta(minutes=90)
    with pytest.raises(UserError, match="e.g. 30m, 2h or 7d"):
        parse_since("two hours")


def test_status_shows_in_flight_outbox_and_failures(populated: Path) -> None:
    db = Database(default_config(populated.parent / "state").database_url, create=False)
    data = status_data(db, NOW)
    states = {x["accession_number"]: x["state"] for x in data["in_flight"]}
    assert states == {"ACC-NOW": "received", "ACC-RETRY": "delivering", "ACC-OLD": "received"}
    now_row = next(x for x in data["in_flight"] if x["accession_number"] == "ACC-NOW")
    assert now_row["association_open"] and now_row["n_instances"] == 12
    assert data["outbox"]["pending"] == 1
    [retry] = data["outbox"]["retrying"]
    assert retry["last_error"] == "connection refused" and retry["attempts"] == 1
    [failed] = data["failed_series"]
    assert failed["accession_number"] == "ACC-REJ" and "1 of 1 result deliveries failed" in failed["reason"]
    [fd] = data["failed_deliveries"]
    assert fd["status"] == "rejected" and fd["last_status"] == 0xA900
    text = format_status(data)
    assert "In flight: 3 series" in text and "association open" in text and "0 sent, 1 pending" in text
    assert "Outbox: 1 object pending" in text and "connection refused" in text
    assert "retrying pacs: 1 object, 1 attempt so far" in text
    assert "rejected by pacs after 1 attempt: 1 object of series 3.1.1" in text
    assert "Dataset does not match SOP class" in text
    assert "Node: never started on this database" in text
    db.close()


def test_log_shows_findings_and_time_to_result(populated: Path) -> None:
    db = Database(default_config(populated.parent / "state").database_url, create=False)
    data = log_data(db, timedelta(hours=2), NOW)
    by_acc = {st["accession_number"]: st for st in data["studies"]}
    assert set(by_acc) == {"ACC-POS", "ACC-NEG", "ACC-REJ", "ACC-NOW", "ACC-RETRY"}  # ACC-OLD is older
    assert [st["accession_number"] for st in data["studies"]][0] == "ACC-NOW"  # newest first
    [pos] = by_acc["ACC-POS"]["series"]
    assert pos["state"] == "delivered" and pos["findings"] == {"any": 0.97, "subdural": 0.95}
    assert pos["time_to_result_seconds"] == pytest.approx(4.5, abs=0.01)
    assert pos["completion_rule"] == "quiet"
    st = pos["stages"]
    assert st["wait_seconds"] == pytest.approx(2.0, abs=0.01) and st["inference_seconds"] == 1.2
    assert st["delivery_seconds"] == pytest.approx(0.3, abs=0.01)
    neg, scout = by_acc["ACC-NEG"]["series"]
    assert neg["findings"] == {} and neg["completion_rule"] == "max_wait"
    assert scout["state"] == "ignored" and scout["reason"].startswith("localizer")
    text = format_log(data)
    assert "5 studies since" in text
    assert "any 0.97, subdural 0.95" in text and "negative (any 0.02)" in text and "localizer" in text
    assert "4.5 s" in text and "infer 1.2" in text
    db.close()


def test_cli_status_and_log(populated: Path) -> None:
    proc = run_cli("status", "--config", str(populated))
    assert proc.returncode == 0, proc.stderr
    assert "ACC-RETRY" in proc.stdout and "delivering" in proc.stdout
    proc = run_cli("status", "--config", str(populated), "--json")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["in_flight"]) == 3
    proc = run_cli("log", "--config", str(populated), "--since", "2h")
    assert proc.returncode == 0 and "ACC-POS" in proc.stdout and "ACC-OLD" not in proc.stdout
    proc = run_cli("log", "--config", str(populated), "--since", "7d", "--json")
    data = json.loads(proc.stdout)
    assert len(data["studies"]) == 6
    assert "patient" not in proc.stdout.lower()
    proc = run_cli("log", "--config", str(populated), "--since", "soon")
    assert proc.returncode == 2 and "--since" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_without_database_does_not_create_one(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{dir: {tmp_path / 'state'}}}\n")
    proc = run_cli("status", "--config", str(config))
    assert proc.returncode == 2 and "no log database" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "state").exists()


LONG_UID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 3 + "12345678"  # 64 characters, the most a UI has


def test_status_and_log_fit_100_columns_with_the_longest_values(tmp_path: Path) -> None:
    """Issue 7 item 16: 64-character UIDs, 16-character accessions, long descriptions and errors."""
    assert len(LONG_UID) == 64
    db = open_database(f"sqlite:///{tmp_path / 'ihd.sqlite'}")
    policy = default_config(tmp_path).delivery
    for k, (state_positive, error) in enumerate([({}, None), ({"any": 0.9, "epidural": 0.8, "subdural": 0.7,
                                                  "intraparenchymal": 0.6, "intraventricular": 0.55,
                                                  "subarachnoid": 0.5}, "x" * 150)]):
        series = LONG_UID[:-1] + str(k)
        receive(db, LONG_UID[:-2] + str(k) + "9", series, 1, 100 - k, "ACC4567890123456",
                desc="HEAD ROUTINE AXIAL 5.0 MM BRAIN KERNEL H30S WITH A DESCRIPTION THAT IS LONG")
        db.set_series_state(series, "analyzing", analysis_started=ago(90))
        analyze(db, series, state_positive, t=80)
        [d] = db.due_deliveries(NOW)
        db.record_attempt(d.id, status=None if k else 0xA900, error=error or "refused " * 20, policy=policy,
                          now=ago(70))
    db.start_run(host="h" * 60, pid=4194304, version="0.1.0", heartbeat_seconds=10, now=ago(5))
    text = format_status(status_data(db, NOW)) + "\n" + format_log(log_data(db, timedelta(hours=1), NOW))
    db.close()
    long = [line for line in text.splitlines() if len(line) > 100]
    assert not long, "\n".join(long)
    assert LONG_UID[:-1] + "1" in text and "1 image)" in text and "1 images" not in text
    assert "intraventricular 0.55," in text and "Node: RUNNING" in text
