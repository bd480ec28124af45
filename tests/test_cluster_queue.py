"""The job queue of a multi-machine node (ihd_node.node.cluster) on a real PostgreSQL: idempotency key,
priorities, the STAT rule, the stalled-job sweep and the heartbeat view. The processes themselves are
tested in tests/reliability/test_cluster.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import text

from ihd_node.commands.serve import parse_roles
from ihd_node.config import default_config
from ihd_node.errors import UserError
from ihd_node.node import cluster
from ihd_node.node.wiring import Node
from ihd_node.store import open_database, utcnow, work

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def setup(postgres_url: str, tmp_path: Path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"pretend checkpoint: only its hash is used here")
    config = default_config(tmp_path, database={"url": postgres_url}, model={"checkpoint": str(checkpoint)},
                            cluster={"stat_priorities": ["STAT"], "stat_accession_patterns": ["^ER"]})
    db = open_database(postgres_url)
    yield config, db
    db.close()


def header(**values: str) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def test_stat_rule(setup) -> None:
    config, _ = setup
    assert cluster.priority_of(header(RequestedProcedurePriority="STAT"), config) == "stat"
    assert cluster.priority_of(header(RequestedProcedurePriority="ROUTINE", AccessionNumber="ER123"), config) == "stat"
    nested = header(AccessionNumber="A1")
    nested.RequestAttributesSequence = [header(RequestedProcedurePriority="stat ")]
    assert cluster.priority_of(nested, config) == "stat"
    assert cluster.priority_of(header(RequestedProcedurePriority="ROUTINE", AccessionNumber="A1"), config) == "normal"
    plain = default_config("/tmp")  # default: no rule, everything normal
    assert cluster.priority_of(header(RequestedProcedurePriority="STAT", AccessionNumber="ER1"), plain) == "normal"


def test_identity_changes_with_model_and_result_settings(setup, tmp_path: Path) -> None:
    config, _ = setup
    same = cluster.analysis_identity(config)
    assert cluster.analysis_identity(config) == same
    other = config.model_copy(deep=True)
    other.analysis.thresholds = {"any": 0.2}
    assert cluster.analysis_identity(other) != same
    explained = config.model_copy(deep=True)  # the heatmaps explain the CNN instead of the decision
    explained.model.explain = "cnn" if config.model.explain != "cnn" else "decision"
    assert cluster.analysis_identity(explained) != same
    Path(config.model.checkpoint).write_bytes(b"another model")
    assert cluster.analysis_identity(config) != same


def record(db, series: str, study: str) -> None:
    db.record_instance(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=f"{series}.1",
                       sop_class_uid=CT, path="/p", size=1, sha256=series)


def test_one_job_per_series_stat_first_and_by_study(setup) -> None:
    config, db = setup
    for series, study in (("1.1", "9.1"), ("1.2", "9.2"), ("1.3", "9.3")):
        record(db, series, study)
    jobs = cluster.JobQueue(config, db).open()
    try:
        assert jobs.submit("1.1", "9.1") is True
        assert jobs.submit("1.1", "9.1") is False  # "complete" again while it waits: collapses into it
        assert jobs.submit("1.2", "9.2") is True
        assert jobs.submit("1.3", "9.3", "stat") is True
        assert cluster.queue_depth(db.engine) == {"stat": 1, "normal": 2}
        assert jobs.is_queued("1.1") and not jobs.is_queued("1.9")
    finally:
        jobs.close()
    ran: list[str] = []
    app = cluster.make_app(config.database_url, lambda context, series_uid, revision=0: ran.append(series_uid))
    app.run_worker(queues=[cluster.QUEUE], wait=False, install_signal_handlers=False, concurrency=1)
    assert ran == ["1.3", "1.1", "1.2"]  # STAT first, then in order of submission
    assert cluster.queue_depth(db.engine) == {"stat": 0, "normal": 0}
    assert not jobs.is_queued("1.1")  # done: a later choice may queue it again
    with db.engine.connect() as conn:
        locks = dict(conn.execute(text("SELECT queueing_lock, lock FROM procrastinate_jobs")).all())
    assert locks[cluster.job_key("1.1", cluster.analysis_identity(config))] == "9.1"  # lock = the study


def test_a_job_of_a_silent_worker_goes_back_to_the_queue(setup) -> None:
    config, db = setup
    record(db, "2.1", "9.9")
    jobs = cluster.JobQueue(config, db).open()
    jobs.submit("2.1", "9.9")
    jobs.close()
    # A worker claimed it and went silent 60 s ago (killed: no heartbeat since).
    with db.engine.begin() as conn:
        worker = conn.execute(text("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - "
                                   "interval '60 seconds') RETURNING id")).scalar()
        conn.execute(text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w"), {"w": worker})
    app = cluster.make_app(config.database_url)
    assert cluster.requeue_stalled(app, db.engine, stalled_seconds=120) == []  # not silent long enough
    [job_id] = cluster.requeue_stalled(app, db.engine, stalled_seconds=30)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT status, attempts FROM procrastinate_jobs WHERE id = :i"),
                            {"i": job_id}).one() == ("todo", 1)
    assert cluster.requeue_stalled(app, db.engine, stalled_seconds=30) == []


def test_members_and_their_heartbeats(setup) -> None:
    config, db = setup
    now = utcnow()
    receiver = db.start_run(host="rx", pid=1, version=None, heartbeat_seconds=1, now=now)
    worker = db.start_run(host="gpu", pid=2, version=None, heartbeat_seconds=1, now=now)
    single = db.start_run(host="one", pid=3, version=None, heartbeat_seconds=1, now=now)  # all in one: no roles
    work.join(db, receiver.id, ["receive", "deliver"], None)
    work.join(db, worker.id, ["analyse"], "cuda:1")
    for seconds in (2.0, 4.0):
        work.job_done(db, worker.id, seconds)
    db.heartbeat(worker.id, now=now + timedelta(seconds=60))
    db.heartbeat(single.id, now=now + timedelta(seconds=60))
    db.stop_run(receiver.id, "clean stop on SIGTERM", now=now + timedelta(seconds=30))
    view = cluster.cluster_view(db, now=now + timedelta(seconds=61))
    [member] = view["members"]  # the stopped receiver is not listed, nor the all-in-one node
    assert member["roles"] == "analyse" and member["device"] == "cuda:1" and member["alive"]
    assert member["jobs_done"] == 2 and member["seconds_per_job"] == 3.0 and member["jobs_per_minute"] == 2.0
    silent = cluster.cluster_view(db, now=now + timedelta(seconds=70))
    assert not silent["members"][0]["alive"]
    assert view["queue"] == {"stat": 0, "normal": 0}
    assert cluster.stalled_after(config) == 32.0  # never under 3 heartbeats (10 s) + 2 s


def test_roles_need_postgresql_and_known_names(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--roles 'receive,analyze'"):
        parse_roles("receive,analyze")
    assert parse_roles("receive,deliver") == ["receive", "deliver"] and parse_roles(None) is None
    node = Node(default_config(tmp_path), roles=["receive", "deliver"])
    with pytest.raises(UserError, match="share PostgreSQL.*postgresql\\+psycopg://"):
        node.start()
