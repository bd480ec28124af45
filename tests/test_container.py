"""The container image (deploy/container/): what can be checked without a container engine.

The definition itself (the final stage runs as a fixed non-root UID, exposes the node's default ports, has a
health check on /healthz, its entrypoint runs commands the package really has, every COPY source exists and
is sent in the build context), the shipped configs and compose file against the node's own config model,
and the entrypoint and health probe scripts run outside a container against a real `ihd-node serve`.
Building and running the image with podman is tests/test_container_run.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from containerfile import ROOT, Stage, ignore_patterns, ignored, parse

from ihd_node.config import load_config
from ihd_node.config.sections import NodeConfig, StorageConfig, WebConfig
from ihd_node.sim.mini_pacs import free_port

DEPLOY = ROOT / "deploy" / "container"
UID = "10001"


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse()[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _systemd_config_path() -> str:
    unit = (ROOT / "systemd" / "ihd-node.service").read_text()
    found = re.search(r"^ExecStart=\S+ serve --config (\S+)$", unit, re.MULTILINE)
    assert found, "systemd/ihd-node.service: no ExecStart=... serve --config FILE"
    return found.group(1)


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in stage.all("ENV"):
        for word in re.findall(r"(\w+)=(\S+)", inst.text):
            env[word[0]] = word[1]
    return env


def test_two_stages_the_final_one_has_no_build_tools(stages: list[Stage]) -> None:
    global_args, _ = parse()
    assert global_args["PYTHON_IMAGE"] == "docker.io/library/python:3.11-slim-bookworm"
    assert [s.name for s in stages] == ["build", "runtime"]
    assert all(s.base == "${PYTHON_IMAGE}" for s in stages)
    runs = " ".join(i.text for i in stages[-1].all("RUN"))
    # Nothing is compiled or installed from the distribution in the image that runs: wheels only.
    assert not re.search(r"apt-get|apt |gcc|build-essential|\bmake\b|--no-binary", runs), runs
    assert "pip wheel" in " ".join(i.text for i in stages[0].all("RUN"))
    assert any(i.flags_and_args()[0].get("from") == "build" for i in stages[-1].all("COPY"))


def test_runs_as_a_fixed_non_root_user(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None and user.text == f"{UID}:{UID}", "the final stage must end as UID:GID 10001:10001"
    # USER comes after every RUN: nothing later runs as root.
    assert all(i.line < user.line for i in final.all("RUN"))
    useradd = " ".join(i.text for i in final.all("RUN"))
    assert f"--uid {UID}" in useradd and f"--gid {UID}" in useradd
    assert f"-o {UID} -g {UID} /var/lib/ihd-node" in useradd  # the volume's owner in the image


def test_ports_volume_and_config_are_the_nodes_defaults(final: Stage) -> None:
    exposed = {p.split("/")[0] for i in final.all("EXPOSE") for p in i.text.split()}
    assert exposed == {str(NodeConfig().port), str(WebConfig().port)}
    volume = final.last("VOLUME")
    assert volume is not None and volume.exec_form() == [str(StorageConfig().dir)]
    env = _env(final)
    # The same config path as the systemd unit and the README's service install.
    assert env["IHD_NODE_CONFIG"] == _systemd_config_path() == "/etc/ihd-node/config.yaml"
    assert env["HOME"] == str(StorageConfig().dir)  # anything written under $HOME lands on the volume
    stop = final.last("STOPSIGNAL")
    assert stop is not None and stop.text == "SIGTERM"


def test_entrypoint_and_health_check(final: Stage) -> None:
    entry = final.last("ENTRYPOINT")
    cmd = final.last("CMD")
    assert entry is not None and entry.exec_form() == ["/usr/local/bin/ihd-node-entrypoint"]
    assert cmd is not None and cmd.exec_form() == ["serve"]
    health = final.last("HEALTHCHECK")
    assert health is not None
    assert health.exec_form() is None  # options first: parse them out
    options, probe = health.text.split(" CMD ", 1)
    assert re.search(r"--start-period=\d+s", options) and re.search(r"--interval=\d+s", options)
    assert probe.strip() == '["/opt/ihd-node/bin/python", "/usr/local/bin/ihd-node-healthcheck"]'
    copies = {inst.flags_and_args()[1][-1]: inst.flags_and_args()[1][0] for inst in final.all("COPY")
              if not inst.flags_and_args()[0].get("from")}
    assert copies == {"/usr/local/bin/ihd-node-entrypoint": "deploy/container/entrypoint.sh",
                      "/usr/local/bin/ihd-node-healthcheck": "deploy/container/healthcheck.py"}
    for source in copies.values():  # COPY keeps the mode: both must be executable in git
        assert os.access(ROOT / source, os.X_OK), f"{source} is not executable (git update-index --chmod=+x)"


def test_entrypoint_runs_commands_the_package_has() -> None:
    from ihd_node.commands.cli import HANDLERS

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ihd-node": "ihd_node.commands.cli:main"}
    text = (DEPLOY / "entrypoint.sh").read_text()
    assert "exec ihd-node" in text
    assert {"serve", "worker"} <= set(HANDLERS)
    assert re.search(r"^\s*serve\|worker\)", text, re.MULTILINE)


def test_every_copy_source_exists_and_is_in_the_build_context(stages: list[Stage]) -> None:
    patterns = ignore_patterns(ROOT / ".containerignore")
    assert (ROOT / ".dockerignore").read_text() == (ROOT / ".containerignore").read_text()
    for unwanted in (".venv", ".git", "tests", ".viewer"):
        assert ignored(unwanted, patterns), unwanted
    assert ignored("ihd_node/store/__pycache__/x.pyc", patterns)
    sources = [src for stage in stages for inst in stage.all("COPY")
               if not inst.flags_and_args()[0].get("from") for src in inst.flags_and_args()[1][:-1]]
    assert "ihd_node" in sources and "pyproject.toml" in sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        kept = [p for p in files if not ignored(str(p.relative_to(ROOT)), patterns)]
        assert kept, f"COPY {source}: everything under it is excluded by .containerignore"
        if source == "ihd_node":  # the default weights and the templates travel with the package
            names = {str(p.relative_to(ROOT)) for p in kept}
            assert {"ihd_node/weights/default.pt", "ihd_node/store/migrations/script.py.mako"} <= names


def test_requirements_split_keeps_the_projects_ranges(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(DEPLOY / "requirements.py"), str(ROOT / "pyproject.toml"), str(tmp_path)],
                   check=True)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = (tmp_path / "torch.txt").read_text().split()
    rest = (tmp_path / "requirements.txt").read_text().split("\n")
    assert sorted(t.split(">")[0] for t in torch) == ["torch", "torchvision"]
    assert sorted(torch + [r for r in rest if r]) == sorted(deps)


def _config_dir(tmp_path: Path, source: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(source, etc / "config.yaml")
    (etc / "web.token").write_text("a-test-token-of-enough-length-0123456789\n")
    return etc


def _as_mounted(config: Path, etc: Path, state: Path) -> Path:
    """The config as the container sees it, with its absolute paths moved to the test's folders."""
    text = config.read_text().replace("/etc/ihd-node", str(etc)).replace("/var/lib/ihd-node", str(state))
    config.write_text(text)
    return config


@pytest.mark.parametrize("name", ["config.yaml", "config-cluster.yaml"])
def test_shipped_configs_are_valid(tmp_path: Path, name: str) -> None:
    etc = _config_dir(tmp_path, DEPLOY / name)
    config = load_config(_as_mounted(etc / "config.yaml", etc, tmp_path / "state"))
    assert config.node.port == NodeConfig().port and config.web.port == WebConfig().port
    assert config.web.host == "0.0.0.0" and config.web.auth.token_file == etc / "web.token"
    assert str(StorageConfig().dir) in (DEPLOY / name).read_text()


def test_compose_mounts_config_and_storage_in_every_node_service() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "migrate", "node", "worker"}
    for name in ("migrate", "node", "worker"):
        service = services[name]
        assert service["image"].startswith("localhost/ihd-node")
        assert service["build"]["dockerfile"] == "deploy/container/Containerfile"
        assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
        assert "./etc:/etc/ihd-node:ro" in service["volumes"]
        assert f"storage:{StorageConfig().dir}" in service["volumes"]
    assert services["node"]["command"] == ["serve", "--roles", "receive,deliver"]
    assert services["worker"]["command"] == ["worker"]
    assert services["migrate"]["command"][:2] == ["db", "upgrade"]
    ports = {p.rsplit(":", 1)[-1] for p in services["node"]["ports"]}
    assert ports == {str(NodeConfig().port), str(WebConfig().port)}
    # The password in the example config is the placeholder compose.yaml's comment tells to replace.
    assert "postgresql+psycopg://ihd:" in (DEPLOY / "config-cluster.yaml").read_text()
    assert "@db/ihd" in (DEPLOY / "config-cluster.yaml").read_text()


# -- the entrypoint and the health probe, outside a container, against a real node ------------------------------


def _script_env(config: Path) -> dict[str, str]:
    env = dict(os.environ, IHD_NODE_CONFIG=str(config), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `ihd-node` of this environment
    env.pop("IHD_NODE_HEALTH_URL", None)
    return env


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True, text=True,
                          timeout=30)


def test_entrypoint_without_config_names_the_mount(tmp_path: Path) -> None:
    env = _script_env(tmp_path / "absent.yaml")
    done = subprocess.run([str(DEPLOY / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot read the configuration" in done.stderr and "-v /srv/ihd-node/etc:/etc/ihd-node:ro" in done.stderr
    probe = _probe(env)  # nothing listens: unhealthy, with the URL it tried
    assert probe.returncode == 1 and f"127.0.0.1:{WebConfig().port}/healthz" in probe.stdout


def test_entrypoint_worker_gets_the_config(tmp_path: Path) -> None:
    """`worker` reaches `ihd-node worker --config $IHD_NODE_CONFIG`: with SQLite the node refuses, naming why."""
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{dir: {tmp_path / 'state'}, min_free_mb: 0}}\nmodel: {{device: cpu}}\n")
    done = subprocess.run([str(DEPLOY / "entrypoint.sh"), "worker"], env=_script_env(config), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "PostgreSQL" in done.stderr and "Traceback" not in done.stderr


def _tiny_checkpoint(path: Path) -> Path:
    """A real, untrained tiny model: the node under the scripts starts in seconds instead of loading the shipped
    model (which the image test, tests/test_container_run.py, does)."""
    import torch

    from ihd_node.classes import CLASSES
    from ihd_node.model.checkpoint import save_checkpoint
    from ihd_node.model.network import IhdModel
    from ihd_node.model.presets import tiny_config

    torch.manual_seed(0)
    return save_checkpoint(path, IhdModel(tiny_config()), thresholds=dict.fromkeys(CLASSES, 0.3), name="tiny",
                           version="0", provenance={})


def test_entrypoint_serves_probe_turns_healthy_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    model = _tiny_checkpoint(tmp_path / "tiny.pt")
    web_port = free_port()
    config = etc / "config.yaml"
    config.write_text(f"node: {{host: 127.0.0.1, port: {free_port()}}}\n"
                      f"storage: {{dir: {tmp_path / 'state'}, min_free_mb: 0}}\n"
                      f"model: {{device: cpu, checkpoint: {model}}}\nweb: {{host: 127.0.0.1, port: {web_port}}}\n")
    env = _script_env(config)
    log = (tmp_path / "node.log").open("w")
    node = subprocess.Popen([str(DEPLOY / "entrypoint.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = _probe(env)
        assert first.returncode == 1 and f"127.0.0.1:{web_port}/healthz" in first.stdout  # read from the config
        deadline = time.monotonic() + 240
        while (probe := _probe(env)).returncode != 0:
            assert node.poll() is None, (tmp_path / "node.log").read_text()
            assert time.monotonic() < deadline, probe.stdout
            time.sleep(1)
        assert "200 ready" in probe.stdout
        # exec: the node itself is the entrypoint's process, so the signal reaches it directly.
        assert Path(f"/proc/{node.pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"ihd-node")
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=90) == 0
    finally:
        if node.poll() is None:
            node.kill()
        log.close()
    text = (tmp_path / "node.log").read_text()
    assert 'msg="clean stop on SIGTERM"' in text and "Traceback" not in text
    assert _probe(env).returncode == 1
