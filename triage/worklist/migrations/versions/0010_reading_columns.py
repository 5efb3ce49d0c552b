"""What a reading worklist shows and filters by: study date and time, clinical indication, AI flag.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN on every backend: a batch copy of `studies` on SQLite would drop the original table, and
    # with foreign keys on, its series and instances with it.
    # Study Date and Time as the hospital wrote them (DA YYYYMMDD, TM HHMMSS; the site's local time).
    op.add_column("studies", sa.Column("study_date", sa.Text(), server_default="", nullable=False))
    op.add_column("studies", sa.Column("study_time", sa.Text(), server_default="", nullable=False))
    # Reason for the requested procedure (the clinical indication), as sent.
    op.add_column("studies", sa.Column("indication", sa.Text(), server_default="", nullable=False))
    # Whether a finding of a model in use at the site is flagged (shadow findings never count).
    op.add_column("studies", sa.Column("ai_flagged", sa.Boolean(), server_default=sa.false(), nullable=False))
    # Rescored at the next start, which computes ai_flagged from the stored findings.
    op.execute("UPDATE studies SET priority_policy = ''")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("ai_flagged")
        batch.drop_column("indication")
        batch.drop_column("study_time")
        batch.drop_column("study_date")
