"""Client hospitals as records (sites), privileges to read them, and the study columns that use them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("updated_by", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_sites")),
    )
    op.create_table(
        "site_privileges",
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("until", sa.Date(), nullable=True),
        sa.Column("granted_by", sa.Text(), nullable=False),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("username", "site", name=op.f("pk_site_privileges")),
    )
    # Plain ADD COLUMN (no batch copy of `studies` on SQLite, which would cascade to its series and instances).
    # The Institution Name as sent (`site` is the registered site the study was recognised as, else this).
    op.add_column("studies", sa.Column("institution", sa.Text(), server_default="", nullable=False))
    # How the site was recognised ("calling AE title X", ...); empty: not a registered site.
    op.add_column("studies", sa.Column("site_match", sa.Text(), server_default="", nullable=False))
    # Last time the claimant acted on the study (claim, open): an idle claim is released after the site's limit.
    op.add_column("studies", sa.Column("claim_active_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE studies SET institution = site")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("claim_active_at")
        batch.drop_column("site_match")
        batch.drop_column("institution")
    op.drop_table("site_privileges")
    op.drop_table("sites")
