"""reads: the radiologist's reads per study and finding (issue 19), the truth local performance is measured
against. A new table only.

Revision ID: 0009_reads
Revises: 0008_result_destinations
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_reads"
down_revision: str | None = "0008_result_destinations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reads",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=True),
        sa.Column("finding", sa.String(32), nullable=False),
        sa.Column("value", sa.String(16), nullable=False),
        sa.Column("reader", sa.String(128), nullable=True),
        sa.Column("read_at", sa.DateTime(), nullable=True),  # naive UTC, as the store's UTCDateTime
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("entered_by", sa.String(128), nullable=True),
        sa.Column("entered_at", sa.DateTime(), nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
        sa.Column("superseded_by", sa.Integer(), sa.ForeignKey("reads.id"), nullable=True),
    )
    for column in ("study_instance_uid", "entered_at", "current"):
        op.create_index(f"ix_reads_{column}", "reads", [column])


def downgrade() -> None:
    op.drop_table("reads")
