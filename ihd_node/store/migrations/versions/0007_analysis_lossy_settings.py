"""analyses.source_lossy and analyses.settings_key (issue 7 items 5 and 8).

source_lossy: the analysed images had been lossy compressed. settings_key: the digest of the
content-changing settings that went into the result UIDs. Both NULL for earlier analyses.

Revision ID: 0007_analysis_lossy_settings
Revises: 0006_cluster
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_analysis_lossy_settings"
down_revision: str | None = "0006_cluster"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("analyses") as batch:
        batch.add_column(sa.Column("source_lossy", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("settings_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("analyses") as batch:
        batch.drop_column("settings_key")
        batch.drop_column("source_lossy")
