"""Deterministic UIDs and series numbers for the result objects.

A re-run after a crash (or a resend) must produce the same SOP Instance UIDs, so the PACS sees the same
objects again instead of duplicates; and different content must never carry a UID seen before. UIDs are
therefore derived from everything that decides the content: the source series, the model identity, the
result settings (effective thresholds, the capture cap, the slab settings, Grad-CAM on/off and what it
explains, and the ihd-node version, see ResultSettings), the role of the object, its index and the revision. They are
name-based UUIDs (RFC 9562 version 5, with its version and variant bits) written as "2.25." UIDs
(PS3.5 B.2): at most 44 characters, no leading zeros.

The Device Observer UID names this installation's algorithm: it is derived from a per-site value that
the node creates at first start (ihd_node.site) and the model identity, so two hospitals running the
same model are two devices.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import ihd_node

# The namespace of every ihd-node UUID (itself a version-5 UUID in the OID namespace).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "ihd-node result objects")

ROLES: frozenset[str] = frozenset({
    "sr",  # the SR document instance
    "sr-series",  # the series holding the SR
    "sc",  # one secondary capture instance (index = model slice it shows)
    "sc-summary",  # the summary capture of a series (one per series, negatives too)
    "sc-series",  # the series holding the secondary captures
    "region",  # tracking UID of one region group in the SR (index = class index * 100000 + model slice)
    "tracking",  # tracking UID of one finding group in the SR (index = class index)
    "device",  # device observer UID (depends on the site and the model only)
    "seg",  # the Segmentation instance (the model's attention regions)
    "seg-series",  # the series holding the Segmentation
    "kos",  # the Key Object Selection ("Of Interest") listing the slices with findings
    "kos-series",  # the series holding that key object selection
    "segment",  # tracking UID of one segment of the Segmentation (index = class index)
})

# Result series numbers: the SR series of source series S, revision R (0 for the first analysis) is
# SERIES_NUMBER_BASE + 1000 * (S mod 10000) + 10 * (R mod 100); the other results' series follow it
# (SERIES_OFFSETS: captures + 1, segmentation + 2, key images + 3, a rejection note withdrawing them + 4).
SERIES_NUMBER_BASE = 90_000_000
SERIES_OFFSETS: dict[str, int] = {"sr": 0, "sc": 1, "seg": 2, "kos": 3, "rejection": 4}


@dataclass(frozen=True)
class ResultSettings:
    """Every setting that changes what the results contain; its key goes into every result UID."""

    thresholds: Mapping[str, float] = field(default_factory=dict)
    max_secondary_captures: int = 16
    thin_slice_mm: float = 3.0
    slab_mm: float = 5.0
    gradcam: bool = True
    explain: str = "decision"  # what the heatmaps explain (model.explain)

    def key(self) -> str:
        """A short digest of the settings and the ihd-node version (whose code shapes the content too)."""
        text = json.dumps({
            "thresholds": {str(k): round(float(v), 6) for k, v in sorted(self.thresholds.items())},
            "max_secondary_captures": int(self.max_secondary_captures),
            "thin_slice_mm": round(float(self.thin_slice_mm), 6),
            "slab_mm": round(float(self.slab_mm), 6),
            "gradcam": bool(self.gradcam),
            "explain": str(self.explain),
            "ihd_node": ihd_node.__version__,
        }, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def derived_uid(*parts: object) -> str:
    """A "2.25." UID of the version-5 UUID of the parts (unambiguously joined) in ihd-node's namespace."""
    text = "\x1f".join(str(p) for p in parts)
    return "2.25." + str(uuid.uuid5(NAMESPACE, text).int)


def result_uid(source_series_uid: str, model_name: str, model_version: str, role: str,
               index: int = 0, revision: int = 0, *, settings: str = "", site: str = "") -> str:
    """UID of one result object; the same inputs always give the same UID.

    `settings` is ResultSettings.key() of the run; `site` is the installation's site value (only the
    device role uses it).
    """
    if role not in ROLES:
        raise ValueError(f"unknown UID role {role!r}; expected one of {sorted(ROLES)}")
    if role == "device":
        # The device observer is this installation's algorithm, not tied to one series.
        return derived_uid("ihd-node", "device", site, model_name, model_version)
    return derived_uid("ihd-node", source_series_uid, model_name, model_version, settings, role,
                       int(index), int(revision))


def result_series_numbers(source_series_number: object, revision: int) -> tuple[int, int]:
    """(SR, SC) series numbers: distinct for each source series number and revision of a study.

    Readable: 90030020 is the SR of source series 30, revision 2 (the third analysis), 90030021 its
    captures. Source series sharing a Series Number in one study would share these (UIDs still differ).
    """
    try:
        source = int(str(source_series_number).strip())
    except (TypeError, ValueError):
        source = 0
    base = SERIES_NUMBER_BASE + 1000 * (abs(source) % 10_000) + 10 * (int(revision) % 100)
    return base, base + 1


def result_series_number(source_series_number: object, revision: int, kind: str) -> int:
    """The series number of one kind of result (SERIES_OFFSETS) of source series S, revision R."""
    if kind not in SERIES_OFFSETS:
        raise ValueError(f"unknown result kind {kind!r}; expected one of {sorted(SERIES_OFFSETS)}")
    return result_series_numbers(source_series_number, revision)[0] + SERIES_OFFSETS[kind]
