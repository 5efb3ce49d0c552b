"""The ingest client: finding DICOM files (folders, DICOMDIR) and sending them to a real storage SCP."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from pynetdicom import AE, evt

from tests.dicom_factory import (
    compress_dataset,
    make_ct_series,
    make_radiograph,
    make_sr,
    to_bytes,
    write_dataset,
    write_datasets,
)
from tests.dicom_peers import Receiver
from triage.dicom.sender import collect_files, scan_paths, send_files
from triage.dicom.sopclasses import ACCEPTED_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES
from triage.dicom.status import DicomStatus


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    server = Receiver(tmp_path / "store")
    server.scp.start()
    yield server
    server.scp.stop()


def test_folders_are_walked_and_non_dicom_files_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    ct = write_datasets(make_ct_series(3), tmp_path / "in" / "ct")
    dx = write_dataset(make_radiograph(), tmp_path / "in" / "xr" / "deep" / "dx.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    (tmp_path / "in" / "ct" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")

    with caplog.at_level(logging.WARNING, logger="triage"):
        files = collect_files([tmp_path / "in"])

    assert files == [*ct, dx]
    assert "skipped 2 files" in caplog.text


def test_files_named_twice_are_listed_once(tmp_path: Path):
    paths = write_datasets(make_ct_series(2), tmp_path)
    assert scan_paths([paths[0], tmp_path, paths[1]]).files == [paths[0], paths[1]]


def test_a_data_set_without_preamble_is_found(tmp_path: Path):
    data = to_bytes(make_sr())
    bare = tmp_path / "bare"
    bare.write_bytes(data[132 + 12 + int.from_bytes(data[140:144], "little") :])
    assert scan_paths([bare]).files == [bare]


def test_dicomdir_is_followed_to_its_files(tmp_path: Path):
    media = tmp_path / "cd"
    file_set = FileSet()
    for ds in [*make_ct_series(3), make_radiograph()]:
        file_set.add(ds)
    file_set.write(media)
    # The same files are also found by walking the folder; each is listed once and DICOMDIR itself never.
    by_dicomdir = scan_paths([media / "DICOMDIR"])
    by_folder = scan_paths([media])

    assert len(by_dicomdir.files) == 4
    assert all(p.name.startswith("IM") for p in by_dicomdir.files)
    assert sorted(by_folder.files) == sorted(by_dicomdir.files)
    assert by_dicomdir.skipped == []


def test_dicomdir_listing_a_missing_file_reports_it(tmp_path: Path):
    media = tmp_path / "cd"
    file_set = FileSet()
    for ds in make_ct_series(2):
        file_set.add(ds)
    file_set.write(media)
    gone = sorted(media.rglob("IM*"))[0]
    gone.unlink()

    scan = scan_paths([media / "DICOMDIR"])

    assert len(scan.files) == 1
    assert [p.name for p in scan.skipped] == [gone.name]


def test_a_missing_path_is_an_error_quoting_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_paths([tmp_path / "nowhere"])


def test_files_are_sent_in_their_own_transfer_syntaxes(receiver: Receiver, tmp_path: Path):
    ct = make_ct_series(3)
    datasets = [
        *ct,
        compress_dataset(make_ct_series(1)[0], JPEG2000Lossless),
        compress_dataset(make_ct_series(1)[0], JPEGLSLossless),
        compress_dataset(make_radiograph(rows=64, columns=64), RLELossless),
        make_radiograph("CR"),
        make_sr(),
    ]
    files = write_datasets(datasets, tmp_path / "out")
    progress: list[tuple[int, int]] = []

    report = send_files(files, "127.0.0.1", receiver.scp.port, progress=lambda d, t: progress.append((d, t)))

    assert report.sent == len(files)
    assert report.failed == 0
    assert report.associations == 1
    assert report.statuses == {0x0000: len(files)}
    assert progress[-1] == (len(files), len(files))
    assert [d for d, _ in progress] == list(range(1, len(files) + 1))
    for ds in datasets:
        written = pydicom.dcmread(receiver.store.files.open(receiver.metas[ds.SOPInstanceUID].key))
        assert written.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        if "PixelData" in ds:
            assert written.PixelData == ds.PixelData
    assert receiver.metas[ct[0].SOPInstanceUID].calling_ae == "TRIAGE-INGEST"


def test_refused_files_are_reported_with_status_and_reason(receiver: Receiver, tmp_path: Path):
    good = make_ct_series(1)[0]
    no_pixels = make_radiograph()
    del no_pixels.PixelData
    files = write_datasets([good, no_pixels], tmp_path / "out")
    (tmp_path / "out" / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")
    files.append(tmp_path / "out" / "broken.dcm")

    report = send_files(files, "127.0.0.1", receiver.scp.port)

    assert [r.ok for r in report.results] == [True, False, False]
    refused = report.results[1]
    assert refused.status == DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "Pixel Data" in refused.error
    assert report.results[2].status is None
    assert "cannot read" in report.results[2].error
    assert set(receiver.metas) == {good.SOPInstanceUID}


def test_a_sender_outside_the_allow_list_is_told_it_was_rejected(tmp_path: Path):
    receiver = Receiver(tmp_path / "store", allowed_calling_aets=["ER_CT"])
    receiver.scp.start()
    try:
        files = write_datasets(make_ct_series(2), tmp_path / "out")
        refused = send_files(files, "127.0.0.1", receiver.scp.port, calling_ae="INTRUDER")
        allowed = send_files(files, "127.0.0.1", receiver.scp.port, calling_ae="ER_CT")
    finally:
        receiver.scp.stop()
    assert refused.failed == 2
    assert all("rejected" in r.error for r in refused.results)
    assert refused.associations == 1  # a rejection is not retried
    assert allowed.sent == 2


def test_nobody_listening_fails_every_file_with_the_reason(tmp_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    files = write_datasets(make_ct_series(2), tmp_path / "out")

    report = send_files(files, "127.0.0.1", closed_port, timeout_s=5)

    assert report.failed == 2
    assert all("cannot associate" in r.error for r in report.results)


def test_a_peer_that_drops_associations_gets_every_file_through_new_ones(tmp_path: Path):
    """A real SCP that aborts each association at its second C-STORE, leaving that request unanswered."""
    received: list[str] = []

    def handle_store(event: evt.Event) -> int:
        handled = event.assoc.__dict__.setdefault("_stores", [])
        handled.append(1)
        if len(handled) > 1:
            event.assoc.abort()
            return 0xA700
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="FLAKY")
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        series = make_ct_series(4)
        report = send_files(write_datasets(series, tmp_path / "out"), "127.0.0.1", server.server_address[1])
    finally:
        ae.shutdown()

    assert report.sent == 4
    assert report.associations == 4
    assert received == [ds.SOPInstanceUID for ds in series]
