"""Store keys: instances name their file by its key in the store, not by an absolute path.

`instances.path` (an absolute path on the ingest machine) becomes `instances.store_key`,
"<study>/<series>/<sop>.dcm", the layout every store keeps (triage.storage). The key is computed from the
row's own UIDs, so the migration needs no file system and gives the same key on every node.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import logging
import os

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("path", new_column_name="store_key", existing_type=sa.Text(), existing_nullable=False)
    op.execute("UPDATE instances SET store_key = study_uid || '/' || series_uid || '/' || sop_instance_uid || '.dcm'")


def downgrade() -> None:
    # The old code wants absolute paths: rebuild them under the store folder when it is known
    # (TRIAGE_DATA_DIR/dicom, the default layout), else the keys stay (relative to the store folder).
    data_dir = os.environ.get("TRIAGE_DATA_DIR")
    if data_dir:
        root = os.path.abspath(os.path.join(data_dir, "dicom")).replace("'", "''")
        op.execute(f"UPDATE instances SET store_key = '{root}/' || store_key")
    else:
        log.warning("downgrade 0007: TRIAGE_DATA_DIR not set; instances.path keeps store keys, not paths")
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("store_key", new_column_name="path", existing_type=sa.Text(), existing_nullable=False)
