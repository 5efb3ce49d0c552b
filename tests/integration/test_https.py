"""HTTPS for the API and pages: `triage serve` with a certificate from settings answers over TLS (BCP 195 suites),
sends HSTS and marks the sign-in cookies Secure; plain HTTP on that port gets no answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port
from tests.unit.dicom.test_scp_tls import make_pki

pytestmark = pytest.mark.integration


def test_the_api_and_pages_over_https(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    env = {
        **os.environ,
        "TRIAGE_HTTP__CERTFILE": str(pki["server_cert"]),
        "TRIAGE_HTTP__KEYFILE": str(pki["server_key"]),
    }
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "triage", "serve", "--role", "api", "--http-port", str(port), "--data-dir",
         str(tmp_path / "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=str(pki["ca"]), timeout=5) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    health = client.get(url + "/healthz")
                    break
                except httpx.HTTPError:
                    assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                    time.sleep(1)
            assert health.status_code == 200
            assert health.headers["Strict-Transport-Security"].startswith("max-age=")
            login = client.get(url + "/login")
            assert "secure" in login.headers["set-cookie"].lower()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        log.close()
