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


def _schema(spec: dict, response: dict) -> dict:
    """The component a response's JSON schema refers to (directly or as the items of an array)."""
    schema = response["content"]["application/json"]["schema"]
    ref = schema.get("items", schema)["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def test_openapi_documents_the_worklist_item_the_study_and_the_finding(site: Site) -> None:
    site.sign_in()
    spec = site.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    worklist = spec["paths"]["/api/v1/worklist"]["get"]["responses"]["200"]
    assert worklist["content"]["application/json"]["schema"]["type"] == "array"
    item = _schema(spec, worklist)
    assert {"study_uid", "accession_number", "priority", "findings", "ai_status", "claimed_by"} <= set(
        item["properties"]
    )
    study = _schema(spec, spec["paths"]["/api/v1/studies/{study_uid}"]["get"]["responses"]["200"])
    assert {"series", "analyses", "history", "findings", "priority"} <= set(study["properties"])
    # Each analysis run says how it went, when, and which process ran it ("analysed exactly once" from outside).
    run = schemas[study["properties"]["analyses"]["items"]["$ref"].rsplit("/", 1)[-1]]
    assert {"status", "started_at", "finished_at", "worker", "attempt", "generation", "reason", "stages"} <= set(
        run["properties"]
    )
    finding = schemas[item["properties"]["findings"]["items"]["$ref"].rsplit("/", 1)[-1]]
    assert set(finding["properties"]) == {
        "label", "probability", "flagged", "model", "model_version", "synthetic", "shadow", "details", "series_uid",
        "overlay_sop_instance_uid", "overlay_file", "segmentation_file",
    }  # fmt: skip
    assert set(finding["required"]) == {"label", "probability", "flagged", "model", "model_version", "synthetic"}
    models = _schema(spec, spec["paths"]["/api/v1/models"]["get"]["responses"]["200"])
    assert {"raises_priority", "states", "validation"} <= set(models["properties"])
