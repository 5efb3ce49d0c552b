"""How each model behaves on live traffic, per site: flag rate, probabilities, inputs, agreement and drift.

Read from what the worklist already keeps (each study's findings, stamped shadow or not, with the header facts of
the series they came from; the analysis runs' stage times; radiologists' feedback), so nothing here slows an
analysis. Two uses:

- shadow comparison: while a version runs in shadow, how often it agrees with the active model's call on the
  same studies and with radiologists' feedback, its flag rate and latency, before anyone promotes it;
- drift watch: the flag rate in a recent window against its expected band (the validation report's flag rate,
  else the model's own baseline weeks), and the distribution of probabilities and of input metadata
  (manufacturer, kernel, slice thickness, pixel spacing, view, age band) against the baseline (population
  stability index). A flag rate outside its band raises an alert.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from triage.domain import Finding
from triage.worklist.accounts import FeedbackRow, Verdict
from triage.worklist.tables import AnalysisRun, Study

# Finding detail that carries the header facts of the analysed series (written by triage.analysis).
INPUT_DETAIL = "input"
# Metadata whose distribution drift watch compares.
INPUT_KEYS = ("manufacturer", "scanner", "kernel", "slice_thickness", "pixel_spacing", "view", "age_band")
PROBABILITY_BINS = 10
# Population stability index above which a distribution counts as shifted (a common rule of thumb: 0.1 slight,
# 0.25 major).
PSI_ALERT = 0.25
# Fewer studies than this in a window and its rate says too little to alert on.
MIN_STUDIES = 20
# Width of the expected band in standard errors of a binomial proportion (about 99.7% for a stable rate).
BAND_SIGMAS = 3.0


@dataclass
class Activity:
    """One model version at one site over one window."""

    model: str
    version: str
    site: str
    shadow: bool
    studies: int = 0
    flagged: int = 0
    probabilities: list[float] = field(default_factory=list)
    inputs: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # Studies where an active model reported the same finding: (this model's flag, the active one's flag).
    paired: list[tuple[bool, bool]] = field(default_factory=list)
    # Studies with radiologist feedback on the finding: (this model's flag, the radiologist's truth).
    judged: list[tuple[bool, int]] = field(default_factory=list)
    inference_s: list[float] = field(default_factory=list)

    @property
    def flag_rate(self) -> float | None:
        return self.flagged / self.studies if self.studies else None

    def to_dict(self) -> dict[str, Any]:
        agree_active = sum(a == b for a, b in self.paired)
        agree_reader = sum(bool(a) == bool(t) for a, t in self.judged)
        return {
            "model": self.model,
            "version": self.version,
            "site": self.site,
            "shadow": self.shadow,
            "studies": self.studies,
            "flagged": self.flagged,
            "flag_rate": self.flag_rate,
            "probability_quantiles": _quantiles(self.probabilities),
            "probability_histogram": histogram(self.probabilities),
            "inputs": {key: dict(counts.most_common()) for key, counts in self.inputs.items()},
            "agreement_with_active": agree_active / len(self.paired) if self.paired else None,
            "studies_with_active": len(self.paired),
            "agreement_with_radiologists": agree_reader / len(self.judged) if self.judged else None,
            "studies_with_feedback": len(self.judged),
            "inference_s_median": _median(self.inference_s),
        }


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p10": at(0.1), "p50": at(0.5), "p90": at(0.9)}


def _median(values: Sequence[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def histogram(probabilities: Iterable[float], bins: int = PROBABILITY_BINS) -> list[int]:
    counts = [0] * bins
    for p in probabilities:
        counts[min(bins - 1, max(0, int(float(p) * bins)))] += 1
    return counts


def psi(expected: Mapping[str, float] | Sequence[float], actual: Mapping[str, float] | Sequence[float]) -> float:
    """Population stability index between two distributions given as counts (a list of bins or a mapping of
    categories); 0 when identical. Empty bins get a small floor so that a new category counts, finitely."""
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        keys = sorted(set(expected) | set(actual))
        e = [float(expected.get(k, 0)) for k in keys]
        a = [float(actual.get(k, 0)) for k in keys]
    elif not isinstance(expected, Mapping) and not isinstance(actual, Mapping):
        e, a = [float(v) for v in expected], [float(v) for v in actual]
    else:
        raise TypeError("psi compares two mappings of categories or two lists of bins, not one of each")
    total_e, total_a = sum(e), sum(a)
    if not total_e or not total_a:
        return 0.0
    floor = 1e-4
    value = 0.0
    for x, y in zip(e, a, strict=True):
        pe, pa = max(x / total_e, floor), max(y / total_a, floor)
        value += (pa - pe) * math.log(pa / pe)
    return value


def expected_band(rate: float, studies: int, sigmas: float = BAND_SIGMAS) -> tuple[float, float]:
    """The band a flag rate should stay in over `studies` studies when its true rate is `rate`."""
    spread = sigmas * math.sqrt(max(rate * (1 - rate), 1e-6) / max(studies, 1))
    return max(0.0, rate - spread), min(1.0, rate + spread)


def thickness_band(mm: Any) -> str:
    if mm is None:
        return "unknown"
    mm = float(mm)
    return "<= 1.5 mm" if mm <= 1.5 else "1.5-3 mm" if mm <= 3.0 else "> 3 mm"


def spacing_band(mm: Any) -> str:
    if mm is None:
        return "unknown"
    mm = float(mm)
    return "< 0.2 mm" if mm < 0.2 else "0.2-0.5 mm" if mm < 0.5 else "0.5-1 mm" if mm < 1.0 else ">= 1 mm"


def age_band(years: Any) -> str:
    if years is None:
        return "unknown"
    years = float(years)
    return "under 18" if years < 18 else "18-39" if years < 40 else "40-64" if years < 65 else "65 and over"


def input_facts(attributes: Mapping[str, Any]) -> dict[str, str]:
    """The header facts drift watch follows, from a series' routing attributes (bands, no identifiers)."""
    return {
        "manufacturer": str(attributes.get("Manufacturer") or "unknown"),
        "scanner": str(attributes.get("ManufacturerModelName") or "unknown"),
        "kernel": str(attributes.get("ConvolutionKernel") or "none"),
        "slice_thickness": thickness_band(attributes.get("SliceThickness")),
        "pixel_spacing": spacing_band(attributes.get("PixelSpacingMm")),
        "view": str(attributes.get("ViewPosition") or "unknown"),
        "age_band": age_band(attributes.get("PatientAgeYears")),
    }


def activity(engine: Engine, since: datetime, until: datetime, site: str | None = None) -> list[Activity]:
    """Each model version's activity per site over studies analysed in [since, until)."""
    query = select(Study.study_uid, Study.site, Study.findings).where(
        Study.analysis_finished_at >= since, Study.analysis_finished_at < until
    )
    if site is not None:
        query = query.where(Study.site == site)
    found: dict[tuple[str, str, str, bool], Activity] = {}
    by_study: dict[str, list[tuple[Activity, Finding]]] = defaultdict(list)
    with Session(engine) as session:
        for study_uid, study_site, stored in session.execute(query):
            findings = [Finding.model_validate(f) for f in stored or []]
            seen: set[tuple[str, str, str, bool]] = set()
            for finding in findings:
                key = (finding.model, finding.model_version, study_site, finding.shadow)
                entry = found.setdefault(key, Activity(*key))
                if key not in seen:  # one study counts once per model, flagged if any of its findings is
                    seen.add(key)
                    entry.studies += 1
                    entry.flagged += any(
                        f.flagged for f in findings if (f.model, f.model_version, f.shadow) == key[:2] + key[3:]
                    )
                    for name, value in dict(finding.details.get(INPUT_DETAIL) or {}).items():
                        entry.inputs[name][str(value)] += 1
                entry.probabilities.append(float(finding.probability))
                by_study[study_uid].append((entry, finding))
        _pair_with_active(by_study)
        _judge_with_feedback(session, by_study)
        _latency(session, found, since, until)
    return sorted(found.values(), key=lambda a: (a.model, a.version, a.site, a.shadow))


def _pair_with_active(by_study: Mapping[str, list[tuple[Activity, Finding]]]) -> None:
    for pairs in by_study.values():
        active = {f.label: f for _, f in pairs if not f.shadow}
        for entry, finding in pairs:
            other = active.get(finding.label)
            if finding.shadow and other is not None:
                entry.paired.append((finding.flagged, other.flagged))


def _judge_with_feedback(session: Session, by_study: Mapping[str, list[tuple[Activity, Finding]]]) -> None:
    if not by_study:
        return
    rows = session.execute(
        select(FeedbackRow.study_uid, FeedbackRow.label, FeedbackRow.verdict, FeedbackRow.ai_flagged)
        .where(FeedbackRow.study_uid.in_(list(by_study)))
        .order_by(FeedbackRow.at, FeedbackRow.id)
    ).all()
    truth: dict[tuple[str, str], int] = {}
    for study_uid, label, verdict, ai_flagged in rows:  # the latest word on a finding wins
        if verdict == Verdict.MISSED:
            truth[(study_uid, label)] = 1
        else:
            truth[(study_uid, label)] = int(bool(ai_flagged)) if verdict == Verdict.AGREE else int(not ai_flagged)
    for study_uid, pairs in by_study.items():
        for entry, finding in pairs:
            known = truth.get((study_uid, finding.label))
            if known is not None:
                entry.judged.append((finding.flagged, known))


def _latency(
    session: Session, found: Mapping[tuple[str, str, str, bool], Activity], since: datetime, until: datetime
) -> None:
    runs = session.execute(
        select(Study.site, AnalysisRun.stages)
        .join(Study, Study.study_uid == AnalysisRun.study_uid)
        .where(AnalysisRun.finished_at >= since, AnalysisRun.finished_at < until, AnalysisRun.status == "done")
    ).all()
    by_model: dict[tuple[str, str], list[float]] = defaultdict(list)
    for site, stages in runs:
        for stage in stages or []:
            if stage.get("stage") == "inference" and stage.get("model"):
                by_model[(stage["model"], site)].append(float(stage.get("seconds") or 0.0))
    for (model, _version, site, _shadow), entry in found.items():
        entry.inference_s = by_model.get((model, site), [])


@dataclass(frozen=True)
class DriftAlert:
    """A model's behaviour at a site outside what was expected."""

    model: str
    version: str
    site: str
    kind: str  # "flag-rate", "probabilities", "inputs:<key>"
    message: str
    value: float
    expected: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "site": self.site,
            "kind": self.kind,
            "message": self.message,
            "value": self.value,
            "expected": list(self.expected) if self.expected else None,
        }


def drift(
    recent: Sequence[Activity],
    baseline: Sequence[Activity],
    expected_rates: Mapping[tuple[str, str, str], float] | None = None,
    min_studies: int = MIN_STUDIES,
) -> list[DriftAlert]:
    """Compare a recent window with the baseline: the flag rate against its band (the validation report's rate
    where the model was validated for the site, else the baseline's), probabilities and inputs by PSI."""
    base = {(a.model, a.version, a.site, a.shadow): a for a in baseline}
    alerts: list[DriftAlert] = []
    for now in recent:
        if now.studies < min_studies:
            continue
        before = base.get((now.model, now.version, now.site, now.shadow))
        where = f"{now.model} {now.version} at {now.site or '(no institution)'}"
        expected = (expected_rates or {}).get((now.model, now.version, now.site))
        source = "its validation report"
        if expected is None and before is not None and before.studies >= min_studies:
            expected, source = before.flag_rate, f"its baseline ({before.studies} studies)"
        rate = now.flag_rate or 0.0
        if expected is not None:
            low, high = expected_band(expected, now.studies)
            if not low <= rate <= high:
                alerts.append(
                    DriftAlert(
                        now.model,
                        now.version,
                        now.site,
                        "flag-rate",
                        f"{where}: flag rate {rate:.1%} over {now.studies} studies, expected {low:.1%}-{high:.1%}"
                        f" from {source} ({expected:.1%})",
                        rate,
                        (low, high),
                    )
                )
        if before is None or before.studies < min_studies:
            continue
        shift = psi(histogram(before.probabilities), histogram(now.probabilities))
        if shift > PSI_ALERT:
            alerts.append(
                DriftAlert(
                    now.model,
                    now.version,
                    now.site,
                    "probabilities",
                    f"{where}: probability distribution shifted (PSI {shift:.2f})",
                    shift,
                )  # fmt: skip
            )
        for key in INPUT_KEYS:
            if key in now.inputs and key in before.inputs:
                shift = psi(before.inputs[key], now.inputs[key])
                if shift > PSI_ALERT:
                    top = ", ".join(f"{k} {v}" for k, v in now.inputs[key].most_common(3))
                    alerts.append(
                        DriftAlert(
                            now.model,
                            now.version,
                            now.site,
                            f"inputs:{key}",
                            f"{where}: {key.replace('_', ' ')} mix shifted (PSI {shift:.2f}; now {top})",
                            shift,
                        )  # fmt: skip
                    )
    return alerts


def windows(
    now: datetime, window_h: float, baseline_days: float
) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
    """(recent window, baseline window before it)."""
    recent_start = now - timedelta(hours=window_h)
    return (recent_start, now), (recent_start - timedelta(days=baseline_days), recent_start)
