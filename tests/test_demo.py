"""`ihd-node demo` (what `make demo` runs) end to end on the shipped default model, as a fresh user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ihd_node.model.checkpoint import DEFAULT_CHECKPOINT


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="the shipped default model is missing")
def test_demo_sends_two_studies_and_prints_their_results() -> None:
    proc = subprocess.run([sys.executable, "-m", "ihd_node", "demo"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("SR: ") == 2 and out.count("time to result") == 2
    assert "NOT FOR DIAGNOSTIC USE" in out
    assert "Traceback" not in proc.stderr
    with_bleed, without = out.split("study without hemorrhage")
    assert "Intracranial hemorrhage" in with_bleed and "agrees with the phantom's truth" in with_bleed
    assert "agrees with the phantom's truth" in without
