"""Deterministic UIDs for the result objects.

A re-run after a crash (or a resend) must produce the same SOP Instance UIDs, so the PACS sees the same
objects again instead of duplicates. UIDs are therefore derived, not generated: a SHA-256 over the source
series, the model identity, the role of the object, its index and the revision, written as a "2.25."
UUID-style UID (PS3.5 B.2), which is always <= 64 characters and has no leading zeros.
"""

from __future__ import annotations

import hashlib

ROLES: frozenset[str] = frozenset({
    "sr",  # the SR document instance
    "sr-series",  # the series holding the SR
    "sc",  # one secondary capture instance (index = position in the SC series)
    "sc-summary",  # the summary capture of a series (one per series, negatives too)
    "sc-series",  # the series holding the secondary captures
    "region",  # tracking UID of one region group in the SR (index = class index * 100000 + model slice)
    "tracking",  # tracking UID of one finding group in the SR (index = class index)
    "device",  # device observer UID (depends on the model only)
})


def derived_uid(*parts: object) -> str:
    """A "2.25." UID from the first 128 bits of SHA-256 over the parts (unambiguously joined)."""
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def result_uid(source_series_uid: str, model_name: str, model_version: str, role: str,
               index: int = 0, revision: int = 0) -> str:
    """UID of one result object; the same inputs always give the same UID."""
    if role not in ROLES:
        raise ValueError(f"unknown UID role {role!r}; expected one of {sorted(ROLES)}")
    if role == "device":
        # The device observer is the algorithm itself, not tied to one series.
        return derived_uid("ihd-node", "device", model_name, model_version)
    return derived_uid("ihd-node", source_series_uid, model_name, model_version, role,
                       int(index), int(revision))
