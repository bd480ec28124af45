"""The image built with podman from deploy/container/Containerfile and run as it would be deployed:
config mounted read-only, storage on a mounted folder, a read-only root file system, no capabilities, ports
published; the HEALTHCHECK turns healthy, a phantom study sent by C-STORE comes back analysed at a PACS on
the host, the process is not root, and `podman stop` ends it cleanly. How the image is built on a machine
without a container registry: tests/podman.py."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from heads import full_head
from podman import IMAGE, base_image, build, podman, run_options, why_no_podman

from ihd_node.sim.mini_pacs import MiniPACS, free_port, send_datasets
from ihd_node.sr_classes import SR_CLASSES

pytestmark = [pytest.mark.slow, pytest.mark.container]  # `make container-test`, not `make test`
ROOT = Path(__file__).resolve().parent.parent
UID = 10001


@pytest.fixture(scope="module")
def image() -> str:
    reason = why_no_podman()
    if reason:
        pytest.skip(reason)
    base, how = base_image(build_if_missing=False)
    if base is None:
        pytest.skip(how)
    seconds, torch = build(base)
    size = podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
    print(f"\n{IMAGE} on {base} ({how}); torch: {torch}; built in {seconds:.0f} s (layer cache), "
          f"{int(size) / 1e9:.2f} GB")
    return IMAGE


def _mounts(tmp: Path, pacs_port: int, web_port: int, dicom_port: int) -> tuple[Path, Path]:
    """The config folder (read-only in the container) and the storage folder, owned as the image needs."""
    etc, state = tmp / "etc", tmp / "state"
    etc.mkdir(parents=True)
    state.mkdir()
    text = (ROOT / "deploy" / "container" / "config.yaml").read_text()
    text = text.replace("{name: pacs, ae_title: PACS, host: pacs.hospital.example, port: 104}",
                        f"{{name: pacs, ae_title: PACS, host: host.containers.internal, port: {pacs_port}}}")
    text = text.replace("series:      {quiet_seconds: 2}", "series:      {quiet_seconds: 1}")
    assert "host.containers.internal" in text
    (etc / "config.yaml").write_text(text.replace("storage:     {dir: /var/lib/ihd-node}",
                                                  "storage:     {dir: /var/lib/ihd-node, min_free_mb: 64}"))
    (etc / "web.token").write_text(uuid.uuid4().hex + "\n")
    for path in (etc / "config.yaml", etc / "web.token"):
        path.chmod(0o644)  # readable by UID 10001 (a site would rather chgrp 10001 and 0640)
    etc.chmod(0o755)
    os.chown(state, UID, UID)  # the storage folder belongs to the image's user (README, "Run in a container")
    state.chmod(0o700)
    tmp.chmod(0o755)
    return etc, state


def _health(name: str) -> str:
    return podman("inspect", "--format", "{{.State.Health.Status}}", name, check=False).stdout.strip()


def test_image_serves_as_non_root_turns_healthy_analyses_a_study_and_stops_cleanly(image: str,
                                                                                 tmp_path: Path) -> None:
    name = f"ihd-node-test-{uuid.uuid4().hex[:8]}"
    dicom_port, web_port = free_port(), free_port()
    with MiniPACS(tmp_path / "pacs", ae_title="PACS", host="0.0.0.0") as pacs:
        etc, state = _mounts(tmp_path / "mounts", pacs.port, web_port, dicom_port)
        started = time.monotonic()
        podman("run", "-d", "--name", name, *run_options(), "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "-v", f"{etc}:/etc/ihd-node:ro",
               "-v", f"{state}:/var/lib/ihd-node", "-p", f"127.0.0.1:{dicom_port}:11112",
               "-p", f"127.0.0.1:{web_port}:8112", image)
        try:
            # The HEALTHCHECK's own command (podman runs it on a timer only under systemd): healthy once the
            # model is loaded and the node listens.
            deadline = time.monotonic() + 600
            while podman("healthcheck", "run", name, check=False).returncode != 0:
                running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
                assert running == "true", podman("logs", name).stdout + podman("logs", name).stderr
                assert time.monotonic() < deadline, podman("logs", name).stderr
                time.sleep(2)
            healthy_after = time.monotonic() - started
            assert _health(name) == "healthy"
            print(f"\nhealthy {healthy_after:.0f} s after `podman run`")
            assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
            assert podman("exec", name, "id", "-g").stdout.strip() == str(UID)
            # No compilers in the image that runs.
            assert podman("exec", name, "sh", "-c", "command -v gcc cc c++ make", check=False).stdout == ""
            # Published ports: /healthz without auth, the console with the mounted token only.
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=10) as r:
                assert r.status == 200

            phantom = full_head(7, ["subdural"], n_slices=20, size=512)  # the shipped model reads 512 px
            statuses = send_datasets(phantom.datasets, host="127.0.0.1", port=dicom_port, called_aet="IHD_AI",
                                     calling_aet="PACS", timeout=60)
            assert statuses == [0] * len(phantom.datasets)
            sent = time.monotonic()
            deadline = sent + 600
            while not any(o.sop_class_uid in SR_CLASSES.values() for o in pacs.objects(phantom.study_instance_uid)):
                assert time.monotonic() < deadline, podman("logs", name).stderr[-4000:]
                time.sleep(2)
            print(f"SR at the PACS {time.monotonic() - sent:.0f} s after the last instance was sent")
            # Written by UID 10001 on the mounted storage, owner-only.
            spool = next((state / "spool").rglob("*.dcm"), None) or next(state.rglob("*.sqlite"))
            assert spool.stat().st_uid == UID and spool.stat().st_mode & 0o077 == 0

            podman("stop", "-t", "90", name, timeout=120)
            assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
            logs = podman("logs", name)
            text = logs.stdout + logs.stderr
            assert "signal name=SIGTERM" in text and 'msg="clean stop on SIGTERM"' in text
            assert "Traceback" not in text
        finally:
            podman("rm", "-f", name, check=False)


def test_image_worker_command_reaches_ihd_node_worker(image: str, tmp_path: Path) -> None:
    """`podman run IMAGE worker` runs `ihd-node worker --config /etc/ihd-node/config.yaml`: with the SQLite
    example config it stops at once with status 2 and says it needs PostgreSQL (compose.yaml has that)."""
    etc, state = _mounts(tmp_path, 4242, free_port(), free_port())
    done = subprocess.run(["podman", "run", "--rm", *run_options(), "-v", f"{etc}:/etc/ihd-node:ro",
                           "-v", f"{state}:/var/lib/ihd-node", image, "worker"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "PostgreSQL" in done.stderr and "Traceback" not in done.stderr
