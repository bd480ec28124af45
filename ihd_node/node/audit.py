"""The node's side of the audit trail: the sender loop that drains `audit_messages` to the syslog collector,
the start/stop and configuration-change events, and the console's log-in hook.

Nothing is lost while the collector is away: a message stays pending in the database until it was written
to a TLS connection that was still open CONFIRM_SECONDS later (ihd_node.delivery.syslog says why), and is
written again after any failure, in order, with a backoff up to audit.retry_max_seconds. The price is that a
collector may see a message twice (those written just before the connection broke); it never misses one.
Over UDP a message counts as sent once the datagram left (RFC 5426 offers nothing more).
"""

from __future__ import annotations

import getpass
import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

from ihd_node import nodelog
from ihd_node.audit import events
from ihd_node.config import Config
from ihd_node.delivery.syslog import SyslogTransport, rfc5424, syslog_ssl_context
from ihd_node.store import Database, RetryPolicy, utcnow

if TYPE_CHECKING:  # the web package is imported lazily by the node (optional console dependencies)
    from ihd_node.web.auth import LoginAttempt, Principal
    from ihd_node.web.server import WebServer

CONFIRM_SECONDS = 1.0  # a write counts once its connection is still open this long after it
BATCH = 200


def config_hash(config: Config) -> str:
    """SHA-256 of the effective configuration (every key, defaults included), as the node runs it."""
    return hashlib.sha256(config.model_dump_json().encode("utf-8")).hexdigest()


def record_start(db: Database, config: Config) -> None:
    """Application Start, and a configuration-change alert when the effective configuration differs from the
    previous run's (the first run records one too: its configuration came into force)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    db.audit(events.application_activity(True, launched_by=user))
    new = config_hash(config)
    old = db.swap_config_hash(new)
    if old != new:
        db.audit(events.configuration_changed(str(config.source or "built-in defaults"), old, new))


def attach_login_audit(server: WebServer, db: Database) -> None:
    """Record every console log-in attempt (`on_login`) and every action refused for its role (`on_denied`)."""

    def on_login(attempt: LoginAttempt) -> None:
        try:
            db.audit(events.user_authentication(attempt.user, attempt.success, attempt.address, attempt.method,
                                                attempt.reason, role=attempt.role))
        except Exception as exc:  # noqa: BLE001 - a log-in must not fail because the database is away
            nodelog.error("audit.login_unrecorded", error=f"{type(exc).__name__}: {exc}")

    def on_denied(who: Principal, method: str, path: str, need: str, address: str) -> None:
        try:
            db.audit(events.console_action(who.user, address, path.strip("/").replace("/", "-") or "console", None,
                                           done=False, detail=f"{method} {path} refused: {who.user} is "
                                                               f"{who.role}, the {need} role is needed"))
        except Exception as exc:  # noqa: BLE001 - as above
            nodelog.error("audit.refusal_unrecorded", error=f"{type(exc).__name__}: {exc}")

    server.on_login = on_login
    server.on_denied = on_denied


class AuditSender:
    """One pass at a time (`step`, run by the node's loop): confirm, then send the next pending messages."""

    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.audit = config.audit
        # The outbox's one backoff; an audit message is never given up (nothing may be lost).
        self.retry = RetryPolicy(0.5, float(self.audit.retry_max_seconds), math.inf)
        target = self.audit.target
        self.transport: SyslogTransport | None = None
        if target is not None:
            context = syslog_ssl_context(self.audit.ca_certificates, self.audit.certificate,
                                         self.audit.private_key) if target.scheme == "tls" else None
            self.transport = SyslogTransport(target.scheme, target.host, target.port, ssl_context=context,
                                             timeout=float(self.audit.timeout))
        self.source = db.audit_source
        self._written: list[tuple[int, float]] = []  # (row id, monotonic time written) awaiting confirmation
        self._after = 0  # highest row id written on the current connection
        self._failures = 0
        self.sent = 0

    def step(self) -> float:
        """Returns the seconds to wait before the next pass."""
        if self.transport is None:
            return 60.0  # no collector: messages are kept in the database only
        self._confirm()
        rows = [r for r in self.db.due_audit(BATCH) if r.id > self._after]
        if not rows:
            return 0.25 if self._written else self._idle_wait()
        messages = [rfc5424(r.xml, hostname=self.source.host, procid=self.source.process) for r in rows]
        try:
            self.transport.send(messages)
        except OSError as exc:
            return self._failed(rows, f"{type(exc).__name__}: {exc}")
        now = time.monotonic()
        self._after = rows[-1].id
        if self.transport.acknowledged:
            self._written.extend((r.id, now) for r in rows)
        else:
            self.db.audit_sent([r.id for r in rows])
            self.sent += len(rows)
        self._failures = 0
        return 0.0 if len(rows) == BATCH else 0.25

    def _confirm(self) -> None:
        if not self._written:
            return
        assert self.transport is not None
        if not self.transport.alive():
            nodelog.warning("audit.connection_lost", unconfirmed=len(self._written),
                            note="sent again on the next connection (the collector may see them twice)")
            self._written, self._after = [], 0
            return
        cutoff = time.monotonic() - CONFIRM_SECONDS
        done = [row_id for row_id, at in self._written if at <= cutoff]
        if done:
            self.db.audit_sent(done)
            self.sent += len(done)
            self._written = self._written[len(done):]

    def _failed(self, rows: list[Any], error: str) -> float:
        self._failures += 1
        wait = self.retry.backoff(self._failures)
        self._written, self._after = [], 0
        self.db.audit_not_sent([r.id for r in rows], error, wait)
        if self._failures == 1 or self._failures % 10 == 0:
            nodelog.warning("audit.collector_unreachable", collector=self.audit.syslog, error=error,
                            pending=len(rows), retry_in_s=wait)
        return wait

    def _idle_wait(self) -> float:
        when = self.db.next_audit_time()
        if when is None:
            return 5.0
        return max(0.05, min(5.0, (when - utcnow()).total_seconds()))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def drain(self, seconds: float) -> None:
        """At a clean stop: send and confirm what is pending for up to `seconds` (the rest waits for the next
        start, in the database)."""
        deadline = time.monotonic() + seconds
        while self.transport is not None and time.monotonic() < deadline:
            try:
                wait = self.step()
            except Exception as exc:  # noqa: BLE001 - stopping: the rows stay pending
                nodelog.warning("audit.drain_failed", error=f"{type(exc).__name__}: {exc}")
                return
            if not self._written and not self.db.due_audit(1):
                return
            time.sleep(min(max(wait, 0.02), 0.2))


def audited_count(db: Database, dest: Any, calling_aet: str, study_uid: str, series_uid: str) -> int | None:
    """The completion check's C-FIND instance count at one destination, with its 110112 Query audit message."""
    from ihd_node.delivery.sender import count_series_instances, encoded_query, series_count_query

    count = count_series_instances(dest, calling_aet, study_uid, series_uid)
    db.audit(events.pacs_query(dest.name, dest.ae_title, dest.host, study_uid,
                               encoded_query(series_count_query(study_uid, series_uid)), answered=count is not None,
                               detail=f"series {series_uid}: " + ("not answered" if count is None else f"{count}")))
    return count
