"""The spine, end to end: storescu sends studies to a running `triage serve` (real SCP, real local Ray,
ONNX Runtime, SQLite), and they come out on the worklist analysed, once, in priority order."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.integration.conftest import HEAD_CT, Server, study_lines
from triage.dicom.dcmtk import find_dcmtk

pytestmark = pytest.mark.integration


def _study_uid(folder: Path) -> str:
    first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _item(items: list[dict], study_uid: str) -> dict | None:
    matches = [i for i in items if i["study_uid"] == study_uid]
    assert len(matches) <= 1, f"study listed {len(matches)} times"
    return matches[0] if matches else None


def _analysed(study_uid: str):  # type: ignore[no-untyped-def]
    def check(items: list[dict]) -> dict | None:
        item = _item(items, study_uid)
        return item if item and item["ai_status"] not in ("pending", "analysing") else None

    return check


def test_head_ct_over_storescu_is_listed_once_analysed_and_resend_changes_nothing(server: Server) -> None:
    study_uid = _study_uid(HEAD_CT)
    result = server.storescu(HEAD_CT)
    assert result.returncode == 0, result.stderr

    item = server.wait_for(_analysed(study_uid), what="the head CT to be analysed")
    assert item["ai_status"] == "done", study_lines([item])
    assert item["modality"] == "CT"
    (finding,) = [f for f in item["findings"] if f["label"] == "intracranial_haemorrhage"]
    assert finding["model"] == "ct-head-ich" and finding["model_version"]
    assert finding["synthetic"] is False
    assert 0.0 <= finding["probability"] <= 1.0
    assert {"subtype", "volume_ml", "slice_range"} <= set(finding["details"])
    assert item["priority"]["level"] in ("routine", "urgent", "stat")
    assert item["priority"]["reasons"], "every position has a reason"

    detail = server.get(f"/api/v1/studies/{study_uid}").json()
    stored = sorted((server.data_dir / "dicom" / study_uid).rglob("*.dcm"))
    assert len(stored) == 28
    routed = [s for s in detail["series"] if (s["routing"] or {}).get("model") == "ct-head-ich"]
    assert len(routed) == 1

    # The same instances again: no new files, still one item, no re-analysis.
    before = server.get(f"/api/v1/studies/{study_uid}").json()
    result = server.storescu(HEAD_CT)
    assert result.returncode == 0, result.stderr
    time.sleep(5)  # longer than stable_age_s: a re-analysis would have started by now
    again = _item(server.worklist(), study_uid)
    assert again is not None and again["ai_status"] == "done"
    assert again["findings"] == item["findings"]
    assert len(sorted((server.data_dir / "dicom" / study_uid).rglob("*.dcm"))) == 28
    after = server.get(f"/api/v1/studies/{study_uid}").json()
    assert after["instance_count"] == 28
    assert after["analysis_generation"] == before["analysis_generation"] == 1
    assert after["analysed_generation"] == 1


def test_chest_xray_is_analysed_by_the_synthetic_model_and_says_so(server: Server, tmp_path: Path) -> None:
    from triage.training.synth_xray import generate_dataset

    generate_dataset(tmp_path, n=1, positive_fraction=1.0, seed=3, fmt="dicom")
    files = sorted(tmp_path.rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert server.storescu(*files).returncode == 0
    item = server.wait_for(_analysed(study_uid), what="the chest X-ray to be analysed")
    assert item["ai_status"] == "done", study_lines([item])
    (finding,) = item["findings"]
    assert finding["label"] == "pneumothorax"
    assert finding["synthetic"] is True
    assert finding["model"] == "xr-chest-pneumothorax"
    # Its card says synthetic: it runs in shadow, so its flag (the film has a pneumothorax) raises nothing.
    assert finding["flagged"] is True and finding["shadow"] is True
    assert item["priority"]["level"] == "routine"
    assert not any("pneumothorax" in r["text"] for r in item["priority"]["reasons"])
    status = subprocess.run(
        [sys.executable, "-m", "triage", "models", "status", "--json", "--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    states = {(s["model"], s["site"]): s["state"] for s in json.loads(status.stdout)["states"]}
    assert states[("xr-chest-pneumothorax", "*")] == "shadow" and states[("xr-chest-pneumothorax", "")] == "shadow"


def test_corrupt_file_gets_a_failure_status_and_the_server_keeps_serving(server: Server, tmp_path: Path) -> None:
    good = sorted(HEAD_CT.glob("*.dcm"))[0]
    ds = pydicom.dcmread(good)
    ds.StudyInstanceUID = ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.543.9001"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.543.9001.1"
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # a third of the pixels: the instance is incomplete
    ds.save_as(tmp_path / "short.dcm")
    result = server.storescu(tmp_path / "short.dcm", check=False)
    assert result.returncode != 0, "storescu must hear a failure status (0xA900) for an incomplete instance"
    assert not (server.data_dir / "dicom" / "1.2.826.0.1.3680043.10.543.9001").exists(), (
        "an incomplete instance was kept"
    )
    assert server.get("/healthz").status_code == 200
    echo = find_dcmtk("echoscu")
    assert echo is not None
    assert subprocess.run([echo, "-aec", "TRIAGE", "127.0.0.1", str(server.dicom_port)], timeout=30).returncode == 0


def test_stow_rs_stores_and_lists_the_study(server: Server, tmp_path: Path) -> None:
    from triage.training.synth_xray import generate_dataset

    generate_dataset(tmp_path, n=1, positive_fraction=0.0, seed=11, fmt="dicom")
    (path,) = sorted(tmp_path.rglob("*.dcm"))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    boundary = "triage-test-boundary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = server.post(
        "/dicomweb/studies",
        content=body,
        headers={
            **(server.headers or {}),
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
    )
    assert response.status_code == 200, response.text
    referenced = response.json()["00081199"]["Value"]
    assert referenced[0]["00081155"]["Value"] == [str(ds.SOPInstanceUID)]
    server.wait_for(lambda items: _item(items, str(ds.StudyInstanceUID)), timeout_s=60, what="the STOW study")

    wrong = server.post("/dicomweb/studies", content=b"hello", headers={"Content-Type": "text/plain"})
    assert wrong.status_code == 415


def test_ai_failure_keeps_the_study_at_its_clinical_priority(server: Server, tmp_path: Path) -> None:
    """A head CT whose geometry is inconsistent cannot be analysed: it is listed, failed, with the reason."""
    source = sorted(HEAD_CT.glob("*.dcm"))[:12]
    uid_root = "1.2.826.0.1.3680043.10.543."
    study_uid, series_uid = uid_root + "7001", uid_root + "7002"
    for index, path in enumerate(source):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = f"{uid_root}7003.{index}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.RequestedProcedurePriority = "STAT"
        if index == 5:  # one slice with a different matrix: the stack cannot be built
            ds.PixelSpacing = [0.9, 0.9]
        ds.save_as(tmp_path / f"{index:02d}.dcm")
    assert server.storescu(tmp_path).returncode == 0
    item = server.wait_for(_analysed(study_uid), what="the broken CT to be marked")
    assert item["ai_status"] == "failed"
    assert item["ai_reason"]
    assert item["priority"]["level"] == "stat"
    assert item["findings"] == []
