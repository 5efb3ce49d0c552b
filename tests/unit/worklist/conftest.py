"""Worklist fixtures: a migrated SQLite file and a fresh PostgreSQL database per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from triage.worklist.db import create_engine_for, migrate

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TABLES = ("study_events", "instances", "series", "studies", "sites", "site_privileges", "outbox", "orders")


def postgres_server_url() -> str:
    """The server the PostgreSQL tests use (TRIAGE_TEST_POSTGRES_URL overrides the local trust-auth one)."""
    return os.environ.get("TRIAGE_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


def _admin_engine() -> Engine:
    url = make_url(postgres_server_url()).set(database="postgres")
    return create_engine_for(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


@contextmanager
def _new_postgres_database() -> Iterator[str]:
    """URL of a new database on the PostgreSQL server, dropped on exit; skips (fails in CI) without a server."""
    try:
        admin = _admin_engine()
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        message = f"no PostgreSQL server answers at {postgres_server_url()} ({type(exc).__name__}: {exc})"
        if os.environ.get("TRIAGE_REQUIRE_POSTGRES"):  # CI sets it: there, a missing server is a failure
            pytest.fail(message)
        pytest.skip(message)
    name = f"triage_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """URL of a fresh database on the PostgreSQL server, dropped at the end of the session."""
    with _new_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_migrated(postgres_database: str) -> str:
    migrate(postgres_database)
    return postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file in tmp_path, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'worklist.db'}"
        migrate(url)
        yield url
        return
    url = request.getfixturevalue("postgres_migrated")
    engine = create_engine_for(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine_for(db_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty, unmigrated database: a new SQLite file, or a new PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with _new_postgres_database() as url:
        yield url
