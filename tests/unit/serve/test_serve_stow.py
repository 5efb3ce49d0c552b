"""POST /dicomweb/studies through the real app: the body is split as it arrives (chunked or not), the size limit
holds while reading, and a broken, cut or unreceivable request stores nothing and says why."""

from __future__ import annotations

import asyncio
import errno
import tempfile
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from serve_site import Site, utcnow
from starlette.requests import Request

from tests.dicom_factory import make_radiograph, to_bytes
from triage.dicom.status import DicomStatus

BOUNDARY = "serve-stow-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def body_of(*contents: bytes, close: bool = True) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + content + b"\r\n" for content in contents
    )
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def in_pieces(body: bytes, size: int = 7_000) -> Iterator[bytes]:
    """The body as a generator: httpx sends it chunked (Transfer-Encoding: chunked, no Content-Length)."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def stow(site: Site, content: Any) -> Any:
    _, token = site.accounts.add_user(f"bridge-{utcnow().timestamp()}", "service", None, utcnow())
    headers = {"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE}
    return site.client.post("/dicomweb/studies", content=content, headers=headers)


def stored_count(site: Site) -> int:
    return len(list(site.service.store.instance_keys()))


def spooled(site: Site) -> list[Any]:
    folder = site.settings.data_dir / "tmp"
    return list(folder.iterdir()) if folder.is_dir() else []


def test_a_chunked_upload_with_a_bad_part_between_good_ones_stores_the_good_ones(site: Site) -> None:
    before, after = make_radiograph("DX", 64, 64, seed=1), make_radiograph("DX", 64, 64, seed=2)
    site.settings.dicomweb.stow_spool_memory_bytes = 0  # every part through a file under data_dir/tmp

    response = stow(site, in_pieces(body_of(to_bytes(before), b"\x00 not DICOM", to_bytes(after))))

    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    answer = response.json()
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [
        before.SOPInstanceUID,
        after.SOPInstanceUID,
    ]
    assert [i["00081197"]["Value"][0] for i in answer["00081198"]["Value"]] == [DicomStatus.CANNOT_UNDERSTAND]
    assert stored_count(site) == 2
    assert spooled(site) == []


def test_a_chunked_upload_over_the_limit_is_413_and_nothing_is_stored(site: Site) -> None:
    site.settings.dicomweb.stow_max_body_bytes = 50_000
    body = body_of(*(to_bytes(make_radiograph("DX", 64, 64, seed=i)) for i in range(8)))
    assert len(body) > 50_000

    response = stow(site, in_pieces(body))

    assert response.status_code == 413, response.text
    assert "50000" in response.json()["error"]
    assert stored_count(site) == 0


def test_a_truncated_upload_is_400_and_none_of_it_is_stored(site: Site) -> None:
    body = body_of(*(to_bytes(make_radiograph("DX", 64, 64, seed=i)) for i in range(3)), close=False)

    response = stow(site, in_pieces(body[:-100]))

    assert response.status_code == 400, response.text
    assert "closing boundary" in response.json()["error"]
    assert stored_count(site) == 0
    assert spooled(site) == []


def test_a_part_whose_headers_are_broken_is_refused_alone_and_the_parts_after_it_are_stored(site: Site) -> None:
    """One bad part never costs the others, whatever is wrong with it: a part with no header section (raw bytes
    straight after its delimiter) gets its own failure, and the instances before and after it are stored."""
    first, last = (to_bytes(make_radiograph("DX", 64, 64)) for _ in range(2))
    delimiter = f"--{BOUNDARY}\r\n".encode()
    head = b"Content-Type: application/dicom\r\n\r\n"
    body = (delimiter + head + first + b"\r\n" + delimiter + b"\x00\x01 no headers, not even a blank line\r\n"
            + delimiter + head + last + b"\r\n" + f"--{BOUNDARY}--\r\n".encode())  # fmt: skip
    response = stow(site, in_pieces(body))
    assert response.status_code == 202, response.text
    answer = response.json()
    assert len(answer["00081199"]["Value"]) == 2
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [int(DicomStatus.CANNOT_UNDERSTAND)]
    assert stored_count(site) == 2


def test_a_full_disk_while_spooling_is_503_try_again_and_nothing_is_stored(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FullDisk(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("triage.dicom.stow.tempfile.SpooledTemporaryFile", FullDisk)

    response = stow(site, in_pieces(body_of(to_bytes(make_radiograph("DX", 64, 64)))))

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert stored_count(site) == 0


def test_a_client_that_goes_away_mid_body_gets_400_and_nothing_is_stored(site: Site) -> None:
    from triage.serve.routes.dicomweb import stow as stow_route

    messages = [
        {"type": "http.request", "body": body_of(to_bytes(make_radiograph("DX", 64, 64)))[:5000], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/dicomweb/studies",
        "headers": [(b"content-type", CONTENT_TYPE.encode())],
        "query_string": b"",
        "server": ("testserver", 80),
        "scheme": "http",
        "root_path": "",
    }
    user = SimpleNamespace(name="bridge")
    response = asyncio.run(stow_route(Request(scope, receive), site.service, user))  # type: ignore[arg-type]

    assert response.status_code == 400
    assert b"closed the connection" in response.body
    assert stored_count(site) == 0
