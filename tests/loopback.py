"""A node run in-process on loopback, sending to a receiving PACS (MiniPACS or Orthanc): the set-up shared
by the tests that drive one through real associations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from waiting import poll_until

from ihd_node.classes import CLASSES
from ihd_node.config import Config, default_config
from ihd_node.model.network import IhdModel
from ihd_node.model.pipeline import Predictor
from ihd_node.model.presets import tiny_config
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import free_port
from ihd_node.store import Series

NODE_AET = "IHD_AI"
FINISHED = ("delivered", "failed", "ignored")


def tiny_predictor(threshold: float = 0.3) -> Predictor:
    """A real, untrained tiny model (seeded): fast, and enough where the test is about the node, not the
    findings. One torch thread: the tests share two cores."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return Predictor.from_model(IhdModel(tiny_config()), dict.fromkeys(CLASSES, threshold), "tiny-random", "0")


def destination(name: str, ae_title: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port, **extra}


def node_config(root: Path, destinations: list[dict[str, Any]], port: int | None = None,
                **sections: Any) -> Config:
    """The node as IHD_AI on 127.0.0.1 (a free port unless given), no free-disk floor, state under root;
    `sections` override or extend the defaults like default_config's. The series defaults are the shipped
    ones (completion evidence on): send full heads (tests/heads.py)."""
    node = {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port or free_port(), **sections.pop("node", {})}
    storage = {"min_free_mb": 0, **sections.pop("storage", {})}
    return default_config(root, node=node, storage=storage, destinations=destinations, **sections)


@contextmanager
def running_node(config: Config, predictor: Predictor | None = None) -> Iterator[Node]:
    """Started (model warmed, port open) on entry, stopped on exit whatever the test did."""
    node = Node(config, predictor=predictor).start()
    try:
        yield node
    finally:
        node.stop()


def wait_finished(node: Node, series_uid: str, seconds: float) -> Series | None:
    """The series' row once it reached a final state, or as it stands when `seconds` ran out."""
    def finished() -> bool:
        record = node.db.get_series(series_uid)
        return record is not None and record.state in FINISHED

    poll_until(finished, seconds, every=0.5)
    return node.db.get_series(series_uid)
