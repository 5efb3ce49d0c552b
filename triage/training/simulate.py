"""Simulate a reading-centre shift and compare worklist ordering policies, ranked by the service's own priority code.

A discrete-event simulation of one night per seed: studies arrive (from a CSV or a generator), the AI result of a
study becomes known some minutes after it arrives (drawn from each model card's operating point, or given as
probabilities), and each radiologist, whenever free and on shift, takes the study at the top of the worklist as
the policy orders it. The waiting time that matters is arrival -> read start.

Policies (every one sees the same studies, read times and AI results of a seed):

- `fifo`: arrival order; no AI.
- `ai-levels`: strict levels, as pure AI ordering does: the level from the clinical priority and the AI findings
  (the service's `compute_priority` with turnaround targets removed, so nothing is promoted), higher level first,
  then arrival; waiting never moves a study.
- `service`: the service's full policy, `compute_priority` + `sort_key` per site, as the worklist orders.
- `next-study`: the service's order, but each radiologist takes only studies of sites they are credentialed for.

The ranking is never re-implemented here: every decision calls `compute_priority` and `sort_key` for the studies
that can be at the top (see `PolicyQueue`), and `queue_order` groups the rest exactly as the worklist's stored
columns do.
"""

from __future__ import annotations

import csv
import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from triage.config import PrioritySettings
from triage.domain import AIStatus, Finding, Priority, PriorityLevel
from triage.errors import MissingDependencyError, TriageError, validation_problems
from triage.models.registry import ModelRegistry
from triage.worklist.priority import base_level, compute_priority, epoch_us, queue_order, sort_key
from triage.worklist.sites import Site

SCENARIOS_DIR = Path(__file__).parent / "scenarios"
POLICIES = ("fifo", "ai-levels", "service", "next-study")
# Output classes: ground-truth critical positives, then the others by their clinical priority.
CLASSES = ("critical", "stat", "urgent", "routine")
ALL = "all"
DEFAULT_SEEDS = 20
_US_PER_MIN = 60_000_000
_CLINICAL_SOURCE = "scenario"

# The item 5 targets against FIFO (issue #12): the critical median at most a quarter of FIFO's, the routine median
# at most 10% above FIFO's, and no class's maximum wait more than 5% above FIFO's.
TARGET_CRITICAL_MEDIAN = 0.25
TARGET_ROUTINE_MEDIAN = 1.10
TARGET_MAX = 1.05


class InvalidScenarioError(TriageError):
    """A scenario, arrivals CSV or probabilities CSV that cannot be simulated as given (quoted with what is valid)."""


# ------------------------------------------------------------------------------------------------ scenario


class ReadTime(BaseModel):
    """A read time distribution: lognormal with this median (minutes) and log-space spread `sigma`."""

    model_config = ConfigDict(extra="forbid")

    median_min: float = Field(gt=0)
    sigma: float = Field(default=0.0, ge=0)


class StudyType(BaseModel):
    """A kind of study: its share of arrivals, how often it holds a critical finding, who reads it how fast.

    `modality` is the DICOM modality the worklist sees. `model` names the installed model that analyses it (None:
    no model applies); `detectable_share` is the share
    of its critical positives that are the model's finding (a head CT model finds bleeds, not every critical head
    CT); the result is known `analysis_min` after arrival, and the study is pending until then.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    share: float = Field(ge=0)
    critical_prevalence: float = Field(ge=0, le=1)
    read: ReadTime
    model: str | None = None
    detectable_share: float = Field(default=1.0, ge=0, le=1)
    analysis_min: float = Field(default=0.0, ge=0)
    # The DICOM modality the worklist would see ("CT", "CR", "DX", "MR"): the service's policy orders quick reads
    # (`quick_read_modalities`) ahead; "" for none named.
    modality: str = ""


class ModelBehaviour(BaseModel):
    """How an installed model behaves in the scenario.

    `sensitivity` and `specificity` unset: read from the card's figures (a figure whose name ends in
    "sensitivity" or "specificity"). `state: shadow` keeps its flags out of the priority, as the service does.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str | None = None
    state: Literal["active", "shadow"] = "active"
    sensitivity: float | None = Field(default=None, ge=0, le=1)
    specificity: float | None = Field(default=None, ge=0, le=1)
    note: str = ""


class SiteSpec(BaseModel):
    """A client hospital: its share of arrivals and its contract (rules it leaves unset: the service's default)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    share: float = Field(ge=0)
    time_zone: str = "UTC"
    turnaround_min: dict[str, float] | None = None
    finding_levels: dict[str, str] | None = None
    promote_at_fraction: float | None = None


class RadiologistSpec(BaseModel):
    """A radiologist on the night: shift in hours from the scenario's start, and the sites they may read ("*": all)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    start_h: float = Field(ge=0)
    end_h: float
    sites: list[str] = Field(default_factory=lambda: ["*"])

    @model_validator(mode="after")
    def _shift(self) -> RadiologistSpec:
        if not self.end_h > self.start_h:
            raise ValueError(f"radiologist {self.name!r}: end_h ({self.end_h}) must be after start_h ({self.start_h})")
        return self


class Scenario(BaseModel):
    """A night at a reading centre: arrivals, study types, models, client hospitals and radiologists."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    generated: bool = True
    start: datetime
    arrivals_per_hour: list[float] = Field(default_factory=list)
    study_types: list[StudyType]
    # Clinical priority shares for critical positives and for the others: {"stat": .., "urgent": .., "routine": ..}.
    clinical_priority: dict[Literal["critical", "other"], dict[str, float]]
    models: list[ModelBehaviour] = Field(default_factory=list)
    sites: list[SiteSpec]
    radiologists: list[RadiologistSpec]

    @field_validator("start")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError(f"start must carry a UTC offset (e.g. 2026-03-02T18:00:00+00:00), got {value}")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if any(rate < 0 for rate in self.arrivals_per_hour):
            raise ValueError("arrivals_per_hour must not be negative")
        for what, names in (
            ("study type", [t.name for t in self.study_types]),
            ("site", [s.name for s in self.sites]),
            ("radiologist", [r.name for r in self.radiologists]),
            ("model", [m.name for m in self.models]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        if not self.study_types or not sum(t.share for t in self.study_types) > 0:
            raise ValueError("study_types need at least one type with a share above 0")
        if not self.sites or not sum(s.share for s in self.sites) > 0:
            raise ValueError("sites need at least one site with a share above 0")
        if not self.radiologists:
            raise ValueError("a scenario needs at least one radiologist")
        valid = [lvl.value for lvl in PriorityLevel]
        for group, shares in self.clinical_priority.items():
            for level in shares:
                if level.strip().lower() not in valid:
                    raise ValueError(f"clinical_priority.{group}: unknown priority level {level!r}; valid: {valid}")
            if not sum(shares.values()) > 0:
                raise ValueError(f"clinical_priority.{group} needs a share above 0")
        for key in ("critical", "other"):
            if key not in self.clinical_priority:
                raise ValueError(f"clinical_priority needs '{key}' (shares of stat, urgent, routine)")
        known_models = {m.name for m in self.models}
        for study_type in self.study_types:
            if study_type.model is not None and study_type.model not in known_models:
                raise ValueError(
                    f"study type {study_type.name!r} names model {study_type.model!r};"
                    f" models listed: {sorted(known_models)}"
                )
        site_names = {s.name for s in self.sites}
        for rad in self.radiologists:
            unknown = sorted(set(rad.sites) - site_names - {"*"})
            if unknown:
                raise ValueError(f"radiologist {rad.name!r} is credentialed for unknown sites {unknown}")
        return self

    def site_spec(self, name: str) -> SiteSpec:
        return next(s for s in self.sites if s.name == name)


def shipped_scenarios() -> list[str]:
    """Names of the scenarios shipped with triage (`--scenario NAME`)."""
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str | Path) -> tuple[Scenario, str]:
    """A scenario by shipped name ("default") or path, and where it came from.

    Raises:
        InvalidScenarioError: when no such scenario exists, or the file is not a valid scenario (every problem quoted).
    """
    text = str(name_or_path)
    path, source = Path(text), text
    if not path.suffix and (SCENARIOS_DIR / f"{text}.yaml").is_file():
        path = SCENARIOS_DIR / f"{text}.yaml"
        source = f"{text} (shipped: triage/training/scenarios/{path.name})"
    if not path.is_file():
        raise InvalidScenarioError(f"no scenario {text!r}: give a scenario file or one of {shipped_scenarios()}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidScenarioError(f"scenario {path} is not valid YAML: {exc}") from None
    return parse_scenario(raw, source), source


def parse_scenario(raw: Any, source: str = "<scenario>") -> Scenario:
    """A scenario from plain data.

    Raises:
        InvalidScenarioError: quoting every problem found, with where it is.
    """
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise InvalidScenarioError(f"invalid scenario {source}: {validation_problems(exc, 'scenario')}") from None


# ------------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelFacts:
    """What the simulation uses of an installed model: from its card, with the scenario's operating point."""

    name: str
    version: str
    label: str
    threshold: float
    synthetic: bool
    sensitivity: float
    specificity: float
    shadow: bool
    source: str  # where the operating point came from, in words


def _card_figure(card: Any, suffix: str) -> tuple[float, str] | None:
    for figure in card.figures:
        if figure.name.lower().endswith(suffix) and isinstance(figure.value, int | float):
            return float(figure.value), figure.name
    return None


def resolve_models(scenario: Scenario, weights_dir: Path) -> dict[str, ModelFacts]:
    """Each scenario model's facts, read from its installed card (label, threshold, version, synthetic).

    Raises:
        InvalidScenarioError: when a model is not installed, or neither the scenario nor its card gives an
            operating point.
    """
    registry = ModelRegistry(weights_dir)
    facts: dict[str, ModelFacts] = {}
    for behaviour in scenario.models:
        try:
            card = registry.get(behaviour.name, behaviour.version).card
        except TriageError as exc:
            raise InvalidScenarioError(f"scenario model {behaviour.name!r}: {exc}") from None
        if len(card.findings) != 1:
            raise InvalidScenarioError(
                f"model {card.key} reports {len(card.findings)} findings; the simulator models one finding per model"
            )
        spec = card.findings[0]
        sources = []
        points: dict[str, float] = {}
        for key, given in (("sensitivity", behaviour.sensitivity), ("specificity", behaviour.specificity)):
            if given is not None:
                points[key] = given
                sources.append(f"{key} from the scenario")
                continue
            found = _card_figure(card, key)
            if found is None:
                raise InvalidScenarioError(
                    f"the card of {card.key} states no {key} figure; set models[{behaviour.name}].{key} in the scenario"
                )
            points[key] = found[0]
            sources.append(f"{key} from the card ({found[1]})")
        facts[behaviour.name] = ModelFacts(
            name=card.name,
            version=card.version,
            label=spec.label,
            threshold=spec.threshold,
            synthetic=card.synthetic,
            sensitivity=points["sensitivity"],
            specificity=points["specificity"],
            shadow=behaviour.state == "shadow",
            source="; ".join(sources),
        )
    return facts


# ------------------------------------------------------------------------------------------------ studies


@dataclass(frozen=True)
class SimStudy:
    """One study of a simulated night. Times are integer microseconds from the scenario's start.

    `finding` is the AI result, known from `analysed_us` on (None when no model applies: not applicable).
    """

    uid: str
    site: str
    kind: str
    clinical: PriorityLevel
    critical: bool
    arrival_us: int
    read_us: int
    analysed_us: int | None = None
    finding: Finding | None = None
    modality: str = ""

    @property
    def klass(self) -> str:
        """The output class: critical positives, else the clinical priority."""
        return "critical" if self.critical else self.clinical.value


@dataclass(frozen=True)
class ArrivalRow:
    """One row of an arrivals CSV (read times and AI results are drawn per seed unless given)."""

    uid: str
    arrival_us: int
    site: str
    kind: str
    clinical: PriorityLevel
    critical: bool
    read_min: float | None


_YES = {"yes", "y", "true", "1", "critical", "positive"}
_NO = {"no", "n", "false", "0", "", "negative"}


def _minutes_us(minutes: float) -> int:
    return int(round(minutes * _US_PER_MIN))


def _arrival_us(text: str, start: datetime, where: str) -> int:
    """Microseconds from `start`: `text` is minutes from the start, or an ISO 8601 time with its UTC offset."""
    try:
        return _minutes_us(float(text))
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        at = None
    if at is None:
        raise InvalidScenarioError(f"{where}: time {text!r} is neither minutes from the start nor an ISO 8601 time")
    if at.tzinfo is None:
        raise InvalidScenarioError(f"{where}: time {text!r} needs its UTC offset (+00:00)")
    return epoch_us(at) - epoch_us(start)


def read_arrivals_csv(path: Path, scenario: Scenario) -> list[ArrivalRow]:
    """Arrivals from a CSV: `time,site,modality,clinical_priority,critical` (+ optional `study_id`, `read_min`).

    `time` is minutes from the scenario's start or an ISO 8601 time with its UTC offset; `modality` names one of
    the scenario's study types; `clinical_priority` takes our levels or the DICOM words (STAT, HIGH, ...);
    `critical` is yes/no.

    Raises:
        InvalidScenarioError: quoting the row and the value that cannot be used, and what would be valid.
    """
    kinds = {t.name for t in scenario.study_types}
    sites = {s.name for s in scenario.sites}
    rows: list[ArrivalRow] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"time", "site", "modality", "clinical_priority", "critical"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidScenarioError(f"{path}: missing columns {sorted(missing)}; have {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            where = f"{path} line {line}"
            time_text = row["time"].strip()
            arrival_us = _arrival_us(time_text, scenario.start, where)
            if arrival_us < 0:
                raise InvalidScenarioError(f"{where}: time {time_text!r} is before the scenario's start")
            site, kind = row["site"].strip(), row["modality"].strip()
            if site not in sites:
                raise InvalidScenarioError(f"{where}: site {site!r} is not in the scenario; sites: {sorted(sites)}")
            if kind not in kinds:
                raise InvalidScenarioError(f"{where}: modality {kind!r} is not a study type; types: {sorted(kinds)}")
            try:
                clinical = PriorityLevel.parse(row["clinical_priority"])
            except ValueError as exc:
                raise InvalidScenarioError(f"{where}: {exc}") from None
            critical_text = row["critical"].strip().lower()
            if critical_text not in _YES | _NO:
                raise InvalidScenarioError(f"{where}: critical {row['critical']!r} must be yes or no")
            read_text = (row.get("read_min") or "").strip()
            try:
                read_min = float(read_text) if read_text else None
            except ValueError:
                raise InvalidScenarioError(f"{where}: read_min {read_text!r} is not a number of minutes") from None
            if read_min is not None and not read_min > 0:
                raise InvalidScenarioError(f"{where}: read_min must be above 0, got {read_text!r}")
            uid = (row.get("study_id") or "").strip() or f"csv-{line - 1:06d}"
            rows.append(ArrivalRow(uid, arrival_us, site, kind, clinical, critical_text in _YES, read_min))
    uids = [r.uid for r in rows]
    if len(set(uids)) != len(uids):
        raise InvalidScenarioError(f"{path}: study_id values must be unique")
    return rows


def read_probabilities_csv(path: Path) -> dict[str, float]:
    """Per-study probabilities `study_id,probability` (the model that applies to the study gave it).

    Raises:
        InvalidScenarioError: when a column is missing or a probability is not a number in [0, 1].
    """
    result: dict[str, float] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"study_id", "probability"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidScenarioError(f"{path}: missing columns {sorted(missing)}; have {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                probability = float(row["probability"])
            except ValueError:
                probability = math.nan
            if not 0 <= probability <= 1:
                raise InvalidScenarioError(
                    f"{path} line {line}: probability {row['probability']!r} must be a number from 0 to 1"
                )
            result[row["study_id"].strip()] = probability
    return result


def _shares(mapping: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = list(mapping)
    weights = np.array([float(mapping[n]) for n in names])
    return names, weights / weights.sum()


def _finding(model: ModelFacts, probability: float) -> Finding:
    return Finding(
        label=model.label,
        probability=probability,
        flagged=probability >= model.threshold,  # as the pipelines flag: p >= the card's threshold
        model=model.name,
        model_version=model.version,
        synthetic=model.synthetic,
        shadow=model.shadow,
    )


def draw_studies(
    scenario: Scenario,
    models: Mapping[str, ModelFacts],
    seed: int,
    arrivals: Sequence[ArrivalRow] | None = None,
    probabilities: Mapping[str, float] | None = None,
) -> list[SimStudy]:
    """One night's studies: generated from the scenario, or the given arrivals; read times and AI results drawn.

    Every policy of a seed is run on the same studies (common random numbers), so differences between policies
    are the policies'. A model's result on a critical positive of its finding is a flag with probability
    `sensitivity`; on every other study it applies to, a flag with probability 1 - `specificity`. With
    `probabilities`, the study's probability against the card's threshold decides instead.

    Raises:
        InvalidScenarioError: when `probabilities` lacks a study that a model applies to.
    """
    rng = np.random.default_rng(seed)
    types = {t.name: t for t in scenario.study_types}
    if arrivals is None:
        arrivals = _generate_arrivals(scenario, rng, seed)
    studies = []
    for row in arrivals:
        study_type = types[row.kind]
        read_min = row.read_min
        if read_min is None:
            read_min = float(study_type.read.median_min * math.exp(study_type.read.sigma * rng.standard_normal()))
        # Drawn for every study whether or not a model applies, so each study's draws do not depend on others'.
        detectable_draw, flag_draw = rng.random(), rng.random()
        analysed_us, finding = None, None
        if study_type.model is not None:
            model = models[study_type.model]
            if probabilities is not None:
                if row.uid not in probabilities:
                    raise InvalidScenarioError(
                        f"the probabilities CSV has no row for study {row.uid!r} ({row.kind}, model {model.name})"
                    )
                probability = probabilities[row.uid]
            else:
                target = row.critical and detectable_draw < study_type.detectable_share
                rate = model.sensitivity if target else 1.0 - model.specificity
                # An operating-point draw has no probability of its own: 1 for a flag, 0 otherwise.
                probability = 1.0 if flag_draw < rate else 0.0
            finding = _finding(model, probability)
            analysed_us = row.arrival_us + _minutes_us(study_type.analysis_min)
        studies.append(
            SimStudy(
                uid=row.uid,
                site=row.site,
                kind=row.kind,
                clinical=row.clinical,
                critical=row.critical,
                arrival_us=row.arrival_us,
                read_us=max(1, _minutes_us(read_min)),
                analysed_us=analysed_us,
                finding=finding,
                modality=study_type.modality,
            )
        )
    return studies


def _generate_arrivals(scenario: Scenario, rng: np.random.Generator, seed: int) -> list[ArrivalRow]:
    """A Poisson process with the scenario's hourly rates (constant within each hour), and each study's draws."""
    times: list[float] = []
    for hour, rate in enumerate(scenario.arrivals_per_hour):
        n = int(rng.poisson(rate))
        times.extend(sorted(hour * 60.0 + rng.uniform(0.0, 60.0, n)))
    site_names, site_p = _shares({s.name: s.share for s in scenario.sites})
    type_names, type_p = _shares({t.name: t.share for t in scenario.study_types})
    types = {t.name: t for t in scenario.study_types}
    clinical = {group: _shares(shares) for group, shares in scenario.clinical_priority.items()}
    rows = []
    for i, minutes in enumerate(times):
        site = site_names[rng.choice(len(site_names), p=site_p)]
        kind = type_names[rng.choice(len(type_names), p=type_p)]
        critical = bool(rng.random() < types[kind].critical_prevalence)
        names, p = clinical["critical" if critical else "other"]
        level = PriorityLevel(names[rng.choice(len(names), p=p)].strip().lower())
        rows.append(ArrivalRow(f"s{seed:04d}-{i:05d}", _minutes_us(minutes), site, kind, level, critical, None))
    return rows


# ------------------------------------------------------------------------------------------------ ordering


@dataclass(frozen=True)
class SiteRules:
    """The priority policy each site's studies are ordered by, and whose rules they are (named in every reason)."""

    settings: Mapping[str, PrioritySettings]
    sources: Mapping[str, str]

    @classmethod
    def of(cls, scenario: Scenario, default: PrioritySettings) -> SiteRules:
        """Each site's policy as the service builds it: the site's own rules over the default policy."""
        settings, sources = {}, {}
        for spec in scenario.sites:
            try:
                site = Site(
                    name=spec.name,
                    time_zone=spec.time_zone,
                    turnaround_min=spec.turnaround_min,
                    finding_levels=spec.finding_levels,
                    promote_at_fraction=spec.promote_at_fraction,
                )
            except ValidationError as exc:
                raise InvalidScenarioError(f"scenario site {spec.name!r}: {exc.errors()[0]['msg']}") from None
            settings[spec.name] = site.policy(default)
            sources[spec.name] = f"site {site.name}"
        return cls(settings, sources)

    def without_promotion(self) -> SiteRules:
        """The same rules with no turnaround targets: nothing is promoted for waiting, levels order alone."""
        return SiteRules(
            {name: s.model_copy(update={"turnaround_min": {}}) for name, s in self.settings.items()}, self.sources
        )

    def target_min(self, site: str, level: PriorityLevel) -> float | None:
        targets = {PriorityLevel(k): float(v) for k, v in self.settings[site].turnaround_min.items()}
        return targets.get(level)


@dataclass
class StudyState:
    """What the worklist knows about a study at the current instant: its AI status and findings."""

    study: SimStudy
    status: AIStatus
    findings: tuple[Finding, ...] = ()


def initial_state(study: SimStudy) -> StudyState:
    """A study as it reaches the worklist: pending analysis, or not applicable when no model applies."""
    return StudyState(study, AIStatus.NOT_APPLICABLE if study.finding is None else AIStatus.PENDING)


def analysed_state(study: SimStudy) -> StudyState:
    """A study once its AI result is known."""
    assert study.finding is not None
    return StudyState(study, AIStatus.DONE, (study.finding,))


class Clock:
    """Simulation time (integer microseconds from the scenario's start) as the timezone-aware times the policy takes."""

    def __init__(self, start: datetime) -> None:
        self.start = start

    def at(self, us: int) -> datetime:
        return self.start + timedelta(microseconds=us)


def service_priority(state: StudyState, now: datetime, rules: SiteRules, clock: Clock) -> Priority:
    """The service's priority of a study at `now`: `compute_priority` with the study's site policy."""
    study = state.study
    return compute_priority(
        study.clinical,
        state.findings,
        state.status,
        clock.at(study.arrival_us),
        now,
        rules.settings[study.site],
        clinical_source=_CLINICAL_SOURCE,
        rule_source=rules.sources[study.site],
        modality=study.modality,
    )


def service_key(state: StudyState, now: datetime, rules: SiteRules, clock: Clock) -> tuple[Any, ...]:
    """The worklist's sort key: `sort_key` (score, then oldest), then the Study Instance UID, as the SQL orders."""
    priority = service_priority(state, now, rules, clock)
    return (*sort_key(priority, clock.at(state.study.arrival_us)), state.study.uid)


def level_key(state: StudyState, now: datetime, rules: SiteRules, clock: Clock) -> tuple[Any, ...]:
    """Strict levels: the level `compute_priority` gives (higher first), then arrival, then the UID."""
    priority = service_priority(state, now, rules, clock)
    return (-priority.level.rank, state.study.arrival_us, state.study.uid)


def fifo_key(state: StudyState) -> tuple[Any, ...]:
    return (state.study.arrival_us, state.study.uid)


RankKey = Callable[[StudyState, datetime, SiteRules, Clock], tuple[Any, ...]]


def order_studies(states: Iterable[StudyState], now_us: int, policy: str, rules: SiteRules, clock: Clock) -> list[str]:
    """The Study Instance UIDs of `states` in the order `policy` puts them at `now_us` (every study ranked).

    The reference order: the simulator's fast path (`PolicyQueue.pick`) must give its first element, and the
    worklist database the same order for the service's policy (both are tested).
    """
    if policy == "fifo":
        return [s.study.uid for s in sorted(states, key=fifo_key)]
    if policy not in POLICIES:
        raise InvalidScenarioError(f"unknown policy {policy!r}; valid: {list(POLICIES)}")
    key, use = (level_key, rules.without_promotion()) if policy == "ai-levels" else (service_key, rules)
    now = clock.at(now_us)
    return [s.study.uid for s in sorted(states, key=lambda s: key(s, now, use, clock))]


class FifoQueue:
    """Arrival order, one heap per site (a radiologist may read only some sites)."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[int, str]]] = {}
        self._queued: dict[str, StudyState] = {}

    def add(self, state: StudyState, now_us: int) -> None:
        self._queued[state.study.uid] = state
        heapq.heappush(self._heaps.setdefault(state.study.site, []), fifo_key(state))  # type: ignore[arg-type]

    def update(self, state: StudyState, now_us: int) -> None:
        if state.study.uid in self._queued:
            self._queued[state.study.uid] = state

    def remove(self, uid: str) -> None:
        del self._queued[uid]

    def pick(self, now_us: int, sites: frozenset[str] | None) -> StudyState | None:
        best: tuple[int, str] | None = None
        for site, heap in self._heaps.items():
            if sites is not None and site not in sites:
                continue
            while heap and heap[0][1] not in self._queued:
                heapq.heappop(heap)
            if heap and (best is None or heap[0] < best):
                best = heap[0]
        return None if best is None else self._queued[best[1]]

    def __len__(self) -> int:
        return len(self._queued)


class PolicyQueue:
    """A policy's order with `compute_priority` called only for the studies that can be at the top.

    Studies are grouped as the worklist stores them (`queue_order`: the level before waiting, the target, the
    wait after which waiting promotes and the quick-read head start; by site, so credentials can filter). Within a
    group the oldest study always ranks first: it has waited longest, so its level (promotion comes after the same
    wait) and its score (minutes waited plus a head start that never falls as the level rises) are at least the
    others', and on a tie it is older. So each decision ranks one study per group with `key` (the service's
    `compute_priority` and `sort_key`), which gives the same first study as ranking all of them (tested against
    `order_studies`).
    """

    def __init__(self, rules: SiteRules, clock: Clock, key: RankKey = service_key) -> None:
        self.rules = rules
        self.clock = clock
        self.key = key
        self._heaps: dict[tuple[Any, ...], list[tuple[int, str]]] = {}
        self._queued: dict[str, tuple[StudyState, tuple[Any, ...]]] = {}

    def _group(self, state: StudyState, now_us: int) -> tuple[Any, ...]:
        study = state.study
        priority = service_priority(state, self.clock.at(now_us), self.rules, self.clock)
        received = self.clock.at(study.arrival_us)
        order = queue_order(base_level(priority), received, self.rules.settings[study.site], study.modality)
        promote_after = None if order.promote_at is None else epoch_us(order.promote_at) - epoch_us(received)
        return (study.site, order.base.rank, order.target_min, promote_after, order.quick_read_min)

    def add(self, state: StudyState, now_us: int) -> None:
        group = self._group(state, now_us)
        self._queued[state.study.uid] = (state, group)
        heapq.heappush(self._heaps.setdefault(group, []), fifo_key(state))  # type: ignore[arg-type]

    def update(self, state: StudyState, now_us: int) -> None:
        """A queued study's AI result came in: it may move to another group (a flag raised its level)."""
        if state.study.uid in self._queued:
            self.add(state, now_us)

    def remove(self, uid: str) -> None:
        del self._queued[uid]

    def pick(self, now_us: int, sites: frozenset[str] | None) -> StudyState | None:
        now = self.clock.at(now_us)
        best_key, best = None, None
        for group, heap in self._heaps.items():
            if sites is not None and group[0] not in sites:
                continue
            # Entries of studies read or moved to another group since are dropped here (lazy deletion).
            while heap and (heap[0][1] not in self._queued or self._queued[heap[0][1]][1] != group):
                heapq.heappop(heap)
            if not heap:
                continue
            state = self._queued[heap[0][1]][0]
            key = self.key(state, now, self.rules, self.clock)
            if best_key is None or key < best_key:
                best_key, best = key, state
        return best

    def __len__(self) -> int:
        return len(self._queued)


def make_queue(policy: str, rules: SiteRules, clock: Clock) -> FifoQueue | PolicyQueue:
    """The worklist of a policy: FIFO, or the service's order (without promotion for `ai-levels`)."""
    if policy == "fifo":
        return FifoQueue()
    if policy == "ai-levels":
        return PolicyQueue(rules.without_promotion(), clock, level_key)
    if policy in ("service", "next-study"):
        return PolicyQueue(rules, clock)
    raise InvalidScenarioError(f"unknown policy {policy!r}; valid: {list(POLICIES)}")


# ------------------------------------------------------------------------------------------------ one night

_ARRIVE, _ANALYSED, _FREE = 0, 1, 2


@dataclass
class Night:
    """One night under one policy: when each study's read started (None: never read) and by whom."""

    studies: list[SimStudy]
    read_start_us: dict[str, int]
    reader: dict[str, str]
    overtime_us: int

    def wait_min(self, study: SimStudy) -> float | None:
        start = self.read_start_us.get(study.uid)
        return None if start is None else (start - study.arrival_us) / _US_PER_MIN

    @property
    def unread(self) -> list[SimStudy]:
        return [s for s in self.studies if s.uid not in self.read_start_us]


def simulate_night(
    studies: Sequence[SimStudy],
    scenario: Scenario,
    policy: str,
    rules: SiteRules,
    clock: Clock | None = None,
) -> Night:
    """Run one night: radiologists, whenever free and on shift, take the policy's top study and read it.

    Events at the same instant are handled arrivals first, then AI results, then radiologists becoming free, and
    only then do free radiologists pick (the one free longest first). A radiologist takes no new study after
    their shift ends, except those whose shift ends last: they stay until no study they may read is left.
    Credentials apply under `next-study` only; the other policies are one shared worklist.
    """
    clock = clock or Clock(scenario.start)
    queue = make_queue(policy, rules, clock)
    all_sites = frozenset(s.name for s in scenario.sites)
    rads = scenario.radiologists
    start_us = [_minutes_us(r.start_h * 60) for r in rads]
    end_us = [_minutes_us(r.end_h * 60) for r in rads]
    last_end = max(end_us)
    credentials: list[frozenset[str] | None] = [
        (all_sites if "*" in r.sites else frozenset(r.sites)) if policy == "next-study" else None for r in rads
    ]
    # (instant, what happens, tie-break, study or radiologist index)
    events: list[tuple[int, int, int, int]] = []
    for i, study in enumerate(studies):
        events.append((study.arrival_us, _ARRIVE, i, i))
        if study.analysed_us is not None:
            events.append((study.analysed_us, _ANALYSED, i, i))
    for r, start in enumerate(start_us):
        events.append((start, _FREE, r, r))
    heapq.heapify(events)
    idle_since: dict[int, int] = {}
    read_start: dict[str, int] = {}
    reader: dict[str, str] = {}
    overtime = 0

    def on_duty(r: int, now: int) -> bool:
        return start_us[r] <= now < end_us[r] or (end_us[r] == last_end and now >= last_end)

    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, kind, _, index = heapq.heappop(events)
            if kind == _ARRIVE:
                queue.add(initial_state(studies[index]), now)
            elif kind == _ANALYSED:
                if studies[index].uid not in read_start:
                    queue.update(analysed_state(studies[index]), now)
            else:
                idle_since[index] = now
        for r in sorted(idle_since, key=lambda r: (idle_since[r], r)):
            if not on_duty(r, now):
                if now >= end_us[r]:
                    del idle_since[r]  # the shift is over
                continue
            state = queue.pick(now, credentials[r])
            if state is None:
                continue
            study = state.study
            queue.remove(study.uid)
            read_start[study.uid], reader[study.uid] = now, rads[r].name
            del idle_since[r]
            finish = now + study.read_us
            if now >= end_us[r]:
                overtime = max(overtime, finish - end_us[r])
            heapq.heappush(events, (finish, _FREE, r, r))
    return Night(list(studies), read_start, reader, overtime)


# ------------------------------------------------------------------------------------------------ figures


def _night_figures(night: Night, rules: SiteRules) -> tuple[dict[str, dict[str, float]], dict[str, float], dict]:
    """Per class: n, median, p90, max wait (minutes, read studies only); per site: share of contract breaches.

    A study's contract target is its site's turnaround target for its clinical priority, or stat for a
    critical positive (a critical finding is a stat read under any contract), whatever the policy did with it.
    An unread study counts as a breach.
    """
    waits: dict[str, list[float]] = {c: [] for c in (*CLASSES, ALL)}
    breaches: dict[str, list[bool]] = {s: [] for s in rules.settings}
    for study in night.studies:
        wait = night.wait_min(study)
        if wait is not None:
            waits[study.klass].append(wait)
            waits[ALL].append(wait)
        level = PriorityLevel.STAT if study.critical else study.clinical
        target = rules.target_min(study.site, level)
        breaches[study.site].append(wait is None or (target is not None and wait > target))
    figures = {}
    for klass, values in waits.items():
        array = np.array(values)
        figures[klass] = {
            "n": float(len(values)),
            "median_min": float(np.median(array)) if len(values) else math.nan,
            "p90_min": float(np.percentile(array, 90)) if len(values) else math.nan,
            "max_min": float(array.max()) if len(values) else math.nan,
        }
    shares = {site: (float(np.mean(b)) if b else math.nan) for site, b in breaches.items()}
    return figures, shares, waits


def _mean_ci(values: Sequence[float]) -> tuple[float | None, list[float] | None]:
    """Mean over seeds and its 95% t-interval (None without values; no interval from one value)."""
    array = np.array([v for v in values if not math.isnan(v)])
    if not len(array):
        return None, None
    mean = float(array.mean())
    if len(array) < 2:
        return mean, None
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return mean, [mean - half, mean + half]


@dataclass
class SimulationResult:
    """Every policy's figures over the seeds, and the pooled waits for the plots."""

    scenario: Scenario
    source: str
    seeds: list[int]
    policies: list[str]
    models: dict[str, ModelFacts]
    rules: SiteRules
    arrivals: str
    per_seed: dict[str, list[dict[str, dict[str, float]]]] = field(default_factory=dict)
    breaches: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    waits: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    unread: dict[str, list[int]] = field(default_factory=dict)
    overtime_min: dict[str, list[float]] = field(default_factory=dict)
    studies: list[int] = field(default_factory=list)
    critical: list[int] = field(default_factory=list)

    def _targets(self, policies: Mapping[str, Any]) -> dict[str, Any]:
        """`targets_against_fifo`, with each ratio also taken night by night (the same night under both policies)
        and given as its mean over nights with a 95% t-interval: how sure the comparison is."""
        targets = targets_against_fifo(policies)
        if "fifo" not in self.per_seed:
            return targets
        wanted = [("critical", "median_min"), ("routine", "median_min")] + [(k, "max_min") for k in CLASSES]
        for name, check in targets.items():
            paired = {}
            for klass, stat in wanted:
                ratios = [
                    ours[klass][stat] / theirs[klass][stat]
                    for ours, theirs in zip(self.per_seed[name], self.per_seed["fifo"], strict=True)
                    if theirs[klass][stat] > 0
                ]
                mean, ci = _mean_ci(ratios)
                paired[f"{klass}_{stat.removesuffix('_min')}"] = {
                    "mean": None if mean is None else round(mean, 3),
                    "ci": None if ci is None else [round(v, 3) for v in ci],
                }
            check["per_night"] = paired
        return targets

    def summary(self) -> dict[str, Any]:
        """The JSON the command prints: `{"policies": {NAME: {CLASS: {median_min, p90_min, max_min, ...}}}, ...}`.

        Each figure is the mean over seeds of that night's figure (a night's median, p90, max), with its 95%
        t-interval over seeds under `*_ci`.
        """
        policies: dict[str, Any] = {}
        for policy in self.policies:
            classes = {}
            for klass in (*CLASSES, ALL):
                entry: dict[str, Any] = {}
                for stat in ("median_min", "p90_min", "max_min"):
                    mean, ci = _mean_ci([night[klass][stat] for night in self.per_seed[policy]])
                    entry[stat] = None if mean is None else round(mean, 2)
                    entry[stat.replace("_min", "_ci")] = None if ci is None else [round(v, 2) for v in ci]
                entry["n_per_night"] = round(float(np.mean([night[klass]["n"] for night in self.per_seed[policy]])), 2)
                classes[klass] = entry
            policies[policy] = classes
        breaches = {}
        for policy in self.policies:
            per_site = {}
            for site in self.rules.settings:
                mean, ci = _mean_ci([night[site] for night in self.breaches[policy]])
                per_site[site] = {
                    "share": None if mean is None else round(mean, 4),
                    "ci": None if ci is None else [round(max(0.0, v), 4) for v in ci],
                }
            breaches[policy] = per_site
        return {
            "scenario": {
                "name": self.scenario.name,
                "source": self.source,
                "arrivals": self.arrivals,
                "seeds": len(self.seeds),
                "studies_per_night": round(float(np.mean(self.studies)), 1),
                "critical_per_night": round(float(np.mean(self.critical)), 1),
                "radiologists": len(self.scenario.radiologists),
                "sites": len(self.scenario.sites),
                "models": {
                    name: {
                        "version": m.version,
                        "state": "shadow" if m.shadow else "active",
                        "sensitivity": m.sensitivity,
                        "specificity": m.specificity,
                        "threshold": m.threshold,
                        "operating_point": m.source,
                    }
                    for name, m in self.models.items()
                },
            },
            "policies": policies,
            "breaches": breaches,
            "unread_per_night": {p: round(float(np.mean(v)), 2) for p, v in self.unread.items()},
            "overtime_min": {p: round(float(np.mean(v)), 1) for p, v in self.overtime_min.items()},
            "targets": self._targets(policies),
        }


def targets_against_fifo(policies: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Each policy against FIFO on the item 5 targets (ratios of the mean-over-seeds figures)."""
    if "fifo" not in policies:
        return {}
    fifo = policies["fifo"]

    def ratio(policy: Mapping[str, Mapping[str, Any]], klass: str, stat: str) -> float | None:
        ours, theirs = policy[klass][stat], fifo[klass][stat]
        return None if ours is None or not theirs else round(ours / theirs, 3)

    result = {}
    for name, policy in policies.items():
        if name == "fifo":
            continue
        critical = ratio(policy, "critical", "median_min")
        routine = ratio(policy, "routine", "median_min")
        maxima = {k: ratio(policy, k, "max_min") for k in CLASSES}
        met = (
            critical is not None
            and critical <= TARGET_CRITICAL_MEDIAN
            and routine is not None
            and routine <= TARGET_ROUTINE_MEDIAN
            and all(v is None or v <= TARGET_MAX for v in maxima.values())
        )
        result[name] = {
            "critical_median_vs_fifo": critical,
            "routine_median_vs_fifo": routine,
            "max_vs_fifo": maxima,
            "met": met,
        }
    return result


def run_simulation(
    scenario: Scenario,
    source: str,
    default_policy: PrioritySettings,
    weights_dir: Path,
    seeds: int = DEFAULT_SEEDS,
    first_seed: int = 0,
    policies: Sequence[str] = POLICIES,
    arrivals_csv: Path | None = None,
    probabilities_csv: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Simulate `seeds` nights under each policy and gather the figures.

    Args:
        scenario: The night (see `load_scenario`).
        source: Where the scenario came from, for the report.
        default_policy: The service's default priority policy; each site's own rules go over it.
        weights_dir: Where the installed models' cards are read from.
        seeds: Nights per policy (seeds `first_seed` .. `first_seed + seeds - 1`).
        policies: Which of `POLICIES` to run.
        arrivals_csv: Replay these arrivals instead of generating them.
        probabilities_csv: Per-study probabilities instead of drawing from the operating points (needs
            `arrivals_csv`: the probabilities are per study).
        progress: Called with a line per seed.

    Raises:
        InvalidScenarioError: for an unknown policy, a bad input file or a model without an operating point.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InvalidScenarioError(f"unknown policies {unknown}; valid: {list(POLICIES)}")
    if seeds < 1:
        raise InvalidScenarioError(f"seeds must be at least 1, got {seeds}")
    if probabilities_csv is not None and arrivals_csv is None:
        raise InvalidScenarioError("--probabilities gives one probability per study: it needs --arrivals")
    if arrivals_csv is None and not scenario.arrivals_per_hour:
        raise InvalidScenarioError(f"scenario {scenario.name!r} has no arrivals_per_hour: give --arrivals")
    models = resolve_models(scenario, weights_dir)
    rules = SiteRules.of(scenario, default_policy)
    arrivals = read_arrivals_csv(arrivals_csv, scenario) if arrivals_csv is not None else None
    probabilities = read_probabilities_csv(probabilities_csv) if probabilities_csv is not None else None
    clock = Clock(scenario.start)
    result = SimulationResult(
        scenario=scenario,
        source=source,
        seeds=list(range(first_seed, first_seed + seeds)),
        policies=list(policies),
        models=models,
        rules=rules,
        arrivals=f"replayed from {arrivals_csv}" if arrivals_csv is not None else "generated",
    )
    for policy in policies:
        result.per_seed[policy], result.breaches[policy], result.unread[policy] = [], [], []
        result.overtime_min[policy] = []
        result.waits[policy] = {c: [] for c in CLASSES}
    for seed in result.seeds:
        studies = draw_studies(scenario, models, seed, arrivals, probabilities)
        result.studies.append(len(studies))
        result.critical.append(sum(s.critical for s in studies))
        for policy in policies:
            night = simulate_night(studies, scenario, policy, rules, clock)
            figures, shares, waits = _night_figures(night, rules)
            result.per_seed[policy].append(figures)
            result.breaches[policy].append(shares)
            result.unread[policy].append(len(night.unread))
            result.overtime_min[policy].append(night.overtime_us / _US_PER_MIN)
            for klass in CLASSES:
                result.waits[policy][klass].extend(waits[klass])
        if progress:
            progress(f"seed {seed}: {len(studies)} studies, {result.critical[-1]} critical")
    return result


# ------------------------------------------------------------------------------------------------ output


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci else "")


def format_table(summary: Mapping[str, Any], with_ci: bool = False) -> str:
    """The per-policy, per-class wait table as plain text (minutes; mean over seeds of each night's figure)."""
    header = f"{'policy':<11} {'class':<9} {'n/night':>8} {'median':>{20 if with_ci else 8}} " \
             f"{'p90':>{20 if with_ci else 8}} {'max':>{20 if with_ci else 8}}"  # fmt: skip
    lines = [header, "-" * len(header)]
    width = 20 if with_ci else 8
    for name, classes in summary["policies"].items():
        for klass in (*CLASSES, ALL):
            entry = classes[klass]
            cells = [
                _fmt(entry[f"{s}_min"], entry[f"{s}_ci"] if with_ci else None).rjust(width)
                for s in ("median", "p90", "max")
            ]
            lines.append(f"{name:<11} {klass:<9} {entry['n_per_night']:>8.1f} {' '.join(cells)}")
    return "\n".join(lines)


def _markdown_table(summary: Mapping[str, Any]) -> list[str]:
    lines = [
        "| policy | class | studies/night | median wait, min (95% CI) | p90, min (95% CI) | max, min (95% CI) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, classes in summary["policies"].items():
        for klass in (*CLASSES, ALL):
            entry = classes[klass]
            cells = [_fmt(entry[f"{s}_min"], entry[f"{s}_ci"]) for s in ("median", "p90", "max")]
            lines.append(f"| {name} | {klass} | {entry['n_per_night']:.1f} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(result: SimulationResult, summary: Mapping[str, Any], plot_name: str | None) -> str:
    """The markdown report: scenario, waits per policy and class, targets against FIFO, breaches per site."""
    scenario = result.scenario
    info = summary["scenario"]
    lines = [
        f"# Simulated night: {scenario.name}",
        "",
        scenario.description.strip(),
        "",
        f"- scenario: `{result.source}` ({'generated' if scenario.generated else 'recorded'});"
        f" arrivals {info['arrivals']}",
        f"- {info['seeds']} seeds; {info['studies_per_night']} studies and {info['critical_per_night']} critical"
        " positives per night on average",
        f"- {info['radiologists']} radiologists, {info['sites']} sites",
    ]
    for name, model in info["models"].items():
        lines.append(
            f"- model `{name}` {model['version']} ({model['state']}): sensitivity {model['sensitivity']:.3f},"
            f" specificity {model['specificity']:.3f} ({model['operating_point']})"
        )
    lines += [
        "",
        "Waits are arrival to read start, in minutes. Each figure is the mean over seeds of one night's median,"
        " 90th percentile or maximum, with its 95% t-interval over seeds. Classes: `critical` = ground-truth"
        " critical positives (whatever their clinical priority); `stat`, `urgent`, `routine` = the other studies by"
        " clinical priority.",
        "",
        *_markdown_table(summary),
        "",
    ]
    if summary["targets"]:
        lines += [
            "## Against FIFO",
            "",
            f"Targets: critical median <= {TARGET_CRITICAL_MEDIAN} x FIFO's, routine median <= {TARGET_ROUTINE_MEDIAN}"
            f" x FIFO's, every class's maximum <= {TARGET_MAX} x FIFO's.",
            "",
            "| policy | critical median | routine median | max: critical / stat / urgent / routine | targets met |",
            "|---|---:|---:|---|---|",
        ]
        for name, t in summary["targets"].items():
            maxima = " / ".join("-" if t["max_vs_fifo"][k] is None else f"{t['max_vs_fifo'][k]:.2f}" for k in CLASSES)
            crit = "-" if t["critical_median_vs_fifo"] is None else f"{t['critical_median_vs_fifo']:.2f}"
            rout = "-" if t["routine_median_vs_fifo"] is None else f"{t['routine_median_vs_fifo']:.2f}"
            lines.append(f"| {name} | {crit} | {rout} | {maxima} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    lines += [
        "## Contract breaches per site",
        "",
        "Share of a site's studies read later than its turnaround target for the study's clinical priority (stat for"
        " critical positives); an unread study counts as a breach. Mean over seeds (95% CI).",
        "",
    ]
    policies = list(summary["breaches"])
    lines.append("| site | time zone | targets stat / urgent / routine, min | " + " | ".join(policies) + " |")
    lines.append("|---|---|---|" + "---:|" * len(policies))
    for spec in scenario.sites:
        targets = " / ".join(
            _fmt(result.rules.target_min(spec.name, level)) for level in (PriorityLevel.STAT, PriorityLevel.URGENT,
                                                                           PriorityLevel.ROUTINE)
        )  # fmt: skip
        cells = []
        for policy in policies:
            entry = summary["breaches"][policy][spec.name]
            ci = entry["ci"]
            cells.append("-" if entry["share"] is None else
                         f"{entry['share']:.1%}" + (f" ({ci[0]:.1%}-{ci[1]:.1%})" if ci else ""))  # fmt: skip
        lines.append(f"| {spec.name} | {spec.time_zone} | {targets} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Unread at the end (per night): "
        + ", ".join(f"{p} {v}" for p, v in summary["unread_per_night"].items())
        + "; overtime after the last shift (minutes): "
        + ", ".join(f"{p} {v}" for p, v in summary["overtime_min"].items())
        + ".",
    ]
    if plot_name:
        lines += ["", f"![Wait-to-read CDF per class and policy]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_wait_cdfs(result: SimulationResult, path: Path) -> None:
    """One panel per class: the cumulative share of studies read within x minutes, one line per policy.

    Raises:
        MissingDependencyError: when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "train") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), dpi=80)
    for ax, klass in zip(axes.flat, CLASSES, strict=True):
        for policy in result.policies:
            waits = np.sort(np.array(result.waits[policy][klass]))
            if not len(waits):
                continue
            ax.step(waits, np.arange(1, len(waits) + 1) / len(waits), where="post", label=policy, linewidth=1.3)
        ax.set_title(f"{klass} ({len(result.waits[result.policies[0]][klass])} studies, all seeds)", fontsize=10)
        ax.set_xlabel("wait to read start (min)")
        ax.set_ylabel("share read")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{result.scenario.name}: wait-to-read CDF, {len(result.seeds)} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: SimulationResult, out: Path) -> dict[str, Path]:
    """Write report.md, summary.json and waits-cdf.png under `out`; returns their paths."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    plot = out / "waits-cdf.png"
    plot_wait_cdfs(result, plot)
    report = out / "report.md"
    report.write_text(report_markdown(result, summary, plot.name))
    data = out / "summary.json"
    data.write_text(json.dumps(summary, indent=2) + "\n")
    return {"report": report, "summary": data, "plot": plot}
