"""Reasons, findings, dates and deadlines in the words a radiologist reads, for the pages (the API keeps the codes
and the technical texts; the pages show these and keep the technical texts one click away).

Pure functions of a worklist item: nothing here reads files or the database, and nothing here is logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from triage.dicom.identity import PatientIdentity
from triage.domain import Finding, PriorityLevel, PriorityReason
from triage.worklist.priority import AI_FINDING, CLINICAL, WAITING_PROMOTED
from triage.worklist.repository import PRIORITY_ERROR, WorklistItem

# The reasons that set a study's level, in the order the policy applies them (the last present one decided it).
_DECIDING = (CLINICAL, AI_FINDING, WAITING_PROMOTED, PRIORITY_ERROR)
_RULES = re.compile(r"\[(?:site (?P<site>.+)|default policy)\]\s*$")
_CLINICAL = re.compile(r"^clinical priority: (?P<level>\w+) \((?P<source>.*)\)$")
_WAITING = re.compile(r"^waiting (?P<waited>\d+) min of (?P<target>\d+) min (?P<base>\w+) target -> (?P<level>\w+)")
_PROBABILITY = re.compile(r"\(p=(?P<p>[0-9.]+)")
_AGE = re.compile(r"^(?P<n>\d+) (?P<unit>y|mo|wk|d)$")
_AGE_YEARS = {"y": 1.0, "mo": 1 / 12, "wk": 7 / 365.25, "d": 1 / 365.25}
DASH = " – "


def percent(value: Any) -> str:
    """0.934 -> "93%"; the ends are shown as ">99%" and "<1%" so that 0.998 never reads as certainty."""
    try:
        value_pct = float(value) * 100
    except (TypeError, ValueError):
        return "-"
    if value_pct > 99.5:
        return ">99%"
    if value_pct < 0.5:
        return "<1%"
    return f"{value_pct:.0f}%"


def finding_name(label: str) -> str:
    """A finding label as words: "intracranial_haemorrhage" -> "intracranial haemorrhage"."""
    return str(label).replace("_", " ").strip()


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def finding_extras(finding: Finding) -> list[str]:
    """What a reader wants next to the probability, from the finding's details: "8.1 mL (IPH)", "left"."""
    details = finding.details or {}
    extras: list[str] = []
    volume = details.get("volume_ml")
    subtype = details.get("subtype")
    if isinstance(volume, int | float) and not isinstance(volume, bool) and volume > 0:
        extras.append(f"{volume:.1f} mL" + (f" ({subtype})" if subtype else ""))
    elif subtype:
        extras.append(str(subtype))
    side = details.get("side")
    if isinstance(side, str) and side.strip():
        extras.append(side.strip())
    return extras


def finding_words(finding: Finding) -> str:
    """One finding as a reader says it: "Possible intracranial haemorrhage – 97% – 8.1 mL (IPH)" when flagged,
    "Pneumothorax not flagged – 4%" when not."""
    name = finding_name(finding.label)
    head = f"Possible {name}" if finding.flagged else f"{_capital(name)} not flagged"
    return DASH.join([head, percent(finding.probability), *finding_extras(finding)])


def rules_of(text: str) -> str:
    """Whose rules a reason applied, from its "[site X]" / "[default policy]" tail: "CITY HOSPITAL's rules"."""
    found = _RULES.search(text)
    if found is None:
        return ""
    return f"{found.group('site')}'s rules" if found.group("site") else "the default rules"


def _clinical_words(reason: PriorityReason) -> str:
    found = _CLINICAL.match(reason.text)
    if found is None:
        return _capital(reason.text)
    level, source = found.group("level"), found.group("source")
    if source.startswith("from request"):
        return f"Clinical request: {level}"
    if source.startswith("from sending AE "):
        sender = source.removeprefix("from sending AE ").split(";")[0].strip()
        return f"Sender {sender}: {level} by the centre's rule"
    if "not recognised" in source:
        return f"Request priority not recognised: {level}"
    return f"No priority requested: {level}"


def _finding_reason_words(reason: PriorityReason, findings: list[Finding]) -> str:
    label = reason.text.split(" flagged (", 1)[0]
    finding = next((f for f in findings if f.label == label and f.flagged and not f.shadow), None)
    if finding is not None:
        probability = percent(finding.probability)
    else:
        found = _PROBABILITY.search(reason.text)
        probability = percent(found.group("p")) if found else "-"
    rules = rules_of(reason.text)
    under = f" under {rules}" if rules else ""
    return f"AI: possible {finding_name(label)} ({probability}){DASH}{reason.level.value}{under}"


def _waiting_words(reason: PriorityReason) -> str:
    found = _WAITING.match(reason.text)
    if found is None:
        return _capital(reason.text)
    return (
        f"Waiting {found.group('waited')} of {found.group('target')} min ({found.group('base')} target)"
        f"{DASH}raised to {found.group('level')}"
    )


def deciding_reason(item: WorklistItem) -> PriorityReason | None:
    """The reason that set the study's level: the last of clinical priority, a raising AI finding, promotion for
    waiting, or a priority error."""
    decided = None
    for reason in item.priority.reasons:
        if reason.code in _DECIDING:
            decided = reason
    return decided or (item.priority.reasons[-1] if item.priority.reasons else None)


def reason_words(item: WorklistItem) -> str:
    """The one reason a reader needs for the study's level, in plain words."""
    reason = deciding_reason(item)
    if reason is None:
        return ""
    if reason.code == CLINICAL:
        return _clinical_words(reason)
    if reason.code == AI_FINDING:
        return _finding_reason_words(reason, item.findings)
    if reason.code == WAITING_PROMOTED:
        return _waiting_words(reason)
    if reason.code == PRIORITY_ERROR:
        return f"Priority could not be computed{DASH}listed at {PriorityLevel.STAT.value}"
    return _capital(reason.text)


@lru_cache(maxsize=256)
def zone_of(name: str) -> ZoneInfo:
    """The IANA time zone `name`, UTC when it is unknown (a site record is validated on the way in)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def clock_in(at: datetime, zone_name: str, now: datetime) -> str:
    """`at` on the wall clock of `zone_name`: "03:45 BST"; with the day when it is not today there."""
    zone = zone_of(zone_name)
    local = at.astimezone(zone)
    if local.date() == now.astimezone(zone).date():
        return local.strftime("%H:%M %Z")
    return local.strftime("%a %d %b %H:%M %Z")


@dataclass(frozen=True)
class Deadline:
    """When a study's contract target falls due: in UTC (the page shows it in the reader's zone) and on the site's
    wall clock."""

    at: datetime
    left_min: float
    site_clock: str

    @property
    def overdue(self) -> bool:
        return self.left_min < 0


def deadline_of(item: WorklistItem, now: datetime) -> Deadline | None:
    """The study's turnaround deadline (received + the site's target for its level); None without a target."""
    if item.turnaround_target_min is None or item.turnaround_left_min is None:
        return None
    at = item.received_at + timedelta(minutes=item.turnaround_target_min)
    return Deadline(at=at, left_min=item.turnaround_left_min, site_clock=clock_in(at, item.site_time_zone, now))


def study_when(study_date: str, study_time: str) -> str:
    """Study Date (DA) and Time (TM) as the hospital wrote them, readable: "2024-01-02 03:15"; "" when absent."""
    day = study_date.strip()
    if len(day) == 8 and day.isdigit():
        day = f"{day[:4]}-{day[4:6]}-{day[6:]}"
    digits = study_time.strip().split(".")[0].replace(":", "")
    clock = f"{digits[:2]}:{digits[2:4] or '00'}" if digits.isdigit() and len(digits) >= 2 else study_time.strip()
    return " ".join(part for part in (day, clock) if part)


def study_when_key(study_date: str, study_time: str) -> str:
    """A sort key for Study Date and Time: "20240102031500"."""
    clock = study_time.strip().split(".")[0].replace(":", "")
    return (study_date.strip() + clock.ljust(6, "0"))[:14]


def age_years(age: str) -> float | None:
    """Age in years for sorting: "54 y" -> 54.0, "8 mo" -> 0.67; None when unknown."""
    found = _AGE.match(age.strip())
    if found is None:
        return None
    return round(int(found.group("n")) * _AGE_YEARS[found.group("unit")], 3)


@dataclass(frozen=True)
class ReadingRow:
    """One worklist row as the page shows it: the study, the patient (None when their header cannot be read),
    the plain reason and the deadline."""

    item: WorklistItem
    identity: PatientIdentity | None
    reason: str
    deadline: Deadline | None
    study_when: str
    study_when_key: str
    age_years: float | None
    registered: bool


def reading_row(item: WorklistItem, identity: PatientIdentity | None, now: datetime) -> ReadingRow:
    return ReadingRow(
        item=item,
        identity=identity,
        reason=reason_words(item),
        deadline=deadline_of(item, now),
        study_when=study_when(item.study_date, item.study_time),
        study_when_key=study_when_key(item.study_date, item.study_time),
        age_years=age_years(identity.age) if identity is not None else None,
        registered=bool(item.site_match),
    )
