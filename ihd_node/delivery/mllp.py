"""HL7 v2 over MLLP: one message, one connection, wait for its ACK.

Framing (HL7 MLLP release 2): 0x0B, the message, 0x1C 0x0D. The ACK's MSA-1 decides: AA / CA = sent;
AE / AR / CE / CR = rejected with MSA-3 (or the ERR segment's text) as the reason; no ACK (refused, reset,
timeout, no MSA, an unknown code) = retry; an ACK whose MSA-2 names another control ID = retry, so a late
ACK of an earlier message is never booked for this one.
"""

from __future__ import annotations

import socket
import ssl
import time

from ihd_node.delivery.transport import TransportOutcome, no_answer, one_line, redact

START, END = b"\x0b", b"\x1c\x0d"
SENT_CODES = ("AA", "CA")
REJECTED_CODES = ("AE", "AR", "CE", "CR")
MAX_ACK_BYTES = 1 << 20


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def _fields(segment: str, separator: str) -> list[str]:
    return segment.split(separator)


def _header(message: str) -> tuple[str, list[str]]:
    """(field separator, segments) of an ER7 message."""
    text = message.replace("\r\n", "\r").replace("\n", "\r")
    segments = [s for s in text.split("\r") if s.strip()]
    separator = segments[0][3] if segments and segments[0].startswith("MSH") and len(segments[0]) > 3 else "|"
    return separator, segments


def control_id(message: str) -> str:
    """MSH-10 of an ER7 message ('' when there is none)."""
    separator, segments = _header(message)
    if not segments or not segments[0].startswith("MSH"):
        return ""
    fields = _fields(segments[0], separator)
    return fields[9] if len(fields) > 9 else ""


def patient_values(message: str) -> list[str]:
    """The name parts and birth date a message carries (PID-5, PID-7): kept out of every detail."""
    separator, segments = _header(message)
    values: list[str] = []
    for segment in segments:
        if segment.startswith("PID" + separator):
            fields = _fields(segment, separator)
            for index in (5, 7):
                if len(fields) > index:
                    values += [p for rep in fields[index].split("~") for c in rep.split("^") for p in c.split("&")]
    return [v for v in values if v and v != '""']


def read_ack(sock: socket.socket, deadline: float) -> bytes:
    """Bytes up to the end-of-frame marker (raises TimeoutError when it does not come in time)."""
    data = b""
    while END not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("connection closed before the end of the ACK")
        data += chunk
        if len(data) > MAX_ACK_BYTES:
            raise ValueError("ACK longer than 1 MiB without an end-of-frame marker")
    return data[: data.index(END)]


def judge_ack(ack: str, sent_control_id: str) -> TransportOutcome:
    """The outcome an ACK (ER7, without framing) means for the message with `sent_control_id`."""
    separator, segments = _header(ack.lstrip("\x0b"))
    msa = next((_fields(s, separator) for s in segments if s.startswith("MSA")), None)
    if msa is None or len(msa) < 2:
        return TransportOutcome("retry", one_line(f"answer is not an ACK (no MSA segment): {ack[:80]!r}"))
    code = msa[1].strip().upper()
    acked = msa[2].strip() if len(msa) > 2 else ""
    if acked != sent_control_id:
        return TransportOutcome("retry", one_line(f"ACK {code} for control ID {acked!r}, not {sent_control_id!r}"),
                                code)
    if code in SENT_CODES:
        return TransportOutcome("sent", f"ACK {code}", code)
    if code in REJECTED_CODES:
        text = msa[3].strip() if len(msa) > 3 else ""
        for segment in segments:
            if segment.startswith("ERR"):
                err = _fields(segment, separator)
                # ERR-8 user message, ERR-3 HL7 error code (CWE: its text), v2.3-style ERR-1
                parts = [err[8] if len(err) > 8 else "", (err[3].split("^") + [""])[1] if len(err) > 3 else "",
                         err[1] if len(err) > 1 else ""]
                text = text or next((p.strip() for p in parts if p.strip()), "")
        return TransportOutcome("rejected", one_line(f"ACK {code}: {text or 'no reason given'}"), code)
    return TransportOutcome("retry", one_line(f"ACK with unknown code {code!r}"), code or None)


def send_mllp(host: str, port: int, message: str, *, timeout: float,
              tls: ssl.SSLContext | None = None) -> TransportOutcome:
    """Send one ER7 message and wait up to `timeout` seconds (connect, send and ACK together) for its ACK."""
    sent_id = control_id(message)
    secrets = patient_values(message)
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(frame(message))
                ack = read_ack(sock, deadline)
            finally:
                if sock is not raw:
                    sock.close()
    except (OSError, ValueError) as error:  # refused, reset, timeout, TLS failure, no frame end
        return TransportOutcome("retry", redact(no_answer(error), secrets))
    text = ack.lstrip(START).decode("utf-8", errors="replace")
    outcome = judge_ack(text, sent_id)
    return TransportOutcome(outcome.outcome, redact(outcome.detail, secrets), outcome.code)
