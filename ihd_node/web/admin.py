"""The admin's page (`/admin`, role admin): who may use the console with which role, and the configuration the
node is running with, secrets masked. Read-only: users are changed with `ihd-node web-user` (or at the sign-in
provider) and the configuration in its file, both read when the node starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ihd_node.errors import UserError
from ihd_node.web.auth import LEGACY_ROLE, ROLES, ROUTE_ROLES, read_users
from ihd_node.web.server import Request, Response

MASK = "***"


def masked(key: str, value: Any) -> Any:
    """A config value fit to show: no password in a URL, no query string, no webhook path (the path of a Slack or
    Teams hook is its secret). Secret *files* are shown by path; their contents are never read here."""
    if not isinstance(value, str) or "://" not in value:
        return value
    parts = urlsplit(value)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    path = f"/{MASK}" if key.startswith("alerts.") and parts.path not in ("", "/") else parts.path
    return urlunsplit((parts.scheme, netloc, path, MASK if parts.query else "", ""))


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """`{"web": {"port": 8112}}` -> [("web.port", 8112)]; lists of mappings as `destinations[0].name`."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, masked(prefix, value))]


def users_table(config: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The users file's users with their roles, and why it could not be read (None when it could)."""
    path = config.web.auth.users_file
    if path is None:
        return [], None
    try:
        lines = read_users(Path(path))
    except (OSError, UserError) as exc:
        return [], str(exc)
    return [{"user": u.user, "role": u.role, "legacy": u.legacy} for u in lines.values()], None


def admin_routes(node: Any, render: Any) -> dict[tuple[str, str], Any]:
    """`render(template, request, **context)` is the console's (ihd_node.web.console)."""
    cfg = node.config

    def admin(request: Request) -> Response:
        users, users_error = users_table(cfg)
        rules = sorted(((need or "public", m, p) for (m, p), need in ROUTE_ROLES.items()),
                       key=lambda r: (r[0] != "public", ROLES.index(r[0]) if r[0] in ROLES else -1, r[2]))
        settings = flatten(cfg.model_dump(mode="json"))
        return render("admin.html", request, users=users, users_error=users_error, auth=cfg.web.auth,
                      legacy_role=LEGACY_ROLE, rules=rules, settings=settings, source=cfg.source)

    return {("GET", "/admin"): admin}
