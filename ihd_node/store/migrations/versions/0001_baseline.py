"""Baseline: the schema of the last release before Alembic (ihd_node/store/database.py at commit 56b6854).

A database that release created has these tables and no alembic_version table; `ihd-node db upgrade`
stamps it with this revision and goes on from here. Frozen: never edit it, add a new revision.

Revision ID: 0001_baseline
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_baseline"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _time(name: str, nullable: bool = False) -> sa.Column:
    # ihd_node.store.schema.UTCDateTime stores naive UTC in a plain DATETIME / timestamp without time zone.
    return sa.Column(name, sa.DateTime(), nullable=nullable)


def _str(name: str, length: int, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.String(length), nullable=nullable)


def _int(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=nullable)


def _text(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _float(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.Float(), nullable=nullable)


def _index(table: str, *columns: str) -> None:
    op.create_index(f"ix_{table}_{columns[0]}", table, list(columns))


def upgrade() -> None:
    op.create_table("meta", _str("key", 64, False), _str("value", 256, False), sa.PrimaryKeyConstraint("key"))
    op.create_table(
        "events", _id(), _time("at"), _str("level", 8, False), _str("kind", 32, False), _text("message", False),
        _str("study_instance_uid", 64), _str("series_instance_uid", 64), _str("calling_aet", 16),
        _str("peer_address", 64),
    )
    for column in ("at", "kind", "series_instance_uid"):
        _index("events", column)
    op.create_table(
        "studies", _id(), _str("study_instance_uid", 64, False), _str("accession_number", 16),
        _time("first_received"), _time("last_received"), sa.UniqueConstraint("study_instance_uid"),
    )
    _index("studies", "accession_number")
    _index("studies", "last_received")
    op.create_table(
        "series", _id(), _str("series_instance_uid", 64, False),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        _str("modality", 16), _str("series_description", 64), _int("n_instances"), _str("state", 16, False),
        _text("reason"), _str("completion_rule", 16), _str("calling_aet", 16), _str("last_association", 64),
        _int("revision"), _time("first_received"), _time("last_received"),
        *(_time(name, True) for name in ("association_released", "completed", "analysis_started",
                                         "analysis_finished", "delivered", "spool_removed")),
        _time("updated"), sa.UniqueConstraint("series_instance_uid"),
    )
    _index("series", "state")
    _index("series", "study_id")
    op.create_table(
        "analyses", _id(), sa.Column("series_id", sa.Integer(), sa.ForeignKey("series.id"), nullable=False),
        _int("revision"), _str("model_name", 128, False), _str("model_version", 64, False),
        *(_float(f"p_{c}", False) for c in ("any", "epidural", "intraparenchymal", "intraventricular",
                                              "subarachnoid", "subdural")),
        _str("positive_classes", 128, False), _text("thresholds", False), _int("n_slices"),
        _int("n_model_slices", True), _str("sr_sop_instance_uid", 64), _int("n_secondary_captures"),
        _float("load_seconds"), _float("inference_seconds"), _float("gradcam_seconds"), _float("report_seconds"),
        _time("created_at"), sa.UniqueConstraint("series_id", "revision"),
    )
    _index("analyses", "series_id")
    op.create_table(
        "instances", _id(), _str("sop_instance_uid", 64, False),
        sa.Column("series_id", sa.Integer(), sa.ForeignKey("series.id"), nullable=False),
        _str("sop_class_uid", 64, False), _str("transfer_syntax", 64), _text("path", False), _int("size"),
        _str("sha256", 64, False), _time("received_at"), _str("calling_aet", 16), _str("peer_address", 64),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    _index("instances", "series_id")
    op.create_table(
        "deliveries", _id(), sa.Column("analysis_id", sa.Integer(), sa.ForeignKey("analyses.id"), nullable=False),
        sa.Column("series_id", sa.Integer(), sa.ForeignKey("series.id"), nullable=False),
        _str("destination", 64, False), _str("sop_instance_uid", 64, False), _str("sop_class_uid", 64, False),
        _text("path", False), _str("status", 16, False), _int("attempts"), _time("next_attempt_at"),
        _int("last_status", True), _text("last_error"), _time("created_at"), _time("updated_at"),
        _time("delivered_at", True), sa.UniqueConstraint("destination", "sop_instance_uid"),
    )
    for column in ("analysis_id", "next_attempt_at", "series_id", "status"):
        _index("deliveries", column)
    op.create_table(
        "delivery_attempts", _id(),
        sa.Column("delivery_id", sa.Integer(), sa.ForeignKey("deliveries.id"), nullable=False),
        _time("at"), _str("outcome", 16, False), _int("status", True), _text("error"), _float("seconds"),
    )
    _index("delivery_attempts", "delivery_id")


def downgrade() -> None:
    for table in ("delivery_attempts", "deliveries", "instances", "analyses", "series", "studies", "events", "meta"):
        op.drop_table(table)
