"""Alembic migrations of the worklist database."""
