"""The log database on a real SQLite file and a real PostgreSQL server (tests/pg.py): WAL, owner-only
files, idempotent receiving, completion, the outbox's retry bookkeeping, recovery queries and the absence
of patient identity columns."""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from ihd_node.classes import CLASSES
from ihd_node.config import default_config
from ihd_node.store import (
    Base,
    Database,
    InstanceBatcher,
    InstanceRecord,
    ResultObject,
    RetryPolicy,
    Series,
    classify_status,
    open_database,
    utcnow,
)
from ihd_node.store.arrivals import note_open_series

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
POLICY = default_config("/tmp").delivery  # 5 s doubling to 300 s, give up after 1 day


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    database = open_database(f"sqlite:///{tmp_path / 'state' / 'ihd.sqlite'}")
    yield database
    database.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """Everything the node records, on both databases it supports (PostgreSQL: tests/pg.py's server)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'ihd.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = open_database(url)
    yield database
    database.close()


def receive(
    db: Database,
    sop: str,
    *,
    series: str = "1.2.3",
    sha: str | None = None,
    t: float = 0.0,
    assoc: str = "a1",
):
    return db.record_instance(
        study_instance_uid="1.2",
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=CT,
        path=f"/spool/{series}/{sop}.dcm",
        size=1000,
        sha256=sha or f"sha-{sop}",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_aet="PACS",
        peer_address="127.0.0.1",
        association_id=assoc,
        accession_number="ACC42",
        modality="CT",
        series_description="HEAD 5mm",
        received_at=at(t),
    )


def analyze(
    db: Database, series: str = "1.2.3", *, n_objects: int = 2, destinations=("pacs",), t: float = 10
):
    probs = dict.fromkeys(CLASSES, 0.01) | {"any": 0.93, "subdural": 0.91}
    objects = [
        ResultObject(f"9.{series}.{i}", SR if i == 0 else CT, f"/results/{i}.dcm") for i in range(n_objects)
    ]
    return db.finish_analysis(
        series,
        model_name="ihd-cnn-bilstm",
        model_version="0.1",
        probabilities=probs,
        positive_classes=["subdural", "any"],
        thresholds=dict.fromkeys(CLASSES, 0.5),
        n_slices=28,
        n_model_slices=28,
        sr_sop_instance_uid=f"9.{series}.0",
        n_secondary_captures=n_objects - 1,
        objects=objects,
        destinations=list(destinations),
        timings={"load": 0.2, "inference": 1.5, "gradcam": 0.4, "report": 0.1},
        started=at(t - 2),
        now=at(t),
    )


def test_sqlite_file_is_wal_and_owner_only(tmp_path: Path, sqlite_db: Database) -> None:
    db = sqlite_db
    path = tmp_path / "state" / "ihd.sqlite"
    assert db.journal_mode() == "wal"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    receive(db, "1.2.3.1")
    with sqlite3.connect(path) as conn:  # another process's view: WAL is a property of the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for extra in ("ihd.sqlite-wal", "ihd.sqlite-shm"):
        if (path.parent / extra).exists():
            assert stat.S_IMODE((path.parent / extra).stat().st_mode) == 0o600


def test_existing_directory_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o750)
    os.chmod(tmp_path / "d", 0o750)
    open_database(f"sqlite:///{tmp_path / 'd' / 'x.sqlite'}").close()
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "d" / "x.sqlite").stat().st_mode) == 0o600


def test_no_patient_identity_columns() -> None:
    for table in Base.metadata.tables.values():
        if table.name == "audit_patients":  # IHE ATNA: written only with audit.patient_ids on (test_audit_messages)
            continue
        for column in table.columns:
            name = column.name.lower()
            assert (
                "patient" not in name and "birth" not in name and "name" not in name.replace("model_name", "")
            ), f"{table.name}.{column.name}"


def test_instances_are_recorded_idempotently(db: Database) -> None:
    first = receive(db, "1.2.3.1")
    assert first.new and not first.changed_content and first.previous_state is None
    again = receive(db, "1.2.3.1", t=1)
    assert not again.new and not again.changed_content and not again.reopened
    changed = receive(db, "1.2.3.1", sha="other-bytes", t=2)
    assert not changed.new and changed.changed_content
    receive(db, "1.2.3.2", t=3)
    [inst1, inst2] = db.series_instances("1.2.3")
    assert inst1.sop_instance_uid == "1.2.3.1" and inst1.sha256 == "other-bytes"
    assert inst2.path == "/spool/1.2.3/1.2.3.2.dcm" and inst2.received_at == at(3)
    series = db.get_series("1.2.3")
    assert series.n_instances == 2 and series.state == "received" and series.modality == "CT"
    assert series.study.accession_number == "ACC42" and series.study_instance_uid == "1.2"
    assert series.first_received == at(0) and series.last_received == at(3)
    assert series.first_received.tzinfo is not None


def test_completion_rules(db: Database) -> None:
    receive(db, "1.2.3.1", t=0)
    receive(db, "1.2.3.2", t=1)
    receive(db, "1.2.4.1", series="1.2.4", t=1, assoc="a2")
    # Association still open: only the long rule can fire.
    assert db.series_to_complete(at(5), quiet_seconds=2, max_wait_seconds=120) == []
    assert db.next_completion_time(2, 120) == at(121)
    assert db.association_released("a1", at(2)) == 1
    assert db.next_completion_time(2, 120) == at(3)
    [cand] = db.series_to_complete(at(3), quiet_seconds=2, max_wait_seconds=120)
    assert (cand.series_instance_uid, cand.rule) == ("1.2.3", "quiet")
    assert db.mark_complete("1.2.3", cand.rule, at(3))
    assert not db.mark_complete("1.2.3", "quiet", at(3))  # no longer "received"
    [cand] = db.series_to_complete(at(121), quiet_seconds=2, max_wait_seconds=120)
    assert (cand.series_instance_uid, cand.rule) == ("1.2.4", "max_wait")
    series = db.get_series("1.2.3")
    assert series.state == "complete" and series.completion_rule == "quiet" and series.completed == at(3)


def test_an_instance_arriving_after_the_judgement_voids_the_completion(db: Database) -> None:
    receive(db, "1.2.3.1", t=0)
    db.association_released("a1", at(1))
    [cand] = db.series_to_complete(at(3), quiet_seconds=2, max_wait_seconds=120)
    receive(db, "1.2.3.2", t=3, assoc="a2")  # between the query and the compare-and-set
    assert not db.mark_complete("1.2.3", cand.rule, at(3), last_received=cand.last_received)
    assert db.get_series("1.2.3").state == "received"


def test_state_changes_compare_and_set(db: Database) -> None:
    receive(db, "1.2.3.1")
    assert db.set_series_state(
        "1.2.3", "complete", expect="received", completion_rule="quiet", completed=at(3)
    )
    assert db.set_series_state("1.2.3", "analyzing", expect="complete", analysis_started=at(4))
    assert not db.set_series_state("1.2.3", "analyzing", expect="complete")
    assert not db.set_series_state("no.such.series", "failed", "x")
    with pytest.raises(ValueError):
        db.set_series_state("1.2.3", "nonsense")
    with pytest.raises(ValueError):
        db.set_series_state("1.2.3", "failed", bogus_time=at(1))
    assert db.set_series_state("1.2.3", "ignored", "3 slices (min_slices 10)")
    series = db.get_series("1.2.3")
    assert series.state == "ignored" and series.reason == "3 slices (min_slices 10)"
    assert series.analysis_started == at(4)


def test_late_instance_reopens_series_and_reanalysis_supersedes(db: Database) -> None:
    receive(db, "1.2.3.1")
    db.set_series_state("1.2.3", "analyzing", analysis_started=at(8))
    first = analyze(db, t=10)
    assert first.revision == 1 and db.get_series("1.2.3").state == "delivering"
    late = receive(db, "1.2.3.9", t=20, assoc="a7")
    assert late.new and late.reopened and late.previous_state == "delivering"
    series = db.get_series("1.2.3")
    assert series.state == "received" and "late instance" in series.reason and series.completed is None
    assert series.association_released is None and series.last_association == "a7"
    second = analyze(db, t=30)
    assert second.revision == 2
    # Same deterministic UIDs from the new analysis: the outbox rows move to it and are pending again.
    due = db.due_deliveries(at(30))
    assert {d.sop_instance_uid for d in due} == {"9.1.2.3.0", "9.1.2.3.1"}
    assert all(d.analysis_id == second.id for d in due)
    assert db.latest_analysis("1.2.3").id == second.id


def test_one_retry_policy_from_the_delivery_config() -> None:
    """Deliveries and alerts retry by one RetryPolicy, set by the delivery.* keys as before the split."""
    policy = RetryPolicy.of(POLICY)
    assert policy == RetryPolicy(5.0, 300.0, 86400.0) and RetryPolicy.of(policy) is policy
    assert [policy.backoff(n) for n in (1, 2, 3, 10, 5000)] == [5, 10, 20, 300, 300]  # doubles, caps, never overflows
    assert policy.next_attempt(1, at(0), at(10)) == at(15)
    assert policy.next_attempt(3, at(0), at(100)) == at(120)
    assert policy.next_attempt(4, at(0), at(86399)) == at(86399 + 40)
    assert policy.next_attempt(5, at(0), at(86400)) is None  # waited give_up_after_seconds since queued


def test_alerts_retry_and_give_up_like_deliveries(db: Database) -> None:
    receive(db, "1.2.3.1")
    probs = dict.fromkeys(CLASSES, 0.01) | {"any": 0.93, "subdural": 0.91}
    db.finish_analysis("1.2.3", model_name="m", model_version="1", probabilities=probs,
                       positive_classes=["subdural", "any"], thresholds=dict.fromkeys(CLASSES, 0.5), n_slices=28,
                       objects=[], destinations=(), alert_channels=("pager", "mail"), now=at(10))
    pager, mail = sorted(db.due_alerts(at(10)), key=lambda a: a.channel != "pager")
    short = RetryPolicy(1.0, 4.0, 60.0)
    a = db.record_alert_attempt(pager.id, outcome="retry", error="down", policy=short, now=at(10))
    assert a.status == "pending" and a.next_attempt_at == at(11)
    a = db.record_alert_attempt(pager.id, outcome="retry", error="down", policy=short, now=at(11))
    assert a.next_attempt_at == at(13)
    a = db.record_alert_attempt(pager.id, outcome="retry", error="still down", policy=short, now=at(70))
    assert a.status == "failed" and a.last_error == "gave up after 3 attempts: still down"
    # The config keys work as the policy, as the alert outbox passes them.
    a = db.record_alert_attempt(mail.id, outcome="retry", error=None, policy=POLICY, now=at(10))
    assert a.status == "pending" and a.next_attempt_at == at(15)
    assert db.record_alert_attempt(mail.id, outcome="sent", error=None, policy=POLICY, now=at(15)).status == "sent"


def test_outbox_backoff_reject_and_give_up(db: Database) -> None:
    receive(db, "1.2.3.1")
    analysis = analyze(db, n_objects=2, destinations=("pacs", "archive"), t=10)
    assert analysis.positives() == ["any", "subdural"] and analysis.probabilities()["subdural"] == 0.91
    due = db.due_deliveries(at(10))
    assert len(due) == 4 and {d.destination for d in due} == {"pacs", "archive"}
    assert db.due_deliveries(at(9)) == []
    pacs = [d for d in due if d.destination == "pacs"]
    archive = [d for d in due if d.destination == "archive"]

    # PACS down: retry after 5, then 10 s.
    r = db.record_attempt(pacs[0].id, status=None, error="connection refused", policy=POLICY, now=at(10))
    assert r.delivery_status == "pending" and r.next_attempt_at == at(15) and r.series_state is None
    r = db.record_attempt(pacs[0].id, status=None, error="connection refused", policy=POLICY, now=at(15))
    assert r.next_attempt_at == at(25)
    assert pacs[0].id not in {d.id for d in db.due_deliveries(at(24))}
    assert pacs[0].id in {d.id for d in db.due_deliveries(at(25))}
    # Out of resources is transient too.
    r = db.record_attempt(pacs[1].id, status=0xA700, policy=POLICY, now=at(10))
    assert r.delivery_status == "pending"
    # Warning counts as delivered; a refusal is final (no endless loop).
    assert db.record_attempt(pacs[1].id, status=0xB007, policy=POLICY, now=at(16)).delivery_status == "sent"
    assert (
        db.record_attempt(archive[0].id, status=0x0000, policy=POLICY, now=at(11)).delivery_status == "sent"
    )
    r = db.record_attempt(archive[1].id, status=0xC000, error="Cannot understand", policy=POLICY, now=at(11))
    assert r.delivery_status == "rejected" and r.series_state is None  # pacs[0] still pending
    # Down for a day: failed, and the series is finished as failed with the reason.
    r = db.record_attempt(pacs[0].id, status=None, error="timed out", policy=POLICY, now=at(10 + 86400))
    assert r.delivery_status == "failed" and r.series_state == "failed"
    series = db.get_series("1.2.3")
    assert series.state == "failed" and "2 of 4 result deliveries failed" in series.reason
    assert db.due_deliveries(at(10**6)) == []
    with db.read_session() as s:
        from ihd_node.store import Delivery, DeliveryAttempt

        attempts = s.query(DeliveryAttempt).filter_by(delivery_id=pacs[0].id).count()
        row = s.get(Delivery, pacs[0].id)
        assert attempts == 3 and row.attempts == 3 and "gave up after 3 attempts" in row.last_error
        assert row.last_status is None


def test_all_sent_means_delivered(db: Database) -> None:
    receive(db, "1.2.3.1")
    analyze(db, n_objects=2, t=10)
    for d in db.due_deliveries(at(10)):
        r = db.record_attempt(d.id, status=0, policy=POLICY, now=at(12), seconds=0.05)
    assert r.series_state == "delivered"
    series = db.get_series("1.2.3")
    assert series.state == "delivered" and series.delivered == at(12) and series.analysis_started == at(8)
    assert db.spool_expired(utcnow() + timedelta(hours=25), keep_hours=24)[0].series_instance_uid == "1.2.3"
    db.mark_spool_removed("1.2.3")
    assert db.spool_expired(utcnow() + timedelta(hours=25), keep_hours=24) == []


def test_no_destinations_means_analyzed(db: Database) -> None:
    receive(db, "1.2.3.1")
    analyze(db, destinations=(), t=10)
    assert db.get_series("1.2.3").state == "analyzed" and db.due_deliveries(at(99)) == []


def test_classify_status() -> None:
    assert [
        classify_status(s) for s in (0x0000, 0x0001, 0xB000, 0xB007, 0xA700, None, 0xA900, 0xC211, 0x0122)
    ] == ["sent", "sent", "sent", "sent", "retry", "retry", "rejected", "rejected", "rejected"]


def test_unfinished_series_for_recovery(db: Database) -> None:
    for i, state in enumerate(("received", "complete", "analyzing", "delivered", "ignored", "failed")):
        receive(db, f"5.{i}.1", series=f"5.{i}", t=i)
        db.set_series_state(f"5.{i}", state)
    assert [s.series_instance_uid for s in db.unfinished_series()] == ["5.0", "5.1", "5.2"]
    # At start-up an association still open ended without a release: its series waits for max_wait.
    assert note_open_series(db, "association was open when the node stopped") == 1  # only the "received" one
    assert db.series_to_complete(at(103), 2, 120) == []  # no release, so not by the quiet rule
    [cand] = db.series_to_complete(at(121), 2, 120)
    assert cand.series_instance_uid == "5.0" and cand.rule == "max_wait"


def test_events_are_rows_and_log_lines(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ihd_node.events"):
        db.log_event(
            "ignored",
            "3 slices (min_slices 10)",
            level="warning",
            series_instance_uid="1.2.3",
            calling_aet="PACS",
        )
    assert 'ignored series=1.2.3 aet=PACS msg="3 slices (min_slices 10)"' in caplog.text
    with db.read_session() as s:
        from ihd_node.store import Event

        [event] = s.query(Event).all()
        assert event.level == "WARNING" and event.kind == "ignored" and event.at.tzinfo is not None


def test_concurrent_writers_from_threads(db: Database) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                receive(db, f"7.{n}.{i}", series=f"7.{n % 2}", t=i, assoc=f"a{n}")
                receive(db, f"7.{n}.{i}", series=f"7.{n % 2}", t=i, assoc=f"a{n}")  # resend
        except BaseException as exc:  # noqa: BLE001 - report any failure from the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert db.get_series("7.0").n_instances == 50 and db.get_series("7.1").n_instances == 50
    assert len(db.series_instances("7.0")) == 50


def test_in_memory_url_and_naive_times(tmp_path: Path) -> None:
    db = open_database("sqlite://")
    receive(db, "1.1")
    assert db.get_series("1.2.3").n_instances == 1
    with pytest.raises(Exception, match="naive datetime"):
        db.record_instance(
            study_instance_uid="1",
            series_instance_uid="2",
            sop_instance_uid="3",
            sop_class_uid=CT,
            path="p",
            size=1,
            sha256="s",
            received_at=datetime(2025, 1, 1),
        )
    assert set(inspect(db.engine).get_table_names()) >= {
        "studies",
        "series",
        "instances",
        "analyses",
        "deliveries",
        "delivery_attempts",
        "events",
    }


DOC = Path(__file__).resolve().parents[1] / "docs" / "database.md"


def test_docs_name_every_column() -> None:
    doc = DOC.read_text()
    for table in Base.metadata.tables.values():
        section = doc.split(f"### {table.name}", 1)
        assert len(section) == 2, f"docs/database.md has no section for table {table.name}"
        body = section[1].split("\n### ", 1)[0]
        for column in table.columns:
            assert f"`{column.name}`" in body, f"{table.name}.{column.name} is not in docs/database.md"


def test_docs_queries_run_on_a_real_database(tmp_path: Path) -> None:
    path = tmp_path / "ihd.sqlite"
    db = open_database(f"sqlite:///{path}")
    now = utcnow()
    db.record_instance(
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        sop_instance_uid="1.2.3.1",
        sop_class_uid=CT,
        path="p",
        size=1,
        sha256="s",
        accession_number="ACC42",
        received_at=now - timedelta(seconds=5),
    )
    db.record_instance(
        study_instance_uid="1.2",
        series_instance_uid="1.2.4",
        sop_instance_uid="1.2.4.1",
        sop_class_uid=CT,
        path="p",
        size=1,
        sha256="t",
        accession_number="ACC42",
        received_at=now,
    )
    db.set_series_state("1.2.4", "ignored", "1 slice (min_slices 10)")
    analyze(db, "1.2.3", destinations=("pacs", "archive"), n_objects=1, t=0)
    for d in db.due_deliveries(utcnow() + timedelta(days=1)):
        db.record_attempt(d.id, status=0 if d.destination == "pacs" else 0xA900, policy=POLICY, now=utcnow())
    db.set_series_state("1.2.3", "delivered", delivered=utcnow())
    db.log_event("rejected", "calling AE EVIL not allowed", level="WARNING", calling_aet="EVIL")
    db.close()
    queries = [block.split("```", 1)[0] for block in DOC.read_text().split("```sql\n")[1:]]
    assert len(queries) == 7  # every documented query runs (a new one gets its check here)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        results = [conn.execute(q).fetchall() for q in queries]
    ttr, failed, reads, per_day, ignored, study, warnings = results
    assert reads == []  # runs on the schema; this database has no reads
    assert len(ttr) == 1 and ttr[0][0] == "ACC42"
    assert [(r[1], r[2]) for r in failed] == [("archive", "rejected")]
    assert per_day[0][1:4] == (1, 1, 0)  # one series analyzed, ICH positive, no epidural
    assert ignored[0][0] == "1 slice (min_slices 10)"
    assert {r[0] for r in study} == {"1.2.3", "1.2.4"}
    assert warnings[0][3] == "EVIL"


def test_instance_arriving_during_analysis_keeps_series_open(db: Database) -> None:
    receive(db, "1.2.3.1")
    db.set_series_state("1.2.3", "analyzing", analysis_started=at(8))
    assert receive(db, "1.2.3.2", t=9).reopened
    analysis = analyze(db, t=10)
    series = db.get_series("1.2.3")
    assert series.state == "received" and series.revision == 1 == analysis.revision
    assert (
        len(db.due_deliveries(at(10))) == 2
    )  # these results still go out; the next analysis supersedes them


def test_node_runs_heartbeat_and_unclean_ends(db: Database) -> None:
    """Issue 7 item 12: a run is alive while it beats; the next start closes runs that never stopped."""
    first = db.start_run(host="pacs-ai", pid=100, version="0.1.0", heartbeat_seconds=10, now=at(0))
    assert first.node_id == "pacs-ai:100:2025-01-01T12:00:00+00:00"
    db.heartbeat(first.id, now=at(25))
    [run] = db.node_runs()
    assert run.alive(at(25 + 32)) and not run.alive(at(25 + 33))  # three periods + 2 s of grace
    # kill -9: no stop booked. A later start (another pid) closes it at its last heartbeat.
    second = db.start_run(host="pacs-ai", pid=200, version="0.1.0", heartbeat_seconds=10, now=at(100))
    newest, old = db.node_runs()
    assert newest.id == second.id and newest.stopped_at is None
    assert old.stopped_at == at(25) and old.stop_reason.startswith("ended without a clean stop")
    db.stop_run(second.id, "clean stop on SIGTERM", now=at(130))
    [newest, _] = db.node_runs()
    assert newest.stopped_at == at(130) and not newest.alive(at(130))
    # A second node process on the same database while the first is alive is not closed by it.
    a = db.start_run(host="a", pid=1, version=None, heartbeat_seconds=10, now=at(200))
    db.start_run(host="b", pid=1, version=None, heartbeat_seconds=10, now=at(205))
    assert next(r for r in db.node_runs() if r.id == a.id).stopped_at is None


def test_requeue_failed_deliveries_of_the_latest_analysis(db: Database) -> None:
    """Issue 7 item 13: failed and rejected rows go back to pending, the series to delivering."""
    receive(db, "1.2.3.1")
    analyze(db, n_objects=2, destinations=("pacs", "archive"), t=10)
    rows = db.due_deliveries(at(10))
    for d in rows:
        status = None if d.destination == "pacs" else 0xA900
        db.record_attempt(d.id, status=status, error="down" if status is None else None,
                          policy=POLICY, now=at(10 + 86400))  # past give-up: failed at once
    assert db.get_series("1.2.3").state == "failed"
    assert db.requeue_failed_deliveries("9.9.9") == {}
    assert db.requeue_failed_deliveries("1.2.3", now=at(90000)) == {"1.2.3": 4}
    assert db.get_series("1.2.3").state == "delivering" and db.get_series("1.2.3").reason is None
    due = db.due_deliveries(at(90000))
    assert len(due) == 4 and all(d.attempts == 0 and d.status == "pending" for d in due)
    assert all(d.last_error.startswith("re-queued by `ihd-node retry`") for d in due)
    for d in due:
        db.record_attempt(d.id, status=0, policy=POLICY, now=at(90001))
    assert db.get_series("1.2.3").state == "delivered"
    assert db.requeue_failed_deliveries() == {}


def test_a_worker_taken_for_dead_cannot_add_a_second_revision(db: Database) -> None:
    # Multi-machine mode: worker A analyses from t=8, is taken for dead; worker B takes the series over at
    # t=20. A finishing late is refused (Superseded); B's analysis is the one recorded.
    from ihd_node.store import Superseded

    receive(db, "1.2.3.1")
    db.set_series_state("1.2.3", "analyzing", analysis_started=at(8))
    assert db.set_series_state("1.2.3", "complete", expect="analyzing")
    assert db.set_series_state("1.2.3", "analyzing", expect="complete", analysis_started=at(20))
    late = dict(destinations=["pacs"], objects=[ResultObject("9.1", SR, "/r/1.dcm")], model_name="m",
                model_version="1", probabilities=dict.fromkeys(CLASSES, 0.1), positive_classes=[], thresholds={},
                n_slices=1)
    with pytest.raises(Superseded):
        db.finish_analysis("1.2.3", expect_started=at(8), now=at(25), **late)
    assert db.finish_analysis("1.2.3", expect_started=at(20), now=at(26), **late).revision == 1
    with pytest.raises(Superseded):  # and after B finished, A is still refused
        db.finish_analysis("1.2.3", expect_started=at(8), now=at(27), **late)
    assert db.get_series("1.2.3").revision == 1


def record(sop: str, *, series: str = "1.2.3", sha: str | None = None, t: float = 0.0, size: int | None = 1000,
           assoc: str = "a1") -> InstanceRecord:
    return InstanceRecord(study_instance_uid="1.2", series_instance_uid=series, sop_instance_uid=sop,
                          sop_class_uid=CT, path=f"/spool/{sop}.dcm", size=size,  # type: ignore[arg-type]
                          sha256=sha or f"sha-{sop}", calling_aet="PACS", association_id=assoc,
                          accession_number="ACC42", modality="CT", series_description="HEAD", received_at=at(t))


def series_rows(db: Database) -> list[tuple]:
    with db.read_session() as s:
        return [(r.series_instance_uid, r.state, r.n_instances, r.last_received, r.last_association)
                for r in s.query(Series).order_by(Series.series_instance_uid)]


def test_one_transaction_for_a_mixed_batch_gives_what_one_at_a_time_gives(tmp_path: Path) -> None:
    """The batch mixes every path: new series, the short path (known series in "received"), a resend, changed
    content, and a late instance of a complete series (reopened)."""
    def batch() -> list[InstanceRecord]:
        return [record("1.1", t=1), record("1.2", t=2), record("1.1", t=3), record("1.2", sha="other", t=4),
                record("2.1", series="1.2.9", t=5), record("2.2", series="1.2.9", t=6), record("1.3", t=7)]

    one, many = (open_database(f"sqlite:///{tmp_path / name}") for name in ("one.sqlite", "many.sqlite"))
    for db in (one, many):
        db.record_instance(**vars(record("2.0", series="1.2.9", t=0)))
        db.set_series_state("1.2.9", "complete", completion_rule="quiet")
    singles = [one.record_instance(**vars(r)) for r in batch()]
    together = many.record_instances(batch())
    assert together == singles
    assert [(x.new, x.changed_content, x.reopened, x.previous_state) for x in together] == [
        (True, False, False, None), (True, False, False, "received"), (False, False, False, "received"),
        (False, True, False, "received"), (True, False, True, "complete"), (True, False, False, "received"),
        (True, False, False, "received")]
    assert series_rows(many) == series_rows(one)
    assert series_rows(many)[0][1:3] == ("received", 3)
    assert series_rows(many)[1][1:3] == ("received", 3)  # reopened by the late instance


def test_a_failing_record_does_not_fail_the_others_in_its_batch(db: Database) -> None:
    results = db.record_instances([record("1.1"), record("1.2", size=None), record("1.3")])
    assert isinstance(results[1], Exception) and not isinstance(results[0], Exception)
    assert not isinstance(results[2], Exception)
    assert series_rows(db)[0][2] == 2


def test_group_commit_shares_one_transaction_among_waiting_senders(db: Database) -> None:
    batcher = InstanceBatcher(db)
    out: dict[int, object] = {}
    with batcher._leader:  # a transaction is running: the 8 senders queue up behind it
        threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, batcher.record(record(f"3.{k}"))))
                   for k in range(8)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 10
        while len(batcher._pending) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    for th in threads:
        th.join(10)
    assert batcher.transactions == 1  # the first to get the lock committed all eight
    assert all(r.new for r in out.values()) and len(out) == 8  # type: ignore[attr-defined]
    assert series_rows(db)[0][2] == 8
    with pytest.raises(IntegrityError):  # an error reaches its own caller
        batcher.record(record("3.9", size=None))


def test_the_short_path_writes_the_rows_the_orm_path_writes(tmp_path: Path) -> None:
    """Database._record's plain statements (built once, bound parameters) against _record_full's ORM logic,
    on instances arriving out of order, with and without accession number, calling AE and description."""
    def batch() -> list[InstanceRecord]:
        return [record("1.1", t=5), record("1.2", t=3), dataclasses.replace(record("1.3", t=9), accession_number=None),
                dataclasses.replace(record("1.4", t=7), calling_aet="", modality="", series_description=""),
                dataclasses.replace(record("1.5", t=8), series_description="X" * 80, accession_number="A" * 20)]

    short, orm = (open_database(f"sqlite:///{tmp_path / name}") for name in ("short.sqlite", "orm.sqlite"))
    first, *rest = batch()
    short.record_instances([first])  # a new series: the ORM path
    short.record_instances(rest)  # all on the short path: plain statements, no session (_record_plain)
    for r in batch():
        with orm.session() as s:
            orm._record_full(s, r, r.received_at)

    def rows(db: Database) -> list[list[tuple]]:
        with db.engine.connect() as conn:
            return [list(conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id")) for table in
                    ("studies", "series", "instances")]

    assert rows(short) == rows(orm)
    assert rows(short)[1][0] != ()  # not vacuous: a series row with its counts


def test_a_write_session_is_not_refused_when_another_process_commits_between_its_read_and_its_write(
        tmp_path: Path) -> None:
    """Two processes on one SQLite file (here two Database objects: the write lock is per process). A unit of
    work that reads and then writes (e.g. `ihd-node retry` beside the running node) must wait for the other
    writer, not fail with "database is locked": SQLite refuses at once, without its busy timeout, a read
    transaction's upgrade to a write after another connection committed in between."""
    from sqlalchemy import func, select

    from ihd_node.store import Event, utcnow

    url = f"sqlite:///{tmp_path / 'ihd.sqlite'}"
    admin, node = open_database(url), open_database(url)
    read_done, other_committed = threading.Event(), threading.Event()

    def other_process() -> None:
        read_done.wait(10)
        node.log_event("test", "written by the other process")
        other_committed.set()

    writer = threading.Thread(target=other_process)
    writer.start()
    with admin.session() as s:
        s.scalar(select(func.count(Event.id)))
        read_done.set()
        other_committed.wait(1.0)  # with the fix the other writer waits for this unit of work instead
        s.add(Event(at=utcnow(), level="INFO", kind="test", message="written after reading"))
    writer.join(30)
    assert other_committed.is_set()
    with admin.read_session() as s:
        assert sorted(s.scalars(select(Event.message).where(Event.kind == "test"))) == [
            "written after reading", "written by the other process"]
