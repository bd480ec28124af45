"""Issue 7 item 11: what stops `serve` at start-up is caught by `check-config` first, and `serve` answers any
start-up failure with one clear line and exit status 2 (the unit's RestartPreventExitStatus), never a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from ihd_node.sim.mini_pacs import free_port
from tests.unprivileged import unprivileged

EXE = Path(sys.executable).parent / "ihd-node"


def missing_postgres_driver() -> str:
    """A PostgreSQL driver SQLAlchemy knows that is not installed here."""
    for driver, module in (("pg8000", "pg8000"), ("psycopg2cffi", "psycopg2cffi"), ("psycopg2", "psycopg2"),
                           ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is None:
            return driver
    pytest.skip("every PostgreSQL driver SQLAlchemy knows is installed: none is missing to test with")


def config_file(tmp_path: Path, **sections: dict) -> Path:
    data: dict = {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"dir": str(tmp_path / "state"), "min_free_mb": 0},
        "model": {"device": "cpu"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_clear_line(proc: subprocess.CompletedProcess[str], command: str, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"ihd-node {command}: error: "), errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def cases(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    driver = missing_postgres_driver()
    return {
        "unknown database kind": (config_file(tmp_path / "a", database={"url": "foo://bar"}),
                                  ("database.url", "foo", "SQLAlchemy does not know")),
        "driver not installed": (
            config_file(tmp_path / "b", database={"url": f"postgresql+{driver}://ihd@localhost/ihd"}),
            ("database.url", driver, "not installed", "pip install")),
        "storage.dir cannot be created": (config_file(tmp_path / "c", storage={"dir": str(blocker / "state")}),
                                          ("storage.dir", "cannot be created", "is a file")),
    }


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    for sub in "abc":
        (tmp_path / sub).mkdir()
    return cases(tmp_path)


@pytest.mark.parametrize("case", ["unknown database kind", "driver not installed", "storage.dir cannot be created"])
def test_check_config_catches_what_would_stop_serve(configs: dict, case: str) -> None:
    path, words = configs[case]
    one_clear_line(run("check-config", str(path)), "check-config", *words)


@pytest.mark.parametrize("case", ["unknown database kind", "driver not installed", "storage.dir cannot be created"])
def test_serve_answers_with_one_line_and_exit_2(configs: dict, case: str) -> None:
    path, words = configs[case]
    one_clear_line(run("serve", "--config", str(path)), "serve", *words)


def test_storage_dir_without_write_permission(tmp_path: Path) -> None:
    # Root may write into any folder: the command runs without that power (tests/unprivileged.py), from a
    # folder everyone may enter (pytest's tmp_path is private to its owner) holding one nobody may write.
    folder = Path(tempfile.mkdtemp(prefix="ihd-perm-"))
    try:
        folder.chmod(0o755)
        locked = folder / "locked"
        locked.mkdir(mode=0o555)
        path = config_file(folder, storage={"dir": str(locked / "state")})
        path.chmod(0o644)
        proc = subprocess.run(unprivileged([str(EXE), "check-config", str(path)]), capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        one_clear_line(proc, "check-config", "storage.dir", "not writable")
        assert not (locked / "state").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_serve_turns_an_unforeseen_start_up_failure_into_one_line(tmp_path: Path) -> None:
    # A "database" file that is not SQLite: the config is fine, opening fails deep inside the driver.
    path = config_file(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "ihd.sqlite").write_bytes(b"this is not an SQLite database" * 100)
    assert run("check-config", str(path)).returncode == 0
    line = one_clear_line(run("serve", "--config", str(path)), "serve")
    assert "ihd.sqlite" in line or "not a database" in line, line
