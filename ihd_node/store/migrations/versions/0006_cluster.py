"""Multi-machine mode: node_runs learns each process's roles, device and analysis throughput; on
PostgreSQL the job queue's schema.

The queue is procrastinate's (its tables, types and functions, named procrastinate_*): applied here from
the installed procrastinate, whose major version pyproject.toml pins; a later procrastinate schema change
needs a new revision that applies its migration files. SQLite has no queue (one process, in-memory queue).

Revision ID: 0006_cluster
Revises: 0005_alerts
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_cluster"
down_revision: str | None = "0005_alerts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("node_runs") as batch:
        batch.add_column(sa.Column("roles", sa.String(64), nullable=True))
        batch.add_column(sa.Column("device", sa.String(32), nullable=True))
        batch.add_column(sa.Column("jobs_done", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("busy_seconds", sa.Float(), nullable=False, server_default="0"))
    from ihd_node.store.migrations import apply_queue_schema

    apply_queue_schema(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("node_runs") as batch:
        for column in ("busy_seconds", "jobs_done", "device", "roles"):
            batch.drop_column(column)
