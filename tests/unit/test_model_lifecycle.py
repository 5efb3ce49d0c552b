"""The synthetic X-ray model on the service's real in-process runner: in shadow by default (runs, stored, marked,
raises nothing, sends nothing), active only at the site that validated it, off where a site turned it off."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from tests.model_versions import copy_version
from triage.config import Settings
from triage.domain import AIStatus, utcnow
from triage.serve.service import TriageService
from triage.training.synth_xray import make_chest_radiograph_dataset

XR = "xr-chest-pneumothorax"


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    settings = Settings()
    settings.data_dir = tmp_path / "data"
    settings.results.host = "127.0.0.1"  # a PACS to send results to (recorded below, not contacted)
    sent: list[tuple[str, list]] = []
    monkeypatch.setattr(
        "triage.serve.delivery.export_study_results",
        lambda store, study_uid, findings, *args, **kwargs: sent.append((study_uid, list(findings))) or 1,
    )
    svc = TriageService(settings, runner_kind="inprocess", start_scp=False)
    svc.start()
    svc.sent = sent  # type: ignore[attr-defined]
    yield svc
    svc.stop()


def flagged_film(service: TriageService, site: str, seed: int = 3, **header: object) -> str:
    """A synthetic pneumothorax film from `site` that the model flags (checked, not assumed)."""
    ds = make_chest_radiograph_dataset(seed, positive=True, shape=(256, 256), view=str(header.pop("view", "PA")))
    ds.InstitutionName = site
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # as a sender would encode it
    buffer.seek(0)
    service.accept(pydicom.dcmread(buffer), "XR_ROOM")
    return str(ds.StudyInstanceUID)


def passing_report(site: str) -> dict:
    return {
        "model": XR, "version": "1.0.0", "site": site, "finding": "pneumothorax", "threshold": 0.8722,
        "n": 200, "n_positive": 100, "roc_auc": 0.97, "sensitivity": 0.9, "sensitivity_ci95": [0.84, 0.95],
        "specificity": 0.95, "specificity_ci95": [0.9, 0.98],
    }  # fmt: skip


def test_in_shadow_the_model_runs_and_its_flag_is_stored_marked_but_moves_and_sends_nothing(service) -> None:
    study_uid = flagged_film(service, "North")
    outcome = service._analyse(study_uid)
    assert outcome.ai_status is AIStatus.DONE
    (finding,) = outcome.findings
    assert finding.flagged and finding.shadow, "precondition: the model flags this film"
    item = service.worklist.get_study(study_uid, utcnow())
    assert item.findings[0].shadow is True
    assert item.priority.level == "routine"
    assert not any("pneumothorax" in r.text for r in item.priority.reasons)
    assert service.sent == []  # a shadow finding is never sent to the PACS


def test_active_at_the_site_that_validated_it_and_in_shadow_elsewhere(service) -> None:
    service.model_states.promote(XR, "North", passing_report("North"), "ml", utcnow())
    north, south = flagged_film(service, "North", seed=3), flagged_film(service, "South", seed=5)
    for study_uid in (north, south):
        service._analyse(study_uid)
    north_item = service.worklist.get_study(north, utcnow())
    assert north_item.priority.level == "stat" and north_item.findings[0].shadow is False
    assert [r.code for r in north_item.priority.reasons][-1] == "ai-finding"
    south_item = service.worklist.get_study(south, utcnow())
    assert south_item.findings[0].flagged and south_item.findings[0].shadow
    assert south_item.priority.level == "routine"
    assert [uid for uid, _ in service.sent] == [north]


def test_the_sites_operating_point_decides_the_flag(service) -> None:
    report = passing_report("North")
    report["operating_points"] = [
        {"name": "specificity first", "threshold": 0.99999, "sensitivity": 0.9, "sensitivity_ci95": [0.84, 0.95],
         "specificity": 0.99, "specificity_ci95": [0.96, 1.0]},
    ]  # fmt: skip
    service.model_states.promote(XR, "North", report, "ml", utcnow(), operating_point="specificity first")
    study_uid = flagged_film(service, "North")
    service._analyse(study_uid)
    (finding,) = service.worklist.get_study(study_uid, utcnow()).findings
    assert finding.details["site_threshold"] == 0.99999
    assert finding.flagged is (finding.probability >= 0.99999)


def test_off_at_a_site_the_model_does_not_run_there(service) -> None:
    service.model_states.set_state(XR, "North", "off", "admin", utcnow(), "this site reads films itself")
    study_uid = flagged_film(service, "North")
    outcome = service._analyse(study_uid)
    assert outcome.ai_status is AIStatus.NOT_APPLICABLE and outcome.findings == []
    (decision,) = outcome.routing
    assert decision.model is None and decision.reason == f"model-off: {XR} is off for site North"
    assert service.worklist.get_study(study_uid, utcnow()).priority.level == "routine"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (
            {"PatientAge": "006Y"},
            "outside the model's intended use: patient age 6 y, model is for adults (18 y and over)",
        ),
        ({"view": "LL"}, "outside the model's intended use: view left lateral, model is for PA, AP views"),
        (
            {"BodyPartExamined": "ABDOMEN"},
            "outside the model's intended use: body part ABDOMEN, model is for CHEST, THORAX, LUNG",
        ),
    ],
)
def test_a_film_outside_the_models_intended_use_is_not_analysed_and_the_worklist_says_why(
    service, header, reason
) -> None:
    study_uid = flagged_film(service, "North", **header)
    outcome = service._analyse(study_uid)
    assert outcome.ai_status is AIStatus.NOT_APPLICABLE and outcome.findings == []
    item = service.worklist.get_study(study_uid, utcnow())
    assert item.ai_reason == reason
    assert any(reason in r.text for r in item.priority.reasons)


def test_a_film_without_age_or_view_is_analysed_and_the_assumption_recorded(service) -> None:
    study_uid = flagged_film(service, "North", view="")
    outcome = service._analyse(study_uid)
    assert outcome.ai_status is AIStatus.DONE
    (decision,) = outcome.routing
    assert "view position not in the header: analysed, as the card allows" in decision.reason
    assert "patient age not in the header: analysed, as the card allows" in decision.reason


def install_version(service: TriageService, tmp_path: Path, version: str) -> None:
    """Install a copy of the X-ray model as another version (same weights, its own card) in a private weights dir."""
    import shutil

    weights = tmp_path / "weights"
    if not (weights / XR / "1.0.0").exists():
        shutil.copytree(service.registry.weights_dir / XR, weights / XR)
        shutil.copytree(service.registry.weights_dir / "ct-head-ich", weights / "ct-head-ich")
    copy_version(weights / XR, version)
    service.registry.weights_dir = weights
    service.registry.refresh()


def test_a_new_version_runs_in_shadow_beside_the_active_one_and_promotion_swaps_them(service, tmp_path) -> None:
    service.model_states.promote(XR, "North", passing_report("North"), "ml", utcnow(), version="1.0.0")
    install_version(service, tmp_path, "1.1.0")
    first = flagged_film(service, "North", seed=3)
    outcome = service._analyse(first)
    assert sorted((f.model_version, f.shadow) for f in outcome.findings) == [("1.0.0", False), ("1.1.0", True)]
    item = service.worklist.get_study(first, utcnow())
    assert item.priority.level == "stat"
    assert [f.model_version for f in item.findings] == ["1.0.0", "1.1.0"]  # active first, shadow after
    assert [uid for uid, findings in service.sent if all(not f.shadow for f in findings)] == [first]
    assert all(f.model_version == "1.0.0" for _, findings in service.sent for f in findings)

    service.model_states.promote(XR, "North", passing_report("North") | {"version": "1.1.0"}, "ml", utcnow())
    states = {s.version: s.state.value for s in service.model_states.versions_at("North")[XR]}
    assert states == {"1.1.0": "active", "1.0.0": "shadow"}  # one active version per site
    second = flagged_film(service, "North", seed=5)
    assert [(f.model_version, f.shadow) for f in service._analyse(second).findings] == [("1.1.0", False)]

    service.model_states.rollback(XR, "North", "ml", utcnow(), why="more false positives")
    states = {s.version: s.state.value for s in service.model_states.versions_at("North")[XR]}
    assert states == {"1.1.0": "shadow", "1.0.0": "active"}  # the superseded version is back


def test_a_shadow_version_that_fails_changes_nothing_for_the_study(service, tmp_path) -> None:
    service.model_states.promote(XR, "North", passing_report("North"), "ml", utcnow(), version="1.0.0")
    install_version(service, tmp_path, "1.1.0")
    onnx = next((tmp_path / "weights" / XR / "1.1.0").glob("*.onnx"))
    onnx.write_bytes(b"broken")  # its sha256 no longer matches the card: it cannot load
    study_uid = flagged_film(service, "North")
    outcome = service._analyse(study_uid)
    assert outcome.ai_status is AIStatus.DONE and not outcome.retrying
    assert outcome.reason == f"analysed by {XR} 1.0.0"
    assert [(f.model_version, f.shadow) for f in outcome.findings] == [("1.0.0", False)]


def test_a_corrupt_new_version_is_refused_at_start_and_the_version_in_use_serves_on(tmp_path) -> None:
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(Settings().weights_dir / XR, weights / XR)
    new = copy_version(weights / XR, "1.1.0")
    next(new.glob("*.onnx")).write_bytes(b"corrupt")
    settings = Settings(data_dir=tmp_path / "data", weights_dir=weights)
    svc = TriageService(settings, runner_kind="inprocess", start_scp=False)
    svc.model_states.promote(XR, "North", passing_report("North"), "ml", utcnow(), version="1.0.0")
    svc.start()
    try:
        assert XR not in svc.unavailable
        assert any("1.1.0 refused" in p for p in svc.registry.problems)
        study_uid = flagged_film(svc, "North")
        outcome = svc._analyse(study_uid)
        assert [(f.model_version, f.shadow) for f in outcome.findings] == [("1.0.0", False)]
        assert svc.worklist.get_study(study_uid, utcnow()).priority.level == "stat"
    finally:
        svc.stop()


def test_a_site_record_decides_which_models_run_and_where_its_results_go(service, monkeypatch) -> None:
    from triage.worklist.sites import parse_site

    destinations: list[tuple] = []
    monkeypatch.setattr(
        "triage.serve.delivery.export_study_results",
        lambda store, study_uid, findings, status, reason, destination, **kw: destinations.append(destination) or 1,
    )
    now = utcnow()
    service.worklist.save_site(parse_site({"name": "NORTH GENERAL", "institution_names": ["North"], "models": []}),
                               "admin", now)  # fmt: skip
    south = {"name": "SOUTH", "institution_names": ["South"], "results": {"ae_title": "SOUTHPACS", "host": "10.0.0.9"}}
    service.worklist.save_site(parse_site(south), "admin", now)
    service.model_states.promote(XR, "SOUTH", passing_report("SOUTH"), "ml", now)
    north, south_uid = flagged_film(service, "North", seed=3), flagged_film(service, "South", seed=5)
    outcome = service._analyse(north)
    assert outcome.ai_status is AIStatus.NOT_APPLICABLE and outcome.findings == []
    routing = [s.routing for s in service.worklist.get_study(north, utcnow()).series if s.routing is not None]
    assert routing and "not enabled for site NORTH GENERAL" in routing[0].reason
    service._analyse(south_uid)
    item = service.worklist.get_study(south_uid, utcnow())
    assert item.site == "SOUTH" and item.priority.level == "stat"
    assert destinations == [("SOUTHPACS", "10.0.0.9", 104)]
