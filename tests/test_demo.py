"""`ihd-node demo` (what `make demo` runs) end to end on the shipped default model, as a fresh user runs it."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ihd_node.model.checkpoint import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the shipped default model is missing")


def demo(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The demo with its own TMPDIR, so what it leaves in the temporary folder can be seen."""
    tmp.mkdir()
    return subprocess.run([sys.executable, "-m", "ihd_node", "demo", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TMPDIR": str(tmp)})


def left_behind(tmp: Path) -> list[str]:
    # torch creates an empty shared cache folder (torchinductor_<user>) in TMPDIR when imported: not the demo's.
    return sorted(p.name for p in tmp.iterdir() if not (p.name.startswith("torchinductor_") and p.is_dir()
                                                        and not any(p.iterdir())))


def test_demo_sends_two_studies_prints_their_results_and_leaves_nothing(tmp_path: Path) -> None:
    proc = demo(tmp_path / "tmp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("SR: ") == 2 and out.count("time to result") == 2
    assert "NOT FOR DIAGNOSTIC USE" in out
    assert "Traceback" not in proc.stderr
    with_bleed, without = out.split("study without hemorrhage")
    assert "Intracranial hemorrhage" in with_bleed and "agrees with the phantom's truth" in with_bleed
    assert "agrees with the phantom's truth" in without
    # One line per class, read back through a TID 1500 reader, for each study (not one per region).
    for part in (with_bleed, without):
        assert len(re.findall(r"^  \S.* (Present|Absent) +p = \d+\.\d %$", part, re.M)) == 6, part
    # Issue 7 item 16: nothing is left in the temporary folder, and no printed path points into it.
    assert left_behind(tmp_path / "tmp") == []
    assert "Nothing kept" in out and "--keep" in out
    assert not re.search(r"(SR|e\.g\.|database)\W+/", out), out


def test_demo_keep_keeps_the_results_and_the_database_it_prints(tmp_path: Path) -> None:
    proc = demo(tmp_path / "tmp", "--keep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [kept] = left_behind(tmp_path / "tmp")
    assert kept.startswith("ihd-node-demo-")
    database = Path(re.search(r"the node's log database (\S+)", proc.stdout).group(1))
    assert database.is_file() and str(database).startswith(str(tmp_path / "tmp" / kept))
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM series WHERE state = 'delivered'").fetchone()[0] == 2
    srs = re.findall(r"SR: (\S+)", proc.stdout)
    assert len(srs) == 2 and all(Path(p).is_file() for p in srs)


def test_demo_reads_the_findings_as_a_stranger_would(tmp_path: Path) -> None:
    """sr_findings reads the SR through highdicom's TID 1500 reader: one line per class with Present/Absent
    and the series probability, then the outlines in one line; a negative SR still lists the six."""
    from test_report_common import make_prediction, make_volume, write

    from ihd_node.commands.demo import sr_findings
    from ihd_node.report import build_sr

    volume = make_volume(tmp_path, n=6, bleed_slices=(2, 3))
    positive = sr_findings(write(build_sr(volume, make_prediction(6, {"intraparenchymal": [2, 3]})),
                                 tmp_path / "positive.dcm"))
    assert len(positive) == 7
    assert re.match(r"Cerebral hemorrhage \(intraparenchymal\) +Present +p = 95\.0 %$", positive[2])
    assert re.match(r"Subdural hemorrhage \(subdural\) +Absent +p = 3\.0 %$", positive[5])
    assert positive[6] == ("outlined on 2 key slice(s): Intraparenchymal hemorrhage 95 %; "
                           "Intraparenchymal hemorrhage 85 %")
    negative = sr_findings(write(build_sr(volume, make_prediction(6)), tmp_path / "negative.dcm"))
    assert len(negative) == 6 and all(" Absent " in line for line in negative)
