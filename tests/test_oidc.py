"""OpenID Connect sign-in to the console (issue 22) against a real OpenID provider from a package
(oidc-provider-mock: authlib's authorization server in Flask, RS256 ID tokens, JWKS, discovery), driven by an
HTTP client that follows redirects and keeps cookies like a browser: the code flow end to end, roles from the
`groups` claim through role_map, no mapped group = no access, a bad state, a replayed callback, an injected
nonce, tampered, foreign-audience, expired, HS256 or foreign-key ID tokens refused, a tampered session cookie
ignored, log-out. One provider and one node for the module.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from loopback import node_config, running_node, tiny_predictor
from oidc_provider_mock import run_server_in_thread

from ihd_node.config import ConfigError, default_config
from ihd_node.node.wiring import Node
from ihd_node.sim.mini_pacs import free_port
from ihd_node.web.auth import LoginAttempt, Principal, hash_password
from ihd_node.web.oidc import LOGIN_COOKIE, OidcClient, SignInRefused, oidc_routes
from ihd_node.web.server import Request, WebServer

CLIENT_ID = "ihd-console"
ROLE_MAP = {"radiology-it": "admin", "ct-techs": "operator", "radiologists": "viewer"}
PEOPLE = {"olivia": ["ct-techs", "nurses"], "ada": ["radiologists", "radiology-it"], "vic": ["radiologists"],
          "carl": ["cafeteria"]}


@dataclass
class Site:
    node: Node
    base: str
    issuer: str
    logins: list[LoginAttempt]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("oidc")
    (root / "client.secret").write_text("s3cret-of-the-console\n")
    with run_server_in_thread(require_nonce=True) as provider:
        issuer = f"http://localhost:{provider.server_port}"
        for sub, groups in PEOPLE.items():  # the provider's users and their claims
            put = httpx.put(f"{issuer}/users/{sub}", json={"preferred_username": sub, "groups": groups})
            assert put.status_code == 204, put.text
        port = free_port()
        config = node_config(root / "node", [], web={"port": port, "auth": {"oidc": {
            "issuer": issuer, "client_id": CLIENT_ID, "client_secret_file": str(root / "client.secret"),
            "redirect_uri": f"http://127.0.0.1:{port}/oidc/callback", "role_map": ROLE_MAP, "session_hours": 1}}})
        with running_node(config, tiny_predictor()) as node:
            logins: list[LoginAttempt] = []
            node.web.on_login = logins.append
            yield Site(node, f"http://127.0.0.1:{port}", issuer, logins)


def browser() -> httpx.Client:
    return httpx.Client(follow_redirects=True, timeout=30, headers={"Accept": "text/html"})


def sign_in(site: Site, sub: str, client: httpx.Client | None = None, start: str = "/") -> httpx.Response:
    """Open a console page, get sent to the provider, say who you are there, come back."""
    client = client or browser()
    form = client.get(site.base + start)
    assert form.status_code == 200 and str(form.url).startswith(site.issuer + "/oauth2/authorize"), form.text
    return client.post(str(form.url), data={"sub": sub})


def test_code_flow_signs_in_with_the_mapped_role(site: Site) -> None:
    site.logins.clear()
    client = browser()
    page = sign_in(site, "olivia", client, start="/performance")
    assert page.status_code == 200 and str(page.url) == site.base + "/performance"  # back where they were going
    assert "signed in as olivia (operator)" in page.text and "Sign out" in page.text
    hops = [urlsplit(str(r.url)).path for r in page.history]
    assert hops == ["/oauth2/authorize", "/oidc/callback"], hops
    set_cookie = page.history[-1].headers.get_list("set-cookie")
    session = next(c for c in set_cookie if c.startswith("ihd_session="))
    assert "HttpOnly" in session and "SameSite=Lax" in session and "Max-Age=3600" in session
    assert "Secure" not in session  # the console is reached over http here; https redirect_uri -> Secure
    assert any(c.startswith(f"{LOGIN_COOKIE}=;") for c in set_cookie)  # the one-use state cookie is cleared
    # The authorization request carried PKCE (S256), state and nonce.
    asked = parse_qs(urlsplit(str(page.history[0].url)).query)
    assert asked["code_challenge_method"] == ["S256"] and len(asked["code_challenge"][0]) == 43
    assert asked["nonce"] and asked["state"] and asked["scope"] == ["openid profile email"]
    assert site.logins == [LoginAttempt("olivia", "operator", True, "127.0.0.1", "oidc", "signed in")]
    # Operator: past the role check of an action (404: no such series), not past the admin page.
    assert client.post(site.base + "/actions/resend", data={"series": "1.2.3"}).status_code == 404
    refused = client.get(site.base + "/admin")
    assert refused.status_code == 403 and "needs the admin role; olivia signed in as operator" in refused.text


def test_highest_mapped_group_wins_and_viewer_cannot_act(site: Site) -> None:
    admin = browser()
    assert "signed in as ada (admin)" in sign_in(site, "ada", admin).text
    page = admin.get(site.base + "/admin")
    assert page.status_code == 200 and "<td>radiology-it</td><td>admin</td>" in page.text
    viewer = browser()
    assert "signed in as vic (viewer)" in sign_in(site, "vic", viewer).text
    refused = viewer.post(site.base + "/actions/retract", data={"series": "1.2.3", "reason": "x"})
    assert refused.status_code == 403 and "needs the operator role" in refused.text


def test_no_mapped_group_no_access(site: Site) -> None:
    site.logins.clear()
    page = sign_in(site, "carl")
    assert page.status_code == 403
    assert "sign-in refused: none of carl's `groups` values is in web.auth.oidc.role_map" in page.text
    assert "ask the console's admin" in page.text
    assert [(a.user, a.success, a.method) for a in site.logins] == [("carl", False, "oidc")]
    assert "ihd_session" not in page.cookies


def test_bad_state_and_a_replayed_callback_are_refused(site: Site) -> None:
    client = browser()
    page = sign_in(site, "olivia", client)
    callback = str(page.history[-1].url)  # .../oidc/callback?code=...&state=...
    assert page.status_code == 200
    again = browser()
    again.get(site.base + "/login", follow_redirects=False)  # a sign-in of its own: its state cookie
    replay = again.get(callback)  # someone else's code and state
    assert replay.status_code == 403 and "state does not match" in replay.text
    state = parse_qs(urlsplit(callback).query)["state"][0]
    used = httpx.get(callback, headers={"Cookie": f"{LOGIN_COOKIE}={state}"}, timeout=30)  # its own cookie, again
    assert used.status_code == 403 and "unknown, used or expired sign-in state" in used.text
    forged = browser().get(site.base + "/oidc/callback?code=x&state=made-up")
    assert forged.status_code == 403 and "state does not match" in forged.text


def test_an_injected_nonce_is_refused(site: Site) -> None:
    """The console's own state and PKCE, but the authorization request's nonce swapped: the ID token the provider
    then issues carries the other nonce, and the console refuses it."""
    client = browser()
    start = client.get(site.base + "/login", follow_redirects=False)
    where = urlsplit(start.headers["location"])
    query = {k: v[0] for k, v in parse_qs(where.query).items()}
    query["nonce"] = "an-attackers-nonce"
    form = client.get(urlunsplit(where._replace(query=urlencode(query))))
    page = client.post(str(form.url), data={"sub": "olivia"})
    assert page.status_code == 403 and "nonce is not this sign-in's" in page.text, page.text


def provider_id_token(site: Site, sub: str, nonce: str) -> str:
    """An ID token the provider issues for the console's client (the code flow, run by the test itself)."""
    client = httpx.Client(timeout=30)
    redirect = f"{site.base}/oidc/callback"
    ask = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": redirect, "scope": "openid profile",
           "state": "s", "nonce": nonce}
    done = client.post(f"{site.issuer}/oauth2/authorize?{urlencode(ask)}", data={"sub": sub})
    code = parse_qs(urlsplit(done.headers["location"]).query)["code"][0]
    tokens = client.post(f"{site.issuer}/oauth2/token", auth=(CLIENT_ID, "s3cret-of-the-console"),
                         data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect}).json()
    return tokens["id_token"]


def test_tampered_and_foreign_id_tokens_are_refused(site: Site) -> None:
    oidc = site.node.web.oidc
    token = provider_id_token(site, "vic", "n-1")
    assert oidc.principal(oidc.verify(token, "n-1")).role == "viewer"  # the untouched token passes
    head, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["groups"] = ["radiology-it"]  # promote oneself to admin, keep the provider's signature
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(SignInRefused, match="Signature verification failed"):
        oidc.verify(f"{head}.{forged_body}.{signature}", "n-1")
    kid = jwt.get_unverified_header(token).get("kid")  # the provider's key id, if it names one
    named = {"kid": kid} if kid else None
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # signed with another key
    with pytest.raises(SignInRefused, match="Signature verification failed"):
        oidc.verify(jwt.encode(claims, other, algorithm="RS256", headers=named), "n-1")
    with pytest.raises(SignInRefused, match="nonce"):
        oidc.verify(token, "another sign-in's nonce")
    with pytest.raises(SignInRefused, match="ID token is not valid: The specified alg value is not allowed"):
        oidc.verify(jwt.encode(claims, "a-shared-secret-of-32-bytes-or-more!", algorithm="HS256", headers=named),
                    "n-1")
    oidc.config = oidc.config.model_copy(update={"client_id": "another-client"})
    try:
        with pytest.raises(SignInRefused, match="Audience doesn't match"):
            oidc.verify(token, "n-1")
    finally:
        oidc.config = oidc.config.model_copy(update={"client_id": CLIENT_ID})


def test_an_expired_id_token_is_refused(site: Site) -> None:
    """A second provider whose tokens live two seconds; the console's checks without clock leeway after that."""
    with run_server_in_thread(access_token_max_age=timedelta(seconds=2)) as provider:
        issuer = f"http://localhost:{provider.server_port}"
        oidc = OidcClient(site.node.config.web.auth.oidc.model_copy(update={"issuer": issuer}))
        token = provider_id_token(Site(site.node, site.base, issuer, []), "vic", "n-2")
        oidc.leeway = 3600  # valid but for its age (a busy test machine may take seconds to get here)
        assert oidc.verify(token, "n-2")["sub"] == "vic"
        oidc.leeway = 0
        time.sleep(max(0.0, jwt.decode(token, options={"verify_signature": False})["exp"] - time.time() + 1.1))
        with pytest.raises(SignInRefused, match="Signature has expired"):
            oidc.verify(token, "n-2")


def test_log_out_and_a_tampered_session_cookie(site: Site) -> None:
    client = browser()
    sign_in(site, "ada", client)
    session = client.cookies.get("ihd_session")
    body, _, mac = session.partition(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    data["u"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=") + "." + mac

    def plain(cookie: str) -> int:  # not a browser: 401 rather than a redirect to /login
        return httpx.get(site.base + "/", headers={"Cookie": f"ihd_session={cookie}"}, timeout=30).status_code
    assert plain(forged) == 401
    assert plain(session) == 200

    site.logins.clear()
    out = client.post(site.base + "/logout", headers={"Origin": site.base})
    assert out.status_code == 200 and "Signed out" in out.text
    assert site.logins == [LoginAttempt("ada", "admin", True, "127.0.0.1", "oidc", "log-out")]
    assert "ihd_session" not in client.cookies  # the browser dropped it
    # The old cookie, kept by someone, no longer works on this node.
    assert plain(session) == 401
    assert str(client.get(site.base + "/").url).startswith(site.issuer)  # a browser is sent to sign in again


def test_oidc_config_errors_name_the_key_and_fix(tmp_path: Path) -> None:
    good = {"issuer": "https://sso.example.org/realms/h", "client_id": "c", "role_map": {"g": "viewer"},
            "redirect_uri": "https://ihd.example.org/oidc/callback"}
    assert default_config(tmp_path, web={"auth": {"oidc": good}}).web.auth.oidc.secure_cookie
    cases = {"issuer": ("http://sso.example.org", "web.auth.oidc.issuer", "must be https://"),
             "redirect_uri": ("https://ihd.example.org/callback", "web.auth.oidc.redirect_uri",
                              "does not end in /oidc/callback"),
             "role_map": ({"g": "root"}, "web.auth.oidc.role_map.g", "should be 'viewer', 'operator' or 'admin'"),
             "scopes": (["profile"], "web.auth.oidc.scopes", "does not include `openid`")}
    for key, (value, where, words) in cases.items():
        with pytest.raises(ConfigError) as caught:
            default_config(tmp_path, web={"auth": {"oidc": {**good, key: value}}})
        assert where in str(caught.value) and words in str(caught.value), str(caught.value)
    with pytest.raises(ConfigError, match="web.auth.oidc.client_id in default_config.*missing"):
        default_config(tmp_path, web={"auth": {"oidc": {k: v for k, v in good.items() if k != "client_id"}}})


def test_provider_down_falls_back_to_the_users_file(tmp_path: Path) -> None:
    """/login while the provider cannot be reached: with a users file, the browser is asked for that log-in and,
    once given, sent on; without one, 503 saying why."""
    users = tmp_path / "users"
    users.write_text(f"ann:operator:{hash_password('ann password', iterations=1000)}\n")
    dead = f"http://127.0.0.1:{free_port()}"
    oidc = {"issuer": dead, "client_id": CLIENT_ID, "role_map": ROLE_MAP,
            "redirect_uri": "http://127.0.0.1:8112/oidc/callback"}
    for users_file in (str(users), None):
        config = default_config(tmp_path, web={"auth": {"oidc": oidc, "users_file": users_file}})
        server = WebServer(config.web, {}, registry=None)
        login = oidc_routes(config.web.auth.oidc, server)[("GET", "/login")]
        answer = login(Request("GET", "/login", {"next": "/performance"}, {}, None, "127.0.0.1"))
        assert "the sign-in provider cannot be used now" in answer.body.decode() and "cannot be reached" in \
            answer.body.decode()
        if users_file:
            assert answer.status == 401 and answer.headers["WWW-Authenticate"].startswith("Basic")
            ann = Principal("ann", "operator", "basic")
            again = login(Request("GET", "/login", {"next": "/performance"}, {}, ann, "127.0.0.1"))
            assert again.status == 303 and again.headers["Location"] == "/performance"
        else:
            assert answer.status == 503
