"""Operations: liveness and readiness probes (public), and the API documentation (signed in, served offline)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from triage.serve.auth import current_user, page_user
from triage.serve.deps import Service
from triage.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

# Swagger UI's files, served from the installed fastapi-offline package: a hospital network is often offline, and
# /docs must not load scripts from a CDN. Mounted before /static, which would otherwise match the prefix.
SWAGGER_ASSETS_URL = "/static/swagger-ui"
SWAGGER_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(tags=["ops"])


def docs_page() -> HTMLResponse:
    """Swagger UI on local assets, with a CSP that runs only our scripts and the page's own start-up script.

    The start-up script is inline (FastAPI writes it), so it is allowed by its sha256 rather than by
    'unsafe-inline'; Swagger UI sets inline styles, which CSP then has to allow.
    """
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="triage API",
        swagger_js_url=f"{SWAGGER_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_ASSETS_URL}/favicon.png",
        # No badge from the public validator service: nothing leaves the site.
        swagger_ui_parameters={"validatorUrl": None},
    )
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(bytes(page.body))
    )
    page.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        f"script-src 'self' {hashes}; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
        "base-uri 'none'"
    )
    return page


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database, DICOM listener and models are ready")
def readyz(service: Service) -> JSONResponse:
    info = service.health()
    try:
        ping = getattr(service.worklist, "ping", None)
        if ping is not None:
            ping()
        else:
            with service.worklist.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        info["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        info["database"] = f"error: {type(exc).__name__}"
        info["ready"] = False
    return JSONResponse(info, status_code=200 if info["ready"] else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics: each model's flag rate and studies per site, open drift alerts",
    dependencies=[Depends(current_user)],
    response_class=Response,
)
def metrics(service: Service) -> Response:
    return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(current_user)])
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[Depends(page_user)])
def docs() -> HTMLResponse:
    return docs_page()
