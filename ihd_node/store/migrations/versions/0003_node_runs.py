"""node_runs: one row per `ihd-node serve` run with its heartbeat (issue 7 item 12).

`ihd-node status` reads it to tell a running node (recent heartbeat) from a cleanly stopped one and from
one that died without a clean stop. A new table only: older rows are untouched.

Revision ID: 0003_node_runs
Revises: 0002_managed_by_alembic
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_node_runs"
down_revision: str | None = "0002_managed_by_alembic"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "node_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("node_id", sa.String(200), nullable=False),
        sa.Column("host", sa.String(128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(32), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),  # naive UTC, as ihd_node.store.schema.UTCDateTime
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_seconds", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.UniqueConstraint("node_id"),
    )
    op.create_index("ix_node_runs_heartbeat_at", "node_runs", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_node_runs_heartbeat_at", table_name="node_runs")
    op.drop_table("node_runs")
