"""Initial worklist schema: studies, series, instances and study history.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UID = sa.String(128)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("accession_number", sa.Text(), nullable=False),
        sa.Column("patient_hash", sa.Text(), nullable=False),
        sa.Column("modality", sa.Text(), nullable=False),
        sa.Column("study_description", sa.Text(), nullable=False),
        sa.Column("site", sa.Text(), nullable=False),
        sa.Column("sending_ae", sa.Text(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.Column("last_instance_at", _utc(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("clinical_priority", sa.Text(), nullable=False),
        sa.Column("clinical_priority_source", sa.Text(), nullable=False),
        sa.Column("ai_status", sa.Text(), nullable=False),
        sa.Column("ai_reason", sa.Text(), nullable=False),
        sa.Column("analysis_generation", sa.Integer(), nullable=False),
        sa.Column("analysing_generation", sa.Integer(), nullable=False),
        sa.Column("analysed_generation", sa.Integer(), nullable=False),
        sa.Column("analysis_started_at", _utc(), nullable=True),
        sa.Column("analysis_finished_at", _utc(), nullable=True),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("routing", sa.JSON(), nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claimed_at", _utc(), nullable=True),
        sa.Column("reported_by", sa.Text(), nullable=True),
        sa.Column("reported_at", _utc(), nullable=True),
        sa.Column("priority_level", sa.Text(), nullable=False),
        sa.Column("priority_reasons", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid", name=op.f("pk_studies")),
    )
    op.create_index(op.f("ix_studies_accession_number"), "studies", ["accession_number"])
    op.create_index(op.f("ix_studies_site"), "studies", ["site"])
    op.create_index(op.f("ix_studies_ai_status"), "studies", ["ai_status"])
    op.create_index(op.f("ix_studies_priority_level"), "studies", ["priority_level"])

    op.create_table(
        "series",
        sa.Column("series_uid", UID, nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("modality", sa.Text(), nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_uid"], ["studies.study_uid"], name=op.f("fk_series_study_uid_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("series_uid", name=op.f("pk_series")),
    )
    op.create_index(op.f("ix_series_study_uid"), "series", ["study_uid"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("series_uid", UID, nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("transfer_syntax", UID, nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_uid"], ["series.series_uid"], name=op.f("fk_instances_series_uid_series"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["study_uid"], ["studies.study_uid"], name=op.f("fk_instances_study_uid_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instances_series_uid"), "instances", ["series_uid"])
    op.create_index(op.f("ix_instances_study_uid"), "instances", ["study_uid"])

    op.create_table(
        "study_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_uid", UID, nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_uid"], ["studies.study_uid"], name=op.f("fk_study_events_study_uid_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_events")),
    )
    op.create_index("ix_study_events_study_uid_at", "study_events", ["study_uid", "at"])


def downgrade() -> None:
    op.drop_table("study_events")
    op.drop_table("instances")
    op.drop_table("series")
    op.drop_table("studies")
