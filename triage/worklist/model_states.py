"""Each installed model's state per site (active, shadow, off), kept in the worklist database with its history.

A state nobody has set comes from the card (`triage.models.states.default_state`). Setting one is audited: who,
when, why and, for an activation, the digest and figures of the validation report it rests on. Activation is the
only way a model's flags come to raise priority at a site, and it needs a passing local validation report.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Engine, Float, Integer, String, Text, false, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from triage.config import ModelSettings
from triage.errors import ConflictError, TriageError
from triage.models.card import ModelCard
from triage.models.registry import ModelRegistry, version_key
from triage.models.states import (
    ANY_SITE,
    ModelState,
    SiteState,
    ValidationThresholds,
    default_state,
    report_problems,
    site_label,
)
from triage.worklist.accounts import AuditRow
from triage.worklist.db import WRITE_OPTION
from triage.worklist.tables import Base, Study, UTCDateTime

log = logging.getLogger(__name__)

# Audit actions (the audit log's `action` column).
PROMOTE = "model-promote"
ROLLBACK = "model-rollback"
SET_STATE = "model-state"
SUPERSEDED = "model-superseded"


class ValidationRefused(TriageError):
    """A state change that is not allowed: an activation without a passing validation report, or no such state."""


class ModelStateRow(Base):
    """The state set for one model version at one site ("*": every site without its own)."""

    __tablename__ = "model_states"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(256), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    # The operating point chosen for this site from its validation report; None: the card's threshold.
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What the report behind an activation showed: its sha256, n, AUC, sensitivity, specificity with CIs.
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ModelStateChange(Base):
    """Every change of a model's state at a site, oldest first: what rollback undoes, and the audit trail."""

    __tablename__ = "model_state_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(64))
    site: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Set when a rollback undid this change (a second rollback undoes the change before it).
    undone: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


def figures_at(report: Mapping[str, Any], threshold: float | None, operating_point: str | None) -> dict[str, Any]:
    """The report with its headline figures taken at the chosen operating point.

    Raises:
        ValidationRefused: when the report has no operating point of that name or threshold.
    """
    if threshold is None and operating_point is None:
        return dict(report)
    rows = list(report.get("operating_points") or [])
    if operating_point is not None:
        chosen = [r for r in rows if r.get("name") == operating_point]
    else:
        wanted_t = float(threshold or 0.0)
        chosen = [r for r in rows if r.get("threshold") is not None and abs(float(r["threshold"]) - wanted_t) < 1e-6]
        if not chosen and report.get("threshold") is not None and abs(float(report["threshold"]) - wanted_t) < 1e-6:
            return dict(report)
    if not chosen:
        names = ", ".join(f"{r.get('name')!r} (threshold {r.get('threshold')})" for r in rows) or "none"
        wanted = f"operating point {operating_point!r}" if operating_point is not None else f"threshold {threshold}"
        raise ValidationRefused(f"the report has no figures at {wanted}; its operating points: {names}")
    row = chosen[0]
    keys = ("threshold", "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "ppv", "npv",
            "confusion_matrix")  # fmt: skip
    return {**report, **{key: row.get(key) for key in keys}, "operating_point": row.get("name")}


def report_digest(report: Mapping[str, Any], original: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What is kept of a validation report with a state: the sha256 of the report as given (`original`, else
    `report`) and the figures a reviewer looks at first (at the chosen operating point)."""
    text = json.dumps(original if original is not None else report, sort_keys=True)
    keep = ("model", "version", "site", "finding", "threshold", "operating_point", "n", "n_positive", "roc_auc")
    digest = {key: report.get(key) for key in keep if key in report}
    for key in (
        "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "roc_auc_ci95", "ppv", "npv",
        "prevalence", "prevalence_source", "flag_rate", "confusion_matrix",
    ):  # fmt: skip
        if key in report:
            digest[key] = report[key]
    digest["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return digest


class ModelStates:
    """The states of the installed models per site.

    Args:
        engine: The worklist database's engine, migrated to head.
        registry: The installed models (a state is for an installed version).
        settings: Whether local validation is required before a model raises priority, and the thresholds a
            validation report must meet, per site.
    """

    def __init__(self, engine: Engine, registry: ModelRegistry, settings: ModelSettings | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.settings = settings or ModelSettings()

    @contextmanager
    def _session(self, write: bool = False, model: str | None = None) -> Iterator[Session]:
        """A transaction; a write to `model`'s states takes that model's lock first, so that two changes (two
        versions promoted at once by two admins) are made one after the other and the second sees the first: one
        version active at a site, never two. SQLite's BEGIN IMMEDIATE serialises writes already; PostgreSQL takes
        a transaction-scoped advisory lock on the model's name."""
        engine = self.engine.execution_options(**{WRITE_OPTION: True}) if write else self.engine
        with Session(engine, expire_on_commit=False) as session, session.begin():
            if write and model is not None and session.get_bind().dialect.name == "postgresql":
                digest = hashlib.sha256(f"triage-model-state:{model}".encode()).digest()
                key = int.from_bytes(digest[:8], "big", signed=True)
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield session

    # ------------------------------------------------------------------------------------------------ reading
    def thresholds(self, site: str) -> ValidationThresholds:
        """What a validation report must show for `site` (the site's own, else the service's default)."""
        return self.settings.site_thresholds.get(site, self.settings.validation)

    def _earlier_version(self, session: Session, card: ModelCard) -> str | None:
        """A version of the same model older than `card`'s, installed now or recorded in a state, if any."""
        mine = version_key(card.version)
        versions = {m.card.version for m in self.registry.all() if m.card.name == card.name}
        versions |= set(session.scalars(select(ModelStateRow.version).where(ModelStateRow.model == card.name)))
        older = [v for v in versions if version_key(v) < mine]
        return max(older, key=version_key) if older else None

    def state_of(self, card: ModelCard, site: str) -> SiteState:
        """The state of `card`'s version at `site`: set for the site, else for every site, else from the card."""
        with self._session() as session:
            return self._state_of(session, card, site)

    def _state_of(self, session: Session, card: ModelCard, site: str) -> SiteState:
        rows = {
            row.site: row
            for row in session.scalars(
                select(ModelStateRow).where(
                    ModelStateRow.model == card.name,
                    ModelStateRow.version == card.version,
                    ModelStateRow.site.in_([site, ANY_SITE]),
                )
            )
        }
        row = rows.get(site) or rows.get(ANY_SITE)
        if row is not None:
            return SiteState(
                model=row.model,
                version=row.version,
                site=site,
                state=ModelState.parse(row.state),
                source="site" if row.site == site and site != ANY_SITE else "all-sites",
                reason=row.reason,
                threshold=row.threshold,
                report=row.report,
                changed_by=row.changed_by,
                changed_at=row.changed_at,
            )
        state, reason = default_state(
            card, self._earlier_version(session, card), self.settings.require_local_validation
        )
        return SiteState(card.name, card.version, site, state, "card", reason)

    def states(self, site: str) -> dict[str, SiteState]:
        """The state of each installed model's newest version at `site`, by model name."""
        with self._session() as session:
            return {name: self._state_of(session, self.registry.get(name).card, site) for name in self.registry.names()}

    def versions_at(self, site: str) -> dict[str, list[SiteState]]:
        """Every installed version's state at `site`, per model name, newest version first."""
        out: dict[str, list[SiteState]] = {}
        with self._session() as session:
            for model in self.registry.all():
                out.setdefault(model.card.name, []).append(self._state_of(session, model.card, site))
        for states in out.values():
            states.sort(key=lambda s: version_key(s.version), reverse=True)
        return out

    def plan(self, site: str) -> dict[str, list[SiteState]]:
        """Which versions of each model run for a study of `site`, the primary one first.

        The primary version is the newest active one (its flags raise priority), else the newest in shadow; the
        others that run beside it are shadow versions newer than an active primary (a new version on trial
        against the one in use). Older versions in shadow and versions that are off do not run. A model with no
        version to run is absent (it is off there).
        """
        plan: dict[str, list[SiteState]] = {}
        for name, states in self.versions_at(site).items():
            active = [s for s in states if s.state is ModelState.ACTIVE]
            shadow = [s for s in states if s.state is ModelState.SHADOW]
            if active:
                primary = active[0]
                newer = [s for s in shadow if _newer(s.version, primary.version)]
                plan[name] = [primary, *newer]
            elif shadow:
                plan[name] = [shadow[0]]
        return plan

    def expected_flag_rates(self) -> dict[tuple[str, str, str], float]:
        """Per (model, version, site) activated on a report: the flag rate its report predicts there,
        Se x prevalence + (1 - Sp) x (1 - prevalence) at the site's prevalence given to the evaluation."""
        rates: dict[tuple[str, str, str], float] = {}
        with self._session() as session:
            for row in session.scalars(select(ModelStateRow).where(ModelStateRow.state == ModelState.ACTIVE.value)):
                report = row.report or {}
                se, sp, prevalence = report.get("sensitivity"), report.get("specificity"), report.get("prevalence")
                # Only a prevalence given for the site predicts its live flag rate; a labelled set's own (often
                # half positive) would set off false alerts: then the baseline weeks are the expectation.
                if report.get("prevalence_source") != "given for the site":
                    continue
                if se is not None and sp is not None and prevalence is not None:
                    prevalence = float(prevalence)
                    rates[(row.model, row.version, row.site)] = float(se) * prevalence + (1 - float(sp)) * (
                        1 - prevalence
                    )
        return rates

    def known_sites(self) -> list[str]:
        """The sites studies came from and the sites a state was set for (without "*"), sorted."""
        with self._session() as session:
            sites = set(session.scalars(select(Study.site).distinct()))
            sites |= set(session.scalars(select(ModelStateRow.site).distinct()))
        sites.discard(ANY_SITE)
        return sorted(sites)

    def status(self, sites: Iterable[str] | None = None) -> list[SiteState]:
        """Every installed model version's state at every known site, and at "*" (any other site)."""
        wanted = [ANY_SITE, *(self.known_sites() if sites is None else sites)]
        with self._session() as session:
            return [
                self._state_of(session, model.card, site)
                for model in self.registry.all()
                for site in dict.fromkeys(wanted)
            ]

    def history(self, model: str | None = None, site: str | None = None) -> list[dict[str, Any]]:
        """Every recorded change, oldest first."""
        query = select(ModelStateChange).order_by(ModelStateChange.id)
        if model:
            query = query.where(ModelStateChange.model == model)
        if site is not None:
            query = query.where(ModelStateChange.site == site)
        with self._session() as session:
            return [
                {
                    "model": c.model,
                    "version": c.version,
                    "site": c.site,
                    "action": c.action,
                    "from": c.from_state,
                    "to": c.to_state,
                    "reason": c.reason,
                    "threshold": c.threshold,
                    "report": c.report,
                    "by": c.changed_by,
                    "at": c.changed_at.isoformat(),
                }
                for c in session.scalars(query)
            ]

    # ------------------------------------------------------------------------------------------------ changing
    def _card(self, model: str, version: str | None) -> ModelCard:
        return self.registry.get(model, version).card

    def _write(
        self,
        session: Session,
        card: ModelCard,
        site: str,
        state: ModelState,
        action: str,
        reason: str,
        user: str,
        now: datetime,
        threshold: float | None = None,
        report: dict[str, Any] | None = None,
    ) -> SiteState:
        before = self._state_of(session, card, site)
        row = session.get(ModelStateRow, (card.name, card.version, site))
        if row is None:
            row = ModelStateRow(model=card.name, version=card.version, site=site)
            session.add(row)
        row.state, row.reason, row.threshold, row.report = state.value, reason, threshold, report
        row.changed_by, row.changed_at = user[:64], now
        session.add(
            ModelStateChange(
                model=card.name,
                version=card.version,
                site=site,
                action=action,
                from_state=before.state.value,
                to_state=state.value,
                reason=reason,
                threshold=threshold,
                report=report,
                changed_by=user[:64],
                changed_at=now,
            )
        )
        self._audit(session, user, action, now, card, site, before.state, state, reason, report)
        log.info("model %s: %s -> %s at site %s by %s", card.key, before.state, state, site_label(site), user)
        return SiteState(card.name, card.version, site, state, "site", reason, threshold, report, user, now)

    @staticmethod
    def _audit(
        session: Session,
        user: str,
        action: str,
        now: datetime,
        card: ModelCard,
        site: str,
        before: ModelState,
        after: ModelState,
        reason: str,
        report: Mapping[str, Any] | None,
    ) -> None:
        detail: dict[str, Any] = {"model": card.name, "version": card.version, "site": site}
        detail.update({"from": before.value, "to": after.value, "reason": reason})
        if report:
            detail["report_sha256"] = report.get("sha256")
        session.add(AuditRow(at=now, user_name=user[:64], action=action, study_uid=None, detail=detail))

    def set_state(
        self,
        model: str,
        site: str,
        state: ModelState | str,
        user: str,
        now: datetime,
        reason: str,
        version: str | None = None,
    ) -> SiteState:
        """Put a model in shadow or off at a site (or "*": every site without its own setting).

        Raises:
            ValidationRefused: for `active`: that takes `promote` with a passing validation report.
            NotFoundError: when the model or version is not installed.
        """
        try:
            state = ModelState.parse(str(state))
        except ValueError as exc:
            raise ValidationRefused(str(exc)) from None
        if state is ModelState.ACTIVE:
            raise ValidationRefused(
                f"{model} cannot be set active directly: use `triage models promote {model} --site SITE --report"
                " report.json` with a passing local validation report for that site"
            )
        card = self._card(model, version)
        with self._session(write=True, model=card.name) as session:
            return self._write(session, card, site, state, SET_STATE, reason or f"set {state.value}", user, now)

    def promote(
        self,
        model: str,
        site: str,
        report: Mapping[str, Any],
        user: str,
        now: datetime,
        version: str | None = None,
        threshold: float | None = None,
        operating_point: str | None = None,
    ) -> SiteState:
        """Make a model version active at a site on a passing local validation report for that site.

        The site's thresholds are checked against the report's figures at the operating point chosen: the report's
        own threshold by default, or one of the report's operating points (by name, "sensitivity >= 0.95", or by
        its threshold); a threshold the report has no figures for is refused.

        Args:
            report: `report.json` from `triage models evaluate --site SITE`.
            threshold: The operating point for this site, one of the report's; None: the report's threshold.
            operating_point: The name of one of the report's operating points (instead of `threshold`).

        Raises:
            ValidationRefused: quoting every way the report falls short of the site's thresholds, or when `site`
                is "*" (a report validates a model for one site).
            NotFoundError: when the model or version is not installed.
        """
        card = self._card(model, version)
        if site == ANY_SITE:
            raise ValidationRefused("a model is validated for one site at a time: name the site, not '*'")
        at = figures_at(report, threshold, operating_point)
        problems = report_problems(at, card.name, card.version, site, self.thresholds(site))
        if problems:
            raise ValidationRefused(
                f"{card.key} stays as it is at site {site_label(site)}: the validation report does not pass"
                f" at threshold {at.get('threshold')}: " + "; ".join(problems)
            )
        operating = at.get("threshold")
        kept = report_digest(at, report)
        reason = (
            f"promoted on local validation report {kept['sha256'][:12]} ({kept.get('n')} studies, AUC "
            f"{_fmt(kept.get('roc_auc'))}, sensitivity {_fmt(kept.get('sensitivity'))}, specificity "
            f"{_fmt(kept.get('specificity'))} at threshold {_fmt(operating)})"
        )
        with self._session(write=True, model=card.name) as session:
            # One version of a model is active at a site: the one in use before steps back to shadow (a rollback
            # of this promotion brings it back).
            for other in self.registry.all():
                if other.card.name != card.name or other.card.version == card.version:
                    continue
                if self._state_of(session, other.card, site).state is ModelState.ACTIVE:
                    self._write(
                        session, other.card, site, ModelState.SHADOW, SUPERSEDED,
                        f"superseded by version {card.version} (promoted)", user, now,
                    )  # fmt: skip
            return self._write(
                session,
                card,
                site,
                ModelState.ACTIVE,
                PROMOTE,
                reason,
                user,
                now,
                None if operating is None else float(operating),
                kept,
            )

    def rollback(
        self, model: str, site: str, user: str, now: datetime, version: str | None = None, why: str = ""
    ) -> SiteState:
        """Undo the last change of a model's state at a site (of `version` only, when given): the version goes
        back to the state, operating point and report it had before; undoing a promotion also brings back the
        version it superseded. A version never changed there that is active goes to shadow.

        Raises:
            ConflictError: when there is nothing to undo and the version is not active.
            NotFoundError: when the model or version is not installed.
        """
        card = self._card(model, version)  # checks the model (and version) is installed
        with self._session(write=True, model=card.name) as session:
            query = select(ModelStateChange).where(
                ModelStateChange.model == card.name,
                ModelStateChange.site == site,
                ModelStateChange.action.not_in([ROLLBACK, SUPERSEDED]),
                ModelStateChange.undone.is_(False),
            )
            if version is not None:
                query = query.where(ModelStateChange.version == card.version)
            changes = list(session.scalars(query.order_by(ModelStateChange.id)))
            if not changes:
                current = self._state_of(session, card, site)
                if current.state is not ModelState.ACTIVE:
                    raise ConflictError(
                        f"{card.key} is {current.state.value} at site {site_label(site)} with no change to roll back"
                    )
                return self._write(
                    session, card, site, ModelState.SHADOW, ROLLBACK, _rollback_reason(current.state, why), user, now
                )
            last = changes[-1]
            undone = [last]
            if last.action == PROMOTE:
                undone += list(
                    session.scalars(
                        select(ModelStateChange).where(
                            ModelStateChange.model == card.name,
                            ModelStateChange.site == site,
                            ModelStateChange.action == SUPERSEDED,
                            ModelStateChange.changed_at == last.changed_at,
                            ModelStateChange.undone.is_(False),
                        )
                    )
                )
            result: SiteState | None = None
            for change in undone:
                changed_card = self._card(change.model, change.version)
                current = self._state_of(session, changed_card, site)
                if current.state.value != change.to_state:
                    # Changed again since (superseded, or set off after being superseded): left as it is.
                    if change is last:
                        raise ConflictError(
                            f"{changed_card.key} is {current.state.value} at site {site_label(site)} since a later"
                            f" change; its {change.action} cannot be rolled back"
                        )
                    continue
                change.undone = True
                state = self._undo(session, changed_card, site, change, user, now, why)
                result = result or state
            if result is None:
                raise ConflictError(f"{card.name} at site {site_label(site)}: nothing to roll back")
            return result

    def _undo(
        self, session: Session, card: ModelCard, site: str, change: ModelStateChange, user: str, now: datetime, why: str
    ) -> SiteState:
        """Return a version to where it was before `change`: the setting before it, or (none) the card's default.
        An activation is restored only with a report that still passes the site's thresholds; else shadow."""
        reason = _rollback_reason(ModelState.parse(change.to_state), why)
        earlier = list(
            session.scalars(
                select(ModelStateChange)
                .where(
                    ModelStateChange.model == card.name,
                    ModelStateChange.version == card.version,
                    ModelStateChange.site == site,
                    ModelStateChange.id < change.id,
                    ModelStateChange.action.not_in([ROLLBACK]),
                    ModelStateChange.undone.is_(False),
                )
                .order_by(ModelStateChange.id)
            )
        )
        if not earlier:
            # Nobody had set it before: forget the site's setting, so the card decides again (and with it the
            # service's require_local_validation).
            before = self._state_of(session, card, site)
            row = session.get(ModelStateRow, (card.name, card.version, site))
            if row is not None:
                session.delete(row)
                session.flush()
            after = self._state_of(session, card, site)
            session.add(
                ModelStateChange(
                    model=card.name, version=card.version, site=site, action=ROLLBACK, from_state=before.state.value,
                    to_state=after.state.value, reason=f"{reason}; the card decides again ({after.reason})",
                    changed_by=user[:64], changed_at=now,
                )
            )  # fmt: skip
            self._audit(session, user, ROLLBACK, now, card, site, before.state, after.state, reason, None)
            return after
        target = ModelState.parse(change.from_state)
        restore = next((c for c in reversed(earlier) if c.to_state == target.value), None)
        threshold = restore.threshold if restore is not None else None
        report = restore.report if restore is not None else None
        if target is ModelState.ACTIVE and (
            report is None or report_problems(report, card.name, card.version, site, self.thresholds(site))
        ):
            target, threshold, report = ModelState.SHADOW, None, None
            reason += "; its validation report does not pass the site's thresholds now: shadow"
        elif target is not ModelState.ACTIVE:
            threshold, report = None, None
        return self._write(session, card, site, target, ROLLBACK, reason, user, now, threshold, report)


def _rollback_reason(from_state: ModelState, why: str) -> str:
    return f"rolled back from {from_state.value}" + (f": {why}" if why else "")


def _newer(version: str, than: str) -> bool:
    return version_key(version) > version_key(than)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


__all__ = [
    "PROMOTE",
    "ROLLBACK",
    "SET_STATE",
    "ModelStateChange",
    "ModelStateRow",
    "ModelStates",
    "ValidationRefused",
    "report_digest",
]
