"""Schema migrations on real SQLite files and a real PostgreSQL server (tests/pg.py).

- Upgrading an empty database to head, and creating one the way `serve` does, both give exactly the
  tables' metadata (Alembic's compare_metadata finds no difference).
- A database made and filled by the previous release's own code (tests/legacy/db_0_1_0.py, frozen) is
  upgraded by `ihd-node db upgrade`, keeps its data, and today's code works on it.
- A process refuses a schema it does not know, naming the cause and the fix; the old release refuses an
  upgraded database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from alembic import command
from sqlalchemy import create_engine, func, select, text

from ihd_node.classes import CLASSES
from ihd_node.commands.cli import main
from ihd_node.config import default_config
from ihd_node.store import (
    Analysis,
    Database,
    DatabaseError,
    Delivery,
    Event,
    Instance,
    ResultObject,
    Series,
    migrations,
)
from ihd_node.store import open_database as open_today
from tests.legacy import db_0_1_0 as legacy

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'ihd.sqlite'}"
    return request.getfixturevalue("postgres_url")


def differences(engine) -> list:
    with engine.connect() as conn:
        found = migrations.schema_differences(conn)
        if conn.dialect.name == "postgresql":  # the job queue's schema came with it
            assert conn.execute(text("SELECT count(*) FROM procrastinate_jobs")).scalar() == 0
        return found


def config_file(tmp_path: Path, url: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"storage": {"dir": str(tmp_path / "state")}, "database": {"url": url}}))
    return str(path)


def test_one_head() -> None:
    # Two migrations written after the same parent (parallel branches) must be chained before landing.
    assert len(migrations.script_directory().get_heads()) == 1
    assert migrations.head() != migrations.BASELINE


def test_migrations_to_head_give_exactly_the_metadata(url: str) -> None:
    db = Database(url)  # engine only: the migrations alone build the schema
    with db.engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "head")
    assert differences(db.engine) == []
    with db.engine.connect() as conn:
        assert migrations.schema_state(conn).kind == "current"
    db.close()


def test_a_new_database_is_created_at_head(url: str) -> None:
    db = open_today(url)
    assert differences(db.engine) == []
    with db.engine.connect() as conn:
        state = migrations.schema_state(conn)
        assert (state.kind, state.current) == ("current", migrations.head())
        assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == "2"
    db.close()
    open_today(url).close()  # a second start finds it current and changes nothing


def fill_with_previous_release(url: str) -> None:
    """What a node of the previous release leaves behind: two series, an analysis, its outbox, events."""
    old = legacy.open_database(url)
    for i in range(3):
        old.record_instance(study_instance_uid="1.2", series_instance_uid="1.2.3", sop_instance_uid=f"1.2.3.{i}",
                            sop_class_uid=CT, path=f"/spool/{i}.dcm", size=1000, sha256=f"s{i}",
                            accession_number="ACC7", modality="CT", association_id="a1",
                            received_at=T0 + timedelta(seconds=i))
    old.record_instance(study_instance_uid="1.2", series_instance_uid="1.2.4", sop_instance_uid="1.2.4.0",
                        sop_class_uid=CT, path="/spool/x.dcm", size=10, sha256="x", received_at=T0)
    old.association_released("a1", T0 + timedelta(seconds=5))
    assert old.mark_complete("1.2.3", "quiet", T0 + timedelta(seconds=10))
    old.set_series_state("1.2.3", "analyzing", expect="complete", analysis_started=T0 + timedelta(seconds=11))
    analysis = old.finish_analysis(
        "1.2.3", model_name="ihd-cnn-bilstm", model_version="0.1",
        probabilities=dict.fromkeys(CLASSES, 0.1) | {"any": 0.9, "subdural": 0.8},
        positive_classes=["any", "subdural"], thresholds=dict.fromkeys(CLASSES, 0.5), n_slices=3,
        objects=[legacy.ResultObject("9.1", SR, "/r/sr.dcm"), legacy.ResultObject("9.2", CT, "/r/sc.dcm")],
        destinations=["pacs"], sr_sop_instance_uid="9.1", n_secondary_captures=1,
        started=T0 + timedelta(seconds=11), now=T0 + timedelta(seconds=12))
    policy = default_config("/tmp").delivery
    for d in old.due_deliveries(T0 + timedelta(seconds=13)):
        old.record_attempt(d.id, status=0, policy=policy, now=T0 + timedelta(seconds=13))
    old.set_series_state("1.2.4", "ignored", "1 slice (min_slices 10)")
    old.log_event("node", "stopped", at=T0 + timedelta(seconds=20))
    assert analysis.revision == 1
    old.close()


def test_previous_release_database_is_upgraded_with_its_data(url: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    fill_with_previous_release(url)
    engine = create_engine(Database(url).url)
    with engine.connect() as conn:
        assert migrations.schema_state(conn).kind == "legacy"

    assert main(["db", "upgrade", "--config", config_file(tmp_path, url)]) == 0
    assert f"upgraded from {migrations.BASELINE} to schema revision {migrations.head()}" in capsys.readouterr().out
    assert differences(engine) == []

    db = open_today(url)
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4
        assert s.scalar(select(func.count()).select_from(Event)) == 1
        [analysis] = s.scalars(select(Analysis)).all()
        assert analysis.probabilities()["subdural"] == pytest.approx(0.8) and analysis.positives() == ["any",
                                                                                                       "subdural"]
        assert {d.status for d in s.scalars(select(Delivery))} == {"sent"}
    assert db.get_series("1.2.3").state == "delivered" and db.get_series("1.2.4").reason.startswith("1 slice")
    assert db.get_series("1.2.3").first_received == T0  # times keep their zone across the upgrade

    # Today's code carries on in the upgraded database: a late instance, a re-analysis, new ids.
    assert db.record_instance(study_instance_uid="1.2", series_instance_uid="1.2.3", sop_instance_uid="1.2.3.9",
                              sop_class_uid=CT, path="/spool/9.dcm", size=1, sha256="n").reopened
    db.set_series_state("1.2.3", "analyzing")
    again = db.finish_analysis("1.2.3", model_name="m", model_version="1", probabilities=dict.fromkeys(CLASSES, 0.2),
                               positive_classes=[], thresholds={}, n_slices=4, destinations=["pacs"],
                               objects=[ResultObject("9.3", SR, "/r/sr2.dcm")])
    assert again.revision == 2 and db.get_series("1.2.3").state == "delivering"
    db.close()

    assert main(["db", "upgrade", "--config", config_file(tmp_path, url)]) == 0
    assert "already at schema revision" in capsys.readouterr().out


def test_the_previous_release_refuses_an_upgraded_database(url: str) -> None:
    open_today(url).close()
    with pytest.raises(legacy.DatabaseError, match="newer than this ihd-node"):
        legacy.open_database(url)


def test_sqlite_serve_upgrades_postgresql_serve_refuses(url: str, tmp_path: Path) -> None:
    fill_with_previous_release(url)
    if url.startswith("sqlite"):
        open_today(url).close()  # one process owns the file: serve migrates it as it starts
        assert main(["db", "current", "--config", config_file(tmp_path, url)]) == 0
        return
    # Other nodes of the old version may still use a shared PostgreSQL: upgrading is a deliberate step.
    with pytest.raises(DatabaseError, match=r"before schema migrations: run `ihd-node db upgrade --config FILE`"):
        open_today(url)
    assert main(["db", "current", "--config", config_file(tmp_path, url)]) == 1


def test_an_unknown_revision_is_refused_with_what_to_do(url: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    open_today(url).close()
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    with pytest.raises(DatabaseError, match=r"0099_from_the_future, which this ihd-node does not know.*newer"):
        open_today(url)
    # The admin commands say the same in one line, not a traceback.
    assert main(["status", "--config", config_file(tmp_path, url)]) == 2
    assert "which this ihd-node does not know" in capsys.readouterr().err
    db.close()


def test_status_refuses_an_empty_database(postgres_url: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["log", "--config", config_file(tmp_path, postgres_url)]) == 2
    assert "has no ihd-node tables yet" in capsys.readouterr().err
    db = Database(postgres_url)
    with db.engine.connect() as conn:
        assert migrations.schema_state(conn).kind == "empty"  # the reader created nothing
    db.close()


def test_foreign_tables_are_not_taken_over(url: str) -> None:
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE series (id INTEGER PRIMARY KEY, what TEXT)"))
    with pytest.raises(DatabaseError, match="not made by ihd-node"):
        open_today(url)
    db.close()


def test_processes_starting_together_on_postgresql_create_it_once(postgres_url: str) -> None:
    import threading

    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_today(postgres_url).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    db = Database(postgres_url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM meta")).scalar() == 1
    assert differences(db.engine) == []
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Series)) == 0
    db.close()


def test_an_unreachable_postgresql_is_one_clear_error() -> None:
    from ihd_node.sim.mini_pacs import free_port

    with pytest.raises(DatabaseError, match=r"cannot open the log database postgresql\+psycopg://ihd@127.0.0.1"):
        open_today(f"postgresql+psycopg://ihd@127.0.0.1:{free_port()}/ihd")


def test_migrations_import_only_the_schema_of_the_store() -> None:
    """The migrations and the engine that runs them must not import each other: migrations/ may import
    ihd_node.store.schema (and itself), nothing else of ihd_node."""
    import ast

    here = Path(migrations.__file__).parent
    for path in sorted(here.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("ihd_node"):
                    assert name in ("ihd_node.store.schema", "ihd_node.store.migrations"), f"{path}: {name}"
