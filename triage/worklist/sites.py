"""Client hospitals (sites) as records: how their studies are recognised, their contract and rules, who may read them.

A reading centre reads for many hospitals at once. Each site says which studies are its own (calling AE titles,
Institution Name, STOW-RS client accounts), its time zone, its turnaround targets per priority level, the level
each flagged finding raises a study to, which models may run on its studies and where results go. Radiologists
hold privileges per site with an expiry date; a study of a registered site is shown only to those who may read
for it today.

Sites and privileges live in the worklist database, so every process (ingest, analysis, HTTP) sees the same
records; each keeps a snapshot for a couple of seconds (`Sites.refresh_s`) instead of reading them per row.
Every change is audited.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import JSON, Date, Engine, String, Text, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from triage.config import PrioritySettings
from triage.errors import ConflictError, NotFoundError, TriageError, validation_problems
from triage.worklist.accounts import AuditRow
from triage.worklist.db import WRITE_OPTION, create_engine_for
from triage.worklist.priority import level_of, policy_fingerprint, validate_settings
from triage.worklist.tables import Base, UTCDateTime

log = logging.getLogger(__name__)

# Audit actions.
SITE_ADD = "site-add"
SITE_CHANGE = "site-change"
SITE_REMOVE = "site-remove"
PRIVILEGE_GRANT = "privilege-grant"
PRIVILEGE_REVOKE = "privilege-revoke"

# The sending "AE title" the STOW-RS route records: "STOW-RS:<account>" names the signed-in client account.
STOW_PREFIX = "STOW-RS:"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 characters, no backslash or controls
_NAME = re.compile(r"^[^\x00-\x1f\\]{1,64}$")


class InvalidSiteError(TriageError):
    """A site record or privilege that cannot be accepted as given (quoted with what would be valid)."""


def _words(value: str) -> str:
    """Institution names compare case- and spacing-insensitively ("St  Mary's" is "ST MARY'S")."""
    return " ".join(value.split()).upper()


class SiteResults(BaseModel):
    """Where a site's AI results go (its PACS, by DICOM C-STORE)."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str
    host: str
    port: int = Field(default=104, ge=1, le=65535)
    # DICOM over TLS to this PACS, with this site's CA and (optionally) our client certificate for it.
    tls: bool = False
    tls_ca: str = ""
    tls_certfile: str = ""
    tls_keyfile: str = ""


class SiteAlerts(BaseModel):
    """A site's own critical-alert contacts (in place of the service's `TRIAGE_ALERTS__*` ones)."""

    model_config = ConfigDict(extra="forbid")

    webhooks: list[str] = Field(default_factory=list)
    emails: list[str] = Field(default_factory=list)
    escalation_webhooks: list[str] = Field(default_factory=list)
    escalation_emails: list[str] = Field(default_factory=list)
    escalate_after_min: float | None = Field(default=None, gt=0)


class Site(BaseModel):
    """One client hospital and its rules.

    Unset rules (None) fall back to the service's default policy (`TRIAGE_PRIORITY__*`), so a site only states
    where its contract differs.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    ae_titles: list[str] = Field(default_factory=list)
    institution_names: list[str] = Field(default_factory=list)
    stow_accounts: list[str] = Field(default_factory=list)
    time_zone: str = "UTC"
    # Turnaround target per priority level in minutes, as the contract states it (levels it omits: the default).
    turnaround_min: dict[str, float] | None = None
    # The level each flagged finding raises a study to, over the default's ("routine": it raises nothing here).
    finding_levels: dict[str, str] | None = None
    promote_at_fraction: float | None = None
    # Models allowed to run on this site's studies; None: every installed model (in its state at this site).
    models: list[str] | None = None
    results: SiteResults | None = None
    alerts: SiteAlerts | None = None
    # A claim nobody touched for this long is released back to the worklist, with a note.
    claim_idle_min: float = Field(default=30.0, gt=0)
    # Quick reads' head start in this site's order, and which modalities are quick reads (None: the default's).
    quick_read_head_start_min: float | None = Field(default=None, ge=0)
    quick_read_modalities: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = " ".join(value.split())
        if not _NAME.match(value):
            raise ValueError(f"site name {value!r} must be 1 to 64 printable characters without a backslash")
        return value

    @field_validator("ae_titles", "stow_accounts")
    @classmethod
    def _titles(cls, values: list[str]) -> list[str]:
        cleaned = sorted({v.strip() for v in values if v.strip()})
        for value in cleaned:
            if not _AE_TITLE.match(value):
                raise ValueError(f"{value!r} is not a valid AE title or account (1 to 16 characters, no backslash)")
        return cleaned

    @field_validator("institution_names")
    @classmethod
    def _institutions(cls, values: list[str]) -> list[str]:
        return sorted({" ".join(v.split()) for v in values if v.strip()})

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            hint = "use an IANA name such as Asia/Kolkata or Europe/London"
            raise ValueError(f"unknown time zone {value!r}; {hint}") from None
        return value

    @model_validator(mode="after")
    def _rules(self) -> Site:
        try:
            validate_settings(self.policy(PrioritySettings()))
        except ValueError as exc:
            raise ValueError(f"site {self.name!r}: {exc}") from None
        if self.turnaround_min is not None:
            self.turnaround_min = {level_of(k).value: float(v) for k, v in self.turnaround_min.items()}
        if self.finding_levels is not None:
            self.finding_levels = {k.strip(): level_of(v).value for k, v in self.finding_levels.items()}
        return self

    def policy(self, default: PrioritySettings) -> PrioritySettings:
        """The site's priority policy: its own rules where it sets them, the service default elsewhere."""
        # The site's own entries over the default's: a contract that names only its stat target keeps the
        # default urgent and routine targets; a finding it gives "routine" raises nothing there.
        update: dict[str, Any] = {
            "finding_levels": {**default.finding_levels, **(self.finding_levels or {})},
            "turnaround_min": {**default.turnaround_min, **(self.turnaround_min or {})},
        }
        for name in ("promote_at_fraction", "quick_read_head_start_min", "quick_read_modalities"):
            if getattr(self, name) is not None:
                update[name] = getattr(self, name)
        return default.model_copy(update=update, deep=True)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


def parse_site(data: dict[str, Any]) -> Site:
    """A site from plain data (CLI, API, database).

    Raises:
        InvalidSiteError: quoting every problem pydantic found.
    """
    try:
        return Site.model_validate(data)
    except ValidationError as exc:
        raise InvalidSiteError(f"invalid site: {validation_problems(exc, 'site')}") from None


class SiteRow(Base):
    """One site record (the pydantic `Site` as JSON: one schema, validated on the way in and out)."""

    __tablename__ = "sites"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_by: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PrivilegeRow(Base):
    """A radiologist's privilege to read a site's studies, until a date (inclusive; None: no expiry)."""

    __tablename__ = "site_privileges"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    until: Mapped[date | None] = mapped_column(Date, nullable=True)
    granted_by: Mapped[str] = mapped_column(Text, default="")
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class Privilege:
    username: str
    site: str
    until: date | None
    granted_by: str
    granted_at: datetime

    def valid_on(self, day: date) -> bool:
        return self.until is None or day <= self.until


@dataclass
class _Snapshot:
    at: float
    sites: dict[str, Site] = field(default_factory=dict)
    by_ae: dict[str, str] = field(default_factory=dict)
    by_institution: dict[str, str] = field(default_factory=dict)
    by_account: dict[str, str] = field(default_factory=dict)


class Sites:
    """The site records and privileges of one worklist database.

    Args:
        engine: The worklist database (migrated).
        default_policy: The service's default priority policy, for studies of unregistered senders and for the
            rules a site does not set.
        refresh_s: How long a snapshot of the records is used before it is read again (other processes' changes
            show within this; this process's own changes at once).
    """

    def __init__(self, engine: Engine, default_policy: PrioritySettings, refresh_s: float = 2.0) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        # Snapshots are read on a connection of their own (not from the worklist's pool): a read may happen in the
        # middle of a write transaction that holds a pooled connection, and a busy pool must not deadlock it. An
        # in-memory SQLite database has its one shared connection only.
        url = engine.url
        memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
        self._reader = engine if memory else create_engine_for(url, poolclass=NullPool)
        # No other process can change an in-memory database: its snapshot is read again only after this process
        # changed the records (`invalidate`), never on a timer, which could fall inside a write transaction on the
        # one shared connection.
        self._memory = memory
        self.default_policy = default_policy
        self.default_fingerprint = policy_fingerprint(default_policy)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None

    # ------------------------------------------------------------------------------------ reading

    def _current(self) -> _Snapshot:
        with self._lock:
            snap = self._snapshot
            if snap is not None and (self._memory or time.monotonic() - snap.at < self.refresh_s):
                return snap
        with Session(self._reader) as session:
            rows = session.execute(select(SiteRow)).scalars().all()
            records = {row.name: row.record for row in rows}
        snap = _Snapshot(at=time.monotonic())
        for name, record in records.items():
            try:
                site = Site.model_validate(record)
            except ValidationError as exc:
                # A record written by another version that this one cannot read: its studies keep the default
                # policy rather than failing every read of the worklist.
                log.error("site %r: stored record not readable (%s); default policy used", name, exc)
                continue
            snap.sites[site.name] = site
            for ae in site.ae_titles:
                snap.by_ae[ae] = site.name
            for institution in site.institution_names:
                snap.by_institution[_words(institution)] = site.name
            for account in site.stow_accounts:
                snap.by_account[account] = site.name
        with self._lock:
            self._snapshot = snap
        return snap

    def close(self) -> None:
        if self._reader is not self.engine:
            self._reader.dispose()

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def all(self) -> list[Site]:
        return sorted(self._current().sites.values(), key=lambda s: s.name.upper())

    def names(self) -> set[str]:
        return set(self._current().sites)

    def get(self, name: str) -> Site:
        """Raises: NotFoundError when no site has this name."""
        site = self._current().sites.get(" ".join(name.split()))
        if site is None:
            raise NotFoundError(f"no site named {name!r}; registered: {sorted(self.names()) or 'none'}")
        return site

    def find(self, name: str) -> Site | None:
        return self._current().sites.get(name)

    def recognise(self, calling_ae: str, institution: str) -> tuple[str, str] | None:
        """The registered site a study belongs to, and by what: (name, "STOW-RS account X" | "AE X" | ...).

        A STOW-RS client account or a calling AE title names one sending system and wins over the Institution
        Name written in the images (which a modality may leave empty or spell as it likes).
        """
        snap = self._current()
        sender = calling_ae.strip()
        if sender.startswith(STOW_PREFIX):
            account = sender.removeprefix(STOW_PREFIX)
            if account in snap.by_account:
                return snap.by_account[account], f"STOW-RS account {account}"
        elif sender in snap.by_ae:
            return snap.by_ae[sender], f"calling AE title {sender}"
        key = _words(institution)
        if key and key in snap.by_institution:
            return snap.by_institution[key], f"Institution Name {institution.strip()}"
        return None

    def policy_for(self, site: str) -> tuple[PrioritySettings, str]:
        """The priority policy for a study of `site`, and whose rules they are (named in every reason)."""
        record = self._current().sites.get(site) if site else None
        if record is None:
            return self.default_policy, ""
        return record.policy(self.default_policy), f"site {record.name}"

    def fingerprint_for(self, site: str) -> str:
        record = self._current().sites.get(site) if site else None
        if record is None:
            return self.default_fingerprint
        return policy_fingerprint(record.policy(self.default_policy))

    def fingerprints(self) -> dict[str, str]:
        """Policy digest per registered site (studies of other sites use `default_fingerprint`)."""
        return {name: policy_fingerprint(s.policy(self.default_policy)) for name, s in self._current().sites.items()}

    # ------------------------------------------------------------------------------------ changing

    def _audit(self, session: Session, actor: str, action: str, now: datetime, **detail: Any) -> None:
        session.add(AuditRow(at=now, user_name=actor[:64], action=action, study_uid=None, detail=detail))

    def _check_unique(self, site: Site, others: Iterable[Site]) -> None:
        for other in others:
            if other.name == site.name:
                continue
            for what, mine, theirs in (
                ("calling AE title", set(site.ae_titles), set(other.ae_titles)),
                ("Institution Name", {_words(i) for i in site.institution_names},
                 {_words(i) for i in other.institution_names}),
                ("STOW-RS account", set(site.stow_accounts), set(other.stow_accounts)),
            ):  # fmt: skip
                shared = sorted(mine & theirs)
                if shared:
                    raise ConflictError(
                        f"{what} {shared[0]!r} already identifies site {other.name!r}; a sender belongs to one site"
                    )

    def save(self, site: Site, user: str, now: datetime, *, create: bool | None = None) -> Site:
        """Add (`create=True`), replace (`False`) or upsert (None) a site record; audited.

        Raises:
            ConflictError: when adding a site that exists, or an AE title, Institution Name or STOW-RS account
                already identifies another site.
            NotFoundError: when replacing a site that does not exist.
        """
        self.invalidate()
        with Session(self._write_engine) as session, session.begin():
            existing = session.get(SiteRow, site.name, with_for_update=True)
            if create is True and existing is not None:
                raise ConflictError(f"site {site.name!r} exists already; change it with `triage sites set`")
            if create is False and existing is None:
                raise NotFoundError(f"no site named {site.name!r}")
            others = [Site.model_validate(r.record) for r in session.execute(select(SiteRow)).scalars()]
            self._check_unique(site, others)
            record = site.model_dump(mode="json")
            if existing is None:
                session.add(SiteRow(name=site.name, record=record, updated_by=user, updated_at=now))
                self._audit(session, user, SITE_ADD, now, site=site.name, record=record)
            else:
                before = existing.record
                existing.record, existing.updated_by, existing.updated_at = record, user, now
                changed = {k: {"from": before.get(k), "to": v} for k, v in record.items() if before.get(k) != v}
                self._audit(session, user, SITE_CHANGE, now, site=site.name, changes=changed)
        self.invalidate()
        log.info("site %s saved by %s", site.name, user)
        return site

    def update(self, name: str, changes: dict[str, Any], user: str, now: datetime) -> Site:
        """Change some fields of a site (the others kept); audited.

        Raises:
            NotFoundError: when no site has this name.
            InvalidSiteError: when the changed record is not valid.
        """
        current = self.get(name)
        data = current.model_dump(mode="json")
        data.update(changes)
        data["name"] = current.name
        return self.save(parse_site(data), user, now, create=False)

    def remove(self, name: str, user: str, now: datetime) -> None:
        """Delete a site and the privileges to read it; its studies keep their site name and get the default policy.

        Raises:
            NotFoundError: when no site has this name.
        """
        site = self.get(name)
        self.invalidate()
        with Session(self._write_engine) as session, session.begin():
            session.execute(delete(PrivilegeRow).where(PrivilegeRow.site == site.name))
            session.execute(delete(SiteRow).where(SiteRow.name == site.name))
            self._audit(session, user, SITE_REMOVE, now, site=site.name)
        self.invalidate()

    # ------------------------------------------------------------------------------------ privileges

    def grant(self, username: str, site: str, until: date | None, by: str, now: datetime) -> Privilege:
        """Let `username` read `site`'s studies until `until` (inclusive; None: no expiry); audited.

        Raises:
            NotFoundError: when no site has this name.
        """
        record = self.get(site)
        with Session(self._write_engine) as session, session.begin():
            row = session.get(PrivilegeRow, (username, record.name), with_for_update=True)
            if row is None:
                row = PrivilegeRow(username=username, site=record.name)
                session.add(row)
            row.until, row.granted_by, row.granted_at = until, by, now
            self._audit(session, by, PRIVILEGE_GRANT, now, user=username, site=record.name,
                        until=until.isoformat() if until else None)  # fmt: skip
        return Privilege(username, record.name, until, by, now)

    def revoke(self, username: str, site: str, by: str, now: datetime) -> bool:
        """Withdraw a privilege; False when there was none. Audited when there was."""
        with Session(self._write_engine) as session, session.begin():
            row = session.get(PrivilegeRow, (username, site), with_for_update=True)
            gone = row is not None
            if row is not None:
                session.delete(row)
            if gone:
                self._audit(session, by, PRIVILEGE_REVOKE, now, user=username, site=site)
        return bool(gone)

    def privileges(self, username: str | None = None) -> list[Privilege]:
        query = select(PrivilegeRow).order_by(PrivilegeRow.username, PrivilegeRow.site)
        if username is not None:
            query = query.where(PrivilegeRow.username == username)
        with Session(self.engine) as session:
            rows = session.execute(query).scalars().all()
        return [Privilege(r.username, r.site, r.until, r.granted_by, r.granted_at) for r in rows]

    def readable_by(self, username: str, today: date) -> set[str]:
        """The registered sites `username` may read on `today` (privilege not expired)."""
        names = self.names()
        return {p.site for p in self.privileges(username) if p.valid_on(today) and p.site in names}


def site_digest(sites: Iterable[Site]) -> str:
    """A short digest of the site records (for logs and the admin page: which rules are in force)."""
    text = json.dumps([s.model_dump(mode="json") for s in sites], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
