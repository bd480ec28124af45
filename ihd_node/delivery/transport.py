"""What a network send came to, for every destination kind that is not DICOM: one typed outcome.

- sent: the receiver took it (ACK AA/CA, HTTP 2xx with every part accepted);
- retry: nothing definite came back (no connection, timeout, 5xx, 408/429, no or garbled ACK, an out-of-
  resources failure): sending the same bytes again later may succeed;
- rejected: the receiver refused this content (ACK AE/AR, HTTP 4xx): sending it again cannot help.

`detail` is one line for the log database and the console: never the patient's name or birth date
(redact() removes the values a message carried from whatever a server echoed), at most DETAIL_LIMIT
characters.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

DETAIL_LIMIT = 300
REDACTED = "[redacted]"


@dataclass(frozen=True)
class TransportOutcome:
    outcome: Literal["sent", "retry", "rejected"]
    detail: str
    code: str | None = None  # the receiver's answer: ACK code (AA, AE, ...), HTTP status ("201"), DICOM status


def one_line(text: object, limit: int = DETAIL_LIMIT) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` without any of `secrets` (name parts, birth date; parts under 2 characters are left)."""
    for secret in sorted({s.strip() for s in secrets if s and len(s.strip()) >= 2}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def ssl_context(ca_certificates: str | None) -> ssl.SSLContext:
    """Server certificates checked against `ca_certificates` (a PEM file) or the system's CAs."""
    return ssl.create_default_context(cafile=ca_certificates) if ca_certificates else ssl.create_default_context()


class BadUrl(ValueError):
    """The destination's URL is no http(s) URL: a configuration error, not a network one."""


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def http_post(url: str, body: bytes, headers: Mapping[str, str], *, timeout: float,
              ca_certificates: str | None = None) -> HttpAnswer:
    """One POST with the standard library; raises OSError / http.client.HTTPException when no answer came
    (TLS failures included: ssl.SSLError is an OSError), BadUrl for a URL that is not http(s)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadUrl(f"URL {url!r} is not http(s)://host/...")
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl_context(ca_certificates))
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        connection.request("POST", path, body=body, headers=dict(headers))
        response = connection.getresponse()
        data = response.read()
        return HttpAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


def no_answer(error: BaseException) -> str:
    """'no answer: timed out' / 'no answer: connection refused' (the error's class when it has no text)."""
    text = str(error) or type(error).__name__
    if isinstance(error, TimeoutError) or "timed out" in text:
        text = "timed out"
    elif isinstance(error, ConnectionRefusedError):
        text = "connection refused"
    return one_line(f"no answer: {text}")
