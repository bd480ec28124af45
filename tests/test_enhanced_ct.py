"""Enhanced CT: the frames become the slices, through `analyze` and through the node, with geometry and the
per-frame rescale taken from the functional groups; a damaged one is refused with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ihd_node.imaging.volume import VolumeError, load_volume, slice_headers
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import MiniPACS, send_files
from ihd_node.sim.phantom import make_series, write_series
from ihd_node.triage.select import judge_series
from tests.enhanced_ct import enhanced_from_slices
from tests.test_service import SR_CLASS, THRESHOLDS, node_config, wait_until

N = 12


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor.from_model(IhdModel(tiny_config()), THRESHOLDS, "tiny-random", "0")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """The same phantom as 12 classic CT files and as one Enhanced CT file."""
    root = tmp_path_factory.mktemp("enhanced")
    phantom = make_series(41, subtypes=["subdural"], n_slices=N, size=64)
    write_series(phantom, root / "classic")
    enhanced = enhanced_from_slices(phantom.datasets)
    (root / "enhanced").mkdir()
    enhanced.save_as(root / "enhanced" / "ct.dcm", enforce_file_format=True)
    return root / "classic", root / "enhanced" / "ct.dcm", phantom


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
def test_the_fixture_is_a_valid_enhanced_ct(pair) -> None:
    _, path, _ = pair
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert text.startswith("EnhancedCTImage") and "Error" not in text, text


def test_frames_load_like_the_classic_slices(pair) -> None:
    classic_dir, path, phantom = pair
    classic = load_volume(sorted(classic_dir.iterdir()))
    enhanced = load_volume([path])
    assert enhanced.n_slices == classic.n_slices == N
    # Frames alternate between two rescale intercepts: HU agree only if each frame's own one is applied.
    assert np.abs(enhanced.hu - classic.hu).max() <= 0.5
    assert [s.position for s in enhanced.slices] == pytest.approx([s.position for s in classic.slices])
    assert enhanced.pixel_spacing == pytest.approx(classic.pixel_spacing)
    assert [s.frame_number for s in enhanced.slices] == list(range(1, N + 1))
    assert {s.sop_instance_uid for s in enhanced.slices} == {str(pydicom.dcmread(path).SOPInstanceUID)}
    assert judge_series(slice_headers([path])).ok


def test_damaged_and_localizer_enhanced_ct_are_refused_with_the_reason(pair, tmp_path: Path) -> None:
    _, path, phantom = pair
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[3]
    ds.save_as(tmp_path / "cut.dcm")
    with pytest.raises(VolumeError, match="11 per-frame functional group items for 12 frames"):
        load_volume([tmp_path / "cut.dcm"])
    scout = pydicom.dcmread(path)
    scout.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType = [
        "ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    scout.save_as(tmp_path / "scout.dcm")
    assert judge_series(slice_headers([tmp_path / "scout.dcm"])).reason == "localizer (scout) series"


def test_analyze_reads_the_frames_and_references_them(pair, tmp_path: Path) -> None:
    _, path, phantom = pair
    from tests.test_analyze import run
    proc = run("analyze", str(path.parent), "--json", "--model", "default", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)["series"]
    assert entry["n_slices"] == N and entry["eligible"] is True
    [sr_path] = tmp_path.rglob("SR_*.dcm")
    frames = {int(e.value) for e in pydicom.dcmread(sr_path).iterall() if e.keyword == "ReferencedFrameNumber"}
    assert frames and frames <= set(range(1, N + 1))


def test_the_node_analyses_an_enhanced_ct_sent_over_dicom(pair, tmp_path: Path, predictor: Predictor) -> None:
    _, path, phantom = pair
    ds = pydicom.dcmread(path)
    with MiniPACS(tmp_path / "pacs", ae_title="PACS") as pacs:
        node = Node(node_config(tmp_path / "node", pacs), predictor=predictor).start()
        try:
            assert send_files([path], host="127.0.0.1", port=node.port, called_aet="IHD_AI",
                              calling_aet="PACS") == [0]
            uid = str(ds.SeriesInstanceUID)
            assert wait_until(lambda: node.db.get_series(uid).state in ("delivered", "ignored", "failed"), 60)
            series = node.db.get_series(uid)
            assert series.state == "delivered", series.reason
            assert node.db.latest_analysis(uid).n_slices == N
            [sr] = [o for o in pacs.objects(str(ds.StudyInstanceUID)) if o.sop_class_uid == SR_CLASS]
            evidence = pydicom.dcmread(sr.path).CurrentRequestedProcedureEvidenceSequence[0]
            ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        finally:
            node.stop()
