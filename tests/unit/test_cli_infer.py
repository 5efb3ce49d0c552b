"""`triage infer` analyses a local study the way the server does: the same orchestration, on a worklist in memory."""

from __future__ import annotations

from pathlib import Path

from tests.dicom_factory import make_radiograph, write_dataset
from triage.cli import infer_path
from triage.config import Settings

XRAY_MODEL = "xr-chest-pneumothorax"


def _study(tmp_path: Path) -> Path:
    folder = tmp_path / "study"
    ds = make_radiograph("DX", 128, 128, accession_number="ACC-INFER")
    write_dataset(ds, folder / "frontal.dcm")
    return folder


def test_infer_routes_runs_and_summarises_like_the_scheduler(tmp_path: Path) -> None:
    report = infer_path(_study(tmp_path), Settings(data_dir=tmp_path / "data"))
    (study,) = report["studies"]
    # The synthetic X-ray model is in shadow (no site has activated it): it ran, but is not in use here.
    assert study["ai_status"] == "done" and f"on trial: {XRAY_MODEL}" in study["reason"]
    assert all(f["shadow"] for f in study["findings"])
    assert [d["model"] for d in study["routing"]] == [XRAY_MODEL]
    (result,) = study["results"]
    assert result["ok"] and result["model"] == XRAY_MODEL and "inference" in result["timings_s"]
    (finding,) = result["findings"]
    assert finding["model"] == XRAY_MODEL and 0.0 <= finding["probability"] <= 1.0
    assert finding["synthetic"] is True and "notice" in finding
    # Overlays are not kept by a one-off analysis.
    assert finding["overlay_file"] is None and finding["overlay_sop_instance_uid"]


def test_infer_with_another_model_says_why_nothing_ran(tmp_path: Path) -> None:
    report = infer_path(_study(tmp_path), Settings(data_dir=tmp_path / "data"), model="ct-head-ich")
    (study,) = report["studies"]
    assert study["ai_status"] == "not-applicable" and study["results"] == []
    assert "model-unavailable" in study["routing"][0]["reason"]
