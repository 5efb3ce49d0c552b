"""The durable store: validation, atomic Part-10 writes, duplicates, truncated bytes, safe paths, no identity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from tests.dicom_factory import (
    SYNTHETIC_ACCESSION,
    SYNTHETIC_BIRTH_DATE,
    SYNTHETIC_PATIENT_ID,
    SYNTHETIC_PATIENT_NAME,
    compress_dataset,
    make_ct_series,
    make_enhanced_ct,
    make_radiograph,
    make_secondary_capture,
    make_sr,
    to_bytes,
)
from triage.config import DicomSettings
from triage.dicom.phi import hash_identifier
from triage.dicom.store import (
    DicomStore,
    StoredInstance,
    StorePolicy,
    extract_meta,
    read_dataset_bytes,
    validate_instance,
)
from triage.domain import InstanceMeta
from triage.errors import InvalidStudyError, UnsupportedInputError

SALT = "test-salt"


class MemoryIndex:
    """An index with the same contract as the worklist's record_instance: False for a known SOP Instance UID."""

    def __init__(self) -> None:
        self.metas: dict[str, InstanceMeta] = {}

    def __call__(self, meta: InstanceMeta) -> bool:
        if meta.sop_instance_uid in self.metas:
            return False
        self.metas[meta.sop_instance_uid] = meta
        return True


@pytest.fixture
def index() -> MemoryIndex:
    return MemoryIndex()


@pytest.fixture
def store(tmp_path: Path, index: MemoryIndex) -> DicomStore:
    return DicomStore(tmp_path / "store", SALT, index)


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_ct_series_is_stored_as_part10_files_under_study_series_instance(store: DicomStore, index: MemoryIndex):
    series = make_ct_series(4)
    results = [store.write(ds, calling_ae="CT_SCANNER") for ds in series]

    for ds, result in zip(series, results, strict=True):
        expected = store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert result.meta.key == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert store.root / result.meta.key == expected
        assert not result.duplicate
        written = pydicom.dcmread(expected)
        assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert written.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert written.file_meta.SourceApplicationEntityTitle == "CT_SCANNER"
        assert written.PixelData == ds.PixelData
    assert set(index.metas) == {ds.SOPInstanceUID for ds in series}
    assert sorted(store.root / key for key in store.instance_keys()) == all_files(store.root)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_compressed_instance_keeps_its_transfer_syntax_and_pixel_bytes(store: DicomStore, syntax: str):
    original = make_ct_series(1)[0]
    compressed = compress_dataset(original, syntax)

    result = store.write(compressed)

    written = pydicom.dcmread(store.files.open(result.meta.key))
    assert written.file_meta.TransferSyntaxUID == syntax
    assert result.meta.transfer_syntax_uid == syntax
    assert written.PixelData == compressed.PixelData
    assert np.array_equal(written.pixel_array, original.pixel_array)


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
        ("SC_rgb_small_odd_big_endian.dcm", ExplicitVRBigEndian),
        ("JPEG2000.dcm", UID("1.2.840.10008.1.2.4.91")),
    ],
)
def test_real_files_round_trip_through_bytes_unchanged(store: DicomStore, name: str, syntax: str):
    path = get_testdata_file(name)
    original = pydicom.dcmread(path)

    result = store.write(read_dataset_bytes(Path(path).read_bytes()))

    written = pydicom.dcmread(store.files.open(result.meta.key))
    assert written.file_meta.TransferSyntaxUID == syntax
    assert written.PixelData == original.PixelData


def test_all_accepted_kinds_are_stored(store: DicomStore):
    datasets = [
        make_enhanced_ct(4),
        make_radiograph("DX", photometric="MONOCHROME1"),
        make_radiograph("DX", for_processing=True),
        make_radiograph("CR"),
        make_secondary_capture(rgb=True, n_frames=2),
        make_secondary_capture(),
        make_sr(),
    ]
    for ds in datasets:
        assert store.files.exists(store.write(ds).meta.key)


def test_second_copy_is_a_duplicate_and_one_file_remains(store: DicomStore, index: MemoryIndex):
    ds = make_ct_series(1)[0]

    first = store.write(ds)
    second = store.write(read_dataset_bytes(to_bytes(ds)))

    assert not first.duplicate
    assert second.duplicate
    assert second.meta.key == first.meta.key
    assert all_files(store.root) == [store.root / first.meta.key]
    assert len(index.metas) == 1


def test_write_leaves_no_temporary_files(store: DicomStore):
    for ds in make_ct_series(3):
        store.write(ds)
    names = [p.name for p in all_files(store.root)]
    assert len(names) == 3
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]


def test_failed_rename_leaves_nothing_and_indexes_nothing(
    store: DicomStore, index: MemoryIndex, monkeypatch: pytest.MonkeyPatch
):
    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.write(make_ct_series(1)[0])
    assert all_files(store.root) == []
    assert index.metas == {}


@pytest.mark.filterwarnings("ignore:Invalid value:UserWarning")
def test_unencodable_dataset_leaves_no_partial_file(store: DicomStore, index: MemoryIndex):
    ds = make_ct_series(1)[0]
    ds.add_new(0x00280010, "US", 70000)  # Rows does not fit in an unsigned short: the write fails midway

    with pytest.raises(Exception):  # noqa: B017 - whatever pydicom raises, nothing may be left behind
        store.write(ds)
    assert all_files(store.root) == []
    assert index.metas == {}


def test_index_failure_is_raised_so_the_sender_gets_a_failure(store: DicomStore):
    def broken_index(meta: InstanceMeta) -> bool:
        raise RuntimeError("database is locked")

    store.index = broken_index
    with pytest.raises(RuntimeError, match="database is locked"):
        store.write(make_ct_series(1)[0])
    # The file is durable; re-indexing the store on start-up picks it up.
    assert len(list(store.instance_keys())) == 1


def test_meta_carries_routing_hints_and_a_salted_patient_hash_only():
    ds = make_ct_series(1, requested_priority="STAT")[0]

    meta = extract_meta(ds, "/x.dcm", "ER_CT", SALT)

    assert meta.modality == "CT"
    assert meta.body_part == "HEAD"
    assert meta.requested_priority == "STAT"
    assert meta.calling_ae == "ER_CT"
    assert meta.accession_number == SYNTHETIC_ACCESSION
    assert meta.institution == "Synthetic General Hospital"
    assert meta.patient_hash == hash_identifier(SYNTHETIC_PATIENT_ID, SALT)
    values = " ".join(str(v) for v in vars(meta).values())
    for identifier in (SYNTHETIC_PATIENT_ID, SYNTHETIC_PATIENT_NAME, "SYNTHETIC", SYNTHETIC_BIRTH_DATE):
        assert identifier not in values


def test_requested_priority_is_also_read_from_request_attributes():
    ds = make_radiograph()
    request = Dataset()
    request.RequestedProcedurePriority = "HIGH"
    ds.RequestAttributesSequence = [request]
    assert extract_meta(ds, "/x.dcm", "", SALT).requested_priority == "HIGH"
    assert extract_meta(make_radiograph(), "/x.dcm", "", SALT).requested_priority == ""


def test_hash_identifier_is_salted_stable_and_short():
    assert hash_identifier("12345", "a") == hash_identifier(" 12345 ", "a")
    assert hash_identifier("12345", "a") != hash_identifier("12345", "b")
    assert hash_identifier("12345", "a") != hash_identifier("12346", "a")
    assert len(hash_identifier("12345", "a")) == 16
    assert "12345" not in hash_identifier("12345", "a")
    assert hash_identifier("", "a") == ""
    assert hash_identifier("   ", "a") == ""


def test_missing_pixel_data_is_refused(store: DicomStore):
    ds = make_ct_series(1)[0]
    del ds.PixelData
    with pytest.raises(InvalidStudyError, match=r"no Pixel Data"):
        store.write(ds)
    assert all_files(store.root) == []


def test_report_without_pixel_data_is_accepted(store: DicomStore):
    assert not store.write(make_sr()).duplicate


def test_a_sop_class_the_site_does_not_accept_is_refused_quoting_it(tmp_path: Path, index: MemoryIndex):
    policy = StorePolicy.from_settings(
        DicomSettings(accepted_sop_classes=["CTImageStorage", "1.2.840.10008.5.1.4.1.1.1"])
    )
    store = DicomStore(tmp_path / "store", SALT, index, policy=policy)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    with pytest.raises(UnsupportedInputError, match=r"MR Image Storage.*1\.2\.840\.10008\.5\.1\.4\.1\.1\.4"):
        store.write(ds)
    assert store.write(make_ct_series(1)[0])
    assert all_files(store.root) != []


def test_a_class_that_is_no_storage_class_is_refused(store: DicomStore):
    ds = make_ct_series(1)[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.1.1")  # Verification
    with pytest.raises(UnsupportedInputError, match=r"not a storage class"):
        store.write(ds)


def test_site_setting_naming_no_storage_class_is_an_error():
    with pytest.raises(ValueError, match=r"'MRStorage'"):
        StorePolicy.from_settings(DicomSettings(accepted_sop_classes=["MRStorage"]))


def test_unsupported_transfer_syntax_is_refused(store: DicomStore):
    ds = make_ct_series(1)[0]
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.201")  # HTJ2K Lossless
    with pytest.raises(UnsupportedInputError, match=r"1\.2\.840\.10008\.1\.2\.4\.201"):
        store.write(ds)


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom warns when the test sets a bad UID
@pytest.mark.parametrize(
    "bad_uid",
    ["../../etc", "1.2.3/../../x", "..", "1.2..3", "1.2.3\\x", "/tmp/x", "1.2 .3", "1." + "2" * 70, "", "1.2.a"],
)
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_uids_that_are_not_uids_cannot_escape_the_store(tmp_path: Path, index: MemoryIndex, keyword: str, bad_uid):
    store = DicomStore(tmp_path / "store", SALT, index)
    ds = make_ct_series(1)[0]
    setattr(ds, keyword, bad_uid)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = bad_uid

    with pytest.raises(InvalidStudyError, match="is not a valid UID|is missing"):
        store.write(ds)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert index.metas == {}


def test_file_meta_naming_another_instance_is_refused(store: DicomStore):
    ds = make_ct_series(1)[0]
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    with pytest.raises(InvalidStudyError, match=r"1\.2\.3\.4"):
        validate_instance(ds)


@pytest.mark.parametrize("keep_fraction", [0.99, 0.6, 0.3])
def test_truncated_native_file_is_refused(store: DicomStore, keep_fraction: float):
    data = to_bytes(make_ct_series(1)[0])
    truncated = data[: int(len(data) * keep_fraction)]

    with pytest.raises(InvalidStudyError, match="truncated|Pixel Data"):
        store.write(read_dataset_bytes(truncated))
    assert all_files(store.root) == []


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
@pytest.mark.parametrize("keep_fraction", [0.95, 0.7])
def test_truncated_compressed_file_is_refused(store: DicomStore, keep_fraction: float):
    data = to_bytes(compress_dataset(make_ct_series(1)[0], JPEG2000Lossless))
    with pytest.raises(InvalidStudyError):
        store.write(read_dataset_bytes(data[: int(len(data) * keep_fraction)]))


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, b"hello, this is not DICOM at all" * 8, b"\x00" * 128 + b"DICM"])
def test_bytes_that_are_not_dicom_are_refused(store: DicomStore, data: bytes):
    with pytest.raises(InvalidStudyError):
        store.write(read_dataset_bytes(data))


def test_bare_dataset_without_file_meta_is_read_with_its_encoding(store: DicomStore):
    ds = make_ct_series(1)[0]
    raw = to_bytes(ds)
    # Strip preamble and File Meta: the data set starts after the (0002) group.
    offset = 132 + 12 + int.from_bytes(raw[140:144], "little")

    parsed = read_dataset_bytes(raw[offset:])

    assert parsed.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert store.write(parsed).meta.sop_instance_uid == ds.SOPInstanceUID


def test_stale_temporary_files_are_skipped_and_cleaned(store: DicomStore):
    stored = store.write(make_ct_series(1)[0])
    folder = (store.root / stored.meta.key).parent
    stale = folder / ".1.2.3.abcdef.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))

    assert list(store.instance_keys()) == [stored.meta.key]
    assert store.remove_stale_temp_files(older_than_s=60) == 1
    assert not stale.exists()


def test_stored_instance_is_a_plain_record(store: DicomStore):
    result = store.write(make_ct_series(1)[0])
    assert isinstance(result, StoredInstance)
    assert isinstance(result.meta, InstanceMeta)


def test_reindex_offers_every_stored_file_again(tmp_path: Path, store: DicomStore, index: MemoryIndex):
    written = [store.write(ds, calling_ae="ER_CT").meta for ds in make_ct_series(3)]
    fresh = MemoryIndex()  # e.g. the database was restored from an older backup
    restarted = DicomStore(store.root, SALT, fresh)
    (store.root / written[0].key).write_bytes(b"damaged")

    assert restarted.reindex() == (2, 0, 1)
    assert restarted.reindex() == (0, 2, 1)
    assert fresh.metas[written[1].sop_instance_uid] == written[1]


def test_reindex_gives_back_a_stow_account_longer_than_an_ae_title(store: DicomStore):
    """A STOW-RS client account names the sender (and its site); an AE title holds 16 characters only."""
    source = "STOW-RS:city-general-bridge-01"
    written = store.write(make_ct_series(1)[0], calling_ae=source).meta
    fresh = MemoryIndex()
    assert DicomStore(store.root, SALT, fresh).reindex() == (1, 0, 0)
    assert fresh.metas[written.sop_instance_uid].calling_ae == source
    file_meta = pydicom.dcmread(store.files.open(written.key), stop_before_pixels=True).file_meta
    assert file_meta.SourceApplicationEntityTitle == source[:16]  # what other DICOM tools read


def test_received_bytes_are_stored_bit_for_bit_after_the_file_meta(store: DicomStore, index: MemoryIndex):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = make_ct_series(1)[0]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    received = buffer.getvalue()  # what a storage SCP holds: the data set in the negotiated transfer syntax
    decoded = pydicom.dcmread(DicomBytesIO(received), force=True)
    decoded.file_meta = ds.file_meta

    result = store.write(decoded, calling_ae="CT1", encoded=received)

    stored = store.files.read_bytes(result.meta.key)
    assert stored[128:132] == b"DICM" and stored.endswith(received)
    written = pydicom.dcmread(store.files.open(result.meta.key))
    assert written.file_meta.SourceApplicationEntityTitle == "CT1"
    assert written.PixelData == ds.PixelData
    assert index.metas[ds.SOPInstanceUID].key == result.meta.key
