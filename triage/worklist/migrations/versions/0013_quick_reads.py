"""Quick reads (radiographs) start a few minutes ahead of longer reads in the worklist order.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy of `studies`); filled when the studies are rescored at the next start.
    op.add_column("studies", sa.Column("priority_quick_read_min", sa.Float(), nullable=True))
    op.execute("UPDATE studies SET priority_policy = ''")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("priority_quick_read_min")
    op.execute("UPDATE studies SET priority_policy = ''")
