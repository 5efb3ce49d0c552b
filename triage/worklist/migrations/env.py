"""Alembic environment: runs the packaged migrations against the engine or URL that migrate() passes in."""

from __future__ import annotations

import os

from alembic import context

from triage.worklist.db import create_engine_for
from triage.worklist.tables import Base

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
        with engine.connect() as connection:
            # Batch mode lets later revisions alter tables on SQLite (which cannot ALTER most constraints).
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
