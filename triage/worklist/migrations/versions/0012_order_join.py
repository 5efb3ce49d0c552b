"""Orders join their study within the ordering site, by Study Instance UID where the order carries one.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The registered site the order was recognised as (ordering facility or sending facility), "" for none.
    op.add_column("orders", sa.Column("site", sa.Text(), server_default="", nullable=False))
    # The Study Instance UID the RIS assigned (OMI IPC-3 or ZDS-1), "" when the order names none.
    op.add_column("orders", sa.Column("study_instance_uid", sa.String(128), server_default="", nullable=False))
    # Why the order was not joined to a study although one matched (several open studies share its accession).
    op.add_column("orders", sa.Column("join_note", sa.Text(), server_default="", nullable=False))
    op.create_index("ix_orders_study_instance_uid", "orders", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_orders_study_instance_uid", table_name="orders")
    with op.batch_alter_table("orders") as batch:
        batch.drop_column("join_note")
        batch.drop_column("study_instance_uid")
        batch.drop_column("site")
