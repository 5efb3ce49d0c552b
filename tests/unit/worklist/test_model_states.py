"""Model states per site in the database: defaults from the card, activation only on a passing report, audited,
rollback, new versions in shadow. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.model_versions import copy_version
from triage.config import ModelSettings, Settings, ValidationThresholds
from triage.errors import ConflictError
from triage.models.registry import ModelRegistry
from triage.models.states import ANY_SITE, ModelState
from triage.worklist.accounts import Accounts
from triage.worklist.db import create_engine_for, migrate
from triage.worklist.model_states import ModelStates, ValidationRefused

T0 = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)
XR = "xr-chest-pneumothorax"


def passing_report(site: str = "North", version: str = "1.0.0") -> dict:
    return {
        "model": XR,
        "version": version,
        "site": site,
        "finding": "pneumothorax",
        "threshold": 0.8722,
        "n": 150,
        "n_positive": 50,
        "roc_auc": 0.95,
        "roc_auc_ci95": [0.92, 0.98],
        "sensitivity": 0.92,
        "sensitivity_ci95": [0.84, 0.98],
        "specificity": 0.9,
        "specificity_ci95": [0.84, 0.95],
        "operating_points": [
            {
                "name": "sensitivity >= 0.90",
                "threshold": 0.9,
                "sensitivity": 0.9,
                "sensitivity_ci95": [0.83, 0.96],
                "specificity": 0.93,
                "specificity_ci95": [0.88, 0.97],
            },
        ],  # fmt: skip
    }


@pytest.fixture
def states(fresh_db_url: str, tmp_path: Path) -> ModelStates:
    url = fresh_db_url
    migrate(url)
    weights = tmp_path / "weights"
    shutil.copytree(Settings().weights_dir / XR, weights / XR)
    engine = create_engine_for(url)
    yield ModelStates(engine, ModelRegistry(weights), ModelSettings(validation=ValidationThresholds(min_cases=100)))
    engine.dispose()


def test_the_synthetic_model_starts_in_shadow_at_every_site(states: ModelStates) -> None:
    for site in ("North", "", ANY_SITE):
        state = states.states(site)[XR]
        assert state.state is ModelState.SHADOW and state.source == "card"


def test_activation_without_a_passing_report_is_refused_and_changes_nothing(states: ModelStates) -> None:
    with pytest.raises(ValidationRefused, match="cannot be set active directly"):
        states.set_state(XR, "North", "active", "ml", T0, "trust me")
    for report, message in (
        (passing_report(site="South"), "for site 'South'"),
        ({**passing_report(), "n": 60}, "60 cases"),
        ({**passing_report(), "specificity_ci95": [0.5, 0.9]}, "specificity lower 95% bound 0.5"),
    ):
        with pytest.raises(ValidationRefused, match=message):
            states.promote(XR, "North", report, "ml", T0)
    with pytest.raises(ValidationRefused, match="one site at a time"):
        states.promote(XR, ANY_SITE, passing_report(site=ANY_SITE), "ml", T0)
    assert states.states("North")[XR].state is ModelState.SHADOW
    assert states.history() == []


def test_activation_on_a_passing_report_is_per_site_and_audited(states: ModelStates) -> None:
    state = states.promote(XR, "North", passing_report(), "ml-engineer", T0, threshold=0.9)
    assert state.state is ModelState.ACTIVE and state.threshold == 0.9
    assert states.states("North")[XR].state is ModelState.ACTIVE
    assert states.states("South")[XR].state is ModelState.SHADOW  # validated for North only
    (change,) = states.history()
    assert (change["from"], change["to"], change["by"], change["action"]) == (
        "shadow",
        "active",
        "ml-engineer",
        "model-promote",
    )
    digest = states.states("North")[XR].report
    assert digest is not None and len(digest["sha256"]) == 64 and digest["n"] == 150
    (entry,) = Accounts(states.engine).audit_entries(action="model-promote")
    assert entry.user == "ml-engineer" and entry.detail["site"] == "North" and entry.detail["to"] == "active"
    assert entry.detail["report_sha256"] == digest["sha256"]
    json.dumps(entry.detail)  # JSON-ready for the audit page


def test_rollback_undoes_the_last_change_and_is_audited(states: ModelStates) -> None:
    states.promote(XR, "North", passing_report(), "ml", T0, threshold=0.9)
    states.set_state(XR, "North", "off", "admin", T0, "too many flags")
    assert states.states("North")[XR].state is ModelState.OFF
    back = states.rollback(XR, "North", "admin", T0, why="off by mistake")
    assert back.state is ModelState.ACTIVE and back.threshold == 0.9  # the activation's operating point returns
    again = states.rollback(XR, "North", "admin", T0)
    assert again.state is ModelState.SHADOW and again.threshold is None
    with pytest.raises(ConflictError, match="no change to roll back"):
        states.rollback(XR, "North", "admin", T0)
    actions = [(c["action"], c["to"]) for c in states.history()]
    assert actions == [
        ("model-promote", "active"),
        ("model-state", "off"),
        ("model-rollback", "active"),
        ("model-rollback", "shadow"),
    ]
    assert len(Accounts(states.engine).audit_entries(action="model-rollback")) == 2


def test_a_site_setting_overrides_the_every_site_one(states: ModelStates) -> None:
    states.set_state(XR, ANY_SITE, "off", "admin", T0, "not at our sites")
    assert states.states("South")[XR].state is ModelState.OFF
    assert states.states("South")[XR].source == "all-sites"
    states.promote(XR, "North", passing_report(), "ml", T0)
    assert states.states("North")[XR].state is ModelState.ACTIVE


def test_a_new_version_starts_in_shadow_even_where_the_old_one_was_active(states: ModelStates, tmp_path: Path) -> None:
    states.promote(XR, "North", passing_report(), "ml", T0)
    # Even a version whose card would start active on its own (real data, external validation) starts in shadow.
    external = {"status": "external", "summary": "published"}
    copy_version(states.registry.get(XR).directory.parent, "1.1.0", synthetic=False, validation=external)
    states.registry.refresh()
    state = states.states("North")[XR]
    assert (state.version, state.state) == ("1.1.0", ModelState.SHADOW)
    assert "new version" in state.reason
    status = {(s.version, s.site): s.state for s in states.status(["North"])}
    assert status[("1.0.0", "North")] is ModelState.ACTIVE and status[("1.1.0", "North")] is ModelState.SHADOW


def test_promotion_at_an_operating_point_checks_the_figures_there(states: ModelStates) -> None:
    report = passing_report()
    report["operating_points"] = [
        {"name": "sensitivity >= 0.95", "threshold": 0.41, "sensitivity": 0.96, "sensitivity_ci95": [0.9, 0.99],
         "specificity": 0.7, "specificity_ci95": [0.62, 0.78]},
        {"name": "sensitivity >= 0.80", "threshold": 0.93, "sensitivity": 0.85, "sensitivity_ci95": [0.81, 0.9],
         "specificity": 0.97, "specificity_ci95": [0.94, 0.99]},
    ]  # fmt: skip
    with pytest.raises(ValidationRefused, match="threshold 0.41.*specificity lower 95% bound 0.62"):
        states.promote(XR, "North", report, "ml", T0, operating_point="sensitivity >= 0.95")
    with pytest.raises(ValidationRefused, match="no figures at threshold 0.5"):
        states.promote(XR, "North", report, "ml", T0, threshold=0.5)
    state = states.promote(XR, "North", report, "ml", T0, operating_point="sensitivity >= 0.80")
    assert state.threshold == 0.93 and state.report["operating_point"] == "sensitivity >= 0.80"
    assert state.report["specificity_ci95"] == [0.94, 0.99]


def install(states: ModelStates, version: str) -> None:
    copy_version(states.registry.get(XR, "1.0.0").directory.parent, version)
    states.registry.refresh()


def test_rollback_never_reactivates_a_version_turned_off_since_it_was_superseded(states: ModelStates) -> None:
    states.promote(XR, "North", passing_report(), "ml", T0, version="1.0.0")
    install(states, "1.1.0")
    states.promote(XR, "North", passing_report(version="1.1.0"), "ml", T0.replace(minute=1))
    states.set_state(XR, "North", "off", "admin", T0.replace(minute=2), "recalled", version="1.0.0")
    states.rollback(XR, "North", "admin", T0.replace(minute=3), version="1.1.0")
    versions = {s.version: s.state for s in states.versions_at("North")[XR]}
    assert versions == {"1.1.0": ModelState.SHADOW, "1.0.0": ModelState.OFF}


def test_rollback_of_a_setting_made_over_the_cards_default_lets_the_card_decide_again(states: ModelStates) -> None:
    states.set_state(XR, "North", "off", "admin", T0, "not wanted")
    back = states.rollback(XR, "North", "admin", T0)
    assert back.state is ModelState.SHADOW and back.source == "card"  # no setting left: the card decides
    assert [c["action"] for c in states.history()] == ["model-state", "model-rollback"]


def test_rollback_restores_an_activation_only_with_a_report_that_still_passes(states: ModelStates) -> None:
    states.promote(XR, "North", passing_report(), "ml", T0)
    states.set_state(XR, "North", "shadow", "admin", T0, "pause")
    states.settings = ModelSettings(validation=ValidationThresholds(min_cases=500))  # the site asks more now
    back = states.rollback(XR, "North", "admin", T0)
    assert back.state is ModelState.SHADOW and "does not pass" in back.reason


def test_two_versions_promoted_at_once_leave_one_active(states: ModelStates, monkeypatch) -> None:
    """Two admins promote 1.0.0 and 1.1.0 at the same site at the same moment: the changes are made one after the
    other, so the second supersedes the first and one version is active, never two."""
    import contextlib
    import threading

    install(states, "1.1.0")
    both_read = threading.Barrier(2, timeout=2)
    read_state = ModelStates._state_of

    def state_of_when_both_have_read(self, session, card, site):  # noqa: ANN001, ANN202 - wraps the method
        # Without serialisation both transactions read here before either writes (the race, made certain).
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait()
        return read_state(self, session, card, site)

    monkeypatch.setattr(ModelStates, "_state_of", state_of_when_both_have_read)
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            states.promote(XR, "North", passing_report(version=version), "ml", T0, version=version)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in ("1.0.0", "1.1.0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    monkeypatch.undo()
    assert errors == []
    active = [s.version for s in states.versions_at("North")[XR] if s.state is ModelState.ACTIVE]
    assert len(active) == 1, active
