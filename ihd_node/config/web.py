"""The web console's section: where it listens, and who may do what (users file, token, OpenID Connect).

Roles, least to most: viewer (pages, /metrics), operator (viewer + re-send, re-analyse, retract, reads),
admin (operator + the users and configuration page). The route table is ihd_node.web.auth.ROUTE_ROLES.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from ihd_node.config.fields import Bool, FilePath, Host, Int, Num, Section, setting
from ihd_node.config.outbound import SecretFile

Role = Literal["viewer", "operator", "admin"]


def loopback_host(host: str | None) -> bool:
    if host is None or host == "localhost":
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _web_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an https:// URL; give the full URL, e.g. https://sso.example.org/realms/hospital")
    if parts.scheme == "http" and not loopback_host(parts.hostname):
        raise ValueError("is http:// to another machine; sign-in traffic must be https:// (http only on loopback)")
    return value.rstrip("/")


WebUrl = Annotated[str, Field(strict=True), AfterValidator(_web_url)]


class WebOidc(Section):
    issuer: WebUrl = setting(..., "The OpenID provider's issuer URL (its `/.well-known/openid-configuration` is "
                             "read from there).", "https://sso.example.org/realms/hospital")
    client_id: str = setting(..., "The console's client ID at the provider.", "ihd-node-console", min_length=1)
    client_secret_file: SecretFile = setting(
        None, "File holding the client secret (confidential client); none = public client (PKCE only).",
        "/etc/ihd-node/oidc.secret")
    redirect_uri: WebUrl = setting(..., "The console's callback URL as the browser reaches it (registered at the "
                                   "provider; ends in `/oidc/callback`).", "https://ihd-node.example.org/oidc/callback")
    scopes: list[str] = setting(lambda: ["openid", "profile", "email"], "Scopes asked for; must include `openid`.",
                                ["openid", "profile", "email"])
    role_claim: str = setting("groups", "ID-token claim with the user's groups or roles (a list or a string).",
                              "groups")
    role_map: dict[str, Role] = setting(
        ..., "Claim value -> console role; the highest mapped role wins; no match = no access.",
        {"radiology-it": "admin", "ct-technologists": "operator", "radiologists": "viewer"})
    user_claim: str = setting("preferred_username", "ID-token claim shown and audited as the user name "
                              "(`sub` when absent).", "preferred_username")
    session_hours: Num = setting(8.0, "How long a console sign-in lasts before the provider is asked again.", 8,
                                 gt=0, le=168)

    @field_validator("scopes")
    @classmethod
    def _openid(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("does not include `openid`; add it (OpenID Connect needs it)")
        return value

    @field_validator("role_map")
    @classmethod
    def _some_role(cls, value: dict[str, Role]) -> dict[str, Role]:
        if not value:
            raise ValueError("is empty, so nobody could sign in; map at least one group, e.g. `radiology-it: admin`")
        return value

    @field_validator("redirect_uri")
    @classmethod
    def _callback(cls, value: str) -> str:
        if not urlsplit(value).path.endswith("/oidc/callback"):
            raise ValueError("does not end in /oidc/callback, the console's callback path; e.g. "
                             "https://ihd-node.example.org/oidc/callback")
        return value

    @property
    def secure_cookie(self) -> bool:
        """The browser reaches the console over TLS (e.g. through a reverse proxy): cookies are Secure."""
        return self.redirect_uri.startswith("https://")


class WebAuth(Section):
    token_file: FilePath = setting(
        None, "File holding a bearer token (`Authorization: Bearer TOKEN`; scripts, Prometheus).",
        "/etc/ihd-node/web.token",
    )
    token_role: Role = setting(
        "viewer", "The role of the bearer token: viewer suits a metrics scraper; operator lets scripts re-send.",
        "viewer")
    users_file: FilePath = setting(
        None, "Basic-auth users, one `user:role:hash` a line (`ihd-node web-user FILE USER --role R` writes them).",
        "/etc/ihd-node/web.users",
    )
    oidc: WebOidc | None = setting(None, "OpenID Connect sign-in (single sign-on); none = not used.")

    @property
    def configured(self) -> bool:
        return self.token_file is not None or self.users_file is not None or self.oidc is not None


class WebConfig(Section):
    enabled: Bool = setting(True, "Serve the web console, /healthz and /metrics.")
    host: Host = setting("127.0.0.1", "Address of the console; anything but loopback needs `auth`.", "127.0.0.1")
    port: Annotated[int, Field(strict=True, ge=0, le=65535)] = setting(
        8112, "TCP port of the console (0 = any free port).", 8112
    )
    refresh_seconds: Int = setting(5, "How often the console pages reload themselves.", 5, ge=1)
    auth: WebAuth = setting(WebAuth, "Who may see the console and what each may do (roles viewer, operator, "
                            "admin; see the README's Web console).")

    @property
    def loopback(self) -> bool:
        return loopback_host(self.host)

    @model_validator(mode="after")
    def _auth_beyond_loopback(self) -> WebConfig:
        if self.enabled and not self.loopback and not self.auth.configured:
            raise ValueError(
                f"host {self.host} is reachable from other machines but auth is not set; set auth.users_file, "
                "auth.token_file or auth.oidc, or keep host 127.0.0.1 (TLS: put a reverse proxy in front, see the "
                "README)"
            )
        return self
