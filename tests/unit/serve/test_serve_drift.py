"""The drift watch of a running service: an alert is logged once in the audit log, counted in /metrics and
listed by the monitor API."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from serve_site import Site, utcnow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worklist"))
from test_monitoring import XR, Stream  # noqa: E402

from triage.worklist.monitoring import windows  # noqa: E402


def test_a_jump_in_flag_rate_is_audited_once_counted_in_metrics_and_listed(site: Site) -> None:
    now = utcnow()
    recent, baseline = windows(now, 24, 28)
    stream = Stream(site.service.worklist)
    stream.run(*baseline, 100, 0.05, seed=1)
    stream.run(recent[0] + timedelta(minutes=10), now - timedelta(minutes=1), 40, 0.5, seed=2)

    alerts = site.service.check_drift(now)
    assert any(a.kind == "flag-rate" and a.model == XR for a in alerts)
    site.service.check_drift(now)  # still open: not audited again
    entries = site.accounts.audit_entries(action="model-drift", user="triage")
    assert sorted(e.detail["kind"] for e in entries) == ["flag-rate", "probabilities"]  # once each
    assert all(e.detail["site"] == "North" and e.detail["model"] == XR for e in entries)

    _, token = site.accounts.add_user("prometheus", "service", None, utcnow())
    auth = {"Authorization": f"Bearer {token}"}
    text = site.client.get("/metrics", headers=auth).text
    assert f'triage_model_drift_alerts{{kind="flag-rate",model="{XR}",site="North",version="1.0.0"}} 1.0' in text
    assert f'triage_model_studies{{model="{XR}",shadow="false",site="North",version="1.0.0"}} 40.0' in text
    assert site.client.get("/metrics").status_code == 401  # metrics are for signed-in callers
    monitor = site.client.get("/api/v1/models/monitor", headers=auth).json()
    assert [a["kind"] for a in monitor["alerts"] if a["kind"] == "flag-rate"] == ["flag-rate"]
    assert monitor["activity"][0]["studies"] == 40


def test_the_admin_models_page_shows_states_activity_and_alerts_and_sets_a_state(site: Site) -> None:
    import shutil

    from serve_site import RADIOLOGIST_PASSWORD

    from triage.config import Settings

    shutil.copytree(Settings().weights_dir / XR, site.settings.weights_dir / XR)
    site.service.registry.refresh()
    now = utcnow()
    recent, baseline = windows(now, 24, 28)
    stream = Stream(site.service.worklist)
    stream.run(*baseline, 100, 0.05, seed=1)
    stream.run(recent[0] + timedelta(minutes=10), now - timedelta(minutes=1), 40, 0.5, seed=2)
    csrf = site.sign_in()
    page = site.client.get("/admin/models").text
    assert 'data-model="xr-chest-pneumothorax" data-site="*" data-state="shadow"' in page
    assert 'data-site="North" data-state="shadow"' in page  # the site the studies came from
    assert "flag rate 45.0% over 40 studies" in page and "trained on synthetic data" in page
    response = site.client.post(
        "/admin/models/state",
        data={"csrf_token": csrf, "model": XR, "version": "1.0.0", "site": "North", "state": "off", "why": "not here"},
    )
    assert response.status_code == 200 and 'data-site="North" data-state="off"' in response.text
    (entry,) = site.accounts.audit_entries(action="model-state")
    assert entry.user == "admin" and entry.detail["to"] == "off" and entry.detail["reason"] == "not here"

    site.add_radiologist()
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    assert site.client.get("/admin/models").status_code == 403
