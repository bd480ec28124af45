"""Issue 7 items 12 and 13, with a real `ihd-node serve` subprocess:

- `ihd-node status` tells a running node (heartbeat, host and pid of the process holding the work) from a
  cleanly stopped one (SIGTERM: "stopped since T") and from one that died without a clean stop (kill -9),
  and no longer shows a past "next attempt" time when nothing runs.
- `ihd-node retry SERIES_UID | --failed` re-queues deliveries that failed (PACS down past the give-up
  time) or were rejected; the running node sends them once the PACS is back, each object once.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import PACS_AET, wait_until
from faults import check_results_once, done, make_study, start, store

from ihd_node.sim.mini_pacs import MiniPACS

N = 24  # slices per study: a full head (faults.make_study)
# Result objects of one positive phantom series here: SR + summary capture + 2 slice captures, the
# Segmentation of the attention regions and the key images.
OBJECTS = 6
HEARTBEAT = {"heartbeat_seconds": 0.5}


def cli(node, *args: str, code: int = 0) -> str:
    ran = subprocess.run([sys.executable, "-m", "ihd_node", *args, "--config", str(node.config_path)],
                         capture_output=True, text=True, timeout=60, env=node.env)
    assert ran.returncode == code, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr
    return ran.stdout + ran.stderr


def status(node) -> tuple[dict, str]:
    """`status --json` and the text (whitespace made single: the text wraps at 100 columns)."""
    text = cli(node, "status")
    assert max(len(line) for line in text.splitlines()) <= 100, text
    return json.loads(cli(node, "status", "--json")), " ".join(text.split())


def last_heartbeat(node) -> str:
    return node.query("SELECT heartbeat_at FROM node_runs ORDER BY id DESC LIMIT 1")[0][0]


def test_status_tells_running_stopped_and_dead(tmp_path: Path, pacs, make_node) -> None:
    pacs.stop()  # results stay in the outbox, retried: the situation the issue saw after SIGTERM
    study = make_study(tmp_path / "study", seed=31, n_slices=N)
    node = start(make_node(pacs, node=HEARTBEAT, delivery={"retry_initial_seconds": 0.25,
                                                          "retry_max_seconds": 0.5,
                                                          "give_up_after_seconds": 600}))
    data, text = status(node)
    first_pid = node.process.pid
    assert data["node"]["state"] == "running", data["node"]
    cur = data["node"]["current"]
    assert cur["pid"] == first_pid and cur["host"] == socket.gethostname()
    assert cur["node_id"].startswith(f"{socket.gethostname()}:{first_pid}:")
    assert "Node: RUNNING since" in text and f"pid {first_pid}" in text, text

    assert store(study.files, node.port) == [0x0000] * N
    assert wait_until(lambda: (node.query("SELECT max(attempts) FROM deliveries")[0][0] or 0) >= 2, 60)
    # Issue 7 item 16: during the outage, one WARNING per destination and retry, not one per object.
    attempts = node.query("SELECT max(attempts) FROM deliveries")[0][0]
    retries = [line for line in node.log().splitlines() if "WARNING delivery.retry" in line]
    assert 1 <= len(retries) <= attempts + 1, retries
    assert all("destination=pacs" in line and f"objects={OBJECTS}" in line and "cannot connect" in line
               for line in retries), retries
    beat = last_heartbeat(node)
    assert wait_until(lambda: last_heartbeat(node) > beat, 10)  # it beats while the node runs

    assert node.terminate() == 0
    data, text = status(node)
    assert data["node"]["state"] == "stopped" and data["node"]["running"] == []
    assert data["node"]["current"]["stop_reason"] == "clean stop on SIGTERM"
    assert "Node: STOPPED since" in text and "clean stop on SIGTERM" in text and f"pid {first_pid}" in text
    assert "delivering" in text and "next attempt when the node runs again" in text, text
    assert not re.search(r"next (attempt )?20\d\d-", text), text  # no time in the past as "next attempt"

    start(node)
    second_pid = node.process.pid
    assert node.query("SELECT pid FROM node_runs ORDER BY id DESC LIMIT 1")[0][0] == second_pid
    node.kill9()  # no clean stop: the last heartbeat is all that is left
    time.sleep(3 * 0.5 + 2.5)
    data, text = status(node)
    assert data["node"]["state"] == "not_responding", data["node"]
    assert data["node"]["current"]["pid"] == second_pid and data["node"]["current"]["stopped_at"] is None
    assert "Node: NOT RUNNING" in text and f"pid {second_pid}" in text and "without a clean stop" in text

    # The next start books the killed run as ended without a clean stop (tests/test_db.py checks that).


def test_retry_resends_failed_and_rejected_deliveries(tmp_path: Path, pacs, make_node) -> None:
    port = pacs.port
    node = start(make_node(pacs, node=HEARTBEAT, delivery={"retry_initial_seconds": 0.25,
                                                          "retry_max_seconds": 0.5,
                                                          "give_up_after_seconds": 2.0}))
    # One series given up during an outage, one rejected by the PACS.
    pacs.status = 0xA900
    rejected = make_study(tmp_path / "rejected", seed=32, n_slices=N)
    assert store(rejected.files, node.port) == [0x0000] * N
    assert node.wait_state(rejected.series_uid, ("failed",), 60) == "failed", node.log()[-3000:]
    pacs.stop()
    outage = make_study(tmp_path / "outage", seed=33, n_slices=N)
    assert store(outage.files, node.port) == [0x0000] * N
    assert node.wait_state(outage.series_uid, ("failed",), 60) == "failed", node.log()[-3000:]
    assert "gave up after" in cli(node, "status")

    out = cli(node, "retry", "1.2.3.4.5", code=2)
    assert "no series 1.2.3.4.5" in out
    with MiniPACS(tmp_path / "pacs-back", ae_title=PACS_AET, port=port) as back:
        out = cli(node, "retry", outage.series_uid)
        assert f"re-queued {OBJECTS} object(s) of series {outage.series_uid}" in out
        assert f"pid {node.process.pid}" in out and "sends them now" in out
        assert node.wait_state(outage.series_uid, ("delivered",), 30) == "delivered", node.log()[-3000:]
        assert node.series_state(rejected.series_uid) == "failed"  # only the series asked for
        out = cli(node, "retry", outage.series_uid, code=2)
        assert "no failed or rejected result delivery" in out

        out = cli(node, "retry", "--failed")
        assert f"re-queued {OBJECTS} object(s) of series {rejected.series_uid}" in out
        assert outage.series_uid not in out
        assert node.wait_state(rejected.series_uid, ("delivered",), 30) == "delivered", node.log()[-3000:]
        for study in (outage, rejected):
            assert not check_results_once(back, node, study).duplicates
            assert len(back.objects(study.study_uid)) == OBJECTS
    assert "nothing to re-send" in cli(node, "retry", "--failed")
    events = node.query("SELECT message FROM events WHERE kind = 'retry' ORDER BY id")
    assert [m for (m,) in events] == [f"re-queued {OBJECTS} result deliveries of 1 series by ihd-node retry"] * 2
    done(node)
