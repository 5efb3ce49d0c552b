"""The FastAPI application: thin routes over the service, the worklist and the DICOMweb boundary."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import fastapi_offline
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from triage import __version__
from triage.config import ALL_ROLES, ServiceRole, Settings
from triage.dicom.stow import refusal_for_content_type, stow_instances
from triage.domain import utcnow
from triage.serve import web
from triage.serve.auth import (
    HUMAN_ROLES,
    RIS_BRIDGE,
    SignInRequired,
    current_user,
    page_user,
    require_reporter,
    require_roles,
    sign_in_location,
)
from triage.serve.errors import install_error_handlers
from triage.serve.service import TriageService
from triage.worklist.accounts import (
    ADMIN_NAME,
    Accounts,
    Role,
    SharedSignInThrottle,
    User,
)
from triage.worklist.priority import may_raise


def get_service(request: Request) -> TriageService:
    service: TriageService = request.app.state.service
    return service


Service = Annotated[TriageService, Depends(get_service)]


CurrentUser = Annotated[User, Depends(current_user)]
Human = Annotated[User, Depends(require_roles(*HUMAN_ROLES, action="give feedback on AI findings"))]
# Claims are for people: a machine that claims a study takes it away from every radiologist.
Claimant = Annotated[User, Depends(require_roles(*HUMAN_ROLES, action="claim or release studies"))]
# People, and a service account only where the site lets its RIS bridge mark studies reported.
Reporter = Annotated[User, Depends(require_reporter)]
Admin = Annotated[User, Depends(require_roles(Role.ADMIN))]
Exporter = Annotated[User, Depends(require_roles(Role.ADMIN, Role.SERVICE))]


class ActionResult(BaseModel):
    study_uid: str
    action: str
    user: str


class Me(BaseModel):
    name: str
    role: str


class FeedbackIn(BaseModel):
    """Feedback on finding number `finding` of the study, or a finding the AI missed (verdict "missed" + label)."""

    verdict: Literal["agree", "disagree", "missed"]
    finding: int | None = Field(default=None, description="Index into the study's findings (agree, disagree)")
    label: str = Field(default="", description="The missed finding's label (missed only)")
    model: str = Field(default="", description="The model (missed: the one that missed it; else checked)")
    model_version: str = Field(default="", description="Optional check that the finding is still this version's")
    comment: str = ""


class FeedbackOut(BaseModel):
    study_uid: str
    label: str
    verdict: str
    model: str
    model_version: str
    truth: int


def audit(request: Request, user: User, action: str, study_uid: str | None = None, **detail: Any) -> None:
    accounts: Accounts = request.app.state.accounts
    accounts.audit(user.name, action, utcnow(), study_uid, detail)


def build_api() -> APIRouter:
    api = APIRouter(prefix="/api/v1", tags=["worklist"], dependencies=[Depends(current_user)])

    @api.get("/worklist", summary="The worklist, highest priority first")
    def worklist(
        service: Service,
        status: Annotated[
            str | None, Query(description="AI status: pending, analysing, done, failed, not-applicable")
        ] = None,
        modality: Annotated[str | None, Query(description="Modality, e.g. CT, CR, DX")] = None,
        level: Annotated[str | None, Query(description="Priority level: stat, urgent, routine")] = None,
        site: str | None = None,
        accession: str | None = None,
        include_reported: bool = False,
        limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many studies (a page)")] = 100,
        offset: Annotated[int, Query(ge=0, description="Skip this many studies of the order first")] = 0,
    ) -> list[dict[str, Any]]:
        try:
            items = service.worklist.list_worklist(
                utcnow(),
                status=status,
                modality=modality,
                level=level,
                site=site,
                accession=accession,
                include_reported=include_reported,
                limit=limit,
                offset=offset,
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        return [item.to_dict() for item in items]

    @api.get("/me", response_model=Me, summary="Who the credentials belong to")
    def me(user: CurrentUser) -> Me:
        return Me(name=user.name, role=user.role.value)

    @api.get("/studies/{study_uid}", summary="One study with its series, routing and findings")
    def study(study_uid: str, service: Service, user: CurrentUser, request: Request) -> dict[str, Any]:
        detail = service.worklist.get_study(study_uid, utcnow()).to_dict()
        audit(request, user, "view", study_uid, via="api")
        return detail

    @api.get(
        "/studies/{study_uid}/preview.png",
        summary="Key slice or radiograph with the AI region drawn over it (not for diagnostic use)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def preview(
        study_uid: str,
        request: Request,
        user: CurrentUser,
        finding: Annotated[int | None, Query(description="Index into the study's findings")] = None,
    ) -> Response:
        response = web.preview_response(request, study_uid, finding)
        audit(request, user, "view-image", study_uid, finding=finding)
        return response

    @api.post("/studies/{study_uid}/claim", response_model=ActionResult, summary="Claim a study to report it (people)")
    def claim(study_uid: str, service: Service, user: Claimant, request: Request) -> ActionResult:
        service.worklist.claim(study_uid, user.name, utcnow())
        audit(request, user, "claim", study_uid, via="api")
        return ActionResult(study_uid=study_uid, action="claim", user=user.name)

    @api.post("/studies/{study_uid}/release", response_model=ActionResult, summary="Give a claim back (people)")
    def release(study_uid: str, service: Service, user: Claimant, request: Request) -> ActionResult:
        # Only the claimant or an admin may release a claim; the worklist raises ConflictError (409) otherwise.
        service.worklist.release(study_uid, user.name, is_admin=user.is_admin, now=utcnow())
        audit(request, user, "release", study_uid, via="api")
        return ActionResult(study_uid=study_uid, action="release", user=user.name)

    @api.post(
        "/studies/{study_uid}/report",
        response_model=ActionResult,
        summary="Mark a study reported (people; a RIS bridge's service account where TRIAGE_RIS_BRIDGE_MAY_REPORT)",
    )
    def report(study_uid: str, service: Service, user: Reporter, request: Request) -> ActionResult:
        now = utcnow()
        if user.role == Role.SERVICE:
            # A RIS bridge relays a report signed in the RIS: a claim still held here is moot, so it is given
            # back first (recorded), else the reported study would stay claimed and listed.
            claimed_by = service.worklist.get_study(study_uid, now).item.claimed_by
            if claimed_by is not None and claimed_by != user.name:
                service.worklist.release(study_uid, user.name, is_admin=True, now=now)
            service.worklist.mark_reported(study_uid, user.name, now)
            audit(
                request, user, "report", study_uid, via="api", account="service", acting_as=RIS_BRIDGE,
                released_claim_of=claimed_by,
            )  # fmt: skip
        else:
            service.worklist.mark_reported(study_uid, user.name, now)
            audit(request, user, "report", study_uid, via="api")
        return ActionResult(study_uid=study_uid, action="report", user=user.name)

    @api.post("/studies/{study_uid}/feedback", response_model=FeedbackOut, status_code=201)
    def feedback(study_uid: str, body: FeedbackIn, user: Human, request: Request) -> FeedbackOut:
        entry = web.record_feedback(
            request,
            study_uid,
            user,
            body.verdict,
            body.finding,
            body.label,
            body.model,
            body.comment,
            body.model_version,
        )
        return FeedbackOut(
            study_uid=study_uid,
            label=entry.label,
            verdict=entry.verdict.value,
            model=entry.model,
            model_version=entry.model_version,
            truth=entry.truth,
        )

    @api.get(
        "/feedback/labels.csv",
        summary="Feedback as a label CSV for the training tools (image, label 0/1, ...)",
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}}},
    )
    def feedback_labels(
        service: Service,
        user: Exporter,
        request: Request,
        model: Annotated[str | None, Query(description="Only feedback on this model's findings")] = None,
        label: Annotated[str | None, Query(description="Only this finding label")] = None,
    ) -> Response:
        body = web.export_labels(request.app.state.accounts, service.worklist.engine, model, label)
        audit(request, user, "export-feedback", None, model=model, label=label)
        return Response(
            body, media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="triage-labels.csv"'}
        )

    @api.post(
        "/studies/{study_uid}/requeue",
        response_model=ActionResult,
        summary="Queue a study for a fresh AI analysis now (admins; audited)",
    )
    def requeue(study_uid: str, service: Service, user: Admin, request: Request) -> ActionResult:
        service.requeue(study_uid, user=user.name)
        audit(request, user, "requeue", study_uid, via="api")
        return ActionResult(study_uid=study_uid, action="requeue", user=user.name)

    @api.get("/audit", summary="The audit log, newest first (admins)")
    def audit_log(
        user: Admin,
        request: Request,
        who: str | None = None,
        action: str | None = None,
        study_uid: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        accounts: Accounts = request.app.state.accounts
        entries = accounts.audit_entries(limit, offset, user=who, action=action, study_uid=study_uid)
        return [
            {"at": e.at.isoformat(), "user": e.user, "action": e.action, "study_uid": e.study_uid, "detail": e.detail}
            for e in entries
        ]

    @api.get("/models", summary="Installed models with their cards")
    def models(service: Service) -> list[dict[str, Any]]:
        return [
            {
                "name": m.card.name,
                "version": m.card.version,
                "task": m.card.task,
                "synthetic": m.card.synthetic,
                # Whether its flags may raise a study's priority at this site (a synthetic-data model only
                # where the site names it in priority.unvalidated_models_may_raise).
                "raises_priority": may_raise(m.card.name, m.card.synthetic, service.settings.priority),
                "summary": m.card.summary,
                "licence": m.card.licence,
                "error": service.unavailable.get(m.card.name),
                # Each inference worker's process and node at the last health probe (Ray runner).
                "workers": getattr(service.runner, "worker_info", {}).get(m.card.name, []),
            }
            for m in service.registry.all()
        ]

    @api.get("/events", summary="Server-sent events: one per worklist change")
    async def events(service: Service, request: Request) -> StreamingResponse:
        subscription = service.events.subscribe()

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b": connected\n\n"
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.wait_for(subscription.get(), timeout=15)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n".encode()
            finally:
                subscription.close()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    return api


logger = logging.getLogger(__name__)

# Spooled request bytes are written to the temporary file in pieces of this size, off the event loop.
_STOW_SPOOL_WRITE_BYTES = 1 << 20


def _stow_too_large(limit: int) -> JSONResponse:
    """413 for a STOW-RS body over the limit; the connection is closed since the rest of the body is not read."""
    return JSONResponse(
        {
            "error": f"the request body is larger than the STOW-RS limit of {limit} bytes "
            "(setting dicomweb.stow_max_body_bytes, TRIAGE_DICOMWEB__STOW_MAX_BODY_BYTES); "
            "send the instances in several requests"
        },
        status_code=413,
        headers={"Connection": "close"},
    )


async def _spool_request_body(request: Request, sink: IO[bytes], limit: int) -> bool:
    """Copy the request body into `sink` as it arrives; False as soon as it grows past `limit` bytes.

    Chunked uploads carry no Content-Length, so the limit is enforced while reading, not only up front.
    """
    received = 0
    pending = bytearray()
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            return False
        pending += chunk
        if len(pending) >= _STOW_SPOOL_WRITE_BYTES:
            await asyncio.to_thread(sink.write, pending)
            pending = bytearray()
    if pending:
        await asyncio.to_thread(sink.write, pending)
    return True


def build_dicomweb() -> APIRouter:
    web = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(current_user)])

    @web.post(
        "/studies",
        summary='STOW-RS: store instances (multipart/related; type="application/dicom")',
        response_class=JSONResponse,
    )
    async def stow(request: Request, service: Service) -> Response:
        settings = service.settings
        limit = settings.dicomweb.stow_max_body_bytes
        content_type = request.headers.get("content-type", "")
        # Refused before the body is read (a client sending Expect: 100-continue has not sent it yet).
        refused = refusal_for_content_type(content_type)
        if refused is not None:
            return JSONResponse(refused[1], status_code=refused[0], headers={"Connection": "close"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _stow_too_large(limit)
        spool_dir = settings.data_dir / "tmp"
        base_url = str(request.base_url).rstrip("/") + "/dicomweb"
        # The body goes to a file (unlinked on creation, so a crash leaves nothing behind) and the parts are read
        # from it one at a time: memory stays about one instance, whatever the size of the request.
        try:
            await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
            with tempfile.SpooledTemporaryFile(
                max_size=settings.dicomweb.stow_spool_memory_bytes, dir=str(spool_dir)
            ) as body:
                if not await _spool_request_body(request, body, limit):
                    return _stow_too_large(limit)
                status, payload = await asyncio.to_thread(stow_instances, body, content_type, service.store, base_url)
        except ClientDisconnect:
            return JSONResponse({"error": "the client closed the connection before the body was complete"}, 400)
        except OSError as exc:  # the disk under data_dir is full or unwritable: nothing was stored, try later
            logger.error("STOW-RS request not spooled to %s: %s: %s", spool_dir, type(exc).__name__, exc)
            return JSONResponse(
                {"error": f"the request could not be received ({type(exc).__name__}: out of disk space?); try again"},
                status_code=503,
                headers={"Retry-After": "60", "Connection": "close"},
            )
        return JSONResponse(payload, status_code=status, media_type="application/dicom+json")

    return web


# Pages get a strict Content-Security-Policy (no inline script or style).
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
# Swagger UI's files, served from the installed fastapi-offline package: a hospital network is often offline, and
# /docs must not load scripts from a CDN. Mounted before /static, which would otherwise match the prefix.
SWAGGER_ASSETS_URL = "/static/swagger-ui"
SWAGGER_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


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
        # /docs sets its own (see docs_page).
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        return response

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Database, DICOM listener and models are ready")
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

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(current_user)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    if ServiceRole.API in roles:

        @app.get("/docs", include_in_schema=False, dependencies=[Depends(page_user)])
        def docs() -> HTMLResponse:
            return docs_page()

        templates = web.build_templates()
        app.mount(SWAGGER_ASSETS_URL, StaticFiles(directory=str(SWAGGER_ASSETS_DIR)), name="swagger-ui")
        app.mount("/static", StaticFiles(directory=str(web.STATIC_DIR)), name="static")
        # Failed sign-ins are counted in the database, so every API replica sees the same lockout.
        throttle = SharedSignInThrottle(lambda: app.state.accounts.engine)
        app.include_router(web.build_sign_in(templates, throttle))
        app.include_router(web.build_pages(templates))
        app.include_router(build_api())
    if ServiceRole.INGEST in roles:
        app.include_router(build_dicomweb())
    return app
