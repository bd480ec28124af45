"""systemd/ihd-node.service: `systemd-analyze verify` finds nothing, and the hardening is all there."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "ihd-node.service"
EXE = "/opt/ihd-node/.venv/bin/ihd-node"


def directives() -> dict[str, list[str]]:
    """Service-section keys -> values (systemd allows repeated keys, configparser does not)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze absent (Debian package systemd): unit NOT verified")
    # verify checks that ExecStart's binary exists; /opt/ihd-node is not installed in a test run, so verify a
    # copy whose commands point at /bin/true, everything else (User=, hardening) unchanged.
    unit = tmp_path / "ihd-node.service"
    unit.write_text(UNIT.read_text().replace(EXE, "/bin/true"))
    proc = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "ihd-node" in x]
    assert lines == [], "\n".join(lines)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unit_runs_the_node_as_its_own_user_with_state_directory() -> None:
    d = directives()
    assert d["Service.User"] == ["ihd-node"] and d["Service.Group"] == ["ihd-node"]
    assert "Service.DynamicUser" not in d
    assert d["Service.ExecStart"] == [f"{EXE} serve --config /etc/ihd-node/config.yaml"]
    assert d["Service.StateDirectory"] == ["ihd-node"] and d["Service.StateDirectoryMode"] == ["0700"]
    assert d["Service.Restart"] == ["on-failure"] and "Service.RestartSec" in d
    assert d["Service.KillSignal"] == ["SIGTERM"] and "Service.TimeoutStopSec" in d
    assert d["Service.UMask"] == ["0077"]
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_unit_hardening() -> None:
    d = directives()
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "SystemCallArchitectures": "native", "RestrictSUIDSGID": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet": "",
        "ReadWritePaths": "/var/lib/ihd-node",
    }
    for key, value in expected.items():
        assert d.get(f"Service.{key}") == [value], key
    # The comments tell admins how to open the GPU and a privileged port instead of weakening the file.
    text = UNIT.read_text()
    assert "DeviceAllow=/dev/nvidia" in text and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text
    assert "useradd --system" in text


def test_unit_is_plain_ini() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]


# ---------------------------------------------------------------- the unit under a real systemd (issue 7 item 10)
#
# systemd is not PID 1 in the test environment, but a systemd *user* manager runs as an ordinary process once
# /run/systemd/system exists, which a private mount namespace provides without touching the machine. It runs
# the shipped unit's restart logic ([Unit] as shipped; [Service]'s start and restart directives verbatim)
# with the real `ihd-node serve`. What a user manager cannot do (User=, the sandboxing directives) is left out
# of these copies; `systemd-analyze verify` above checks that part of the shipped file.

SYSTEMD = Path("/lib/systemd/systemd")
RESTART_KEYS = ("Type", "ExecStartPre", "ExecStart", "Restart", "RestartSec", "RestartPreventExitStatus",
                "KillSignal", "TimeoutStopSec", "Environment")
FAST_RESTART = "0.2s"  # instead of the shipped 5 s: only the timing changes, not whether systemd restarts


class UserManager:
    """A `systemd --user` in its own mount namespace, with its own runtime and config folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.units = root / "config" / "systemd" / "user"
        self.units.mkdir(parents=True)
        runtime = root / "runtime"
        runtime.mkdir(mode=0o700)
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "XDG_CONFIG_HOME": str(root / "config")}
        script = ("mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/system && "
                  f"exec {SYSTEMD} --user")
        self.log = open(root / "manager.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                        env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.systemctl("show", "-p", "Version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        pytest.skip(f"systemd --user would not start here: {(root / 'manager.log').read_text()[-500:]}")

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["systemctl", "--user", *args], env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def show(self, unit: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", "ActiveState,SubState,Result,NRestarts,ExecMainStatus,MainPID")
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def install(self, name: str, text: str) -> None:
        (self.units / name).write_text(text)
        self.systemctl("daemon-reload")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory):
    missing = [x for x in ("unshare", "systemctl") if shutil.which(x) is None]
    if missing or not SYSTEMD.exists():
        pytest.skip(f"{', '.join(missing) or SYSTEMD} absent (Debian packages util-linux, systemd): "
                    "the unit's restart behaviour is NOT run; see README 'Install as a service'")
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace for systemd --user needs root here: restart behaviour NOT run")
    m = UserManager(tmp_path_factory.mktemp("systemd"))
    yield m
    m.stop()


def test_copy(exe: str, config: Path, log: Path, extra_service: str = "", exec_start_pre: str | None = None) -> str:
    """The shipped unit's [Unit] section and restart directives, running `exe` with `config`."""
    lines, section = [], None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            if section != "[Install]":
                lines.append(line)
            continue
        key = line.partition("=")[0]
        if section == "[Unit]" or (section == "[Service]" and key in RESTART_KEYS):
            lines.append(line)
    text = "\n".join(lines).replace(EXE, exe).replace("/etc/ihd-node/config.yaml", str(config))
    text = text.replace("RestartSec=5s", f"RestartSec={FAST_RESTART}")
    extra = f"StandardOutput=append:{log}\nStandardError=append:{log}\n{extra_service}"
    if exec_start_pre:
        extra += f"ExecStartPre={exec_start_pre}\n"
    return text.replace("[Service]", "[Service]\n" + extra, 1) + "\n"


test_copy.__test__ = False  # a helper, not a test


def wait_for(manager: UserManager, unit: str, states: tuple[str, ...], seconds: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        shown = manager.show(unit)
        if shown["ActiveState"] in states:
            return shown
        time.sleep(0.1)
    return manager.show(unit)


def serve_exe() -> str:
    return str(Path(sys.executable).parent / "ihd-node")


def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(f"storage: {{dir: {tmp_path / 'state'}}}\nnode: {{prot: 11112}}\n")  # typo: prot
    return path


def test_bad_config_stops_the_unit_without_a_restart_loop(manager: UserManager, tmp_path: Path) -> None:
    log = tmp_path / "journal.log"
    manager.install("bad.service", test_copy(serve_exe(), bad_config(tmp_path), log))
    manager.systemctl("start", "bad.service", check=False)
    shown = wait_for(manager, "bad.service", ("failed",))
    time.sleep(2.0)  # ten RestartSec= periods: a restart loop would have begun
    shown = manager.show("bad.service")
    assert shown["ActiveState"] == "failed" and shown["Result"] == "exit-code", shown
    assert shown["ExecMainStatus"] == "2" and shown["NRestarts"] == "0", shown
    said = log.read_text()
    assert "unknown key `node.prot`" in said and "did you mean `port`" in said and "Traceback" not in said


def test_check_before_start_would_loop_for_ever(manager: UserManager, tmp_path: Path) -> None:
    # Why the unit has no ExecStartPre= check: RestartPreventExitStatus= looks only at the main process, so
    # systemd restarts a failing ExecStartPre= (it stops only at the start limit, which the old unit lacked).
    log = tmp_path / "journal.log"
    unit = test_copy(serve_exe(), bad_config(tmp_path), log,
                     exec_start_pre=f"{serve_exe()} check-config {bad_config(tmp_path)}")
    unit = unit.replace("StartLimitBurst=5", "StartLimitBurst=1000")
    manager.install("precheck.service", unit)
    manager.systemctl("start", "precheck.service", check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and int(manager.show("precheck.service")["NRestarts"]) < 3:
        time.sleep(0.2)
    restarts = int(manager.show("precheck.service")["NRestarts"])
    manager.systemctl("stop", "precheck.service", check=False)
    assert restarts >= 3, f"systemd did not restart the failed ExecStartPre= ({restarts} restarts)"


def test_a_crash_loop_after_start_ends_at_the_start_limit(manager: UserManager, tmp_path: Path) -> None:
    # Exit 1 (a crash, not a start-up error) is restarted, but only StartLimitBurst= times per interval.
    log = tmp_path / "journal.log"
    manager.install("crash.service", test_copy("/bin/false", tmp_path / "unused.yaml", log).replace(
        "ExecStart=/bin/false serve --config", "ExecStart=/bin/false"))
    manager.systemctl("start", "crash.service", check=False)
    burst = int(directives()["Unit.StartLimitBurst"][0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and int(manager.show("crash.service")["NRestarts"]) < burst:
        time.sleep(0.2)
    time.sleep(2.0)  # ten RestartSec= periods: a restart would show
    shown = manager.show("crash.service")
    # systemd 252 books the refused sixth start as the last run's "exit-code"; newer ones say start-limit-hit.
    assert shown["ActiveState"] == "failed" and shown["Result"] in ("exit-code", "start-limit-hit"), shown
    assert shown["NRestarts"] == str(burst) and shown["ExecMainStatus"] == "1", shown
    time.sleep(1.0)
    assert manager.show("crash.service") == shown


def test_good_config_runs_and_stops_cleanly(manager: UserManager, tmp_path: Path) -> None:
    from ihd_node.sim.mini_pacs import free_port

    config = tmp_path / "good.yaml"
    config.write_text(f"storage: {{dir: {tmp_path / 'state'}, min_free_mb: 0}}\n"
                      f"node: {{host: 127.0.0.1, port: {free_port()}}}\nmodel: {{device: cpu}}\n")
    log = tmp_path / "journal.log"
    manager.install("good.service", test_copy(serve_exe(), config, log, "Environment=OMP_NUM_THREADS=1\n"))
    manager.systemctl("start", "good.service")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "scp.listening" not in (log.read_text() if log.exists() else ""):
        assert manager.show("good.service")["ActiveState"] in ("active", "activating"), log.read_text()
        time.sleep(0.2)
    assert "scp.listening" in log.read_text()
    manager.systemctl("stop", "good.service")  # KillSignal=SIGTERM
    shown = manager.show("good.service")
    assert shown["ActiveState"] == "inactive" and shown["Result"] == "success", shown
    assert "signal name=SIGTERM" in log.read_text() and "Traceback" not in log.read_text()
