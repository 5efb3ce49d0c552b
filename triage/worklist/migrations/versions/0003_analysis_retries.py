"""Analysis retries: attempts of the current generation, when the next may start, and why the last one failed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("analysis_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("failure_kind", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("auto_requeues", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("auto_requeues")
        batch.drop_column("failure_kind")
        batch.drop_column("retry_at")
        batch.drop_column("analysis_attempts")
