"""AI results as DICOM: the overlay capture, and sending the results (report, captures) to a real storage SCP."""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from tests.dicom_factory import make_ct_series, make_radiograph, write_dataset
from tests.dicom_peers import Receiver
from triage.dicom.results import (
    ResultsExportError,
    build_overlay_capture,
    export_study_results,
    read_results,
    results_identity,
    send_results,
    study_results,
)
from triage.domain import Finding
from triage.errors import InvalidStudyError, TriageError
from triage.storage import LocalStore

PATIENT_NAME = "Testperson^Unique^Xyzzy"
PATIENT_ID = "PID-UNIQUE-4711"

HEAD_CT_SLICE = Path(__file__).resolve().parents[2] / "data" / "ct-head-ge" / "01.dcm"


def _findings(series_uid: str = "1.2.3") -> list[Finding]:
    # As a study's findings column stores them; read back as records, as the worklist does.
    stored: list[dict[str, Any]] = [
        {
            "label": "intracranial haemorrhage",
            "probability": 0.9132,
            "flagged": True,
            "model": "ct-head-ich",
            "model_version": "1.0.0",
            "synthetic": True,
            "series_uid": series_uid,
            "details": {"subtype": "intraparenchymal", "volume_ml": 12.345, "slice_range": [10, 14]},
            "overlay_file": None,
        },
        {
            "label": "midline shift",
            "probability": 0.12,
            "flagged": False,
            "model": "ct-head-shift",
            "model_version": "2.1",
            "synthetic": False,
            "series_uid": series_uid,
            "details": {},
            "overlay_file": None,
        },
    ]
    return [Finding.model_validate(f) for f in stored]


def _ct_slice() -> Dataset:
    ds = make_ct_series(1, rows=64, columns=64)[0]
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def _round_trip(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _square_mask(rows: int, cols: int, stride: int) -> np.ndarray:
    mask = np.zeros((rows // stride, cols // stride), dtype=np.float32)
    mask[4:8, 6:10] = 1.0
    return mask


def test_capture_draws_the_mask_in_red_under_a_caption_band(tmp_path: Path):
    source = _ct_slice()
    stride = 4
    capture = _round_trip(
        build_overlay_capture(source, _square_mask(64, 64, stride), stride, "ct-head-ich 1.0.0: ICH p=0.91"), tmp_path
    )

    assert capture.SOPClassUID == SecondaryCaptureImageStorage
    assert capture.StudyInstanceUID == source.StudyInstanceUID
    assert capture.SeriesInstanceUID != source.SeriesInstanceUID
    assert capture.BurnedInAnnotation == "YES"
    assert capture.PhotometricInterpretation == "RGB"
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert str(capture.PatientName) == PATIENT_NAME
    pixels = capture.pixel_array.astype(int)
    band = int(capture.Rows) - int(source.Rows)
    assert band > 0 and int(capture.Columns) == int(source.Columns)

    image = pixels[band:]
    inside = image[4 * stride : 8 * stride, 6 * stride : 10 * stride]
    red_inside = (inside[..., 0] > inside[..., 1] + 50) & (inside[..., 0] > inside[..., 2] + 50)
    assert red_inside.all()
    outside = np.ones(image.shape[:2], dtype=bool)
    outside[4 * stride : 8 * stride, 6 * stride : 10 * stride] = False
    grey_outside = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
    assert grey_outside[outside].all()

    caption = pixels[:band]
    text_pixels = (caption.min(axis=-1) > 200).sum()
    assert text_pixels > 50, "the caption band holds white text"
    assert (caption.max(axis=-1) == 0).mean() > 0.5, "the band is mostly black background"


def test_capture_of_the_real_head_ct_uses_the_brain_window(tmp_path: Path):
    source = pydicom.dcmread(HEAD_CT_SLICE)
    mask = np.zeros((64, 64), dtype=np.float32)
    capture = build_overlay_capture(source, mask, 8, "no overlay")
    band = int(capture.Rows) - int(source.Rows)
    image = capture.pixel_array[band:, :, 0].astype(int)
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    # Air and bone are clipped to black and white by the 0-80 HU window; brain lies between.
    assert (image[hu < -100] == 0).all()
    assert (image[hu > 200] == 255).all()
    brain = (hu > 20) & (hu < 60)
    assert brain.sum() > 1000
    assert 40 < image[brain].mean() < 220


def test_capture_of_a_radiograph_uses_its_own_windowing(tmp_path: Path):
    source = make_radiograph()
    rows, cols = int(source.Rows), int(source.Columns)
    stride = 8
    mask = np.zeros((rows // stride, cols // stride), dtype=np.float32)
    mask[1:3, 1:3] = 0.9
    capture = _round_trip(build_overlay_capture(source, mask, stride, "xr model"), tmp_path)
    band = int(capture.Rows) - rows
    image = capture.pixel_array[band:].astype(int)
    assert (image[stride + 1, stride + 1, 0] > image[stride + 1, stride + 1, 1] + 50).all()
    assert image[..., 0].max() > image[..., 0].min()


def test_a_mask_that_does_not_fit_the_image_is_refused():
    with pytest.raises(InvalidStudyError, match=r"does not fit the image \(64, 64\)"):
        build_overlay_capture(_ct_slice(), np.zeros((4, 4), dtype=np.float32), 2, "x")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Receiver]:
    server = Receiver(tmp_path / "pacs")
    server.scp.start()
    yield server
    server.scp.stop()


def _stored_study(store_dir: Path, overlay_dir: Path) -> tuple[str, list[Finding], Dataset]:
    series = make_ct_series(3, rows=64, columns=64)
    for ds in series:
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        write_dataset(ds, store_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    key = series[1]
    study_uid = str(key.StudyInstanceUID)
    findings = _findings(str(key.SeriesInstanceUID))
    folder = overlay_dir / study_uid
    folder.mkdir(parents=True)
    np.savez_compressed(
        folder / "ct-head-ich-ich.npz",
        mask=_square_mask(64, 64, 4),
        stride=4,
        sop_instance_uid=str(key.SOPInstanceUID),
        kind="mask",
    )
    findings[0] = findings[0].model_copy(update={"overlay_file": "ct-head-ich-ich.npz"})
    return study_uid, findings, key


def test_export_sends_the_report_and_one_capture_without_logging_patient_identity(
    tmp_path: Path, pacs: Receiver, caplog: pytest.LogCaptureFixture
):
    study_uid, findings, key = _stored_study(tmp_path / "store", tmp_path / "overlays")
    destination = ("TRIAGE", "127.0.0.1", pacs.scp.port)

    with caplog.at_level(logging.DEBUG):
        stored = export_study_results(
            LocalStore(tmp_path / "store", tmp_path / "overlays"), study_uid, findings, "done", "analysed", destination
        )

    assert stored == 2
    received = [pydicom.dcmread(pacs.store.files.open(meta.key)) for meta in pacs.metas.values()]
    classes = sorted(str(ds.SOPClassUID) for ds in received)
    assert classes == sorted([Comprehensive3DSRStorage, SecondaryCaptureImageStorage])
    assert {ds.StudyInstanceUID for ds in received} == {study_uid}
    assert {str(ds.PatientName) for ds in received} == {PATIENT_NAME}
    capture = next(ds for ds in received if ds.SOPClassUID == SecondaryCaptureImageStorage)
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    assert study_uid in caplog.text
    for record in caplog.records:
        message = record.getMessage()
        assert PATIENT_NAME not in message and "Testperson" not in message, record.name
        assert PATIENT_ID not in message, record.name


def test_a_missing_overlay_costs_only_its_capture(tmp_path: Path, pacs: Receiver, caplog: pytest.LogCaptureFixture):
    study_uid, findings, _key = _stored_study(tmp_path / "store", tmp_path / "overlays")
    (tmp_path / "overlays" / study_uid / "ct-head-ich-ich.npz").unlink()
    destination = ("TRIAGE", "127.0.0.1", pacs.scp.port)

    store_dir, overlay_dir = tmp_path / "store", tmp_path / "overlays"
    stored = export_study_results(LocalStore(store_dir, overlay_dir), study_uid, findings, "done", "", destination)

    assert stored == 1
    received = [pydicom.dcmread(pacs.store.files.open(m.key)).SOPClassUID for m in pacs.metas.values()]
    assert received == [Comprehensive3DSRStorage]
    assert "no overlay capture for intracranial haemorrhage" in caplog.text


def test_export_of_a_study_that_is_not_stored_says_so(tmp_path: Path):
    with pytest.raises(InvalidStudyError, match="1.2.3.4 has no stored instance"):
        export_study_results(LocalStore(tmp_path), "1.2.3.4", [], "done", "", ("PACS", "127.0.0.1", 104))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_pacs_raises_a_triage_error_naming_it():
    sr = _ct_slice()
    port = _closed_port()
    with pytest.raises(ResultsExportError, match=f"PACS@127.0.0.1:{port}") as raised:
        send_results([sr], ("PACS", "127.0.0.1", port), timeout_s=5)
    assert isinstance(raised.value, TriageError)
    assert "association refused or timed out" in str(raised.value)


def test_results_are_kept_once_with_stable_uids_and_apart_from_the_received_images(tmp_path: Path):
    store = LocalStore(tmp_path / "store", tmp_path / "overlays")
    study_uid, findings, _key = _stored_study(tmp_path / "store", tmp_path / "overlays")
    received = list(store.instance_keys(study_uid))

    keys = study_results(store, study_uid, findings)
    uids = {str(ds.SOPInstanceUID) for ds in read_results(store, keys)}
    assert sorted(str(ds.SOPClassUID) for ds in read_results(store, keys)) == sorted(
        [Comprehensive3DSRStorage, SecondaryCaptureImageStorage]
    )
    assert study_results(store, study_uid, findings) == keys  # kept: not built again
    # Built again from scratch (the results area lost), the same analysis gets the same UIDs: they derive from it.
    shutil.rmtree(tmp_path / "results")
    rebuilt = study_results(store, study_uid, findings)
    assert {str(ds.SOPInstanceUID) for ds in read_results(store, rebuilt)} == uids
    assert {str(ds.SeriesInstanceUID) for ds in read_results(store, rebuilt)} == {
        str(ds.SeriesInstanceUID) for ds in read_results(store, keys)
    }
    # Results are not received images: the store's instance listing (what is indexed and analysed) is unchanged.
    assert list(store.instance_keys(study_uid)) == received
    assert not any(uid in key for key in store.instance_keys() for uid in uids)


def test_a_re_analysis_with_other_findings_replaces_the_kept_results(tmp_path: Path):
    store = LocalStore(tmp_path / "store", tmp_path / "overlays")
    study_uid, findings, key = _stored_study(tmp_path / "store", tmp_path / "overlays")
    before = study_results(store, study_uid, findings)
    old_uids = {str(ds.SOPInstanceUID) for ds in read_results(store, before)}
    old_id = results_identity(store, study_uid, findings)

    changed = [findings[0].model_copy(update={"probability": 0.42}), findings[1]]
    after = study_results(store, study_uid, changed)

    assert results_identity(store, study_uid, changed) != old_id
    assert old_uids.isdisjoint({str(ds.SOPInstanceUID) for ds in read_results(store, after)})
    assert store.result_keys(study_uid, old_id) == []  # the earlier analysis's results are gone
    assert [p.name for p in (tmp_path / "results" / study_uid).iterdir()] == [
        results_identity(store, study_uid, changed)
    ]
    # A new mask under the same overlay name is another result too.
    current = results_identity(store, study_uid, changed)
    np.savez_compressed(
        tmp_path / "overlays" / study_uid / "ct-head-ich-ich.npz",
        mask=np.ones((16, 16), dtype=np.float32), stride=4, sop_instance_uid=str(key.SOPInstanceUID), kind="mask",
    )  # fmt: skip
    assert results_identity(store, study_uid, changed) != current
