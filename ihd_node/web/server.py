"""The node's small HTTP server (stdlib ThreadingHTTPServer): /healthz, /metrics and the console pages.

One thread per request; every page reads the database afresh. Authentication (web.auth): a bearer token
file and/or a basic-auth users file. When auth is configured every path but /healthz needs it; the
actions (POST) always need it, so on a loopback-only node without auth the console is read-only. POSTs
must come from the console's own pages (Origin/Referer = Host), so another site cannot make a logged-in
browser press a button.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ihd_node import nodelog
from ihd_node.config import WebConfig
from ihd_node.errors import UserError

PBKDF2_ITERATIONS = 200_000


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """`pbkdf2_sha256$iterations$salt$hash` (base64), the users file's format."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"pbkdf2_sha256${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(stored: str, password: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def read_users(path: Path) -> dict[str, str]:
    users = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not stored.startswith("pbkdf2_sha256$"):
            raise UserError(f"web.auth.users_file {path} line {n} is not `user:pbkdf2_sha256$...`; "
                            "write it with `ihd-node web-user FILE USER`")
        users[user] = stored
    return users


class Auth:
    """Who is asking: a user name, "token", or None."""

    def __init__(self, config: WebConfig) -> None:
        self.required = config.auth.configured
        self.token = Path(config.auth.token_file).read_text().strip() if config.auth.token_file else None
        if config.auth.token_file and not self.token:
            raise UserError(f"web.auth.token_file {config.auth.token_file} is empty; put a long random token in it")
        self.users = read_users(Path(config.auth.users_file)) if config.auth.users_file else {}
        self._verified: dict[str, str] = {}  # sha256 of a checked Authorization header -> user (PBKDF2 is slow)
        self._lock = threading.Lock()

    def who(self, header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token:
            return "token" if hmac.compare_digest(value.strip().encode(), self.token.encode()) else None
        if scheme.lower() != "basic" or not self.users:
            return None
        key = hashlib.sha256(header.encode()).hexdigest()
        with self._lock:
            if key in self._verified:
                return self._verified[key]
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        stored = self.users.get(user)
        if stored is None or not check_password(stored, password):
            return None
        with self._lock:
            self._verified[key] = user
        return user


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    user: str | None


Route = Callable[[Request], Response]


def text(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, body.encode(), content_type)


def as_json(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body, indent=1).encode(), "application/json")


class WebServer:
    """Routes: exact paths or prefixes ending in "/"; `public` paths need no auth, `actions` always do."""

    def __init__(self, config: WebConfig, routes: dict[tuple[str, str], Route], *, public: set[str],
                 registry: Any) -> None:
        self.config = config
        self.auth = Auth(config)
        self.routes = routes
        self.public = public
        self.registry = registry
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> WebServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "ihd-node"
            sys_version = ""

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                outer._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # request lines carry study UIDs; errors are logged by _handle

        server = ThreadingHTTPServer((self.config.host, self.config.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ihd-web", daemon=True)
        self._thread.start()
        nodelog.info("web.listening", host=self.config.host, port=self.port,
                     auth="configured" if self.auth.required else "none (read-only console)")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _find(self, method: str, path: str) -> Route | None:
        if (method, path) in self.routes:
            return self.routes[(method, path)]
        best: tuple[int, Route] | None = None  # the longest prefix ("/study/..." is not "/")
        for (m, prefix), route in self.routes.items():
            if m == method and len(prefix) > 1 and prefix.endswith("/") and path.startswith(prefix) \
                    and len(path) > len(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), route)
        return best[1] if best else None

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path = parts.path
        try:
            response = self._respond(h, method, path, parts.query)
        except Exception as exc:
            nodelog.error("web.failed", path=path.split("/")[1] if "/" in path else path,
                          error=f"{type(exc).__name__}: {exc}")
            response = text(500, "internal error; see the node's log\n")
        h.send_response(response.status)
        h.send_header("Content-Type", response.content_type)
        h.send_header("Content-Length", str(len(response.body)))
        h.send_header("Cache-Control", "no-store")
        h.send_header("X-Content-Type-Options", "nosniff")
        h.send_header("Referrer-Policy", "same-origin")  # "no-referrer" makes browsers send Origin: null
        for key, value in response.headers.items():
            h.send_header(key, value)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(response.body)

    def _respond(self, h: BaseHTTPRequestHandler, method: str, path: str, query: str) -> Response:
        route = self._find(method, path)
        if route is None:
            return text(404 if method == "GET" else 405, "not found\n")
        user = self.auth.who(h.headers.get("Authorization"))
        if user is None and (method == "POST" or (self.auth.required and path not in self.public)):
            if method == "POST" and not self.auth.required:
                return text(403, "actions need web.auth (a token or users file) in the node's config\n")
            return Response(401, b"authentication required\n", "text/plain; charset=utf-8",
                            {"WWW-Authenticate": 'Basic realm="ihd-node", charset="UTF-8"'})
        form: dict[str, str] = {}
        if method == "POST":
            if not self._same_origin(h):
                return text(403, "cross-site request refused\n")
            length = min(int(h.headers.get("Content-Length") or 0), 64 * 1024)
            form = {k: v[0] for k, v in parse_qs(h.rfile.read(length).decode(errors="replace")).items()}
        args = {k: v[0] for k, v in parse_qs(query).items()}
        return route(Request(method, path, args, form, user))

    @staticmethod
    def _same_origin(h: BaseHTTPRequestHandler) -> bool:
        host = h.headers.get("Host", "")
        origin = h.headers.get("Origin") or h.headers.get("Referer")
        if origin is None:  # not a browser (curl, scripts with a token): no cross-site risk
            return True
        return urlsplit(origin).netloc == host

    def metrics(self, _request: Request) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)


def disk_free(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


__all__ = ["HTTPStatus", "WebServer", "Request", "Response", "as_json", "text", "hash_password", "disk_free"]
