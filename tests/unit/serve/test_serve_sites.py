"""Sites and credentialed reading through the API and the pages: a radiologist signed in through /login sees,
opens and claims only the studies of sites they hold a valid privilege for; refusals are 403 and audited."""

from __future__ import annotations

from serve_site import RADIOLOGIST_PASSWORD, Site, utcnow

from triage.worklist.sites import parse_site


def setup_sites(site: Site) -> tuple[str, str, dict[str, str]]:
    site.sign_in()  # admin
    admin_csrf = site.sign_in()
    headers = {"X-CSRF-Token": admin_csrf}
    city = {"name": "CITY HOSPITAL", "ae_titles": ["CT_SCANNER"], "time_zone": "Europe/London",
            "turnaround_min": {"stat": 20}}  # fmt: skip
    created = site.client.post("/api/v1/sites", json=city, headers=headers)
    assert created.status_code == 201, created.text
    hill = {"name": "HILL CLINIC", "ae_titles": ["XR_ROOM"], "time_zone": "Asia/Kolkata"}
    assert site.client.post("/api/v1/sites", json=hill, headers=headers).status_code == 201
    bad = site.client.post("/api/v1/sites", json={"name": "X", "time_zone": "Nowhere/City"}, headers=headers)
    assert bad.status_code == 400 and "time zone" in bad.json()["detail"]
    site.add_radiologist()
    granted = site.client.put("/api/v1/users/reader/privileges/CITY HOSPITAL", json={"until": "2099-12-31"},
                              headers=headers)  # fmt: skip
    assert granted.status_code == 200 and granted.json()["valid_today"] is True
    ct_uid, _ = site.add_ct("ACC-CITY-1")
    xr_uid, _ = site.add_xray("ACC-HILL-1")
    site.client.post("/logout", headers=headers)
    return ct_uid, xr_uid, headers


def test_a_radiologist_gets_only_the_studies_of_sites_they_may_read(site: Site) -> None:
    ct_uid, xr_uid, _ = setup_sites(site)
    csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD)
    headers = {"X-CSRF-Token": csrf}
    listed = site.client.get("/api/v1/worklist").json()
    assert [i["study_uid"] for i in listed] == [ct_uid]
    assert listed[0]["site"] == "CITY HOSPITAL" and listed[0]["site_time_zone"] == "Europe/London"
    assert listed[0]["site_match"] == "calling AE title CT_SCANNER"
    assert site.client.get(f"/api/v1/studies/{ct_uid}").status_code == 200
    refused = site.client.get(f"/api/v1/studies/{xr_uid}")
    assert refused.status_code == 403 and "HILL CLINIC" in refused.json()["detail"]
    assert site.client.post(f"/api/v1/studies/{xr_uid}/claim", headers=headers).status_code == 403
    assert site.client.get(f"/api/v1/studies/{xr_uid}/preview.png").status_code == 403
    denied = [e for e in site.accounts.audit_entries(action="access-denied") if e.study_uid == xr_uid]
    assert {e.detail["attempted"] for e in denied} == {"view", "claim", "view-image"}
    assert site.service.worklist.get_study(xr_uid, utcnow()).claimed_by is None
    # The pages hide and refuse the same way.
    page = site.client.get("/worklist").text
    assert "ACC-CITY-1" in page and "ACC-HILL-1" not in page
    assert site.client.get(f"/studies/{xr_uid}").status_code == 403
    # Next study: the one study this reader may read, then nothing.
    first = site.client.post("/api/v1/worklist/next", headers=headers)
    assert first.status_code == 200 and first.json()["study_uid"] == ct_uid
    assert first.json()["claimed_by"] == "reader"
    assert site.client.post("/api/v1/worklist/next", headers=headers).status_code == 204
    # Sites are changed by admins only.
    assert site.client.post("/api/v1/sites", json={"name": "Z"}, headers=headers).status_code == 403
    # Readers get the names and clocks of the sites they may read, not other clients' records.
    assert [s["name"] for s in site.client.get("/api/v1/sites").json()] == ["CITY HOSPITAL"]
    assert site.client.get("/api/v1/sites/HILL CLINIC").status_code == 403


def test_an_admin_sees_every_site_and_a_rule_change_rescores(site: Site) -> None:
    ct_uid, xr_uid, _ = setup_sites(site)
    csrf = site.sign_in()
    headers = {"X-CSRF-Token": csrf}
    assert {i["study_uid"] for i in site.client.get("/api/v1/worklist").json()} == {ct_uid, xr_uid}
    changed = site.client.patch("/api/v1/sites/HILL CLINIC", json={"turnaround_min": {"routine": 60}}, headers=headers)
    assert changed.status_code == 200 and changed.json()["site"]["turnaround_min"]["routine"] == 60
    xr = next(i for i in site.client.get("/api/v1/worklist").json() if i["study_uid"] == xr_uid)
    assert xr["turnaround_target_min"] == 60
    assert any(e.action == "site-change" for e in site.accounts.audit_entries())
    revoked = site.client.delete("/api/v1/users/reader/privileges/CITY HOSPITAL", headers=headers)
    assert revoked.status_code == 204
    assert site.client.get("/api/v1/privileges").json() == []


def test_counts_flag_filter_and_critical_result_communication(site: Site) -> None:
    from serve_site import ich_finding

    ct_uid, xr_uid, _ = setup_sites(site)
    key = site.service.worklist.series_of(ct_uid)[0]
    site.finish(ct_uid, [ich_finding("1.2.3", key.series_uid, None)])
    csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD)
    headers = {"X-CSRF-Token": csrf}
    assert site.client.get("/api/v1/worklist/counts").json() == {"stat": 1, "urgent": 0, "routine": 0}
    assert [i["study_uid"] for i in site.client.get("/api/v1/worklist?flagged=true").json()] == [ct_uid]
    assert site.client.get("/api/v1/worklist?flagged=false").json() == []
    told = {"recipient": "Dr A. Rao, ED consultant", "method": "phone", "note": "read back confirmed"}
    recorded = site.client.post(f"/api/v1/studies/{ct_uid}/communications", json=told, headers=headers)
    assert recorded.status_code == 201, recorded.text
    assert recorded.json()["by"] == "reader" and recorded.json()["method"] == "phone"
    bad = site.client.post(f"/api/v1/studies/{ct_uid}/communications", json={**told, "method": "telepathy"},
                           headers=headers)  # fmt: skip
    assert bad.status_code == 400 and "phone" in bad.json()["detail"]
    outside = site.client.post(f"/api/v1/studies/{xr_uid}/communications", json=told, headers=headers)
    assert outside.status_code == 403
    detail = site.client.get(f"/api/v1/studies/{ct_uid}").json()
    assert [c["recipient"] for c in detail["communications"]] == ["Dr A. Rao, ED consultant"]
    assert any(e.action == "critical-communicated" for e in site.accounts.audit_entries(study_uid=ct_uid))


def test_unregistered_senders_are_for_radiologists_only_until_the_first_site_is_registered(site: Site) -> None:
    from tests.dicom_factory import make_radiograph

    site.add_radiologist()
    ds = make_radiograph("DX", 64, 64, accession_number="ACC-UNREG")
    site.service.accept(ds, "UNKNOWN_AE")
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    assert [i["accession_number"] for i in site.client.get("/api/v1/worklist").json()] == ["ACC-UNREG"]
    site.service.worklist.save_site(parse_site({"name": "CITY", "ae_titles": ["CT_SCANNER"]}), "admin", utcnow())
    assert site.client.get("/api/v1/worklist").json() == []
    assert site.client.get(f"/api/v1/studies/{ds.StudyInstanceUID}").status_code == 403
    site.service.settings.reading.unregistered_visible = True
    assert [i["accession_number"] for i in site.client.get("/api/v1/worklist").json()] == ["ACC-UNREG"]


def test_a_stow_rs_client_account_recognises_its_site(site: Site) -> None:
    import io

    from tests.dicom_factory import make_radiograph

    _, token = site.accounts.add_user("city-bridge", "service", None, utcnow())
    record = parse_site({"name": "CITY", "stow_accounts": ["city-bridge"], "time_zone": "Asia/Kolkata"})
    site.service.worklist.save_site(record, "admin", utcnow())
    ds = make_radiograph("DX", 64, 64, accession_number="ACC-STOW")
    ds.InstitutionName = "Some Name The Modality Wrote"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n--b1--\r\n"
    stored = site.client.post(
        "/dicomweb/studies",
        content=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b1',
        },
    )
    assert stored.status_code == 200, stored.text
    item = site.service.worklist.get_study(str(ds.StudyInstanceUID), utcnow())
    assert (item.site, item.site_match, item.site_time_zone) == ("CITY", "STOW-RS account city-bridge", "Asia/Kolkata")
    assert item.institution == "Some Name The Modality Wrote"


def test_alerts_sent_about_a_study_are_listed_in_the_api_and_on_its_page(site: Site) -> None:
    from serve_site import ich_finding

    from triage.config import AlertSettings

    site.service.worklist.alert_settings = AlertSettings(webhooks=["http://127.0.0.1:9/hook"])
    site.sign_in()
    ct_uid, _ = site.add_ct("ACC-ALERT")
    site.finish(ct_uid, [ich_finding("1.2.3", site.service.worklist.series_of(ct_uid)[0].series_uid, None)])
    (message,) = site.client.get(f"/api/v1/studies/{ct_uid}/messages").json()
    assert (message["kind"], message["channel"], message["status"]) == ("critical-alert", "webhook", "pending")
    assert "Alerts and messages sent" in site.client.get(f"/studies/{ct_uid}").text


def test_metrics_count_instances_studies_queue_outbox_and_stage_durations(site: Site) -> None:
    import io

    from serve_site import ich_finding

    from tests.dicom_factory import make_radiograph
    from triage.config import AlertSettings
    from triage.domain import SeriesResult, StageTimings

    _, token = site.accounts.add_user("prometheus", "service", None, utcnow())
    auth = {"Authorization": f"Bearer {token}"}
    site.service.worklist.alert_settings = AlertSettings(webhooks=["http://127.0.0.1:9/hook"])
    ct_uid, _ = site.add_ct("ACC-M1")  # 6 instances over DICOM
    site.finish(ct_uid, [ich_finding("1.2.3", site.service.worklist.series_of(ct_uid)[0].series_uid, None)])
    film = make_radiograph("DX", 64, 64)
    buffer = io.BytesIO()
    film.save_as(buffer, enforce_file_format=True)
    body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n--b1\r\n"
            b"Content-Type: application/dicom\r\n\r\nnot dicom\r\n--b1--\r\n")  # fmt: skip
    headers = {**auth, "Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'}
    assert site.client.post("/dicomweb/studies", content=body, headers=headers).status_code == 202
    timings = StageTimings()
    timings.add("inference", 0.3)
    site.service.service_metrics.observe_stages([SeriesResult("s", "ct-head-ich", "1.0.0", True, [], "", timings)])
    text = site.client.get("/metrics", headers=auth).text
    assert 'triage_instances_received_total{source="dicom"} 6.0' in text
    assert 'triage_instances_received_total{source="stow-rs"} 1.0' in text
    assert 'triage_instances_refused_total{reason="0xC000",source="stow-rs"} 1.0' in text
    assert 'triage_studies{ai_status="done"} 1.0' in text and 'triage_studies{ai_status="pending"} 1.0' in text
    assert "triage_analysis_queue_depth 1.0" in text
    assert 'triage_outbox_depth{channel="webhook",destination="http://127.0.0.1:9/hook"} 1.0' in text
    assert 'triage_analysis_stage_seconds_count{model="ct-head-ich",stage="inference"} 1.0' in text


def test_the_event_stream_tells_a_radiologist_only_of_studies_they_may_read(site: Site) -> None:
    ct_uid, xr_uid, _ = setup_sites(site)
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    seen: list[str] = []
    with site.client.stream("GET", "/api/v1/events") as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith(": connected")
        # Another site's study changes first, then the reader's own, then an event about no study.
        site.service.events.publish({"type": "study-updated", "study_uid": xr_uid, "change": "claim"})
        site.service.events.publish({"type": "study-updated", "study_uid": ct_uid, "change": "claim"})
        for line in lines:
            if line.startswith("data: "):
                seen.append(line)
                if ct_uid in line:
                    break
    assert len(seen) == 1 and ct_uid in seen[0]
    assert not any(xr_uid in line for line in seen)
