"""Shadow findings: admins and service accounts see them marked shadow; radiologists' worklist, study page and API
never show them, and they never raise a study."""

from __future__ import annotations

from serve_site import RADIOLOGIST_PASSWORD, Site, ich_finding, pneumothorax_finding, utcnow


def shadow(finding: dict) -> dict:
    return {**finding, "shadow": True}


def flagged_xray_in_shadow(site: Site) -> str:
    study_uid, ds = site.add_xray()
    site.finish(study_uid, [shadow(pneumothorax_finding(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), None))])
    return study_uid


def test_a_shadow_flag_raises_nothing_and_is_no_reason(site: Site) -> None:
    study_uid = flagged_xray_in_shadow(site)
    item = site.service.worklist.get_study(study_uid, utcnow())
    assert item.priority.level == "routine"
    # Not "flagged nothing": no model in use at the site looked at it. (A radiograph: a quick read, whose head start
    # in the order is no level.)
    assert [r.code for r in item.priority.reasons] == ["clinical", "ai-shadow-only", "quick-read"]
    assert not any("pneumothorax" in r.text for r in item.priority.reasons)
    assert [f.shadow for f in item.findings] == [True]


def test_the_api_shows_shadow_findings_to_admins_and_services_marked_and_hides_them_from_radiologists(
    site: Site,
) -> None:
    study_uid = flagged_xray_in_shadow(site)
    _, token = site.accounts.add_user("ml-script", "service", None, utcnow())
    machine = {"Authorization": f"Bearer {token}"}
    (item,) = site.client.get("/api/v1/worklist", headers=machine).json()
    assert [(f["label"], f["shadow"]) for f in item["findings"]] == [("pneumothorax", True)]
    detail = site.client.get(f"/api/v1/studies/{study_uid}", headers=machine).json()
    assert detail["findings"][0]["shadow"] is True

    site.add_radiologist("reader")
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    (item,) = site.client.get("/api/v1/worklist").json()
    assert item["findings"] == [] and item["priority"]["level"] == "routine"
    assert site.client.get(f"/api/v1/studies/{study_uid}").json()["findings"] == []
    worklist = site.client.get("/worklist").text
    assert 'class="finding ' not in worklist and "badge shadow" not in worklist
    study = site.client.get(f"/studies/{study_uid}").text
    assert "finding-card" not in study and "No AI findings." in study and "badge shadow" not in study
    assert "pneumothorax" not in study.split("<h2>History</h2>")[1]  # the history names no shadow flag


def test_the_admin_pages_badge_shadow_findings(site: Site) -> None:
    study_uid = flagged_xray_in_shadow(site)
    site.sign_in()
    for page in ("/worklist", f"/studies/{study_uid}"):
        html = site.client.get(page).text
        assert 'class="badge shadow"' in html, page


def test_an_active_finding_keeps_its_place_when_shadow_findings_are_hidden(site: Site) -> None:
    study_uid, datasets = site.add_ct()
    sop, series = str(datasets[0].SOPInstanceUID), str(datasets[0].SeriesInstanceUID)
    # Stored active first, shadow after (as the analysis stores them): index 0 is the same finding in both views.
    site.finish(study_uid, [ich_finding(sop, series, None), shadow(ich_finding(sop, series, None, flagged=False))])
    site.add_radiologist("reader")
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    (finding,) = site.client.get(f"/api/v1/studies/{study_uid}").json()["findings"]
    assert finding["shadow"] is False and finding["flagged"] is True
    assert site.client.get("/api/v1/worklist").json()[0]["priority"]["level"] == "stat"


def test_a_radiologist_gets_no_preview_of_and_gives_no_feedback_on_a_shadow_finding(site: Site) -> None:
    study_uid, ds = site.add_xray()
    name = site.overlay(study_uid, "xr-ptx.npz", str(ds.SOPInstanceUID), (32, 32), stride=4)
    site.finish(study_uid, [shadow(pneumothorax_finding(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), name))])
    _, token = site.accounts.add_user("ml-script", "service", None, utcnow())
    machine = {"Authorization": f"Bearer {token}"}
    assert site.client.get(f"/api/v1/studies/{study_uid}/preview.png?finding=0", headers=machine).status_code == 200

    site.add_radiologist("reader")
    csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD)
    assert site.client.get(f"/api/v1/studies/{study_uid}/preview.png?finding=0").status_code == 404
    feedback = {"verdict": "disagree", "finding": 0}
    response = site.client.post(f"/api/v1/studies/{study_uid}/feedback", json=feedback, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 404
    assert site.accounts.feedback_entries() == []
