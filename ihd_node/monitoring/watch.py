"""The running node's drift watch: check every monitoring.check_seconds, open and end drift episodes, and
send each new episode's alert on the alert channels (once per episode, not per check).

An episode opens when a check finds a PSI at or over monitoring.alert_psi (with at least min_results
results on both sides); it ends at the first check that finds every PSI under monitoring.warning_psi (the
gap between the two limits keeps a feature hovering at the limit from alerting again and again). The open
episode is in the database, so /healthz of every process shows it ("warning", never "down") and a restart
does not alert again. The drift alert outbox is sent and retried like the finding alerts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from ihd_node import nodelog
from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE
from ihd_node.config import Config
from ihd_node.delivery.alerts import send
from ihd_node.monitoring.drift import DriftReport, drift_report
from ihd_node.store import Database, DriftAlert, DriftEpisode, utcnow

DRIFT_EVENT = "drift"


@dataclass(frozen=True)
class DriftMessage:
    """What the channels say about a drift episode (the shape delivery.alerts.send reads)."""

    node: str
    episode: int
    started_at: datetime
    reason: str
    console_url: str | None
    findings: tuple[()] = ()  # no finding facts in a drift alert
    viewer_url: None = None

    @property
    def title(self) -> str:
        return f"Input or score drift on {self.node}: check the local performance"

    def lines(self) -> list[str]:
        out = [f"ihd-node {self.node}: the inputs or the scores differ from the reference window "
               f"since {self.started_at.isoformat(timespec='minutes')}. {NOT_FOR_DIAGNOSTIC_USE}.",
               f"Over the limit: {self.reason}",
               "A scanner, protocol or software change can make the model's results less reliable: check "
               "the local performance against the radiologists' reads before relying on it again."]
        if self.console_url:
            out.append(f"Performance: {self.console_url}")
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    def as_json(self) -> dict[str, Any]:
        return {"event": "ihd.drift", "not_for_diagnostic_use": True, "title": self.title, "text": self.text(),
                "node": self.node, "episode": self.episode,
                "started_at": self.started_at.isoformat(timespec="seconds"), "reason": self.reason,
                "console_url": self.console_url}


def drift_warning(db: Database) -> str | None:
    """The /healthz warning while a drift episode is open (None otherwise)."""
    episode = db.open_drift_episode()
    if episode is None:
        return None
    return (f"drift since {episode.started_at.isoformat(timespec='seconds')}: {episode.reason} "
            "(see /performance)")


class DriftWatch:
    """One step of the drift loop: check when due, then send due drift alerts; returns the seconds to wait."""

    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        self.settings = config.monitoring
        self.last: DriftReport | None = None  # the latest check's report
        self._next_check = 0.0

    def step(self) -> float:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.settings.check_seconds
            try:
                self.check()
            except DBAPIError:
                self._next_check = 0.0  # checked again once the database answers
                raise  # the database is away: the loop's backoff, and the node is "degraded" meanwhile
            except Exception as exc:  # noqa: BLE001 - a failed drift check must never make the node look down
                nodelog.error("drift.check_failed", error=f"{type(exc).__name__}: {exc}")
        self.send_due()
        wait = self._next_check - time.monotonic()
        when = self.db.next_drift_alert_time()
        if when is not None:
            wait = min(wait, max(0.0, (when - utcnow()).total_seconds()))
        return max(0.05, min(wait, 60.0))

    def check(self, now: datetime | None = None) -> DriftReport:
        report = drift_report(self.db, self.settings, now)
        self.last = report
        status = report.status
        if status == "alert":
            channels = [c.name for c in self.config.alerts.channels] if self.settings.alert else []
            worst = report.over("alert")[0]
            episode, new = self.db.book_drift(reason=report.reason(), feature=worst.name, psi=worst.psi,
                                              channels=channels, now=report.generated_at)
            if new:
                self.db.log_event(DRIFT_EVENT, f"drift episode {episode.id} opened: {episode.reason}; reference "
                                  f"{report.n_reference} results, current {report.n_current}", level="WARNING")
                nodelog.warning("drift.opened", episode=episode.id, reason=episode.reason)
        elif status == "ok":
            ended = self.db.end_drift(report.generated_at)
            if ended is not None:
                self.db.log_event(DRIFT_EVENT, f"drift episode {ended.id} ended: every PSI under "
                                  f"{self.settings.warning_psi}")
        # "warning" keeps an open episode open and opens none (hysteresis); "too_few" cannot judge either way
        return report

    def send_due(self) -> int:
        due = self.db.due_drift_alerts()
        for alert in due:
            self._attempt(alert)
        return len(due)

    def _attempt(self, alert: DriftAlert) -> None:
        episode: DriftEpisode = alert.episode
        try:
            channel = self.config.alerts.channel(alert.channel)
        except KeyError:
            outcome, detail = "retry", f"channel {alert.channel!r} is no longer in the config"
        else:
            base = self.config.alerts.console_url
            message = DriftMessage(self.config.node.ae_title, episode.id, episode.started_at, episode.reason,
                                   f"{base.rstrip('/')}/performance" if base else None)
            try:
                outcome, detail = send(channel, message)  # type: ignore[arg-type]  # the Message shape
            except Exception as exc:  # noqa: BLE001 - booked and retried like any failed try
                outcome, detail = "retry", f"{type(exc).__name__}: {exc}"
        row = self.db.record_drift_alert_attempt(alert.id, outcome=outcome, error=None if outcome == "sent" else detail,
                                                 policy=self.config.delivery)
        if row.status == "sent":
            self.db.log_event(DRIFT_EVENT, f"drift alert of episode {episode.id} sent to {alert.channel}: {detail}")
        elif row.status in ("failed", "rejected"):
            self.db.log_event(DRIFT_EVENT, f"drift alert of episode {episode.id} {row.status} on {alert.channel}: "
                              f"{row.last_error}", level="ERROR")
