"""'Next study' under concurrency on PostgreSQL, through two real API processes: 20 radiologists signed in through
/login press it at the same moment and no study is assigned twice; credentials set with the real CLI (`triage
sites add`, `triage users grant`) decide what each may get."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Server, start_server, stop_server
from tests.unit.worklist.conftest import _new_postgres_database
from triage.config import Settings
from triage.domain import InstanceMeta
from triage.worklist.accounts import add_user
from triage.worklist.repository import Worklist

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

READERS = 20
PASSWORD = "night-shift-pass-1"


def cli(data_dir: Path, url: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "triage", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRIAGE_DATABASE_URL": url, "TRIAGE_OPERATOR": "tests"},
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def meta(n: int, ae: str) -> InstanceMeta:
    return InstanceMeta(
        study_uid=f"1.2.826.0.1.77.{n}",
        series_uid=f"1.2.826.0.1.77.{n}.1",
        sop_instance_uid=f"1.2.826.0.1.77.{n}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        key=f"none/{n}.dcm",
        accession_number=f"NS{n:03d}",
        calling_ae=ae,
        study_description="CT HEAD",
    )


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Server], Path, str]]:
    with _new_postgres_database() as url:
        data_dir = tmp_path_factory.mktemp("next-study") / "data"
        settings = Settings(data_dir=data_dir, database_url=url)
        _, token = add_user(settings, "ci-service", "service")
        for n in range(READERS):
            add_user(settings, f"rad{n:02d}", "radiologist", PASSWORD)
        env = {"TRIAGE_DATABASE_URL": url}
        servers = [start_server(data_dir, extra_env=env, runner="inprocess", roles=("api",), token=token,
                                name=f"api-{i}") for i in range(2)]  # fmt: skip
        try:
            yield servers, data_dir, url
        finally:
            for server in servers:
                stop_server(server)


def signed_in(server: Server, name: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=server.url, timeout=60)
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    response = client.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": token})
    assert response.status_code in (200, 303), response.text
    page = client.get("/worklist")
    return client, re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)


def test_twenty_radiologists_pressing_next_study_at_once_get_twenty_different_studies(replicas) -> None:
    servers, data_dir, url = replicas
    cli(data_dir, url, "sites", "add", "CITY HOSPITAL", "--ae", "CITY_CT", "--tz", "Europe/London")
    cli(data_dir, url, "sites", "add", "HILL CLINIC", "--ae", "HILL_CT", "--tz", "Asia/Kolkata")
    for n in range(READERS):
        cli(data_dir, url, "users", "grant", f"rad{n:02d}", "--site", "CITY HOSPITAL", "--until", "2099-12-31")
    worklist = Worklist.open(url)
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    batch = [(meta(n, "CITY_CT"), t0 + timedelta(seconds=n)) for n in range(25)]
    batch += [(meta(100 + n, "HILL_CT"), t0 - timedelta(minutes=10)) for n in range(5)]  # older, not theirs
    worklist.record_instances(batch)
    sessions = [signed_in(servers[n % 2], f"rad{n:02d}") for n in range(READERS)]
    # One reader's view through the contract: only CITY HOSPITAL's studies, though HILL's are older.
    client, _ = sessions[0]
    listed = client.get("/api/v1/worklist", params={"limit": 1000}).json()
    assert {i["site"] for i in listed} == {"CITY HOSPITAL"} and len(listed) == 25

    results: list[tuple[int, dict]] = []
    barrier = threading.Barrier(READERS)

    def press(index: int) -> None:
        client, csrf = sessions[index]
        barrier.wait()
        response = client.post("/api/v1/worklist/next", headers={"X-CSRF-Token": csrf})
        results.append((response.status_code, response.json() if response.status_code == 200 else {}))

    threads = [threading.Thread(target=press, args=(i,)) for i in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [code for code, _ in results] == [200] * READERS
    studies = [body["study_uid"] for _, body in results]
    assert len(set(studies)) == READERS, "a study was assigned twice"
    assert all(body["site"] == "CITY HOSPITAL" for _, body in results)
    # The 20 at the top of the order (all routine: the oldest first) and each claimed by the one who got it.
    assert set(studies) == {f"1.2.826.0.1.77.{n}" for n in range(READERS)}
    claimed = {i.study_uid: i.claimed_by for i in worklist.list_worklist(datetime.now(UTC), claimed=True)}
    assert {claimed[body["study_uid"]] for _, body in results} == {f"rad{n:02d}" for n in range(READERS)}
    for client, _ in sessions:
        client.close()
    worklist.close()
