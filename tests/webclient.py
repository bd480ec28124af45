"""The tests' one HTTP client for the node's console and endpoints: basic or bearer authorization, a form or a
raw body, redirects followed or not; every answer, 4xx and 5xx included, as (status, text, headers)."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from urllib.parse import urlencode


def basic(user: str, password: str) -> str:
    """An Authorization header value for HTTP basic authentication."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bearer(token: str) -> str:
    return f"Bearer {token}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the 3xx itself is the answer
        return None


def http(url: str, *, auth: str | None = None, data: bytes | None = None, form: dict | None = None,
         method: str | None = None, headers: dict | None = None, redirects: bool = True,
         timeout: float = 30.0) -> tuple[int, str, dict]:
    """GET, or POST when there is a body (`form` is url-encoded), unless `method` says otherwise."""
    if form is not None:
        data = urlencode(form).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers=dict(headers or {}))
    if auth:
        request.add_header("Authorization", auth)
    opener = urllib.request.build_opener() if redirects else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)
