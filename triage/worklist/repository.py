"""The worklist repository: index arriving instances, queue studies for analysis, store results, claim and report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from typing import cast as typing_cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, computed_field, field_serializer
from sqlalchemy import BigInteger, Engine, Float, Table, and_, case, cast, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from triage.config import AlertSettings, PrioritySettings
from triage.domain import (
    AIStatus,
    ClinicalOrder,
    Finding,
    InstanceMeta,
    Priority,
    PriorityLevel,
    PriorityReason,
    RoutingDecision,
    SeriesInfo,
    StageTime,
    UtcTime,
)
from triage.errors import ConflictError, NotFoundError, NotPermittedError
from triage.worklist.accounts import AuditRow
from triage.worklist.alerts import ALERT, ESCALATION, contacts_for
from triage.worklist.db import WRITE_OPTION, create_engine_for
from triage.worklist.events import STUDY_UPDATED, Broadcaster
from triage.worklist.outbox import OutboxRow, enqueue
from triage.worklist.priority import (
    AI_FINDING,
    HEAD_START_MIN,
    LONG_WAIT,
    LONG_WAIT_MIN,
    QueueOrder,
    base_level,
    compute_priority,
    epoch_us,
    level_of,
    policy_fingerprint,
    priority_to_dict,
    queue_order,
    require_utc,
    score_of,
    turnaround,
    validate_settings,
)
from triage.worklist.sites import Site, Sites
from triage.worklist.tables import UID_LEN, AnalysisRun, Instance, OrderRow, Series, Study, StudyEvent

log = logging.getLogger(__name__)

# Modalities in a study are joined like ModalitiesInStudy (0008,0061), a multi-valued CS.
MODALITY_SEPARATOR = "\\"
_FINISHED = (AIStatus.DONE, AIStatus.FAILED, AIStatus.NOT_APPLICABLE)
PRIORITY_ERROR = "priority-error"  # reason code of a study whose priority could not be computed
_TOP_LEVEL = max(PriorityLevel, key=lambda lvl: lvl.rank)
_RESCORE_BATCH = 500


class WorklistItem(BaseModel):
    """One study as the worklist shows it, with its priority computed for the time of the read."""

    model_config = ConfigDict(protected_namespaces=())

    study_uid: str
    accession_number: str
    modality: str
    study_description: str
    site: str
    sending_ae: str
    received_at: UtcTime
    last_instance_at: UtcTime
    # The Institution Name as sent, and how `site` was recognised (empty: no registered site claims the study).
    institution: str = ""
    site_match: str = ""
    study_date: str = ""
    study_time: str = ""
    indication: str = ""
    ai_flagged: bool = False
    # The site's time zone (IANA name; UTC for unregistered senders) and its target for the study's level.
    site_time_zone: str = "UTC"
    turnaround_target_min: float | None = None
    instance_count: int
    waiting_min: float
    turnaround_left_min: float | None
    clinical_priority: str
    ai_status: str
    ai_reason: str
    priority: Priority
    findings: list[Finding]
    claimed_by: str | None
    claimed_at: UtcTime | None
    reported: bool
    reported_by: str | None = None
    reported_at: UtcTime | None = None

    @field_serializer("waiting_min", "turnaround_left_min")
    def _minutes(self, value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 UTC strings, the priority as {level, score, reasons}."""
        return self.model_dump(mode="json")


class SeriesDetail(BaseModel):
    """One series of a study with the routing decision made for it (None before any analysis)."""

    series_uid: str
    modality: str
    description: str
    n_instances: int
    attributes: dict[str, Any]
    routing: RoutingDecision | None


class HistoryEntry(BaseModel):
    """One event in a study's history (received, analysis started or finished, claimed, reported, ...)."""

    at: UtcTime
    kind: str
    user: str | None
    detail: dict[str, Any]


class AnalysisRunRecord(BaseModel):
    """One analysis run of a study: which generation and attempt, which process ran it, when, and how it ended
    ("running", "done", "failed", "not-applicable", "superseded", "deferred", "interrupted")."""

    id: int
    generation: int
    attempt: int
    status: str
    worker: str
    started_at: UtcTime | None
    finished_at: UtcTime | None
    reason: str
    stages: list[StageTime]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def attempts(self) -> int:
        """How many times the study's analysis had been tried when this run ended (this run included)."""
        return self.attempt


@dataclass(frozen=True)
class ReadScope:
    """Which studies a reader may see and claim: those of the registered `sites` named (their privileges valid
    today) and, where `unregistered` is set, those of senders no site claims.

    `None` in place of a scope means every study (admins, service accounts).
    """

    sites: frozenset[str]
    unregistered: bool = True

    def allows(self, site: str, registered: bool) -> bool:
        return site in self.sites if registered else self.unregistered

    def describe(self) -> str:
        sites = ", ".join(sorted(self.sites)) or "none"
        return f"sites you may read: {sites}" + ("; and senders no site claims" if self.unregistered else "")


def _scope_filter(scope: ReadScope | None) -> Any:
    if scope is None:
        return None
    registered = Study.site_match != ""
    allowed = and_(registered, Study.site.in_(sorted(scope.sites))) if scope.sites else literal(False)
    if scope.unregistered:
        allowed = or_(allowed, Study.site_match == "", Study.site_match.is_(None))
    return allowed


COMMUNICATED = "critical-communicated"
COMMUNICATION_METHODS = ("phone", "secure-message", "in-person", "pager", "email", "other")


class Communication(BaseModel):
    """A critical result told to the care team: who told whom, by what means, when (ACR practice parameter on
    communication of diagnostic imaging findings: the communication of an urgent finding is documented)."""

    by: str
    recipient: str
    method: str
    at: UtcTime
    note: str = ""
    recorded_at: UtcTime


def _communication(by: str, recorded_at: datetime, detail: Mapping[str, Any]) -> Communication:
    return Communication(
        by=by,
        recipient=str(detail.get("recipient", "")),
        method=str(detail.get("method", "")),
        at=detail.get("told_at") or recorded_at,
        note=str(detail.get("note", "")),
        recorded_at=recorded_at,
    )


class StudyDetail(WorklistItem):
    """A study's worklist entry plus its series, the analysis times, every analysis run and its history."""

    communications: list[Communication] = Field(default_factory=list)

    series: list[SeriesDetail]
    analysis_generation: int
    analysed_generation: int
    analysis_started_at: UtcTime | None
    analysis_finished_at: UtcTime | None
    analysis_attempts: int = 0
    retry_at: UtcTime | None = None
    failure_kind: str = ""
    analyses: list[AnalysisRunRecord] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)

    @property
    def item(self) -> WorklistItem:
        """The study as a worklist entry (a study detail is one, with more)."""
        return self


# The stored JSON columns are read and written here, once: typed records everywhere else.
_FINDINGS = TypeAdapter(list[Finding])
_Record = TypeVar("_Record", bound=BaseModel)


def _as_record(kind: type[_Record], value: Any, what: str) -> _Record:
    """`value` as a `kind` record (a record passes through; a mapping is validated).

    Raises:
        ValueError: quoting the value and the fields it lacks, or what is wrong with it.
    """
    try:
        return kind.model_validate(value)
    except ValidationError as exc:
        missing = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "missing"]
        problem = f"lacks {missing}" if missing else f"is invalid ({exc.errors()[0]['msg']})"
        raise ValueError(f"{what} {value!r} {problem}") from None


def dump_findings(findings: Iterable[Finding | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The findings as the study's JSON column stores them (the in-memory overlay is not stored).

    Raises:
        ValueError: quoting the field, when a finding given as a mapping lacks one or has the wrong type.
    """
    return [_as_record(Finding, f, "finding").model_dump(mode="json") for f in findings]


def load_findings(stored: Sequence[Any] | None, study_uid: str = "") -> list[Finding]:
    """The findings stored with a study, as records. Rows written by earlier releases load: missing optional
    keys take their defaults and unknown ones are ignored.

    Raises:
        ValueError: naming the study when a stored finding cannot be read (the caller decides what that costs).
    """
    try:
        return _FINDINGS.validate_python(list(stored or []))
    except ValidationError as exc:
        raise ValueError(f"study {study_uid}: stored findings cannot be read: {exc.errors()[0]['msg']}") from None


def _readable_findings(stored: Sequence[Any] | None, study_uid: str) -> list[Finding]:
    """The stored findings that can be read; an unreadable one is left out of the list and logged (the
    priority still counts it: see `Worklist._priority`)."""
    readable = []
    for entry in stored or []:
        try:
            readable.append(Finding.model_validate(entry))
        except ValidationError:
            log.error("study %s: a stored finding cannot be read; not shown", study_uid)
    return readable


def dump_routing(routing: Iterable[RoutingDecision | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The routing decisions as stored with the study.

    Raises:
        ValueError: when a decision given as a mapping lacks series_uid.
    """
    return [_as_record(RoutingDecision, d, "routing decision").model_dump(mode="json") for d in routing]


def load_routing(stored: Sequence[Any] | None) -> list[RoutingDecision]:
    """The stored routing decisions that can be read (an unreadable one routes nothing)."""
    decisions = []
    for entry in stored or []:
        try:
            decisions.append(RoutingDecision.model_validate(entry))
        except ValidationError:
            continue
    return decisions


def _stage_times(stored: Sequence[Any] | None) -> list[StageTime]:
    times = []
    for entry in stored or []:
        try:
            times.append(StageTime.model_validate(entry))
        except ValidationError:
            continue
    return times


def _status(value: AIStatus | str) -> AIStatus:
    try:
        return AIStatus(value)
    except ValueError:
        raise ValueError(f"unknown AI status {value!r}; valid: {[s.value for s in AIStatus]}") from None


def _modalities(joined: str) -> list[str]:
    return [m for m in joined.split(MODALITY_SEPARATOR) if m]


class Worklist:
    """The study worklist in a SQLite or PostgreSQL database, with the site's priority policy.

    Every method that changes a study publishes {"type": "study.updated", "study_uid": ..., "change": ...}
    on `events` after its transaction commits. All times are timezone-aware UTC.

    Args:
        engine: An engine from `create_engine_for`, or a database URL. The schema must exist: call
            `triage.worklist.db.migrate(url)` first, or use `Worklist.open`.
        settings: The site's priority policy.
        events: Where change events go; a private Broadcaster when omitted.
        sender_priority: Clinical priority for studies whose request carries none, by calling AE title.

    Raises:
        ValueError: when the policy or the sender mapping names an unknown priority level.
    """

    def __init__(
        self,
        engine: Engine | str,
        settings: PrioritySettings | None = None,
        events: Broadcaster | None = None,
        sender_priority: Mapping[str, str] | None = None,
    ) -> None:
        self.engine = create_engine_for(engine) if isinstance(engine, str) else engine
        self._write_engine = self.engine.execution_options(**{WRITE_OPTION: True})
        self.settings = settings or PrioritySettings()
        validate_settings(self.settings)
        self.events = events or Broadcaster()
        self.sender_priority: dict[str, PriorityLevel] = {}
        for ae, value in (sender_priority or {}).items():
            try:
                self.sender_priority[ae.strip()] = PriorityLevel.parse(value)
            except ValueError as exc:
                raise ValueError(f"sender_priority[{ae!r}]: {exc}") from None
        dialect = self.engine.dialect.name
        self._upsert: Any
        if dialect == "postgresql":
            self._upsert = pg_insert
        elif dialect == "sqlite":
            self._upsert = sqlite_insert
        else:  # create_engine_for refuses others; an engine built elsewhere might not
            raise ValueError(f"unsupported database dialect {dialect!r}; use SQLite or PostgreSQL")
        # The policy may differ from the one the stored queue columns were computed with (another run's
        # settings, or a database just upgraded): bring them up to date before the first read.
        self.policy = policy_fingerprint(self.settings)
        # Client hospitals with their own rules; studies of senders no site claims get `settings`.
        self.sites = Sites(self.engine, self.settings)
        # "host:port" of the RIS that AI results go to over HL7 (written to the outbox); None: not sent.
        self.hl7_destination: str | None = None
        # Critical-alert contacts (set by the service from TRIAGE_ALERTS__* and the site records).
        self.alert_settings = AlertSettings()
        # Where a site's AI results go ("AE@host:port" of its PACS, else the service's), None: not sent.
        self.results_destination: Callable[[Site | None], str | None] = lambda site: None
        self.rescore_studies()

    @classmethod
    def open(
        cls,
        url: str,
        settings: PrioritySettings | None = None,
        events: Broadcaster | None = None,
        sender_priority: Mapping[str, str] | None = None,
    ) -> Worklist:
        """Create the engine for `url`, migrate the schema to head and return the worklist."""
        from triage.worklist.db import migrate

        engine = create_engine_for(url)
        migrate(engine)
        return cls(engine, settings, events, sender_priority)

    def close(self) -> None:
        """Release the engine's pooled connections (the engine stays usable and reconnects on demand)."""
        self.engine.dispose()
        self.sites.close()

    # ----------------------------------------------------------------------------------------- helpers

    def _read(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _write(self) -> Session:
        return Session(self._write_engine, expire_on_commit=False)

    def _publish(self, study_uid: str, change: str) -> None:
        self.events.publish({"type": STUDY_UPDATED, "study_uid": study_uid, "change": change})

    @staticmethod
    def _locked(session: Session, study_uid: str) -> Study:
        # FOR UPDATE on PostgreSQL; on SQLite the BEGIN IMMEDIATE of a write session already serialises.
        study = session.execute(
            select(Study).where(Study.study_uid == study_uid).with_for_update()
        ).scalar_one_or_none()
        if study is None:
            raise NotFoundError(f"study {study_uid!r} is not on the worklist")
        return study

    @staticmethod
    def _history(session: Session, study_uid: str, kind: str, at: datetime, user: str | None = None, **detail: Any):
        session.add(StudyEvent(study_uid=study_uid, kind=kind, at=at, user=user, detail=detail))

    def _priority(self, study: Study, now: datetime) -> Priority:
        try:
            policy, rule_source = self._policy_of(study)
            return compute_priority(
                PriorityLevel(study.clinical_priority),
                load_findings(study.findings, study.study_uid),
                study.ai_status,
                study.received_at,
                now,
                policy,
                ai_reason=study.ai_reason,
                clinical_source=study.clinical_priority_source,
                rule_source=rule_source,
                modality=study.modality or "",
            )
        except (ValueError, KeyError, TypeError) as exc:
            # One unreadable row must never hide the worklist or this study: list it at the highest level it
            # could have (a study is never demoted by an error), with the reason, and log its UID.
            log.error("study %s: priority could not be computed (%s); listed at stat", study.study_uid, exc)
            reason = PriorityReason(PRIORITY_ERROR, f"priority could not be computed ({exc}); listed at stat",
                                    PriorityLevel.STAT)  # fmt: skip
            # Scored as a stat study that has waited since it arrived, as the SQL order places it.
            try:
                waited_min = max(0.0, (now - require_utc(study.received_at, "received_at")).total_seconds() / 60)
            except (ValueError, TypeError):
                waited_min = 0.0
            return Priority(PriorityLevel.STAT, score_of(PriorityLevel.STAT, waited_min), (reason,))

    def _queue_order(self, study: Study, priority: Priority) -> QueueOrder:
        if any(r.code == PRIORITY_ERROR for r in priority.reasons):
            return QueueOrder(PriorityLevel.STAT, None, None)
        return queue_order(base_level(priority), study.received_at, self._policy_of(study)[0], study.modality or "")

    def _refresh_priority(self, study: Study, now: datetime) -> None:
        """Store the priority at `now` and the clock-independent columns the worklist query orders by.

        Called by every write that changes what the policy looks at (instances, AI status and findings).
        """
        priority = self._priority(study, now)
        study.priority_level = priority.level.value
        study.priority_reasons = priority_to_dict(priority)["reasons"]
        study.ai_flagged = any(f.flagged and not f.shadow for f in _readable_findings(study.findings, study.study_uid))
        order = self._queue_order(study, priority)
        study.priority_base_rank = order.base.rank
        study.priority_target_min = order.target_min
        study.priority_promote_at = order.promote_at
        study.priority_quick_read_min = order.quick_read_min
        study.received_us = epoch_us(study.received_at)
        study.priority_policy = self.sites.fingerprint_for(self.rules_site(study.site, study.site_match))

    def _clinical_priority(self, meta: InstanceMeta) -> tuple[PriorityLevel, str]:
        note = ""
        if meta.requested_priority.strip():
            try:
                return PriorityLevel.parse(meta.requested_priority), "from request"
            except ValueError:
                # An unreadable request priority must not lose the instance; fall back and say so.
                note = f"; request priority {meta.requested_priority!r} not recognised"
        ae = meta.calling_ae.strip()
        if ae in self.sender_priority:
            return self.sender_priority[ae], f"from sending AE {ae}{note}"
        return PriorityLevel.ROUTINE, f"default{note}"

    def rules_site(self, site: str, site_match: str | None) -> str:
        """The name a study's site rules (priority policy, models allowed, model states) are looked up under.

        A study recognised as a registered site: that site. A sender no site claims: its Institution Name, unless
        a registered site bears that name, since that site's contract was not agreed for this sender ("": the
        service default).
        """
        if site_match or not site:
            return site
        return "" if self.sites.find(site) is not None else site

    def _policy_of(self, study: Study) -> tuple[PrioritySettings, str]:
        """The priority policy a study is scored with, and whose rules they are (`Sites.policy_for`)."""
        return self.sites.policy_for(self.rules_site(study.site, study.site_match))

    def site_record(self, site: str, site_match: str | None) -> Site | None:
        """The registered site a study was recognised as (its `site` and `site_match`), or None for a sender no
        site claims."""
        return self.sites.find(site) if site_match else None

    def _site_of(self, calling_ae: str, institution: str) -> tuple[str, str]:
        """(site, how recognised): a registered site, else the Institution Name with no match."""
        found = self.sites.recognise(calling_ae or "", institution or "")
        if found is None:
            return (institution or "").strip(), ""
        return found

    def save_site(self, site: Site, user: str, now: datetime, *, create: bool | None = None) -> tuple[int, int]:
        """Add or replace a site record (audited), then recognise and rescore open studies (`apply_sites`)."""
        self.sites.save(site, user, now, create=create)
        return self.apply_sites(now)

    def update_site(self, name: str, changes: dict[str, Any], user: str, now: datetime) -> tuple[Site, int, int]:
        """Change some of a site's fields (audited), then recognise and rescore open studies."""
        site = self.sites.update(name, changes, user, now)
        return (site, *self.apply_sites(now))

    def remove_site(self, name: str, user: str, now: datetime) -> tuple[int, int]:
        """Delete a site (audited); its open studies fall back to the default policy, shown to readers per
        `reading.unregistered_visible`."""
        self.sites.remove(name, user, now)
        return self.apply_sites(now)

    def apply_sites(self, now: datetime | None = None) -> tuple[int, int]:
        """Bring open studies in line with the site records after a change: recognise their site again (a new
        site's AE title claims the studies it already sent) and rescore them with their site's rules.

        An AI finding never lowers a study here either: the policy only ever raises from the clinical floor.

        Returns:
            (studies whose site changed, studies rescored).
        """
        now = require_utc(now, "now") if now is not None else datetime.now(UTC)
        self.sites.invalidate()
        moved = 0
        last = ""
        while True:
            with self._write() as session, session.begin():
                studies = (
                    session.execute(
                        select(Study)
                        .where(Study.reported_at.is_(None), Study.study_uid > last)
                        .order_by(Study.study_uid)
                        .limit(_RESCORE_BATCH)
                    )
                    .scalars()
                    .all()
                )
                for study in studies:
                    site, match = self._site_of(study.sending_ae, study.institution or "")
                    if (site, match) != (study.site, study.site_match or ""):
                        self._history(session, study.study_uid, "site-changed", now,
                                      site_from=study.site, site_to=site, match=match)  # fmt: skip
                        study.site, study.site_match = site, match
                        self._refresh_priority(study, now)
                        moved += 1
            if not studies:
                break
            last = studies[-1].study_uid
        return moved, self.rescore_studies(now)

    def _item(self, study: Study, now: datetime) -> WorklistItem:
        priority = self._priority(study, now)
        wait = turnaround(base_level(priority), study.received_at, now, self._policy_of(study)[0])
        site = self.site_record(study.site, study.site_match)
        return WorklistItem(
            study_uid=study.study_uid,
            accession_number=study.accession_number,
            modality=study.modality,
            study_description=study.study_description,
            site=study.site,
            sending_ae=study.sending_ae,
            received_at=study.received_at,
            last_instance_at=study.last_instance_at,
            institution=study.institution or "",
            site_match=study.site_match or "",
            study_date=study.study_date or "",
            study_time=study.study_time or "",
            indication=study.indication or "",
            ai_flagged=bool(study.ai_flagged),
            site_time_zone=site.time_zone if site is not None else "UTC",
            turnaround_target_min=wait.target_min,
            instance_count=study.instance_count,
            waiting_min=wait.waiting_min,
            turnaround_left_min=wait.left_min,
            clinical_priority=study.clinical_priority,
            ai_status=study.ai_status,
            ai_reason=study.ai_reason,
            priority=priority,
            findings=_readable_findings(study.findings, study.study_uid),
            claimed_by=study.claimed_by,
            claimed_at=study.claimed_at,
            reported=study.reported_at is not None,
            reported_by=study.reported_by,
            reported_at=study.reported_at,
        )

    # -------------------------------------------------------------------------------------- ingestion

    def record_instance(self, meta: InstanceMeta, received_at: datetime) -> bool:
        """Index one received instance, creating or updating its study and series.

        Safe to call from several threads and processes at once: the unique SOP Instance UID decides
        duplicates, studies and series are inserted with ON CONFLICT DO NOTHING, counters are updated in SQL.
        An instance arriving after the study's analysis has started or finished bumps the analysis generation
        so the study is analysed again; a new study starts with AI status pending.

        Args:
            meta: What the store indexed about the instance (no patient names or birth dates); `meta.key` is
                its store key.
            received_at: When it arrived (timezone-aware).

        Returns:
            False when that SOP Instance UID was already indexed (nothing changes), True otherwise.

        Raises:
            ValueError: when `received_at` is naive or a UID is empty.
        """
        (is_new,) = self.record_instances([(meta, received_at)])
        return is_new

    def record_instances(self, batch: Sequence[tuple[InstanceMeta, datetime]]) -> list[bool]:
        """Index several received instances in one transaction (the store's group commit), as `record_instance`
        does for each; all or none are recorded.

        The work is done per study, not per instance: one study row, one row per series and one multi-row
        instance insert, whatever the number of the study's instances in the batch. Studies are recorded in UID
        order, so that concurrent batches (several ingest processes) lock study rows in the same order and do
        not deadlock.

        Returns:
            For each instance, in the order given: False when its SOP Instance UID was already indexed (or
            appears earlier in the same batch).

        Raises:
            ValueError: when a `received_at` is naive or a UID is empty (nothing is recorded then).
        """
        by_study: dict[str, list[tuple[int, InstanceMeta, datetime]]] = {}
        seen: set[str] = set()
        results = [False] * len(batch)
        for position, (meta, received_at) in enumerate(batch):
            now = require_utc(received_at, "received_at")
            for name in ("study_uid", "series_uid", "sop_instance_uid"):
                if not getattr(meta, name).strip():
                    raise ValueError(f"instance {meta.sop_instance_uid!r} has an empty {name}")
            if meta.sop_instance_uid in seen:
                continue  # a second copy in the same batch: a duplicate
            seen.add(meta.sop_instance_uid)
            by_study.setdefault(meta.study_uid, []).append((position, meta, now))
        published: list[tuple[str, bool]] = []
        with self._write() as session, session.begin():
            for study_uid in sorted(by_study):
                entries = by_study[study_uid]
                new, created = self._record_study(session, study_uid, [(m, t) for _, m, t in entries])
                for position, meta, _ in entries:
                    results[position] = meta.sop_instance_uid in new
                if new:
                    published.append((study_uid, created))
        for study_uid, created in published:
            self._publish(study_uid, "created" if created else "instance")
        return results

    def _record_study(
        self, session: Session, study_uid: str, entries: list[tuple[InstanceMeta, datetime]]
    ) -> tuple[set[str], bool]:
        """Record instances of one study inside the caller's transaction (Core statements where the ORM's
        bookkeeping would only cost time; the study row through the ORM, for the priority policy).

        Returns:
            (the SOP Instance UIDs that were new, whether the study was created).
        """
        first, first_at = entries[0]
        clinical, source = self._clinical_priority(first)
        modality = first.modality.strip().upper()
        site, site_match = self._site_of(first.calling_ae, first.institution)
        studies, series_table, instances = (
            typing_cast(Table, t) for t in (Study.__table__, Series.__table__, Instance.__table__)
        )
        created = (
            session.execute(
                self._upsert(studies)
                .values(
                    study_uid=study_uid,
                    accession_number=first.accession_number,
                    patient_hash=first.patient_hash,
                    modality=modality,
                    study_description=first.study_description,
                    study_date=first.study_date,
                    study_time=first.study_time,
                    indication=first.indication,
                    site=site,
                    institution=first.institution,
                    site_match=site_match,
                    sending_ae=first.calling_ae,
                    received_at=first_at,
                    last_instance_at=first_at,
                    instance_count=0,
                    clinical_priority=clinical.value,
                    clinical_priority_source=source,
                    ai_status=AIStatus.PENDING.value,
                    ai_reason="",
                    analysis_generation=1,
                    analysing_generation=0,
                    analysed_generation=0,
                    findings=[],
                    routing=[],
                    priority_level=clinical.value,
                    priority_reasons=[],
                )
                .on_conflict_do_nothing(index_elements=["study_uid"])
                .returning(studies.c.study_uid)
            ).first()
            is not None
        )
        # Lock the study row before anything references it, so the read-modify-write below is not racing (FOR NO
        # KEY UPDATE on PostgreSQL: it does not conflict with the key-share locks the foreign keys of concurrent
        # instance inserts take; SQLite's BEGIN IMMEDIATE serialises writers). Read afresh: another batch may
        # have changed it since this session last saw it.
        study = session.execute(
            select(Study)
            .where(Study.study_uid == study_uid)
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        ).scalar_one()
        by_series: dict[str, InstanceMeta] = {}
        for meta, _ in entries:
            by_series.setdefault(meta.series_uid, meta)
        session.execute(
            self._upsert(series_table).on_conflict_do_nothing(index_elements=["series_uid"]),
            [
                {
                    "series_uid": series_uid,
                    "study_uid": study_uid,
                    "modality": meta.modality.strip().upper(),
                    "sop_class_uid": meta.sop_class_uid,
                    "description": meta.series_description,
                    "n_instances": 0,
                    "attributes": {
                        "Modality": meta.modality.strip().upper(),
                        "SOPClassUID": meta.sop_class_uid,
                        "SeriesDescription": meta.series_description,
                        "BodyPartExamined": meta.body_part,
                        "StudyDescription": meta.study_description,
                    },
                }
                for series_uid, meta in by_series.items()
            ],
        )
        # The unique SOP Instance UID is the duplicate check: a resend inserts nothing, and changes nothing (its
        # study and series rows exist already, so the two inserts above did nothing either).
        new = {
            row[0]
            for row in session.execute(
                self._upsert(instances)
                .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                .returning(instances.c.sop_instance_uid),
                [
                    {
                        "sop_instance_uid": meta.sop_instance_uid,
                        "series_uid": meta.series_uid,
                        "study_uid": study_uid,
                        "sop_class_uid": meta.sop_class_uid,
                        "store_key": meta.key,
                        "transfer_syntax": meta.transfer_syntax_uid,
                        "received_at": now,
                    }
                    for meta, now in entries
                ],
            )
        }
        if not new:
            return new, False
        added = [(meta, now) for meta, now in entries if meta.sop_instance_uid in new]
        per_series: dict[str, int] = {}
        for meta, _ in added:
            per_series[meta.series_uid] = per_series.get(meta.series_uid, 0) + 1
        for series_uid, count in per_series.items():
            session.execute(
                update(series_table)
                .where(series_table.c.series_uid == series_uid)
                .values(n_instances=series_table.c.n_instances + count)
            )
        latest = max(now for _, now in added)
        study.instance_count = int(study.instance_count or 0) + len(added)
        if study.last_instance_at is None or study.last_instance_at < latest:
            study.last_instance_at = latest
        # An analysis that has started or finished did not see these instances: queue a new one.
        if study.analysing_generation >= study.analysis_generation or (
            study.analysed_generation >= study.analysis_generation
        ):
            study.analysis_generation += 1
        for meta, _ in added:
            clinical, source = self._clinical_priority(meta)
            self._merge_instance(study, meta, meta.modality.strip().upper(), clinical, source)
        if not study.site_match:
            # A study of an unregistered sender so far: a later instance may carry what recognises its site.
            study.site, study.site_match = self._site_of(study.sending_ae, study.institution)
        if study.ai_status in _FINISHED and study.analysis_generation > study.analysed_generation:
            study.ai_status = AIStatus.PENDING.value
            study.ai_reason = "new instances arrived; re-analysis queued"
        self._refresh_priority(study, latest)
        if created:
            self._history(session, study_uid, "received", first_at, sending_ae=first.calling_ae)
            self._join_waiting_orders(session, study, latest)
        return new, created

    @staticmethod
    def _merge_instance(study: Study, meta: InstanceMeta, modality: str, clinical: PriorityLevel, source: str) -> None:
        if modality and modality not in _modalities(study.modality):
            study.modality = MODALITY_SEPARATOR.join(sorted({*_modalities(study.modality), modality}))
        for column, value in (
            ("accession_number", meta.accession_number),
            ("patient_hash", meta.patient_hash),
            ("study_description", meta.study_description),
            ("study_date", meta.study_date),
            ("study_time", meta.study_time),
            ("indication", meta.indication),
            ("site", meta.institution),
            ("institution", meta.institution),
            ("sending_ae", meta.calling_ae),
        ):
            if value and not getattr(study, column):
                setattr(study, column, value)
        # A later instance may carry a higher request priority; clinical priority never goes down.
        if clinical.rank > PriorityLevel(study.clinical_priority).rank:
            study.clinical_priority = clinical.value
            study.clinical_priority_source = source

    # --------------------------------------------------------------------------------------- analysis

    def studies_ready(self, stable_age_s: float, now: datetime, max_wait_s: float | None = None) -> list[str]:
        """Studies complete (no instance for `stable_age_s`) with a generation not yet analysed: clinically stat
        first, then urgent, then routine, oldest first within each.

        A study being analysed at its current generation is left out; one whose analysis is running on an
        older generation (instances arrived since) is included, and that older result will be discarded.
        With `max_wait_s`, a study that keeps growing is not starved: one never analysed whose first instance
        arrived more than `max_wait_s` ago is ready even while instances still arrive (later instances then
        trigger a re-analysis that supersedes this one).
        """
        now = require_utc(now, "now")
        with self._read() as session:
            return [row[0] for row in session.execute(self._ready_query(stable_age_s, now, max_wait_s))]

    @staticmethod
    def _ready_query(stable_age_s: float, now: datetime, max_wait_s: float | None) -> Any:
        cutoff = now - timedelta(seconds=float(stable_age_s))
        complete = Study.last_instance_at <= cutoff
        if max_wait_s is not None:
            overdue = and_(Study.analysed_generation == 0, Study.received_at <= now - timedelta(seconds=max_wait_s))
            complete = or_(complete, overdue)
        return (
            select(Study.study_uid)
            .where(
                complete,
                Study.analysis_generation > Study.analysed_generation,
                Study.analysing_generation < Study.analysis_generation,
                # A transient failure is retried after its backoff, not at once.
                or_(Study.retry_at.is_(None), Study.retry_at <= now),
            )
            # Stat studies are analysed first, then urgent, then routine; oldest first within a level.
            .order_by(
                case(
                    (Study.clinical_priority == PriorityLevel.STAT.value, 0),
                    (Study.clinical_priority == PriorityLevel.URGENT.value, 1),
                    else_=2,
                ),
                Study.received_at,
                Study.study_uid,
            )
        )

    def series_of(self, study_uid: str) -> list[SeriesInfo]:
        """The study's series with their instances (store keys in arrival order) and routing attributes.

        Raises:
            NotFoundError: when the study is not on the worklist.
        """
        with self._read() as session:
            if session.get(Study, study_uid) is None:
                raise NotFoundError(f"study {study_uid!r} is not on the worklist")
            series_rows = session.execute(
                select(Series).where(Series.study_uid == study_uid).order_by(Series.series_uid)
            ).scalars()
            files: dict[str, list[str]] = {}
            for series_uid, key in session.execute(
                select(Instance.series_uid, Instance.store_key)
                .where(Instance.study_uid == study_uid)
                .order_by(Instance.id)
            ):
                files.setdefault(series_uid, []).append(key)
            return [
                SeriesInfo(
                    series_uid=s.series_uid,
                    modality=s.modality,
                    sop_class_uid=s.sop_class_uid,
                    n_instances=len(files.get(s.series_uid, [])),
                    files=tuple(files.get(s.series_uid, [])),
                    attributes=dict(s.attributes or {}),
                )
                for s in series_rows
            ]

    def begin_analysis(self, study_uid: str, now: datetime, worker: str = "", lease_s: float | None = None) -> int:
        """Mark the study as being analysed and return the generation token to hand to `finish_analysis`.

        A study whose current generation is already analysed is re-analysed at a new generation. The attempt
        is recorded as an analysis run of `worker`; with `lease_s` the run holds a lease that the worker must
        renew (`renew_leases`), else `recover_interrupted` takes the study back.

        Raises:
            NotFoundError: when the study is not on the worklist.
            ConflictError: when an analysis of the current generation is already running.
        """
        now = require_utc(now, "now")
        with self._write() as session, session.begin():
            study = self._locked(session, study_uid)
            generation = self._begin(session, study, now, worker, lease_s)
        self._publish(study_uid, "analysis-started")
        return generation

    def claim_ready(
        self,
        worker: str,
        now: datetime,
        stable_age_s: float,
        limit: int,
        lease_s: float,
        max_wait_s: float | None = None,
    ) -> list[tuple[str, int]]:
        """Claim up to `limit` ready studies (the order of `studies_ready`) for `worker` in one transaction.

        On PostgreSQL the rows are locked with FOR UPDATE SKIP LOCKED, so schedulers claiming at the same
        time take different studies and none waits for another; on SQLite writers are serialised. Each
        claim is an analysis run holding a lease of `lease_s` seconds.

        Returns:
            (study UID, generation) per claimed study.
        """
        now = require_utc(now, "now")
        if limit <= 0:
            return []
        claimed: list[tuple[str, int]] = []
        with self._write() as session, session.begin():
            # A study still analysed at an older generation is taken once that analysis ends, never twice at once.
            query = (
                self._ready_query(stable_age_s, now, max_wait_s)
                .where(Study.ai_status != AIStatus.ANALYSING.value)
                .limit(limit)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(of=Study, skip_locked=True)
            uids = [row[0] for row in session.execute(query)]
            for uid in uids:
                study = self._locked(session, uid)
                claimed.append((uid, self._begin(session, study, now, worker, lease_s)))
        for uid, _ in claimed:
            self._publish(uid, "analysis-started")
        return claimed

    def _begin(self, session: Session, study: Study, now: datetime, worker: str, lease_s: float | None) -> int:
        study_uid = study.study_uid
        running = study.analysing_generation >= study.analysis_generation > study.analysed_generation
        if running and study.ai_status == AIStatus.ANALYSING.value:
            raise ConflictError(
                f"study {study_uid!r} is already being analysed at generation {study.analysis_generation}"
            )
        if study.analysed_generation >= study.analysis_generation:
            study.analysis_generation = study.analysed_generation + 1
        generation = study.analysis_generation
        study.analysing_generation = generation
        study.ai_status = AIStatus.ANALYSING.value
        if not study.analysis_attempts:
            study.ai_reason = ""  # a retry keeps saying why it is one
        study.retry_at = None
        study.analysis_started_at = now
        self._refresh_priority(study, now)
        attempt = int(study.analysis_attempts or 0) + 1
        session.add(
            AnalysisRun(
                study_uid=study_uid,
                generation=generation,
                attempt=attempt,
                status="running",
                worker=worker,
                started_at=now,
                lease_until=None if lease_s is None else now + timedelta(seconds=float(lease_s)),
                reason="",
                stages=[],
            )
        )
        self._history(
            session, study_uid, "analysis-started", now, generation=generation, attempt=attempt, worker=worker
        )
        return generation

    @staticmethod
    def _close_run(
        session: Session,
        study_uid: str,
        generation: int,
        status: str,
        now: datetime,
        reason: str = "",
        stages: Sequence[StageTime | Mapping[str, Any]] | None = None,
    ) -> None:
        """End the running analysis run(s) of `generation` with `status`."""
        runs = session.execute(
            select(AnalysisRun).where(
                AnalysisRun.study_uid == study_uid,
                AnalysisRun.generation == generation,
                AnalysisRun.status == "running",
            )
        ).scalars()
        for run in runs:
            run.status = status
            run.finished_at = now
            run.lease_until = None
            run.reason = reason
            if stages is not None:
                run.stages = [_as_record(StageTime, t, "stage time").model_dump(mode="json") for t in stages]

    def renew_leases(self, worker: str, study_uids: Iterable[str], now: datetime, lease_s: float) -> int:
        """Extend the leases of `worker`'s running analyses of `study_uids` (the ones it is still working on)
        to `now + lease_s`; returns how many were renewed."""
        now = require_utc(now, "now")
        uids = list(study_uids)
        if not uids:
            return 0
        with self._write() as session, session.begin():
            result = session.execute(
                update(AnalysisRun)
                .where(
                    AnalysisRun.worker == worker,
                    AnalysisRun.status == "running",
                    AnalysisRun.study_uid.in_(uids),
                )
                .values(lease_until=now + timedelta(seconds=float(lease_s)))
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def finish_analysis(
        self,
        study_uid: str,
        generation: int,
        findings: Sequence[Finding | Mapping[str, Any]],
        routing: Sequence[RoutingDecision | Mapping[str, Any]],
        ai_status: AIStatus | str,
        reason: str,
        now: datetime,
        failure_kind: str = "",
        stages: Sequence[StageTime | Mapping[str, Any]] | None = None,
    ) -> bool:
        """Store the results of the analysis that `begin_analysis` returned `generation` for.

        `failure_kind` ("transient" or "permanent") says, for a failed analysis, whether it may succeed later:
        transient failures are re-queued by `requeue_transient_failures` once the model can run again.

        If instances arrived after that analysis began, the newer analysis supersedes it and the study stays
        queued (the study is always one row); meanwhile its findings are kept provisionally unless newer ones
        are stored. With `AIStatus.FAILED` the
        study stays on the worklist at its clinical priority, marked as not analysed, with `reason` shown.

        Returns:
            True when the results were stored as the study's analysis, False when they were stale (kept only
            provisionally, or discarded when newer results exist).

        Raises:
            NotFoundError: when the study is not on the worklist.
            ConflictError: when this generation's results were already stored.
            ValueError: when the status is not a finished one, the generation was never issued, or a finding
                or routing decision lacks its fields.
        """
        now = require_utc(now, "now")
        status = _status(ai_status)
        if status not in _FINISHED:
            raise ValueError(f"finish_analysis needs a finished status {[s.value for s in _FINISHED]}, got {status!r}")
        records = [_as_record(Finding, f, "finding") for f in findings] if status is not AIStatus.NOT_APPLICABLE else []
        stored_findings = dump_findings(records)
        stored_routing = dump_routing(routing)
        with self._write() as session, session.begin():
            study = self._locked(session, study_uid)
            if not 1 <= generation <= study.analysis_generation:
                raise ValueError(
                    f"generation {generation!r} of study {study_uid!r} was never issued"
                    f" (current generation {study.analysis_generation})"
                )
            if generation == study.analysed_generation:
                raise ConflictError(
                    f"results of generation {generation} of study {study_uid!r} were already stored"
                    f" (analysed generation {study.analysed_generation})"
                )
            if generation < study.analysis_generation:
                # Instances arrived during this analysis: the newer analysis supersedes it. Until then its
                # findings are the best the study has (a study that keeps growing must still show a bleed),
                # so they are kept provisionally when nothing newer is stored; the study stays queued.
                if generation > study.analysed_generation and status not in (AIStatus.FAILED, AIStatus.NOT_APPLICABLE):
                    study.findings = stored_findings
                    study.routing = stored_routing
                    study.analysed_generation = generation
                    study.analysis_finished_at = now
                    self._refresh_priority(study, now)  # the provisional findings raise the study now
                if study.analysing_generation == generation:
                    study.ai_status = AIStatus.PENDING.value
                    study.ai_reason = f"new instances arrived during analysis {generation}; re-analysis queued"
                    self._refresh_priority(study, now)
                # A bleed found by an analysis that newer instances superseded already raised the study: its alert
                # goes out now, not after the next analysis (which would find the study stat already).
                self._alert(session, study, now)
                self._history(
                    session, study_uid, "analysis-superseded", now, generation=generation, status=status.value
                )
                self._close_run(session, study_uid, generation, "superseded", now, reason, stages)
                stored = False
            else:
                if status not in (AIStatus.FAILED, AIStatus.NOT_APPLICABLE):
                    # A failed re-analysis keeps the findings stored before it: an AI failure never lowers
                    # a priority. Nor does one that ran no model (its model unavailable or turned off meanwhile):
                    # it says nothing new about the images.
                    study.findings = stored_findings
                study.routing = stored_routing
                study.ai_status = status.value
                study.ai_reason = reason
                study.analysed_generation = generation
                study.analysis_finished_at = now
                study.analysis_attempts = 0
                study.retry_at = None
                study.failure_kind = (failure_kind or "permanent") if status is AIStatus.FAILED else ""
                if status is not AIStatus.FAILED:
                    study.auto_requeues = 0
                before = study.priority_level
                self._refresh_priority(study, now)
                self._announce(session, study, before, status, now)
                self._history(
                    session,
                    study_uid,
                    "analysis-finished",
                    now,
                    generation=generation,
                    status=status.value,
                    reason=reason,
                    # What raised (or could raise) the study; a shadow model's flags are not part of its story.
                    flagged=[f.label for f in records if f.flagged and not f.shadow],
                )
                self._close_run(session, study_uid, generation, status.value, now, reason, stages)
                stored = True
        if status is AIStatus.FAILED:
            log.warning("analysis of study %s failed: %s; kept at clinical priority", study_uid, reason)
        self._publish(study_uid, "analysed" if stored else "analysis-superseded")
        return stored

    def _announce(self, session: Session, study: Study, before: str, status: AIStatus, now: datetime) -> None:
        """Write what this analysis tells the outside into the outbox, in the analysis's own transaction: critical
        alerts when an AI finding made the study stat, the AI's preliminary result for the RIS (active models'
        findings only) and, when the priority moved, a notice of it."""
        self._alert(session, study, now)
        site = self.site_record(study.site, study.site_match)
        pacs = self.results_destination(site)
        active = [f for f in _readable_findings(study.findings, study.study_uid) if not f.shadow]
        if pacs and status is AIStatus.DONE and active:
            # The PACS gets the analysis's results (SR, SEG, captures), retried by the outbox while it is down.
            payload = {"generation": study.analysed_generation, "site": study.site}
            enqueue(session, "dicom", pacs, "ai-results", payload, now, study_uid=study.study_uid)
        if not self.hl7_destination or not study.accession_number:
            return
        # The reason for the level (a long wait moves the place in the order, not the level: not the RIS's news).
        reasons = [r for r in study.priority_reasons or [] if r.get("code") != LONG_WAIT]
        reason = str(reasons[-1].get("text", "")) if reasons else ""
        if status is AIStatus.DONE:
            results = [
                {"label": f.label, "flagged": f.flagged, "probability": f.probability, "model": f.model,
                 "model_version": f.model_version, "synthetic": f.synthetic}
                for f in _readable_findings(study.findings, study.study_uid)
                if not f.shadow
            ]  # fmt: skip
            payload = {"accession_number": study.accession_number, "results": results,
                       "priority": study.priority_level, "reason": reason}  # fmt: skip
            enqueue(session, "hl7", self.hl7_destination, "ai-result", payload, now, study_uid=study.study_uid)
        if before and before != study.priority_level:
            payload = {"accession_number": study.accession_number, "previous": before,
                       "current": study.priority_level, "reason": reason}  # fmt: skip
            enqueue(session, "hl7", self.hl7_destination, "priority-change", payload, now, study_uid=study.study_uid)

    def _alert(self, session: Session, study: Study, now: datetime) -> None:
        """Queue a critical alert to each contact of the study's site when an AI finding has just made it stat.
        One alert per finding and contact, ever (the outbox's dedupe key): a re-analysis that flags it again, or a
        second process, tells nobody twice."""
        top = PriorityLevel.STAT.value
        if study.priority_level != top:
            return
        # Once per finding and contact (the dedupe key), whenever an AI finding is what made the study stat.
        raised = [r for r in study.priority_reasons or [] if r.get("code") == AI_FINDING and r.get("level") == top]
        if not raised:
            return
        raising_text = " ".join(str(r.get("text", "")) for r in raised)
        contacts = contacts_for(self.site_record(study.site, study.site_match), self.alert_settings)
        findings = [
            f
            for f in _readable_findings(study.findings, study.study_uid)
            if f.flagged and not f.shadow and f"{f.label} flagged" in raising_text
        ]
        queued = []
        for finding in findings:
            payload = {
                "event": ALERT, "study_uid": study.study_uid, "accession_number": study.accession_number,
                "site": study.site, "modality": study.modality, "study_description": study.study_description,
                "finding": finding.label, "probability": round(finding.probability, 4), "model": finding.model,
                "model_version": finding.model_version, "synthetic": finding.synthetic, "priority": top,
                "reason": str(raised[-1].get("text", "")), "notice": "AI triage aid, not a diagnosis",
            }  # fmt: skip
            for channel, destination in contacts.first:
                key = f"alert:{channel}:{destination}:{study.study_uid}:{finding.model}:{finding.label}"
                if enqueue(session, channel, destination, ALERT, payload, now, study.study_uid, dedupe_key=key):
                    queued.append(f"{channel}:{destination}")
        if queued:
            self._history(session, study.study_uid, "alert-queued", now, to=queued)
            session.add(AuditRow(at=now, user_name="triage", action=ALERT, study_uid=study.study_uid,
                                 detail={"to": queued, "findings": [f.label for f in findings]}))  # fmt: skip

    def escalate_alerts(self, now: datetime) -> list[str]:
        """Tell the escalation contacts about every study alerted more than its site's `escalate_after_min` ago
        that nobody has claimed or reported yet (once per study and contact). Returns the studies escalated."""
        now = require_utc(now, "now")
        since = now - timedelta(days=2)
        escalated: list[str] = []
        with self._write() as session, session.begin():
            first_alerts = session.execute(
                select(OutboxRow.study_uid, func.min(OutboxRow.created_at))
                .where(OutboxRow.kind == ALERT, OutboxRow.created_at >= since)
                .group_by(OutboxRow.study_uid)
            ).all()
            for study_uid, first_at in first_alerts:
                study = session.get(Study, study_uid)
                if study is None or study.reported_at is not None or study.claimed_by is not None:
                    continue
                contacts = contacts_for(self.site_record(study.site, study.site_match), self.alert_settings)
                waited_min = (now - first_at).total_seconds() / 60
                if waited_min < contacts.escalate_after_min or not contacts.escalation:
                    continue
                payload = {
                    "event": ESCALATION, "study_uid": study_uid, "accession_number": study.accession_number,
                    "site": study.site, "modality": study.modality, "study_description": study.study_description,
                    "priority": study.priority_level, "unclaimed_min": round(waited_min, 1),
                    "notice": "AI triage aid, not a diagnosis",
                }  # fmt: skip
                told = [
                    f"{channel}:{destination}"
                    for channel, destination in contacts.escalation
                    if enqueue(
                        session,
                        channel,
                        destination,
                        ESCALATION,
                        payload,
                        now,
                        study_uid,
                        dedupe_key=f"escalate:{channel}:{destination}:{study_uid}",
                    )  # fmt: skip
                ]
                if told:
                    self._history(session, study_uid, "alert-escalated", now, to=told, unclaimed_min=round(waited_min))
                    session.add(AuditRow(at=now, user_name="triage", action=ESCALATION, study_uid=study_uid,
                                         detail={"to": told, "unclaimed_min": round(waited_min)}))  # fmt: skip
                    escalated.append(study_uid)
        return escalated

    def _acknowledge_alerts(self, session: Session, study_uid: str, user: str, now: datetime) -> None:
        """A radiologist's claim acknowledges the study's critical alerts (audited, in the claim's transaction)."""
        alerted = session.execute(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.study_uid == study_uid, OutboxRow.kind == ALERT)
        ).scalar_one()
        if alerted:
            session.add(AuditRow(at=now, user_name=user[:64], action="alert-acknowledged", study_uid=study_uid,
                                 detail={"alerts": int(alerted)}))  # fmt: skip

    def site_of(self, study_uid: str) -> str:
        """The name the study's site rules are looked up under (`rules_site`): its registered site, else its
        Institution Name ("" when its sender named none or named a registered site that did not claim it).

        Raises:
            NotFoundError: when the study is not on the worklist.
        """
        with self._read() as session:
            row = session.execute(select(Study.site, Study.site_match).where(Study.study_uid == study_uid)).first()
            if row is None:
                raise NotFoundError(f"study {study_uid!r} is not on the worklist")
            return self.rules_site(str(row.site or ""), row.site_match)

    def analysis_attempts(self, study_uid: str) -> int:
        """Failed attempts so far at the study's pending generation (0 for a first attempt).

        Raises:
            NotFoundError: when the study is not on the worklist.
        """
        with self._read() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise NotFoundError(f"study {study_uid!r} is not on the worklist")
            return int(study.analysis_attempts or 0)

    def defer_analysis(
        self,
        study_uid: str,
        generation: int,
        reason: str,
        retry_at: datetime,
        now: datetime,
        stages: Sequence[StageTime | Mapping[str, Any]] | None = None,
    ) -> int:
        """Record a transiently failed attempt of `generation` and queue the next one for `retry_at`.

        The study goes back to pending with `reason` shown ("... retrying (2 of 3)"); its findings and priority
        stay as they were: an AI failure never lowers a priority.

        Returns:
            The number of failed attempts recorded so far.

        Raises:
            NotFoundError: when the study is not on the worklist.
        """
        now = require_utc(now, "now")
        retry_at = require_utc(retry_at, "retry_at")
        with self._write() as session, session.begin():
            study = self._locked(session, study_uid)
            study.analysis_attempts = int(study.analysis_attempts or 0) + 1
            attempts = study.analysis_attempts
            if study.analysing_generation == generation:
                study.analysing_generation = study.analysed_generation
                study.ai_status = AIStatus.PENDING.value
                study.ai_reason = reason
                study.retry_at = retry_at
                self._refresh_priority(study, now)
            self._history(
                session, study_uid, "analysis-retry", now, generation=generation, attempt=attempts, reason=reason
            )
            self._close_run(session, study_uid, generation, "retry", now, reason, stages)
        self._publish(study_uid, "analysis-retry")
        return attempts

    def requeue(self, study_uid: str, now: datetime, user: str | None = None, why: str = "") -> None:
        """Queue the study for a fresh analysis now (attempts reset), keeping its findings until new ones exist.

        Raises:
            NotFoundError: when the study is not on the worklist.
            ConflictError: when it is being analysed right now.
        """
        now = require_utc(now, "now")
        with self._write() as session, session.begin():
            study = self._locked(session, study_uid)
            self._requeue(session, study, now, user, why or (f"re-queued by {user}" if user else "re-queued"))
        self._publish(study_uid, "re-queued")

    def _requeue(self, session: Session, study: Study, now: datetime, user: str | None, why: str) -> None:
        if study.ai_status == AIStatus.ANALYSING.value:
            raise ConflictError(f"study {study.study_uid!r} is being analysed now; re-queue it when that ends")
        if study.analysis_generation <= study.analysed_generation:
            study.analysis_generation = study.analysed_generation + 1
        study.analysing_generation = study.analysed_generation
        study.ai_status = AIStatus.PENDING.value
        study.ai_reason = why
        study.analysis_attempts = 0
        study.retry_at = None
        study.failure_kind = ""
        self._refresh_priority(study, now)
        self._history(session, study.study_uid, "requeued", now, user=user, reason=why)

    def failed_studies(self) -> list[str]:
        """UIDs of the studies whose last analysis failed (any reason), oldest first."""
        with self._read() as session:
            rows = session.execute(
                select(Study.study_uid).where(Study.ai_status == AIStatus.FAILED.value).order_by(Study.received_at)
            )
            return [row[0] for row in rows]

    def requeue_transient_failures(
        self, now: datetime, max_auto_requeues: int, models: Iterable[str] = ()
    ) -> list[str]:
        """Re-queue studies whose analysis failed for a transient reason, now that their models can run.

        Each study is re-queued automatically at most `max_auto_requeues` times (a study that always exhausts
        memory must not loop for ever); after that it waits for an admin. With `models`, only studies whose
        routing named one of them are taken.

        Returns:
            The re-queued studies' UIDs.
        """
        now = require_utc(now, "now")
        wanted = set(models)
        with self._write() as session, session.begin():
            studies = (
                session.execute(
                    select(Study)
                    .where(
                        Study.ai_status == AIStatus.FAILED.value,
                        Study.failure_kind == "transient",
                        Study.auto_requeues < max_auto_requeues,
                    )
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            taken = []
            for study in studies:
                routed = {d.model for d in load_routing(study.routing)}
                if wanted and routed and not routed & wanted:
                    continue
                study.auto_requeues = int(study.auto_requeues or 0) + 1
                self._requeue(session, study, now, None, "the model can run again after a transient failure; re-queued")
                taken.append(study.study_uid)
        for uid in taken:
            self._publish(uid, "re-queued")
        if taken:
            log.info("re-queued %d studies that had failed for a transient reason", len(taken))
        return taken

    def recover_interrupted(self, now: datetime, is_dead: Callable[[str, str], bool] | None = None) -> list[str]:
        """Put studies left "analysing" by a process that died back in the queue (status pending).

        A study is taken back when its running analysis holds no lease (a run begun without one), its lease
        ran out (its process stopped renewing it), or `is_dead(worker, study_uid)` says its process is gone or no
        longer runs it (a scheduler restarting on the same host knows its old PID). Studies analysed by live
        processes are left alone, so any scheduler may call this at any time.

        Returns:
            The re-queued studies' UIDs.
        """
        now = require_utc(now, "now")
        with self._write() as session, session.begin():
            candidates = (
                session.execute(select(Study).where(Study.ai_status == AIStatus.ANALYSING.value).with_for_update())
                .scalars()
                .all()
            )
            studies = []
            for study in candidates:
                runs = (
                    session.execute(
                        select(AnalysisRun).where(
                            AnalysisRun.study_uid == study.study_uid,
                            AnalysisRun.generation == study.analysing_generation,
                            AnalysisRun.status == "running",
                        )
                    )
                    .scalars()
                    .all()
                )
                alive = [
                    run
                    for run in runs
                    if run.lease_until is not None
                    and run.lease_until >= now
                    and not (is_dead is not None and is_dead(run.worker, study.study_uid))
                ]
                if alive:
                    continue
                for run in runs:
                    run.status, run.finished_at, run.lease_until = "interrupted", now, None
                    run.reason = "its process stopped before the analysis ended"
                studies.append(study)
            for study in studies:
                study.analysing_generation = study.analysed_generation
                if study.analysis_generation <= study.analysed_generation:
                    study.analysis_generation = study.analysed_generation + 1
                study.ai_status = AIStatus.PENDING.value
                study.ai_reason = "analysis interrupted by a restart; re-queued"
                self._refresh_priority(study, now)
                self._history(session, study.study_uid, "analysis-interrupted", now)
            uids = [s.study_uid for s in studies]
        for uid in uids:
            self._publish(uid, "re-queued")
        if uids:
            log.info("re-queued %d studies interrupted during analysis", len(uids))
        return uids

    # ---------------------------------------------------------------------------------------- reading

    def list_worklist(
        self,
        now: datetime,
        status: str | None = None,
        modality: str | None = None,
        level: str | None = None,
        site: str | None = None,
        accession: str | None = None,
        include_reported: bool = False,
        limit: int | None = None,
        offset: int = 0,
        scope: ReadScope | None = None,
        claimed: bool | None = None,
        flagged: bool | None = None,
    ) -> list[WorklistItem]:
        """Studies on the worklist, highest priority first, with the priority computed for `now`.

        The database filters, orders and pages (the stored queue columns and `_queue_score`); the policy runs
        in Python only for the rows returned, for their reasons. The order is the policy's own: level at
        `now` (waiting promotes), then the fraction of the turnaround target elapsed, then the oldest, then
        the Study Instance UID.

        Args:
            now: The time of the read; waiting time moves priorities (timezone-aware).
            status: Only this AI status (pending, analysing, done, failed, not-applicable).
            modality: Only studies containing this modality (CT, CR, ...).
            level: Only studies at this priority level (routine, urgent, stat).
            site: Only studies from this institution.
            accession: Only the study with this accession number.
            include_reported: Also list studies already reported.
            limit: At most this many studies (None: all).
            offset: Skip this many studies of the order first.
            scope: Only the studies a reader may read (None: all).
            claimed: Only claimed (True) or unclaimed (False) studies; None: both.
            flagged: Only studies with (True) or without (False) a flagged AI finding in use at their site.

        Raises:
            ValueError: when a filter value is not one of the valid ones (quoted with them), or `limit` or
                `offset` is negative.
        """
        now = require_utc(now, "now")
        if limit is not None and limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must not be negative, got limit={limit!r} offset={offset!r}")
        rank, score = self._queue_score(now)
        query = self._filtered(select(Study), rank, status, modality, level, site, accession, include_reported,
                               scope, claimed, flagged)  # fmt: skip
        uid: Any = Study.study_uid
        if self.engine.dialect.name == "postgresql":
            uid = uid.collate("C")  # code point order, as Python compares strings; not the locale's
        query = query.order_by(score.desc(), func.coalesce(Study.received_us, epoch_us(now)), uid)
        if limit is not None:
            query = query.limit(limit)
        if offset:
            query = query.offset(offset)
        with self._read() as session:
            studies = session.execute(query).scalars().all()
        return [self._item(study, now) for study in studies]

    def first_instance_keys(self, study_uids: Sequence[str]) -> dict[str, str]:
        """The store key of each study's first received instance (one query for a page of studies)."""
        if not study_uids:
            return {}
        with self._read() as session:
            first = (
                select(Instance.study_uid, func.min(Instance.id).label("first_id"))
                .where(Instance.study_uid.in_(list(study_uids)))
                .group_by(Instance.study_uid)
                .subquery()
            )
            rows = session.execute(
                select(Instance.study_uid, Instance.store_key).join(first, Instance.id == first.c.first_id)
            ).all()
        return {uid: key for uid, key in rows}

    def count_by_level(
        self,
        now: datetime,
        status: str | None = None,
        modality: str | None = None,
        site: str | None = None,
        include_reported: bool = False,
        scope: ReadScope | None = None,
        claimed: bool | None = None,
        flagged: bool | None = None,
    ) -> dict[str, int]:
        """How many studies of the worklist (same filters as `list_worklist`, any level) are at each level now."""
        now = require_utc(now, "now")
        rank, _ = self._queue_score(now)
        query = self._filtered(select(rank, func.count()).select_from(Study), rank, status, modality, None, site,
                               None, include_reported, scope, claimed, flagged).group_by(rank)  # fmt: skip
        with self._read() as session:
            rows = session.execute(query).all()
        by_rank = {int(r): int(n) for r, n in rows}
        return {lvl.value: by_rank.get(lvl.rank, 0) for lvl in sorted(PriorityLevel, key=lambda lv: -lv.rank)}

    def _filtered(
        self,
        query: Any,
        rank: Any,
        status: str | None,
        modality: str | None,
        level: str | None,
        site: str | None,
        accession: str | None,
        include_reported: bool,
        scope: ReadScope | None,
        claimed: bool | None,
        flagged: bool | None,
    ) -> Any:
        """`query` with the worklist's filters applied (shared by the list and the counts).

        Raises:
            ValueError: when a filter value is not one of the valid ones.
        """
        if status:
            query = query.where(Study.ai_status == _status(status).value)
        if site:
            query = query.where(Study.site == site)
        if accession:
            query = query.where(Study.accession_number == accession)
        if not include_reported:
            query = query.where(Study.reported_at.is_(None))
        allowed = _scope_filter(scope)
        if allowed is not None:
            query = query.where(allowed)
        if claimed is not None:
            query = query.where(Study.claimed_by.is_not(None) if claimed else Study.claimed_by.is_(None))
        if flagged is not None:
            query = query.where(Study.ai_flagged.is_(True) if flagged else Study.ai_flagged.is_not(True))
        wanted_modality = modality.strip().upper() if modality else None
        if wanted_modality:
            # One value of the multi-valued ModalitiesInStudy, not a substring: "C" matches neither CT nor CR.
            escaped = "".join("/" + ch if ch in "/%_" else ch for ch in wanted_modality)
            joined = literal(MODALITY_SEPARATOR) + Study.modality + literal(MODALITY_SEPARATOR)
            query = query.where(joined.like(f"%{MODALITY_SEPARATOR}{escaped}{MODALITY_SEPARATOR}%", escape="/"))
        if level:
            query = query.where(rank == level_of(level).rank)
        return query

    def _queue_score(self, now: datetime) -> tuple[Any, Any]:
        """SQL expressions for a study's level rank and score at `now`, from the stored queue columns.

        The same arithmetic as `compute_priority` (`score_of`) in the same order on IEEE doubles (integer
        microseconds -> seconds -> minutes, plus the head start of the level reached, or the quick-read head
        start where larger below the top level, or the top level's from LONG_WAIT_MIN on), so the score is the
        policy's to the last bit and ties fall to received_at as they do in Python. A study whose columns are not
        computed yet is listed at the top level (never demoted for want of a score).
        """
        now_us = epoch_us(now)
        promoted = and_(Study.priority_promote_at.is_not(None), Study.priority_promote_at <= now)
        rank = func.coalesce(Study.priority_base_rank, _TOP_LEVEL.rank) + case((promoted, 1), else_=0)
        waited_us = literal(now_us, BigInteger) - func.coalesce(Study.received_us, now_us)
        minutes = cast(waited_us, Float) / literal(1e6, Float) / literal(60.0, Float)
        minutes = case((minutes > 0.0, minutes), else_=literal(0.0, Float))
        top_start = literal(HEAD_START_MIN[_TOP_LEVEL], Float)
        quick = func.coalesce(Study.priority_quick_read_min, literal(0.0, Float))
        below_top = []
        for level in PriorityLevel:
            if level is not _TOP_LEVEL:
                own = literal(HEAD_START_MIN[level], Float)
                below_top.append((rank == level.rank, case((quick > own, quick), else_=own)))
        head_start = case((minutes >= literal(LONG_WAIT_MIN, Float), top_start), *below_top, else_=top_start)
        return rank, minutes + head_start

    def rescore_studies(self, now: datetime | None = None) -> int:
        """Recompute the stored priority and queue columns of every study scored under another policy.

        Called when the worklist is built, so a site that changed its policy (or a database just upgraded,
        whose studies have no queue columns yet) orders correctly from the first read; open studies first,
        in batches, each batch in its own transaction.

        Returns:
            How many studies were rescored.
        """
        now = require_utc(now, "now") if now is not None else datetime.now(UTC)
        # Each study is scored with its site's policy (the default one for senders no site claims, whatever their
        # Institution Name: see `rules_site`).
        per_site = self.sites.fingerprints()
        expected: Any = literal(self.sites.default_fingerprint)
        if per_site:
            recognised = and_(Study.site_match.is_not(None), Study.site_match != "")
            whens = [(and_(recognised, Study.site == name), literal(fp)) for name, fp in per_site.items()]
            expected = case(*whens, else_=literal(self.sites.default_fingerprint))
        stale = or_(Study.priority_policy != expected, Study.priority_policy.is_(None))
        done = 0
        for open_only in (True, False):
            while True:
                with self._write() as session, session.begin():
                    query = select(Study).where(stale)
                    if open_only:
                        query = query.where(Study.reported_at.is_(None))
                    if session.get_bind().dialect.name == "postgresql":
                        query = query.with_for_update(skip_locked=True)
                    studies = session.execute(query.limit(_RESCORE_BATCH)).scalars().all()
                    for study in studies:
                        self._refresh_priority(study, now)
                if not studies:
                    break
                done += len(studies)
        if done:
            log.info("rescored %d studies for the current priority policy", done)
        return done

    def worklist_facets(self) -> tuple[list[str], list[str]]:
        """The modalities and the sites of every study (for the worklist's filter menus), each sorted."""
        with self._read() as session:
            joined = session.execute(select(Study.modality).distinct()).scalars().all()
            sites = session.execute(select(Study.site).distinct().where(Study.site != "")).scalars().all()
        modalities = sorted({m for value in joined for m in _modalities(value or "")})
        return modalities, sorted(s for s in sites if s)

    def get_study(self, study_uid: str, now: datetime) -> StudyDetail:
        """One study with its series, the routing decision per series and its history.

        Raises:
            NotFoundError: when the study is not on the worklist.
        """
        now = require_utc(now, "now")
        with self._read() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise NotFoundError(f"study {study_uid!r} is not on the worklist")
            series_rows = session.execute(
                select(Series).where(Series.study_uid == study_uid).order_by(Series.series_uid)
            ).scalars()
            events = session.execute(
                select(StudyEvent).where(StudyEvent.study_uid == study_uid).order_by(StudyEvent.id)
            ).scalars()
            routing = {d.series_uid: d for d in load_routing(study.routing)}
            series = [
                SeriesDetail(
                    series_uid=s.series_uid,
                    modality=s.modality,
                    description=s.description,
                    n_instances=s.n_instances,
                    attributes=dict(s.attributes or {}),
                    routing=routing.get(s.series_uid),
                )
                for s in series_rows
            ]
            history = [HistoryEntry(at=e.at, kind=e.kind, user=e.user, detail=dict(e.detail or {})) for e in events]
            communications = [_communication(h.user or "", h.at, h.detail) for h in history if h.kind == COMMUNICATED]
            runs = session.execute(
                select(AnalysisRun).where(AnalysisRun.study_uid == study_uid).order_by(AnalysisRun.id)
            ).scalars()
            analyses = [
                AnalysisRunRecord(
                    id=r.id,
                    generation=r.generation,
                    attempt=r.attempt,
                    status=r.status,
                    worker=r.worker,
                    started_at=r.started_at,
                    finished_at=r.finished_at,
                    reason=r.reason,
                    stages=_stage_times(r.stages),
                )
                for r in runs
            ]
            return StudyDetail(
                **dict(self._item(study, now)),
                series=series,
                analysis_generation=study.analysis_generation,
                analysed_generation=study.analysed_generation,
                analysis_started_at=study.analysis_started_at,
                analysis_finished_at=study.analysis_finished_at,
                history=history,
                analyses=analyses,
                analysis_attempts=study.analysis_attempts or 0,
                retry_at=study.retry_at,
                failure_kind=study.failure_kind or "",
                communications=communications,
            )

    # ------------------------------------------------------------------------------------- reporting

    def check_scope(self, study_uid: str, scope: ReadScope | None) -> None:
        """Raises: NotFoundError when there is no such study; NotPermittedError when `scope` does not cover it."""
        if scope is None:
            with self._read() as session:
                if session.get(Study, study_uid) is None:
                    raise NotFoundError(f"study {study_uid!r} is not on the worklist")
            return
        with self._read() as session:
            row = session.execute(select(Study.site, Study.site_match).where(Study.study_uid == study_uid)).first()
        if row is None:
            raise NotFoundError(f"study {study_uid!r} is not on the worklist")
        site, match = row
        if not scope.allows(site, bool(match)):
            what = f"site {site!r}" if match else "a sender no registered site claims"
            raise NotPermittedError(f"study {study_uid!r} is from {what}; {scope.describe()}")

    def claim(self, study_uid: str, user: str, now: datetime, scope: ReadScope | None = None) -> None:
        """`user` takes the study to report it (claiming one's own claim again is allowed).

        Raises:
            NotFoundError: when the study is not on the worklist.
            NotPermittedError: when `scope` (the user's privileges) does not cover the study's site.
            ConflictError: when someone else has claimed it, or it is already reported.
        """
        now = require_utc(now, "now")
        user = _user(user)
        self.check_scope(study_uid, scope)
        with self._write() as session, session.begin():
            study = self._locked(session, study_uid)
            if study.reported_at is not None:
                raise ConflictError(f"study {study_uid!r} was already reported by {study.reported_by!r}")
            if study.claimed_by not in (None, user):
                raise ConflictError(f"study {study_uid!r} is claimed by {study.claimed_by!r}, not {user!r}")
            if study.claimed_by == user:
                study.claim_active_at = now
                return
            study.claimed_by = user
            study.claimed_at = now
            study.claim_active_at = now
            self._history(session, study_uid, "claimed", now, user=user)
            self._acknowledge_alerts(session, study_uid, user, now)
        self._publish(study_uid, "claimed")

    def next_study(self, user: str, now: datetime, scope: ReadScope | None = None) -> WorklistItem | None:
        """Claim for `user` the highest-priority unclaimed open study they may read, in one transaction.

        Two readers asking at once get different studies: on PostgreSQL the candidate row is locked with
        FOR UPDATE SKIP LOCKED (a row another transaction is claiming is skipped, not waited for); on SQLite
        the write transaction (BEGIN IMMEDIATE) serialises them.

        Returns:
            The claimed study as the worklist shows it, or None when nothing is left for this reader.
        """
        now = require_utc(now, "now")
        user = _user(user)
        _, score = self._queue_score(now)
        query = select(Study).where(Study.reported_at.is_(None), Study.claimed_by.is_(None))
        allowed = _scope_filter(scope)
        if allowed is not None:
            query = query.where(allowed)
        uid: Any = Study.study_uid
        if self.engine.dialect.name == "postgresql":
            uid = uid.collate("C")
        query = query.order_by(score.desc(), func.coalesce(Study.received_us, epoch_us(now)), uid).limit(1)
        if self.engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        with self._write() as session, session.begin():
            study = session.execute(query).scalars().first()
            if study is None:
                return None
            study.claimed_by = user
            study.claimed_at = now
            study.claim_active_at = now
            self._history(session, study.study_uid, "claimed", now, user=user, via="next study")
            self._acknowledge_alerts(session, study.study_uid, user, now)
        item = self._item(study, now)
        self._publish(item.study_uid, "claimed")
        return item

    def touch_claim(self, study_uid: str, user: str, now: datetime) -> None:
        """The claimant is working on the study (opened it): its claim is not idle."""
        with self._write() as session, session.begin():
            session.execute(
                update(Study)
                .where(Study.study_uid == study_uid, Study.claimed_by == user)
                .values(claim_active_at=require_utc(now, "now"))
            )

    def release_idle_claims(self, now: datetime, default_idle_min: float) -> list[str]:
        """Give back every claim idle for longer than its site's `claim_idle_min` (`default_idle_min` for
        unregistered senders), with a note in the study's history. A claim is idle from the last time its
        claimant claimed or opened the study.

        Returns:
            The Study Instance UIDs released.
        """
        now = require_utc(now, "now")
        released: list[str] = []
        with self._write() as session, session.begin():
            studies = (
                session.execute(
                    select(Study).where(Study.reported_at.is_(None), Study.claimed_by.is_not(None)).with_for_update()
                )
                .scalars()
                .all()
            )
            for study in studies:
                site = self.site_record(study.site, study.site_match)
                limit_min = site.claim_idle_min if site is not None else default_idle_min
                active = study.claim_active_at or study.claimed_at or now
                idle_min = (now - active).total_seconds() / 60
                if idle_min <= limit_min:
                    continue
                who = study.claimed_by
                setting = f"site {site.name}'s claim_idle_min" if site is not None else "reading.claim_idle_min"
                note = f"claim by {who} idle {idle_min:.0f} min, over the {limit_min:g} min limit ({setting})"
                study.claimed_by = None
                study.claimed_at = None
                study.claim_active_at = None
                self._history(session, study.study_uid, "released", now, user=None, claimed_by=who, note=note)
                released.append(study.study_uid)
        for uid in released:
            self._publish(uid, "released")
        return released

    def release(self, study_uid: str, user: str, is_admin: bool = False, now: datetime | None = None) -> None:
        """Give the study back to the worklist. Only the claimant or an admin may release a claim.

        Raises:
            NotFoundError: when the study is not on the worklist.
            ConflictError: when someone else holds the claim and `user` is not an admin.
        """
        user = _user(user)
        with self._write() as session, session.begin():
            study = self._locked(session, study_uid)
            if study.claimed_by is None:
                return
            if study.claimed_by != user and not is_admin:
                raise ConflictError(
                    f"study {study_uid!r} is claimed by {study.claimed_by!r}; {user!r} cannot release it"
                )
            released_from = study.claimed_by
            study.claimed_by = None
            study.claimed_at = None
            at = require_utc(now, "now") if now is not None else datetime.now(UTC)
            self._history(session, study_uid, "released", at, user=user, claimed_by=released_from)
        self._publish(study_uid, "released")

    def record_communication(
        self, study_uid: str, user: str, recipient: str, method: str, at: datetime, now: datetime, note: str = ""
    ) -> Communication:
        """Record that `user` told `recipient` the study's critical result by `method` at `at`.

        Raises:
            NotFoundError: when the study is not on the worklist.
            ValueError: when the recipient is empty, the method is not one of COMMUNICATION_METHODS or `at` lies
                in the future.
        """
        user = _user(user)
        recipient = " ".join(recipient.split())
        method = method.strip().lower()
        at, now = require_utc(at, "at"), require_utc(now, "now")
        if not recipient:
            raise ValueError("say who was told (name and role, e.g. 'Dr A. Rao, ED consultant')")
        if method not in COMMUNICATION_METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {list(COMMUNICATION_METHODS)}")
        if at > now + timedelta(minutes=1):
            raise ValueError(f"the communication time {at.isoformat()} is in the future")
        detail = {"recipient": recipient, "method": method, "told_at": at.isoformat(), "note": note.strip()}
        with self._write() as session, session.begin():
            self._locked(session, study_uid)
            self._history(session, study_uid, COMMUNICATED, now, user=user, **detail)
        self._publish(study_uid, COMMUNICATED)
        return _communication(user, now, detail)

    def record_order(self, order: ClinicalOrder, now: datetime) -> str | None:
        """Keep an order from the RIS and join it to its study, whichever arrives first.

        Which study: the one with the Study Instance UID the order carries (OMI^O23 IPC-3, ZDS-1), whatever its
        accession number; else the open study with its accession number, within the order's site when its
        ordering or sending facility names a registered site (a reading centre serves hospitals whose RIS number
        their accessions independently). When several open studies would match, none is joined: the order is
        kept with the reason and each of those studies says so in its history, so a reader can tell which it is;
        a wrong join would move another patient's study.

        The order's priority is a floor: it raises the study's clinical priority, never lowers it; its reason for
        the exam becomes the study's indication when the images named none. A cancel (ORC-1 "CA") is recorded in
        the study's history and changes nothing else: a study is never hidden by a message.

        Returns:
            The Study Instance UID it joined, or None when it joined none (no such study is open yet, and it
            joins the study when it arrives; or several matched).

        Raises:
            ValueError: when the order has no accession number or names an unknown priority level.
        """
        now = require_utc(now, "now")
        accession = order.accession_number.strip()
        if not accession:
            raise ValueError("the order has no accession number, so no study can be joined to it")
        if order.priority:
            level_of(order.priority)
        study_instance_uid = order.study_instance_uid.strip()
        with self._write() as session, session.begin():
            row = OrderRow(
                accession_number=accession, message_type=order.message_type, control_id=order.control_id,
                order_control=order.order_control, requested_procedure=order.requested_procedure,
                priority=order.priority, reason=order.reason, ordering_site=order.ordering_site,
                sending_application=order.sending_application, received_at=now, site=self._order_site(order),
                study_instance_uid=study_instance_uid if len(study_instance_uid) <= UID_LEN else "",
            )  # fmt: skip
            session.add(row)
            candidates = self._order_candidates(session, row)
            if len(candidates) > 1:
                of_site = f" of site {row.site}" if row.site else ""
                row.join_note = f"not joined: {len(candidates)} open studies{of_site} have this accession number"
                for study in candidates:
                    self._history(session, study.study_uid, "order-ambiguous", now, message_type=row.message_type,
                                  control_id=row.control_id, studies=len(candidates))  # fmt: skip
                log.warning("HL7 order %s %s: %d open studies share its accession number; joined none",
                            row.message_type, row.control_id, len(candidates))  # fmt: skip
                uids = [study.study_uid for study in candidates]
            elif not candidates:
                return None
            else:
                self._apply_order(session, candidates[0], row, now)
                uids = [candidates[0].study_uid]
        for uid in uids:
            self._publish(uid, "order")
        return uids[0] if len(uids) == 1 else None

    def _order_site(self, order: ClinicalOrder) -> str:
        """The registered site an order is from: its ordering facility (ORC-21), else its sending facility
        (MSH-4), as a site's Institution Names; "" when neither names one."""
        for facility in (order.ordering_site, order.sending_facility):
            found = self.sites.recognise("", facility or "")
            if found is not None:
                return found[0]
        return ""

    def _order_candidates(self, session: Session, row: OrderRow) -> list[Study]:
        """The open studies an order could join now (locked): see `record_order`."""
        query = select(Study).where(Study.reported_at.is_(None)).order_by(Study.received_at).with_for_update()
        if row.study_instance_uid:
            query = query.where(Study.study_uid == row.study_instance_uid)
        else:
            query = query.where(Study.accession_number == row.accession_number)
            if row.site:
                query = query.where(Study.site == row.site, Study.site_match != "")
        return list(session.execute(query.limit(20)).scalars().all())

    def _apply_order(self, session: Session, study: Study, row: OrderRow, now: datetime) -> None:
        """Join one order to its study inside the caller's transaction (see `record_order`)."""
        row.study_uid = study.study_uid
        detail = {"message_type": row.message_type, "control_id": row.control_id, "order_control": row.order_control,
                  "priority": row.priority, "requested_procedure": row.requested_procedure}  # fmt: skip
        if row.order_control.upper() == "CA":
            self._history(session, study.study_uid, "order-cancelled", now, **detail)
            return
        if row.priority and level_of(row.priority).rank > PriorityLevel(study.clinical_priority).rank:
            study.clinical_priority = level_of(row.priority).value
            study.clinical_priority_source = f"from order {row.message_type} {row.control_id}".strip()
        if row.reason and not study.indication:
            study.indication = row.reason
        self._refresh_priority(study, now)
        self._history(session, study.study_uid, "order-joined", now, **detail)

    def _join_waiting_orders(self, session: Session, study: Study, now: datetime) -> None:
        """A new study takes the orders that arrived before it: those naming its Study Instance UID, and those
        naming none with its accession number from its own site (or from no registered site)."""
        same_accession = and_(OrderRow.study_instance_uid == "", OrderRow.accession_number == study.accession_number)
        if study.site_match:
            same_accession = and_(same_accession, or_(OrderRow.site == "", OrderRow.site == study.site))
        else:
            same_accession = and_(same_accession, OrderRow.site == "")
        match = OrderRow.study_instance_uid == study.study_uid
        if study.accession_number:
            match = or_(match, same_accession)
        rows = (
            session.execute(
                select(OrderRow)
                .where(match, OrderRow.study_uid.is_(None), OrderRow.join_note == "")
                .order_by(OrderRow.id)
            )
            .scalars()
            .all()
        )
        for row in rows:
            self._apply_order(session, study, row, now)

    def mark_reported(self, study_uid: str, user: str, now: datetime) -> None:
        """Record that `user` reported the study; it leaves the worklist (unless reported ones are asked for).

        Raises:
            NotFoundError: when the study is not on the worklist.
            ConflictError: when someone else has claimed it or already reported it.
        """
        now = require_utc(now, "now")
        user = _user(user)
        with self._write() as session, session.begin():
            study = self._locked(session, study_uid)
            if study.reported_at is not None:
                if study.reported_by == user:
                    return
                raise ConflictError(f"study {study_uid!r} was already reported by {study.reported_by!r}")
            if study.claimed_by not in (None, user):
                raise ConflictError(f"study {study_uid!r} is claimed by {study.claimed_by!r}, not {user!r}")
            study.reported_by = user
            study.reported_at = now
            study.claimed_by = None
            study.claimed_at = None
            self._history(session, study_uid, "reported", now, user=user)
        self._publish(study_uid, "reported")


def _user(user: str) -> str:
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"user must be a non-empty name, got {user!r}")
    return user.strip()
