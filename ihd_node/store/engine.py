"""The engine and its sessions: how every unit of work on the log database begins and ends.

Threads: one engine per process, one short session per unit of work. Writers in this process take a
lock, because SQLite answers a second concurrent writer's lock upgrade with SQLITE_BUSY at once
(busy_timeout does not help there). Rows returned by the API are detached snapshots
(expire_on_commit=False); their many-to-one parents (series.study, instance.series) are loaded eagerly.

The schema checks live in ihd_node.store.migrations, imported here only when called: migrations import
ihd_node.store.schema and nothing of this module, so the two never import each other.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from ihd_node.store.schema import DatabaseError


def _migrations() -> Any:
    try:
        from ihd_node.store import migrations
    except ModuleNotFoundError as exc:  # an environment installed before alembic became a dependency
        raise DatabaseError(
            f"the Python package {exc.name} is missing: install ihd-node's dependencies again "
            "(`.venv/bin/pip install -e .`; pyproject.toml lists alembic and psycopg)"
        ) from None
    return migrations


def _prepare_sqlite_file(database: str) -> None:
    # Owner-only: the database holds UIDs and accession numbers of real patients.
    path = Path(database)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)  # mkdir's mode is reduced by the umask
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # an empty file is a valid SQLite db
        os.close(fd)
        os.chmod(path, 0o600)


class DatabaseEngine:
    """The engine, its sessions and the schema check; the store's area classes add the units of work
    (ihd_node.store.database.Database puts them together)."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 10000, create: bool = True) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise DatabaseError(
                f"{url!r} is not an SQLAlchemy database URL; use e.g. sqlite:////var/lib/ihd-node/ihd.sqlite"
            ) from None
        self.url = parsed
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
            if not parsed.database or parsed.database == ":memory:":
                kwargs["poolclass"] = StaticPool  # one shared in-memory database for all threads
            elif create:
                try:
                    _prepare_sqlite_file(parsed.database)
                except OSError as exc:
                    raise DatabaseError(
                        f"cannot create the log database {parsed.database}: {exc.strerror}; "
                        "check database.url / storage.dir and their permissions"
                    ) from None
            elif not Path(parsed.database).is_file():
                # Readers (ihd-node status/log) must not create a root-owned database the service cannot use.
                raise DatabaseError(
                    f"no log database at {parsed.database}; start the node once "
                    "(ihd-node serve) or check database.url in the config"
                )
        else:
            # A server restart closes every pooled connection: test each before use instead of failing once.
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (NoSuchModuleError, ImportError) as exc:
            raise DatabaseError(
                f"cannot open {parsed.render_as_string(hide_password=True)}: {exc}; install its driver or "
                "fix database.url (PostgreSQL: postgresql+psycopg://...)"
            ) from None
        if self.is_sqlite:
            self._sqlite_setup(busy_timeout_ms)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # A unit of work on SQLite takes the database's write lock when it begins, waiting up to busy_timeout
        # for another process's writer (`ihd-node retry` beside the node). Begun deferred, its first write
        # after a read would be refused at once if the other process committed in between.
        self._write_engine = (self.engine.execution_options(sqlite_begin="BEGIN IMMEDIATE") if self.is_sqlite
                              else self.engine)
        self._write_lock = threading.RLock()
        self._in_session = threading.local()

    def _sqlite_setup(self, busy_timeout_ms: int) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below start transactions, not pysqlite
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers (ihd-node status) never block the node
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

    # -------------------------------------------------------- plumbing

    def create_all(self) -> None:
        """Make the schema current before the node runs: create it in an empty database, migrate an older
        one where that is safe (SQLite: one process owns it), refuse anything else with what to do.

        The schema belongs to Alembic (ihd_node.store.migrations); see there for every case."""
        self._ensure_schema(create=True, upgrade=self.is_sqlite)

    def upgrade(self) -> tuple[str | None, str]:
        """`ihd-node db upgrade`: create or migrate to the newest schema. Returns (revision before, after)."""
        before, after = self._ensure_schema(create=True, upgrade=True)
        return before.current, after.current or after.head

    def check_schema(self) -> None:
        """Readers (status, log): refuse a schema this version does not run on; write nothing."""
        migrations = _migrations()
        try:
            migrations.check_schema(self.engine, where=self._where())
        except DBAPIError as exc:
            raise DatabaseError(f"cannot open the log database {self._where()}: {exc.orig}") from None

    def _where(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def _ensure_schema(self, *, create: bool, upgrade: bool) -> tuple[Any, Any]:
        migrations = _migrations()
        try:
            with self._write_lock:
                return migrations.ensure_schema(self.engine, where=self._where(), create=create, upgrade=upgrade)
        except DBAPIError as exc:  # unreachable server, no permission, a file that is not a database
            raise DatabaseError(
                f"cannot open the log database {self._where()}: {exc.orig}; check database.url and that "
                "the ihd-node user may write there"
            ) from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error. Takes the process-wide write lock."""
        with self._write_lock:
            # A session opened inside another in this thread begins deferred: the outer one holds the lock.
            outer = not getattr(self._in_session, "depth", 0)
            self._in_session.depth = getattr(self._in_session, "depth", 0) + 1
            try:
                with self._sessions(bind=self._write_engine if outer else self.engine) as s:
                    try:
                        yield s
                        s.commit()
                    except BaseException:
                        s.rollback()
                        raise
            finally:
                self._in_session.depth -= 1

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only unit of work without the write lock (admin commands, status pages).

        Closing (not rolling back) ends it: rollback would expire the rows handed out as snapshots."""
        with self._sessions() as s:
            yield s

    def ping(self) -> None:
        """One round trip to the database (readiness checks); raises what the database raised."""
        with self.read_session() as s:
            s.execute(text("SELECT 1"))

    def journal_mode(self) -> str | None:
        if not self.is_sqlite:
            return None
        with self.engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())

    def close(self) -> None:
        self.engine.dispose()

