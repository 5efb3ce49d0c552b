"""AI results reach a real PACS: a real Orthanc receives the TID 1500 report, the SEG and the overlay capture in the
analysed study, and they read back from it with highdicom."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

from tests.integration.conftest import free_port
from triage.dicom.results import export_study_results
from triage.domain import Finding, Overlay, SliceMasks
from triage.storage import LocalStore, overlay_bytes, segmentation_bytes

HEAD_CT_SLICE = Path(__file__).resolve().parents[1] / "data" / "ct-head-ge" / "01.dcm"
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
START_TIMEOUT_S = 20.0

pytestmark = pytest.mark.integration


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
    http_port, dicom_port = free_port(), free_port()
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


def test_results_arrive_in_the_same_study_in_orthanc_and_read_back(tmp_path: Path, orthanc: Orthanc):
    store_dir, overlay_dir = tmp_path / "store", tmp_path / "overlays"
    series = [pydicom.dcmread(p) for p in sorted(HEAD_CT_SLICE.parent.glob("*.dcm"))]
    source = series[0]
    study_uid = str(source.StudyInstanceUID)
    for path, ds in zip(sorted(HEAD_CT_SLICE.parent.glob("*.dcm")), series, strict=True):
        stored_path = store_dir / study_uid / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        stored_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, stored_path)
    store = LocalStore(store_dir, overlay_dir)
    # The bleed on three of the tilted slices, as the head CT pipeline leaves it, and the overlay of the middle one.
    masked = series[11:14]
    masks = np.zeros((3, int(source.Rows), int(source.Columns)), dtype=bool)
    masks[:, 200:240, 230:270] = True
    store.put_overlay(
        study_uid, "ich-seg.npz", segmentation_bytes(SliceMasks([str(d.SOPInstanceUID) for d in masked], masks))
    )
    stride = 8
    store.put_overlay(
        study_uid,
        "ich.npz",
        overlay_bytes(Overlay(str(masked[1].SOPInstanceUID), masks[1][::stride, ::stride].astype(np.float32), stride)),
    )
    findings = [
        Finding(
            label="intracranial_haemorrhage", probability=0.91, flagged=True, model="ct-head-ich",
            model_version="1.0.0", synthetic=False, series_uid=str(source.SeriesInstanceUID),
            details={"subtype": "IPH", "volume_ml": 4.2, "class_volumes_ml": {"IPH": 4.2}},
            overlay_file="ich.npz", segmentation_file="ich-seg.npz",
        )
    ]  # fmt: skip
    codes = {"intracranial_haemorrhage": ("1386000", "SCT", "Intracranial hemorrhage")}

    stored = export_study_results(
        store, study_uid, findings, "done", "analysed by ct-head-ich 1.0.0",
        ("ORTHANC", "127.0.0.1", orthanc.dicom_port), codes_by_label=codes,
    )  # fmt: skip

    assert stored == 3
    instance_ids = orthanc.get("/instances").json()
    assert len(instance_ids) == 3
    tags = [orthanc.get(f"/instances/{i}/simplified-tags").json() for i in instance_ids]
    assert {t["StudyInstanceUID"] for t in tags} == {study_uid}
    by_class = {t["SOPClassUID"]: (i, t) for i, t in zip(instance_ids, tags, strict=True)}
    assert set(by_class) == {Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage}
    # Orthanc files them under the one study: the reading centre sees them next to the images.
    assert len(orthanc.get("/studies").json()) == 1
    # Retrieved from Orthanc, they read back as what was sent: the report referencing the segment, the SEG on
    # the source slices.
    sr_id, sr_tags = by_class[Comprehensive3DSRStorage]
    assert sr_tags["PatientID"] == str(source.PatientID)
    report = hd.sr.srread(io.BytesIO(orthanc.get(f"/instances/{sr_id}/file").content))
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    assert group.finding_type.meaning == "Intracranial hemorrhage"
    seg_id, seg_tags = by_class[SegmentationStorage]
    assert group.referenced_segment.referenced_sop_instance_uid == seg_tags["SOPInstanceUID"]
    seg = hd.seg.segread(io.BytesIO(orthanc.get(f"/instances/{seg_id}/file").content))
    assert int(seg.NumberOfFrames) == 3
    sources = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert sources == {str(d.SOPInstanceUID) for d in masked}
    capture = by_class[SecondaryCaptureImageStorage][1]
    assert capture["BurnedInAnnotation"] == "YES"
