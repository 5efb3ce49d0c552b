"""Two versions of a model side by side on the real service (Ray Serve, one deployment per version): the one in use
raises priority, the new one runs in shadow on the same study and is marked so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from tests.integration.conftest import promote_for_tests, start_server, stop_server, study_lines
from tests.model_versions import copy_version
from triage.config import Settings
from triage.training.synth_xray import generate_dataset

pytestmark = pytest.mark.integration
XR = "xr-chest-pneumothorax"


def test_the_active_version_raises_and_the_new_one_runs_in_shadow_beside_it(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(Settings().weights_dir / XR, weights / XR)
    copy_version(weights / XR, "1.1.0")
    env = {"TRIAGE_WEIGHTS_DIR": str(weights)}
    data_dir = tmp_path / "data"
    promote_for_tests(data_dir, XR, version="1.0.0", env=env)  # the version in use at this site (no institution)

    server = start_server(data_dir, env)
    try:
        generate_dataset(tmp_path / "xr", n=1, positive_fraction=1.0, seed=3, fmt="dicom")
        (film,) = sorted((tmp_path / "xr").glob("*.dcm"))
        study_uid = str(pydicom.dcmread(film, stop_before_pixels=True).StudyInstanceUID)
        assert server.storescu(film).returncode == 0
        item = server.wait_for(
            lambda items: next(
                (i for i in items if i["study_uid"] == study_uid and i["ai_status"] not in ("pending", "analysing")),
                None,
            ),
            what="the film to be analysed by both versions",
        )
        assert item["ai_status"] == "done", study_lines([item])
        versions = [(f["model_version"], f["shadow"], f["flagged"]) for f in item["findings"]]
        assert versions == [("1.0.0", False, True), ("1.1.0", True, True)], versions
        assert item["priority"]["level"] == "stat"
        models = {m["version"]: m for m in server.get("/api/v1/models").json()}
        assert {s["site"]: s["state"] for s in models["1.0.0"]["states"]}[""] == "active"
        assert {s["site"]: s["state"] for s in models["1.1.0"]["states"]}[""] == "shadow"
    finally:
        stop_server(server)
