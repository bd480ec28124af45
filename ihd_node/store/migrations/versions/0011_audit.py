"""audit: the IHE ATNA audit trail (issue 22): every DICOM audit message the node made (audit_messages, also
its outbox to the syslog collector) and the patient ID of each study the messages name (audit_patients).

New tables only.

Revision ID: 0011_audit
Revises: 0010_drift
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_audit"
down_revision: str | None = "0010_drift"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_messages",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("event_id", sa.String(16), nullable=False),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),  # naive UTC, as the store's UTCDateTime
        sa.Column("xml", sa.Text(), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("schema_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
    )
    for column in ("event", "at", "state"):
        op.create_index(f"ix_audit_messages_{column}", "audit_messages", [column])
    op.create_table(
        "audit_patients",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_patients")
    op.drop_table("audit_messages")
