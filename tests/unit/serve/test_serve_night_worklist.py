"""The night shift's worklist as a radiologist reads it (#12): the patient, the study as the hospital wrote it, the
indication and the referring hospital on every row; counts per level; filters for AI flag and claims; pages of
100; the deadline on the site's clock and the reader's; reasons in plain words with the technical text one click
away; "next study"; the critical-result communication form; and the admin page for sites and privileges."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from serve_site import RADIOLOGIST_PASSWORD, Site, ich_finding, utcnow

from tests.dicom_factory import make_ct_series, make_radiograph
from triage.serve import plain, web
from triage.worklist.sites import parse_site

CITY = {"name": "CITY HOSPITAL", "ae_titles": ["CT_SCANNER"], "time_zone": "Asia/Kolkata",
        "turnaround_min": {"stat": 60}}  # fmt: skip
HILL = {"name": "HILL CLINIC", "ae_titles": ["XR_ROOM"], "time_zone": "America/New_York"}
PATIENT = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN-1234",
    "PatientAge": "047Y",
    "PatientSex": "F",
    "ReasonForTheRequestedProcedure": "Sudden severe headache, ?SAH",
    "StudyDate": "20240305",
    "StudyTime": "024000.123",
}


def row_order(html: str) -> list[str]:
    return re.findall(r'<tr data-study="([^"]+)"', html)


def row_of(html: str, study_uid: str) -> str:
    return html[html.index(f'data-study="{study_uid}"') :].split("</tr>")[0]


def counts_of(html: str) -> dict[str, int]:
    found = re.findall(r'class="count count-(\w+)[^"]*" data-level="\w+">.*?<span class="n">(\d+)</span>', html)
    return {level: int(n) for level, n in found}


def add_ct(site: Site, accession: str, calling_ae: str = "CT_SCANNER", **attributes: Any) -> tuple[str, list[Any]]:
    datasets = make_ct_series(n_slices=4, rows=32, columns=32, accession_number=accession)
    for ds in datasets:
        for name, value in attributes.items():
            setattr(ds, name, value)
        site.service.accept(ds, calling_ae)
    return str(datasets[0].StudyInstanceUID), datasets


def add_xray(site: Site, accession: str, seed: int = 0, calling_ae: str = "XR_ROOM", **attributes: Any) -> str:
    ds = make_radiograph("DX", 64, 64, accession_number=accession, seed=seed)
    for name, value in attributes.items():
        setattr(ds, name, value)
    site.service.accept(ds, calling_ae)
    return str(ds.StudyInstanceUID)


def flag(site: Site, study_uid: str, datasets: list[Any]) -> None:
    key = datasets[1]
    site.finish(study_uid, [ich_finding(str(key.SOPInstanceUID), str(key.SeriesInstanceUID), None)])


def register(site: Site, *records: dict[str, Any]) -> None:
    for record in records:
        site.service.worklist.save_site(parse_site(record), "admin", utcnow(), create=True)


def reader_with(site: Site, *sites: str, name: str = "reader") -> str:
    """A radiologist holding privileges for `sites`, signed in; returns the session's CSRF token."""
    site.add_radiologist(name)
    for granted in sites:
        site.service.worklist.sites.grant(name, granted, None, "admin", utcnow())
    return site.sign_in(name, RADIOLOGIST_PASSWORD)


# ------------------------------------------------------------------------------------------------------ the rows
def test_each_row_shows_the_patient_the_study_as_written_and_the_deadline_on_both_clocks(site: Site) -> None:
    register(site, CITY)
    ct_uid, datasets = add_ct(site, "ACC-CITY-1", **PATIENT)
    flag(site, ct_uid, datasets)
    xr_uid = add_xray(site, "ACC-ELSEWHERE")  # XR_ROOM: no registered site claims it
    site.sign_in()
    html = site.client.get("/worklist").text
    assert row_order(html) == [ct_uid, xr_uid]
    row = row_of(html, ct_uid)
    assert "DOE, JANE" in row and "MRN-1234" in row and "47 y / F" in row
    assert "2024-03-05 02:40" in row and "Sudden severe headache, ?SAH" in row and "CITY HOSPITAL" in row
    # The one reason in plain words; the policy's own texts one click away.
    assert "AI: possible intracranial haemorrhage (93%) – stat under CITY HOSPITAL&#39;s rules" in row
    item = site.service.worklist.get_study(ct_uid, utcnow())
    assert '<details class="why">' in row and all(r.text in html_lib(row) for r in item.priority.reasons)
    # The deadline: received + the site's 60 min stat target, on the site's clock (IST) and, for the script to
    # show on the reader's clock, in UTC.
    deadline = item.received_at + timedelta(minutes=60)
    assert f'<time class="local deadline" datetime="{deadline.isoformat()}">' in row
    assert re.search(r'class="site-clock">(\w{3} \d\d \w{3} )?\d\d:\d\d IST<', row)
    assert "min left" in row
    other = row_of(html, xr_uid)
    assert "unregistered" in other and "CITY HOSPITAL" not in other
    # The keys are printed on the page, and the sort is explained.
    assert 'id="keys"' in html and "next study" in html and "priority order" in html
    # Audited: that identity was shown and for how many studies; never who.
    viewed = site.accounts.audit_entries(action="view-identity")[0]
    assert viewed.detail == {"page": "worklist", "studies": 2}


def html_lib(text: str) -> str:
    import html

    return html.unescape(text)


def test_counts_and_the_flag_and_claim_filters(site: Site) -> None:
    ct_uid, datasets = add_ct(site, "ACC-CT-1")
    flag(site, ct_uid, datasets)
    xrays = [add_xray(site, f"ACC-XR-{n}", seed=n) for n in range(2)]
    csrf = site.sign_in()
    html = site.client.get("/worklist").text
    assert counts_of(html) == {"stat": 1, "urgent": 0, "routine": 2}
    assert row_order(site.client.get("/worklist?flagged=true").text) == [ct_uid]
    assert set(row_order(site.client.get("/worklist?flagged=false").text)) == set(xrays)
    site.client.post(f"/studies/{xrays[0]}/claim", data={"csrf_token": csrf})
    claimed = site.client.get("/worklist?claimed=true").text
    assert row_order(claimed) == [xrays[0]] and counts_of(claimed) == {"stat": 0, "urgent": 0, "routine": 1}
    assert set(row_order(site.client.get("/worklist?claimed=false").text)) == {ct_uid, xrays[1]}
    # The level filter keeps the counts of every level (they are the links to the other levels).
    assert counts_of(site.client.get("/worklist?level=stat").text) == {"stat": 1, "urgent": 0, "routine": 2}
    rows = site.client.get("/worklist/rows?flagged=false")
    assert rows.headers["X-Worklist-Counts"] == "stat=0 urgent=0 routine=2"
    bad = site.client.get("/worklist?flagged=maybe")
    assert bad.status_code == 400 and "AI flag must be true or false" in bad.text


def test_the_page_holds_at_most_a_page_of_rows_and_reads_identity_for_those_only(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "PAGE_SIZE", 2)
    xrays = [add_xray(site, f"ACC-XR-{n}", seed=n) for n in range(5)]
    site.sign_in()
    everything = [i.study_uid for i in site.service.worklist.list_worklist(utcnow())]
    assert sorted(everything) == sorted(xrays)
    first = site.client.get("/worklist").text
    assert row_order(first) == everything[:2]
    assert 'id="page-next"' in first and "offset=2" in first and 'id="page-prev"' not in first
    assert "Studies 1–2 of 5" in first
    assert site.accounts.audit_entries(action="view-identity")[0].detail["studies"] == 2
    last = site.client.get("/worklist?offset=4").text
    assert row_order(last) == everything[4:] and 'id="page-prev"' in last and 'id="page-next"' not in last
    assert row_order(site.client.get("/worklist/rows?offset=2").text) == everything[2:4]


def test_only_the_changed_rows_read_identity_on_a_live_refresh(site: Site) -> None:
    xrays = [add_xray(site, f"ACC-XR-{n}", seed=n) for n in range(3)]
    site.sign_in()
    response = site.client.get("/worklist/rows", params={"changed": xrays[1]})
    assert row_order(response.text) == [xrays[1]]
    assert site.accounts.audit_entries(action="view-identity")[0].detail == {"page": "worklist", "studies": 1}


# ------------------------------------------------------------------------------------------------------ reading scope
def test_a_radiologist_without_a_privilege_for_a_site_neither_sees_nor_opens_its_studies(site: Site) -> None:
    register(site, CITY, HILL)
    ct_uid, datasets = add_ct(site, "ACC-CITY-1", **PATIENT)
    flag(site, ct_uid, datasets)
    hill_uid = add_xray(site, "ACC-HILL-1", PatientName="HIDDEN^PERSON")
    reader_with(site, "CITY HOSPITAL")
    html = site.client.get("/worklist").text
    assert row_order(html) == [ct_uid]
    assert "HIDDEN, PERSON" not in html and "ACC-HILL-1" not in html
    assert '<option value="CITY HOSPITAL">' in html and "HILL CLINIC" not in html  # nor in the site menu
    assert counts_of(html) == {"stat": 1, "urgent": 0, "routine": 0}
    assert row_order(site.client.get("/worklist/rows", params={"changed": hill_uid}).text) == []
    refused = site.client.get(f"/studies/{hill_uid}")
    assert refused.status_code == 403 and "Not a site you may read" in refused.text
    assert "HIDDEN" not in refused.text
    denied = site.accounts.audit_entries(action="access-denied")[0]
    assert denied.study_uid == hill_uid and denied.detail["attempted"] == "view"


# ------------------------------------------------------------------------------------------------------ next study
def test_next_study_claims_the_top_study_the_reader_may_read_and_opens_it(site: Site) -> None:
    register(site, CITY, HILL)
    routine_uid, _ = add_ct(site, "ACC-CITY-ROUTINE")
    stat_uid, datasets = add_ct(site, "ACC-CITY-STAT")
    flag(site, stat_uid, datasets)
    hill_uid = add_xray(site, "ACC-HILL-1", RequestedProcedurePriority="STAT")
    csrf = reader_with(site, "CITY HOSPITAL")
    html = site.client.get("/worklist").text
    assert 'id="next-study"' in html

    first = site.client.post("/worklist/next", data={"csrf_token": csrf, "next": "/worklist"}, follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"].startswith(f"/studies/{stat_uid}?notice=")
    second = site.client.post("/worklist/next", data={"csrf_token": csrf}, follow_redirects=False)
    assert second.headers["location"].startswith(f"/studies/{routine_uid}?")
    claims = {
        uid: site.service.worklist.get_study(uid, utcnow()).claimed_by for uid in (stat_uid, routine_uid, hill_uid)
    }
    assert claims == {stat_uid: "reader", routine_uid: "reader", hill_uid: None}
    audited = [e for e in site.accounts.audit_entries(action="claim") if e.detail.get("next_study")]
    assert {e.study_uid for e in audited} == {stat_uid, routine_uid}
    none_left = site.client.post("/worklist/next", data={"csrf_token": csrf, "next": "/worklist?modality=CT"})
    assert none_left.status_code == 200 and "No unclaimed study is left that you may read" in none_left.text
    assert site.client.post("/worklist/next", data={"csrf_token": "wrong"}).status_code == 403


def test_a_claim_from_a_filtered_worklist_comes_back_to_the_same_filters(site: Site) -> None:
    xr_uid = add_xray(site, "ACC-XR-1")
    csrf = site.sign_in()
    response = site.client.post(
        f"/studies/{xr_uid}/claim", data={"csrf_token": csrf, "next": "/worklist?modality=DX"}, follow_redirects=False
    )
    assert response.headers["location"] == "/worklist?modality=DX&notice=Claimed."


# ------------------------------------------------------------------------------------------------------ study page
def test_the_study_page_leads_with_a_plain_summary_and_keeps_the_technical_detail_folded(site: Site) -> None:
    register(site, CITY)
    ct_uid, datasets = add_ct(site, "ACC-CITY-1", **PATIENT)
    flag(site, ct_uid, datasets)
    reader_with(site, "CITY HOSPITAL")
    html = site.client.get(f"/studies/{ct_uid}").text
    summary = html[html.index('id="summary"') : html.index('id="actions"')]
    assert "DOE, JANE" in summary and "MRN-1234" in summary and "47 y / F" in summary
    assert "Sudden severe headache, ?SAH" in summary and "CITY HOSPITAL" in summary and "2024-03-05 02:40" in summary
    assert "Possible intracranial haemorrhage – 93% – 12.5 mL (intraparenchymal)" in summary
    assert "AI: possible intracranial haemorrhage (93%) – stat under CITY HOSPITAL&#39;s rules" in summary
    assert "IST" in summary and 'class="local deadline"' in summary
    # Models, series UIDs, routing and the policy's texts are in the folded technical detail, after the summary.
    technical = html[html.index('<details class="card technical" id="technical">') :]
    assert "matched rule test" in technical and "ct-head-ich" in technical
    assert "ct-head-ich" not in summary and "Key slice SOP Instance UID" not in summary
    viewed = site.accounts.audit_entries(action="view-identity")[0]
    assert viewed.study_uid == ct_uid and viewed.detail == {"page": "study", "studies": 1}


def test_the_critical_result_communication_is_recorded_listed_and_audited(site: Site) -> None:
    register(site, CITY, HILL)
    ct_uid, datasets = add_ct(site, "ACC-CITY-1")
    flag(site, ct_uid, datasets)
    hill_uid = add_xray(site, "ACC-HILL-1")
    csrf = reader_with(site, "CITY HOSPITAL")
    page = site.client.get(f"/studies/{ct_uid}").text
    assert 'id="communication-form"' in page and '<option value="phone">phone</option>' in page
    assert 'name="zone" id="told-zone" value="Asia/Kolkata"' in page  # without script: the site's clock

    told_local = (utcnow() - timedelta(minutes=10)).astimezone(plain.zone_of("Asia/Kolkata"))
    form = {
        "csrf_token": csrf,
        "recipient": "Dr A. Rao, ED consultant",
        "method": "phone",
        "told_at": told_local.strftime("%Y-%m-%dT%H:%M"),
        "zone": "Asia/Kolkata",
        "note": "read back and confirmed",
    }
    response = site.client.post(f"/studies/{ct_uid}/communications", data=form)
    assert response.status_code == 200 and "Critical-result communication recorded" in response.text
    assert "Dr A. Rao, ED consultant" in response.text and "read back and confirmed" in response.text
    (entry,) = site.service.worklist.get_study(ct_uid, utcnow()).communications
    assert (entry.by, entry.method) == ("reader", "phone")
    assert entry.at == told_local.replace(second=0, microsecond=0).astimezone(entry.at.tzinfo)
    audited = site.accounts.audit_entries(action="critical-communicated")[0]
    assert audited.study_uid == ct_uid and audited.detail["method"] == "phone"

    bad = site.client.post(f"/studies/{ct_uid}/communications", data={**form, "method": "telepathy"})
    assert "Communication not recorded" in bad.text and "phone" in bad.text
    no_one = site.client.post(f"/studies/{ct_uid}/communications", data={**form, "recipient": " "})
    assert "Communication not recorded" in no_one.text
    outside = site.client.post(f"/studies/{hill_uid}/communications", data=form, follow_redirects=False)
    assert outside.status_code == 303 and outside.headers["location"].startswith("/worklist?error=")
    assert len(site.service.worklist.get_study(ct_uid, utcnow()).communications) == 1
    assert site.service.worklist.get_study(hill_uid, utcnow()).communications == []


# ------------------------------------------------------------------------------------------------------ admin: sites
def test_admins_add_change_and_remove_sites_and_grant_privileges_in_the_page(site: Site) -> None:
    site.add_radiologist()
    csrf = site.sign_in()
    assert 'href="/admin/sites"' in site.client.get("/worklist").text
    added = site.client.post(
        "/admin/sites",
        data={"csrf_token": csrf, "name": "CITY HOSPITAL", "ae_titles": "CT_SCANNER, CT2",
              "institution_names": "City Hospital, Leeds\nCity General", "stow_accounts": "",
              "time_zone": "Europe/London", "target_stat": "20", "target_urgent": "", "target_routine": "",
              "claim_idle_min": "45"},
    )  # fmt: skip
    assert added.status_code == 200 and "Site CITY HOSPITAL added" in added.text
    record = site.service.worklist.sites.get("CITY HOSPITAL")
    assert record.ae_titles == ["CT2", "CT_SCANNER"]
    assert record.institution_names == ["City General", "City Hospital, Leeds"]
    assert (record.time_zone, record.turnaround_min, record.claim_idle_min) == ("Europe/London", {"stat": 20.0}, 45.0)
    page = site.client.get("/admin/sites").text
    assert "CITY HOSPITAL" in page and "stat 20 min" in page and "Europe/London" in page and "45 min" in page

    duplicate = site.client.post("/admin/sites", data={"csrf_token": csrf, "name": "OTHER", "ae_titles": "CT2"})
    assert "already identifies site" in duplicate.text
    bad_zone = site.client.post("/admin/sites", data={"csrf_token": csrf, "name": "X", "time_zone": "Nowhere/City"})
    assert "unknown time zone" in bad_zone.text

    editing = site.client.get("/admin/sites", params={"edit": "CITY HOSPITAL"}).text
    assert 'name="original" value="CITY HOSPITAL"' in editing and 'value="20"' in editing
    changed = site.client.post(
        "/admin/sites",
        data={"csrf_token": csrf, "original": "CITY HOSPITAL", "name": "CITY HOSPITAL", "ae_titles": "CT_SCANNER",
              "institution_names": "", "time_zone": "Asia/Kolkata", "target_stat": "30"},
    )  # fmt: skip
    assert "Site CITY HOSPITAL changed" in changed.text
    record = site.service.worklist.sites.get("CITY HOSPITAL")
    assert (record.ae_titles, record.time_zone) == (["CT_SCANNER"], "Asia/Kolkata")
    assert record.turnaround_min == {"stat": 30.0}

    granted = site.client.post(
        "/admin/sites/privileges",
        data={"csrf_token": csrf, "username": "reader", "site": "CITY HOSPITAL", "until": "2099-12-31"},
    )
    assert "reader may read CITY HOSPITAL until 2099-12-31" in granted.text
    assert [(p.username, p.site) for p in site.service.worklist.sites.privileges()] == [("reader", "CITY HOSPITAL")]
    not_a_reader = site.client.post(
        "/admin/sites/privileges", data={"csrf_token": csrf, "username": "admin", "site": "CITY HOSPITAL"}
    )
    assert "privileges are for radiologists" in not_a_reader.text
    revoked = site.client.post(
        "/admin/sites/privileges/revoke", data={"csrf_token": csrf, "username": "reader", "site": "CITY HOSPITAL"}
    )
    assert "reader may no longer read CITY HOSPITAL" in revoked.text
    assert site.service.worklist.sites.privileges() == []
    removed = site.client.post("/admin/sites/CITY HOSPITAL/remove", data={"csrf_token": csrf})
    assert "Site CITY HOSPITAL removed" in removed.text and site.service.worklist.sites.all() == []
    actions = {e.action for e in site.accounts.audit_entries()}
    assert {"site-add", "site-change", "site-remove", "privilege-grant", "privilege-revoke"} <= actions


def test_the_sites_page_is_for_admins_only(site: Site) -> None:
    csrf = reader_with(site)
    assert site.client.get("/admin/sites").status_code == 403
    response = site.client.post("/admin/sites", data={"csrf_token": csrf, "name": "MINE"})
    assert response.status_code == 403 and site.service.worklist.sites.all() == []
    assert 'href="/admin/sites"' not in site.client.get("/worklist").text


# ------------------------------------------------------------------------------------------------------ plain words
def test_reasons_in_plain_words(site: Site) -> None:
    stat_uid = add_xray(site, "ACC-STAT", RequestedProcedurePriority="STAT")
    routine_uid = add_xray(site, "ACC-ROUTINE", seed=1)
    now = utcnow()
    items = {i.study_uid: i for i in site.service.worklist.list_worklist(now)}
    assert plain.reason_words(items[stat_uid]) == "Clinical request: stat"
    assert plain.reason_words(items[routine_uid]) == "No priority requested: routine"
    # 20 h later the routine study has waited past 75% of its 24 h target and is promoted.
    later = {i.study_uid: i for i in site.service.worklist.list_worklist(now + timedelta(hours=20))}
    assert plain.reason_words(later[routine_uid]) == "Waiting 1200 of 1440 min (routine target) – raised to urgent"


def test_findings_dates_and_ages_in_plain_words() -> None:
    from triage.domain import Finding

    flagged = Finding(label="intracranial_haemorrhage", probability=0.97, flagged=True, model="m", model_version="1",
                      synthetic=False, details={"volume_ml": 8.14, "subtype": "IPH", "tiles_run": 40})  # fmt: skip
    negative = Finding(label="pneumothorax", probability=0.04, flagged=False, model="m", model_version="1",
                       synthetic=True)  # fmt: skip
    assert plain.finding_words(flagged) == "Possible intracranial haemorrhage – 97% – 8.1 mL (IPH)"
    assert plain.finding_words(negative) == "Pneumothorax not flagged – 4%"
    assert plain.study_when("20240305", "0240") == "2024-03-05 02:40"
    assert plain.study_when("", "") == ""
    assert plain.study_when_key("20240305", "02") == "20240305020000"
    assert (plain.age_years("54 y"), plain.age_years("6 mo"), plain.age_years("")) == (54.0, 0.5, None)
    assert plain.rules_of("x -> stat [site CITY HOSPITAL]") == "CITY HOSPITAL's rules"
    assert plain.rules_of("x -> stat [default policy]") == "the default rules"
