"""The fuzz corpus over STOW-RS against a running `triage serve`: every case alone and in mixed requests.

No 500, no hang; every failed part has a permanent failure reason (never 0xA7xx Out of Resources, which
senders retry for ever); what was stored is listed; and the service still analyses a valid study afterwards.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

import pytest

from tests.dicom_factory import make_radiograph, to_bytes
from tests.fuzz.corpus import build_corpus, family
from tests.integration.conftest import Server, start_server, stop_server
from triage.dicom.status import describe_status, is_permanent_failure

pytestmark = pytest.mark.integration

BOUNDARY = "stow-fuzz-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
REFERENCED, FAILED, FAILURE_REASON = "00081199", "00081198", "00081197"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("stow-fuzz") / "data"
    srv = start_server(data_dir, runner="inprocess")
    try:
        yield srv
    finally:
        stop_server(srv)


def body_of(parts: list[bytes]) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def outcomes(answer: dict) -> tuple[int, list[int]]:
    """(stored parts, failure reasons) of a STOW-RS response body."""
    stored = len((answer.get(REFERENCED) or {}).get("Value", []))
    failed = [int(item[FAILURE_REASON]["Value"][0]) for item in (answer.get(FAILED) or {}).get("Value", [])]
    return stored, failed


def test_the_fuzz_corpus_over_stow_rs_never_500s_and_refuses_bad_data_permanently(server: Server) -> None:
    cases = build_corpus(seed=9)
    assert len(cases) >= 300
    http_statuses: collections.Counter[int] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    by_family: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    transient: list[str] = []
    started = time.monotonic()

    # Each case alone: its outcome is its own.
    for name, data in cases:
        response = server.post("/dicomweb/studies", content=body_of([data]), headers={"Content-Type": CONTENT_TYPE})
        http_statuses[response.status_code] += 1
        assert response.status_code in (200, 202, 409), f"{name}: {response.status_code} {response.text[:300]}"
        stored, failed = outcomes(response.json())
        assert stored + len(failed) == 1, f"{name}: every part has exactly one outcome ({response.text[:300]})"
        for code in failed:
            reasons[describe_status(code)] += 1
            by_family[family(name)][f"0x{code:04X}"] += 1
            if not is_permanent_failure(code):
                transient.append(f"{name}: {describe_status(code)}")
        if stored:
            reasons["stored"] += 1
            by_family[family(name)]["stored"] += 1

    # Mixed requests: 15 cases each; every part still gets its own outcome.
    for start in range(0, len(cases), 15):
        chunk = [data for _, data in cases[start : start + 15]]
        response = server.post("/dicomweb/studies", content=body_of(chunk), headers={"Content-Type": CONTENT_TYPE})
        assert response.status_code in (200, 202, 409), response.text[:300]
        stored, failed = outcomes(response.json())
        assert stored + len(failed) == len(chunk)
        assert all(is_permanent_failure(code) for code in failed)

    print(f"\nSTOW-RS fuzz: {len(cases)} cases alone + mixed requests in {time.monotonic() - started:.1f} s")
    print("  HTTP statuses (single-part requests):", dict(sorted(http_statuses.items())))
    for text, count in reasons.most_common():
        print(f"  {count:4d}  {text}")
    for name, counts in sorted(by_family.items()):
        print(f"  {name:28s} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    assert transient == [], f"bad data answered as if it were a resource problem: {transient}"

    # The service still takes and analyses a valid study.
    chest = make_radiograph(rows=256, columns=256, seed=77)
    headers = {"Content-Type": CONTENT_TYPE}
    response = server.post("/dicomweb/studies", content=body_of([to_bytes(chest)]), headers=headers)
    assert response.status_code == 200, response.text

    def analysed(items: list[dict]) -> dict | None:
        item = next((i for i in items if i["study_uid"] == str(chest.StudyInstanceUID)), None)
        return item if item and item["ai_status"] not in ("pending", "analysing") else None

    item = server.wait_for(analysed, timeout_s=300, what="the valid chest X-ray to be analysed")
    assert item["ai_status"] == "done", item["ai_reason"]
    assert server.proc.poll() is None, "the server is still running"
