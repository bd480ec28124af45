"""The audit messages of one delivery pass to one destination: per study, what reached it (or was given up).

C-STORE destinations get 110104 DICOM Instances Transferred (action R, the node the Source); hl7, fhir and
dicomweb destinations 110106 Export, with the receiving system as the Destination. Rows still waiting for a
retry are not transfers yet: they appear in the pass that settles them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from ihd_node.audit import AuditEvent, StudyObject, events
from ihd_node.store import MESSAGE_CLASSES, Delivery

SETTLED = {"sent": None, "rejected": "rejected", "failed": "given up after retries"}


def settled_events(dest: Any, items: Sequence[tuple[Delivery, str, str | None]]) -> list[AuditEvent]:
    """`items`: (row, its delivery status after the attempt, error) of one pass to `dest`."""
    groups: dict[tuple[str, str | None], list[tuple[Delivery, str | None]]] = defaultdict(list)
    for row, status, error in items:
        if status not in SETTLED:
            continue
        study = row.series.study_instance_uid if row.series is not None else ""
        failure = None if status == "sent" else f"{SETTLED[status]}: {error or 'no reason given'}"
        groups[(study, None if failure is None else status)].append((row, failure))
    found: list[AuditEvent] = []
    for (study_uid, _), rows in groups.items():
        if not study_uid:
            continue
        classes = Counter(r.sop_class_uid for r, _ in rows if r.sop_class_uid not in MESSAGE_CLASSES)
        study = StudyObject(study_uid, tuple(sorted(classes.items())),
                            accession=getattr(rows[0][0].series.study, "accession_number", None) or None)
        failure = "; ".join(sorted({f for _, f in rows if f}))[:1000] or None
        if dest.kind == "dicom":
            found.append(events.instances_sent(dest.name, dest.ae_title, dest.host, study, failure=failure))
        else:
            target = f"{dest.host}:{dest.port}" if dest.kind == "hl7" else str(dest.url)
            ids = [r.sop_instance_uid for r, _ in rows] if dest.kind != "dicomweb" else []
            found.append(events.export(dest.name, dest.kind, target, study, failure=failure, message_ids=ids))
    return found
