"""systemd/ihd-node-worker@.service: a clean `systemd-analyze verify` of an instance, and the instance
(the GPU index) reaches both the worker's --device and the device allow list."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "ihd-node-worker@.service"
EXE = "/opt/ihd-node/.venv/bin/ihd-node"


def test_worker_instance_verifies_clean(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze absent (Debian package systemd): unit NOT verified")
    # verify wants ExecStart's binary to exist: /opt/ihd-node is not installed in a test run.
    (tmp_path / "ihd-node-worker@.service").write_text(UNIT.read_text().replace(EXE, "/bin/true"))
    proc = subprocess.run([tool, "verify", "--man=no", str(tmp_path / "ihd-node-worker@1.service")],
                          capture_output=True, text=True, timeout=60)
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "ihd-node" in x]
    assert lines == [] and proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_unit_runs_the_worker_on_the_instance_gpu() -> None:
    text = UNIT.read_text()
    assert f"ExecStart={EXE} worker --config /etc/ihd-node/config.yaml --device cuda:%i" in text
    assert "DeviceAllow=/dev/nvidia%i rw" in text and "DevicePolicy=closed" in text
    assert "User=ihd-node" in text and "RestartPreventExitStatus=2" in text and "UMask=0077" in text
    assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
