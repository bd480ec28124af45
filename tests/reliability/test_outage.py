"""The PACS is down or says no when results are ready.

- Down, then back (a new MiniPACS on the same port): the outbox retries with growing gaps (exponential
  backoff, delivery_attempts rows) and delivers everything once the PACS answers again.
- Down for longer than delivery.give_up_after_seconds: the objects and the series are marked failed with
  the reason, shown by `ihd-node status` and kept in the log database; nothing more is tried.
- Up but refusing (0xA900, 0xC000): each object is booked "rejected" after ONE attempt, no loop. A PACS
  answering 0xA700 (out of resources) is retried until it has room again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import PACS_AET, wait_until
from faults import check_results_once, done, make_study, start, store

from ihd_node.sim.mini_pacs import MiniPACS

# Result objects of one positive phantom series here: SR + summary capture + 2 slice captures, the
# Segmentation of the attention regions and the key images.
OBJECTS = 6

N = 24  # slices per study: a full head (faults.make_study)


def attempts_of(node, series_uid: str) -> list[tuple[int, str, str, int | None, str | None]]:
    """(delivery id, attempt time, outcome, DIMSE status, error) of every attempt of a series, in order."""
    return node.query(
        "SELECT a.delivery_id, a.at, a.outcome, a.status, a.error FROM delivery_attempts a "
        "JOIN deliveries d ON d.id = a.delivery_id JOIN series s ON s.id = d.series_id "
        "WHERE s.series_instance_uid = ? ORDER BY a.delivery_id, a.id", series_uid)


def gaps(node, series_uid: str, delivery_id: int) -> list[float]:
    from datetime import datetime

    times = [datetime.fromisoformat(at) for d, at, *_ in attempts_of(node, series_uid) if d == delivery_id]
    return [round((b - a).total_seconds(), 3) for a, b in zip(times, times[1:], strict=False)]


def status_cli(node, *json_flag: str) -> str:
    ran = subprocess.run([sys.executable, "-m", "ihd_node", "status", "--config", str(node.config_path),
                          *json_flag], capture_output=True, text=True, timeout=60, env=node.env)
    assert ran.returncode == 0, ran.stderr
    # The text wraps at 100 columns: compare words, not line breaks.
    return ran.stdout if json_flag else " ".join(ran.stdout.split())


def test_pacs_down_then_back_retries_with_backoff_and_delivers(tmp_path: Path, pacs, make_node) -> None:
    port = pacs.port
    pacs.stop()  # the PACS is down before the results are ready
    study = make_study(tmp_path / "study", seed=21, n_slices=N)
    node = start(make_node(pacs, delivery={"retry_initial_seconds": 0.25, "retry_max_seconds": 2.0,
                                           "give_up_after_seconds": 600}))
    assert store(study.files, node.port) == [0x0000] * N
    sr_row = lambda: node.query("SELECT id, attempts FROM deliveries ORDER BY id LIMIT 1")  # noqa: E731
    assert wait_until(lambda: bool(sr_row()) and sr_row()[0][1] >= 5, 60), node.log()[-3000:]
    assert node.series_state(study.series_uid) == "delivering"
    text = status_cli(node)
    assert "retrying pacs" in text and "cannot connect" in text, text
    assert node.query("SELECT count(*) FROM deliveries WHERE status != 'pending'")[0][0] == 0

    # The same PACS comes back on the same port (new process, empty store).
    with MiniPACS(tmp_path / "pacs-back", ae_title=PACS_AET, port=port) as back:
        back_at = time.time()
        assert node.wait_state(study.series_uid, ("delivered",), 30) == "delivered", node.log()[-3000:]
        found = check_results_once(back, node, study)
        assert not found.duplicates
        first_arrival = min(o.received_at for o in back.objects()) - back_at
    sr_id = sr_row()[0][0]
    measured = gaps(node, study.series_uid, sr_id)
    outcomes = [o for d, _, o, *_ in attempts_of(node, study.series_uid) if d == sr_id]
    assert outcomes[-1] == "sent" and set(outcomes[:-1]) == {"retry"}
    # Backoff 0.25, 0.5, 1, 2, 2, ... s, read from the attempts' database timestamps: each gap at least the
    # policy's (so they grow until the cap), and none far beyond it (a generous bound: a busy machine is slow,
    # a retry that never came would be minutes late).
    policy = [min(0.25 * 2 ** i, 2.0) for i in range(len(measured))]
    assert all(m >= p - 0.05 for m, p in zip(measured, policy, strict=True)), (measured, policy)
    assert all(m <= p + 15.0 for m, p in zip(measured, policy, strict=True)), (measured, policy)
    print(f"\nFIGURE outage retry gaps (s): {measured}; policy {policy}; "
          f"first object {first_arrival:.2f} s after the PACS came back")
    done(node)


def test_pacs_down_too_long_is_marked_failed_with_the_reason(tmp_path: Path, pacs, make_node) -> None:
    pacs.stop()
    study = make_study(tmp_path / "study", seed=22, n_slices=N)
    node = start(make_node(pacs, delivery={"retry_initial_seconds": 0.25, "retry_max_seconds": 1.0,
                                           "give_up_after_seconds": 3.0}))
    assert store(study.files, node.port) == [0x0000] * N
    assert node.wait_state(study.series_uid, ("failed",), 60) == "failed", node.log()[-3000:]

    reason = node.query("SELECT reason FROM series")[0][0]
    assert reason.startswith(f"{OBJECTS} of {OBJECTS} result deliveries failed; first: pacs: gave up after"), reason
    rows = node.query("SELECT status, attempts, last_error FROM deliveries")
    assert {r[0] for r in rows} == {"failed"} and all(r[1] >= 3 for r in rows), rows
    assert all(r[2].startswith("gave up after") and "cannot connect" in r[2] for r in rows), rows
    # The event is booked just after the state's transaction: wait for it rather than read it at once.
    assert wait_until(lambda: node.query("SELECT count(*) FROM events WHERE kind = 'delivery' AND level = "
                                         "'WARNING' AND message LIKE 'series failed%'")[0][0] == 1, 10)
    text = status_cli(node)
    assert "Failed series: 1" in text and study.series_uid in text and "gave up after" in text, text
    data = json.loads(status_cli(node, "--json"))
    assert [s["series_instance_uid"] for s in data["failed_series"]] == [study.series_uid]
    assert {d["status"] for d in data["failed_deliveries"]} == {"failed"}
    # Failed is final: no attempt after it, even when the PACS is back.
    count = len(attempts_of(node, study.series_uid))
    with MiniPACS(tmp_path / "pacs-back", ae_title=PACS_AET, port=pacs.port) as back:
        time.sleep(2.5)
        assert back.objects() == []
    assert len(attempts_of(node, study.series_uid)) == count
    print(f"\nFIGURE give-up: {count} attempts over {OBJECTS} objects, reason: {reason}")
    done(node)


def test_pacs_rejects_objects_no_endless_loop_and_out_of_resources_is_retried(
        tmp_path: Path, pacs, make_node) -> None:
    node = start(make_node(pacs, delivery={"retry_initial_seconds": 0.2, "retry_max_seconds": 0.4,
                                           "give_up_after_seconds": 600}))
    studies = {}
    for seed, answer in ((23, 0xA900), (24, 0xC000)):
        pacs.status = answer
        study = studies[answer] = make_study(tmp_path / f"study{seed}", seed=seed, n_slices=N)
        assert store(study.files, node.port) == [0x0000] * N
        assert node.wait_state(study.series_uid, ("failed",), 60) == "failed", node.log()[-3000:]
    time.sleep(2.0)  # five retry intervals: a retried object would have several attempts by now
    for answer, study in studies.items():
        rows = node.query("SELECT d.status, d.attempts, d.last_status, d.last_error FROM deliveries d "
                          "JOIN series s ON s.id = d.series_id WHERE s.series_instance_uid = ?",
                          study.series_uid)
        assert len(rows) == OBJECTS and all(r[:3] == ("rejected", 1, answer) for r in rows), rows
        assert len(attempts_of(node, study.series_uid)) == OBJECTS
        assert {o for _, _, o, *_ in attempts_of(node, study.series_uid)} == {"rejected"}
        reason = node.query("SELECT reason FROM series WHERE series_instance_uid = ?", study.series_uid)[0][0]
        assert f"0x{answer:04X}" in reason, reason
    assert pacs.objects() == []  # a refusing MiniPACS stores nothing

    # 0xA700 (out of resources) is transient: retried, then delivered once the PACS has room.
    pacs.status = 0xA700
    study = make_study(tmp_path / "study25", seed=25, n_slices=N)
    assert store(study.files, node.port) == [0x0000] * N
    assert wait_until(lambda: len(attempts_of(node, study.series_uid)) >= 3 * OBJECTS, 60)  # 3 tries each
    assert node.series_state(study.series_uid) == "delivering"
    pacs.status = 0x0000
    assert node.wait_state(study.series_uid, ("delivered",), 30) == "delivered"
    assert not check_results_once(pacs, node, study).duplicates
    outcomes = [o for _, _, o, *_ in attempts_of(node, study.series_uid)]
    assert outcomes.count("sent") == OBJECTS and set(outcomes) == {"retry", "sent"}
    done(node)


def _healthz(port: int) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_database_down_during_analysis_the_node_carries_on_without_restart(
        tmp_path: Path, pacs, make_node, postgres) -> None:
    """Issue 17 (b): PostgreSQL stopped for 10 s while a series is analysed, then started again; the one inference
    thread survives, the series is analysed again (or failed with the reason), a second study is analysed, every
    SR is delivered, and /healthz and `ihd-node status` said "degraded" with the reason."""
    import re

    from sqlalchemy import create_engine, text

    url = postgres.create_database()
    node = make_node(pacs, database={"url": url}, node={"heartbeat_seconds": 1.0})
    # The analysis waits 5 s after writing its result files, so the booking meets the stopped server.
    start(node, extra_env={"IHD_NODE_SLOW_AT": "analysis.written", "IHD_NODE_SLOW_SECONDS": "5"})
    assert wait_until(lambda: re.search(r"web\.listening.*?port=(\d+)", node.log()), 30), node.log()[-2000:]
    web_port = int(re.search(r"web\.listening.*?port=(\d+)", node.log()).group(1))
    engine = create_engine(url, pool_pre_ping=True)

    def state(series_uid: str) -> str | None:
        try:
            with engine.connect() as conn:
                return conn.execute(text("SELECT state FROM series WHERE series_instance_uid = :u"),
                                    {"u": series_uid}).scalar()
        except Exception:  # noqa: BLE001 - the server is down or starting
            return None

    first, second = (make_study(tmp_path / f"s{i}", seed=40 + i, n_slices=N) for i in range(2))
    assert store(first.files, node.port) == [0x0000] * N
    assert wait_until(lambda: "fault.slowed" in node.log(), 120), node.log()[-3000:]
    engine.dispose()
    postgres.stop("fast")
    down_at = time.monotonic()
    seen: list[dict] = []

    def degraded() -> bool:
        code, body = _healthz(web_port)
        seen.append(body)
        return code == 503 and body["status"] == "degraded" and "OperationalError" in body.get("reason", "")

    assert wait_until(degraded, 9, 0.5), seen[-3:]
    time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
    postgres.start()
    assert postgres.wait_ready(60)

    assert wait_until(lambda: state(first.series_uid) in ("delivered", "failed"), 180), node.log()[-4000:]
    assert store(second.files, node.port) == [0x0000] * N
    assert wait_until(lambda: state(second.series_uid) == "delivered", 180), node.log()[-4000:]
    assert node.process.poll() is None, "the node ended"
    with engine.connect() as conn:
        first_state, reason = conn.execute(text("SELECT state, reason FROM series WHERE series_instance_uid = :u"),
                                           {"u": first.series_uid}).one()
        notes = [m for (m,) in conn.execute(text("SELECT message FROM events WHERE series_instance_uid = :u "
                                                  "ORDER BY id"), {"u": first.series_uid})]
        health = [m for (m,) in conn.execute(text("SELECT message FROM events WHERE kind = 'health' ORDER BY id"))]
    # Analysed again after the outage (same result UIDs), or failed WITH the database error as the reason.
    assert first_state == "delivered" or "database error" in (reason or ""), (first_state, reason, notes)
    assert any("database error during analysis" in m for m in notes), notes
    for study in ([first] if first_state == "delivered" else []) + [second]:
        received = [o.sop_instance_uid for o in pacs.objects(study.study_uid)]
        assert received and len(received) == len(set(received)), received  # each result object once
    # Once the database answers again the heartbeat books the episode, with the reason; status shows it.
    assert health and "OperationalError" in health[-1], health
    assert wait_until(lambda: _healthz(web_port)[1]["status"] == "ready", 30), _healthz(web_port)
    shown = status_cli(node)
    assert "degraded" in shown and "OperationalError" in shown, shown
    assert _healthz(web_port)[1]["checks"]["threads"]["detail"] == "all running"  # no thread died
    engine.dispose()
    done(node)
