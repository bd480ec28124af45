"""DICOMweb STOW-RS (PS3.18 10.5): the result instances in one multipart/related POST to {url}/studies.

Each instance's outcome comes from the response (application/dicom+json): listed in ReferencedSOPSequence
(0008,1199) = sent; in FailedSOPSequence (0008,1198) = rejected with its FailureReason (0008,1197), or
retry for an out-of-resources reason (0xA7xx). 200 = all stored; 202 (some stored) and 409 (none stored)
are read per instance; 5xx, 408, 429, no connection or a timeout = retry for all; any other 4xx = rejected
for all. A file that cannot be read is rejected on its own and not sent.
"""

from __future__ import annotations

import http.client
import json
import uuid
from base64 import b64encode
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ihd_node.delivery.transport import BadUrl, TransportOutcome, http_post, no_answer, one_line

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
RETRY_STATUSES = (408, 429)


def _value(item: dict, tag: str) -> object:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def read_response(body: bytes) -> tuple[dict[str, int | None], dict[str, int]]:
    """(stored UID -> warning reason or None, failed UID -> failure reason) from a STOW-RS response."""
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, ValueError):
        data = {}
    if isinstance(data, list):  # some servers answer with an array of one data set
        data = data[0] if data and isinstance(data[0], dict) else {}
    if not isinstance(data, dict):
        data = {}
    stored, failed = {}, {}
    for item in (data.get(REFERENCED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = _value(item, REFERENCED_SOP_INSTANCE_UID)
        if uid:
            warning = _value(item, WARNING_REASON)
            stored[str(uid)] = int(warning) if isinstance(warning, int) else None
    for item in (data.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = _value(item, REFERENCED_SOP_INSTANCE_UID)
        reason = _value(item, FAILURE_REASON)
        if uid:
            failed[str(uid)] = int(reason) if isinstance(reason, int) else 0x0110
    return stored, failed


def _failure(reason: int, status: int) -> TransportOutcome:
    if reason & 0xFF00 == 0xA700:
        return TransportOutcome("retry", f"HTTP {status}: out of resources (failure reason 0x{reason:04X})",
                                f"{reason:04X}")
    return TransportOutcome("rejected", f"HTTP {status}: refused (failure reason 0x{reason:04X})", f"{reason:04X}")


def _multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = f"ihd-node-{uuid.uuid4().hex}"
    chunks = []
    for data in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow_instances(url: str, paths: Sequence[Path], *, token: str | None, username: str | None = None,
                   password: str | None = None, timeout: float,
                   ca_certificates: str | None = None) -> list[tuple[Path, TransportOutcome]]:
    """STOW the files to `url` (the DICOMweb base, e.g. http://pacs/dicom-web); one outcome per path.

    `token` is sent as a Bearer token, else `username`/`password` as HTTP Basic authentication.
    """
    results: dict[Path, TransportOutcome] = {}
    uids: dict[Path, str] = {}
    parts = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uids[path] = str(header.SOPInstanceUID)
            parts.append(data)
        except (OSError, ValueError, AttributeError, InvalidDicomError) as error:
            results[path] = TransportOutcome("rejected", one_line(f"cannot read the file: {error}"))
    if parts:
        body, content_type = _multipart(parts)
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif username is not None:
            basic = b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {basic}"
        results.update(_send(url, body, headers, uids, timeout, ca_certificates))
    return [(path, results[path]) for path in paths]


def _send(url: str, body: bytes, headers: dict[str, str], uids: dict[Path, str], timeout: float,
          ca_certificates: str | None) -> dict[Path, TransportOutcome]:
    target = f"{url.rstrip('/')}/studies"
    try:
        answer = http_post(target, body, headers, timeout=timeout, ca_certificates=ca_certificates)
    except BadUrl as error:
        return dict.fromkeys(uids, TransportOutcome("rejected", one_line(str(error))))
    except (OSError, http.client.HTTPException) as error:
        return dict.fromkeys(uids, TransportOutcome("retry", no_answer(error)))
    status = answer.status
    code = str(status)
    if status in (200, 202, 409):
        stored, failed = read_response(answer.body)
        out = {}
        for path, uid in uids.items():
            if uid in failed:
                out[path] = _failure(failed[uid], status)
            elif uid in stored or status == 200:
                warning = stored.get(uid)
                out[path] = TransportOutcome("sent", f"HTTP {status}: stored" + (
                    f" with warning 0x{warning:04X}" if warning is not None else ""), code)
            elif status == 409:
                out[path] = TransportOutcome("rejected", "HTTP 409: not stored (not listed in the answer)", code)
            else:
                out[path] = TransportOutcome("retry", f"HTTP {status}: not listed in the answer", code)
        return out
    text = one_line(answer.body[:200].decode("utf-8", errors="replace"))
    if status >= 500 or status in RETRY_STATUSES:
        return dict.fromkeys(uids, TransportOutcome("retry", one_line(f"HTTP {status}: {text}"), code))
    return dict.fromkeys(uids, TransportOutcome("rejected", one_line(f"HTTP {status}: {text}"), code))
