"""Completion rules on a real receiver + SQLite database: 'quiet' after release, 'max_wait' with an open
association, late instances reopening a series, and the tick loop in its own thread."""

from __future__ import annotations

import threading
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
from ihd_node.triage.completion import CompletionJudge, Evidence, MppsList
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
        assert wait_for(lambda: handed == [series_uid], seconds=30)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    # From the database's own stamps, not the test's clock (a loaded machine delays the test, not the rule):
    # never before quiet_seconds, and within quiet_seconds + one tick plus generous slack.
    series = node.db.get_series(series_uid)
    waited = (series.completed - series.last_received).total_seconds()
    assert 0.3 <= waited < 0.3 + assembler.tick_seconds + 5.0


def judged(node: Setup, judge: CompletionJudge, *, quiet: float = 0.5, max_wait: float = 10.0) -> Assembler:
    return Assembler(node.db, SeriesConfig(quiet_seconds=quiet, max_wait_seconds=max_wait), lambda uid: None,
                     judge=judge)


def corrupt(path: str) -> None:
    Path(path).write_bytes(b"not a DICOM file" * 64)  # as a disk error or a stray writer would leave it


def test_an_unreadable_header_holds_the_series_then_it_goes_out_preliminary_with_the_reason(node: Setup) -> None:
    """The judge cannot read one file: that is evidence of incompleteness (held, reason recorded), never a
    COMPLETE by the quiet rule; at max_wait the series completes marked INCOMPLETE SERIES, the completions
    row says why."""
    series_uid = generate_uid()
    assert send(node.port, [ct_dataset(series_uid, i) for i in range(4)]) == [0] * 4
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)
    corrupt(node.db.series_instances(series_uid)[2].path)
    assembler = judged(node, CompletionJudge(check_coverage=False))

    assert assembler.tick(now=utcnow() + timedelta(seconds=1)) == []  # quiet, but held
    series = node.db.get_series(series_uid)
    assert series.state == "received" and "check failed: slice headers" in series.reason
    [held] = node.events("held")
    assert "check failed: slice headers" in held.message and "InvalidDicomError" in held.message
    assert node.db.latest_completion(series_uid) is None

    [done] = assembler.tick(now=utcnow() + timedelta(seconds=10.5))
    assert done.rule == "max_wait"
    completion = node.db.latest_completion(series_uid)
    assert completion is not None and completion.rule == "max_wait"
    assert completion.preliminary and completion.preliminary.startswith("check failed: slice headers")
    assert "INCOMPLETE SERIES" in complete_events(node)[0]


def test_a_failed_check_keeps_the_mpps_hold_gathered_before_it(node: Setup) -> None:
    series_uid = generate_uid()
    sent = [ct_dataset(series_uid, i) for i in range(3)]
    assert send(node.port, sent) == [0] * 3
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)
    corrupt(node.db.series_instances(series_uid)[0].path)
    listed = frozenset([*(str(ds.SOPInstanceUID) for ds in sent), generate_uid()])  # one not received
    judge = CompletionJudge(check_coverage=False, mpps_lists=lambda uid: [MppsList("1.2.3.4", listed)])
    assembler = judged(node, judge)

    assert assembler.tick(now=utcnow() + timedelta(seconds=1)) == []
    [done] = assembler.tick(now=utcnow() + timedelta(seconds=10.5))
    preliminary = node.db.latest_completion(series_uid).preliminary
    assert done.rule == "max_wait" and "mpps: 1 of 4 instances" in preliminary and "check failed" in preliminary


def test_a_judge_that_fails_outright_is_a_hold_too(node: Setup) -> None:
    """Whatever fails inside the judge (here its MPPS lookup) holds the series with the error named."""
    series_uid = generate_uid()
    assert send(node.port, [ct_dataset(series_uid, i) for i in range(3)]) == [0] * 3
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)

    def broken(uid: str) -> list[MppsList]:
        raise RuntimeError("database gone")

    assembler = judged(node, CompletionJudge(check_coverage=False, mpps_lists=broken))
    assert assembler.tick(now=utcnow() + timedelta(seconds=1)) == []
    assert "check failed: completion judge: RuntimeError: database gone" in node.db.get_series(series_uid).reason
    [done] = assembler.tick(now=utcnow() + timedelta(seconds=10.5))
    assert done.rule == "max_wait"
    assert node.db.latest_completion(series_uid).preliminary.startswith("check failed: completion judge")


def test_a_check_that_fails_once_is_tried_again(node: Setup) -> None:
    """A failed check is not cached: once the file reads again, the quiet rule completes the series."""
    series_uid = generate_uid()
    assert send(node.port, [ct_dataset(series_uid, i) for i in range(3)]) == [0] * 3
    assert wait_for(lambda: node.db.get_series(series_uid).association_released is not None)
    path = Path(node.db.series_instances(series_uid)[1].path)
    good = path.read_bytes()
    corrupt(str(path))
    assembler = judged(node, CompletionJudge(check_coverage=False))
    assert assembler.tick(now=utcnow() + timedelta(seconds=1)) == []
    path.write_bytes(good)
    [done] = assembler.tick(now=utcnow() + timedelta(seconds=1.5))
    assert done.rule == "quiet" and node.db.latest_completion(series_uid).preliminary is None


def test_a_pacs_count_that_cannot_be_made_holds_the_series() -> None:
    """A destination that cannot be asked is no proof that nothing is missing: the series is held."""
    have = [("1.2.3.1", "/nonexistent/a.dcm")]

    def judge(counts: object) -> Evidence:
        def pacs_count(study: str, series: str) -> list[tuple[str, int | None]]:
            if isinstance(counts, Exception):
                raise counts
            return counts  # type: ignore[return-value]
        return CompletionJudge(check_geometry=False, check_coverage=False,
                               pacs_count=pacs_count).evidence("1.2", "1.2.3", have)

    down = judge([("pacs", None)])
    assert down.failed and not down.complete and "pacs count: pacs could not be asked" in down.holds[0]
    broken = judge(OSError("connection refused"))
    assert broken.failed and "check failed: pacs count: OSError: connection refused" in broken.holds[0]
    assert judge([("pacs", 1)]).complete and judge([("pacs", 1)]).passed == ("pacs",)
    assert judge([("pacs", 0)]).complete  # the PACS does not know the series yet: no hold, no pass
    more = judge([("pacs", 3), ("other", None)])
    assert len(more.holds) == 2 and not more.complete
