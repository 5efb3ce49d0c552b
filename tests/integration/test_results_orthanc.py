"""AI results reach a real PACS: a real Orthanc receives the SR and the overlay capture in the analysed study."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import BasicTextSRStorage, SecondaryCaptureImageStorage

from triage.dicom.results import SERIES_DESCRIPTION, export_study_results
from triage.domain import Finding
from triage.storage import LocalStore

HEAD_CT_SLICE = Path(__file__).resolve().parents[1] / "data" / "ct-head-ge" / "01.dcm"
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
START_TIMEOUT_S = 20.0

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _not_available(reason: str) -> NoReturn:
    """Fail where Orthanc is required (CI sets TRIAGE_REQUIRE_ORTHANC), else skip with the reason."""
    if os.environ.get("TRIAGE_REQUIRE_ORTHANC"):
        pytest.fail(f"{reason} (TRIAGE_REQUIRE_ORTHANC is set)")
    pytest.skip(f"{reason}; install it with: apt-get install -y orthanc")


@dataclass
class Orthanc:
    url: str
    dicom_port: int

    def get(self, path: str) -> httpx.Response:
        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    binary = shutil.which("Orthanc") or next((p for p in ORTHANC_CANDIDATES if Path(p).is_file()), None)
    if binary is None:
        _not_available("Orthanc is not installed")
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "triage-test-pacs",
        "StorageDirectory": str(tmp_path / "orthanc" / "storage"),
        "IndexDirectory": str(tmp_path / "orthanc" / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {},
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = tmp_path / "orthanc.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(binary), str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                _not_available(f"Orthanc exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/system", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                _not_available(f"Orthanc's REST API did not answer within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        yield Orthanc(url, dicom_port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_results_arrive_in_the_same_study_in_orthanc(tmp_path: Path, orthanc: Orthanc):
    store_dir, overlay_dir = tmp_path / "store", tmp_path / "overlays"
    source = pydicom.dcmread(HEAD_CT_SLICE)
    study_uid = str(source.StudyInstanceUID)
    stored_path = store_dir / study_uid / str(source.SeriesInstanceUID) / f"{source.SOPInstanceUID}.dcm"
    stored_path.parent.mkdir(parents=True)
    shutil.copyfile(HEAD_CT_SLICE, stored_path)

    stride = 8
    mask = np.zeros((int(source.Rows) // stride, int(source.Columns) // stride), dtype=np.float32)
    mask[20:30, 25:35] = 1.0
    (overlay_dir / study_uid).mkdir(parents=True)
    np.savez_compressed(
        overlay_dir / study_uid / "ct-head-ich-ich.npz",
        mask=mask,
        stride=stride,
        sop_instance_uid=str(source.SOPInstanceUID),
        kind="mask",
    )
    findings = [
        Finding(
            **{
                "label": "intracranial haemorrhage",
                "probability": 0.91,
                "flagged": True,
                "model": "ct-head-ich",
                "model_version": "0.1.0",
                "synthetic": True,
                "series_uid": str(source.SeriesInstanceUID),
                "details": {"subtype": "intraparenchymal", "volume_ml": 4.2, "slice_range": [1, 1]},
                "overlay_file": "ct-head-ich-ich.npz",
            }
        )
    ]

    stored = export_study_results(
        LocalStore(store_dir, overlay_dir),
        study_uid,
        findings,
        "done",
        "analysed by ct-head-ich 0.1.0",
        ("ORTHANC", "127.0.0.1", orthanc.dicom_port),
    )

    assert stored == 2
    instance_ids = orthanc.get("/instances").json()
    assert len(instance_ids) == 2
    tags = [orthanc.get(f"/instances/{i}/simplified-tags").json() for i in instance_ids]
    assert {t["StudyInstanceUID"] for t in tags} == {study_uid}
    by_class = {t["SOPClassUID"]: t for t in tags}
    assert set(by_class) == {BasicTextSRStorage, SecondaryCaptureImageStorage}
    sr = by_class[BasicTextSRStorage]
    assert sr["SeriesDescription"] == SERIES_DESCRIPTION
    assert sr["PatientID"] == str(source.PatientID)
    capture = by_class[SecondaryCaptureImageStorage]
    assert capture["BurnedInAnnotation"] == "YES"
    assert capture["SeriesInstanceUID"] != sr["SeriesInstanceUID"] != str(source.SeriesInstanceUID)
    # Orthanc files both under one study: the reading centre sees them next to the images.
    assert len(orthanc.get("/studies").json()) == 1

    sr_id = next(i for i, t in zip(instance_ids, tags, strict=True) if t["SOPClassUID"] == BasicTextSRStorage)
    sr_text = orthanc.get(f"/instances/{sr_id}/file").content
    assert b"synthetic demonstration model, not validated" in sr_text
    assert b"AI triage aid, not a diagnosis" in sr_text
