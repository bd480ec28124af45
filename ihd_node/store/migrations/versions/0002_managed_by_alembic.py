"""The database is managed by Alembic from now on: meta.schema_version becomes 2.

The previous release refuses a database whose schema_version is above 1 ("newer than this ihd-node"),
so an old node started by mistake against an upgraded database stops with that message instead of
writing into a schema it does not know.

Revision ID: 0002_managed_by_alembic
Revises: 0001_baseline
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_managed_by_alembic"
down_revision: str | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.String))


def upgrade() -> None:
    conn = op.get_bind()
    if conn.execute(sa.select(meta.c.key).where(meta.c.key == "schema_version")).first() is None:
        op.execute(meta.insert().values(key="schema_version", value="2"))
    else:
        op.execute(meta.update().where(meta.c.key == "schema_version").values(value="2"))


def downgrade() -> None:
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value="1"))
