"""The FastAPI application: the service's lifespan, security headers, and the routers (JSON API, DICOMweb, pages).

The HTTP layer is thin: routes live in `triage.serve.routes` (one module per resource), their dependencies in
`triage.serve.deps`, the pages in `triage.serve.web`; the work is done by the layers below.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from triage import __version__
from triage.config import ALL_ROLES, ServiceRole, Settings
from triage.domain import utcnow
from triage.serve import web
from triage.serve.auth import SignInRequired, sign_in_location
from triage.serve.errors import install_error_handlers
from triage.serve.routes import api_router, dicomweb, dicomweb_read, ops
from triage.serve.routes.ops import SWAGGER_ASSETS_DIR, SWAGGER_ASSETS_URL
from triage.serve.service import TriageService
from triage.worklist.accounts import ADMIN_NAME, Accounts, SharedSignInThrottle

# Pages get a strict Content-Security-Policy (no inline script or style).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def open_accounts_for(service: TriageService) -> Accounts:
    """The accounts in the service's database; on first start creates `admin` and prints its password once."""
    settings = service.settings
    accounts = Accounts(service.worklist.engine, timedelta(hours=settings.session_ttl_h))
    password = settings.admin_password or None
    generated = accounts.ensure_admin(utcnow(), password)
    if generated is not None:
        print(
            f"triage: first start: created user {ADMIN_NAME!r} with password: {generated}\n"
            f"triage: this password is shown once; set TRIAGE_ADMIN_PASSWORD before the first start to choose it",
            file=sys.stderr,
            flush=True,
        )
    return accounts


def create_app(
    settings: Settings,
    runner_kind: str = "ray",
    service: TriageService | None = None,
    roles: frozenset[ServiceRole] = ALL_ROLES,
) -> FastAPI:
    """Build the application for `roles`. The service starts with the app (lifespan) and stops with it.

    Every role answers /healthz and /readyz (probes); the api role serves the JSON API, the web pages and the
    documentation; the ingest role serves STOW-RS. Everything but /healthz, /readyz, /login and /static needs a
    signed-in session or an API token.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = service or TriageService(settings, runner_kind=runner_kind, roles=roles)
        app.state.accounts = await asyncio.to_thread(open_accounts_for, app.state.service)
        await asyncio.to_thread(app.state.service.start)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.service.stop)

    app = FastAPI(
        title="triage",
        version=__version__,
        description="AI triage for teleradiology worklists. AI findings are a triage aid, not a diagnosis.",
        lifespan=lifespan,
        # The default documentation routes are public; they are re-added below behind sign-in.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)

    @app.exception_handler(SignInRequired)
    async def to_sign_in(_: Request, exc: SignInRequired) -> RedirectResponse:
        return RedirectResponse(sign_in_location(exc.next_path), status_code=303)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.url.scheme == "https" and settings.http.hsts_max_age_s:
            # Browsers then refuse plain HTTP to this host (RFC 6797): the session cookie never travels in clear.
            response.headers.setdefault("Strict-Transport-Security", f"max-age={settings.http.hsts_max_age_s}")
        # /docs sets its own (see docs_page).
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        return response

    app.include_router(ops.router)
    if ServiceRole.API in roles:
        templates = web.build_templates()
        app.mount(SWAGGER_ASSETS_URL, StaticFiles(directory=str(SWAGGER_ASSETS_DIR)), name="swagger-ui")
        app.mount("/static", StaticFiles(directory=str(web.STATIC_DIR)), name="static")
        # Failed sign-ins are counted in the database, so every API replica sees the same lockout.
        throttle = SharedSignInThrottle(lambda: app.state.accounts.engine)
        app.include_router(web.build_sign_in(templates, throttle))
        app.include_router(web.build_pages(templates))
        app.include_router(api_router())
        # QIDO-RS and WADO-RS read what the worklist and the store hold: the API role answers them.
        app.include_router(dicomweb_read.router)
    if ServiceRole.INGEST in roles:
        app.include_router(dicomweb.router)
    return app
