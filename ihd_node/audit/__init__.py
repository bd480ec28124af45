"""IHE ATNA audit messages: typed events (events), their DICOM audit message XML (message, PS3.15 A.5) and
the check of every message against the standard's schema (schema).

A pure package (no I/O but reading its schema file) on the floor of config: every stage may build an event.
Recording and sending are elsewhere: `Database.audit` (ihd_node.store.audit) renders, validates and keeps
each message in the log database's outbox; ihd_node.delivery.syslog sends them to the collector.
"""

from ihd_node.audit import events
from ihd_node.audit.message import (
    PATIENT_NAME_WITHHELD,
    AuditEvent,
    AuditSource,
    Code,
    OtherObject,
    Participant,
    StudyObject,
    render,
)
from ihd_node.audit.schema import schema_errors

__all__ = ["PATIENT_NAME_WITHHELD", "AuditEvent", "AuditSource", "Code", "OtherObject", "Participant",
           "StudyObject", "events", "render", "schema_errors"]
