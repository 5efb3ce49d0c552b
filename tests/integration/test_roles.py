"""Roles that run apart: two API replicas, two ingest replicas and two analysis schedulers as separate
`triage serve --role ...` processes sharing one PostgreSQL database and one store.

20 studies arrive at both ingest replicas at once (storescu and STOW-RS): each is analysed exactly once and
listed once; a server-sent-events client on API replica B hears of a study that came in through ingest
replica A; a scheduler killed with SIGKILL in the middle of an analysis leaves the study to the other one,
which finishes it once the lease has run out. The schedulers use the in-process runner: this test is about
coordination through the database (Ray clusters are tested elsewhere)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.dicom_factory import to_bytes
from tests.integration.conftest import HEAD_CT, Server, start_server, stop_server
from tests.unit.worklist.conftest import _new_postgres_database
from triage.config import Settings
from triage.worklist.accounts import add_user

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

LEASE_S = 6
BOUNDARY = "roles-boundary"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    with _new_postgres_database() as url:
        root = tmp_path_factory.mktemp("roles")
        data_dir = root / "data"
        settings = Settings(data_dir=data_dir, database_url=url)
        _, token = add_user(settings, "ci-service", "service")
        env = {
            "TRIAGE_DATABASE_URL": url,
            "TRIAGE_ANALYSIS__LEASE_S": str(LEASE_S),
            "TRIAGE_ANALYSIS__CONCURRENCY": "2",
        }
        servers: dict[str, Server] = {}
        try:
            for name, roles in (
                ("api-a", ("api",)),
                ("api-b", ("api",)),
                ("ingest-a", ("ingest",)),
                ("ingest-b", ("ingest",)),
                ("analysis-1", ("analysis",)),
                ("analysis-2", ("analysis",)),
            ):
                servers[name] = start_server(
                    data_dir, extra_env=env, runner="inprocess", roles=roles, token=token, name=name
                )
            yield servers
        finally:
            for server in servers.values():
                stop_server(server)


def _xrays(folder: Path, n: int, seed: int) -> list[pydicom.Dataset]:
    from triage.training.synth_xray import generate_dataset

    generate_dataset(folder, n=n, positive_fraction=0.0, seed=seed, fmt="dicom")
    return [pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))]


def _stow(server: Server, datasets: list[pydicom.Dataset]) -> httpx.Response:
    body = (
        b"".join(
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(ds) + b"\r\n"
            for ds in datasets
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return server.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})


class EventListener(threading.Thread):
    """Reads server-sent events from one API replica and keeps the study UIDs it heard of."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.studies: set[str] = set()
        self.connected = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.stream(
            "GET", self.server.url + "/api/v1/events", headers=self.server.headers, timeout=None
        ) as response:
            for line in response.iter_lines():
                self.connected.set()
                if line.startswith("data: "):
                    self.studies.add(json.loads(line[6:]).get("study_uid", ""))
                if self.stop.is_set():
                    return


def _detail(server: Server, study_uid: str) -> dict:
    response = server.get(f"/api/v1/studies/{study_uid}")
    response.raise_for_status()
    return response.json()


def _finished(items: list[dict], uids: set[str]) -> bool:
    states = {i["study_uid"]: i["ai_status"] for i in items if i["study_uid"] in uids}
    return len(states) == len(uids) and all(s in ("done", "failed", "not-applicable") for s in states.values())


def test_twenty_studies_through_two_ingest_replicas_are_analysed_exactly_once(
    cluster: dict[str, Server], tmp_path: Path
) -> None:
    listener = EventListener(cluster["api-b"])
    listener.start()
    assert listener.connected.wait(30)

    by_cstore = tmp_path / "cstore"
    cstore_studies = _xrays(by_cstore, 10, seed=21)
    stow_studies = _xrays(tmp_path / "stow", 10, seed=22)
    results: dict[str, object] = {}
    senders = [
        threading.Thread(target=lambda: results.__setitem__("cstore", cluster["ingest-a"].storescu(by_cstore))),
        threading.Thread(target=lambda: results.__setitem__("stow", _stow(cluster["ingest-b"], stow_studies))),
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=300)
    assert results["cstore"].returncode == 0, results["cstore"].stderr  # type: ignore[attr-defined]
    assert results["stow"].status_code == 200, results["stow"].text  # type: ignore[attr-defined]

    uids = {str(ds.StudyInstanceUID) for ds in cstore_studies + stow_studies}
    assert len(uids) == 20
    cluster["api-a"].wait_for(lambda items: _finished(items, uids), timeout_s=600, what="all 20 studies analysed")

    items = cluster["api-b"].worklist()
    assert sorted(i["study_uid"] for i in items if i["study_uid"] in uids) == sorted(uids)  # each listed once
    workers = set()
    for uid in uids:
        detail = _detail(cluster["api-a"], uid)
        assert detail["ai_status"] == "done", detail["ai_reason"]
        analyses = detail["analyses"]
        assert [a["status"] for a in analyses] == ["done"], analyses  # analysed exactly once
        assert analyses[0]["started_at"] and analyses[0]["finished_at"]
        workers.add(analyses[0]["worker"])
    print(f"\nanalyses per scheduler process: {sorted(workers)}")

    # API replica B heard of studies that arrived through ingest replica A (over PostgreSQL LISTEN/NOTIFY).
    deadline = time.monotonic() + 30
    heard = {str(ds.StudyInstanceUID) for ds in cstore_studies}
    while not heard <= listener.studies and time.monotonic() < deadline:
        time.sleep(0.5)
    listener.stop.set()
    assert heard <= listener.studies, f"missing: {sorted(heard - listener.studies)}"


def test_a_scheduler_killed_mid_analysis_leaves_the_study_to_the_other(cluster: dict[str, Server]) -> None:
    result = cluster["ingest-a"].storescu(HEAD_CT)
    assert result.returncode == 0, result.stderr
    first = next(p for p in sorted(HEAD_CT.iterdir()) if p.suffix == ".dcm")
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)

    deadline = time.monotonic() + 300
    while True:
        analyses = _detail(cluster["api-a"], study_uid)["analyses"]
        if analyses and analyses[-1]["status"] == "running":
            break
        assert time.monotonic() < deadline, f"the head CT was never claimed: {analyses}"
        time.sleep(0.2)
    worker = analyses[-1]["worker"]
    schedulers = {name: s for name, s in cluster.items() if name.startswith("analysis")}
    victim = next(name for name, s in schedulers.items() if worker.endswith(f":{s.proc.pid}"))
    os.kill(cluster[victim].proc.pid, signal.SIGKILL)
    cluster[victim].proc.wait(timeout=30)

    def done(items: list[dict]) -> dict | None:
        item = next((i for i in items if i["study_uid"] == study_uid), None)
        return item if item and item["ai_status"] in ("done", "failed") else None

    item = cluster["api-b"].wait_for(done, timeout_s=600, what="the head CT to be finished by the other scheduler")
    assert item["ai_status"] == "done", item["ai_reason"]
    analyses = _detail(cluster["api-a"], study_uid)["analyses"]
    assert [a["status"] for a in analyses] == ["interrupted", "done"], analyses
    assert analyses[0]["worker"] == worker and analyses[1]["worker"] != worker
    assert [i["ai_status"] for i in cluster["api-a"].worklist() if i["study_uid"] == study_uid] == ["done"]
