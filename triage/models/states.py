"""Model states per site (active, shadow, off), where a model starts, and what a validation report must show.

Pure logic, no database: `triage.worklist.model_states` keeps the states and their history. Prioritisation rests
on this module: only an `active` model's flags may raise a study's priority; a `shadow` model runs on live traffic
but its findings change nothing a radiologist or a hospital sees; an `off` model does not run for that site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from triage.config import ValidationThresholds
from triage.models.card import ModelCard

# The site of a study whose sender named no institution; a state set for ANY_SITE applies where a site has none.
UNKNOWN_SITE = ""
ANY_SITE = "*"


class ModelState(StrEnum):
    """What a model may do at a site."""

    ACTIVE = "active"  # runs; its flags raise priority as the site's policy says
    SHADOW = "shadow"  # runs; findings kept and shown to admins, marked shadow; never change priority or outputs
    OFF = "off"  # does not run for the site

    @classmethod
    def parse(cls, value: str) -> ModelState:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(f"unknown model state {value!r}; valid: {[s.value for s in cls]}") from None


def site_label(site: str) -> str:
    """How a site key reads in messages: the institution, or words for the two special keys."""
    if site == UNKNOWN_SITE:
        return "(no institution)"
    if site == ANY_SITE:
        return "(every site)"
    return site


@dataclass(frozen=True)
class SiteState:
    """The state of one model version at one site, and where it came from.

    Attributes:
        source: "card" when no one has set it (the default from the card), "site" when set for this site,
            "all-sites" when set for every site (ANY_SITE).
        reason: Why, in words ("card: trained on synthetic data", "promoted on report 3f2a...").
        threshold: The operating point chosen for this site from a validation report; None: the card's.
        report: What the validation report behind an activation showed (its digest and figures), if any.
    """

    model: str
    version: str
    site: str
    state: ModelState
    source: str
    reason: str
    threshold: float | None = None
    report: Mapping[str, Any] | None = None
    changed_by: str = ""
    changed_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "site": self.site,
            "state": self.state.value,
            "source": self.source,
            "reason": self.reason,
            "threshold": self.threshold,
            "report": dict(self.report) if self.report else None,
            "changed_by": self.changed_by,
            "changed_at": self.changed_at.isoformat() if self.changed_at else None,
        }


def default_state(
    card: ModelCard, earlier_version: str | None, require_local_validation: bool
) -> tuple[ModelState, str]:
    """Where a model version starts at a site nobody has set it for.

    A model trained on synthetic data, one whose card declares no validation, and any new version of a model
    (an earlier version was installed or recorded) start in shadow: they run, and nothing they flag moves a
    study until a site activates them on a passing local validation report. A card that declares an external
    validation (its authors' published figures) starts active, unless the site requires local validation.

    Args:
        card: The version's card.
        earlier_version: An earlier version of the same model known to this service, if any.
        require_local_validation: The site requires a local report before any model raises priority.

    Returns:
        The state and the reason in words.
    """
    if card.synthetic:
        return ModelState.SHADOW, "card: trained on synthetic data, not validated on real studies"
    if earlier_version is not None:
        return ModelState.SHADOW, f"new version (version {earlier_version} was installed before): shadow until promoted"
    if card.validation.status == "none":
        return ModelState.SHADOW, "card: not validated"
    if require_local_validation and card.validation.status != "local":
        return ModelState.SHADOW, (
            f"card: {card.validation.status} validation only; this service requires a local validation report"
        )
    return ModelState.ACTIVE, f"card: {card.validation.status} validation ({card.validation.summary or 'see card'})"


def report_problems(
    report: Mapping[str, Any], model: str, version: str, site: str, thresholds: ValidationThresholds
) -> list[str]:
    """Why a validation report does not allow `model` `version` to become active at `site` (empty: it does).

    The report is `report.json` from `triage models evaluate`: it must be for this model and version, on this
    site's studies, and meet every threshold at the operating point it chose.
    """
    problems: list[str] = []
    if report.get("model") != model:
        problems.append(f"the report is for model {report.get('model')!r}, not {model!r}")
    if report.get("version") != version:
        problems.append(f"the report is for version {report.get('version')!r}, not {version!r}")
    if report.get("site") != site:
        problems.append(f"the report is for site {site_label(str(report.get('site')))!r}, not {site_label(site)!r}")
    n = int(report.get("n") or 0)
    positives = int(report.get("n_positive") or 0)
    negatives = n - positives
    if n < thresholds.min_cases:
        problems.append(f"{n} cases, the site asks for at least {thresholds.min_cases}")
    if positives < thresholds.min_positives:
        problems.append(f"{positives} positive cases, the site asks for at least {thresholds.min_positives}")
    if negatives < thresholds.min_negatives:
        problems.append(f"{negatives} negative cases, the site asks for at least {thresholds.min_negatives}")
    auc = report.get("roc_auc")
    if auc is None or float(auc) < thresholds.min_auc:
        problems.append(f"ROC AUC {auc}, the site asks for at least {thresholds.min_auc}")
    counts = report.get("confusion_matrix") or {}
    for name, floor, hits, total in (
        ("sensitivity", thresholds.min_sensitivity_lower_ci, counts.get("tp"), _sum(counts, "tp", "fn")),
        ("specificity", thresholds.min_specificity_lower_ci, counts.get("tn"), _sum(counts, "tn", "fp")),
    ):
        interval = report.get(f"{name}_ci95")
        lower = float(interval[0]) if interval else None
        if lower is not None and hits is not None and total:
            # A percentile bootstrap collapses to [1, 1] when every case is right (20 of 20): the Wilson score
            # bound of the same counts does not, so the gate takes the lower of the two.
            lower = min(lower, wilson_lower(int(hits), int(total)))
        if lower is None or lower < floor:
            problems.append(f"{name} lower 95% bound {lower}, the site asks for at least {floor}")
    return problems


def _sum(counts: Mapping[str, Any], *keys: str) -> int | None:
    values = [counts.get(k) for k in keys]
    if any(v is None for v in values):
        return None
    return sum(int(v) for v in values if v is not None)


def wilson_lower(successes: int, n: int, z: float = 1.959964) -> float:
    """The lower end of the Wilson score 95% interval of a proportion (0 for n = 0)."""
    if n <= 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)
