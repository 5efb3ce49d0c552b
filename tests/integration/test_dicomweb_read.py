"""QIDO-RS and WADO-RS checked with a real DICOMweb client (dicomweb-client) against a running `triage serve`:
the studies and series it holds are found, their instances retrieved byte-identical to what was sent, metadata
read; a radiologist's scope applies; an analysed study's AI results (SR, SEG, overlay capture) are listed and
retrieved beside its images and read back with highdicom."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.dicom_factory import make_ct_series, write_dataset
from tests.integration.conftest import Server, start_server, stop_server
from triage.config import Settings
from triage.domain import AIStatus, Finding, Overlay, SliceMasks, utcnow
from triage.storage import LocalStore, overlay_bytes, segmentation_bytes
from triage.worklist.db import create_engine_for
from triage.worklist.repository import Worklist

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[pydicom.Dataset], Path]]:
    root = tmp_path_factory.mktemp("dicomweb")
    series = make_ct_series(n_slices=5, rows=32, columns=32, accession_number="ACC-WEB-1")
    folder = root / "study"
    for ds in series:
        ds.PatientName = "WEB^PATIENT"
        ds.PatientID = "MRN-WEB-1"
        write_dataset(ds, folder / f"{ds.SOPInstanceUID}.dcm")
    server = start_server(root / "data", extra_env={"TRIAGE_DICOM__STABLE_AGE_S": "3600"}, runner="inprocess")
    try:
        server.storescu(folder)
        server.wait_for(lambda items: any(i["accession_number"] == "ACC-WEB-1" for i in items), what="the study listed")
        yield server, series, folder
    finally:
        stop_server(server)


def client(server: Server) -> DICOMwebClient:
    return DICOMwebClient(url=f"{server.url}/dicomweb", headers=dict(server.headers or {}))


def test_qido_finds_the_study_and_its_series(served) -> None:
    server, series, _ = served
    web = client(server)
    study_uid = str(series[0].StudyInstanceUID)
    (study,) = web.search_for_studies(search_filters={"AccessionNumber": "ACC-WEB-1"})
    found = pydicom.Dataset.from_json(study)
    assert found.StudyInstanceUID == study_uid and found.ModalitiesInStudy == "CT"
    assert str(found.PatientName) == "WEB^PATIENT" and found.NumberOfStudyRelatedInstances == 5
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in web.search_for_series(study_uid)] == [
        str(series[0].SeriesInstanceUID)
    ]
    instances = web.search_for_instances(study_uid, str(series[0].SeriesInstanceUID))
    assert {pydicom.Dataset.from_json(i).SOPInstanceUID for i in instances} == {str(d.SOPInstanceUID) for d in series}
    assert web.search_for_studies(search_filters={"AccessionNumber": "NO-SUCH"}) == []


def test_wado_retrieves_the_instances_as_sent_and_their_metadata(served) -> None:
    server, series, folder = served
    web = client(server)
    study_uid, series_uid = str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID)
    retrieved = web.retrieve_series(study_uid, series_uid)
    assert {str(ds.SOPInstanceUID) for ds in retrieved} == {str(d.SOPInstanceUID) for d in series}
    one = web.retrieve_instance(study_uid, series_uid, str(series[2].SOPInstanceUID))
    assert one.pixel_array.tolist() == series[2].pixel_array.tolist()
    metadata = web.retrieve_study_metadata(study_uid)
    assert len(metadata) == 5 and all("7FE00010" not in m for m in metadata)
    assert len(web.retrieve_study(study_uid)) == 5


def record_analysis(server: Server, series: list[pydicom.Dataset]) -> None:
    """What the analysis role leaves for a flagged head CT: the finding in the database (written here through the
    same repository, on the server's database), its segmentation and overlay in the store."""
    settings = Settings()
    settings.data_dir = server.data_dir
    study_uid, series_uid = str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID)
    store = LocalStore(settings.store_dir, settings.overlay_dir)
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[:, 8:20, 8:20] = True
    store.put_overlay(
        study_uid, "seg.npz", segmentation_bytes(SliceMasks([str(d.SOPInstanceUID) for d in series[1:3]], masks))
    )
    store.put_overlay(
        study_uid, "ich.npz", overlay_bytes(Overlay(str(series[1].SOPInstanceUID), masks[0].astype(np.float32), 1))
    )
    finding = Finding(
        label="intracranial_haemorrhage",
        probability=0.93,
        flagged=True,
        model="ct-head-ich",
        model_version="1.0.0",
        synthetic=False,
        series_uid=series_uid,
        details={"volume_ml": 1.2},
        overlay_file="ich.npz",
        segmentation_file="seg.npz",
    )
    routing = [
        {
            "series_uid": series_uid,
            "modality": "CT",
            "model": "ct-head-ich",
            "rule": "test",
            "reason": "test",
            "model_version": "1.0.0",
            "analysis": "done",
        }
    ]
    worklist = Worklist(create_engine_for(settings.resolved_database_url), settings.priority)
    generation = worklist.begin_analysis(study_uid, utcnow())
    assert worklist.finish_analysis(study_uid, generation, [finding], routing, AIStatus.DONE, "analysed", utcnow())
    worklist.engine.dispose()


def test_an_analysed_studys_results_are_listed_and_retrieved_beside_its_images(served, tmp_path: Path) -> None:
    server, _, _ = served
    series = make_ct_series(n_slices=4, rows=32, columns=32, accession_number="ACC-WEB-AI")
    for ds in series:
        write_dataset(ds, tmp_path / "ai" / f"{ds.SOPInstanceUID}.dcm")
    server.storescu(tmp_path / "ai")
    server.wait_for(lambda items: any(i["accession_number"] == "ACC-WEB-AI" for i in items), what="the study listed")
    record_analysis(server, series)
    web = client(server)
    study_uid = str(series[0].StudyInstanceUID)

    listed = {
        pydicom.Dataset.from_json(s).Modality: pydicom.Dataset.from_json(s) for s in web.search_for_series(study_uid)
    }
    assert set(listed) == {"CT", "SR", "SEG", "OT"}
    (study,) = web.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert set(pydicom.Dataset.from_json(study).ModalitiesInStudy) == {"CT", "SR", "SEG", "OT"}
    (seg_entry,) = web.search_for_instances(study_uid, listed["SEG"].SeriesInstanceUID)
    seg_uid = pydicom.Dataset.from_json(seg_entry).SOPInstanceUID
    (sr,) = web.retrieve_series(study_uid, listed["SR"].SeriesInstanceUID)
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg_uid
    seg = hd.seg.Segmentation.from_dataset(web.retrieve_instance(study_uid, listed["SEG"].SeriesInstanceUID, seg_uid))
    assert int(seg.NumberOfFrames) == 2 and str(seg.StudyInstanceUID) == study_uid
    assert len(web.retrieve_study(study_uid)) == 4 + 3
    assert len(web.retrieve_study_metadata(study_uid)) == 4 + 3
