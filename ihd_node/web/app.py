"""Wires the running node to its web server: which path shows what."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ihd_node.monitoring.watch import drift_warning
from ihd_node.web.console import console_routes
from ihd_node.web.health import overall, readiness
from ihd_node.web.metrics import Live, registry
from ihd_node.web.oidc import oidc_routes
from ihd_node.web.performance_metrics import PerformanceCollector
from ihd_node.web.server import Request, Response, WebServer, as_json, disk_free, text


def make_web_server(node: Any) -> WebServer:
    """`node` is the running ihd_node.node.wiring.Node."""
    cfg = node.config
    db = node.db
    spool_dir = Path(cfg.storage.spool_dir)

    def live() -> Live:
        return Live(queue_depth=node.queue_depth(), model_loaded=node.model_name() is not None,
                    spool_free_bytes=disk_free(spool_dir))

    def model() -> str | None:
        if "analyse" not in getattr(node, "roles", ("analyse",)):  # a receive/deliver-only cluster member
            return "in the worker processes (role analyse is not in this one)"
        return node.model_name()

    def healthz(_r: Request) -> Response:
        checks = readiness(db, spool_dir, cfg.storage.min_free_mb, model, node.dead_threads,
                           getattr(node, "degraded", lambda: None))
        code, word = overall(checks)
        body: dict[str, object] = {"status": word,
                                   "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        if word == "degraded":
            body["reason"] = next(c.detail for c in checks if c.name == "loops")
        elif word == "ready" and (drift := drift_warning(db)) is not None:
            body.update(status="warning", warning=drift)  # drift is a warning for admins, never "down"
        return as_json(code, body)

    def liveness(_r: Request) -> Response:
        dead = node.dead_threads()
        return text(503, f"threads stopped: {', '.join(dead)}\n") if dead else text(200, "alive\n")

    server = WebServer(cfg.web, {}, registry=registry(db, live, {d.name: d.kind for d in cfg.destinations}),
                       log_event=db.log_event)
    server.registry.register(PerformanceCollector(  # local performance and drift gauges
        db, cfg, lambda: node.drift.last if getattr(node, "drift", None) is not None else None))
    server.routes.update({("GET", "/healthz"): healthz, ("GET", "/healthz/live"): liveness,
                          ("GET", "/metrics"): server.metrics})
    server.routes.update(console_routes(node, server))
    if cfg.web.auth.oidc is not None:
        server.routes.update(oidc_routes(cfg.web.auth.oidc, server))
    return server
