"""Fixtures shared by every test module: one real PostgreSQL server per test session (tests/pg.py), and one
intra-op torch thread for the modules that ask for it. With CI=true, a skip that is not on ALLOWED_SKIPS fails
the run: on a CI machine that has every package (.ci/packages.txt), a test that does not run is a finding."""

from __future__ import annotations

import fnmatch
import os
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


# Test ids (fnmatch patterns) that may skip under CI=true, each with why that skip is not a gap. Keep it short.
ALLOWED_SKIPS: dict[str, str] = {
    # Their shared fixture needs a PostgreSQL driver SQLAlchemy knows that is NOT installed, to name it in the
    # message under test; where every one is installed there is none to test with.
    "tests/test_startup_errors.py::test_check_config_catches_what_would_stop_serve*": "all PG drivers installed",
    "tests/test_startup_errors.py::test_serve_answers_with_one_line_and_exit_2*": "all PG drivers installed",
}

_skips: list[tuple[str, str]] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    why = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)
    return why.removeprefix("Skipped: ")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module skipped at import (pytest.importorskip, allow_module_level)
        _skips.append((report.nodeid, _reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _reason(report)))


def not_allowed_skips(skips: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(nodeid, why) for nodeid, why in skips
            if not any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in ALLOWED_SKIPS)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _in_ci():
        return
    bad = not_allowed_skips(_skips)
    if not bad:
        return
    lines = [f"not allowed to skip: {nodeid}: {why}" for nodeid, why in bad]
    headline = f"CI=true: {len(bad)} skipped test(s) not on ALLOWED_SKIPS (tests/conftest.py), each a gap in CI"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(headline, *lines, sep="\n")
    else:
        reporter.write_sep("=", headline, red=True)
        for line in lines:
            reporter.write_line(line)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
