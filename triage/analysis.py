"""One study from "ready" to "worklist updated": route its series, run the models, record the outcome.

This is the one orchestration of a study's analysis: the scheduler of `triage serve` and `triage infer` (on an
in-memory worklist) both call `analyse_study`. It lives in its own layer, below `serve` and `cli` and above
`pipelines` and `worklist`, because it joins the two: routing and the runner on one side, the worklist on the
other, and neither of those may import the other.

Clinical fail-safe: whatever happens here, the study stays on the worklist. An AI failure is recorded as
ai_status failed with its reason, and the priority policy keeps the clinical priority (AI never lowers it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from triage.dicom.series import with_routing_attributes
from triage.domain import (
    AIStatus,
    Finding,
    RoutingDecision,
    SeriesInfo,
    SeriesResult,
    SkipReason,
    StageTime,
    StageTimings,
    utcnow,
)
from triage.errors import ConflictError, NotFoundError
from triage.models.card import ModelCard
from triage.models.registry import ModelRegistry
from triage.models.states import ModelState, SiteState, site_label
from triage.pipelines.routing import RoutingRules, route_study
from triage.pipelines.runner import Runner, classify_failure
from triage.storage import InstanceSource, Store, overlay_bytes, segmentation_bytes
from triage.worklist.model_states import ModelStates
from triage.worklist.monitoring import INPUT_DETAIL, input_facts
from triage.worklist.repository import Worklist
from triage.worklist.sites import Site

log = logging.getLogger(__name__)


@dataclass
class AnalysisOutcome:
    """What one analysis did, with per-stage seconds (the benchmark reads these)."""

    study_uid: str
    ai_status: AIStatus
    reason: str
    findings: list[Finding] = field(default_factory=list)
    routing: list[RoutingDecision] = field(default_factory=list)
    results: list[SeriesResult] = field(default_factory=list)
    timings: StageTimings = field(default_factory=StageTimings)
    superseded: bool = False
    # A transient failure was recorded and the study queued for another attempt.
    retrying: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """How transient AI failures are retried: `max_attempts` per study, the n-th retry after
    `backoff_s * 3**(n-1)` seconds. The default (one attempt) never retries."""

    max_attempts: int = 1
    backoff_s: float = 10.0

    def delay_s(self, failed_attempts: int) -> float:
        return float(self.backoff_s) * 3 ** max(0, failed_attempts - 1)


def _earlier_findings(worklist: Worklist, study_uid: str, models: set[str], now: datetime) -> list[Finding]:
    """The study's stored findings from `models`, marked as carried over from an earlier analysis."""
    return [f.carried_over() for f in worklist.get_study(study_uid, now).findings if f.model in models]


def _routing_record(
    series: SeriesInfo, decision: RoutingDecision, result: SeriesResult | None = None
) -> RoutingDecision:
    """The decision as the study page shows it: with the series it is about and, once run, how it went."""
    update: dict[str, Any] = {
        "modality": series.modality,
        "description": str(series.attributes.get("SeriesDescription") or ""),
        "n_instances": series.n_instances,
    }
    if result is not None:
        update["analysis"] = "done" if result.ok else f"failed: {result.error}"
        update["model_version"] = result.model_version
    return decision.model_copy(update=update)


def _record(
    worklist: Worklist,
    study_uid: str,
    generation: int,
    findings: list[Finding],
    routing: list[RoutingDecision],
    status: AIStatus,
    reason: str,
    now: Callable[[], datetime],
    attempts: int = 3,
    failure_kind: str = "",
    stages: list[StageTime] | None = None,
) -> None:
    """Store the outcome, retrying a busy or briefly unreachable database; a study must not stay "analysing".

    Raises:
        Exception: the database's error when every attempt failed (the watcher logs it; on the next start
            `recover_interrupted` re-queues the study).
    """
    for attempt in range(1, attempts + 1):
        try:
            worklist.finish_analysis(
                study_uid,
                generation,
                findings,
                routing,
                status,
                reason,
                now(),
                failure_kind=failure_kind,
                stages=stages,
            )
            return
        except (ConflictError, NotFoundError, ValueError):
            raise  # not transient
        except Exception:  # noqa: BLE001 - database errors differ per driver
            if attempt == attempts:
                raise
            log.warning("study %s: storing the analysis failed (attempt %d); retrying", study_uid, attempt)
            time.sleep(0.5 * attempt)


def apply_states(findings: list[Finding], states: dict[tuple[str, str], SiteState]) -> list[Finding]:
    """Mark each finding shadow or not from its model's state at the study's site, and apply the site's operating
    point where a validation report chose one. Findings of active models come first, so that the position of
    every finding a radiologist sees is the same whether or not shadow findings are shown.

    Prioritisation: a shadow finding never raises a study (the policy skips it) and is never sent out.
    """
    marked: list[Finding] = []
    for finding in findings:
        state = states.get((finding.model, finding.model_version))
        update: dict[str, Any] = {"shadow": state is not None and state.state is not ModelState.ACTIVE}
        if state is not None and state.threshold is not None and _is_reported_finding(state, finding):
            update["flagged"] = finding.probability >= state.threshold
            update["details"] = {**finding.details, "site_threshold": state.threshold}
        marked.append(finding.model_copy(update=update))
    return sorted(marked, key=lambda f: f.shadow)


def _with_inputs(finding: Finding, series: dict[str, SeriesInfo]) -> Finding:
    """The finding with the header facts of its series (manufacturer, kernel, thickness, view, age band) that
    drift watch follows; bands only, no identifiers."""
    analysed = series.get(finding.series_uid)
    if analysed is None:
        return finding
    return finding.model_copy(update={"details": {**finding.details, INPUT_DETAIL: input_facts(analysed.attributes)}})


def _is_reported_finding(state: SiteState, finding: Finding) -> bool:
    """Whether `finding` is the one the site's validation report chose its operating point for."""
    label = (state.report or {}).get("finding")
    return label is None or label == finding.label


def save_segmentation(store: Store | None, study_uid: str, finding: Finding) -> str | None:
    """Store a finding's segmentation on the source images (for the DICOM Segmentation sent to the PACS); returns
    its name. None without one or without a store."""
    if finding.segmentation is None or store is None:
        return None
    name = f"{finding.model}-{finding.model_version}-{finding.label}-seg.npz"
    store.put_overlay(study_uid, name, segmentation_bytes(finding.segmentation))
    return name


def save_overlay(store: Store | None, study_uid: str, finding: Finding) -> str | None:
    """Store a finding's overlay with the study's other overlays; returns its name (what the finding records).
    None without an overlay, or without a store to keep it in (`triage infer`)."""
    if finding.overlay is None or store is None:
        return None
    # With the version: a newer version on trial in shadow must not overwrite the active version's overlay.
    name = f"{finding.model}-{finding.model_version}-{finding.label}.npz"
    store.put_overlay(study_uid, name, overlay_bytes(finding.overlay))
    return name


def _card_in_use(registry: ModelRegistry, plan: dict[str, list[SiteState]] | None, name: str) -> ModelCard:
    """The card of the version whose outcome is the study's (its intended use decides whether a series is
    analysed), else the newest installed."""
    version = plan[name][0].version if plan and plan.get(name) else None
    return registry.get(name, version).card


def _versions(plan: dict[str, list[SiteState]] | None, model: str) -> list[str | None]:
    """The versions of `model` to run, primary first (None: the newest installed)."""
    if plan is None or model not in plan:
        return [None]
    return [state.version for state in plan[model]]


def _is_primary(plan: dict[str, list[SiteState]] | None, result: SeriesResult) -> bool:
    """Whether `result` is from the version whose outcome is the study's (not a shadow version on trial)."""
    if plan is None or result.model not in plan or not result.model_version:
        return True
    return result.model_version == plan[result.model][0].version


def _is_active(plan: dict[str, list[SiteState]] | None, result: SeriesResult) -> bool:
    """Whether `result` comes from a version active at the site (without states: yes)."""
    if plan is None or result.model not in plan:
        return True
    return any(s.version == result.model_version and s.state is ModelState.ACTIVE for s in plan[result.model])


def _unless_off(decision: RoutingDecision, plan: dict[str, list[SiteState]] | None, site: str) -> RoutingDecision:
    """The decision, or a skip when no version of its model runs at the study's site (it is off there)."""
    if plan is None or decision.model is None or decision.model in plan:
        return decision
    return decision.model_copy(
        update={"model": None, "reason": f"{SkipReason.MODEL_OFF}: {decision.model} is off for site {site_label(site)}"}
    )


def _unless_disabled(decision: RoutingDecision, site: Site | None) -> RoutingDecision:
    """The decision, or a skip when the study's site does not allow its model (the site record's `models`)."""
    if site is None or decision.model is None or site.allows_model(decision.model):
        return decision
    why = f"{SkipReason.MODEL_OFF}: {decision.model} is not enabled for site {site.name} (its models: "
    why += (", ".join(site.models or []) or "none") + ")"
    return decision.model_copy(update={"model": None, "reason": why})


def summarise(results: list[SeriesResult], decisions: list[RoutingDecision]) -> tuple[AIStatus, str]:
    """The study's AI status and a one-line reason a radiologist can read."""
    if not results:
        # A series outside a model's intended use says why in the card's words: the radiologist sees that the
        # model was not applied to this patient, and why, rather than a bare "not analysed".
        outside = [
            d.reason.split(": ", 1)[1] for d in decisions if d.reason.startswith(f"{SkipReason.OUTSIDE_INTENDED_USE}:")
        ]
        if outside:
            return AIStatus.NOT_APPLICABLE, "; ".join(dict.fromkeys(outside))
        skipped = sorted({d.reason.split(":")[0] for d in decisions if d.model is None})
        return AIStatus.NOT_APPLICABLE, "no series matched a model (" + ", ".join(skipped or ["no series"]) + ")"
    failed = [r for r in results if not r.ok]
    if len(failed) == len(results):
        return AIStatus.FAILED, "; ".join(f"{r.model}: {r.error}" for r in failed)
    if failed:
        return AIStatus.DONE, "partly analysed; " + "; ".join(f"{r.model} failed: {r.error}" for r in failed)
    return AIStatus.DONE, "analysed by " + ", ".join(sorted({f"{r.model} {r.model_version}" for r in results}))


def analyse_study(
    study_uid: str,
    worklist: Worklist,
    registry: ModelRegistry,
    rules: RoutingRules,
    runner: Runner,
    store: Store | None,
    now: Callable[[], datetime] = utcnow,
    unavailable_models: set[str] | None = None,
    retry: RetryPolicy | None = None,
    generation: int | None = None,
    source: InstanceSource | None = None,
    states: ModelStates | None = None,
) -> AnalysisOutcome:
    """Analyse one ready study and record the result on the worklist. Never raises for an AI failure.

    A transient failure (a worker died, memory ran out, a deadline passed) queues the study for another
    attempt after a backoff, up to `retry.max_attempts`; when the last attempt fails too, the study is
    failed with failure kind "transient", so that it is re-queued once its model can run again. Permanent
    failures are not retried. Either way the study keeps its place and its earlier findings. A model that is off
    for the study's site does not run; the findings of a model in shadow there are kept, marked shadow, and
    never raise the study (`states`; without it every finding counts as active). Instances are read
    through `source` (by default `store`) and overlays written through `store`; without a store (`triage infer`
    reads a folder outside it) overlays are not kept.
    """
    retry = retry or RetryPolicy()
    timings = StageTimings()
    if generation is None:  # not claimed by a scheduler (tests, a one-off analysis)
        generation = worklist.begin_analysis(study_uid, now())
    findings: list[Finding] = []
    routing: list[RoutingDecision] = []
    results: list[SeriesResult] = []
    try:
        started = time.perf_counter()
        reader = source if source is not None else store
        if reader is None:
            raise ValueError("analyse_study needs a store or a source to read the study's instances from")
        series_list = [with_routing_attributes(s, reader) for s in worklist.series_of(study_uid)]
        timings.add("database", time.perf_counter() - started)
        installed = set(registry.names()) - (unavailable_models or set())
        site = worklist.site_of(study_uid)
        # Which versions of each model run here: the primary one (active, else the newest in shadow) and newer
        # versions on trial in shadow beside it. Without states (tests) the newest version of each runs.
        plan = states.plan(site) if states is not None else None
        site_record = worklist.sites.find(site)
        decisions = [
            _unless_disabled(_unless_off(d, plan, site), site_record)
            for d in route_study(
                series_list,
                rules,
                installed,
                admit=lambda name, s: _card_in_use(registry, plan, name).check_use(s.attributes),
            )
        ]
        by_uid = {s.series_uid: s for s in series_list}
        work = [
            (by_uid[d.series_uid], d.model_copy(update={"model_version": version}))
            for d in decisions
            if d.model is not None
            for version in _versions(plan, d.model)
        ]
        log.info("study %s: %d series, %d model runs", study_uid, len(series_list), len(work))
        everything = runner.analyse(study_uid, work) if work else []
        for result in everything:
            timings.merge(result.timings)
        # Only the primary versions decide the study's AI status and retries: a shadow version on trial that
        # fails is logged and costs nothing else.
        results = [r for r in everything if _is_primary(plan, r)]
        for trial in everything:
            if not trial.ok and not _is_primary(plan, trial):
                log.warning("study %s: shadow version %s %s failed: %s", study_uid, trial.model, trial.model_version,
                            trial.error)  # fmt: skip
        status, reason = summarise(results, decisions)
        if status is AIStatus.DONE and results and all(not _is_active(plan, r) for r in results):
            reason = "no model in use at this site for this study (" + reason.replace("analysed by", "on trial:") + ")"
        findings = [
            finding.model_copy(
                update={
                    "overlay_file": save_overlay(store, study_uid, finding),
                    "segmentation_file": save_segmentation(store, study_uid, finding),
                }
            )
            for result in everything
            for finding in result.findings
        ]
        site_states = {(st.model, st.version): st for versions in (plan or {}).values() for st in versions}
        findings = apply_states([_with_inputs(f, by_uid) for f in findings], site_states)
        failed_models = {r.model for r in results if not r.ok}
        if failed_models and status is not AIStatus.FAILED:
            # A model that failed this time keeps its earlier findings: an AI failure never lowers a priority.
            findings = sorted(
                findings + _earlier_findings(worklist, study_uid, failed_models, now()), key=lambda f: f.shadow
            )
        ran = {r.series_uid: r for r in results}  # the primary version's outcome per series
        routing = [_routing_record(by_uid[d.series_uid], d, ran.get(d.series_uid)) for d in decisions]
    except Exception as exc:  # noqa: BLE001 - fail safe: the study stays listed at its clinical priority
        log.exception("study %s: analysis failed outside the models", study_uid)
        transient, sentence = classify_failure(exc)
        status, reason, findings, routing = AIStatus.FAILED, sentence, [], []
        results = [SeriesResult("", "", "", False, [], sentence, StageTimings(), transient)]
    attempt = worklist.analysis_attempts(study_uid) + 1
    stages = [
        StageTime(
            stage=stage,
            seconds=round(seconds, 3),
            model=r.model,
            series_uid=r.series_uid,
            node_id=r.timings.nodes.get(stage, ""),
            attempts=attempt,
        )
        for r in results
        for stage, seconds in r.timings.seconds.items()
    ]
    transient_failures = [r for r in results if not r.ok and r.transient]
    failure_kind = ""
    if transient_failures:
        what = "; ".join(dict.fromkeys(f"{r.model}: {r.error}" if r.model else r.error for r in transient_failures))
        if attempt < retry.max_attempts:
            reason = f"AI analysis failed ({what}); retrying ({attempt + 1} of {retry.max_attempts})"
            retry_at = now() + timedelta(seconds=retry.delay_s(attempt))
            worklist.defer_analysis(study_uid, generation, reason, retry_at, now(), stages=stages)
            log.warning("study %s: attempt %d failed transiently (%s); retry at %s", study_uid, attempt, what, retry_at)
            return AnalysisOutcome(study_uid, AIStatus.PENDING, reason, [], routing, results, timings, retrying=True)
        if status is AIStatus.FAILED:
            failure_kind = "transient"
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            reason = f"{what}{tries}; re-queued when the model can run again"
    started = time.perf_counter()
    _record(
        worklist,
        study_uid,
        generation,
        findings,
        routing,
        status,
        reason,
        now,
        failure_kind=failure_kind,
        stages=stages,
    )
    timings.add("database", time.perf_counter() - started)
    log.info("study %s: ai_status=%s (%s)", study_uid, status, reason)
    return AnalysisOutcome(study_uid, status, reason, findings, routing, results, timings)
