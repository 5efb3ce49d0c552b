"""The DICOM results deliverer against a real storage SCP that refuses the report once: the outbox's retry sends
the same stored instances, with the same SOP Instance UIDs, so the PACS ends with one report, not two."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from tests.dicom_factory import make_ct_series, write_dataset
from tests.dicom_peers import Receiver
from triage.config import ResultsSettings
from triage.domain import Finding, InstanceMeta, Overlay
from triage.serve.delivery import DICOM, DicomResultsDeliverer
from triage.storage import LocalStore, overlay_bytes
from triage.worklist.outbox import DeliveryError, Message

T0 = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)


class RefusesTheReportOnce(Receiver):
    """A PACS that fails to store the first SR it is sent (C-STORE failure status), and remembers every attempt."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.attempted: list[str] = []
        self.refused = False

    def _index(self, meta: InstanceMeta) -> bool:
        self.attempted.append(meta.sop_instance_uid)
        if meta.sop_class_uid == Comprehensive3DSRStorage and not self.refused:
            self.refused = True
            raise RuntimeError("PACS database busy")
        return super()._index(meta)


@pytest.fixture
def pacs(tmp_path: Path):
    server = RefusesTheReportOnce(tmp_path / "pacs")
    server.scp.start()
    yield server
    server.scp.stop()


def stored_study(store: LocalStore) -> tuple[str, list[Finding]]:
    series = make_ct_series(3, rows=32, columns=32)
    for ds in series:
        write_dataset(ds, store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    study_uid, key = str(series[0].StudyInstanceUID), series[1]
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[2:5, 2:5] = 1.0
    store.put_overlay(study_uid, "ich.npz", overlay_bytes(Overlay(str(key.SOPInstanceUID), mask, 4)))
    finding = Finding(
        label="intracranial_haemorrhage", probability=0.93, flagged=True, model="ct-head-ich", model_version="1.0.0",
        synthetic=False, series_uid=str(key.SeriesInstanceUID), overlay_file="ich.npz",
    )  # fmt: skip
    shadow = finding.model_copy(update={"model_version": "1.1.0", "shadow": True, "overlay_file": None})
    return study_uid, [finding, shadow]


def test_a_retry_after_a_refused_report_sends_the_same_instances(tmp_path: Path, pacs: RefusesTheReportOnce) -> None:
    store = LocalStore(tmp_path / "dicom", tmp_path / "overlays")
    study_uid, findings = stored_study(store)
    study = SimpleNamespace(findings=findings, site=None, site_match=None, ai_status="done", ai_reason="analysed")
    worklist = SimpleNamespace(get_study=lambda uid, now: study, site_record=lambda site, match: None)
    deliver = DicomResultsDeliverer(worklist, store, ResultsSettings(), dict)
    message = Message(1, DICOM, f"TRIAGE@127.0.0.1:{pacs.port}", study_uid, "ai-results", {"generation": 1}, 0, T0)

    with pytest.raises(DeliveryError, match="stored 1 of 2") as refused:
        deliver(message)
    assert not refused.value.permanent  # the outbox tries again
    first = list(pacs.attempted)
    deliver(message)  # the retry
    second = pacs.attempted[len(first) :]

    assert len(first) == len(second) == 2 and sorted(first) == sorted(second)
    assert len(pacs.metas) == 2  # one report and one capture in the PACS: no second report under new UIDs
    received = [pydicom.dcmread(pacs.store.files.open(m.key)) for m in pacs.metas.values()]
    assert {ds.StudyInstanceUID for ds in received} == {study_uid}
    # The shadow version's finding was not sent (one finding, one capture), and what was sent is what is kept.
    (report,) = [ds for ds in received if ds.SOPClassUID == Comprehensive3DSRStorage]
    assert "1.1.0" not in str(report)
    (results_folder,) = (tmp_path / "results" / study_uid).iterdir()
    assert {p.stem for p in results_folder.glob("*/*.dcm")} == set(first)
