"""Admins re-queue a study for a fresh AI analysis from the page, the API and the CLI; each is audited."""

from __future__ import annotations

import re
import subprocess
import sys

from serve_site import RADIOLOGIST_PASSWORD, Site, utcnow

from triage.domain import AIStatus
from triage.worklist.accounts import add_user


def _failed_study(site: Site) -> str:
    study_uid, _ = site.add_xray()
    site.finish(study_uid, [], status=AIStatus.FAILED, reason="xr-chest-pneumothorax: the model worker stopped")
    return study_uid


def _status(site: Site, study_uid: str) -> str:
    return site.service.worklist.get_study(study_uid, utcnow()).item.ai_status


def test_admin_requeues_from_the_api_and_it_is_audited(site: Site) -> None:
    study_uid = _failed_study(site)
    csrf = site.sign_in()
    response = site.client.post(f"/api/v1/studies/{study_uid}/requeue", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200, response.text
    assert response.json()["action"] == "requeue"
    assert _status(site, study_uid) == "pending"
    entries = site.accounts.audit_entries(action="requeue", study_uid=study_uid)
    assert [(e.user, e.detail.get("via")) for e in entries] == [("admin", "api")]


def test_radiologists_and_service_accounts_cannot_requeue(site: Site) -> None:
    study_uid = _failed_study(site)
    _, token = site.accounts.add_user("ris", "service", None, utcnow())
    response = site.client.post(f"/api/v1/studies/{study_uid}/requeue", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    site.add_radiologist()
    csrf = site.sign_in("reader", RADIOLOGIST_PASSWORD)
    assert site.client.post(f"/api/v1/studies/{study_uid}/requeue", headers={"X-CSRF-Token": csrf}).status_code == 403
    assert site.client.post(f"/studies/{study_uid}/requeue", data={"csrf_token": csrf}).status_code == 403
    assert _status(site, study_uid) == "failed"


def test_admin_requeues_from_the_study_page(site: Site) -> None:
    study_uid = _failed_study(site)
    csrf = site.sign_in()
    page = site.client.get(f"/studies/{study_uid}")
    assert 'id="requeue"' in page.text
    assert "the model worker stopped" in page.text
    assert re.search(rf'action="/studies/{study_uid}/requeue"', page.text)
    response = site.client.post(f"/studies/{study_uid}/requeue", data={"csrf_token": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert _status(site, study_uid) == "pending"
    assert site.accounts.audit_entries(action="requeue", study_uid=study_uid)


def test_requeue_of_a_study_being_analysed_is_refused_with_the_reason(site: Site) -> None:
    study_uid, _ = site.add_xray()
    # Analysed by a live process on another node, under a lease: the service's own recovery of interrupted
    # analyses, which may run late on a loaded machine, must leave it alone. (A run without a lease, or one this
    # process holds while not running it, is taken back as interrupted.)
    site.service.worklist.begin_analysis(study_uid, utcnow(), worker="analysis-node-2:4242", lease_s=600)
    csrf = site.sign_in()
    response = site.client.post(f"/api/v1/studies/{study_uid}/requeue", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 409
    assert "being analysed" in response.text


def test_cli_requeues_every_failed_study_and_audits_it(site: Site) -> None:
    study_uid = _failed_study(site)
    add_user(site.settings, "nobody-else", "radiologist", RADIOLOGIST_PASSWORD)  # the CLI opens the same database
    command = [sys.executable, "-m", "triage", "requeue", "--all-failed", "--data-dir", str(site.settings.data_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"re-queued {study_uid}" in result.stdout
    assert _status(site, study_uid) == "pending"
    [entry] = site.accounts.audit_entries(action="requeue", study_uid=study_uid)
    assert entry.user.startswith("cli:") and entry.detail == {"via": "cli"}

    unknown = [*command[:4], "1.2.3.4", "--data-dir", str(site.settings.data_dir)]
    missing = subprocess.run(unknown, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert "not on the worklist" in missing.stderr + missing.stdout
