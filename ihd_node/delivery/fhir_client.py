"""FHIR R4: one transaction Bundle POSTed to the server's base URL.

200/201 with a transaction-response Bundle whose every entry answered 2xx = sent; a 4xx (but 408 and 429)
= rejected with the OperationOutcome's text as the reason; 5xx, 408, 429, no connection or a timeout =
retry (the bundle's conditional updates make a re-send harmless).
"""

from __future__ import annotations

import http.client
import json

from ihd_node.delivery.transport import BadUrl, TransportOutcome, http_post, no_answer, one_line, redact

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = (408, 429)


def outcome_text(body: bytes) -> str:
    """The reasons an OperationOutcome gives (diagnostics, else details.text), or the body's start."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return one_line(body[:200].decode("utf-8", errors="replace"))
    if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
        texts = []
        for issue in data.get("issue", []) or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
            if text:
                texts.append(f"{issue.get('severity', 'error')}: {text}")
        return one_line("; ".join(texts) or "OperationOutcome without text")
    return one_line(json.dumps(data)[:200])


def _subject_names(bundle: bytes) -> list[str]:
    """The subject's display words, kept out of every detail."""
    try:
        data = json.loads(bundle.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return []
    words: list[str] = []
    for entry in data.get("entry", []) if isinstance(data, dict) else []:
        display = ((entry.get("resource") or {}).get("subject") or {}).get("display") or ""
        words += display.replace(",", " ").replace("(", " ").replace(")", " ").split()
    return words


def _judge_response(status: int, body: bytes) -> TransportOutcome:
    """A 2xx answer: every entry of the transaction-response must say 2xx."""
    if not body.strip():
        return TransportOutcome("sent", f"HTTP {status}, no response bundle to check", str(status))
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle" or \
            data.get("type") not in ("transaction-response", "batch-response"):
        return TransportOutcome("rejected", one_line(f"HTTP {status} but the answer is not a transaction-response "
                                                     f"Bundle: {body[:120]!r}"), str(status))
    statuses = [str(((e or {}).get("response") or {}).get("status", "")).strip() for e in data.get("entry", []) or []]
    failed = [s or "no status" for s in statuses if not s.startswith("2")]
    if failed:
        return TransportOutcome("rejected", one_line(f"HTTP {status}, entries not accepted: {', '.join(failed)}"),
                                str(status))
    created = sum(1 for s in statuses if s.startswith("201"))
    return TransportOutcome("sent", f"HTTP {status}: {len(statuses)} entries, {created} created, "
                                    f"{len(statuses) - created} updated or unchanged", str(status))


def post_transaction(url: str, bundle: bytes, *, token: str | None, timeout: float,
                     ca_certificates: str | None = None) -> TransportOutcome:
    """POST `bundle` (FHIR JSON) to the base `url`; `token` goes as `Authorization: Bearer <token>`."""
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    secrets = _subject_names(bundle)
    try:
        answer = http_post(url.rstrip("/") or url, bundle, headers, timeout=timeout, ca_certificates=ca_certificates)
    except BadUrl as error:
        return TransportOutcome("rejected", one_line(str(error)))
    except (OSError, http.client.HTTPException) as error:
        return TransportOutcome("retry", no_answer(error))
    status = answer.status
    if 200 <= status < 300:
        outcome = _judge_response(status, answer.body)
    elif status >= 500 or status in RETRY_STATUSES:
        outcome = TransportOutcome("retry", one_line(f"HTTP {status}: {outcome_text(answer.body)}"), str(status))
    elif 300 <= status < 400:
        outcome = TransportOutcome("rejected", one_line(f"HTTP {status} redirect to {answer.headers.get('location')}: "
                                                        "configure the server's final base URL"), str(status))
    else:
        outcome = TransportOutcome("rejected", one_line(f"HTTP {status}: {outcome_text(answer.body)}"), str(status))
    return TransportOutcome(outcome.outcome, redact(outcome.detail, secrets), outcome.code)
