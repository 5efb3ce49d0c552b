"""The worklist schema: studies, series, instances and a history of changes (no patient names or birth dates)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so Alembic migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# DICOM UIDs are at most 64 characters (PS3.5 9.1); the column is wider so a non-conformant sender is not
# refused by PostgreSQL after the instance was stored. Free text is Text for the same reason.
UID_LEN = 128


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so the value is stored as naive UTC and
    marked UTC again when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r} cannot be stored; pass a timezone-aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Study(Base):
    """One row per Study Instance UID: what arrived, its clinical priority, the AI result and who reports it.

    Generations: `analysis_generation` counts the versions of the study worth analysing (bumped when an
    instance arrives after an analysis has started); `analysing_generation` is the one taken by the running
    analysis and `analysed_generation` the last one whose results are stored.
    """

    __tablename__ = "studies"
    # The worklist query: open studies (not reported), ordered from the stored queue columns below.
    __table_args__ = (
        Index(
            "ix_studies_open_queue",
            "priority_base_rank",
            "received_us",
            sqlite_where=text("reported_at IS NULL"),
            postgresql_where=text("reported_at IS NULL"),
        ),
    )

    study_uid: Mapped[str] = mapped_column(String(UID_LEN), primary_key=True)
    accession_number: Mapped[str] = mapped_column(Text, default="", index=True)
    # Salted hash of the Patient ID (computed at the DICOM boundary), never the ID itself.
    patient_hash: Mapped[str] = mapped_column(Text, default="")
    # Modalities in the study, sorted and joined with "\" as in ModalitiesInStudy (0008,0061).
    modality: Mapped[str] = mapped_column(Text, default="")
    study_description: Mapped[str] = mapped_column(Text, default="")
    # Study Date and Time as sent (DA, TM: the hospital's local time) and the clinical indication.
    study_date: Mapped[str] = mapped_column(Text, default="", server_default="")
    study_time: Mapped[str] = mapped_column(Text, default="", server_default="")
    indication: Mapped[str] = mapped_column(Text, default="", server_default="")
    # The registered site (triage.worklist.sites) the study was recognised as; else its Institution Name.
    site: Mapped[str] = mapped_column(Text, default="", index=True)
    institution: Mapped[str] = mapped_column(Text, default="", server_default="")
    # How the site was recognised ("calling AE title X", ...); empty: not a registered site.
    site_match: Mapped[str] = mapped_column(Text, default="", server_default="")
    sending_ae: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_instance_at: Mapped[datetime] = mapped_column(UTCDateTime())
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    clinical_priority: Mapped[str] = mapped_column(Text, default="routine")
    clinical_priority_source: Mapped[str] = mapped_column(Text, default="default")

    ai_status: Mapped[str] = mapped_column(Text, default="pending", index=True)
    ai_reason: Mapped[str] = mapped_column(Text, default="")
    analysis_generation: Mapped[int] = mapped_column(Integer, default=1)
    analysing_generation: Mapped[int] = mapped_column(Integer, default=0)
    analysed_generation: Mapped[int] = mapped_column(Integer, default=0)
    analysis_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    analysis_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    routing: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # Failed attempts at the pending generation (a transient failure is retried, not before `retry_at`);
    # `failure_kind` is "transient" or "permanent" for a failed study, "" otherwise; `auto_requeues` counts
    # the times a transient failure was re-queued when its model was healthy again.
    analysis_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failure_kind: Mapped[str] = mapped_column(Text, default="", server_default="")
    auto_requeues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    claimed_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Last time the claimant acted on the study; a claim idle past its site's limit is released.
    claim_active_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reported_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    # Cached result of the priority policy at the last change; the worklist recomputes it at read time
    # because waiting time moves it.
    priority_level: Mapped[str] = mapped_column(Text, default="routine", index=True)
    # A finding of a model in use at the site is flagged (shadow findings never count); the "AI flag" filter.
    ai_flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    priority_reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # What the worklist query orders by, none of which moves with the clock (priority.QueueOrder): the rank of
    # the level before promotion for waiting (clinical + AI), that level's turnaround target, the first instant
    # waiting promotes it (None: never), its quick-read head start, received_at in microseconds since the epoch
    # (exact integer arithmetic for the score in SQL) and a digest of the policy they were computed with (a
    # changed policy rescores).
    priority_base_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    priority_target_min: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority_promote_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    priority_quick_read_min: Mapped[float | None] = mapped_column(Float, nullable=True)
    received_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    priority_policy: Mapped[str] = mapped_column(Text, default="", server_default="")


class Series(Base):
    """One row per series; `attributes` holds what routing rules look at (values from its first instance)."""

    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(String(UID_LEN), primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True)
    modality: Mapped[str] = mapped_column(Text, default="")
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Instance(Base):
    """One row per received SOP instance; the unique SOP Instance UID makes a resent instance a duplicate."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid", ondelete="CASCADE"), index=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN), default="")
    # The instance's key in the store ("<study>/<series>/<sop>.dcm", see triage.storage), never a file path.
    store_key: Mapped[str] = mapped_column(Text)
    transfer_syntax: Mapped[str] = mapped_column(String(UID_LEN), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StudyEvent(Base):
    """History of a study: arrival, analyses, claims and reports, with who did it (user names, never patients)."""

    __tablename__ = "study_events"
    __table_args__ = (Index("ix_study_events_study_uid_at", "study_uid", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    user: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AnalysisRun(Base):
    """One attempt at analysing one generation of a study: who ran it, how it ended, and its lease.

    A running attempt holds a lease (`lease_until`) that its process renews; when the process dies the lease
    runs out and another scheduler re-queues the study, so no study stays "analysing" for ever.
    Status: running, done, failed, not-applicable, retry (a transient failure, tried again), superseded
    (instances arrived meanwhile) or interrupted (its process died).
    """

    __tablename__ = "analysis_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid", ondelete="CASCADE"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(Text, index=True)
    # host:pid (and role) of the process that ran it.
    worker: Mapped[str] = mapped_column(Text, default="", server_default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    # [{stage, seconds, node_id?}] in the order the stages ran.
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class OrderRow(Base):
    """An order received from the RIS (HL7 ORM^O01 / OMI^O23). It joins its study, whichever arrives first: by the
    Study Instance UID it carries, else by accession number within its ordering site; it sets the study's clinical
    priority floor (never lowering it)."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    accession_number: Mapped[str] = mapped_column(Text, index=True)
    message_type: Mapped[str] = mapped_column(String(16))
    control_id: Mapped[str] = mapped_column(Text, default="")
    order_control: Mapped[str] = mapped_column(String(8), default="")
    requested_procedure: Mapped[str] = mapped_column(Text, default="")
    # Our level (stat, urgent, routine) or "" when the order named none we know.
    priority: Mapped[str] = mapped_column(String(16), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    ordering_site: Mapped[str] = mapped_column(Text, default="")
    sending_application: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    study_uid: Mapped[str | None] = mapped_column(String(UID_LEN), nullable=True)
    # The registered site the order was recognised as (its ordering or sending facility); "" for none.
    site: Mapped[str] = mapped_column(Text, default="", server_default="")
    # The Study Instance UID the RIS assigned (IPC-3 or ZDS-1): it joins the study whatever its accession.
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), default="", server_default="", index=True)
    # Why a matching study was not joined (several open studies of the site share the accession); "" otherwise.
    join_note: Mapped[str] = mapped_column(Text, default="", server_default="")
