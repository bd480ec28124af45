"""Completion rules on a real receiver + SQLite database: 'quiet' after release, 'max_wait' with an open
association, late instances reopening a series, and the tick loop in its own thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from ihd_node.config import SeriesConfig
from ihd_node.store import Event, utcnow
from ihd_node.triage.assembler import Assembler
from tests.test_receiver import NODE_AET, Setup, ct_dataset, send, start_receiver, wait_for


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Setup]:
    setup = start_receiver(tmp_path)
    yield setup
    setup.receiver.stop()
    setup.db.close()


def complete_events(setup: Setup) -> list[str]:
    with setup.db.read_session() as s:
        rows = s.scalars(select(Event).where(Event.kind == "complete").order_by(Event.id))
        return [e.message for e in rows]


def test_quiet_rule_fires_after_release_and_quiet_period(node: Setup) -> None:
    series_uid = generate_uid()
    assert send(node.port, [ct_dataset(series_uid, i) for i in range(3)]) == [0, 0, 0]
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)
    handed: list[str] = []
    assembler = Assembler(node.db, SeriesConfig(quiet_seconds=2.0, max_wait_seconds=60.0), handed.append)

    assert assembler.tick() == []  # released, but not quiet long enough
    assert 0.0 < assembler.seconds_to_next() <= assembler.tick_seconds
    [done] = assembler.tick(now=utcnow() + timedelta(seconds=2.1))
    assert (done.series_instance_uid, done.rule) == (series_uid, "quiet")
    assert handed == [series_uid]
    series = node.db.get_series(series_uid)
    assert series.state == "complete" and series.completion_rule == "quiet"
    assert "rule=quiet" in complete_events(node)[0] and "instances=3" in complete_events(node)[0]
    assert assembler.tick(now=utcnow() + timedelta(seconds=5)) == []  # once only


def test_max_wait_rule_fires_while_the_association_stays_open(node: Setup) -> None:
    series_uid = generate_uid()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        for i in range(2):
            assert int(assoc.send_c_store(ct_dataset(series_uid, i)).Status) == 0
        rules = SeriesConfig(quiet_seconds=1.0, max_wait_seconds=10.0)
        assembler = Assembler(node.db, rules, lambda uid: None)
        assert assembler.tick(now=utcnow() + timedelta(seconds=5)) == []  # still open: quiet does not apply
        [done] = assembler.tick(now=utcnow() + timedelta(seconds=10.5))
        assert done.rule == "max_wait"
        assert node.db.get_series(series_uid).completion_rule == "max_wait"
        assert "rule=max_wait" in complete_events(node)[0]
    finally:
        assoc.release()


def test_late_instance_reopens_a_complete_series(node: Setup) -> None:
    series_uid = generate_uid()
    assert send(node.port, [ct_dataset(series_uid, 0)]) == [0]
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)
    assembler = Assembler(node.db, SeriesConfig(quiet_seconds=0.5, max_wait_seconds=60.0), lambda uid: None)
    assert len(assembler.tick(now=utcnow() + timedelta(seconds=1))) == 1
    assert send(node.port, [ct_dataset(series_uid, 1)]) == [0]
    assert node.db.get_series(series_uid).state == "received"  # reopened by the late instance
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)
    [again] = assembler.tick(now=utcnow() + timedelta(seconds=1))
    assert again.rule == "quiet" and node.db.get_series(series_uid).n_instances == 2


def test_the_tick_loop_completes_series_in_its_thread(node: Setup) -> None:
    handed: list[str] = []
    stop = threading.Event()
    assembler = Assembler(node.db, SeriesConfig(quiet_seconds=0.3, max_wait_seconds=60.0), handed.append)
    thread = threading.Thread(target=assembler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        series_uid = generate_uid()
        assert send(node.port, [ct_dataset(series_uid, i) for i in range(2)]) == [0, 0]
        sent = time.monotonic()
        assert wait_for(lambda: handed == [series_uid], seconds=5)
        # quiet_seconds + at most one tick (plus the loaded machine's slack)
        assert time.monotonic() - sent < 0.3 + assembler.tick_seconds + 1.0
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
