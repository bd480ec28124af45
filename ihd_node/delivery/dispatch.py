"""Sending outbox rows of the destinations that are not C-STORE: hl7 (the ORU file over MLLP, waiting for
the ACK), fhir (the Bundle file POSTed as a transaction) and dicomweb (the SR and captures by STOW-RS).

Each row's answer is a TransportOutcome (sent / retry / rejected, with the reason) that the outbox books
with the same retry policy, give-up and attempt history as a C-STORE status. The message files were written
when the result (or its retraction) was recorded, so a resend after a crash sends the same bytes with the
same control ID / identifiers: the receiver recognises it (ACK of a duplicate, FHIR conditional update).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ihd_node import faults
from ihd_node.store import Delivery

Book = Callable[[Delivery, Any, float], None]  # (row, TransportOutcome, seconds)


def _outcome(outcome: str, detail: str, code: str | None = None) -> Any:
    from ihd_node.delivery.transport import TransportOutcome

    return TransportOutcome(outcome, detail, code)  # type: ignore[arg-type]


def secret(path: Path | None) -> str | None:
    """A token or password from its file (read at each send, so a rotated token is used at once)."""
    if path is None:
        return None
    return Path(path).read_text(encoding="utf-8").strip()


def send_rows(dest: Any, rows: Sequence[Delivery], book: Book) -> None:
    """Send `rows` (all due for `dest`) the way `dest.kind` says, booking each answer as soon as it is known.
    A row whose file cannot be read, or whose credentials cannot, is booked at once without a send: a
    file is not going to become readable by resending (rejected); a token file may be fixed (retried)."""
    if dest.kind == "dicomweb":
        _stow(dest, rows, book)
        return
    for row in rows:
        started = time.perf_counter()
        try:
            payload = Path(row.path).read_bytes()
        except OSError as exc:
            book(row, _outcome("rejected", f"message file unreadable: {exc}"), 0.0)
            continue
        try:
            token = secret(dest.auth.token_file) if dest.kind == "fhir" else None
        except OSError as exc:
            book(row, _outcome("retry", f"token file unreadable: {exc}; fix auth.token_file"), 0.0)
            continue
        outcome = _send_one(dest, payload, token)
        faults.point("delivery.answered")
        book(row, outcome, time.perf_counter() - started)


def _send_one(dest: Any, payload: bytes, token: str | None) -> Any:
    try:
        if dest.kind == "hl7":
            from ihd_node.delivery.mllp import send_mllp
            from ihd_node.delivery.tls import tls_client_context

            return send_mllp(dest.host, dest.port, payload.decode("utf-8"), timeout=float(dest.timeout),
                             tls=tls_client_context(dest.tls))
        if dest.kind == "fhir":
            from ihd_node.delivery.fhir_client import post_transaction

            return post_transaction(dest.url, payload, token=token, timeout=float(dest.timeout),
                                    ca_certificates=str(dest.ca_certificates) if dest.ca_certificates else None)
    except Exception as exc:  # noqa: BLE001 - a transport's own bug or an unexpected error: retried, with why
        return _outcome("retry", f"send failed: {type(exc).__name__}: {exc}")
    return _outcome("rejected", f"destination kind {dest.kind!r} sends no message files")


def _stow(dest: Any, rows: Sequence[Delivery], book: Book) -> None:
    from ihd_node.delivery.stow import stow_instances

    started = time.perf_counter()
    try:
        token = secret(dest.auth.token_file)
        password = secret(dest.auth.password_file)
    except OSError as exc:
        for row in rows:
            book(row, _outcome("retry", f"credentials file unreadable: {exc}; fix auth"), 0.0)
        return
    by_path = {str(Path(r.path)): r for r in rows}
    booked: set[int] = set()
    try:
        answers = stow_instances(dest.url, [Path(r.path) for r in rows], token=token,
                                 username=dest.auth.username, password=password, timeout=float(dest.timeout),
                                 ca_certificates=str(dest.ca_certificates) if dest.ca_certificates else None)
    except Exception as exc:  # noqa: BLE001 - as in _send_one
        answers = []
        failure = _outcome("retry", f"STOW-RS failed: {type(exc).__name__}: {exc}")
    else:
        failure = _outcome("retry", "the STOW-RS answer does not name this instance")
    faults.point("delivery.answered")
    seconds = (time.perf_counter() - started) / max(1, len(rows))
    for path, outcome in answers:
        row = by_path.get(str(Path(path)))
        if row is not None and row.id not in booked:
            booked.add(row.id)
            book(row, outcome, seconds)
    for row in rows:
        if row.id not in booked:
            book(row, failure, seconds)
