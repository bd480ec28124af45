"""/healthz: liveness (the process answers and its threads run) and readiness (database, spool disk, model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ihd_node.store import Database
from ihd_node.web.server import disk_free


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def readiness(db: Database, spool_dir: Path, min_free_mb: int, model: Callable[[], str | None],
              dead_threads: Callable[[], list[str]],
              degraded: Callable[[], str | None] = lambda: None) -> list[Check]:
    checks = []
    try:
        db.ping()
        checks.append(Check("database", True, "answers"))
    except Exception as exc:
        checks.append(Check("database", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    free = disk_free(spool_dir)
    if free is None:
        checks.append(Check("spool_disk", False, f"{spool_dir} cannot be read"))
    else:
        ok = free >= min_free_mb << 20
        checks.append(Check("spool_disk", ok, f"{free >> 20} MB free, storage.min_free_mb {min_free_mb}"
                            + ("" if ok else ": new data is refused")))
    name = model()
    checks.append(Check("model", name is not None, name or "not loaded"))
    dead = dead_threads()
    checks.append(Check("threads", not dead, "all running" if not dead else "stopped: " + ", ".join(dead)))
    why = degraded()
    checks.append(Check("loops", why is None, "working" if why is None else f"meet errors: {why}"))
    return checks


def overall(checks: list[Check]) -> tuple[int, str]:
    """(HTTP status, word): ready; degraded while the node's loops meet errors (it cannot work without its
    database, so 503 as for "not ready", but named so that an admin sees the node is up and waiting); else not
    ready."""
    failed = {c.name for c in checks if not c.ok}
    if not failed:
        return 200, "ready"
    if failed <= {"loops", "database"} and "loops" in failed:
        return 503, "degraded"
    return 503, "not ready"
