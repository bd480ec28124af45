"""`ihd-node analyze` as a user runs it: a folder with shuffled slices and a stray file, JSON and table output,
the SR and secondary captures with --out, and clear errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch

from ihd_node.classes import CLASSES
from ihd_node.model.checkpoint import save_checkpoint
from ihd_node.model.network import IhdModel
from ihd_node.model.presets import tiny_config
from ihd_node.sim.phantom import make_series, write_series
from tests.trunk import cross_section, write_ct_series


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ihd_node", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return save_checkpoint(path, IhdModel(tiny_config()), thresholds=dict.fromkeys(CLASSES, 0.3), name="tiny",
                           version="0", provenance={})


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("study")
    series = make_series(21, subtypes=["subdural"], n_slices=10, size=128)
    write_series(series, folder / "a")
    (folder / "notes.txt").write_text("not an image")
    return folder, series


def test_json_lists_series_slices_in_spatial_order_and_the_stray_file(tiny: Path, study) -> None:
    folder, series = study
    proc = run("analyze", str(folder), "--json", "--model", str(tiny))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["series"]) == 1
    entry = out["series"][0]
    assert entry["series_instance_uid"] == series.series_instance_uid
    assert entry["study_instance_uid"] == series.study_instance_uid
    assert entry["n_slices"] == 10 and set(entry["probabilities"]) == set(CLASSES)
    assert [s["sop_instance_uid"] for s in entry["slices"]] == series.sop_uids_sorted  # files were shuffled
    assert entry["positive"] == [c for c in CLASSES if entry["probabilities"][c] >= 0.3]
    assert entry["probabilities"]["any"] == pytest.approx(max(s["probabilities"]["any"] for s in entry["slices"]))
    assert entry["seconds"] > 0
    assert [r["path"] for r in out["rejected"]] == [str(folder / "notes.txt")]
    assert "not a DICOM file" in out["rejected"][0]["reason"]


def test_out_writes_an_sr_and_captures_into_the_source_study(tiny: Path, study, tmp_path: Path) -> None:
    folder, series = study
    proc = run("analyze", str(folder), "--model", str(tiny), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "subdural" in proc.stdout and "NOT FOR DIAGNOSTIC USE" in proc.stdout
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    written = [pydicom.dcmread(p) for p in files]
    modalities = sorted(ds.Modality for ds in written)
    assert modalities.count("SR") == 1 and len(modalities) > 1
    # The same file names as the node's results folder: SR_, SC_ (a capture's Modality is OT), and for a
    # positive series with a region SEG_ and KO_ (key images).
    assert {"SR_", "SC_"} <= {p.name[:3] for p in files} <= {"SR_", "SC_", "SEG", "KO_"}
    prefix = {"SR": "SR", "OT": "SC", "SEG": "SEG", "KO": "KO"}
    assert all(p.name == f"{prefix[ds.Modality]}_{ds.SOPInstanceUID}.dcm" for p, ds in zip(files, written, strict=True))
    assert {ds.StudyInstanceUID for ds in written} == {series.study_instance_uid}


def test_out_that_cannot_be_a_folder_is_a_clear_error(tiny: Path, study, tmp_path: Path) -> None:
    folder, _ = study
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    for out, words in ((a_file, "is a file, not a folder"), (a_file / "sub", "cannot create the folder")):
        proc = run("analyze", str(folder), "--model", str(tiny), "--out", str(out))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
        assert proc.stderr.startswith(f"ihd-node analyze: error: --out {out}: {words}"), proc.stderr


def test_one_slice_is_not_slices(tiny: Path, refusable) -> None:
    text = run("analyze", str(refusable["single"]), "--force", "--model", str(tiny))
    assert text.returncode == 0, text.stderr
    assert "(1 slice," in text.stdout and "1 slices" not in text.stdout


def test_bad_paths_and_models_are_clear_errors(tiny: Path, tmp_path: Path) -> None:
    proc = run("analyze", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "x.dcm").write_bytes(b"garbage")
    series = make_series(22, subtypes=[], n_slices=4, size=64)
    write_series(series, tmp_path / "s")
    proc = run("analyze", str(tmp_path / "s"), "--model", str(tmp_path / "x.dcm"), "--force")
    assert proc.returncode == 2 and "x.dcm" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def refusable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What `serve` ignores: one 128x128 slice, four 16x16 slices, and an abdomen CT of 12 slices."""
    root = tmp_path_factory.mktemp("refusable")
    one = make_series(23, subtypes=["subdural"], n_slices=12, size=128)
    write_series(one, root / "all")
    (root / "single").mkdir()
    (root / "all" / sorted(p.name for p in (root / "all").iterdir())[0]).rename(root / "single" / "one.dcm")
    write_ct_series([cross_section("abdomen", 16, seed=i) for i in range(4)], root / "tiny", fov_mm=400.0)
    write_ct_series([cross_section("abdomen", 64, seed=i) for i in range(12)], root / "abdomen")
    return {k: root / k for k in ("single", "tiny", "abdomen")}


@pytest.mark.parametrize(("case", "reason"), [
    ("single", "too few slices: 1 < 10"),
    ("tiny", "too few slices: 4 < 10"),
    ("abdomen", "does not look like a head CT"),
])
def test_what_serve_refuses_is_refused_with_the_reason_and_exit_1(tiny: Path, refusable, case: str,
                                                                    reason: str) -> None:
    proc = run("analyze", str(refusable[case]), "--json", "--model", str(tiny))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["series"] == [] and len(out["refused"]) == 1 and reason in out["refused"][0]["reason"]
    assert "nothing to analyse" in proc.stderr and "--force" in proc.stderr
    if case == "abdomen":
        text = run("analyze", str(refusable[case]), "--model", str(tiny))
        assert text.returncode == 1 and "POSITIVE" not in text.stdout and reason in text.stdout


def test_force_analyses_a_refused_series_and_says_so(tiny: Path, refusable) -> None:
    proc = run("analyze", str(refusable["abdomen"]), "--json", "--force", "--model", str(tiny))
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["series"][0]
    assert entry["forced"] is True and entry["eligible"] is False
    assert "does not look like a head CT" in entry["eligibility"]
    text = run("analyze", str(refusable["abdomen"]), "--force", "--model", str(tiny))
    assert text.returncode == 0 and "FORCED: the node would not analyse this series" in text.stdout


def test_an_eligible_series_is_not_marked_forced(tiny: Path, study) -> None:
    folder, _ = study
    entry = json.loads(run("analyze", str(folder), "--json", "--force", "--model", str(tiny)).stdout)["series"][0]
    assert entry["forced"] is False and entry["eligible"] is True and "head" in entry["eligibility"]
