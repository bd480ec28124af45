"""The log database: every SQL statement of the node lives in this package.

Other stages import from here only (`from ihd_node.store import Database, Series, utcnow`). Inside:
schema (tables and column types; the migrations import only this), engine (engine and sessions),
intake, series, outbox (with the one retry policy), runs (node runs and events), queries (what the
admin commands, console and metrics read), reads (the radiologist's reads and the results they judge),
audit (the IHE ATNA audit trail and its outbox), database (the `Database` that puts them together).
"""

from ihd_node.store.audit import PendingAudit, audit_source
from ihd_node.store.database import Database, open_database
from ihd_node.store.intake import InstanceBatcher, InstanceRecord, Recorded
from ihd_node.store.monitoring import INPUT_FIELDS, AnalysedResult
from ihd_node.store.outbox import AttemptResult, ResultObject, RetryPolicy, RetrySettings, classify_status
from ihd_node.store.queries import (
    MetricCounts,
    RecentStudies,
    SeriesDetail,
    SeriesSummary,
    StatusRows,
    StudyDetail,
)
from ihd_node.store.reads import NewRead, ResultRow, StudyRef, UnknownStudies
from ihd_node.store.retraction import NotRetractable
from ihd_node.store.schema import (
    AUDIT_STATES,
    DELIVERY_STATES,
    FHIR_BUNDLE,
    FINDINGS,
    HL7_ORU,
    IN_FLIGHT_STATES,
    MESSAGE_CLASSES,
    READ_SOURCES,
    READ_VALUES,
    SCHEMA_VERSION,
    SERIES_STATES,
    SERIES_TIMES,
    TIMING_KEYS,
    UNFINISHED_STATES,
    Alert,
    Analysis,
    AuditMessage,
    AuditPatient,
    Base,
    Completion,
    DatabaseError,
    Delivery,
    DeliveryAttempt,
    DriftAlert,
    DriftEpisode,
    Event,
    Instance,
    Meta,
    Mpps,
    MppsInstance,
    NodeRun,
    Read,
    Series,
    SeriesInput,
    Study,
    UTCDateTime,
    utcnow,
)
from ihd_node.store.series import Candidate, Superseded

__all__ = [
    "DELIVERY_STATES", "FHIR_BUNDLE", "HL7_ORU", "IN_FLIGHT_STATES", "MESSAGE_CLASSES", "NotRetractable",
    "SCHEMA_VERSION", "SERIES_STATES", "SERIES_TIMES", "TIMING_KEYS",
    "UNFINISHED_STATES", "Alert", "Analysis", "AttemptResult", "Base", "Candidate", "Completion", "Database",
    "DatabaseError", "Delivery", "DeliveryAttempt", "Event", "Instance", "InstanceBatcher", "InstanceRecord",
    "Meta", "MetricCounts", "Mpps", "MppsInstance", "NodeRun", "RecentStudies", "Recorded", "ResultObject",
    "RetryPolicy", "RetrySettings", "Series", "SeriesDetail", "SeriesSummary", "StatusRows", "Study", "StudyDetail",
    "Superseded", "UTCDateTime", "classify_status", "open_database", "utcnow",
    # drift monitoring (issue 19)
    "INPUT_FIELDS", "AnalysedResult", "DriftAlert", "DriftEpisode", "SeriesInput",
    # audit trail, IHE ATNA (issue 22)
    "AUDIT_STATES", "AuditMessage", "AuditPatient", "PendingAudit", "audit_source",
    "FINDINGS", "READ_SOURCES", "READ_VALUES", "NewRead", "Read", "ResultRow", "StudyRef", "UnknownStudies",
]
