"""Role boundaries for machine accounts: a service token reads and exports, but claims and reports are for people
(a RIS bridge may mark reported only where the site allows it, and the audit log says so)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from serve_site import RADIOLOGIST_PASSWORD, Site, ich_finding, utcnow

from triage.config import Settings


def flagged_ct(site: Site, accession: str = "ACC-CT-1") -> str:
    study_uid, datasets = site.add_ct(accession)
    key = datasets[3]
    site.finish(study_uid, [ich_finding(str(key.SOPInstanceUID), str(key.SeriesInstanceUID), None)])
    return study_uid


def service_client(site: Site, name: str = "ris-bridge") -> tuple[TestClient, dict[str, str]]:
    _, token = site.accounts.add_user(name, "service", None, utcnow())
    return TestClient(site.client.app), {"Authorization": f"Bearer {token}"}


def default_worklist(site: Site) -> list[str]:
    return [item.study_uid for item in site.service.worklist.list_worklist(utcnow())]


def test_service_token_reads_the_worklist_studies_models_and_exports_feedback(site: Site) -> None:
    study_uid = flagged_ct(site)
    client, auth = service_client(site, "pacs-bridge")
    assert [i["study_uid"] for i in client.get("/api/v1/worklist", headers=auth).json()] == [study_uid]
    assert client.get(f"/api/v1/studies/{study_uid}", headers=auth).json()["study_uid"] == study_uid
    assert client.get("/api/v1/models", headers=auth).status_code == 200
    assert client.get("/api/v1/feedback/labels.csv", headers=auth).status_code == 200
    assert client.get("/api/v1/audit", headers=auth).status_code == 403


def test_service_token_cannot_claim_or_release(site: Site) -> None:
    study_uid = flagged_ct(site)
    client, auth = service_client(site)
    refused = client.post(f"/api/v1/studies/{study_uid}/claim", headers=auth)
    assert refused.status_code == 403
    assert refused.json()["detail"] == (
        "a service account (API token) may not claim or release studies: only people may (admin, radiologist)"
    )
    assert site.service.worklist.get_study(study_uid, utcnow()).item.claimed_by is None
    # A radiologist's claim cannot be taken away by a machine either.
    site.add_radiologist()
    csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD)
    assert site.client.post(f"/api/v1/studies/{study_uid}/claim", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.post(f"/api/v1/studies/{study_uid}/release", headers=auth).status_code == 403
    assert site.service.worklist.get_study(study_uid, utcnow()).item.claimed_by == "reader"
    # The page forms refuse a token too (they are for people).
    for action in ("claim", "release", "report"):
        page = client.post(f"/studies/{study_uid}/{action}", headers=auth, follow_redirects=False)
        assert page.status_code == 403, action
    assert site.service.worklist.get_study(study_uid, utcnow()).item.claimed_by == "reader"


def test_service_token_cannot_mark_reported_by_default(site: Site) -> None:
    study_uid = flagged_ct(site)
    client, auth = service_client(site)
    assert site.service.settings.ris_bridge_may_report is False
    refused = client.post(f"/api/v1/studies/{study_uid}/report", headers=auth)
    assert refused.status_code == 403
    assert "TRIAGE_RIS_BRIDGE_MAY_REPORT=true" in refused.json()["detail"]
    assert default_worklist(site) == [study_uid]  # still listed for the radiologists
    assert not [e for e in site.accounts.audit_entries() if e.action == "report"]


def test_ris_bridge_marks_reported_where_the_site_allows_it_and_is_audited_as_such(site: Site) -> None:
    site.service.settings.ris_bridge_may_report = True
    study_uid, claimed_uid = flagged_ct(site), flagged_ct(site, "ACC-CT-2")
    client, auth = service_client(site)
    # A radiologist reported one of them in the RIS while it was still claimed here.
    site.add_radiologist()
    csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD)
    assert site.client.post(f"/api/v1/studies/{claimed_uid}/claim", headers={"X-CSRF-Token": csrf}).status_code == 200
    for uid in (study_uid, claimed_uid):
        response = client.post(f"/api/v1/studies/{uid}/report", headers=auth)
        assert response.status_code == 200, response.text
        assert response.json() == {"study_uid": uid, "action": "report", "user": "ris-bridge"}
    assert default_worklist(site) == []
    detail = site.service.worklist.get_study(claimed_uid, utcnow()).item
    assert detail.reported and detail.claimed_by is None
    entries = {e.study_uid: e for e in site.accounts.audit_entries(action="report")}
    assert entries[study_uid].user == "ris-bridge"
    assert entries[study_uid].detail == {
        "via": "api",
        "account": "service",
        "acting_as": "ris-bridge",
        "released_claim_of": None,
    }
    assert entries[claimed_uid].detail["released_claim_of"] == "reader"
    # Claims stay for people even where the bridge may report.
    assert client.post(f"/api/v1/studies/{study_uid}/claim", headers=auth).status_code == 403


def test_people_still_claim_and_report_whatever_the_bridge_setting(site: Site) -> None:
    study_uid = flagged_ct(site)
    site.add_radiologist()
    csrf = {"X-CSRF-Token": site.sign_in("reader", RADIOLOGIST_PASSWORD)}
    assert site.client.post(f"/api/v1/studies/{study_uid}/claim", headers=csrf).status_code == 200
    assert site.client.post(f"/api/v1/studies/{study_uid}/report", headers=csrf).status_code == 200
    (entry,) = site.accounts.audit_entries(action="report")
    assert entry.user == "reader" and entry.detail == {"via": "api"}


def test_the_bridge_setting_comes_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert Settings().ris_bridge_may_report is False
    monkeypatch.setenv("TRIAGE_RIS_BRIDGE_MAY_REPORT", "true")
    assert Settings().ris_bridge_may_report is True


def test_models_api_gives_each_models_state_per_site(tmp_path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from fastapi.testclient import TestClient as Client
    from serve_site import ADMIN_PASSWORD

    from triage.serve.app import create_app
    from triage.serve.service import TriageService

    shutil.copytree(Settings().weights_dir / "xr-chest-pneumothorax", settings.weights_dir / "xr-chest-pneumothorax")
    settings.admin_password = ADMIN_PASSWORD
    settings.data_dir = tmp_path / "data"
    service = TriageService(settings, runner_kind="inprocess", start_scp=False)
    with Client(create_app(settings, runner_kind="inprocess", service=service)) as client:
        _, token = client.app.state.accounts.add_user("exporter", "service", None, utcnow())  # type: ignore[attr-defined]
        service.model_states.set_state("xr-chest-pneumothorax", "North", "off", "admin", utcnow(), "not wanted")
        (model,) = client.get("/api/v1/models", headers={"Authorization": f"Bearer {token}"}).json()
    assert model["name"] == "xr-chest-pneumothorax" and model["synthetic"] is True
    assert model["validation"] == "none" and model["raises_priority"] is False
    states = {s["site"]: s for s in model["states"]}
    assert states["*"]["state"] == "shadow" and states["*"]["source"] == "card"
    assert states["North"]["state"] == "off" and states["North"]["changed_by"] == "admin"


def test_refused_role_actions_are_in_the_audit_log(site: Site) -> None:
    study_uid = flagged_ct(site)
    client, auth = service_client(site)
    assert client.post(f"/api/v1/studies/{study_uid}/claim", headers=auth).status_code == 403
    assert client.post(f"/api/v1/studies/{study_uid}/report", headers=auth).status_code == 403
    entries = site.accounts.audit_entries(action="forbidden", study_uid=study_uid)
    assert sorted(e.detail["path"] for e in entries) == [
        f"/api/v1/studies/{study_uid}/claim",
        f"/api/v1/studies/{study_uid}/report",
    ]
    assert all(e.detail["role"] == "service" and e.detail["method"] == "POST" for e in entries)
    assert any("TRIAGE_RIS_BRIDGE_MAY_REPORT" in e.detail["reason"] for e in entries)
