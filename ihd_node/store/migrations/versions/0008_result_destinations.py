"""analyses.retracted_at / retracted_by / retraction_reason (issue 18: results taken back).

The outbox rows of the new destination kinds (HL7 ORU, FHIR Bundle) need no schema change: they are
deliveries keyed by (destination, message id), with sop_class_uid "hl7-oru" / "fhir-bundle". A retracted
series has state "retracted" (a text column: no constraint to widen).

Revision ID: 0008_result_destinations
Revises: 0007_analysis_lossy_settings
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_result_destinations"
down_revision: str | None = "0007_analysis_lossy_settings"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("analyses") as batch:
        # naive UTC, as the store's UTCDateTime
        batch.add_column(sa.Column("retracted_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("retracted_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("retraction_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("analyses") as batch:
        batch.drop_column("retraction_reason")
        batch.drop_column("retracted_by")
        batch.drop_column("retracted_at")
