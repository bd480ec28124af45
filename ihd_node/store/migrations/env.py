"""Alembic's environment, configured in code: the caller (ihd_node.store.migrations) hands over an open
connection in config.attributes, so no alembic.ini and no URL are needed at run time."""

from alembic import context

from ihd_node.store.migrations import include_name
from ihd_node.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: Alembic rebuilds the table ("batch") instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    include_name=include_name,
)
with context.begin_transaction():
    context.run_migrations()
