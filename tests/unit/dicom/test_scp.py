"""The storage SCP with a real store, driven by a pynetdicom SCU in-process; and the DICOM status mapping."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
    XRayRadiationDoseSRStorage,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.dicom_factory import (
    SYNTHETIC_BIRTH_DATE,
    SYNTHETIC_PATIENT_ID,
    SYNTHETIC_PATIENT_NAME,
    compress_dataset,
    make_ct_series,
    make_radiograph,
    write_dataset,
)
from triage.config import DicomSettings
from triage.dicom.scp import StorageSCP
from triage.dicom.sopclasses import ACCEPTED_SOP_CLASSES
from triage.dicom.status import DicomStatus, describe_status, status_category, status_for_exception
from triage.dicom.store import DicomStore
from triage.domain import InstanceMeta
from triage.errors import InvalidStudyError, ModelLoadError, TriageError, UnsupportedInputError


class Received:
    """A store whose index remembers what it was given (the worklist's contract: False for a duplicate)."""

    def __init__(self, root: Path) -> None:
        self.metas: dict[str, InstanceMeta] = {}
        self.store = DicomStore(root, "salt", self._index)

    def _index(self, meta: InstanceMeta) -> bool:
        new = meta.sop_instance_uid not in self.metas
        self.metas[meta.sop_instance_uid] = meta
        return new


@pytest.fixture
def received(tmp_path: Path) -> Received:
    return Received(tmp_path / "store")


def start_scp(accept: Callable[[Dataset, str], object], **settings: object) -> StorageSCP:
    scp = StorageSCP(DicomSettings(port=0, bind_address="127.0.0.1", **settings), accept)
    scp.start()
    return scp


@pytest.fixture
def scp(received: Received) -> Iterator[StorageSCP]:
    server = start_scp(received.store.write)
    yield server
    server.stop()


# What the tests send (a requestor proposes at most 128 presentation contexts, PS3.8 9.3.2.2).
REQUESTED_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ComputedRadiographyImageStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    XRayAngiographicImageStorage,
)


def scu(calling_ae: str = "TEST_SCU") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    for sop_class in REQUESTED_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
    ae.add_requested_context(CTImageStorage, RLELossless)
    return ae


def store_one(port: int, ds: Dataset | Path, calling_ae: str = "TEST_SCU") -> Dataset:
    ae = scu(calling_ae)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()
        ae.shutdown()


def test_port_zero_binds_a_free_port_and_stop_is_idempotent(received: Received):
    scp = StorageSCP(DicomSettings(port=0, bind_address="127.0.0.1"), received.store.write)
    with pytest.raises(RuntimeError, match="not running"):
        _ = scp.port
    scp.start()
    try:
        assert scp.port > 0
        assert scp.running
        with pytest.raises(RuntimeError, match="already running"):
            scp.start()
    finally:
        scp.stop()
        scp.stop()
    assert not scp.running


def test_c_echo_succeeds(scp: StorageSCP):
    ae = scu()
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE")
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
        ae.shutdown()


def test_success_is_answered_after_the_instance_is_on_disk_and_indexed(scp: StorageSCP, received: Received):
    ds = make_ct_series(1)[0]

    response = store_one(scp.port, ds, calling_ae="ER_CT")

    assert response.Status == 0x0000
    meta = received.metas[ds.SOPInstanceUID]
    assert meta.calling_ae == "ER_CT"
    written = pydicom.dcmread(received.store.files.open(meta.key))
    assert written.PixelData == ds.PixelData
    assert written.file_meta.SourceApplicationEntityTitle == "ER_CT"


def test_compressed_instance_is_stored_in_its_transfer_syntax(scp: StorageSCP, received: Received):
    ds = compress_dataset(make_ct_series(1)[0], JPEG2000Lossless)

    assert store_one(scp.port, ds).Status == 0x0000

    written = pydicom.dcmread(received.store.files.open(received.metas[ds.SOPInstanceUID].key))
    assert written.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert written.PixelData == ds.PixelData


def test_image_without_pixel_data_gets_a900_with_a_reason(scp: StorageSCP, received: Received):
    ds = make_radiograph()
    del ds.PixelData

    response = store_one(scp.port, ds)

    assert response.Status == DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "Pixel Data" in response.ErrorComment
    assert received.metas == {}


def test_truncated_bytes_are_refused_and_the_scp_goes_on(
    scp: StorageSCP, received: Received, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = write_dataset(make_ct_series(1)[0], tmp_path / "whole.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-3000])
    # Send the file's bytes as they are, as a sender with a damaged file would (no decoding on our side).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    refused = store_one(scp.port, truncated)
    accepted = store_one(scp.port, path)

    assert refused.Status == DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "truncated" in refused.ErrorComment
    assert accepted.Status == 0x0000
    assert len(received.metas) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while it tries to read the garbage
def test_bytes_that_are_no_data_set_get_c000(
    scp: StorageSCP, received: Received, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = write_dataset(make_ct_series(1)[0], tmp_path / "whole.dcm")
    data = path.read_bytes()
    header_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[:header_end] + b"\xff" * 64)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    response = store_one(scp.port, garbage)

    assert response.Status == DicomStatus.CANNOT_UNDERSTAND
    assert received.metas == {}


def test_request_naming_another_instance_than_the_data_set_gets_a900(
    scp: StorageSCP, received: Received, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    ds = make_ct_series(1)[0]
    data = write_dataset(ds, tmp_path / "whole.dcm").read_bytes()
    # Change the File Meta's copy of the UID (the first one in the file; same length), which pynetdicom sends
    # as the C-STORE's Affected SOP Instance UID.
    uid = ds.SOPInstanceUID.encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(data.replace(uid, other, 1))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    response = store_one(scp.port, path)

    assert response.Status == DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert received.metas == {}


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidStudyError("bad geometry"), DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS),
        (UnsupportedInputError("not ours"), DicomStatus.SOP_CLASS_NOT_SUPPORTED),
        (ModelLoadError("weights missing"), DicomStatus.CANNOT_UNDERSTAND),
        (OSError(28, "No space left on device"), DicomStatus.OUT_OF_RESOURCES),
        (RuntimeError("bug"), DicomStatus.OUT_OF_RESOURCES),
    ],
)
def test_a_refusing_accept_gets_the_mapped_status_and_the_scp_keeps_serving(
    received: Received, error: Exception, status: DicomStatus
):
    calls = {"n": 0}

    def accept_once_then_refuse(ds: Dataset, calling_ae: str) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return received.store.write(ds, calling_ae)

    scp = start_scp(accept_once_then_refuse)
    try:
        first = store_one(scp.port, make_ct_series(1)[0])
        second = store_one(scp.port, make_ct_series(1)[0])
    finally:
        scp.stop()
    assert first.Status == status
    assert second.Status == 0x0000


def test_calling_ae_outside_the_allow_list_is_rejected(received: Received):
    scp = start_scp(received.store.write, allowed_calling_aets=["ER_CT"])
    try:
        ae = scu("INTRUDER")
        refused = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGE")
        assert refused.is_rejected
        ae.shutdown()
        assert store_one(scp.port, make_ct_series(1)[0], calling_ae="ER_CT").Status == 0x0000
    finally:
        scp.stop()


def test_a_sop_class_the_site_does_not_accept_has_no_presentation_context(received: Received):
    server = start_scp(received.store.write, accepted_sop_classes=["CTImageStorage"])
    ae = scu()
    assoc = ae.associate("127.0.0.1", server.port, ae_title="TRIAGE")
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assert MRImageStorage not in accepted
        assert CTImageStorage in accepted
    finally:
        assoc.release()
        ae.shutdown()
        server.stop()


def test_every_standard_storage_class_is_offered_by_default(scp: StorageSCP):
    supported = {str(c.abstract_syntax) for c in scp._ae.supported_contexts}
    assert supported >= ACCEPTED_SOP_CLASSES
    assert len(ACCEPTED_SOP_CLASSES) > 150


def test_logs_carry_no_patient_identifiers(scp: StorageSCP, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="triage")
    good = make_ct_series(1)[0]
    bad = make_radiograph()
    del bad.PixelData

    store_one(scp.port, good)
    store_one(scp.port, bad)

    assert "association accepted" in caplog.text
    assert bad.SOPInstanceUID in caplog.text
    for identifier in (SYNTHETIC_PATIENT_NAME, SYNTHETIC_PATIENT_ID, "SYNTHETIC", SYNTHETIC_BIRTH_DATE):
        assert identifier not in caplog.text


def test_status_mapping_is_in_one_place():
    assert status_for_exception(UnsupportedInputError("x")) == 0x0122
    assert status_for_exception(InvalidStudyError("x")) == 0xA900
    assert status_for_exception(TriageError("x")) == 0xC000
    assert status_for_exception(MemoryError()) == 0xA700
    assert status_category(0x0000) == "success"
    assert status_category(0xB000) == "warning"
    assert status_category(0xA700) == "failure"
    assert status_category(0xC123) == "failure"
    assert status_category(0xFF00) == "pending"
    assert describe_status(0xA900) == "0xA900 (failure: data set does not match SOP class)"
    assert describe_status(0xA7FF) == "0xA7FF (failure: out of resources)"
    assert describe_status(0x0000) == "0x0000 (success)"
