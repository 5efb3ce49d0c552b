"""STOW-RS against a running `triage serve` with hostile and careless requests (issue 9, items 2 and 6).

A request mixing good and bad parts stores every good part and names every bad one; a body over the size limit
is 413 (declared or chunked) and the server carries on; a truncated body is 400; nothing is ever a 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.dicom_factory import make_radiograph, to_bytes
from tests.integration.conftest import Server, start_server, stop_server
from triage.dicom.status import DicomStatus

pytestmark = pytest.mark.integration

BOUNDARY = "stow-faults-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
LIMIT_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("stow-faults") / "data"
    srv = start_server(data_dir, {"TRIAGE_DICOMWEB__STOW_MAX_BODY_BYTES": str(LIMIT_BYTES)}, runner="inprocess")
    try:
        yield srv
    finally:
        stop_server(srv)


def section(content: bytes, content_type: str = "application/dicom") -> bytes:
    return f"Content-Type: {content_type}\r\n\r\n".encode() + content


def body_of(*sections: bytes, close: bool = True) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\n".encode() + s + b"\r\n" for s in sections)
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def with_unknown_vr(ds: pydicom.Dataset) -> bytes:
    """Part-10 bytes with VR 'ZZ' on SOP Instance UID (0008,0018), as the fuzzed file in the issue had."""
    raw = to_bytes(ds)
    at = raw.index(b"\x08\x00\x18\x00UI", 132 + int.from_bytes(raw[140:144], "little") + 12)
    return raw[: at + 4] + b"ZZ" + raw[at + 6 :]


def stow(server: Server, content: object, **headers: str) -> httpx.Response:
    return server.post("/dicomweb/studies", content=content, headers={"Content-Type": CONTENT_TYPE, **headers})


def listed(server: Server, study_uid: str) -> bool:
    return any(item["study_uid"] == study_uid for item in server.worklist())


def test_an_unknown_vr_between_good_parts_fails_that_part_only(server: Server) -> None:
    """The request from the issue: it was a 500, and the part after the bad one was never stored."""
    before, broken, after = (make_radiograph(rows=64, columns=64, seed=10 + i) for i in range(3))

    response = stow(
        server, body_of(section(to_bytes(before)), section(with_unknown_vr(broken)), section(to_bytes(after)))
    )

    assert response.status_code == 202, response.text
    answer = response.json()
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [
        before.SOPInstanceUID,
        after.SOPInstanceUID,
    ]
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [broken.SOPInstanceUID]
    assert failed["00081197"]["Value"] == [DicomStatus.CANNOT_UNDERSTAND]
    server.wait_for(lambda _: listed(server, after.StudyInstanceUID), timeout_s=60, what="the part after the bad one")


def test_good_parts_around_bad_ones_are_stored_and_listed_and_each_bad_part_is_named(server: Server) -> None:
    before, after = make_radiograph(rows=64, columns=64), make_radiograph(rows=64, columns=64, seed=1)
    broken = make_radiograph(rows=64, columns=64, seed=2)
    no_uid = make_radiograph(rows=64, columns=64, seed=3)
    del no_uid.SOPInstanceUID
    body = body_of(
        section(to_bytes(before)),
        section(with_unknown_vr(broken)),
        section(b"\x00garbage"),
        section(b"%PDF-1.4 not an image"),
        section(to_bytes(no_uid)),
        section(b"\xff\xd8\xff\xe0JFIF", "image/jpeg"),
        section(to_bytes(after)),
    )

    response = stow(server, body)

    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    answer = response.json()
    stored = [item["00081155"]["Value"][0] for item in answer["00081199"]["Value"]]
    assert stored == [before.SOPInstanceUID, after.SOPInstanceUID]
    failed = answer["00081198"]["Value"]
    assert len(failed) == 5, failed  # every part has an outcome
    assert failed[0]["00081155"]["Value"] == [broken.SOPInstanceUID]
    reasons = [item["00081197"]["Value"][0] for item in failed]
    assert reasons[4] == DicomStatus.CANNOT_UNDERSTAND
    # Bad data gets a permanent failure, never "out of resources" (which a sender would resend forever).
    assert DicomStatus.OUT_OF_RESOURCES not in reasons and DicomStatus.PROCESSING_FAILURE not in reasons

    for study_uid in (before.StudyInstanceUID, after.StudyInstanceUID):
        server.wait_for(lambda _, uid=study_uid: listed(server, uid), timeout_s=60, what="the stored study listed")
    assert not listed(server, broken.StudyInstanceUID)
    log = server.log_path.read_text()
    assert "Unknown Value Representation 'ZZ'" in log
    assert "Traceback" not in log  # expected bad input is one log line each, not a stack trace


def test_a_body_over_the_limit_is_413_declared_or_chunked_and_the_server_carries_on(
    server: Server, tmp_path: Path
) -> None:
    big = body_of(section(b"\x00" * (LIMIT_BYTES + 1)))

    declared = stow(server, big)
    assert declared.status_code == 413, declared.text
    assert str(LIMIT_BYTES) in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    chunked = stow(server, chunks())
    assert chunked.status_code == 413, chunked.text

    ds = make_radiograph(rows=64, columns=64, seed=4)
    small = stow(server, body_of(section(to_bytes(ds))))
    assert small.status_code == 200, small.text
    assert server.get("/healthz").status_code == 200
    leftovers = list((server.data_dir / "tmp").iterdir()) if (server.data_dir / "tmp").exists() else []
    assert leftovers == [], "spooled request bodies are not left on disk"


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (None, CONTENT_TYPE, 400),  # truncated: no closing boundary (filled in below)
        (b"", CONTENT_TYPE, 400),
        (b"--" + BOUNDARY.encode(), CONTENT_TYPE, 400),
        (b"{}", "application/dicom+json", 415),
        (b"--x\r\n\r\nabc\r\n--x--", "multipart/related; boundary=" + "b" * 71, 400),
        (b"--x\r\n\r\nabc\r\n--x--", "multipart/related", 400),
    ],
)
def test_broken_requests_are_client_errors_never_500(
    server: Server, content: bytes | None, content_type: str, status: int
) -> None:
    if content is None:
        content = body_of(section(to_bytes(make_radiograph(rows=64, columns=64, seed=5))), close=False)[:-10]
    response = stow(server, content, **{"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]


def test_a_spool_folder_that_cannot_be_written_is_503_try_again_not_500(server: Server) -> None:
    spool = server.data_dir / "tmp"
    if spool.exists():
        spool.rmdir()
    spool.write_text("a file where the spool folder should be")  # as unwritable as a full disk, even for root
    try:
        response = stow(server, body_of(section(to_bytes(make_radiograph(rows=64, columns=64, seed=6)))))
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
    finally:
        spool.unlink()
    ds = make_radiograph(rows=64, columns=64, seed=7)
    assert stow(server, body_of(section(to_bytes(ds)))).status_code == 200
