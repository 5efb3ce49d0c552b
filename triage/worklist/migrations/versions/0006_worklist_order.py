"""Worklist order in SQL: the stored queue columns the worklist query orders and pages by, and their index.

The columns depend on the site's priority policy (finding levels, turnaround targets, promote_at_fraction),
which the database does not know, so this revision leaves them empty (`priority_policy` ""): the first
`Worklist` built on the upgraded database rescores every study whose stored policy digest is not the current
one (`Worklist.rescore_studies`), before it serves a read.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("priority_base_rank", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("priority_target_min", sa.Float(), nullable=True))
        batch.add_column(sa.Column("priority_promote_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("received_us", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("priority_policy", sa.Text(), nullable=False, server_default=""))
    op.create_index(
        "ix_studies_open_queue",
        "studies",
        ["priority_base_rank", "received_us"],
        sqlite_where=sa.text("reported_at IS NULL"),
        postgresql_where=sa.text("reported_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_studies_open_queue", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("priority_policy")
        batch.drop_column("received_us")
        batch.drop_column("priority_promote_at")
        batch.drop_column("priority_target_min")
        batch.drop_column("priority_base_rank")
