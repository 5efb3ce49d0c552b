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
            # Batch mode lets later revisions alter tables on SQLite (which cannot ALTER most constraints).
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Serialise concurrent migrations (the service and a worker starting together): the second
                    # waits here, then finds the schema at head and does nothing.
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                context.run_migrations()
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
