"""Triage's own AI results over its DICOMweb, read with a real DICOMweb client (dicomweb-client, its requests
routed into the app): QIDO-RS lists the TID 1500 SR, the SEG and the overlay capture beside the CT series, WADO-RS
retrieves them and they read back with highdicom; a shadow model's finding is never in them; a re-analysis replaces
them; a radiologist's scope applies to them, and metadata reads and refusals are audited."""

from __future__ import annotations

import io
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from serve_site import RADIOLOGIST_PASSWORD, Site, ich_finding, pneumothorax_finding, utcnow
from test_serve_sites import setup_sites

from triage.domain import SliceMasks
from triage.storage import segmentation_bytes

SR, SEG, SC = (
    pydicom.uid.Comprehensive3DSRStorage,
    pydicom.uid.SegmentationStorage,
    pydicom.uid.SecondaryCaptureImageStorage,
)


class _App(BaseAdapter):
    """Hands dicomweb-client's requests to the app under test (with the test client's sign-in cookie)."""

    def __init__(self, client: TestClient) -> None:
        super().__init__()
        self.client = client

    def send(self, request: requests.PreparedRequest, **_: Any) -> requests.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        answer = self.client.request(str(request.method), str(request.url), headers=headers, content=request.body)
        response = requests.Response()
        response.status_code = answer.status_code
        response.headers = CaseInsensitiveDict(answer.headers)
        response._content = answer.content
        response._content_consumed = True
        response.raw = io.BytesIO(answer.content)
        response.url, response.request, response.reason = str(request.url), request, answer.reason_phrase
        return response

    def close(self) -> None:
        pass


def dicomweb(site: Site) -> DICOMwebClient:
    session = requests.Session()
    session.mount("http://testserver", _App(site.client))
    return DICOMwebClient(url="http://testserver/dicomweb", session=session)


def analysed_ct(site: Site, study_uid: str, datasets: list[Any], probability: float = 0.93) -> None:
    """Record an analysis of the CT: an active ICH finding with its segmentation on two slices and an overlay, and a
    shadow model's finding (with an overlay of its own) that must never show."""
    series_uid = str(datasets[0].SeriesInstanceUID)
    masked = datasets[2:4]
    masks = np.zeros((2, int(masked[0].Rows), int(masked[0].Columns)), dtype=bool)
    masks[:, 8:20, 8:20] = True
    site.service.files.put_overlay(
        study_uid, "ich-seg.npz", segmentation_bytes(SliceMasks([str(d.SOPInstanceUID) for d in masked], masks))
    )
    key = str(masked[0].SOPInstanceUID)
    overlay = site.overlay(study_uid, "ich.npz", key, (32, 32))
    ich = ich_finding(key, series_uid, overlay) | {"segmentation_file": "ich-seg.npz", "probability": probability}
    shadow_overlay = site.overlay(study_uid, "shadow.npz", key, (32, 32))
    shadow = pneumothorax_finding(key, series_uid, shadow_overlay) | {"label": "shadow_only_finding", "shadow": True}
    site.finish(study_uid, [ich, shadow])


def by_class(web: DICOMwebClient, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The study's result series by SOP class, each as its first instance's QIDO-RS answer."""
    found = {}
    for series in web.search_for_series(study_uid):
        series_uid = pydicom.Dataset.from_json(series).SeriesInstanceUID
        for instance in web.search_for_instances(study_uid, series_uid):
            ds = pydicom.Dataset.from_json(instance)
            found.setdefault(str(ds.SOPClassUID), ds)
    return found


def test_qido_lists_and_wado_retrieves_the_ai_results_beside_the_images(site: Site) -> None:
    site.sign_in()
    study_uid, datasets = site.add_ct("ACC-RESULTS")
    analysed_ct(site, study_uid, datasets)
    web = dicomweb(site)

    series = [pydicom.Dataset.from_json(s) for s in web.search_for_series(study_uid)]
    assert sorted(s.Modality for s in series) == ["CT", "OT", "SEG", "SR"]
    (study,) = web.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    study = pydicom.Dataset.from_json(study)
    assert set(study.ModalitiesInStudy) == {"CT", "SR", "SEG", "OT"}
    assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (4, 6 + 3)

    found = by_class(web, study_uid)
    assert set(found) == {pydicom.uid.CTImageStorage, SR, SEG, SC}
    sr_ds = web.retrieve_instance(study_uid, found[SR].SeriesInstanceUID, found[SR].SOPInstanceUID)
    report = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    assert group.finding_type.meaning == "intracranial haemorrhage"
    assert group.referenced_segment.referenced_sop_instance_uid == found[SEG].SOPInstanceUID
    assert "shadow_only_finding" not in str(sr_ds) and "shadow only finding" not in str(sr_ds)
    (seg_ds,) = web.retrieve_series(study_uid, found[SEG].SeriesInstanceUID)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert int(seg.NumberOfFrames) == 2 and seg.get_segment_numbers() == [1]
    sources = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert sources == {str(d.SOPInstanceUID) for d in datasets[2:4]}
    # One capture: the shadow finding's overlay is not drawn.
    (capture,) = web.retrieve_series(study_uid, found[SC].SeriesInstanceUID)
    assert capture.BurnedInAnnotation == "YES" and "haemorrhage" in capture.DerivationDescription
    assert len(web.retrieve_study(study_uid)) == 6 + 3
    metadata = web.retrieve_series_metadata(study_uid, found[SEG].SeriesInstanceUID)
    assert len(metadata) == 1 and "7FE00010" not in metadata[0]
    # Results are not received images: the worklist still counts six, and nothing of them is in its index.
    assert site.service.worklist.get_study(study_uid, utcnow()).instance_count == 6
    assert len(list(site.service.files.instance_keys(study_uid))) == 6


def test_a_re_analysis_replaces_the_results_listed(site: Site) -> None:
    site.sign_in()
    study_uid, datasets = site.add_ct("ACC-REANALYSED")
    analysed_ct(site, study_uid, datasets, probability=0.93)
    web = dicomweb(site)
    first = by_class(web, study_uid)
    assert by_class(web, study_uid)[SR].SOPInstanceUID == first[SR].SOPInstanceUID  # asked again: the same ones

    analysed_ct(site, study_uid, datasets, probability=0.71)
    second = by_class(web, study_uid)
    assert sorted(pydicom.Dataset.from_json(s).Modality for s in web.search_for_series(study_uid)) == [
        "CT", "OT", "SEG", "SR"
    ]  # fmt: skip
    for sop_class in (SR, SEG, SC):
        assert second[sop_class].SOPInstanceUID != first[sop_class].SOPInstanceUID
    retrieved = web.retrieve_study(study_uid)
    assert {str(ds.SOPInstanceUID) for ds in retrieved}.isdisjoint({str(first[c].SOPInstanceUID) for c in (SR, SEG)})
    report = hd.sr.Comprehensive3DSR.from_dataset(next(ds for ds in retrieved if ds.SOPClassUID == SR))
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    (probability,) = [m for m in group.get_measurements() if m.name.value == "ai-probability"]
    assert probability.value == 0.71


def test_results_follow_the_readers_scope_and_metadata_and_refusals_are_audited(site: Site) -> None:
    ct_uid, xr_uid, _ = setup_sites(site)
    ct_series = site.service.worklist.series_of(ct_uid)[0]
    analysed_ct(site, ct_uid, [_stored(site, k) for k in ct_series.files])
    site.sign_in("reader", RADIOLOGIST_PASSWORD)
    web = dicomweb(site)

    found = by_class(web, ct_uid)  # a study of a site the reader may read: results included
    assert {SR, SEG, SC} <= set(found)
    assert len(web.retrieve_study_metadata(ct_uid)) == 6 + 3
    viewed = [e for e in site.accounts.audit_entries(action="view-identity") if e.study_uid == ct_uid]
    assert [(e.user, e.detail["via"], e.detail["instances"]) for e in viewed] == [("reader", "wado-rs-metadata", 9)]

    for path in (f"/dicomweb/studies?StudyInstanceUID={xr_uid}", f"/dicomweb/studies/{xr_uid}/series",
                 f"/dicomweb/studies/{xr_uid}/metadata"):  # fmt: skip
        assert site.client.get(path).status_code == 403, path
    denied = [e for e in site.accounts.audit_entries(action="access-denied") if e.study_uid == xr_uid]
    assert len(denied) == 3 and {e.detail["attempted"] for e in denied} == {"dicomweb"}


def _stored(site: Site, key: str) -> pydicom.Dataset:
    with site.service.files.open(key) as handle:
        return pydicom.dcmread(handle)


def test_results_are_kept_after_an_analysis_without_a_pacs_and_listed_from_the_start(site: Site) -> None:
    """The service keeps a study's results once its analysis is recorded: the study listing counts them before
    anyone opened the study, and a study with no active finding gets none."""
    site.sign_in()
    study_uid, datasets = site.add_ct("ACC-KEPT")
    analysed_ct(site, study_uid, datasets)
    assert site.service.keep_results(study_uid) is True
    (study,) = dicomweb(site).search_for_studies(search_filters={"AccessionNumber": "ACC-KEPT"})
    assert set(pydicom.Dataset.from_json(study).ModalitiesInStudy) == {"CT", "SR", "SEG", "OT"}
    other_uid, _ = site.add_ct("ACC-NONE")
    site.finish(other_uid, [])
    assert site.service.keep_results(other_uid) is False
