"""The whole node with a tiny random model: phantom study in, SR + Grad-CAM captures out to a receiving
SCP; late instances give a revised SR; a restart re-indexes the spool and resumes unfinished series;
`ihd-node serve` as a process receives from dcmtk storescu and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch
from heads import full_head, full_head_spacing
from waiting import poll_until

from ihd_node.classes import CLASSES
from ihd_node.config import Config, default_config
from ihd_node.model.checkpoint import save_checkpoint
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_files
from ihd_node.sim.phantom import make_series, write_series

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
# Segmentation and Key Object Selection: a positive result set carries them too (not counted as captures).
OVERLAY_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.59")
N_SLICES = 24  # a full head (tests/heads.py): the shipped completion evidence holds back less
THRESHOLDS = dict.fromkeys(CLASSES, 0.3)  # a random model near 0.5 then finds "hemorrhage": captures are made


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return Predictor.from_model(IhdModel(tiny_config()), THRESHOLDS, "tiny-random", "0")


def node_config(root: Path, pacs: MiniPACS | None, **series: float) -> Config:
    dests = [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}] if pacs \
        else []
    return default_config(root, node={"ae_title": "IHD_AI", "host": "127.0.0.1", "port": free_port()},
                          series={"quiet_seconds": 0.3, "max_wait_seconds": 30.0, **series},
                          storage={"min_free_mb": 0}, analysis={"max_secondary_captures": 3},
                          destinations=dests,
                          delivery={"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0})


def wait_until(condition: Callable[[], object], seconds: float = 30.0) -> bool:
    return poll_until(condition, seconds)


def test_study_in_results_out_and_a_late_slice_gives_a_revised_sr(tmp_path: Path,
                                                                  predictor: Predictor) -> None:
    # The upper N_SLICES - 1 slices span the head: the lowest one is spare, sent after the series was analysed.
    phantom = full_head(3, ["subdural"], n_slices=N_SLICES, slice_spacing=full_head_spacing(N_SLICES - 1))
    files = write_series(phantom, tmp_path / "study")
    late_file = dict(zip((ds.SOPInstanceUID for ds in phantom.datasets), files, strict=True))[
        phantom.sop_uids_sorted[0]]
    files.remove(late_file)
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs), predictor=predictor).start()
        try:
            assert send_files(files, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                              calling_aet="PACS") == [0] * (N_SLICES - 1)
            uid = phantom.series_instance_uid
            assert wait_until(lambda: node.db.get_series(uid).state == "delivered")
            first = pacs.objects(phantom.study_instance_uid)
            srs = [o for o in first if o.sop_class_uid == SR_CLASS]
            core = [o for o in first if o.sop_class_uid not in OVERLAY_CLASSES]
            assert len(srs) == 1 and len(core) == 1 + 1 + 3  # SR + summary + max_secondary_captures Grad-CAM images
            assert sum(o.sop_class_uid == OVERLAY_CLASSES[1] for o in first) == 1  # the key images
            series = node.db.get_series(uid)
            assert series.completion_rule == "quiet" and series.revision == 1
            analysis = node.db.latest_analysis(uid)
            assert analysis.n_slices == N_SLICES - 1 and analysis.n_secondary_captures == 1 + 3
            assert analysis.sr_sop_instance_uid == srs[0].sop_instance_uid
            sr1 = pydicom.dcmread(srs[0].path)
            assert sr1.StudyInstanceUID == phantom.study_instance_uid
            assert "PredecessorDocumentsSequence" not in sr1
            result_files = sorted((tmp_path / "node" / "results" / uid / "r0").iterdir())
            # SR, summary capture, 3 slice captures; SEG and key images beside them
            assert sorted(p.name.split("_")[0] for p in result_files) == ["KO", "SC", "SC", "SC", "SC", "SEG", "SR"]

            assert send_files([late_file], host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                              calling_aet="PACS") == [0]
            assert wait_until(lambda: node.db.get_series(uid).revision == 2
                              and node.db.get_series(uid).state == "delivered")
            srs = [o for o in pacs.objects(phantom.study_instance_uid) if o.sop_class_uid == SR_CLASS]
            assert len(srs) == 2
            sr2 = pydicom.dcmread(srs[1].path)
            ref = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == sr1.SOPInstanceUID
            assert sr2.SOPInstanceUID != sr1.SOPInstanceUID
            assert node.db.latest_analysis(uid).n_slices == N_SLICES
        finally:
            node.stop()


def test_restart_reindexes_the_spool_and_resumes_unfinished_series(tmp_path: Path,
                                                                   predictor: Predictor) -> None:
    received = full_head(5, ["epidural"], n_slices=N_SLICES)
    crashed = full_head(6, n_slices=N_SLICES)
    files_a = write_series(received, tmp_path / "a")
    files_b = write_series(crashed, tmp_path / "b")
    root = tmp_path / "node"
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        # First run: the series never complete (long quiet period), then the node stops.
        first = Node(node_config(root, pacs, quiet_seconds=600.0, max_wait_seconds=900.0),
                     predictor=predictor).start()
        for files in (files_a, files_b):
            assert send_files(files, host="127.0.0.1", port=first.port, called_aet="IHD_AI",
                              calling_aet="PACS") == [0] * N_SLICES
        first.db.mark_complete(crashed.series_instance_uid, "quiet")
        first.db.set_series_state(crashed.series_instance_uid, "analyzing", expect="complete")
        first.stop()
        # A crash between the spool rename and the database commit: the row of one file is missing.
        con = sqlite3.connect(root / "ihd.sqlite")
        con.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (received.sop_uids_sorted[4],))
        con.execute("UPDATE series SET n_instances = n_instances - 1 WHERE series_instance_uid = ?",
                    (received.series_instance_uid,))
        con.commit()
        con.close()

        # The re-indexed file's association was open at the "crash": its series waits for max_wait, not quiet.
        second = Node(node_config(root, pacs, max_wait_seconds=5.0), predictor=predictor).start()
        try:
            for series in (received, crashed):
                uid = series.series_instance_uid
                assert wait_until(lambda u=uid: second.db.get_series(u).state == "delivered")
                assert second.db.latest_analysis(series.series_instance_uid).n_slices == N_SLICES
            srs = [o for o in pacs.objects() if o.sop_class_uid == SR_CLASS]
            assert len(srs) == 2
            with second.db.read_session() as s:
                from ihd_node.store import Event

                messages = [e.message for e in s.query(Event).filter(Event.kind == "recovery")]
            assert any("reindexed=1" in m for m in messages)
        finally:
            second.stop()


def test_ineligible_series_is_ignored_with_the_reason(tmp_path: Path, predictor: Predictor) -> None:
    few = make_series(7, subtypes=[], n_slices=4, size=64)
    files = write_series(few, tmp_path / "few")
    # Four slices of a head: the coverage evidence holds them until max_wait (short here), then they are judged.
    node = Node(node_config(tmp_path / "node", None, max_wait_seconds=2.0), predictor=predictor).start()
    try:
        assert send_files(files, host="127.0.0.1", port=node.port, called_aet="IHD_AI", calling_aet="PACS") \
            == [0] * 4
        assert wait_until(lambda: node.db.get_series(few.series_instance_uid).state == "ignored")
        assert "too few slices" in node.db.get_series(few.series_instance_uid).reason
    finally:
        node.stop()


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_serve_process_with_dcmtk_storescu_and_sigterm(tmp_path: Path) -> None:
    torch.manual_seed(1)
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", IhdModel(tiny_config()), thresholds=THRESHOLDS,
                                 name="tiny-random", version="0", provenance={"data": "none"})
    phantom = full_head(11, ["intraventricular"], n_slices=N_SLICES)
    folder = tmp_path / "study"
    write_series(phantom, folder)
    port = free_port()
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"node: {{ae_title: IHD_AI, host: 127.0.0.1, port: {port}, allowed_calling_aets: [CT_SCANNER]}}\n"
            f"storage: {{dir: {tmp_path / 'state'}, min_free_mb: 0}}\n"
            "series: {quiet_seconds: 0.3}\n"
            f"destinations:\n  - {{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs.port}}}\n"
            f"model: {{checkpoint: {checkpoint}, device: cpu}}\n"
            "analysis: {max_secondary_captures: 2}\n")
        env = {**os.environ, "TCP_NODELAY": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "ihd_node", "serve", "--config", str(config)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            echo = ["echoscu", "-aet", "CT_SCANNER", "-aec", "IHD_AI", "127.0.0.1", str(port)]
            assert wait_until(lambda: subprocess.run(echo, env=env, capture_output=True).returncode == 0, 60)
            store = ["storescu", "-aet", "CT_SCANNER", "-aec", "IHD_AI", "+sd", "127.0.0.1", str(port),
                     str(folder)]
            sent = subprocess.run(store, env=env, capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
            # SR, summary capture and max_secondary_captures (2) slice captures
            # (and the Segmentation and key images of a positive result, not counted here)
            assert wait_until(lambda: len([o for o in pacs.objects(phantom.study_instance_uid)
                                           if o.sop_class_uid not in OVERLAY_CLASSES]) == 4, 60)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert any(" INFO complete " in line and "rule=quiet" in line for line in lines), out
    assert any("stopped" in line for line in lines)
    # The model ran once (Grad-CAM and report included) before the port opened (issue 11: first study slow).
    warmed = [k for k, line in enumerate(lines) if "model.warmed" in line]
    listening = [k for k, line in enumerate(lines) if "scp.listening" in line]
    assert warmed and listening and warmed[0] < listening[0], out
    assert "PatientName" not in out and str(phantom.datasets[0].PatientName) not in out


def test_a_series_whose_hand_off_failed_is_swept_and_analysed(tmp_path: Path, predictor: Predictor,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17 (c): the series is booked complete, then its hand-off to the queue fails; the single-process
    node's orphan sweep finds it (complete, not queued, nothing analysing it) and queues it again."""
    from ihd_node.node import recovery

    monkeypatch.setattr(recovery, "ORPHAN_AFTER_SECONDS", 1.0)
    monkeypatch.setattr(recovery, "ORPHAN_CHECK_SECONDS", 0.2)
    phantom = full_head(13, ["subdural"], n_slices=N_SLICES)
    files = write_series(phantom, tmp_path / "study")
    real_judge = Node._judge
    failed: list[str] = []

    def judge_failing_once(self: Node, series_uid: str) -> str | None:
        if not failed:
            failed.append(series_uid)
            raise OSError("hand-off lost (injected)")
        return real_judge(self, series_uid)

    monkeypatch.setattr(Node, "_judge", judge_failing_once)
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs), predictor=predictor).start()
        try:
            assert send_files(files, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                              calling_aet="PACS") == [0] * N_SLICES
            uid = phantom.series_instance_uid
            assert wait_until(lambda: node.db.get_series(uid).state == "delivered", 60), node.db.get_series(uid)
            assert failed == [uid]
            with node.db.read_session() as s:
                from ihd_node.store import Event

                notes = [e.message for e in s.query(Event).filter(Event.series_instance_uid == uid,
                                                                   Event.kind == "recovery")]
            assert any("no analysis queued or running" in m for m in notes), notes
            assert node.dead_threads() == [] and node.degraded() is None
        finally:
            node.stop()


def test_a_spool_file_that_cannot_be_indexed_again_is_kept_aside_and_booked(tmp_path: Path,
                                                                           predictor: Predictor) -> None:
    """Issue 17 (e): at start, a spool file without a database row that cannot be read is moved to
    storage.dir/quarantine and booked as an event with the reason (never only logged, never lost)."""
    phantom = full_head(17, [], n_slices=N_SLICES)
    root = tmp_path / "node"
    config = node_config(root, None, quiet_seconds=600.0, max_wait_seconds=900.0)
    first = Node(config, predictor=predictor).start()
    files = write_series(phantom, tmp_path / "study")
    assert send_files(files, host="127.0.0.1", port=first.port, called_aet="IHD_AI", calling_aet="PACS") \
        == [0] * N_SLICES
    first.stop()
    # A crash between the spool rename and the commit, and the file damaged as well.
    sop = phantom.sop_uids_sorted[2]
    [spooled] = list((root / "spool").glob(f"*/*/{sop}_*.dcm"))
    spooled.write_bytes(b"not DICOM at all")
    con = sqlite3.connect(root / "ihd.sqlite")
    con.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop,))
    con.commit()
    con.close()

    second = Node(config, predictor=predictor).start()
    try:
        assert not spooled.exists()
        kept = list((root / "quarantine").rglob(f"{sop}_*.dcm"))
        assert len(kept) == 1 and kept[0].read_bytes() == b"not DICOM at all"
        with second.db.read_session() as s:
            from ihd_node.store import Event

            notes = [(e.level, e.message, e.series_instance_uid) for e in s.query(Event).filter(
                Event.kind == "recovery")]
        assert any(level == "ERROR" and "cannot be indexed again" in message and str(kept[0]) in message
                   and series == phantom.series_instance_uid for level, message, series in notes), notes
    finally:
        second.stop()


def test_a_slice_left_out_at_a_duplicate_position_is_booked(tmp_path: Path, predictor: Predictor) -> None:
    """Two instances at one position: the volume keeps the first and the node books which it left out."""
    phantom = full_head(11, [], n_slices=N_SLICES)
    files = write_series(phantom, tmp_path / "study")
    twin = pydicom.dcmread(files[5])
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = f"{twin.SOPInstanceUID}.9"
    twin.InstanceNumber = 99
    twin.save_as(tmp_path / "study" / "twin.dcm")
    files.append(tmp_path / "study" / "twin.dcm")
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs), predictor=predictor).start()
        try:
            assert send_files(files, host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                              calling_aet="PACS") == [0] * (N_SLICES + 1)
            uid = phantom.series_instance_uid
            assert wait_until(lambda: node.db.get_series(uid).state == "delivered", 60), node.db.get_series(uid)
            assert node.db.latest_analysis(uid).n_slices == N_SLICES
            notes = [e.message for e in node.db.study_detail(phantom.study_instance_uid).events]
            assert any("slice left out" in m and "duplicate position" in m and twin.SOPInstanceUID in m
                       for m in notes), notes
        finally:
            node.stop()
