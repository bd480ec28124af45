"""OpenID Connect sign-in for the console (web.auth.oidc): the authorization-code flow with PKCE, state and nonce.

`/login` keeps a pending sign-in (state, nonce, PKCE verifier; 10 minutes, one use) bound to the browser by a
cookie holding the state, and sends the browser to the provider's authorization endpoint (from its discovery
document). `/oidc/callback` checks the state against that cookie, trades the code for tokens at the token
endpoint (with the verifier, and the client secret when there is one), checks the ID token's signature against
the provider's JWKS, its issuer, audience, expiry and nonce, and maps the `role_claim` through `role_map` to a
role; no mapped value, no access. Then a signed session cookie (HttpOnly, SameSite=Lax, Secure when the console
is reached over https) lasts `session_hours`. `/logout` ends the session on this node.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jwt

from ihd_node.config import WebOidc
from ihd_node.web.auth import ROLES, SESSION_COOKIE, LoginAttempt, Principal
from ihd_node.web.server import Request, Response, WebServer, text

LOGIN_COOKIE = "ihd_login"
PENDING_SECONDS = 600
MAX_PENDING = 1000  # unauthenticated /login calls must not grow memory without bound
ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
LEEWAY_SECONDS = 60  # clock skew between the node and the provider


class SignInRefused(Exception):
    """Why a sign-in was not accepted, in words for the log and the page."""


class NoRole(SignInRefused):
    """Signed in at the provider, but no value of the role claim is mapped to a console role."""

    def __init__(self, user: str, reason: str) -> None:
        super().__init__(reason)
        self.user = user


@dataclass(frozen=True)
class Pending:
    nonce: str
    verifier: str
    next: str
    created: float


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def http_json(url: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Any:
    body = urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Accept": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise SignInRefused(f"{url} answered HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SignInRefused(f"{url} cannot be reached or read ({exc})") from None


class OidcClient:
    """The provider's endpoints and keys (read once, on the first sign-in), and the checks of each sign-in."""

    def __init__(self, config: WebOidc) -> None:
        self.config = config
        self.secret = Path(config.client_secret_file).read_text().strip() if config.client_secret_file else None
        self.leeway: float = LEEWAY_SECONDS
        self._meta: dict[str, Any] | None = None
        self._jwks: jwt.PyJWKClient | None = None
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def metadata(self) -> dict[str, Any]:
        if self._meta is None:
            meta = http_json(f"{self.config.issuer}/.well-known/openid-configuration")
            if not isinstance(meta, dict) or str(meta.get("issuer", "")).rstrip("/") != self.config.issuer:
                raise SignInRefused(f"the discovery document of {self.config.issuer} names another issuer "
                                    f"({meta.get('issuer') if isinstance(meta, dict) else meta!r}); set "
                                    "web.auth.oidc.issuer to the provider's exact issuer")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(meta.get(key), str):
                    raise SignInRefused(f"the discovery document of {self.config.issuer} has no {key}")
            self._jwks = jwt.PyJWKClient(meta["jwks_uri"], cache_keys=True, timeout=15)
            self._meta = meta
        return self._meta

    def start(self, next_path: str) -> tuple[str, str]:
        """(the provider's authorization URL, the state) of a new pending sign-in."""
        meta = self.metadata()
        state, nonce, verifier = (secrets.token_urlsafe(24) for _ in range(3))
        now = time.time()
        with self._lock:
            self._pending = {s: p for s, p in self._pending.items() if now - p.created < PENDING_SECONDS}
            while len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[state] = Pending(nonce, verifier, next_path, now)
        query = urlencode({"response_type": "code", "client_id": self.config.client_id,
                           "redirect_uri": self.config.redirect_uri, "scope": " ".join(self.config.scopes),
                           "state": state, "nonce": nonce, "code_challenge": pkce_challenge(verifier),
                           "code_challenge_method": "S256"})
        return f"{meta['authorization_endpoint']}?{query}", state

    def finish(self, state: str, code: str, browser_state: str | None) -> tuple[Principal, str]:
        """The signed-in user and where they were going; SignInRefused with why otherwise."""
        if not state or not browser_state or not hmac.compare_digest(state.encode(), browser_state.encode()):
            raise SignInRefused("the state does not match this browser's sign-in (start again at /login)")
        with self._lock:
            pending = self._pending.pop(state, None)
        if pending is None or time.time() - pending.created >= PENDING_SECONDS:
            raise SignInRefused("unknown, used or expired sign-in state (start again at /login)")
        if not code:
            raise SignInRefused("the provider sent no authorization code")
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.config.redirect_uri,
                "code_verifier": pending.verifier}
        headers = {}
        if self.secret is not None:  # client_secret_basic (RFC 6749 2.3.1: each part form-encoded)
            pair = f"{quote(self.config.client_id, safe='')}:{quote(self.secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.config.client_id
        tokens = http_json(self.metadata()["token_endpoint"], form, headers)
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str):
            raise SignInRefused("the token endpoint returned no id_token")
        claims = self.verify(id_token, pending.nonce)
        return self.principal(claims), pending.next

    def verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature (JWKS), issuer, audience, expiry and nonce are right."""
        meta = self.metadata()
        assert self._jwks is not None
        allowed = [a for a in meta.get("id_token_signing_alg_values_supported", ["RS256"]) if a in ASYMMETRIC]
        try:
            key = self._signing_key(id_token)
            claims = jwt.decode(id_token, key.key, algorithms=allowed or ["RS256"], audience=self.config.client_id,
                                issuer=self.config.issuer, leeway=self.leeway,
                                options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except (jwt.PyJWTError, ValueError) as exc:
            raise SignInRefused(f"the ID token is not valid: {exc}") from None
        audience = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audience) > 1 and claims.get("azp") != self.config.client_id:
            raise SignInRefused("the ID token is for several clients but azp is not this console")
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise SignInRefused("the ID token's nonce is not this sign-in's (a replayed or injected token)")
        return claims

    def _signing_key(self, id_token: str) -> Any:
        """The JWKS key named by the token's `kid`; without one, the provider's only signing key (OIDC Core
        10.1 lets a provider with one key leave kid out)."""
        assert self._jwks is not None
        if jwt.get_unverified_header(id_token).get("kid") is not None:
            return self._jwks.get_signing_key_from_jwt(id_token)
        keys = self._jwks.get_signing_keys()
        if len(keys) != 1:
            raise SignInRefused(f"the ID token names no key (kid) and the provider has {len(keys)} signing keys")
        return keys[0]

    def principal(self, claims: dict[str, Any]) -> Principal:
        """The console user of verified claims: the highest role that `role_map` gives any value of the claim."""
        user = str(claims.get(self.config.user_claim) or claims["sub"])[:128]
        user = "".join(c for c in user if c.isprintable()) or str(claims["sub"])[:128]
        found = claims.get(self.config.role_claim)
        values = [found] if isinstance(found, str) else [str(v) for v in found] if isinstance(found, list) else []
        roles = [self.config.role_map[v] for v in values if v in self.config.role_map]
        if not roles:
            raise NoRole(user, f"none of {user}'s `{self.config.role_claim}` values is in web.auth.oidc.role_map")
        return Principal(user, max(roles, key=ROLES.index), "oidc")


def cookie(name: str, value: str, *, path: str, max_age: int, secure: bool) -> str:
    return (f"{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax"
            + ("; Secure" if secure else ""))


def local_path(value: str | None) -> str:
    """Where to go after signing in: a path on this console only (never `//elsewhere` or a full URL)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def oidc_routes(config: WebOidc, server: WebServer) -> dict[tuple[str, str], Any]:
    client = OidcClient(config)
    server.oidc = client
    secure = config.secure_cookie
    sessions = server.auth.sessions

    def login(request: Request) -> Response:
        next_path = local_path(request.query.get("next"))
        if request.principal is not None:  # signed in already (a session, or basic auth as the fallback below)
            return Response(303, b"", "text/plain", {"Location": next_path})
        try:
            where, state = client.start(next_path)
        except SignInRefused as exc:
            said = f"the sign-in provider cannot be used now: {exc}. Try again later"
            if server.config.auth.users_file is None:
                return text(503, said + "\n")
            # The users file is the fallback while the provider is down: the browser asks for that log-in.
            challenge = {"WWW-Authenticate": 'Basic realm="ihd-node", charset="UTF-8"'}
            return Response(401, f"{said}, or sign in with a users-file account\n".encode(),
                            "text/plain; charset=utf-8", challenge)
        return Response(303, b"", "text/plain", {"Location": where},
                        [cookie(LOGIN_COOKIE, state, path="/oidc/callback", max_age=PENDING_SECONDS, secure=secure)])

    def callback(request: Request) -> Response:
        gone = cookie(LOGIN_COOKIE, "", path="/oidc/callback", max_age=0, secure=secure)
        user = None
        try:
            if "error" in request.query:
                raise SignInRefused(f"the provider refused: {request.query['error'][:64]} "
                                    f"{request.query.get('error_description', '')[:200]}".strip())
            who, next_path = client.finish(request.query.get("state", ""), request.query.get("code", ""),
                                           request.cookies.get(LOGIN_COOKIE))
        except SignInRefused as exc:
            user = exc.user if isinstance(exc, NoRole) else None
            server.login(LoginAttempt(user, None, False, request.address, "oidc", str(exc)))
            advice = ("ask the console's admin to map one of your groups to a role (web.auth.oidc.role_map)"
                      if user else "start again at /login")
            return Response(403, f"sign-in refused: {exc}; {advice}\n".encode(), "text/plain; charset=utf-8",
                            cookies=[gone])
        server.login(LoginAttempt(who.user, who.role, True, request.address, "oidc", "signed in"))
        seconds = int(config.session_hours * 3600)
        session = cookie(SESSION_COOKIE, sessions.issue(who, seconds), path="/", max_age=seconds, secure=secure)
        return Response(303, b"", "text/plain", {"Location": next_path}, [gone, session])

    def logout(request: Request) -> Response:
        who = sessions.end(request.cookies.get(SESSION_COOKIE))
        if who is not None:
            server.login(LoginAttempt(who.user, who.role, True, request.address, who.method, "log-out"))
        page = ('<!doctype html><meta charset="utf-8"><title>Signed out</title>'
                '<p>Signed out of the ihd-node console. <a href="/login">Sign in again</a></p>')
        return Response(200, page.encode(), cookies=[cookie(SESSION_COOKIE, "", path="/", max_age=0, secure=secure)])

    return {("GET", "/login"): login, ("GET", "/oidc/callback"): callback, ("POST", "/logout"): logout}
