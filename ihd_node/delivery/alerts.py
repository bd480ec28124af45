"""Alerts: a positive finding announced on the configured channels (`alerts:` in the config).

The alert outbox (table `alerts`) is filled in the analysis' own transaction (ihd_node.store.database.finish_analysis),
one row per (series, revision, channel); this module's thread sends due rows and books each attempt like
the DICOM outbox: sent, retried with the delivery backoff until delivery.give_up_after_seconds (then
failed), or rejected when the receiving server refuses the content (resending the same text cannot help).

Content (`Message`): accession number, study date, the findings in words with probabilities, the node's
name, a console link and a viewer link. No patient name, ID or birth date unless
alerts.include_patient_data is set: they are read from the SR file at send time, never stored in the log
database. A crash after the receiving server accepted an alert but before it was booked sends it once more
at the next start (the only window for a duplicate; the test kills the node between analysis and alert).
"""

from __future__ import annotations

import json
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pydicom

from ihd_node import faults, nodelog
from ihd_node.classes import FINDING_NAMES, INCOMPLETE_SERIES, NOT_FOR_DIAGNOSTIC_USE, SUBTYPES
from ihd_node.config import AlertChannel, Config
from ihd_node.store import Alert, Database, utcnow


@dataclass(frozen=True)
class Finding:
    code: str  # the class name (ihd_node.classes)
    words: str
    probability: float


@dataclass(frozen=True)
class Message:
    """What every channel says, built once per alert."""

    node: str
    accession_number: str | None
    study_date: str | None  # YYYY-MM-DD
    study_instance_uid: str
    series_instance_uid: str
    series_description: str | None
    revision: int
    findings: list[Finding]
    overall: float  # probability of any intracranial hemorrhage
    model: str
    incomplete_series: bool  # analysed before all images may have arrived (CompletionFlag PARTIAL)
    console_url: str | None
    viewer_url: str | None
    patient: dict[str, str] = field(default_factory=dict)  # only with alerts.include_patient_data

    @property
    def title(self) -> str:
        what = ", ".join(f.words for f in self.findings)
        return f"Possible {what[0].lower() + what[1:]} - accession {self.accession_number or 'none'}"

    def lines(self) -> list[str]:
        out = [f"AI second opinion from {self.node}: possible intracranial hemorrhage. {NOT_FOR_DIAGNOSTIC_USE}: "
               "a radiologist reads the images."]
        if self.incomplete_series:
            out.append(f"{INCOMPLETE_SERIES}: analysed before all images may have arrived; a part not analysed "
                       "may hold a bleed.")
        if self.patient:
            out.append("Patient: " + ", ".join(f"{k} {v}" for k, v in self.patient.items()))
        out.append(f"Accession number: {self.accession_number or 'none'}; study date: {self.study_date or 'unknown'}"
                   + (f"; series: {self.series_description}" if self.series_description else ""))
        out += [f"- {f.words}: {f.probability:.0%}" for f in self.findings]
        out.append(f"Overall probability of intracranial hemorrhage: {self.overall:.0%} (model {self.model}"
                   + (f", revision {self.revision}" if self.revision > 1 else "") + ")")
        if self.console_url:
            out.append(f"Console: {self.console_url}")
        if self.viewer_url:
            out.append(f"Viewer: {self.viewer_url}")
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event": "ich.positive", "not_for_diagnostic_use": True, "title": self.title, "text": self.text(),
            "node": self.node, "accession_number": self.accession_number, "study_date": self.study_date,
            "study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
            "series_description": self.series_description, "revision": self.revision,
            "findings": [{"finding": f.words, "class": f.code, "probability": round(f.probability, 4)}
                         for f in self.findings],
            "overall_probability": round(self.overall, 4), "model": self.model,
            "incomplete_series": self.incomplete_series,
            # The former name of incomplete_series, kept for receivers written against it.
            "preliminary": self.incomplete_series,
            "console_url": self.console_url, "viewer_url": self.viewer_url,
        }
        if self.patient:
            body["patient"] = self.patient
        return body


def findings(probabilities: dict[str, float], positives: list[str]) -> list[Finding]:
    """Positive subtypes in words; a positive overall result with no positive subtype says so."""
    found = [Finding(c, FINDING_NAMES[c], probabilities[c]) for c in SUBTYPES if c in positives]
    if not found:
        found = [Finding("any", "Intracranial hemorrhage, type not determined", probabilities["any"])]
    return found


def _sr_header(results_dir: Path, series_uid: str, revision: int, sr_uid: str | None) -> pydicom.Dataset | None:
    # analyses.revision counts from 1; the result folder of the n-th analysis is r<n-1> (see service.py).
    folder = results_dir / series_uid / f"r{revision - 1}"
    candidates = [folder / f"SR_{sr_uid}.dcm"] if sr_uid else []
    candidates += sorted(folder.glob("SR_*.dcm"))
    for path in candidates:
        if path.is_file():
            try:
                return pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # the alert still goes out, without the study date
                nodelog.warning("alert.sr_unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}")
    return None


def _date(value: str) -> str | None:
    value = (value or "").strip()
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else None


def build_message(db: Database, config: Config, alert: Alert, results_dir: Path) -> Message:
    analysis = db.get_analysis(alert.analysis_id)
    assert analysis is not None  # a foreign key of the alert
    series = alert.series
    study_uid, series_uid = series.study_instance_uid, series.series_instance_uid
    accession = series.study.accession_number
    header = _sr_header(results_dir, series_uid, analysis.revision, analysis.sr_sop_instance_uid)
    study_date = _date(str(header.get("StudyDate", ""))) if header is not None else None
    patient: dict[str, str] = {}
    if config.alerts.include_patient_data and header is not None:
        patient = {"name": str(header.get("PatientName", "") or ""), "ID": str(header.get("PatientID", "") or ""),
                   "birth date": _date(str(header.get("PatientBirthDate", ""))) or ""}
        patient = {k: v for k, v in patient.items() if v}
    completion = db.latest_completion(series_uid)
    fields = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "AccessionNumber": accession or ""}
    cfg = config.alerts
    return Message(
        node=config.node.ae_title, accession_number=accession, study_date=study_date, study_instance_uid=study_uid,
        series_instance_uid=series_uid, series_description=series.series_description, revision=analysis.revision,
        findings=findings(analysis.probabilities(), analysis.positives()), overall=analysis.p_any,
        model=f"{analysis.model_name} {analysis.model_version}",
        incomplete_series=bool(completion and completion.preliminary),
        console_url=f"{cfg.console_url.rstrip('/')}/study/{study_uid}" if cfg.console_url else None,
        viewer_url=cfg.viewer_url.format(**fields) if cfg.viewer_url else None, patient=patient)


# ---------------------------------------------------------------- channel formats


def webhook_body(channel: AlertChannel, message: Message) -> dict[str, Any]:
    """The JSON each kind of webhook expects."""
    if channel.kind == "slack":  # Slack incoming webhook: text (mrkdwn) is enough and renders everywhere
        return {"text": f"*{message.title}*\n{message.text()}"}
    if channel.kind == "teams":  # Teams (Workflows / incoming webhook): one Adaptive Card as an attachment
        facts = [{"title": f.words, "value": f"{f.probability:.0%}"} for f in message.findings]
        body: list[dict[str, Any]] = [
            {"type": "TextBlock", "text": message.title, "weight": "Bolder", "size": "Medium", "wrap": True},
            {"type": "TextBlock", "text": "\n\n".join(message.lines()), "wrap": True},
            {"type": "FactSet", "facts": facts},
        ]
        actions = [{"type": "Action.OpenUrl", "title": title, "url": url}
                   for title, url in (("Console", message.console_url), ("Viewer", message.viewer_url)) if url]
        card: dict[str, Any] = {"type": "AdaptiveCard", "version": "1.4", "body": body,
                                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json"}
        if actions:
            card["actions"] = actions
        return {"type": "message", "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}]}
    return message.as_json()


def _tls_context(channel: AlertChannel) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(channel.ca_certificates) if channel.ca_certificates else None)


def send_webhook(channel: AlertChannel, message: Message) -> tuple[str, str]:
    """POST the JSON: (sent | retry | rejected, what happened)."""
    assert channel.url is not None  # checked by the config
    data = json.dumps(webhook_body(channel, message)).encode()
    request = urllib.request.Request(channel.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "ihd-node"})
    context = _tls_context(channel) if channel.url.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=channel.timeout, context=context) as response:
            faults.point("alert.accepted")
            return "sent", f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        # 408/429/5xx: the server may take it later; other 4xx: it looked at this body and said no.
        outcome = "retry" if exc.code in (408, 429) or exc.code >= 500 else "rejected"
        return outcome, f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return "retry", f"cannot reach {channel.url.split('?')[0]}: {reason}"


def send_email(channel: AlertChannel, message: Message) -> tuple[str, str]:
    """SMTP with STARTTLS (never in clear text when starttls is on): (sent | retry | rejected, detail)."""
    mail = EmailMessage()
    mail["Subject"] = f"[{NOT_FOR_DIAGNOSTIC_USE}] {message.title}"
    mail["From"] = channel.sender
    mail["To"] = ", ".join(channel.recipients)
    mail.set_content(message.text())
    try:
        with smtplib.SMTP(str(channel.smtp_host), channel.smtp_port, timeout=channel.timeout) as smtp:
            smtp.ehlo()
            if channel.starttls:
                smtp.starttls(context=_tls_context(channel))
                smtp.ehlo()
            if channel.username:
                password = Path(channel.password_file).read_text().strip() if channel.password_file else ""
                smtp.login(channel.username, password)
            refused = smtp.send_message(mail)
            faults.point("alert.accepted")
    except smtplib.SMTPNotSupportedError:
        return "retry", (f"{channel.smtp_host} does not offer STARTTLS; the node does not send alerts in clear text "
                         "(set starttls: false only on a trusted network)")
    except smtplib.SMTPAuthenticationError as exc:
        return "retry", f"SMTP login refused ({exc.smtp_code}); check username and password_file"
    except smtplib.SMTPResponseException as exc:
        # 4xx: try again later; 5xx: this message is refused as it is.
        outcome = "retry" if 400 <= exc.smtp_code < 500 else "rejected"
        return outcome, f"SMTP {exc.smtp_code} {exc.smtp_error.decode(errors='replace')}"
    except smtplib.SMTPRecipientsRefused as exc:
        return "rejected", f"all recipients refused: {sorted(exc.recipients)}"
    except (smtplib.SMTPException, OSError) as exc:
        return "retry", f"cannot send through {channel.smtp_host}:{channel.smtp_port}: {type(exc).__name__}: {exc}"
    if refused:
        return "sent", f"accepted; refused recipients: {sorted(refused)}"
    return "sent", "accepted"


def send(channel: AlertChannel, message: Message) -> tuple[str, str]:
    return send_email(channel, message) if channel.kind == "email" else send_webhook(channel, message)


# ---------------------------------------------------------------- the alert thread


class AlertOutbox:
    """Sends due alerts and books every attempt (and an event per alert sent or given up)."""

    def __init__(self, db: Database, config: Config, results_dir: Path) -> None:
        self.db = db
        self.config = config
        self.results_dir = results_dir

    def run_once(self) -> int:
        due = self.db.due_alerts()
        for alert in due:
            self._attempt(alert)
        return len(due)

    def _attempt(self, alert: Alert) -> None:
        series_uid = alert.series.series_instance_uid
        try:
            channel = self.config.alerts.channel(alert.channel)
        except KeyError:
            outcome, detail = "retry", f"channel {alert.channel!r} is no longer in the config"
        else:
            faults.point("alert.sending")
            started = time.perf_counter()
            try:
                message = build_message(self.db, self.config, alert, self.results_dir)
                outcome, detail = send(channel, message)
            except Exception as exc:  # a bug here must not stop other alerts; booked and retried
                outcome, detail = "retry", f"{type(exc).__name__}: {exc}"
            nodelog.info("alert.attempt", channel=alert.channel, series=series_uid, outcome=outcome,
                         seconds=round(time.perf_counter() - started, 3))
        row = self.db.record_alert_attempt(alert.id, outcome=outcome, error=None if outcome == "sent" else detail,
                                           policy=self.config.delivery)
        study_uid = alert.series.study_instance_uid
        if row.status == "sent":
            self.db.log_event("alert", f"sent to {alert.channel} (revision {alert.revision}): {detail}",
                              series_instance_uid=series_uid, study_instance_uid=study_uid)
        elif row.status in ("failed", "rejected"):
            self.db.log_event("alert", f"{row.status} on {alert.channel}: {row.last_error}", level="ERROR",
                              series_instance_uid=series_uid, study_instance_uid=study_uid)
        else:
            nodelog.warning("alert.retry", channel=alert.channel, series=series_uid, error=detail,
                            retry_in_s=round((row.next_attempt_at - utcnow()).total_seconds(), 1))

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        while not stop.is_set():
            wake.clear()
            try:
                self.run_once()
                when = self.db.next_alert_time()
                wait = 1.0 if when is None else max(0.0, min(1.0, (when - utcnow()).total_seconds()))
            except Exception as exc:
                nodelog.error("alert.loop_failed", error=f"{type(exc).__name__}: {exc}")
                wait = 1.0
            wake.wait(wait)
