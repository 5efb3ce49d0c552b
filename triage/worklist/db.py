"""Database engines for SQLite (WAL, busy timeout, foreign keys) and PostgreSQL (psycopg 3), and migrations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool, StaticPool

from triage.errors import TriageError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"

# How long a SQLite writer waits for another writer before giving up (the SCP writes from several threads).
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Execution option asking for a write transaction: on SQLite it begins with BEGIN IMMEDIATE so two
# writers queue on the busy timeout instead of failing when a read lock cannot be upgraded.
WRITE_OPTION = "triage_write"


def _normalise_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a terse message
        raise TriageError(f"invalid database URL {str(url)!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # psycopg 3 is the supported driver; a bare postgresql:// would ask for psycopg2.
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.drivername != "postgresql+psycopg":
            raise TriageError(f"unsupported PostgreSQL driver {parsed.drivername!r}; use postgresql+psycopg://")
    elif backend != "sqlite":
        raise TriageError(f"unsupported database {backend!r} in URL; use sqlite:///PATH or postgresql+psycopg://")
    return parsed


def create_engine_for(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for a SQLite file (or memory) or a PostgreSQL server.

    SQLite gets WAL journaling (readers do not block the writer), a busy timeout, enforced foreign keys
    and transactions under our control (BEGIN, or BEGIN IMMEDIATE for writes). PostgreSQL uses psycopg 3;
    `postgresql://` is read as `postgresql+psycopg://`.

    Args:
        url: `sqlite:///path/to/triage.db`, `sqlite://` (memory, one shared connection) or
            `postgresql+psycopg://user@host:port/db`.
        **kwargs: Passed to `sqlalchemy.create_engine`.

    Raises:
        TriageError: when the URL is malformed or names another database or driver.
    """
    parsed = _normalise_url(url)
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(parsed, **kwargs)

    memory = parsed.database in (None, "", ":memory:")
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    connect_args.setdefault("check_same_thread", False)
    if memory:
        kwargs.setdefault("poolclass", StaticPool)
    else:
        Path(str(parsed.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so BEGIN is emitted by us (see "begin" below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def alembic_config(url: str | URL | None = None, engine: Engine | None = None) -> Any:
    """The Alembic configuration shipped inside the package, pointed at `url` or `engine`."""
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as attributes, not ini options, so a password with "%" needs no escaping.
    if engine is not None:
        config.attributes["engine"] = engine
    elif url is not None:
        config.attributes["url"] = _normalise_url(url)
    return config


# Several processes (API replicas, ingest replicas, schedulers) start against one PostgreSQL database at once;
# an advisory lock makes them migrate one after the other instead of racing on CREATE TABLE.
_MIGRATION_LOCK_KEY = 0x7472_6961_6765  # "triage"


@contextmanager
def _migration_lock(url: str | URL | Engine) -> Iterator[None]:
    engine = url if isinstance(url, Engine) else None
    parsed = engine.url if engine is not None else _normalise_url(url)  # type: ignore[arg-type]
    if parsed.get_backend_name() != "postgresql":
        yield  # SQLite: one writer at a time anyway, and the embedded default is one process
        return
    lock_engine = engine or create_engine_for(parsed, poolclass=NullPool)
    try:
        with lock_engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                conn.commit()
    finally:
        if engine is None:
            lock_engine.dispose()


def migrate(url: str | URL | Engine, revision: str = "head") -> None:
    """Bring the database at `url` (or behind an engine) up to `revision` with the packaged migrations.

    Raises:
        TriageError: when the URL is unsupported or the upgrade fails (the cause is chained).
    """
    from alembic import command

    if isinstance(url, Engine):
        config = alembic_config(engine=url)
        target = url.url.render_as_string(hide_password=True)
    else:
        config = alembic_config(url=url)
        target = make_url(url).render_as_string(hide_password=True)
    try:
        with _migration_lock(url):
            command.upgrade(config, revision)
    except TriageError:
        raise
    except Exception as exc:
        raise TriageError(f"database migration to {revision!r} failed on {target}: {exc}") from exc
    log.info("database at %s migrated to %s", target, revision)


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None before the first migration."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
