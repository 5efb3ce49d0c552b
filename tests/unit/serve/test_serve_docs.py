"""The API documentation at /docs works without internet: every asset is served by triage itself, under a CSP
that runs only those scripts."""

from __future__ import annotations

import base64
import hashlib
import re

from serve_site import Site


def test_docs_reference_only_local_assets_that_are_served(site: Site) -> None:
    site.sign_in()
    page = site.client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert urls, page.text
    assert "://" not in page.text.replace("http-equiv", "")  # no CDN, no absolute URL of any host
    for url in urls:
        assert url.startswith("/"), url
    kinds = {}
    for url in urls:
        asset = site.client.get(url)
        assert asset.status_code == 200, url
        kinds[url.rsplit(".", 1)[-1]] = asset.headers["content-type"]
        assert len(asset.content) > 1000, url
    assert "javascript" in kinds["js"] and "text/css" in kinds["css"] and kinds["png"] == "image/png"
    assert "SwaggerUIBundle" in site.client.get("/static/swagger-ui/swagger-ui-bundle.js").text


def test_docs_csp_runs_only_local_scripts_and_the_pages_own_start_up_script(site: Site) -> None:
    site.sign_in()
    page = site.client.get("/docs")
    directives = (d.strip() for d in page.headers["content-security-policy"].split(";"))
    csp = {name: value for name, _, value in (d.partition(" ") for d in directives)}
    (inline,) = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert csp["script-src"] == f"'self' 'sha256-{digest}'"
    assert "unsafe-eval" not in page.headers["content-security-policy"]
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "validatorUrl" in inline and "null" in inline  # no badge from the public validator service
    # The rest of the site keeps its strict policy.
    worklist = site.client.get("/worklist")
    assert "script-src 'self';" in worklist.headers["content-security-policy"]


def test_openapi_is_served_to_signed_in_users_and_lists_the_routes(site: Site) -> None:
    assert site.client.get("/openapi.json").status_code == 401
    site.sign_in()
    spec = site.client.get("/openapi.json").json()
    assert "/api/v1/studies/{study_uid}/report" in spec["paths"]
