"""The site's priority policy: clinical floor, AI findings that raise, waiting time that promotes (pure, no DB)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter

from triage.config import PrioritySettings
from triage.domain import AIStatus, Finding, Priority, PriorityLevel, PriorityReason

# Reason codes: stable identifiers for the reasons below (the UI and tests key on them, the text is for people).
CLINICAL = "clinical"
AI_FINDING = "ai-finding"  # a flagged finding raised the level
AI_FINDING_KEPT = "ai-finding-kept"  # a flagged finding whose site level is not above the current level
AI_FINDING_UNMAPPED = "ai-finding-unmapped"  # a flagged finding the site gave no level to
AI_NEGATIVE = "ai-negative"
AI_SHADOW_ONLY = "ai-shadow-only"  # analysed only by models in shadow at the site: not a negative
AI_FAILED = "ai-failed"
AI_PENDING = "ai-pending"
AI_NOT_APPLICABLE = "ai-not-applicable"
WAITING_PROMOTED = "waiting-promoted"
OVERDUE = "overdue"
LONG_WAIT = "long-wait"  # waited LONG_WAIT_MIN: ordered with the top level's head start
QUICK_READ = "quick-read"  # a radiograph: the policy's quick-read head start below the top level

# The order: a study's score is the minutes it has waited plus the head start of its level, highest first. A stat
# study goes ahead of every study that has waited less than its head start longer than it has; urgent and routine
# studies are read in arrival order until waiting promotes them (as they near their target) or LONG_WAIT_MIN passes,
# except that quick reads (radiographs: `PrioritySettings.quick_read_*`) start a few minutes ahead (Kleinrock's
# conservation law: reading short studies first lowers the waits of most studies for a little more on the long ones).
# So no study is overtaken by studies that arrived more than a head start after it: strict levels starve studies
# in a backlog (Baltruschat 2021: pure AI ordering raised the longest wait from 890 to 1,293 min). A study that has
# waited LONG_WAIT_MIN gets the top level's head start whatever its level, so in a long backlog the oldest studies
# are read before newer stat ones. Tuned with `triage simulate` on its default scenario (triage/training/simulate.py).
# The worklist query computes the same score in SQL (repository.py), so these are public and the arithmetic is one
# place. Head starts never fall with the level (a promotion never moves a study down the list).
HEAD_START_MIN = {PriorityLevel.ROUTINE: 0.0, PriorityLevel.URGENT: 0.0, PriorityLevel.STAT: 120.0}
LONG_WAIT_MIN = 120.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)

_TOP = max(PriorityLevel, key=lambda level: level.rank)


@dataclass(frozen=True)
class Turnaround:
    """How long a study has waited against the target of the level it was given (before any promotion)."""

    level: PriorityLevel
    waiting_min: float
    target_min: float | None

    @property
    def fraction(self) -> float:
        """Fraction of the target elapsed; 0 when the site sets no target for this level."""
        if not self.target_min:
            return 0.0
        return self.waiting_min / self.target_min

    @property
    def left_min(self) -> float | None:
        """Minutes left before the target is breached (negative once breached); None without a target."""
        if self.target_min is None:
            return None
        return self.target_min - self.waiting_min


def require_utc(value: datetime, name: str) -> datetime:
    """Return `value` if it is timezone-aware.

    Raises:
        ValueError: when `value` is naive, since a naive time cannot be compared with stored UTC times.
    """
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime (UTC), got {value!r}")
    return value


def level_of(value: str | PriorityLevel) -> PriorityLevel:
    """A priority level from our own names only (routine, urgent, stat).

    Raises:
        ValueError: quoting the value when it is not one of them.
    """
    try:
        return PriorityLevel(str(value).strip().lower())
    except ValueError:
        raise ValueError(f"unknown priority level {value!r}; valid: {[lvl.value for lvl in PriorityLevel]}") from None


def validate_settings(settings: PrioritySettings) -> None:
    """Check the site's policy once at start-up.

    Raises:
        ValueError: when a finding level or turnaround level is not a priority level, a target is not
            positive, or promote_at_fraction is outside (0, 1].
    """
    for label, value in settings.finding_levels.items():
        try:
            level_of(value)
        except ValueError as exc:
            raise ValueError(f"priority.finding_levels[{label!r}]: {exc}") from None
    for key, minutes in settings.turnaround_min.items():
        level_of(key)
        if not minutes > 0:
            raise ValueError(f"priority.turnaround_min[{key!r}] must be > 0 minutes, got {minutes!r}")
    if not 0 < settings.promote_at_fraction <= 1:
        raise ValueError(f"priority.promote_at_fraction must be in (0, 1], got {settings.promote_at_fraction!r}")
    top = HEAD_START_MIN[_TOP]
    if not 0 <= settings.quick_read_head_start_min < top:
        # Below the stat head start, so that a promotion to stat never moves a study down the list.
        raise ValueError(
            f"priority.quick_read_head_start_min must be in [0, {top:.0f}) minutes,"
            f" got {settings.quick_read_head_start_min!r}"
        )


def quick_read_head_start(modality: str, settings: PrioritySettings) -> float:
    """The head start (minutes) a study of `modality` ("CR", or several joined with a backslash as in Modalities
    in Study) gets below the top level: the policy's quick-read head start when every modality is a quick read."""
    modalities = {m.strip().upper() for m in modality.split("\\") if m.strip()}
    quick = {m.strip().upper() for m in settings.quick_read_modalities}
    return settings.quick_read_head_start_min if modalities and modalities <= quick else 0.0


def turnaround(level: PriorityLevel, received_at: datetime, now: datetime, settings: PrioritySettings) -> Turnaround:
    """Waiting time of a study received at `received_at`, against the site's target for `level`."""
    waiting_min = max(0.0, (require_utc(now, "now") - require_utc(received_at, "received_at")).total_seconds() / 60)
    targets = {level_of(k): float(v) for k, v in settings.turnaround_min.items()}
    return Turnaround(level=level, waiting_min=waiting_min, target_min=targets.get(level))


def _finding_text(label: str, probability: float, model: str, version: str, synthetic: bool) -> str:
    source = f"{model} {version}".strip() or "unknown model"
    if synthetic:
        source += ", synthetic model"
    return f"{label} flagged (p={probability:.2f}, {source})"


def compute_priority(
    clinical: PriorityLevel,
    findings: Sequence[Finding],
    ai_status: AIStatus | str,
    received_at: datetime,
    now: datetime,
    settings: PrioritySettings,
    *,
    ai_reason: str = "",
    clinical_source: str = "from request",
    rule_source: str = "",
    modality: str = "",
) -> Priority:
    """A study's priority from its clinical priority, its AI findings and how long it has waited.

    The clinical priority is the floor: AI only ever raises a study (an unflagged, failed or pending analysis
    leaves the level as it was). Each flagged finding raises the study to the level the site sets for that
    finding, except a shadow finding (its model is not active at the study's site: not validated there, or a new
    version on trial), which is left out of the priority and its reasons altogether. Once `promote_at_fraction` of the
    turnaround target of the level reached so far has elapsed, the study goes up one level (never above stat).
    The score orders the worklist: minutes waited plus the level's head start (`HEAD_START_MIN`), the top level's
    once the study has waited `LONG_WAIT_MIN`, so that no study is starved behind newer ones. Below the top level
    a quick read (every modality in `quick_read_modalities`) gets `quick_read_head_start_min` instead of none.

    Args:
        clinical: The clinical priority (from the request, the sending AE or the default).
        findings: The study's findings (as read from the worklist, or straight from the runner).
        ai_status: Where the AI analysis stands.
        received_at: When the study's first instance arrived (timezone-aware).
        now: The time the priority is computed for (timezone-aware).
        settings: The site's policy.
        ai_reason: Why the analysis failed or did not apply, quoted in the reason.
        clinical_source: Where the clinical priority came from, in words ("from request", "default").
        rule_source: Whose rules `settings` are, named in every reason they decide ("site CITY HOSPITAL");
            empty for the service's default policy.
        modality: The study's modalities as in Modalities in Study ("CT", "CR\\DX"): quick reads get a head start.

    Returns:
        The level, the score the worklist sorts by (highest first: minutes waited plus the head start), and
        every reason in the order it applied.

    Raises:
        ValueError: when a time is naive or the AI status is unknown.
    """
    status = AIStatus(ai_status)
    level = PriorityLevel(clinical)
    reasons: list[PriorityReason] = [
        PriorityReason(CLINICAL, f"clinical priority: {level.value} ({clinical_source})", level)
    ]

    if status is AIStatus.FAILED:
        # Clinical fail-safe: an AI failure never lowers priority; the study stays at its clinical level.
        why = ai_reason or "no reason given"
        reasons.append(PriorityReason(AI_FAILED, f"AI analysis failed: {why}; clinical priority kept", level))
    elif status in (AIStatus.PENDING, AIStatus.ANALYSING):
        reasons.append(PriorityReason(AI_PENDING, f"AI analysis {status.value}; clinical priority kept", level))
    elif status is AIStatus.NOT_APPLICABLE:
        why = f" ({ai_reason})" if ai_reason else ""
        reasons.append(PriorityReason(AI_NOT_APPLICABLE, f"no AI model applies{why}; clinical priority kept", level))

    # Findings count whatever the status: a study re-queued after new instances keeps its earlier findings
    # until the newer analysis supersedes them.
    site_levels = {label: level_of(value) for label, value in settings.finding_levels.items()}
    rule = f" [{rule_source or 'default policy'}]"
    flagged = 0
    for finding in findings:
        # A shadow model's flag never moves the study and is not a reason: the radiologist's worklist is as if
        # the model had not run.
        if not finding.flagged or finding.shadow:
            continue
        label, probability, model, version, synthetic = (
            finding.label,
            finding.probability,
            finding.model,
            finding.model_version,
            finding.synthetic,
        )
        flagged += 1
        text = _finding_text(label, probability, model, version, synthetic)
        site_level = site_levels.get(label)
        if site_level is None:
            reasons.append(PriorityReason(AI_FINDING_UNMAPPED, f"{text}; the site sets no level for it{rule}", level))
        elif site_level.rank > level.rank:
            level = site_level
            reasons.append(PriorityReason(AI_FINDING, f"{text} -> {site_level.value}{rule}", site_level))
        else:
            # A finding never lowers: the site's level for it is at or below the level already reached.
            reasons.append(
                PriorityReason(
                    AI_FINDING_KEPT, f"{text}; site level {site_level.value}, {level.value} kept{rule}", level
                )
            )
    if status is AIStatus.DONE and flagged == 0:
        if findings and all(f.shadow for f in findings):
            # Not a negative: no model that may speak at this site looked at the study (only one on trial did),
            # and a radiologist must not read "flagged nothing" as reassurance.
            text = "no AI model is in use at this site for this study; clinical priority kept"
            reasons.append(PriorityReason(AI_SHADOW_ONLY, text, level))
        else:
            reasons.append(PriorityReason(AI_NEGATIVE, "AI analysis flagged nothing; clinical priority kept", level))

    wait = turnaround(level, received_at, now, settings)
    final = level
    promotions: list[PriorityReason] = []
    if wait.target_min is not None:
        if wait.fraction >= settings.promote_at_fraction and level is not _TOP:
            final = next(lvl for lvl in PriorityLevel if lvl.rank == level.rank + 1)
            promotions.append(
                PriorityReason(
                    WAITING_PROMOTED,
                    f"waiting {wait.waiting_min:.0f} min of {wait.target_min:.0f} min {level.value} target"
                    f" -> {final.value}{rule}",
                    final,
                )
            )
        if wait.fraction >= 1.0:
            promotions.append(
                PriorityReason(
                    OVERDUE,
                    f"waiting {wait.waiting_min:.0f} min, {wait.waiting_min - wait.target_min:.0f} min past the"
                    f" {wait.target_min:.0f} min {level.value} target{rule}",
                    final,
                )
            )
    if wait.waiting_min >= LONG_WAIT_MIN and final is not _TOP:
        # Not a change of level (the level keeps its clinical and contract meaning) but of place in the order, so
        # that a backlog cannot starve a study. Listed before any promotion, which its target brings later.
        reasons.append(
            PriorityReason(
                LONG_WAIT,
                f"waiting {wait.waiting_min:.0f} min, {LONG_WAIT_MIN:.0f} min or more: ordered with the"
                f" {HEAD_START_MIN[_TOP]:.0f} min head start of {_TOP.value} studies so newer ones stop overtaking it",
                level,
            )
        )
    quick = quick_read_head_start(modality, settings)
    if quick > 0 and final is not _TOP and wait.waiting_min < LONG_WAIT_MIN:
        reasons.append(
            PriorityReason(
                QUICK_READ,
                f"quick read ({modality.strip()}): ordered {quick:.0f} min ahead of longer reads, so that a short"
                f" study does not queue behind long ones{rule}",
                final,
            )
        )
    reasons.extend(promotions)
    return Priority(level=final, score=score_of(final, wait.waiting_min, quick), reasons=tuple(reasons))


def score_of(level: PriorityLevel, waiting_min: float, quick_read_min: float = 0.0) -> float:
    """The sort score: minutes waited plus the head start of `level` (or `quick_read_min` where that is larger,
    below the top level), or the top level's after `LONG_WAIT_MIN`."""
    if waiting_min >= LONG_WAIT_MIN or level is _TOP:
        head_start = HEAD_START_MIN[_TOP]
    else:
        head_start = max(HEAD_START_MIN[level], quick_read_min)
    return waiting_min + head_start


def epoch_us(value: datetime) -> int:
    """Microseconds since 1970-01-01 UTC (exact: datetimes have microsecond resolution)."""
    return (require_utc(value, "value") - _EPOCH) // _ONE_US


@dataclass(frozen=True)
class QueueOrder:
    """What ordering a study at any later time needs, none of which moves with the clock.

    At time `now` the study's level is `base` promoted one level when `promote_at` is set and `now >=
    promote_at`; its score is `score_of(level, minutes waited, quick_read_min)`. The worklist stores these on the
    study so that the database orders and pages without running the policy per row.

    Attributes:
        base: The level from the clinical priority and the AI findings, before any promotion for waiting.
        target_min: The site's turnaround target for `base` in minutes; None when it sets none.
        promote_at: The first instant (to the microsecond) at which waiting promotes the study; None when it
            never does (no target, or already at the top level). `compute_priority` promotes at most once.
        quick_read_min: The head start it gets below the top level as a quick read (0: none).
    """

    base: PriorityLevel
    target_min: float | None
    promote_at: datetime | None
    quick_read_min: float = 0.0


def queue_order(
    base: PriorityLevel, received_at: datetime, settings: PrioritySettings, modality: str = ""
) -> QueueOrder:
    """The stored ordering of a study of `modality` that reached `base` before waiting, received at `received_at`.

    `promote_at` is found with the very test `compute_priority` applies (`turnaround(...).fraction >=
    promote_at_fraction`), so comparing it with the clock in SQL promotes exactly when the policy does, even
    where floating point puts the boundary a microsecond off the arithmetic instant.
    """
    received_at = require_utc(received_at, "received_at")
    target = turnaround(base, received_at, received_at, settings).target_min
    quick = quick_read_head_start(modality, settings)
    if target is None or base is _TOP:
        return QueueOrder(base, target, None, quick)

    def promoted(wait_us: int) -> bool:
        wait = turnaround(base, received_at, received_at + timedelta(microseconds=wait_us), settings)
        return wait.fraction >= settings.promote_at_fraction

    wait_us = max(0, math.ceil(settings.promote_at_fraction * target * 60e6))
    # The estimate is at most a few microseconds off; walk to the first microsecond that promotes.
    for _ in range(1000):
        if wait_us > 0 and promoted(wait_us - 1):
            wait_us -= 1
        elif not promoted(wait_us):
            wait_us += 1
        else:
            break
    return QueueOrder(base, target, received_at + timedelta(microseconds=wait_us), quick)


def policy_fingerprint(settings: PrioritySettings) -> str:
    """A short digest of the policy: stored with each study's ordering so a changed policy is noticed."""
    text = json.dumps(settings.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_level(priority: Priority) -> PriorityLevel:
    """The level a study reached before any promotion for waiting: its turnaround target is that level's."""
    if any(r.code == WAITING_PROMOTED for r in priority.reasons):
        return next(lvl for lvl in PriorityLevel if lvl.rank == priority.level.rank - 1)
    return priority.level


def sort_key(priority: Priority, received_at: datetime) -> tuple[float, float]:
    """Key that sorts studies highest score first (minutes waited plus head start), then oldest first."""
    return (-priority.score, require_utc(received_at, "received_at").timestamp())


_PRIORITY_JSON = TypeAdapter(Priority)


def priority_to_dict(priority: Priority) -> dict[str, Any]:
    """The JSON-ready form: {level, score (4 decimals), reasons: [{code, text, level}]}."""
    data: dict[str, Any] = _PRIORITY_JSON.dump_python(priority, mode="json")
    return data
