"""Completion evidence (issue 13): each "series complete" judgement, and received MPPS with their lists.

Revision ID: 0004_completion_evidence
Revises: 0003_node_runs
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_completion_evidence"
down_revision: str | None = "0003_node_runs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "completions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("rule", sa.String(16), nullable=False),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("preliminary", sa.Text(), nullable=True),
    )
    op.create_index("ix_completions_series_instance_uid", "completions", ["series_instance_uid"])
    op.create_table(
        "mpps",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("calling_aet", sa.String(16), nullable=True),
        sa.Column("trusted", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_table(
        "mpps_instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("mpps_id", sa.Integer(), sa.ForeignKey("mpps.id"), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.UniqueConstraint("mpps_id", "sop_instance_uid"),
    )
    op.create_index("ix_mpps_instances_mpps_id", "mpps_instances", ["mpps_id"])
    op.create_index("ix_mpps_instances_series_instance_uid", "mpps_instances", ["series_instance_uid"])


def downgrade() -> None:
    op.drop_table("mpps_instances")
    op.drop_table("mpps")
    op.drop_table("completions")
