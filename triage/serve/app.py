"""The FastAPI application: thin routes over the service, the worklist and the DICOMweb boundary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from triage import __version__
from triage.config import Settings
from triage.dicom.stow import stow_instances
from triage.serve.auth import current_user
from triage.serve.errors import install_error_handlers
from triage.serve.service import TriageService


def utcnow() -> datetime:
    return datetime.now(UTC)


def get_service(request: Request) -> TriageService:
    service: TriageService = request.app.state.service
    return service


Service = Annotated[TriageService, Depends(get_service)]


User = Annotated[str, Depends(current_user)]


class ActionResult(BaseModel):
    study_uid: str
    action: str
    user: str


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
    ) -> list[dict[str, Any]]:
        items = service.worklist.list_worklist(
            utcnow(),
            status=status,
            modality=modality,
            level=level,
            site=site,
            accession=accession,
            include_reported=include_reported,
        )
        return [item.to_dict() for item in items]

    @api.get("/studies/{study_uid}", summary="One study with its series, routing and findings")
    def study(study_uid: str, service: Service) -> dict[str, Any]:
        return service.worklist.get_study(study_uid, utcnow()).to_dict()

    @api.post("/studies/{study_uid}/claim", response_model=ActionResult)
    def claim(study_uid: str, service: Service, user: User) -> ActionResult:
        service.worklist.claim(study_uid, user, utcnow())
        return ActionResult(study_uid=study_uid, action="claim", user=user)

    @api.post("/studies/{study_uid}/release", response_model=ActionResult)
    def release(study_uid: str, service: Service, user: User) -> ActionResult:
        service.worklist.release(study_uid, user, is_admin=False)
        return ActionResult(study_uid=study_uid, action="release", user=user)

    @api.post("/studies/{study_uid}/report", response_model=ActionResult)
    def report(study_uid: str, service: Service, user: User) -> ActionResult:
        service.worklist.mark_reported(study_uid, user, utcnow())
        return ActionResult(study_uid=study_uid, action="report", user=user)

    @api.get("/models", summary="Installed models with their cards")
    def models(service: Service) -> list[dict[str, Any]]:
        return [
            {
                "name": m.card.name,
                "version": m.card.version,
                "task": m.card.task,
                "synthetic": m.card.synthetic,
                "summary": m.card.summary,
                "licence": m.card.licence,
                "error": service.model_errors.get(m.card.name),
            }
            for m in service.registry.all()
        ]

    @api.get("/events", summary="Server-sent events: one per worklist change")
    async def events(service: Service, request: Request) -> StreamingResponse:
        queue = service.events.subscribe(asyncio.get_running_loop())

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield b": connected\n\n"
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=15)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n".encode()
            finally:
                service.events.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return api


def build_dicomweb() -> APIRouter:
    web = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(current_user)])

    @web.post(
        "/studies",
        summary='STOW-RS: store instances (multipart/related; type="application/dicom")',
        response_class=JSONResponse,
    )
    async def stow(request: Request, service: Service) -> Response:
        body = await request.body()
        base_url = str(request.base_url).rstrip("/") + "/dicomweb"
        status, payload = await asyncio.to_thread(
            stow_instances, body, request.headers.get("content-type", ""), service.store, base_url
        )
        return JSONResponse(payload, status_code=status, media_type="application/dicom+json")

    return web


def create_app(settings: Settings, runner_kind: str = "ray", service: TriageService | None = None) -> FastAPI:
    """Build the application. The service starts with the app (lifespan) and stops with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = service or TriageService(settings, runner_kind=runner_kind)
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
    )
    install_error_handlers(app)

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Database, DICOM listener and models are ready")
    def readyz(service: Service) -> JSONResponse:
        info = service.health()
        try:
            service.worklist.ping()
            info["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            info["database"] = f"error: {type(exc).__name__}"
            info["ready"] = False
        return JSONResponse(info, status_code=200 if info["ready"] else 503)

    app.include_router(build_api())
    app.include_router(build_dicomweb())
    return app
