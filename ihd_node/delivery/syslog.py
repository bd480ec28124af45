"""Audit messages to a syslog collector: RFC 5424 messages over TLS (RFC 5425, octet-counting framing, the
collector's certificate verified) or UDP (RFC 5426, one message per datagram), as IHE ATNA (ITI-20) asks.

The header follows the ATNA convention: PRI <85> (facility 10 security/authorization, severity 5 notice),
APP-NAME ihd-node, MSGID IHE+RFC-3881, no structured data, and the audit XML as MSG in UTF-8 with its BOM.

TLS gives no application-level acknowledgement: a write succeeds while the collector may already be gone.
So the sender (ihd_node.node.audit) marks a message sent only after `alive()` still finds the connection
open a moment later, and sends again what was written on a connection that turned out closed (a collector
may then see a message twice, never none).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

PRI = "<85>"  # facility 10 (security/authorization) * 8 + severity 5 (notice)
APP_NAME = "ihd-node"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
UDP_MAX_BYTES = 65507  # the largest IPv4 UDP payload; collectors often read less (rsyslog: maxMessageSize)


def _field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, or "-" (RFC 5424 6.2)."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def rfc5424(xml: str, *, hostname: str, procid: str, at: datetime | None = None) -> bytes:
    """One RFC 5424 syslog message carrying an audit message."""
    stamp = (at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = f"{PRI}1 {stamp} {_field(hostname, 255)} {APP_NAME} {_field(procid, 128)} {MSGID} -"
    return header.encode("ascii") + b" " + BOM + xml.encode("utf-8")


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 framing: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode("ascii") + b" " + message


def syslog_ssl_context(ca_certificates: Any = None, certificate: Any = None, private_key: Any = None) -> ssl.SSLContext:
    """Client context: the collector's certificate is verified (against `ca_certificates`, else the system CAs)
    and its name checked; a client certificate when the collector asks for one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(ca_certificates) if ca_certificates else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate and private_key:
        context.load_cert_chain(str(certificate), str(private_key))
    return context


class SyslogTransport:
    """One connection (TLS) or socket (UDP) to the collector, opened on first use and again after a failure."""

    def __init__(self, scheme: str, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 timeout: float = 10.0) -> None:
        if scheme not in ("tls", "udp"):
            raise ValueError(f"unknown syslog transport {scheme!r}")
        self.scheme, self.host, self.port, self.timeout = scheme, host, port, timeout
        self.ssl_context = ssl_context if scheme == "tls" else None
        if scheme == "tls" and self.ssl_context is None:
            self.ssl_context = syslog_ssl_context()
        self._sock: socket.socket | None = None

    @property
    def acknowledged(self) -> bool:
        """Whether `alive()` means anything: over UDP nothing tells a message arrived (RFC 5426)."""
        return self.scheme == "tls"

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        if self.scheme == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))  # connected: a refused port shows as an error on the next send
        else:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            try:
                assert self.ssl_context is not None
                sock = self.ssl_context.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        self._sock = sock
        return sock

    def send(self, messages: Sequence[bytes]) -> None:
        """Write `messages` in order; raises OSError (ssl.SSLError included) and closes on any failure."""
        try:
            sock = self._connect()
            if self.scheme == "udp":
                for message in messages:
                    if len(message) > UDP_MAX_BYTES:
                        raise OSError(errno.EMSGSIZE, f"audit message of {len(message)} bytes is over the UDP "
                                      f"limit of {UDP_MAX_BYTES}; use tls://")
                    sock.send(message)
            else:
                sock.sendall(b"".join(octet_counted(m) for m in messages))
        except BaseException:
            self.close()
            raise

    def alive(self) -> bool:
        """Whether the TLS connection is still open (no close, reset or alert from the collector)."""
        sock = self._sock
        if sock is None:
            return False
        if self.scheme == "udp":
            return True
        try:
            sock.setblocking(False)
            try:
                data = sock.recv(1)
            finally:
                sock.settimeout(self.timeout)
        except (ssl.SSLWantReadError, BlockingIOError):
            return True  # nothing to read: open
        except (OSError, ValueError):
            self.close()
            return False
        if data:
            return True  # a collector does not talk; whatever it was, the connection is open
        self.close()  # EOF: the collector closed it
        return False

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
