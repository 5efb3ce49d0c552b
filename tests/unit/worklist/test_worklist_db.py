"""Engines and migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

import triage.worklist
from triage.errors import TriageError
from triage.worklist.db import alembic_config, create_engine_for, current_revision, migrate
from triage.worklist.tables import Base


def all_models() -> None:
    """Import every worklist module so each table mapped on Base (here and in later revisions) is known."""
    for module in pkgutil.iter_modules(triage.worklist.__path__):
        if module.name != "migrations":
            importlib.import_module(f"triage.worklist.{module.name}")


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrations_apply_and_match_the_models(fresh_db_url):
    engine = create_engine_for(fresh_db_url)
    try:
        assert current_revision(engine) is None
        migrate(fresh_db_url)
        assert current_revision(engine) == head_revision()
        assert {"studies", "series", "instances", "study_events"} <= set(inspect(engine).get_table_names())
        # The hand-written revision creates exactly what the models describe.
        all_models()
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        # Running it again is a no-op.
        migrate(fresh_db_url)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_migrate_accepts_an_engine(tmp_path):
    engine = create_engine_for("sqlite://")  # in memory: only reachable through this engine
    migrate(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_no_patient_names_or_birth_dates_in_the_schema():
    columns = {c.name for table in Base.metadata.tables.values() for c in table.columns}
    for forbidden in ("patient_name", "patient_id", "birth", "dob", "patient_birth_date"):
        assert not any(forbidden in name for name in columns), forbidden
    assert "patient_hash" in columns


def test_sqlite_engine_uses_wal_busy_timeout_and_foreign_keys(tmp_path):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'sub' / 'w.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_sqlite_foreign_keys_are_enforced(tmp_path):
    url = f"sqlite:///{tmp_path / 'fk.db'}"
    migrate(url)
    engine = create_engine_for(url)
    with pytest.raises(Exception, match="FOREIGN KEY"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, description, n_instances,"
                " attributes) VALUES ('1', 'no-such-study', 'CT', '', '', 0, '{}')"
            )
        )
    engine.dispose()


def test_sqlite_migrations_down_and_up_keep_every_series_and_instance(tmp_path, monkeypatch):
    """A batch ALTER of `studies` on SQLite copies and drops the table: with foreign keys enforced, that DROP
    deleted every series and instance (ON DELETE CASCADE). Migrations now run with enforcement off and check the
    references before they commit."""
    from alembic import command

    from tests.unit.worklist.test_worklist_repository import SETTINGS, T0, meta
    from triage.worklist.repository import Worklist

    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'w.db'}"
    worklist = Worklist.open(url, SETTINGS)
    worklist.record_instance(meta("1"), T0)
    worklist.close()
    engine = create_engine_for(url)

    def counts() -> tuple[int, int, int, int]:
        with engine.connect() as conn:
            return tuple(  # type: ignore[return-value]
                int(conn.exec_driver_sql(q).scalar() or 0)
                for q in ("SELECT count(*) FROM studies", "SELECT count(*) FROM series",
                          "SELECT count(*) FROM instances", "PRAGMA foreign_keys")
            )  # fmt: skip

    try:
        command.downgrade(alembic_config(engine=engine), "0002")
        assert counts() == (1, 1, 1, 1)
        migrate(engine)
        assert counts() == (1, 1, 1, 1)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_plain_postgresql_url_uses_psycopg3():
    engine = create_engine_for("postgresql://postgres@127.0.0.1:5432/postgres")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root@localhost/triage", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://u@h/db", "unsupported PostgreSQL driver 'postgresql\\+psycopg2'"),
        ("not a url", "invalid database URL 'not a url'"),
    ],
)
def test_unsupported_urls_are_refused_quoting_the_value(url, message):
    with pytest.raises(TriageError, match=message):
        create_engine_for(url)


def test_concurrent_migrations_both_succeed(fresh_db_url):
    """The service and a worker may start together: the later migration waits and finds the schema at head.

    Separate processes, as in production (Alembic's context is process-global, so threads cannot test this).
    """
    import subprocess
    import sys

    code = "import sys; from triage.worklist.db import migrate; migrate(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, fresh_db_url], stderr=subprocess.PIPE) for _ in range(3)]
    outcomes = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    assert outcomes == [(0, "")] * 3
    engine = create_engine_for(fresh_db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()
