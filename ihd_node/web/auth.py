"""Who is asking the console, and what their role lets them do.

Three ways in (web.auth): a basic-auth users file (`user:role:pbkdf2_sha256$...`), a bearer token with a
configured role (scripts, Prometheus), and an OpenID Connect sign-in (ihd_node.web.oidc) that leaves a signed
session cookie. ROUTE_ROLES below is the one table of which route needs which role; the server refuses to start
with a route that is not in it. Every log-in attempt becomes one LoginAttempt, handed to WebServer.on_login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ihd_node.config import WebAuth
from ihd_node.errors import UserError

ROLES = ("viewer", "operator", "admin")  # each may do all that the ones before it may
# A users-file line from before roles (`user:hash`) reads as operator: the user keeps every action the console
# had (re-send, re-analyse, retract, reads) and gets nothing new (the admin page); check-config says how to fix.
LEGACY_ROLE = "operator"
PBKDF2_ITERATIONS = 200_000
SESSION_COOKIE = "ihd_session"

# (method, route) -> the least role that may use it; None = public. A route missing here stops the server.
ROUTE_ROLES: dict[tuple[str, str], str | None] = {
    ("GET", "/healthz"): None, ("GET", "/healthz/live"): None,
    ("GET", "/login"): None, ("GET", "/oidc/callback"): None, ("POST", "/logout"): None,
    ("GET", "/"): "viewer", ("GET", "/study/"): "viewer", ("GET", "/thumb/"): "viewer",
    ("GET", "/performance"): "viewer", ("GET", "/metrics"): "viewer",
    ("GET", "/read/"): "operator", ("POST", "/actions/read"): "operator",
    ("GET", "/reads/import"): "operator", ("POST", "/actions/import-reads"): "operator",
    ("POST", "/actions/resend"): "operator", ("POST", "/actions/reanalyse"): "operator",
    ("POST", "/actions/retract"): "operator",
    ("GET", "/admin"): "admin",
}


def allows(role: str | None, need: str) -> bool:
    """True when `role` may use what needs `need`."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(need)


@dataclass(frozen=True)
class Principal:
    """A signed-in caller: the name shown and audited, the role, and how they signed in."""

    user: str
    role: str
    method: str  # "basic" | "token" | "oidc"

    @property
    def label(self) -> str:
        """`alice (operator)`: how audit events name the actor."""
        return f"{self.user} ({self.role})"


@dataclass(frozen=True)
class LoginAttempt:
    """One console log-in attempt (or log-out), for the audit trail. Never carries a password or token."""

    user: str | None
    role: str | None
    success: bool
    address: str
    method: str  # "basic" | "token" | "oidc"
    reason: str


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """`pbkdf2_sha256$iterations$salt$hash` (base64), the users file's hash."""
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


@dataclass(frozen=True)
class UserLine:
    user: str
    role: str
    stored: str  # the PBKDF2 hash
    legacy: bool  # written before roles (`user:hash`): read as LEGACY_ROLE


def read_users(path: Path) -> dict[str, UserLine]:
    """The users file: `user:role:pbkdf2_sha256$...` a line (`user:pbkdf2_sha256$...` reads as LEGACY_ROLE)."""
    users = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, rest = line.partition(":")
        role, _, stored = rest.partition(":")
        legacy = role.startswith("pbkdf2_sha256$")
        if legacy:
            role, stored = LEGACY_ROLE, rest
        if not user or not stored.startswith("pbkdf2_sha256$"):
            raise UserError(f"web.auth.users_file {path} line {n} is not `user:role:pbkdf2_sha256$...`; "
                            "write it with `ihd-node web-user FILE USER --role viewer|operator|admin`")
        if role not in ROLES:
            raise UserError(f"web.auth.users_file {path} line {n}: role {role!r} is not one of {', '.join(ROLES)}; "
                            f"rewrite it with `ihd-node web-user {path} {user} --role viewer|operator|admin`")
        users[user] = UserLine(user, role, stored, legacy)
    return users


def write_user(path: Path, user: str, role: str, stored: str) -> None:
    """Add or replace `user`'s line (other lines and comments stay as they are); the file is kept 0600."""
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [line for line in lines if line.strip().partition(":")[0] != user] + [f"{user}:{role}:{stored}"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there before keeps no wider mode: it holds the password hashes
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signed session cookies (HMAC-SHA256 with a key made at start: a restart signs everyone out) and the
    sessions ended by log-out before they expired."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self._ended: dict[str, float] = {}  # session id -> its expiry
        self._lock = threading.Lock()

    def sign(self, data: dict[str, object]) -> str:
        body = _b64(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())
        return body + "." + _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def unsign(self, value: str, now: float | None = None) -> dict[str, object] | None:
        """The data of a cookie this node signed and that has not expired, else None."""
        body, _, mac = value.partition(".")
        try:
            good = hmac.compare_digest(_unb64(mac), hmac.new(self._key, body.encode(), hashlib.sha256).digest())
            data = json.loads(_unb64(body)) if good else None
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or float(data.get("exp", 0)) <= (now or time.time()):
            return None
        return data

    def issue(self, principal: Principal, seconds: float) -> str:
        return self.sign({"u": principal.user, "r": principal.role, "m": principal.method,
                          "sid": secrets.token_urlsafe(12), "exp": int(time.time() + seconds)})

    def principal(self, value: str | None) -> Principal | None:
        data = self.unsign(value) if value else None
        if data is None or data.get("r") not in ROLES:
            return None
        with self._lock:
            if str(data.get("sid")) in self._ended:
                return None
        return Principal(str(data["u"]), str(data["r"]), str(data.get("m", "oidc")))

    def end(self, value: str | None) -> Principal | None:
        """Log-out: the session stops working here even if the browser kept the cookie; who it was, or None."""
        who = self.principal(value)
        data = self.unsign(value) if who is not None and value else None
        if data is None:
            return None
        now = time.time()
        with self._lock:
            self._ended = {sid: exp for sid, exp in self._ended.items() if exp > now}
            self._ended[str(data["sid"])] = float(data["exp"])  # type: ignore[arg-type]
        return who


Report = Callable[[LoginAttempt], None]


class Auth:
    """Who is asking: the session cookie, else the Authorization header (bearer token or basic auth)."""

    def __init__(self, config: WebAuth, report: Report) -> None:
        self.config = config
        self.required = config.configured
        self.report = report
        self.token = Path(config.token_file).read_text().strip() if config.token_file else None
        if config.token_file and not self.token:
            raise UserError(f"web.auth.token_file {config.token_file} is empty; put a long random token in it")
        self.users = read_users(Path(config.users_file)) if config.users_file else {}
        self.sessions = Sessions()
        self._verified: dict[str, Principal] = {}  # sha256 of a checked Authorization header (PBKDF2 is slow)
        self._lock = threading.Lock()

    def identify(self, authorization: str | None, session: str | None, address: str) -> Principal | None:
        if session:
            found = self.sessions.principal(session)
            if found is not None:
                return found
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return self._token(value.strip(), address)
        if scheme == "basic":
            return self._basic(authorization, value.strip(), address)
        self._fail(None, address, "basic", f"unsupported Authorization scheme {scheme[:20]!r}")
        return None

    def _token(self, value: str, address: str) -> Principal | None:
        if self.token is None:
            self._fail("token", address, "token", "a bearer token was sent but web.auth.token_file is not set")
            return None
        if not hmac.compare_digest(value.encode(), self.token.encode()):
            self._fail("token", address, "token", "wrong bearer token")
            return None
        # Every request of a script carries the token: one success a process is enough for the audit trail.
        return self._once("token", Principal("token", self.config.token_role, "token"), address)

    def _basic(self, header: str, value: str, address: str) -> Principal | None:
        key = hashlib.sha256(header.encode()).hexdigest()
        with self._lock:
            if key in self._verified:
                return self._verified[key]
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            self._fail(None, address, "basic", "malformed basic-auth header")
            return None
        line = self.users.get(user)
        if line is None:
            self._fail(user[:64], address, "basic", "no such user in web.auth.users_file")
            return None
        if not check_password(line.stored, password):
            self._fail(user, address, "basic", "wrong password")
            return None
        return self._once(key, Principal(user, line.role, "basic"), address)

    def _once(self, key: str, principal: Principal, address: str) -> Principal:
        with self._lock:
            first = key not in self._verified
            self._verified[key] = principal
        if first:
            self.report(LoginAttempt(principal.user, principal.role, True, address, principal.method, "signed in"))
        return principal

    def _fail(self, user: str | None, address: str, method: str, reason: str) -> None:
        self.report(LoginAttempt(user, None, False, address, method, reason))
