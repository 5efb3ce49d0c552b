"""STOW-RS: multipart/related received as a stream (RFC 2046, PS3.18 10.5), the DICOM JSON response, the whole
transaction."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.dicom_factory import make_ct_series, make_radiograph, make_sr, new_uid, to_bytes
from triage.dicom.status import DicomStatus
from triage.dicom.store import DicomStore
from triage.dicom.stow import MultipartRelatedReceiver, build_stow_response, stow_instances
from triage.domain import InstanceMeta
from triage.errors import InvalidStudyError, UnsupportedInputError

CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary="XXbound-123"'
BASE = "http://triage.test/dicomweb"


def multipart(parts: list[bytes], boundary: str = "XXbound-123", headers: bool = True) -> bytes:
    body = b"This preamble is ignored.\r\n"
    for part in parts:
        body += b"--" + boundary.encode() + b"\r\n"
        if headers:
            body += b"Content-Type: application/dicom\r\n"
        body += b"\r\n" + part + b"\r\n"
    body += b"--" + boundary.encode() + b"--\r\n" + b"and so is this epilogue"
    return body


def split(body: bytes, content_type: str = CONTENT_TYPE, chunk_bytes: int = 1 << 20) -> list[bytes]:
    """The content of each part as the receiver spools it, the body fed in pieces; a refused part raises."""
    with MultipartRelatedReceiver(content_type) as received:
        for start in range(0, len(body), chunk_bytes):
            received.feed(body[start : start + chunk_bytes])
        parts = received.finish()
        for part in parts:
            if part.error is not None:
                raise part.error
        return [part.read() for part in parts]


@pytest.fixture
def store(tmp_path: Path) -> DicomStore:
    seen: set[str] = set()

    def index(meta: InstanceMeta) -> bool:
        new = meta.sop_instance_uid not in seen
        seen.add(meta.sop_instance_uid)
        return new

    return DicomStore(tmp_path / "store", "salt", index)


def test_parts_are_returned_byte_for_byte():
    parts = [to_bytes(ds) for ds in make_ct_series(2)] + [to_bytes(make_sr())]
    assert split(multipart(parts)) == parts


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/related; boundary=XXbound-123",  # type may be omitted
        'Multipart/Related; Type="Application/DICOM"; Boundary="XXbound-123"',
        'multipart/related;type="application/dicom";boundary=XXbound-123',
    ],
)
def test_content_type_variants_are_understood(content_type: str):
    part = to_bytes(make_sr())
    assert split(multipart([part]), content_type) == [part]


def test_parts_without_header_fields_are_tolerated():
    parts = [to_bytes(make_sr()), to_bytes(make_radiograph(rows=32, columns=32))]
    assert split(multipart(parts, headers=False)) == parts


@pytest.mark.parametrize(
    "part_type",
    [
        "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
        'Application/DICOM; transfer-syntax="1.2.840.10008.1.2.1"',
    ],
)
def test_a_part_may_name_its_transfer_syntax(store: DicomStore, part_type: str):
    ds = make_sr()
    body = f"--XXbound-123\r\nContent-Type: {part_type}\r\n\r\n".encode() + to_bytes(ds) + b"\r\n--XXbound-123--"
    status, response = stow_instances(body, CONTENT_TYPE, store, BASE)
    assert status == 200, response
    assert outcome(response) == ([ds.SOPInstanceUID], [])


def test_preamble_and_epilogue_are_ignored_whatever_they_hold():
    part = b"content"
    preamble = b"the boundary --XXbound-123 mid-line\r\n--XXbound-1234 starts a line\r\n-- and dashes\r\n\r\n"
    epilogue = b"\r\n--XXbound-123\r\n\r\nnot a part: after the closing delimiter\r\n--XXbound-123--\r\n"
    body = preamble + b"--XXbound-123\r\n\r\n" + part + b"\r\n--XXbound-123--" + epilogue
    assert split(body) == [part]
    assert split(body, chunk_bytes=3) == [part]


def test_the_crlf_before_a_delimiter_belongs_to_the_delimiter_not_to_the_content():
    parts = [b"ends with its own line end\r\n", b"\r\n", b"", b"\n", b"lone\rcr\r"]
    assert split(multipart(parts, headers=False)) == parts


def test_whitespace_after_a_boundary_is_transport_padding():
    part = to_bytes(make_sr())
    body = (
        b"--XXbound-123 \t\r\nContent-Type: application/dicom\r\n\r\n"
        + part
        + b"\r\n--XXbound-123  \r\n\r\nsecond\r\n--XXbound-123--"
    )
    assert split(body) == [part, b"second"]


def test_the_boundary_inside_part_data_does_not_split_it():
    tricky = [
        b"abc\r\n--XXbound-123456 is not a boundary\r\nxyz",  # a line that only starts like the delimiter
        b"the boundary --XXbound-123 in the middle of a line",
        b"--XXbound-123 at the very start of the content, after the blank line",
        b"x\n--XXbound-123\ny",  # a bare LF is not a line end here
        b"ends like a delimiter \r\n--XXbound-12",
    ]
    body = multipart(tricky, headers=False)
    assert split(body) == tricky
    assert split(body, chunk_bytes=5) == tricky


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize(
    "broken",
    [
        b"\x00\x01\x02DICM no header section at all\r\n",  # raw bytes straight after the delimiter
        b"Content-Type application/dicom\r\n\r\nno colon in the header line\r\n",
        b"X-Long: " + b"a" * 20000 + b"\r\n\r\nheader section far too long\r\n",
        b"Content-Type: application/dicom\r\n\x7fbad: field\r\n\r\n--XXbound-123x is not a delimiter\r\n",
    ],
)
def test_a_part_with_a_broken_header_section_is_refused_alone_and_the_next_parts_are_read(
    broken: bytes, chunk_bytes: int
):
    good = [b"first part", b"third part \r\n--XXbound-1234 with a line that only starts like a delimiter"]
    delimiter = b"\r\n--XXbound-123\r\n"
    body = (b"--XXbound-123\r\n\r\n" + good[0] + delimiter + broken + b"--XXbound-123\r\n\r\n" + good[1]
            + b"\r\n--XXbound-123--\r\n")  # fmt: skip
    with MultipartRelatedReceiver(CONTENT_TYPE) as received:
        for start in range(0, len(body), chunk_bytes):
            received.feed(body[start : start + chunk_bytes])
        parts = received.finish()
        assert [p.number for p in parts] == [1, 2, 3]
        assert parts[1].error is not None and "part 2 has a malformed header section" in str(parts[1].error)
        assert [parts[0].read(), parts[2].read()] == good


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "multipart/form-data; boundary=XXbound-123",
        'multipart/related; type="application/dicom+json"; boundary=XXbound-123',
        'multipart/related; type="application/octet-stream"; boundary=XXbound-123',
        "",
    ],
)
def test_other_media_types_are_unsupported_and_quoted(content_type: str):
    with pytest.raises(UnsupportedInputError) as caught:
        split(multipart([b"x"]), content_type)
    assert "not supported" in str(caught.value)


def test_part_of_another_type_is_unsupported():
    body = b"--XXbound-123\r\nContent-Type: image/jpeg\r\n\r\nJFIF\r\n--XXbound-123--"
    with pytest.raises(UnsupportedInputError, match="image/jpeg"):
        split(body)


def test_base64_parts_are_unsupported():
    body = b"--XXbound-123\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--XXbound-123--"
    with pytest.raises(UnsupportedInputError, match="base64"):
        split(body)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"--XXbound-123\r\n\r\nabc\r\n--XXbound-123--", 'multipart/related; type="application/dicom"', "boundary"),
        (b"--XXbound-123\r\n\r\nabc\r\n", CONTENT_TYPE, "closing boundary"),  # truncated upload
        (b"no delimiters here", CONTENT_TYPE, "no part"),
        (b"--XXbound-123--\r\n", CONTENT_TYPE, "no parts"),
        (b"--XXbound-123\r\n\x00\x00\x00\x00DICM\r\n--XXbound-123--", CONTENT_TYPE, "part 1"),  # no blank line
        (b"--XXbound-123\n\nabc\n--XXbound-123--\n", CONTENT_TYPE, "CRLF"),  # bare LF line ends
    ],
)
def test_malformed_bodies_are_invalid(body: bytes, content_type: str, message: str):
    with pytest.raises(InvalidStudyError, match=message):
        split(body, content_type)


def test_all_stored_is_200_with_retrieve_urls(store: DicomStore):
    series = make_ct_series(3)

    status, response = stow_instances(multipart([to_bytes(ds) for ds in series]), CONTENT_TYPE, store, BASE + "/")

    assert status == 200
    study = series[0].StudyInstanceUID
    assert response["00081190"] == {"vr": "UR", "Value": [f"{BASE}/studies/{study}"]}
    assert "00081198" not in response
    items = response["00081199"]["Value"]
    assert [i["00081155"]["Value"][0] for i in items] == [ds.SOPInstanceUID for ds in series]
    assert items[0]["00081150"] == {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}
    first = series[0]
    assert items[0]["00081190"]["Value"][0] == (
        f"{BASE}/studies/{study}/series/{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}"
    )
    assert len(list(store.instance_keys())) == 3


def test_some_failed_is_202_with_failure_reasons(store: DicomStore):
    good = make_radiograph()
    no_pixels = make_radiograph()
    del no_pixels.PixelData
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.1"  # Verification: no storage class
    body = multipart([to_bytes(good), b"\x00garbage", to_bytes(no_pixels), to_bytes(mr)])

    status, response = stow_instances(body, CONTENT_TYPE, store, BASE)

    assert status == 202
    failed = response["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [
        DicomStatus.CANNOT_UNDERSTAND,
        DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        DicomStatus.SOP_CLASS_NOT_SUPPORTED,
    ]
    assert failed[0]["00081155"] == {"vr": "UI"}  # unparseable: no UID known
    assert failed[1]["00081155"]["Value"] == [no_pixels.SOPInstanceUID]
    assert failed[2]["00081150"]["Value"] == [mr.SOPClassUID]
    assert [i["00081155"]["Value"][0] for i in response["00081199"]["Value"]] == [good.SOPInstanceUID]


def test_nothing_stored_is_409(store: DicomStore):
    status, response = stow_instances(multipart([b"not dicom"]), CONTENT_TYPE, store, BASE)
    assert status == 409
    assert "00081199" not in response
    assert "00081190" not in response
    assert len(response["00081198"]["Value"]) == 1


def test_wrong_media_type_is_415_and_malformed_body_is_400(store: DicomStore):
    status, response = stow_instances(b"{}", "application/dicom+json", store, BASE)
    assert status == 415
    assert "application/dicom+json" in response["error"]
    status, response = stow_instances(b"--XXbound-123\r\n\r\nabc", CONTENT_TYPE, store, BASE)
    assert status == 400
    assert "closing boundary" in response["error"]


def test_instances_of_another_study_than_the_url_names_are_refused(store: DicomStore):
    mine, other = make_ct_series(1)[0], make_ct_series(1)[0]
    body = multipart([to_bytes(mine), to_bytes(other)])

    status, response = stow_instances(body, CONTENT_TYPE, store, BASE, study_uid=mine.StudyInstanceUID)

    assert status == 202
    assert response["00081198"]["Value"][0]["00081155"]["Value"] == [other.SOPInstanceUID]
    assert response["00081198"]["Value"][0]["00081197"]["Value"] == [DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS]


def test_a_resent_instance_is_stored_again_not_failed(store: DicomStore):
    ds = make_sr()
    body = multipart([to_bytes(ds)])
    assert stow_instances(body, CONTENT_TYPE, store, BASE)[0] == 200
    status, response = stow_instances(body, CONTENT_TYPE, store, BASE)
    assert status == 200
    assert len(response["00081199"]["Value"]) == 1


def test_response_of_several_studies_has_no_study_retrieve_url(store: DicomStore):
    a, b = store.write(make_sr()), store.write(make_sr())
    response = build_stow_response([a, b], [], BASE)
    assert "00081190" not in response
    assert list(response) == ["00081199"]
    response = build_stow_response([a], [("1.2.3", "4.5.6", 0xA700)], BASE)
    assert list(response) == ["00081190", "00081198", "00081199"]  # tag order (PS3.18 F.2)
    assert response["00081198"]["Value"][0] == {
        "00081150": {"vr": "UI", "Value": ["1.2.3"]},
        "00081155": {"vr": "UI", "Value": ["4.5.6"]},
        "00081197": {"vr": "US", "Value": [0xA700]},
    }


# --- one bad part never affects the others (issue 9, item 2) ---------------------------------------------------


def with_unknown_vr(ds: pydicom.Dataset, tag: bytes = b"\x08\x00\x18\x00", vr: bytes = b"ZZ") -> bytes:
    """`ds` as Part-10 bytes (Explicit VR Little Endian) with the VR of the element `tag` replaced by `vr`."""
    raw = to_bytes(ds)
    start = 132 + int.from_bytes(raw[140:144], "little") + 12  # after the File Meta group (PS3.10 7.1)
    at = raw.index(tag, start)
    return raw[: at + 4] + vr + raw[at + 6 :]


def outcome(response: dict) -> tuple[list[str], list[tuple[str, int]]]:
    """(stored SOP Instance UIDs, (failed SOP Instance UID or "", Failure Reason)) of a STOW-RS response."""
    stored = [i["00081155"]["Value"][0] for i in response.get("00081199", {}).get("Value", [])]
    failed = [
        ((i["00081155"].get("Value") or [""])[0], i["00081197"]["Value"][0])
        for i in response.get("00081198", {}).get("Value", [])
    ]
    return stored, failed


def test_a_part_with_an_unknown_vr_fails_alone_and_the_parts_after_it_are_stored(store: DicomStore, caplog):
    first, broken, last = make_ct_series(3)
    body = multipart([to_bytes(first), with_unknown_vr(broken), to_bytes(last)])

    with caplog.at_level("WARNING", logger="triage.dicom.stow"):
        status, response = stow_instances(body, CONTENT_TYPE, store, BASE)

    assert status == 202
    stored, failed = outcome(response)
    assert stored == [first.SOPInstanceUID, last.SOPInstanceUID]
    # The instance is named (from its File Meta) so the sender knows which one to fix.
    assert failed == [(broken.SOPInstanceUID, DicomStatus.CANNOT_UNDERSTAND)]
    assert len(list(store.instance_keys())) == 2
    (record,) = [r for r in caplog.records if "part 2 of 3" in r.getMessage()]
    assert "Unknown Value Representation 'ZZ'" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in record.getMessage()  # expected bad input: one line


def test_every_part_of_a_mixed_request_gets_its_own_outcome(store: DicomStore):
    good = make_ct_series(2)
    study = good[0].StudyInstanceUID
    no_uid = make_radiograph(study_uid=study)
    del no_uid.SOPInstanceUID
    other_study = make_radiograph()
    in_a_sequence = make_radiograph(study_uid=study)
    in_a_sequence.ReferencedImageSequence = [pydicom.Dataset()]
    in_a_sequence.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    nested_zz = with_unknown_vr(in_a_sequence, tag=b"\x08\x00\x55\x11")  # (0008,1155) inside the item
    base64_part = b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA"
    jpeg_part = b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0JFIF"
    # Each part brings its own header section: none (a blank line), or its own Content-Type.
    parts = [
        b"\r\n" + to_bytes(good[0]),
        b"\r\n" + with_unknown_vr(make_radiograph(study_uid=study)),
        b"\r\n\x00garbage",
        b"\r\n" + to_bytes(no_uid),
        jpeg_part,
        base64_part,
        b"\r\nThis is not DICOM at all, just text someone attached.\n" * 3,
        b"\r\n",  # an empty part
        b"\r\n" + to_bytes(other_study),
        b"\r\n" + nested_zz,
        b"\r\n" + to_bytes(good[1]),
    ]
    body = b"".join(b"--XXbound-123\r\n" + part + b"\r\n" for part in parts) + b"--XXbound-123--\r\n"

    status, response = stow_instances(body, CONTENT_TYPE, store, BASE, study_uid=study)

    assert status == 202
    stored, failed = outcome(response)
    assert stored == [good[0].SOPInstanceUID, good[1].SOPInstanceUID]
    assert [reason for _, reason in failed] == [
        DicomStatus.CANNOT_UNDERSTAND,  # unknown VR
        DicomStatus.CANNOT_UNDERSTAND,  # garbage
        DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,  # no SOP Instance UID
        DicomStatus.CANNOT_UNDERSTAND,  # image/jpeg part
        DicomStatus.CANNOT_UNDERSTAND,  # base64
        DicomStatus.CANNOT_UNDERSTAND,  # text
        DicomStatus.CANNOT_UNDERSTAND,  # empty
        DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,  # another study than the URL names
        DicomStatus.CANNOT_UNDERSTAND,  # unknown VR inside a sequence item
    ]
    assert len(stored) + len(failed) == len(parts)  # every part has an outcome
    assert failed[7][0] == other_study.SOPInstanceUID
    assert failed[8][0] == in_a_sequence.SOPInstanceUID
    assert len(list(store.instance_keys())) == 2


def test_nothing_but_bad_parts_is_409_with_one_failure_each(store: DicomStore):
    body = multipart([with_unknown_vr(make_sr()), b"\x00garbage", b"GIF89a"])
    status, response = stow_instances(body, CONTENT_TYPE, store, BASE)
    assert status == 409
    stored, failed = outcome(response)
    assert stored == [] and len(failed) == 3
    assert {reason for _, reason in failed} == {DicomStatus.CANNOT_UNDERSTAND}


class FaultyStore:
    """The real store, except that writing the instances named in `faults` raises the exception given."""

    def __init__(self, store: DicomStore, faults: dict[str, BaseException]) -> None:
        self.store, self.faults = store, faults

    def write(self, ds, calling_ae: str = ""):  # type: ignore[no-untyped-def]
        fault = self.faults.get(ds.SOPInstanceUID)
        if fault is not None:
            raise fault
        return self.store.write(ds, calling_ae=calling_ae)


def test_a_bug_while_storing_one_part_is_a_processing_failure_logged_with_its_traceback(store, caplog):
    a, b, c = make_ct_series(3)
    faulty = FaultyStore(store, {b.SOPInstanceUID: RuntimeError("boom")})

    with caplog.at_level("WARNING", logger="triage.dicom.stow"):
        status, response = stow_instances(multipart([to_bytes(ds) for ds in (a, b, c)]), CONTENT_TYPE, faulty, BASE)

    assert status == 202
    assert outcome(response) == (
        [a.SOPInstanceUID, c.SOPInstanceUID],
        [(b.SOPInstanceUID, DicomStatus.PROCESSING_FAILURE)],
    )
    (record,) = [r for r in caplog.records if b.SOPInstanceUID in r.getMessage()]
    assert record.exc_info is not None  # a bug in triage: the traceback is in the log


def test_a_full_disk_is_out_of_resources_for_that_part_only(store: DicomStore):
    import errno

    a, b = make_ct_series(2)
    full = OSError(errno.ENOSPC, "No space left on device")
    status, response = stow_instances(
        multipart([to_bytes(a), to_bytes(b)]), CONTENT_TYPE, FaultyStore(store, {a.SOPInstanceUID: full}), BASE
    )
    assert status == 202
    assert outcome(response) == ([b.SOPInstanceUID], [(a.SOPInstanceUID, DicomStatus.OUT_OF_RESOURCES)])


def test_a_body_in_a_file_read_in_small_blocks_gives_the_same_answer(store: DicomStore, tmp_path: Path, monkeypatch):
    import triage.dicom.stow as stow

    monkeypatch.setattr(stow, "_FEED_BLOCK_BYTES", 4096)  # many blocks; delimiters straddle block edges
    series = make_ct_series(3)
    path = tmp_path / "body"
    path.write_bytes(multipart([to_bytes(ds) for ds in series]))
    with path.open("rb") as handle:
        status, response = stow_instances(handle, CONTENT_TYPE, store, BASE)
    assert status == 200
    assert outcome(response)[0] == [ds.SOPInstanceUID for ds in series]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 16])
def test_splitting_does_not_depend_on_how_the_body_is_chunked(chunk_bytes: int):
    parts = [b"abc", b"", b"x\r\n--XXbound-1234 not a boundary\r\ny", b"--XXbound-12", b"\r\n\r\n"]
    assert split(multipart(parts, headers=False), chunk_bytes=chunk_bytes) == parts
    assert split(multipart(parts), chunk_bytes=chunk_bytes) == parts


def test_a_chunked_upload_in_irregular_pieces_is_stored(store: DicomStore):
    series = make_ct_series(3)
    body = multipart([to_bytes(ds) for ds in series])
    sizes = [1, 5, 100, 4096, 65536, 3, 17]

    def chunks() -> Iterator[bytes]:  # as a chunked Transfer-Encoding request comes off the socket
        position, index = 0, 0
        while position < len(body):
            size = sizes[index % len(sizes)]
            yield body[position : position + size]
            position, index = position + size, index + 1

    status, response = stow_instances(chunks(), CONTENT_TYPE, store, BASE)

    assert status == 200, response
    assert outcome(response)[0] == [ds.SOPInstanceUID for ds in series]


def test_a_truncated_body_is_400_and_nothing_of_it_is_stored_or_left_spooled(store: DicomStore, tmp_path: Path):
    series = make_ct_series(3)
    whole = multipart([to_bytes(ds) for ds in series])
    spool = tmp_path / "spool"
    spool.mkdir()
    cut = whole[: whole.rindex(b"--XXbound-123--") - 10]  # two parts complete, the third cut short

    status, response = stow_instances(cut, CONTENT_TYPE, store, BASE, spool_dir=spool, spool_memory_bytes=0)

    assert status == 400
    assert "closing boundary" in response["error"] and "truncated" in response["error"]
    assert "after 2 complete parts" in response["error"]
    assert list(store.instance_keys()) == []
    assert list(spool.iterdir()) == []  # the spool files are unlinked on creation and closed


def test_parts_stay_in_memory_only_while_the_whole_request_fits_the_spool_memory(tmp_path: Path):
    part = b"x" * 1_000_000
    small, large = multipart([part] * 4), multipart([part] * 12)

    def held_after_receiving(body: bytes) -> tuple[int, list[bytes]]:
        """(bytes still allocated once the body is received, the parts); the body itself is not counted."""
        with MultipartRelatedReceiver(CONTENT_TYPE, spool_dir=tmp_path, spool_memory_bytes=4_500_000) as received:
            tracemalloc.start()
            try:
                for start in range(0, len(body), 65536):
                    received.feed(body[start : start + 65536])
                parts = received.finish()
                held, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            return held, [p.read() for p in parts]

    held, parts = held_after_receiving(small)
    assert held > 4_000_000 and parts == [part] * 4  # 4 MB fit: kept in memory, no disk touched
    held, parts = held_after_receiving(large)
    assert held < 1_000_000 and parts == [part] * 12  # 12 MB do not: every part went to disk, the first ones too


def test_a_body_far_bigger_than_the_spool_memory_is_stored_with_bounded_memory(store: DicomStore, tmp_path: Path):
    """About 200 MB in 50 instances of 4 MiB, sent in 64 KiB pieces: Python's peak allocation stays a few
    instances, not the body."""
    template = make_radiograph(rows=1024, columns=2048, seed=3)  # 4 MiB of pixel data
    study = template.StudyInstanceUID
    count, piece = 50, 64 * 1024
    uids = [new_uid() for _ in range(count)]
    sent = 0

    def chunks() -> Iterator[bytes]:  # each instance made as it is sent, so the test itself holds one at a time
        nonlocal sent
        yield b"preamble\r\n"
        for uid in uids:
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid
            section = b"--XXbound-123\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(template) + b"\r\n"
            sent += len(section)
            for start in range(0, len(section), piece):
                yield section[start : start + piece]
            del section
        yield b"--XXbound-123--\r\n"

    spool = tmp_path / "spool"
    spool.mkdir()
    tracemalloc.start()
    try:
        status, response = stow_instances(
            chunks(), CONTENT_TYPE, store, BASE, spool_dir=spool, spool_memory_bytes=8 * 1024**2
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert status == 200, response
    assert outcome(response)[0] == uids
    assert response["00081190"]["Value"] == [f"{BASE}/studies/{study}"]
    assert sent > 200 * 1024**2
    print(f"\nSTOW-RS of {sent / 1e6:.0f} MB in {count} parts: peak Python allocation {peak / 1e6:.1f} MB")
    assert peak < sent / 5, f"peak {peak / 1e6:.0f} MB for a body of {sent / 1e6:.0f} MB"
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"--XXbound-123",  # cut inside the first boundary line
        b"--XXbound-123\r\nContent-Type: application/dicom\r\n\r\n" + b"\x00" * 1000,  # cut inside a part
        b"--XXbound-123garbage\r\n\r\nabc\r\n--XXbound-123--",
        b"\r\n" * 5000,
    ],
)
def test_broken_framing_is_400_never_an_exception(store: DicomStore, body: bytes):
    status, response = stow_instances(body, CONTENT_TYPE, store, BASE)
    assert status == 400
    assert response["error"]
