"""Helpers and fixtures: a real TriageService (in-process runner, no DICOM listener, no models) behind the real
app, and helpers to put studies with findings and overlays on its worklist."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.dicom_factory import make_ct_series, make_radiograph, new_uid  # noqa: E402
from triage.config import Settings  # noqa: E402
from triage.domain import AIStatus  # noqa: E402
from triage.serve.app import create_app  # noqa: E402
from triage.serve.service import TriageService  # noqa: E402

ADMIN_PASSWORD = "admin-password-for-tests"
RADIOLOGIST_PASSWORD = "reader-password-1"


def utcnow() -> datetime:
    return datetime.now(UTC)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", weights_dir=tmp_path / "no-weights")
    settings.weights_dir.mkdir()
    # Studies are put on the worklist by the tests; the watcher must not analyse them behind the tests' back.
    settings.dicom.stable_age_s = 3600.0
    return settings


@dataclass
class Site:
    """The running app with its service, and helpers to sign in and to put studies on the worklist."""

    client: TestClient
    service: TriageService
    settings: Settings

    @property
    def accounts(self) -> Any:
        return self.client.app.state.accounts  # type: ignore[attr-defined]

    def sign_in(self, name: str = "admin", password: str = ADMIN_PASSWORD, client: TestClient | None = None) -> str:
        """Sign in through the form; returns the session's CSRF token (read from the page, as a browser would)."""
        client = client or self.client
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        response = client.post(
            "/login",
            data={"username": name, "password": password, "csrf_token": token, "next": "/worklist"},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text
        page = client.get("/worklist")
        return re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)

    def add_radiologist(self, name: str = "reader") -> None:
        self.accounts.add_user(name, "radiologist", RADIOLOGIST_PASSWORD, utcnow())

    def add_ct(self, accession: str = "ACC-CT-1", **kwargs: Any) -> tuple[str, list[Any]]:
        datasets = make_ct_series(n_slices=6, rows=32, columns=32, accession_number=accession, **kwargs)
        for ds in datasets:
            self.service.accept(ds, "CT_SCANNER")
        return str(datasets[0].StudyInstanceUID), datasets

    def add_xray(self, accession: str = "ACC-XR-1", **kwargs: Any) -> tuple[str, Any]:
        ds = make_radiograph("DX", 128, 128, accession_number=accession, **kwargs)
        self.service.accept(ds, "XR_ROOM")
        return str(ds.StudyInstanceUID), ds

    def finish(
        self,
        study_uid: str,
        findings: list[dict[str, Any]],
        routing: list[dict[str, Any]] | None = None,
        status: AIStatus = AIStatus.DONE,
        reason: str = "analysed",
    ) -> None:
        worklist = self.service.worklist
        generation = worklist.begin_analysis(study_uid, utcnow())
        if routing is None:
            routing = [
                {
                    "series_uid": s.series_uid,
                    "modality": s.modality,
                    "model": f.get("model"),
                    "rule": "test",
                    "reason": "matched rule test",
                    "model_version": f.get("model_version"),
                    "analysis": "done",
                }
                for s in worklist.series_of(study_uid)
                for f in findings[:1]
            ]
        worklist.finish_analysis(study_uid, generation, findings, routing, status, reason, utcnow())

    def overlay(self, study_uid: str, name: str, sop_uid: str, shape: tuple[int, int], stride: int = 1) -> str:
        folder = self.settings.overlay_dir / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        mask = np.zeros(shape, dtype=np.float32)
        mask[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = 1.0
        np.savez_compressed(folder / name, mask=mask, stride=stride, sop_instance_uid=sop_uid, kind="mask")
        return name


def ich_finding(sop_uid: str, series_uid: str, overlay_file: str | None, flagged: bool = True) -> dict[str, Any]:
    return {
        "label": "intracranial_haemorrhage",
        "probability": 0.93 if flagged else 0.04,
        "flagged": flagged,
        "model": "ct-head-ich",
        "model_version": "1.0.0",
        "synthetic": False,
        "series_uid": series_uid,
        "details": {"subtype": "intraparenchymal", "volume_ml": 12.5, "slice_range": [2, 4]},
        "overlay_sop_instance_uid": sop_uid,
        "overlay_file": overlay_file,
    }


def pneumothorax_finding(sop_uid: str, series_uid: str, overlay_file: str | None) -> dict[str, Any]:
    return {
        "label": "pneumothorax",
        "probability": 0.81,
        "flagged": True,
        "model": "xr-chest-pneumothorax",
        "model_version": "0.1.0",
        "synthetic": True,
        "series_uid": series_uid,
        "details": {"side": "left"},
        "overlay_sop_instance_uid": sop_uid,
        "overlay_file": overlay_file,
    }


@pytest.fixture()
def site(settings: Settings) -> Iterator[Site]:
    settings.admin_password = ADMIN_PASSWORD
    service = TriageService(settings, runner_kind="inprocess", start_scp=False)
    app = create_app(settings, runner_kind="inprocess", service=service)
    with TestClient(app, base_url="http://testserver") as client:
        yield Site(client, service, settings)


__all__ = ["Site", "ich_finding", "new_uid", "pneumothorax_finding"]
