"""Shared harness of the reliability suite: the node as a real `ihd-node serve` subprocess.

Each test gets its own state folder, config file, free ports and log file; the receiving PACS is a
MiniPACS in the test process (stop and start it to play a PACS that goes down and comes back).
The model is a tiny random checkpoint made once per session, so analysis is fast and deterministic.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
import torch
import yaml
from waiting import poll_until

from ihd_node.classes import CLASSES
from ihd_node.model.checkpoint import save_checkpoint
from ihd_node.model.network import IhdModel
from ihd_node.model.presets import tiny_config
from ihd_node.sim.mini_pacs import MiniPACS, free_port

NODE_AET = "IHD_AI"
PACS_AET = "PACS"
# A random model sits near 0.5; thresholds below that make every series "positive" so captures are made.
TINY_THRESHOLDS = dict.fromkeys(CLASSES, 0.3)


def wait_until(condition: Callable[[], object], seconds: float = 30.0, every: float = 0.05) -> bool:
    return poll_until(condition, seconds, every)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, IhdModel(tiny_config()), thresholds=TINY_THRESHOLDS, name="tiny-random", version="0",
                    provenance={"data": "random init, for tests"})
    return path


def reap(process: subprocess.Popen, log: IO[str], timeout: float) -> int:
    """Exit code of a node process told to stop (killed if it has not ended within `timeout`); its log closed."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    log.close()
    return code


class NodeProcess:
    """`ihd-node serve` in a subprocess with its own config; stdout goes to `log_path`."""

    def __init__(self, root: Path, checkpoint: Path, pacs: MiniPACS | None, **overrides: dict) -> None:
        self.root = root
        self.port = free_port()
        self.state_dir = root / "state"
        self.db_path = self.state_dir / "ihd.sqlite"
        self.config_path = root / "config.yaml"
        self.log_path = root / "node.log"
        config: dict = {
            "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": self.port},
            "storage": {"dir": str(self.state_dir), "min_free_mb": 0},
            # Completion evidence (check_geometry, check_coverage) as shipped: tests send full heads (faults.py).
            "series": {"quiet_seconds": 0.5, "max_wait_seconds": 30},
            "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]
            if pacs else [],
            "model": {"checkpoint": str(checkpoint), "device": "cpu"},
            "analysis": {"max_secondary_captures": 2},
            "delivery": {"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0},
            "web": {"port": 0},  # any free port: many nodes run side by side
        }
        for section, values in overrides.items():
            config[section] = values if not isinstance(values, dict) else {**config.get(section, {}), **values}
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {**os.environ, "TCP_NODELAY": "1", "OMP_NUM_THREADS": "1"}

    def start(self, extra_env: dict[str, str] | None = None, wait: bool = True) -> NodeProcess:
        """Start (or restart) the node; with `wait`, return once this run's SCP listens."""
        offset = len(self.log())  # the log is appended to across restarts: look only at this run's part
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in _reap
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ihd_node", "serve", "--config", str(self.config_path)],
            env={**self.env, **(extra_env or {})}, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            assert wait_until(lambda: "scp.listening" in self.log()[offset:] or self.process.poll() is not None, 90) \
                and self.process.poll() is None, f"node did not start:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self._reap()

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def _reap(self, timeout: float = 30) -> int:
        assert self.process is not None
        return reap(self.process, self._log, timeout)

    def query(self, sql: str, *params: object) -> list[tuple]:
        """Read the node's SQLite log database (read-only, beside the running node thanks to WAL)."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as conn:
            return conn.execute(sql, params).fetchall()

    def series_state(self, series_uid: str) -> str | None:
        rows = self.query("SELECT state FROM series WHERE series_instance_uid = ?", series_uid)
        return rows[0][0] if rows else None

    def wait_state(self, series_uid: str, states: tuple[str, ...], seconds: float = 60) -> str | None:
        wait_until(lambda: self.db_path.exists() and self.series_state(series_uid) in states, seconds, 0.1)
        return self.series_state(series_uid)


@pytest.fixture
def pacs(tmp_path: Path):
    with MiniPACS(tmp_path / "pacs", ae_title=PACS_AET) as receiving:
        yield receiving


@pytest.fixture
def make_node(tmp_path: Path, tiny_checkpoint: Path):
    """Factory: make_node(pacs, **config_overrides) -> NodeProcess (not started). Stopped at test end."""
    made: list[NodeProcess] = []

    def factory(pacs: MiniPACS | None, name: str = "node", **overrides: dict) -> NodeProcess:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        node = NodeProcess(root, tiny_checkpoint, pacs, **overrides)
        made.append(node)
        return node

    yield factory
    for node in made:
        if node.process is not None and node.process.poll() is None:
            node.terminate()
