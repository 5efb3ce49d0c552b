"""Without a session or token, every route answers 401 (API) or redirects to sign-in (pages); wrong credentials too.

The routes are read from the application itself, so a route added later is covered without editing this test.
"""

from __future__ import annotations

import re
from typing import Any

import fastapi.routing
import pytest
from serve_site import Site
from starlette.routing import Mount

PUBLIC = {("/healthz", "GET"), ("/readyz", "GET"), ("/login", "GET"), ("/login", "POST")}
API_PREFIXES = ("/api/", "/dicomweb/", "/openapi.json", "/metrics")


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1.2.3.4", path)


def flat_routes(routes: list[Any]) -> list[Any]:
    """Every route with its full path; FastAPI >= 0.160 keeps included routers as wrappers in `app.routes`."""
    iter_route_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(iter_route_contexts(routes)) if iter_route_contexts is not None else list(routes)


def routes(site: Site) -> list[tuple[str, str]]:
    found = []
    for route in flat_routes(site.client.app.routes):  # type: ignore[attr-defined]
        if isinstance(getattr(route, "original_route", route), Mount) or route.path == "/static":
            continue
        methods = route.methods or {"GET"}
        for method in sorted(set(methods) - {"HEAD"}):
            found.append((route.path, method))
    return sorted(set(found))


def test_the_app_has_the_routes_this_test_is_about(site: Site) -> None:
    paths = {path for path, _ in routes(site)}
    for expected in (
        "/worklist",
        "/studies/{study_uid}",
        "/api/v1/worklist",
        "/api/v1/events",
        "/dicomweb/studies",
        "/admin/audit",
        "/api/v1/studies/{study_uid}/preview.png",
        "/docs",
        "/openapi.json",
    ):
        assert expected in paths


@pytest.mark.parametrize("credentials", ["none", "bad-token", "bad-cookie"])
def test_every_route_refuses_without_valid_credentials(site: Site, credentials: str) -> None:
    client = site.client
    headers = {"Authorization": "Bearer trg_not-a-token"} if credentials == "bad-token" else {}
    if credentials == "bad-cookie":
        client.cookies.set("triage_session", "forged")
    checked = 0
    for path, method in routes(site):
        if (path, method) in PUBLIC:
            continue
        response = client.request(method, concrete(path), headers=headers, follow_redirects=False)
        checked += 1
        if path.startswith(API_PREFIXES):
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.headers["www-authenticate"].startswith("Bearer")
        else:
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["location"].startswith("/login?next="), (method, path)
    assert checked >= 20


def test_public_routes_answer_without_credentials(site: Site) -> None:
    assert site.client.get("/healthz").status_code == 200
    assert site.client.get("/readyz").status_code == 200
    assert site.client.get("/login").status_code == 200
    assert site.client.get("/static/triage.css").status_code == 200


def test_redirect_remembers_the_page_asked_for(site: Site) -> None:
    response = site.client.get("/worklist?level=stat", follow_redirects=False)
    assert response.headers["location"] == "/login?next=/worklist%3Flevel%3Dstat"
