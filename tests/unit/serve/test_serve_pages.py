"""Sign-in, sessions, CSRF, roles, the worklist and study pages, claims, feedback, previews and the audit log."""

from __future__ import annotations

import html as html_lib
import io
import re
from datetime import timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_site import RADIOLOGIST_PASSWORD, Site, ich_finding, pneumothorax_finding, utcnow
from sqlalchemy import update

from tests.dicom_factory import SYNTHETIC_BIRTH_DATE, SYNTHETIC_PATIENT_ID, SYNTHETIC_PATIENT_NAME
from triage.domain import AIStatus
from triage.training.datasets import read_labels_csv
from triage.worklist.accounts import SessionRow


def flagged_ct(site: Site, accession: str = "ACC-CT-1") -> str:
    study_uid, datasets = site.add_ct(accession)
    key = datasets[3]
    name = site.overlay(study_uid, "ct-head-ich-ich.npz", str(key.SOPInstanceUID), (16, 16), stride=2)
    site.finish(study_uid, [ich_finding(str(key.SOPInstanceUID), str(key.SeriesInstanceUID), name)])
    return study_uid


def flagged_xray(site: Site, accession: str = "ACC-XR-1", shadow: bool = True) -> str:
    """A study flagged by the synthetic-data X-ray model: in shadow (its default state at any site), or active
    (a site activated it on a validation report)."""
    study_uid, ds = site.add_xray(accession)
    name = site.overlay(study_uid, "xr-ptx.npz", str(ds.SOPInstanceUID), (32, 32), stride=4)
    finding = pneumothorax_finding(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), name)
    site.finish(study_uid, [{**finding, "shadow": shadow}])
    return study_uid


def row_order(html: str) -> list[str]:
    return re.findall(r'<tr data-study="([^"]+)"', html)


# ------------------------------------------------------------------------------------------------------ sign-in
def test_sign_in_sets_a_httponly_samesite_session_cookie(site: Site) -> None:
    form = site.client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    response = site.client.post(
        "/login",
        data={"username": "admin", "password": "admin-password-for-tests", "csrf_token": token, "next": "/admin/audit"},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/admin/audit"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("triage_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie and "Max-Age=43200" in cookie
    assert site.client.get("/api/v1/me").json() == {"name": "admin", "role": "admin"}
    assert site.accounts.audit_entries(action="sign-in")[0].user == "admin"


def test_wrong_password_is_refused_and_audited(site: Site) -> None:
    form = site.client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    response = site.client.post(
        "/login", data={"username": "admin", "password": "guess", "csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 401 and "Wrong user name or password" in response.text
    assert "triage_session" not in response.headers.get("set-cookie", "")
    assert site.accounts.audit_entries(action="sign-in-failed")[0].user == "admin"


def test_sign_in_form_needs_its_csrf_token(site: Site) -> None:
    site.client.get("/login")
    response = site.client.post(
        "/login", data={"username": "admin", "password": "admin-password-for-tests", "csrf_token": "forged"}
    )
    assert response.status_code == 400 and "expired" in response.text


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "javascript:alert(1)"])
def test_sign_in_never_redirects_off_site(site: Site, target: str) -> None:
    form = site.client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    response = site.client.post(
        "/login",
        data={"username": "admin", "password": "admin-password-for-tests", "csrf_token": token, "next": target},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/worklist"


def test_sign_out_ends_the_session(site: Site) -> None:
    csrf = site.sign_in()
    assert site.client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    site.client.cookies.clear()
    assert site.client.get("/api/v1/me").status_code == 401


def test_expired_session_is_refused(site: Site) -> None:
    site.sign_in()
    with site.accounts.engine.begin() as conn:  # the server decides expiry, whatever the browser keeps
        conn.execute(update(SessionRow).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert site.client.get("/api/v1/me").status_code == 401
    assert site.client.get("/worklist", follow_redirects=False).status_code == 303


def test_disabled_user_is_signed_out_at_once(site: Site) -> None:
    site.add_radiologist()
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    site.accounts.set_disabled("reader")
    assert site.client.get("/api/v1/me").status_code == 401


def test_first_start_prints_a_generated_admin_password_once(
    settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from triage.serve.app import create_app
    from triage.serve.service import TriageService

    monkeypatch.delenv("TRIAGE_ADMIN_PASSWORD", raising=False)
    for attempt in range(2):
        service = TriageService(settings, runner_kind="inprocess", start_scp=False)
        with TestClient(create_app(settings, service=service)) as client:
            err = capsys.readouterr().err
            if attempt == 0:
                password = re.search(r"created user 'admin' with password: (\S+)", err).group(1)
                accounts = client.app.state.accounts  # type: ignore[attr-defined]
                assert accounts.verify_password("admin", password, utcnow()) is not None
            else:
                assert "password" not in err


# ------------------------------------------------------------------------------------------------------ CSRF, roles
def test_cookie_requests_that_change_state_need_the_csrf_token(site: Site) -> None:
    study_uid = flagged_ct(site)
    csrf = site.sign_in()
    assert site.client.post(f"/api/v1/studies/{study_uid}/claim").status_code == 403
    assert site.client.post(f"/studies/{study_uid}/claim", data={"csrf_token": "wrong"}).status_code == 403
    assert site.service.worklist.get_study(study_uid, utcnow()).item.claimed_by is None
    response = site.client.post(f"/api/v1/studies/{study_uid}/claim", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200 and response.json()["user"] == "admin"


def test_api_token_works_without_csrf_and_cannot_open_admin_pages(site: Site) -> None:
    study_uid = flagged_ct(site)
    _, token = site.accounts.add_user("pacs-bridge", "service", None, utcnow())
    client = TestClient(site.client.app)
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/me", headers=auth).json() == {"name": "pacs-bridge", "role": "service"}
    assert [i["study_uid"] for i in client.get("/api/v1/worklist", headers=auth).json()] == [study_uid]
    assert client.post(f"/api/v1/studies/{study_uid}/claim", headers=auth).status_code == 403  # claims: people
    assert client.get("/api/v1/audit", headers=auth).status_code == 403
    feedback = {"verdict": "agree", "finding": 0}
    assert client.post(f"/api/v1/studies/{study_uid}/feedback", json=feedback, headers=auth).status_code == 403
    assert client.get("/api/v1/feedback/labels.csv", headers=auth).status_code == 200


def test_radiologists_cannot_open_admin_pages(site: Site) -> None:
    site.add_radiologist()
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    assert site.client.get("/admin/audit").status_code == 403
    assert site.client.get("/admin/users").status_code == 403
    assert site.client.get("/api/v1/audit").status_code == 403


# ------------------------------------------------------------------------------------------------------ worklist page
def test_worklist_page_in_priority_order_with_flags_badges_and_status(site: Site) -> None:
    routine_uid, _ = site.add_ct("ACC-ROUTINE")
    site.finish(routine_uid, [], routing=[], status=AIStatus.NOT_APPLICABLE, reason="no series matched a model")
    xray_uid = flagged_xray(site)
    ct_uid = flagged_ct(site)
    site.sign_in()
    html = site.client.get("/worklist").text
    order = row_order(html)
    # The synthetic-data model runs in shadow: its flag is shown to the admin (badged) but raises nothing.
    assert order[0] == ct_uid and set(order[1:]) == {xray_uid, routine_uid}
    ct_row = html[html.index(f'data-study="{ct_uid}"') :].split("</tr>")[0]
    assert "level-stat" in ct_row and "intracranial haemorrhage" in ct_row and "93%" in ct_row
    assert "ct-head-ich 1.0.0" in ct_row and "synthetic model" not in ct_row and "ACC-CT-1" in ct_row
    xray_row = html[html.index(f'data-study="{xray_uid}"') :].split("</tr>")[0]
    assert "synthetic model" in xray_row and "xr-chest-pneumothorax 0.1.0" in xray_row
    assert "level-routine" in xray_row and 'class="badge shadow"' in xray_row and "pneumothorax flagged" not in xray_row
    routine_row = html[html.index(f'data-study="{routine_uid}"') :].split("</tr>")[0]
    assert "not analysed" in routine_row and "no series matched a model" in routine_row
    assert "level-routine" in routine_row and "unclaimed" in routine_row
    # A signed-in reader reads the right patient: name, ID, age and sex from the stored header (never the birth
    # date), and the page view is audited with how many patients it showed, not who.
    assert "SYNTHETIC, PATIENT" in ct_row and SYNTHETIC_PATIENT_ID in ct_row and "54 y / O" in ct_row
    assert SYNTHETIC_PATIENT_NAME not in html and SYNTHETIC_BIRTH_DATE not in html
    viewed = site.accounts.audit_entries(action="view-identity")[0]
    assert viewed.detail == {"page": "worklist", "studies": 3} and "SYNTHETIC" not in str(viewed.detail)


def test_worklist_filters_and_accession_search(site: Site) -> None:
    ct_uid = flagged_ct(site)
    xray_uid = flagged_xray(site)
    pending_uid, _ = site.add_ct("ACC-PENDING")
    site.sign_in()
    assert row_order(site.client.get("/worklist?modality=DX").text) == [xray_uid]
    assert row_order(site.client.get("/worklist?status=pending").text) == [pending_uid]
    assert row_order(site.client.get("/worklist?accession=ACC-CT-1").text) == [ct_uid]
    assert row_order(site.client.get("/worklist?level=stat").text) == [ct_uid]
    assert set(row_order(site.client.get("/worklist/rows?level=routine").text)) == {pending_uid, xray_uid}
    bad = site.client.get("/worklist?status=finished")
    assert bad.status_code == 400 and "&#39;finished&#39;" in bad.text


def test_reported_studies_leave_the_list(site: Site) -> None:
    study_uid = flagged_ct(site)
    csrf = site.sign_in()
    site.client.post(f"/studies/{study_uid}/report", data={"csrf_token": csrf})
    assert row_order(site.client.get("/worklist").text) == []
    assert row_order(site.client.get("/worklist?include_reported=true").text) == [study_uid]


# ------------------------------------------------------------------------------------------------------ study page
def test_study_page_shows_series_routing_findings_reasons_and_preview(site: Site) -> None:
    study_uid = flagged_ct(site)
    site.sign_in()
    html = site.client.get(f"/studies/{study_uid}").text
    assert "intraparenchymal" in html and "12.5" in html and "2 – 4" in html  # subtype, volume, slice range
    assert "matched rule test" in html and "ct-head-ich 1.0.0" in html
    reasons = site.service.worklist.get_study(study_uid, utcnow()).item.priority.reasons
    assert reasons and all(r.text in html_lib.unescape(html) for r in reasons)
    assert f"/api/v1/studies/{study_uid}/preview.png?finding=0" in html
    assert "Not for diagnostic use" in html
    assert site.accounts.audit_entries(action="view")[0].study_uid == study_uid


def test_unknown_study_is_404(site: Site) -> None:
    site.sign_in()
    assert site.client.get("/studies/1.2.3.999").status_code == 404
    assert site.client.get("/api/v1/studies/1.2.3.999").status_code == 404


def test_only_the_claimant_or_an_admin_releases_a_claim(site: Site) -> None:
    study_uid = flagged_ct(site)
    site.add_radiologist("reader")
    site.add_radiologist("other")
    reader = TestClient(site.client.app)
    other = TestClient(site.client.app)
    reader_csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD, client=reader)
    other_csrf = site.sign_in("other", RADIOLOGIST_PASSWORD, client=other)
    assert reader.post(f"/studies/{study_uid}/claim", data={"csrf_token": reader_csrf}).status_code == 200
    refused = other.post(f"/studies/{study_uid}/release", data={"csrf_token": other_csrf})
    assert "claimed by &#39;reader&#39;" in refused.text
    assert other.post(f"/api/v1/studies/{study_uid}/release", headers={"X-CSRF-Token": other_csrf}).status_code == 409
    assert site.service.worklist.get_study(study_uid, utcnow()).item.claimed_by == "reader"
    admin_csrf = site.sign_in()
    assert site.client.post(f"/studies/{study_uid}/release", data={"csrf_token": admin_csrf}).status_code == 200
    assert site.service.worklist.get_study(study_uid, utcnow()).item.claimed_by is None
    actions = [(e.user, e.action) for e in site.accounts.audit_entries(study_uid=study_uid)]
    assert (
        ("admin", "release") in actions and ("other", "release-refused") in actions and ("reader", "claim") in actions
    )


def test_feedback_is_stored_with_the_model_version_and_exported_as_training_labels(site: Site) -> None:
    ct_uid = flagged_ct(site)
    xray_uid = flagged_xray(site, shadow=False)
    site.add_radiologist()
    csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD)
    site.client.post(f"/studies/{ct_uid}/feedback", data={"csrf_token": csrf, "verdict": "agree", "finding": "0"})
    response = site.client.post(
        f"/studies/{xray_uid}/feedback",
        data={"csrf_token": csrf, "verdict": "disagree", "finding": "0", "comment": "skin fold"},
    )
    assert "Feedback saved" in response.text and "skin fold" in response.text
    missed = site.client.post(
        f"/api/v1/studies/{ct_uid}/feedback",
        json={"verdict": "missed", "label": "fracture", "comment": "skull"},
        headers={"X-CSRF-Token": csrf},
    )
    assert missed.status_code == 201 and missed.json()["model"] == "ct-head-ich" and missed.json()["truth"] == 1
    entries = site.accounts.feedback_entries()
    assert [(e.label, e.verdict.value, e.model, e.model_version) for e in entries] == [
        ("intracranial_haemorrhage", "agree", "ct-head-ich", "1.0.0"),
        ("pneumothorax", "disagree", "xr-chest-pneumothorax", "0.1.0"),
        ("fracture", "missed", "ct-head-ich", "1.0.0"),
    ]
    assert len(site.accounts.audit_entries(action="feedback")) == 3

    site.sign_in()  # admin exports
    export = site.client.get("/api/v1/feedback/labels.csv?model=xr-chest-pneumothorax")
    assert export.headers["content-type"].startswith("text/csv")
    labels = site.settings.data_dir / "labels.csv"
    labels.write_text(export.text)
    cases = read_labels_csv(site.settings.store_dir, labels)  # what `triage train --data DIR --labels CSV` reads
    assert [(case.label, case.path.suffix) for case in cases] == [(0, ".dcm")]
    ct_export = site.client.get("/api/v1/feedback/labels.csv?label=intracranial_haemorrhage").text
    ct_cases = read_labels_csv(site.settings.store_dir, _write(site, ct_export))
    assert [(case.label, case.path.is_dir()) for case in ct_cases] == [(1, True)]  # the CT series folder


def _write(site: Site, text: str):
    path = site.settings.data_dir / "ct-labels.csv"
    path.write_text(text)
    return path


def test_bad_feedback_is_refused_with_the_reason(site: Site) -> None:
    study_uid = flagged_ct(site)
    csrf = site.sign_in()
    response = site.client.post(f"/studies/{study_uid}/feedback", data={"csrf_token": csrf, "verdict": "agree"})
    assert "Feedback not saved" in response.text
    api = site.client.post(
        f"/api/v1/studies/{study_uid}/feedback",
        json={"verdict": "missed", "label": "<b>"},
        headers={"X-CSRF-Token": csrf},
    )
    assert api.status_code == 400 and "&lt;b&gt;" not in api.text and "'<b>'" in api.json()["detail"]
    assert site.accounts.feedback_entries() == []


def test_feedback_on_a_finding_that_changed_since_the_page_was_shown_is_refused(site: Site) -> None:
    study_uid = flagged_ct(site)
    csrf = site.sign_in()
    stale = {"csrf_token": csrf, "verdict": "disagree", "finding": "0", "label": "intracranial_haemorrhage",
             "model": "ct-head-ich", "model_version": "0.9.0"}  # fmt: skip
    response = site.client.post(f"/studies/{study_uid}/feedback", data=stale)
    assert "Feedback not saved" in response.text and "changed since it was shown" in response.text
    assert site.accounts.feedback_entries() == []
    current = {**stale, "model_version": "1.0.0"}
    assert "Feedback saved" in site.client.post(f"/studies/{study_uid}/feedback", data=current).text
    assert [e.model_version for e in site.accounts.feedback_entries()] == ["1.0.0"]


# ------------------------------------------------------------------------------------------------------ previews
def red_fraction(png: bytes, box: tuple[slice, slice]) -> float:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    region = rgb[box]
    return float(np.mean((region[..., 0] > region[..., 1] + 60) & (region[..., 0] > region[..., 2] + 60)))


def test_preview_png_draws_the_ai_region_on_the_key_slice(site: Site) -> None:
    study_uid = flagged_ct(site)
    site.sign_in()
    response = site.client.get(f"/api/v1/studies/{study_uid}/preview.png?finding=0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(response.content))
    assert image.width == 512  # a 32-pixel slice is enlarged to fit the caption
    # The warning band is on top (as on the capture sent to PACS); the 512 x 512 picture below it.
    band = image.height - 512
    # The test overlay marks rows/cols 8..16 of 32 (a quarter-size box); the rest of the image stays grey.
    assert red_fraction(response.content, (slice(band + 150, band + 230), slice(150, 230))) > 0.9
    assert red_fraction(response.content, (slice(band + 300, band + 500), slice(300, 500))) == 0.0
    assert site.client.get(f"/api/v1/studies/{study_uid}/preview.png?finding=5").status_code == 404


def test_preview_of_a_study_without_findings_is_its_middle_image(site: Site) -> None:
    study_uid, _ = site.add_xray("ACC-PLAIN")
    site.sign_in()
    response = site.client.get(f"/api/v1/studies/{study_uid}/preview.png")
    assert response.status_code == 200
    assert red_fraction(response.content, (slice(0, 512), slice(0, 512))) == 0.0


# ------------------------------------------------------------------------------------------------------ audit pages
def test_admin_reads_and_exports_the_audit_log(site: Site) -> None:
    study_uid = flagged_ct(site)
    site.sign_in()
    site.client.get(f"/studies/{study_uid}")
    page = site.client.get("/admin/audit?action=view")
    assert page.status_code == 200 and study_uid[-16:] in page.text
    export = site.client.get("/admin/audit.csv")
    lines = export.text.splitlines()
    assert lines[0] == "at,user,action,study_uid,detail"
    assert any(",admin,view," + study_uid in line for line in lines)
    assert any(",admin,sign-in," in line for line in lines)


def test_admin_adds_and_disables_users_in_the_page(site: Site) -> None:
    csrf = site.sign_in()
    created = site.client.post("/admin/users", data={"csrf_token": csrf, "name": "night-reader", "role": "radiologist"})
    password = re.search(r'<pre id="new-secret">([^<]+)</pre>', created.text).group(1)
    assert site.accounts.verify_password("night-reader", password, utcnow()) is not None
    service = site.client.post("/admin/users", data={"csrf_token": csrf, "name": "modality", "role": "service"})
    token = re.search(r'<pre id="new-secret">([^<]+)</pre>', service.text).group(1)
    assert site.accounts.user_for_token(token, utcnow()).name == "modality"
    site.client.post("/admin/users/night-reader/disable", data={"csrf_token": csrf})
    assert site.accounts.get_user("night-reader").disabled
    duplicate = site.client.post("/admin/users", data={"csrf_token": csrf, "name": "modality", "role": "service"})
    assert "already exists" in duplicate.text
    assert {e.action for e in site.accounts.audit_entries()} >= {"user-add", "user-disable"}


def test_pages_carry_security_headers(site: Site) -> None:
    site.sign_in()
    headers = site.client.get("/worklist").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"


def test_repeated_wrong_passwords_are_throttled(site: Site) -> None:
    def attempt(password: str) -> int:
        form = site.client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        data = {"username": "admin", "password": password, "csrf_token": token}
        return site.client.post("/login", data=data, follow_redirects=False).status_code

    assert [attempt("guess") for _ in range(5)] == [401] * 5
    assert attempt("admin-password-for-tests") == 429  # even the right password waits out the lockout
    assert site.accounts.audit_entries(action="sign-in-throttled")


def test_throttle_forgets_old_failures_and_resets_on_success(site: Site) -> None:
    from triage.worklist.accounts import SharedSignInThrottle

    t0 = utcnow()

    def at(second: float):  # type: ignore[no-untyped-def]
        return t0 + timedelta(seconds=second)

    throttle = SharedSignInThrottle(site.accounts.engine, max_failures=2, window_s=100, lockout_s=10)
    throttle.failed("Reader", at(0.0))
    throttle.failed("reader", at(1.0))
    assert throttle.wait_s("READER", at(2.0)) == pytest.approx(9.0)
    assert throttle.wait_s("reader", at(11.5)) == 0.0
    assert throttle.wait_s("reader", at(200.0)) == 0.0  # outside the window
    throttle.succeeded("reader")
    assert throttle.wait_s("reader", at(2.0)) == 0.0
