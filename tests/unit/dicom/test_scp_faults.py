"""Faults at the DICOM door, with real peers (pynetdicom as a raw peer, raw TCP sockets) against the storage SCP
and a real store: malformed data gets a permanent status, resource trouble 0xA700; idle sockets, association
limits per peer and in all, the called AE title; every storage SOP class stored; pixel bombs refused unread."""

from __future__ import annotations

import logging
import resource
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.dicom_factory import compress_dataset, make_ct_series, make_sr
from tests.dicom_modalities import make_enhanced_mr, make_mr_series, make_other_modalities, make_us_image
from tests.dicom_peers import Receiver
from tests.fuzz.corpus import implicit_declared_explicit, part10, pixel_bomb, with_fragments, with_vr
from tests.fuzz.cstore import RawStoreClient
from triage.dicom.series import read_ct_stack
from triage.dicom.status import CannotUnderstandError, DicomStatus

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while it reads damaged values


class Door(Receiver):
    """A running StorageSCP with a real store."""

    def __init__(self, root: Path, **settings: object) -> None:
        super().__init__(root, **settings)
        self.scp.start()


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    running = Door(tmp_path / "store")
    yield running
    running.scp.stop()


def send(door: Door, tmp_path: Path, cases: dict[str, bytes]) -> dict[str, int | None]:
    with RawStoreClient(door.port, tmp_path / "send") as client:
        return {name: client.send(name, data) for name, data in cases.items()}


def echo_ae(calling_ae: str = "SENDER") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    return ae


# ------------------------------------------------------------------------------------- item 3: bad data, resources
def test_data_that_cannot_be_parsed_gets_0xc000_never_0xa700(
    door: Door, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="triage")
    ct = make_ct_series(1)[0]
    rle = compress_dataset(make_ct_series(1)[0], RLELossless)
    j2k = compress_dataset(make_ct_series(1)[0], JPEG2000Lossless)
    cases = {
        "unknown VR ZZ on SOP Instance UID": with_vr(part10(ct), 0x00080018, b"ZZ"),
        "unknown VR ZZ on Study Description": with_vr(part10(make_ct_series(1)[0]), 0x00081030, b"ZZ"),
        "Implicit VR data declared Explicit": implicit_declared_explicit(make_ct_series(1)[0]),
        "RLE, garbage fragment": with_fragments(rle, [b"\x13\x37" * 50], RLELossless),
        "RLE, empty fragment": with_fragments(rle, [b""], RLELossless),
        "RLE, no fragment": with_fragments(rle, [], RLELossless),
        "JPEG 2000, garbage fragment": with_fragments(j2k, [b"garbage!" * 16], JPEG2000Lossless),
    }

    statuses = send(door, tmp_path, {**cases, "valid": part10(make_ct_series(1)[0])})

    assert {name: statuses[name] for name in cases} == dict.fromkeys(cases, DicomStatus.CANNOT_UNDERSTAND)
    assert statuses["valid"] == 0x0000
    assert len(door.metas) == 1
    refusals = [r for r in caplog.records if r.getMessage().startswith("C-STORE")]
    assert len(refusals) == len(cases)  # one line per refusal
    assert all("(bad data)" in r.getMessage() and r.exc_info is None for r in refusals)
    assert all("\n" not in r.getMessage() and "Traceback" not in r.getMessage() for r in refusals)


def test_a_truncated_data_set_gets_a900(door: Door, tmp_path: Path):
    data = part10(make_ct_series(1)[0])
    assert (
        send(door, tmp_path, {"cut": data[: len(data) - 3000]})["cut"] == DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    )


def test_a_file_too_large_for_the_file_system_gets_a700_and_storing_recovers(
    door: Door, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="triage")
    big = make_ct_series(1, rows=256, columns=256)[0]  # 128 KiB of pixels
    # A real limit of the kernel (RLIMIT_FSIZE): writing past it fails with EFBIG, as a full disk fails with
    # ENOSPC. SIGXFSZ is ignored so that the write returns the error instead of killing the process.
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(big.SOPClassUID)
    assoc = ae.associate("127.0.0.1", door.port, ae_title="TRIAGE")
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        refused = int(assoc.send_c_store(big).Status)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    try:
        accepted = int(assoc.send_c_store(big).Status)  # the sender's retry, once the trouble is gone
    finally:
        assoc.release()
        ae.shutdown()

    assert refused == DicomStatus.OUT_OF_RESOURCES
    assert accepted == 0x0000
    assert big.SOPInstanceUID in door.metas
    assert list(door.store.root.glob("*/*/.*.tmp")) == []  # nothing half-written left behind
    line = next(r for r in caplog.records if "resource trouble" in r.getMessage())
    assert "0xA700" in line.getMessage() and line.exc_info is None


# ------------------------------------------------------------------------------------- item 6: decode limits
def test_a_declared_65535_square_image_is_stored_undecoded_and_every_reader_refuses_it(
    door: Door, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from triage.dicom.radiograph import radiograph_from_dataset

    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    statuses = send(door, tmp_path, {"rle": pixel_bomb(), "j2k": pixel_bomb(syntax=JPEG2000Lossless)})
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib

    # Stored (the study reaches the worklist, where it is listed as not analysed), never decoded.
    assert statuses == {"rle": 0x0000, "j2k": 0x0000}
    assert len(door.metas) == 2
    assert grown_kib < 1024 * 1024  # decoding one frame would need 8 GiB
    assert "will never be decoded" in caplog.text and "65535 x 65535" in caplog.text
    for meta in door.metas.values():
        ds = pydicom.dcmread(door.store.files.open(meta.key))
        with pytest.raises(CannotUnderstandError, match=r"65535 x 65535 pixels exceeds the limit"):
            radiograph_from_dataset(ds, source="bomb")


def test_frame_and_size_limits_are_settings(tmp_path: Path):
    door = Door(tmp_path / "store", max_frames=4, max_decoded_bytes=10_000)
    try:
        statuses = send(
            door,
            tmp_path,
            {
                "6 frames": part10(make_enhanced_mr(6)),
                "32 KiB": part10(make_ct_series(1, rows=128, columns=128)[0]),
                "small": part10(make_ct_series(1, rows=32, columns=32)[0]),
            },
        )
    finally:
        door.scp.stop()
    assert statuses == {"6 frames": 0x0000, "32 KiB": 0x0000, "small": 0x0000}
    from triage.dicom.store import check_decode_limits

    refused = {}
    for meta in door.metas.values():
        try:
            header = pydicom.dcmread(door.store.files.open(meta.key), stop_before_pixels=True)
            check_decode_limits(header, door.store.policy)
        except CannotUnderstandError as exc:
            refused[meta.sop_instance_uid] = str(exc)
    assert len(refused) == 2
    assert any("6 frames exceed the limit of 4" in text for text in refused.values())


def test_reindex_lists_stored_files_beyond_the_limits(tmp_path: Path):
    Receiver(tmp_path / "store").store.write(make_ct_series(1, rows=128, columns=128)[0])
    strict = Receiver(tmp_path / "store", max_decoded_bytes=1000).store
    assert strict.reindex() == (1, 0, 0)  # listed; the readers refuse to decode it


# ------------------------------------------------------------------------------------- item 5: every storage class
def test_mr_us_nm_pt_mg_xa_and_multiframe_instances_are_stored(door: Door, tmp_path: Path):
    instances: dict[str, Dataset] = {
        "MR": make_mr_series(1)[0],
        "enhanced MR (multi-frame)": make_enhanced_mr(5),
        "US": make_us_image(),
        "US multi-frame": make_us_image(frames=4),
        **make_other_modalities(),
        "SR": make_sr(),
    }
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ds in instances.values():
        ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", door.port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        statuses = {name: int(assoc.send_c_store(ds).Status) for name, ds in instances.items()}
    finally:
        assoc.release()
        ae.shutdown()

    assert statuses == dict.fromkeys(instances, 0x0000)
    for ds in instances.values():
        stored = pydicom.dcmread(door.store.files.open(door.metas[ds.SOPInstanceUID].key))
        assert stored.SOPClassUID == ds.SOPClassUID
        assert stored.get("PixelData") == ds.get("PixelData")
    assert door.metas[instances["MR"].SOPInstanceUID].modality == "MR"


def test_an_image_class_without_pixel_data_is_still_refused(door: Door, tmp_path: Path):
    us = make_us_image()
    del us.PixelData
    mr = make_mr_series(1)[0]
    mr.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 30])  # compressed pixels in a native transfer syntax
    statuses = send(door, tmp_path, {"us": part10(us), "mr": part10(mr)})
    assert statuses["us"] == DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert statuses["mr"] == DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


# ------------------------------------------------------------------------------------- item 4: associations
def idle_sockets(port: int, count: int) -> list[socket.socket]:
    """TCP connections that never send an A-ASSOCIATE-RQ."""
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]


def test_idle_sockets_do_not_lock_senders_out_and_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    door = Door(tmp_path / "store", association_request_timeout_s=1.0, max_associations=10)
    sockets = idle_sockets(door.port, 12)
    try:
        # 12 idle connections, more than the association limit: 10 real senders are all accepted meanwhile.
        results: list[int] = []

        def sender() -> None:
            ae = echo_ae()
            assoc = ae.associate("127.0.0.1", door.port, ae_title="TRIAGE")
            results.append(int(assoc.send_c_echo().Status) if assoc.is_established else -1)
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

        threads = [threading.Thread(target=sender) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        # The SCP closes each idle connection once the association request timeout has passed.
        closed = [s.recv(16) == b"" for s in sockets]
    finally:
        for s in sockets:
            s.close()
        door.scp.stop()
    assert results == [0x0000] * 10
    assert closed == [True] * 12


def test_one_peer_cannot_take_every_slot(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="triage")
    door = Door(tmp_path / "store", max_associations_per_peer=2)
    ae = echo_ae("GREEDY")
    held = [ae.associate("127.0.0.1", door.port, ae_title="TRIAGE") for _ in range(2)]
    try:
        third = ae.associate("127.0.0.1", door.port, ae_title="TRIAGE")
        assert all(a.is_established for a in held)
        assert third.is_rejected
        rejection = third.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
        held.pop().release()
        again = ae.associate("127.0.0.1", door.port, ae_title="TRIAGE")
        assert again.is_established
        again.release()
    finally:
        for assoc in held:
            assoc.release()
        ae.shutdown()
        door.scp.stop()
    line = next(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())
    assert "GREEDY@127.0.0.1" in line and "per peer" in line and "MAX_ASSOCIATIONS_PER_PEER" in line


def test_the_association_limit_rejects_transient_with_the_reason_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="triage")
    door = Door(tmp_path / "store", max_associations=2)
    ae = echo_ae()
    held = [ae.associate("127.0.0.1", door.port, ae_title="TRIAGE") for _ in range(2)]
    try:
        extra = ae.associate("127.0.0.1", door.port, ae_title="TRIAGE")
        assert extra.is_rejected
        assert extra.acceptor.primitive.result == 0x02  # transient: the sender tries again later
    finally:
        for assoc in held:
            assoc.release()
        ae.shutdown()
        door.scp.stop()
    assert "local limit exceeded: 2 associations open, at most 2" in caplog.text


def test_a_wrong_called_ae_title_is_rejected_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="triage")
    door = Door(tmp_path / "store")
    lenient = Door(tmp_path / "lenient", require_called_aet=False)
    ae = echo_ae("MODALITY")
    try:
        wrong = ae.associate("127.0.0.1", door.port, ae_title="PACS")
        right = ae.associate("127.0.0.1", door.port, ae_title="TRIAGE")
        anything = ae.associate("127.0.0.1", lenient.port, ae_title="PACS")
        assert wrong.is_rejected
        assert (wrong.acceptor.primitive.result, wrong.acceptor.primitive.diagnostic) == (0x01, 0x07)
        assert right.is_established and anything.is_established
        right.release()
        anything.release()
    finally:
        ae.shutdown()
        door.scp.stop()
        lenient.scp.stop()
    assert "rejected: called AE title 'PACS' is not ours ('TRIAGE')" in caplog.text


def test_the_ct_reader_refuses_a_pixel_bomb_read_from_a_folder_before_decoding(tmp_path: Path):
    """`triage infer` reads files that never passed the store: the same limits hold before decoding."""
    path = tmp_path / "bomb.dcm"
    path.write_bytes(pixel_bomb())
    with pytest.raises(CannotUnderstandError, match=r"65535 x 65535 pixels exceeds the limit"):
        read_ct_stack([path])
