"""Checks beyond the file itself: what would stop `serve` on this machine, and a summary an admin can
read at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ihd_node.config.audit import describe as audit_line
from ihd_node.config.sections import Config


def summary(config: Config) -> list[str]:
    """A few lines an admin can check at a glance (used by check-config and at start-up)."""
    from sqlalchemy.engine import make_url

    n, s = config.node, config.series
    who = ", ".join(n.allowed_calling_aets) or "any calling AE"
    where = ", ".join(n.allowed_addresses) or "any address"
    dests = ", ".join(_destination(d) for d in config.destinations) or "none (results are kept, not sent)"
    thick = "" if s.max_slice_thickness_mm is None else f", slices <= {s.max_slice_thickness_mm:g} mm"
    gradcam = "on" if config.analysis.gradcam else "off"
    return [
        f"node: AE {n.ae_title} on {n.host}:{n.port}, TLS {'on' if n.tls.enabled else 'off'}; "
        f"lets in {who} from {where}",
        f"storage: {config.storage.dir} (refuses data below {config.storage.min_free_mb} MB free)",
        f"database: {make_url(config.database_url).render_as_string(hide_password=True)}",
        f"series: complete {s.quiet_seconds:g} s after the last instance (at most {s.max_wait_seconds:g} s); "
        f"{'/'.join(s.modalities)}{', axial' if s.require_axial else ''}, "
        f"{s.min_slices}-{s.max_slices} slices{thick}",
        f"destinations: {dests}",
        f"model: {config.model.checkpoint} on {config.model.device}; Grad-CAM {gradcam} "
        f"(at most {config.analysis.max_secondary_captures} images per series)",
        audit_line(config.audit),
    ]


def _destination(d: Any) -> str:
    if d.kind == "dicom":
        return f"{d.name} = {d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls.enabled else ''}"
    if d.kind == "hl7":
        return f"{d.name} = HL7 ORU to {d.host}:{d.port}{' (TLS)' if d.tls.enabled else ''}"
    return f"{d.name} = {'FHIR' if d.kind == 'fhir' else 'STOW-RS'} to {d.url}"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_dir_problem(path: Path, what: str) -> str | None:
    """Why `path` (a folder the node creates or writes into) cannot be used, or None when it can."""
    import os

    if path.exists():
        if not path.is_dir():
            return f"{what} {path} is not a folder; point it at a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{what} {path} is not writable by this user; chown it to the ihd-node user or choose another"
        return None
    base = _nearest_existing(path)
    if not base.is_dir():
        return f"{what} {path} cannot be created: {base} is a file, not a folder; choose another path"
    if not os.access(base, os.W_OK | os.X_OK):
        return (f"{what} {path} cannot be created: {base} is not writable by this user; create it "
                "(owned by the ihd-node user) or choose another path")
    return None


def runtime_problems(config: Config) -> list[str]:
    """What would stop `serve` on this machine although the file itself is valid: folders it cannot create
    or write. Checked by `check-config` and at the start of `serve` (not by status/log, which only read)."""
    from sqlalchemy.engine import make_url

    where = str(config.source) if config.source else "the config"
    problems = []
    storage = _writable_dir_problem(Path(config.storage.dir), "storage.dir")
    if storage:
        problems.append(f"{storage} ({where})")
    url = make_url(config.database_url)
    db = url.database
    if url.get_backend_name() == "sqlite" and db and db != ":memory:" and not db.startswith("file:"):
        file = Path(db)
        parent_problem = _writable_dir_problem(file.parent, "the folder of the SQLite database")
        if file.is_dir():
            problems.append(f"database.url: {file} is a folder, not a database file ({where})")
        elif parent_problem and Path(config.storage.dir) not in (file.parent, *file.parent.parents):
            problems.append(f"database.url: {parent_problem} ({where})")
    return problems
