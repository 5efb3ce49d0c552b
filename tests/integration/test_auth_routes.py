"""Access control over real HTTP against a running `triage serve`: every route, the CLI's users and tokens, cookies.

The route list is read from the application, so a new route is covered without editing this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest
from starlette.routing import Mount

from tests.integration.conftest import Server, start_server, stop_server
from triage.config import Settings
from triage.serve.app import create_app

pytestmark = pytest.mark.integration

PUBLIC = {("/healthz", "GET"), ("/readyz", "GET"), ("/login", "GET"), ("/login", "POST")}
API_PREFIXES = ("/api/", "/dicomweb/", "/openapi.json", "/metrics")


def app_routes() -> list[tuple[str, str]]:
    """(path, method) of every route the application serves, read from a fresh app (not started)."""
    routes: list[Any] = list(create_app(Settings()).routes)
    iter_route_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    flat = list(iter_route_contexts(routes)) if iter_route_contexts is not None else routes
    found = set()
    for route in flat:
        if isinstance(getattr(route, "original_route", route), Mount) or route.path == "/static":
            continue
        for method in set(route.methods or {"GET"}) - {"HEAD"}:
            found.add((route.path, method))
    return sorted(found)


def triage_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triage", *args], capture_output=True, text=True, timeout=120, check=True
    )


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("triage-auth") / "data"
    server = start_server(data_dir, runner="inprocess")
    try:
        yield server
    finally:
        stop_server(server)


def test_every_route_refuses_anonymous_requests(auth_server: Server) -> None:
    routes = app_routes()
    assert len(routes) >= 30
    with httpx.Client(base_url=auth_server.url, timeout=30, follow_redirects=False) as client:
        for path, method in routes:
            response = client.request(method, re.sub(r"\{[^}]+\}", "1.2.3.4", path))
            if (path, method) in PUBLIC:
                assert response.status_code in (200, 400, 401), (method, path, response.status_code)
            elif path.startswith(API_PREFIXES):
                assert response.status_code == 401, (method, path, response.status_code)
            else:
                assert response.status_code == 303, (method, path, response.status_code)
                assert response.headers["location"].startswith("/login?next="), (method, path)
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json()["database"] == "ok"


def test_cli_service_token_works_until_the_account_is_disabled(auth_server: Server) -> None:
    data_dir = str(auth_server.data_dir)
    added = triage_cli("users", "add", "pacs-bridge", "--role", "service", "--data-dir", data_dir)
    token = added.stdout.strip().splitlines()[-1]  # the token alone on the last line
    assert re.fullmatch(r"trg_[A-Za-z0-9_-]{20,}", token)
    bearer = {"Authorization": f"Bearer {token}"}
    me = httpx.get(auth_server.url + "/api/v1/me", headers=bearer, timeout=30)
    assert me.json() == {"name": "pacs-bridge", "role": "service"}
    assert httpx.get(auth_server.url + "/api/v1/worklist", headers=bearer, timeout=30).status_code == 200
    # STOW-RS with the token: an empty body is refused as bad input, not as unauthenticated.
    stow = httpx.post(
        auth_server.url + "/dicomweb/studies",
        headers={**bearer, "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
        content=b"--x--\r\n",
        timeout=30,
    )
    assert stow.status_code not in (401, 403)
    # A machine account reads, but claims and reports are for people (no RIS bridge allowed on this server).
    for action in ("claim", "release", "report"):
        refused = httpx.post(f"{auth_server.url}/api/v1/studies/1.2.3.4/{action}", headers=bearer, timeout=30)
        assert refused.status_code == 403, (action, refused.text)
        assert "service account" in refused.json()["detail"]
    assert "pacs-bridge" in triage_cli("users", "list", "--data-dir", data_dir).stdout
    triage_cli("users", "disable", "pacs-bridge", "--data-dir", data_dir)
    assert httpx.get(auth_server.url + "/api/v1/me", headers=bearer, timeout=30).status_code == 401


def test_browser_session_cookie_and_csrf_over_http(auth_server: Server, tmp_path: Path) -> None:
    triage_cli(
        "users", "add", "reader", "--role", "radiologist", "--password", "reader-password-1",
        "--data-dir", str(auth_server.data_dir),
    )  # fmt: skip
    with httpx.Client(base_url=auth_server.url, timeout=30, follow_redirects=False) as client:
        form = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        signed_in = client.post(
            "/login", data={"username": "reader", "password": "reader-password-1", "csrf_token": token}
        )
        assert signed_in.status_code == 303
        cookie = next(c for c in signed_in.headers.get_list("set-cookie") if c.startswith("triage_session="))
        assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
        assert client.get("/api/v1/me").json() == {"name": "reader", "role": "radiologist"}
        page = client.get("/worklist")
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)
        # A state change with the cookie but without the page's CSRF token is refused; with it, it is judged on
        # its merits (the study does not exist).
        assert client.post("/api/v1/studies/1.2.3.4/claim").status_code == 403
        assert client.post("/api/v1/studies/1.2.3.4/claim", headers={"X-CSRF-Token": csrf}).status_code == 404
        session = client.cookies["triage_session"]
        assert client.post("/logout", data={"csrf_token": csrf}).status_code == 303
        client.cookies.set("triage_session", session)  # a copied cookie is worthless after sign-out
        assert client.get("/api/v1/me").status_code == 401


def test_cli_worklist_says_whether_a_token_is_missing_or_refused(auth_server: Server) -> None:
    def worklist(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "TRIAGE_API_TOKEN"}
        command = [sys.executable, "-m", "triage", "worklist", "--url", auth_server.url, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)

    missing = worklist()
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("triage: the server wants an API token: pass --token or set TRIAGE_API_TOKEN")
    assert "triage users add NAME --role service" in missing.stderr
    wrong = worklist("--token", "trg_not-a-real-token-at-all")
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1
    assert wrong.stderr.startswith("triage: the server refused the API token (401)")
    assert "pass --token" not in wrong.stderr
    token = (auth_server.headers or {})["Authorization"].removeprefix("Bearer ")
    right = worklist("--token", token)
    assert right.returncode == 0, right.stderr
    assert "worklist" in right.stdout
