"""Fixtures shared by every test module: one real PostgreSQL server per test session (tests/pg.py), and one
intra-op torch thread for the modules that ask for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import PostgresServer, why_no_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 cluster of our own on a free loopback port, for the whole session."""
    reason = why_no_postgres()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().init().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A new empty database on the session's server (SQLAlchemy URL, psycopg 3)."""
    return postgres.create_database()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: on a shared 2-core machine two spinning threads are many times
    slower. The previous count comes back after the module."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
