"""Where a model version starts at a site, and what a validation report must show to activate it (pure logic)."""

from __future__ import annotations

import pytest

from triage.config import Settings, ValidationThresholds
from triage.models.card import Validation
from triage.models.registry import ModelRegistry
from triage.models.states import ModelState, default_state, report_problems


@pytest.fixture(scope="module")
def cards():
    registry = ModelRegistry(Settings().weights_dir)
    return registry.get("xr-chest-pneumothorax").card, registry.get("ct-head-ich").card


def test_a_synthetic_card_starts_in_shadow_whatever_the_site_requires(cards):
    xray, _ = cards
    for strict in (False, True):
        state, reason = default_state(xray, None, require_local_validation=strict)
        assert state is ModelState.SHADOW and "synthetic" in reason


def test_an_externally_validated_card_starts_active_unless_the_site_requires_local_validation(cards):
    _, ct = cards
    assert ct.validation.status == "external"
    assert default_state(ct, None, require_local_validation=False)[0] is ModelState.ACTIVE
    state, reason = default_state(ct, None, require_local_validation=True)
    assert state is ModelState.SHADOW and "local validation" in reason


def test_a_card_without_validation_and_any_new_version_start_in_shadow(cards):
    _, ct = cards
    unvalidated = ct.model_copy(update={"validation": Validation(status="none")})
    assert default_state(unvalidated, None, False) == (ModelState.SHADOW, "card: not validated")
    state, reason = default_state(ct, "0.9.0", False)
    assert state is ModelState.SHADOW and "new version" in reason and "0.9.0" in reason


def report(**changes):
    base = {
        "model": "xr-chest-pneumothorax",
        "version": "1.0.0",
        "site": "North",
        "n": 200,
        "n_positive": 60,
        "roc_auc": 0.93,
        "sensitivity_ci95": [0.85, 0.97],
        "specificity_ci95": [0.82, 0.9],
        "threshold": 0.8,
    }
    return {**base, **changes}


def test_a_report_that_meets_every_threshold_passes():
    assert report_problems(report(), "xr-chest-pneumothorax", "1.0.0", "North", ValidationThresholds()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"site": "South"}, "for site 'South', not 'North'"),
        ({"site": None}, "not 'North'"),
        ({"version": "0.9.0"}, "version '0.9.0'"),
        ({"model": "ct-head-ich"}, "model 'ct-head-ich'"),
        ({"n": 40, "n_positive": 20}, "40 cases"),
        ({"n_positive": 5}, "5 positive cases"),
        ({"n_positive": 190}, "10 negative cases"),
        ({"roc_auc": 0.7}, "ROC AUC 0.7"),
        ({"roc_auc": None}, "ROC AUC None"),
        ({"sensitivity_ci95": [0.6, 0.95]}, "sensitivity lower 95% bound 0.6"),
        ({"specificity_ci95": None}, "specificity lower 95% bound None"),
    ],
)
def test_a_report_that_falls_short_says_how(changes, message):
    problems = report_problems(report(**changes), "xr-chest-pneumothorax", "1.0.0", "North", ValidationThresholds())
    assert any(message in p for p in problems), problems


def test_the_lower_ci_bound_counts_not_the_point_estimate():
    lucky = report(sensitivity=0.9, sensitivity_ci95=[0.7, 0.98])  # a small set: a fine estimate, a wide interval
    problems = report_problems(lucky, "xr-chest-pneumothorax", "1.0.0", "North", ValidationThresholds())
    assert problems == ["sensitivity lower 95% bound 0.7, the site asks for at least 0.8"]


def test_a_perfect_small_set_is_judged_on_the_wilson_bound_not_the_collapsed_bootstrap():
    from triage.models.states import wilson_lower

    assert wilson_lower(20, 20) == pytest.approx(0.8389, abs=1e-3)  # by the formula; the bootstrap gives 1.0
    perfect = report(n=40, n_positive=20, sensitivity_ci95=[1.0, 1.0], specificity_ci95=[1.0, 1.0],
                     confusion_matrix={"tp": 20, "fn": 0, "tn": 20, "fp": 0})  # fmt: skip
    strict = ValidationThresholds(min_cases=40, min_sensitivity_lower_ci=0.9, min_specificity_lower_ci=0.5)
    problems = report_problems(perfect, "xr-chest-pneumothorax", "1.0.0", "North", strict)
    assert len(problems) == 1 and problems[0].startswith("sensitivity lower 95% bound 0.83"), problems
