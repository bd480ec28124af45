"""The node's small HTTP server (stdlib ThreadingHTTPServer): /healthz, /metrics and the console pages.

One thread per request; every page reads the database afresh. Who is asking and what their role may do is
ihd_node.web.auth (its ROUTE_ROLES table); this module only applies it: 401 (or a redirect to /login with
OpenID Connect) without credentials, 403 naming the role needed. On a loopback-only node without web.auth
the pages are open and the actions refused (read-only console). POSTs must come from the console's own pages
(Origin/Referer = Host), so another site cannot make a logged-in browser press a button.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as default_policy
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ihd_node import nodelog
from ihd_node.config import WebConfig
from ihd_node.web.auth import ROUTE_ROLES, SESSION_COOKIE, Auth, LoginAttempt, Principal, allows, hash_password


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)  # Set-Cookie values


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    principal: Principal | None
    address: str = ""
    cookies: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # uploads of a multipart/form-data POST

    @property
    def user(self) -> str | None:
        return self.principal.user if self.principal else None

    @property
    def role(self) -> str | None:
        return self.principal.role if self.principal else None

    @property
    def actor(self) -> str:
        """How audit events name who did it: `alice (operator)`."""
        return self.principal.label if self.principal else "nobody"


Route = Callable[[Request], Response]


UPLOAD_LIMIT = 10 * 2**20 + 64 * 1024  # a 10 MB file of reads (monitoring.labels.MAX_BYTES) and its form fields


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """(fields, files) of a multipart/form-data body; a file's name goes into fields as `<name>_name`."""
    message = BytesParser(policy=default_policy).parsebytes(
        f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1") + body)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    if not message.is_multipart():
        return fields, files
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        if filename is not None:
            files[str(name)] = payload
            fields[f"{name}_name"] = str(filename)
        else:
            fields[str(name)] = payload.decode("utf-8", errors="replace")
    return fields, files

def text(status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    return Response(status, body.encode(), content_type)


def as_json(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body, indent=1).encode(), "application/json")


class WebServer:
    """Routes: exact paths or prefixes ending in "/", each with its least role in auth.ROUTE_ROLES.

    `on_login` is called once per log-in attempt (LoginAttempt): a basic-auth credential on its first successful
    check and on every failure, the token likewise, an OpenID Connect callback's success or failure, a log-out.
    `log_event(kind, message, level=...)` (the log database's) books each failure as a `web` event.
    `on_denied(principal, method, path, need, address)` is called when a signed-in user lacks a route's role."""

    def __init__(self, config: WebConfig, routes: dict[tuple[str, str], Route], *, registry: Any,
                 log_event: Callable[..., None] | None = None) -> None:
        self.config = config
        self.auth = Auth(config.auth, self.login)
        self.routes = routes
        self.registry = registry
        self.log_event = log_event
        self.on_login: Callable[[LoginAttempt], None] = lambda attempt: None
        self.on_denied: Callable[[Principal, str, str, str, str], None] = lambda *refused: None
        self.oidc: Any = None  # the OpenID Connect client (ihd_node.web.oidc) when web.auth.oidc is set
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def denied(self, who: Principal, method: str, path: str, need: str, address: str) -> None:
        """Book a refused use of a route (the user's role is too low): an event, and `on_denied` (the audit)."""
        if self.log_event is not None:
            self.log_event("web", f"{method} {path} refused for {who.user} ({who.role}): needs the {need} role",
                           level="WARNING", peer_address=address)
        try:
            self.on_denied(who, method, path, need, address)
        except Exception as exc:  # like on_login: the audit hook must not turn a refusal into a 500
            nodelog.error("web.on_denied_failed", error=f"{type(exc).__name__}: {exc}")

    def login(self, attempt: LoginAttempt) -> None:
        """Book one log-in attempt: a failure as an event, every attempt to `on_login` (the audit trail)."""
        if not attempt.success:
            if self.log_event is None:
                nodelog.warning("web.login_failed", method=attempt.method, address=attempt.address,
                                reason=attempt.reason)
            else:  # an event row and its log line
                self.log_event("web", f"console log-in failed ({attempt.method}) for {attempt.user or 'no user'} "
                               f"from {attempt.address}: {attempt.reason}", level="WARNING",
                               peer_address=attempt.address)
        try:
            self.on_login(attempt)
        except Exception as exc:  # the audit hook must not turn a log-in into a 500; its failure is logged
            nodelog.error("web.on_login_failed", error=f"{type(exc).__name__}: {exc}")

    def start(self) -> WebServer:
        missing = sorted(f"{m} {p}" for m, p in self.routes if (m, p) not in ROUTE_ROLES)
        if missing:  # fail closed: a route nobody gave a role would be open or refused by accident
            raise RuntimeError(f"routes without a role in ihd_node.web.auth.ROUTE_ROLES: {', '.join(missing)}")
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

    def _find(self, method: str, path: str) -> tuple[str, str] | None:
        """The route key serving `path`: exact, else the longest prefix ("/study/..." is not "/")."""
        if (method, path) in self.routes:
            return (method, path)
        best: tuple[str, str] | None = None
        for m, prefix in self.routes:
            if m == method and len(prefix) > 1 and prefix.endswith("/") and path.startswith(prefix) \
                    and len(path) > len(prefix) and (best is None or len(prefix) > len(best[1])):
                best = (m, prefix)
        return best

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
        for cookie in response.cookies:
            h.send_header("Set-Cookie", cookie)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(response.body)

    def _respond(self, h: BaseHTTPRequestHandler, method: str, path: str, query: str) -> Response:
        key = self._find(method, path)
        if key is None:
            return text(404 if method == "GET" else 405, "not found\n")
        need = ROUTE_ROLES[key]
        cookies = read_cookies(h.headers.get("Cookie"))
        address = str(h.client_address[0])
        who = self.auth.identify(h.headers.get("Authorization"), cookies.get(SESSION_COOKIE), address)
        if need is not None:
            refused = self._refuse(h, method, path, query, need, who)
            if refused is not None:
                return refused
        form: dict[str, str] = {}
        files: dict[str, bytes] = {}
        if method == "POST":
            if not self._same_origin(h):
                return text(403, "cross-site request refused\n")
            kind = h.headers.get("Content-Type", "")
            if kind.startswith("multipart/form-data"):
                declared = int(h.headers.get("Content-Length") or 0)
                if declared > UPLOAD_LIMIT:
                    h.close_connection = True  # the body is not read
                    return text(413, f"the upload is {declared / 2**20:.1f} MB, more than {UPLOAD_LIMIT / 2**20:g} MB; "
                                     "split the file\n")
                form, files = parse_multipart(kind, h.rfile.read(declared))
            else:
                length = min(int(h.headers.get("Content-Length") or 0), 64 * 1024)
                form = {k: v[0] for k, v in parse_qs(h.rfile.read(length).decode(errors="replace")).items()}
        args = {k: v[0] for k, v in parse_qs(query).items()}
        return self.routes[key](Request(method, path, args, form, who, address, cookies, files))

    def _refuse(self, h: BaseHTTPRequestHandler, method: str, path: str, query: str, need: str,
                who: Principal | None) -> Response | None:
        """Why this caller may not use a route needing role `need` (401, a sign-in redirect, 403), or None."""
        if who is not None:
            if allows(who.role, need):
                return None
            self.denied(who, method, path, need, str(h.client_address[0]))
            return text(403, f"this needs the {need} role; {who.user} signed in as {who.role}. An admin can give "
                             f"{who.user} the {need} role (`ihd-node web-user FILE {who.user} --role {need}`, or "
                             "the sign-in provider's group mapped in web.auth.oidc.role_map)\n")
        if not self.auth.required:  # loopback without web.auth: anyone on this machine may look, nobody act
            if allows("viewer", need) and method == "GET":
                return None
            return text(403, f"this needs the {need} role, and web.auth (a users file, token or OpenID Connect) "
                             "is not set in the node's config, so the console is read-only\n")
        if self.config.auth.oidc is not None and method == "GET" and "text/html" in h.headers.get("Accept", ""):
            target = path + (f"?{query}" if query else "")
            return Response(303, b"", "text/plain", {"Location": f"/login?{urlencode({'next': target})}"})
        challenge = 'Basic realm="ihd-node", charset="UTF-8"' if self.config.auth.users_file else "Bearer"
        return Response(401, b"authentication required\n", "text/plain; charset=utf-8",
                        {"WWW-Authenticate": challenge})

    @staticmethod
    def _same_origin(h: BaseHTTPRequestHandler) -> bool:
        host = h.headers.get("Host", "")
        origin = h.headers.get("Origin") or h.headers.get("Referer")
        if origin is None:  # not a browser (curl, scripts with a token): no cross-site risk
            return True
        return urlsplit(origin).netloc == host

    def metrics(self, _request: Request) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)


def read_cookies(header: str | None) -> dict[str, str]:
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(header or "")
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in cookies.items()}


def disk_free(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


__all__ = ["HTTPStatus", "WebServer", "Request", "Response", "as_json", "text", "hash_password", "disk_free",
           "read_cookies"]
