"""`ihd-node db upgrade|current --config FILE`: the schema as an admin sees it."""

from __future__ import annotations

from typing import Any

from ihd_node.config import load_config
from ihd_node.store import Database


def db_command(args: Any) -> int:
    from ihd_node.store import migrations

    config = load_config(args.config)
    db = Database(config.database_url, create=args.db_command == "upgrade")
    where = db.url.render_as_string(hide_password=True)
    try:
        if args.db_command == "upgrade":
            before, after = db.upgrade()
            if before == after:
                print(f"{where}: already at schema revision {after}")
            else:
                print(f"{where}: upgraded from {before or 'an empty database'} to schema revision {after}")
            return 0
        with db.engine.connect() as conn:
            state = migrations.schema_state(conn)
        print(f"{where}: {migrations.describe(state, where) if state.kind != 'current' else 'current'}")
        print(f"revision in the database: {state.current or '-'}; newest this ihd-node knows: {state.head}")
        return 0 if state.kind == "current" else 1
    finally:
        db.close()
