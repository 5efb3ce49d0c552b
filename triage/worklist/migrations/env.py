"""Alembic environment: runs the packaged migrations against the engine or URL that migrate() passes in."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import text

from triage.worklist.db import WRITE_OPTION, create_engine_for
from triage.worklist.tables import Base

# Any fixed 64-bit number; the advisory lock only needs to be the same in every process.
MIGRATION_LOCK_KEY = 0x7472696167650001

config = context.config
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine, False
    url = (
        config.attributes.get("url")
        or os.environ.get("TRIAGE_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError("no database URL: call triage.worklist.db.migrate(url) or set TRIAGE_DATABASE_URL")
    return create_engine_for(url), True


def _sqlite_pragma(connection, pragma: str) -> None:  # type: ignore[no-untyped-def]
    """Run a pragma on the DBAPI connection itself, outside any transaction SQLAlchemy would begin."""
    connection.connection.driver_connection.execute(pragma)


def run_migrations_offline() -> None:
    url = config.attributes.get("url") or os.environ.get("TRIAGE_DATABASE_URL")
    context.configure(url=str(url), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine, owned = _engine()
    try:
        # A write transaction (BEGIN IMMEDIATE on SQLite) so two processes starting at once queue up.
        with engine.connect().execution_options(**{WRITE_OPTION: True}) as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # A batch ALTER on SQLite copies the table and drops the original; with foreign keys enforced that
                # DROP deletes every row that references it (ON DELETE CASCADE: a study's series and instances).
                # SQLite's own procedure for schema changes: enforcement off outside the transaction (the pragma
                # is a no-op inside one), the references checked before the end, enforcement back on.
                _sqlite_pragma(connection, "PRAGMA foreign_keys=OFF")
            try:
                # Batch mode lets later revisions alter tables on SQLite (which cannot ALTER most constraints).
                context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
                with context.begin_transaction():
                    if connection.dialect.name == "postgresql":
                        # Serialise concurrent migrations (the service and a worker starting together): the second
                        # waits here, then finds the schema at head and does nothing.
                        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    context.run_migrations()
                    if sqlite:
                        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise RuntimeError(f"the migration left {len(broken)} broken references: {broken[:5]}")
                if connection.in_transaction():
                    connection.commit()  # SQLite DDL is not in Alembic's transaction: end the one it ran in
            except BaseException:
                if connection.in_transaction():
                    connection.rollback()
                raise
            finally:
                if sqlite:
                    _sqlite_pragma(connection, "PRAGMA foreign_keys=ON")
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
