"""Fixtures that start the real thing: a `triage serve` process with its DICOM listener and a local Ray instance."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from triage.config import Settings
from triage.dicom.dcmtk import DCMTK_ENV, find_dcmtk
from triage.worklist.accounts import add_user

REPO = Path(__file__).resolve().parents[2]
HEAD_CT = REPO / "tests" / "data" / "ct-head-ge"


def study_lines(items: list[dict]) -> str:
    """One line per study: UID, AI status and the reason, so a failure says why a study was not analysed."""
    lines = [
        f"  {i.get('study_uid')}: ai_status={i.get('ai_status')} ai_reason={i.get('ai_reason') or '-'}" for i in items
    ]
    return "\n".join(lines) or "  (no studies on the worklist)"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that is free now and outside the kernel's ephemeral range.

    A port the kernel handed out for bind(0) comes from the range it also gives outgoing connections, so while a
    server starts (Ray opens many connections) another socket can take it first: the server then died with
    "address already in use". Below the range only listeners compete, and start_server retries anyway.
    """
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    dicom_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def storescu(self, *paths: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Send files or folders with dcmtk's storescu, the real DICOM client."""
        command = [
            find_dcmtk("storescu") or "storescu",
            "-aec",
            "TRIAGE",
            "-aet",
            "CI-MODALITY",
            "+sd",
            "+r",
            "+sp",
            "*.dcm",  # the folder also holds the licence and README
            "127.0.0.1",
            str(self.dicom_port),
            *map(str, paths),
        ]
        env = {**os.environ, **DCMTK_ENV}
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=300, env=env)

    def get(self, path: str, **params: object) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=30, headers=self.headers)

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        headers = {**(self.headers or {}), **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        return httpx.post(self.url + path, timeout=60, headers=headers, **kwargs)  # type: ignore[arg-type]

    headers: dict[str, str] | None = None

    def worklist(self) -> list[dict]:
        response = self.get("/api/v1/worklist", include_reported=True, limit=10_000)  # the route pages (100)
        response.raise_for_status()
        return response.json()

    def wait_for(self, predicate, timeout_s: float = 600, what: str = "condition"):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        items: list[dict] = []
        while time.monotonic() < deadline:
            items = self.worklist()
            value = predicate(items)
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited ({self.proc.returncode}); log:\n{self.log_path.read_text()[-4000:]}"
                )
            time.sleep(1)
        raise AssertionError(
            f"timed out waiting for {what}; studies:\n{study_lines(items)}\nlog:\n{self.log_path.read_text()[-4000:]}"
        )


def promote_for_tests(
    data_dir: Path, model: str, site: str = "", version: str = "1.0.0", env: dict[str, str] | None = None
) -> str:
    """Activate `model` at `site` through the real gate (`triage models promote`), on a report that stands in for
    a site's local validation: these tests' studies are synthetic and carry no institution (site "").

    Returns:
        What the command printed.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    report = data_dir.parent / f"validation-{model}.json"
    report.write_text(
        json.dumps(
            {
                "model": model, "version": version, "site": site, "threshold": None,
                "note": "test fixture standing in for a local validation report",
                "n": 200, "n_positive": 100, "roc_auc": 0.97, "sensitivity": 0.92, "sensitivity_ci95": [0.86, 0.96],
                "specificity": 0.95, "specificity_ci95": [0.9, 0.98],
            }
        )
    )  # fmt: skip
    command = [sys.executable, "-m", "triage", "models", "promote", model, "--site", site, "--report", str(report),
               "--data-dir", str(data_dir), "--version", version]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {}), "TRIAGE_OPERATOR": "tests"}
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def start_server(
    data_dir: Path,
    extra_env: dict[str, str] | None = None,
    runner: str = "ray",
    roles: tuple[str, ...] = (),
    token: str | None = None,
    name: str | None = None,
) -> Server:
    """Start `triage serve` (all roles, or `roles`) and wait until /readyz says ready.

    A service account's API token is created for the tests unless `token` is given (processes sharing one
    database share one token). With TRIAGE_DATABASE_URL in `extra_env` the process uses that database.
    A start that lost its port to another process (it exits "address already in use") is tried again on new ports.
    """
    if token is None:
        # The API needs a signed-in user or an API token: the tests act as a service account.
        settings = Settings()
        settings.data_dir = data_dir
        database_url = (extra_env or {}).get("TRIAGE_DATABASE_URL") or os.environ.get("TRIAGE_DATABASE_URL")
        if database_url:
            settings.database_url = database_url
        _, token = add_user(settings, "ci-service", "service")
    for attempt in range(3):
        try:
            return _start_server(data_dir, extra_env, runner, roles, token, name)
        except _PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _PortTaken(AssertionError):
    pass


def _start_server(
    data_dir: Path,
    extra_env: dict[str, str] | None,
    runner: str,
    roles: tuple[str, ...],
    token: str,
    name: str | None,
) -> Server:
    if find_dcmtk("storescu") is None:
        pytest.fail("dcmtk's storescu is required for integration tests (apt-get install dcmtk)")
    http_port, dicom_port = free_port(), free_port()
    env = {**os.environ, "TRIAGE_DICOM__STABLE_AGE_S": "2", **(extra_env or {})}
    log_path = data_dir.parent / f"{name or data_dir.name}-server.log"
    command = [
        sys.executable,
        "-m",
        "triage",
        "serve",
        "--http-port",
        str(http_port),
        "--dicom-port",
        str(dicom_port),
        "--data-dir",
        str(data_dir),
        "--runner",
        runner,
        *(arg for role in roles for arg in ("--role", role)),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{http_port}", dicom_port, data_dir, log_path, proc)
    server.headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-4000:]
            if "address already in use" in tail.lower():
                raise _PortTaken(f"server exited ({proc.returncode}), its port was taken:\n{tail}")
            raise AssertionError(f"server exited ({proc.returncode}):\n{tail}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise AssertionError(f"server not ready in time:\n{log_path.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("triage") / "data"
    srv = start_server(data_dir)
    try:
        yield srv
    finally:
        stop_server(srv)
