"""drift: the input mix of every analysed series (series_inputs), drift episodes and their alert outbox
(issue 19).

New tables only: older rows are untouched (series analysed before this revision have no input facts and
are left out of the input-mix comparison, not of the score comparison).

Revision ID: 0010_drift
Revises: 0009_reads
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_drift"
down_revision: str | None = "0009_reads"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "series_inputs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_id", sa.Integer(), sa.ForeignKey("series.id"), nullable=False, unique=True),
        sa.Column("manufacturer", sa.String(64), nullable=True),
        sa.Column("model_name", sa.String(64), nullable=True),
        sa.Column("kernel", sa.String(64), nullable=True),
        sa.Column("enhanced", sa.Boolean(), nullable=False),
        sa.Column("slice_thickness", sa.Float(), nullable=True),
        sa.Column("kvp", sa.Float(), nullable=True),
        sa.Column("pixel_spacing", sa.Float(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),  # naive UTC, as the store's UTCDateTime
    )
    op.create_table(
        "drift_episodes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("worst_feature", sa.String(64), nullable=False),
        sa.Column("worst_psi", sa.Float(), nullable=False),
        sa.Column("checked_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_drift_episodes_ended_at", "drift_episodes", ["ended_at"])
    op.create_table(
        "drift_alerts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("episode_id", sa.Integer(), sa.ForeignKey("drift_episodes.id"), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("episode_id", "channel"),
    )
    for column in ("episode_id", "status", "next_attempt_at"):
        op.create_index(f"ix_drift_alerts_{column}", "drift_alerts", [column])


def downgrade() -> None:
    op.drop_table("drift_alerts")
    op.drop_table("drift_episodes")
    op.drop_table("series_inputs")
