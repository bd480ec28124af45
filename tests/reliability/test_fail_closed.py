"""Every error between receive and the analysis queue ends in a recorded state, never a silent COMPLETE.

Full-head phantoms (40 slices, skull base to vertex; 128x128 for speed) with the completion evidence ON
(geometry and coverage checks, set here explicitly), on a real `ihd-node serve` (conftest.NodeProcess):
- a sender killed with SIGKILL half-way, and an A-ABORT half-way: the half series is no release, so it
  waits (no quiet-rule completion), then completes at max_wait marked INCOMPLETE SERIES with the coverage reason;
- one spool file corrupted while the series waits for completion: the judge cannot read it, which holds
  the series ("check failed"), and it goes out INCOMPLETE SERIES or fails with the reason, never COMPLETE;
- a fault injected (ihd_node.faults, IHD_NODE_FAIL_AT) in the completion judge and in the study-profile
  build: the recorded state and reason.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import NODE_AET, NodeProcess, wait_until
from faults import done, instance_rows, make_study, start
from pydicom import uid as tsuid
from pynetdicom import AE

from ihd_node.faults import FAIL_ENV
from ihd_node.sim.mini_pacs import MiniPACS

N = 40  # a whole head at the phantom's spacing; the first half stops below the vertex
HALF = N // 2
QUIET, MAX_WAIT = 0.5, 4.0
EVIDENCE_ON = {"quiet_seconds": QUIET, "max_wait_seconds": MAX_WAIT, "check_geometry": True,
               "check_coverage": True}
SETTLED = ("delivered", "ignored", "failed", "not_chosen")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
# Phantom seeds whose bottom half ends inside the cranial cavity (coverage: "does not reach the vertex");
# every seed's whole 40 slices pass the checks. One study per test: UIDs follow from the seed.
HALF_SEEDS = {"killed": 26, "aborted": 28}
WHOLE_SEEDS = {"corrupted": 22, "judge": 23, "profile": 25}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniPACS]:
    with MiniPACS(tmp_path_factory.mktemp("pacs"), ae_title="PACS") as receiving:
        yield receiving


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, pacs: MiniPACS) -> Iterator[NodeProcess]:
    """One node for the cases without an injected fault (each uses its own study)."""
    running = NodeProcess(tmp_path_factory.mktemp("node"), tiny_checkpoint, pacs, series=EVIDENCE_ON)
    start(running)
    yield running
    done(running)


def association(port: int, files: list[Path]) -> object:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID),
                             [tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    return assoc


def send_on(assoc: object, files: list[Path]) -> None:
    for path in files:
        assert int(assoc.send_c_store(pydicom.dcmread(path)).Status) == 0  # type: ignore[attr-defined]


def completion(node: NodeProcess, series_uid: str) -> tuple[str, str | None] | None:
    rows = node.query("SELECT rule, preliminary FROM completions WHERE series_instance_uid = ? ORDER BY id DESC "
                      "LIMIT 1", series_uid)
    return (rows[0][0], rows[0][1]) if rows else None


def series_row(node: NodeProcess, series_uid: str) -> tuple[str, str | None, str | None, str, str | None]:
    """state, reason, completion_rule, last_received, completed."""
    return node.query("SELECT state, reason, completion_rule, last_received, completed FROM series "
                      "WHERE series_instance_uid = ?", series_uid)[0]


def assert_never_complete(node: NodeProcess, pacs: MiniPACS, study, reason_starts: str) -> str:
    """Held until max_wait, completed INCOMPLETE SERIES with the reason; settled without a COMPLETE SR."""
    uid = study.series_uid
    assert wait_until(lambda: completion(node, uid) is not None, 60), node.log()[-3000:]
    rule, preliminary = completion(node, uid)  # type: ignore[misc]
    assert rule == "max_wait" and preliminary is not None and preliminary.startswith(reason_starts), preliminary
    state = node.wait_state(uid, SETTLED, 90)
    assert state in SETTLED, node.log()[-3000:]
    _, reason, completion_rule, last, completed = series_row(node, uid)
    assert completion_rule == "max_wait"
    waited = node.query("SELECT (julianday(?) - julianday(?)) * 86400", completed, last)[0][0]
    assert waited >= MAX_WAIT - 0.01, waited  # the database's stamps: not one tick of quiet-rule completion
    flags = [pydicom.dcmread(o.path).CompletionFlag for o in pacs.objects(study.study_uid)
             if o.sop_class_uid == SR_CLASS]
    assert "COMPLETE" not in flags
    if state == "delivered":
        assert flags == ["PARTIAL"]
    else:
        assert reason, f"{state} without a reason"
    return state


def test_sender_killed_half_way_is_held_then_preliminary(tmp_path: Path, node: NodeProcess, pacs: MiniPACS) -> None:
    """kill -9 of the sending process after half a head: its connection drops without a release; the
    half series waits (no quiet-rule completion), then goes out INCOMPLETE SERIES at max_wait, never COMPLETE."""
    study = make_study(tmp_path / "study", seed=HALF_SEEDS["killed"], n_slices=N)
    script = textwrap.dedent(f"""
        import sys, threading, pydicom
        from pynetdicom import AE
        from pydicom import uid
        files = sys.argv[1:]
        ae = AE(ae_title="PACS")
        ae.add_requested_context(str(pydicom.dcmread(files[0]).SOPClassUID), [uid.ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", {node.port}, ae_title="{NODE_AET}")
        for f in files:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
        print("sent", flush=True)
        threading.Event().wait()  # the rest of the head never comes: killed here
    """)
    sender = subprocess.Popen([sys.executable, "-c", script, *map(str, study.files[:HALF])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "sent"
        assert len(instance_rows(node, study.series_uid)) == HALF
        sender.send_signal(signal.SIGKILL)
        assert sender.wait(30) == -signal.SIGKILL
    finally:
        if sender.poll() is None:
            sender.kill()
    assert wait_until(lambda: (series_row(node, study.series_uid)[1] or "").startswith("waiting for the rest"), 30)
    assert series_row(node, study.series_uid)[0] == "received"
    state = assert_never_complete(node, pacs, study, "coverage: top slice")
    print(f"\nFIGURE sender killed after {HALF}/{N}: held, completed INCOMPLETE SERIES at max_wait, then {state}")


def test_a_abort_half_way_is_held_then_preliminary(tmp_path: Path, node: NodeProcess, pacs: MiniPACS) -> None:
    study = make_study(tmp_path / "study", seed=HALF_SEEDS["aborted"], n_slices=N)
    assoc = association(node.port, study.files)
    send_on(assoc, study.files[:HALF])
    assoc.abort()  # type: ignore[attr-defined]
    assert wait_until(lambda: (series_row(node, study.series_uid)[1] or "").startswith("waiting for the rest"), 30)
    state = assert_never_complete(node, pacs, study, "coverage: top slice")
    print(f"\nFIGURE A-ABORT after {HALF}/{N}: held, completed INCOMPLETE SERIES at max_wait, then {state}")


def test_a_spool_file_corrupted_while_waiting_is_never_complete(tmp_path: Path, node: NodeProcess,
                                                                pacs: MiniPACS) -> None:
    """The whole head arrives; one spool file is damaged before the association ends (the series waits
    for completion): the judge cannot read it, which holds the series; at max_wait it goes out INCOMPLETE SERIES
    with "check failed", or fails with the reason when the analysis cannot read it either."""
    study = make_study(tmp_path / "study", seed=WHOLE_SEEDS["corrupted"], n_slices=N)
    assoc = association(node.port, study.files)
    try:
        send_on(assoc, study.files)
        path = Path(sorted(instance_rows(node, study.series_uid).values())[N // 3][0])
        path.write_bytes(b"\0" * 64 + b"not DICOM any more")  # a disk error or a stray writer
    finally:
        assoc.release()  # type: ignore[attr-defined]
    uid = study.series_uid
    held = "SELECT message FROM events WHERE kind = 'held' AND series_instance_uid = ?"
    assert wait_until(lambda: node.query(held, uid), 30), node.log()[-3000:]
    assert "check failed: slice headers: " + path.name in node.query(held, uid)[0][0]
    state = assert_never_complete(node, pacs, study, "check failed: slice headers")
    print(f"\nFIGURE corrupted spool file: held, completed INCOMPLETE SERIES at max_wait, then {state}")


def test_a_fault_in_the_completion_judge_holds_then_preliminary(tmp_path: Path, make_node, pacs: MiniPACS) -> None:
    study = make_study(tmp_path / "study", seed=WHOLE_SEEDS["judge"], n_slices=N)
    node = start(make_node(pacs, series=EVIDENCE_ON), extra_env={FAIL_ENV: "completion.judge"})
    assoc = association(node.port, study.files)
    send_on(assoc, study.files)
    assoc.release()  # type: ignore[attr-defined]
    state = assert_never_complete(node, pacs, study, "check failed: completion judge: InjectedFault")
    assert state == "delivered"  # the whole head was there: an INCOMPLETE SERIES result, marked as such
    done(node)


def test_a_fault_in_the_study_profile_fails_the_series_with_the_reason(tmp_path: Path, make_node,
                                                                        pacs: MiniPACS) -> None:
    study = make_study(tmp_path / "study", seed=WHOLE_SEEDS["profile"], n_slices=N)
    node = start(make_node(pacs, series=EVIDENCE_ON), extra_env={FAIL_ENV: "study.profile"})
    assoc = association(node.port, study.files)
    send_on(assoc, study.files)
    assoc.release()  # type: ignore[attr-defined]
    assert node.wait_state(study.series_uid, ("failed",), 60) == "failed", node.log()[-3000:]
    reason = series_row(node, study.series_uid)[1]
    assert reason.startswith("cannot be profiled for the study choice (InjectedFault"), reason
    errors = node.query("SELECT message FROM events WHERE kind = 'error' AND series_instance_uid = ?",
                        study.series_uid)
    assert [m for (m,) in errors] == [reason]
    assert completion(node, study.series_uid)[0] == "quiet"  # complete by the evidence, then failed at the choice
    done(node)
