"""GET /api/v1/events: server-sent events, one per worklist change, of the studies the user may read."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from triage.errors import NotFoundError, NotPermittedError
from triage.serve.deps import CurrentUser, Service
from triage.serve.visibility import scope_of
from triage.worklist.repository import ReadScope

router = APIRouter(tags=["worklist"])

# A radiologist's scope is looked up again this often while the stream is open (a privilege granted, revoked or
# expired at midnight applies without reconnecting).
SCOPE_REFRESH_S = 30.0


@router.get("/events", summary="Server-sent events: one per worklist change of a study you may read")
async def events(service: Service, request: Request, user: CurrentUser) -> StreamingResponse:
    subscription = service.events.subscribe()
    worklist, settings = service.worklist, service.settings

    def readable(study_uid: str, scope: ReadScope) -> bool:
        try:
            worklist.check_scope(study_uid, scope)
        except (NotFoundError, NotPermittedError):
            return False
        return True

    async def visible(event: dict[str, Any], scope: ReadScope | None) -> bool:
        # A radiologist hears only of studies of sites they may read: a study's UID is not news for others.
        if scope is None:
            return True
        study_uid = event.get("study_uid")
        if not study_uid:
            return True
        return await asyncio.to_thread(readable, str(study_uid), scope)

    async def stream() -> AsyncIterator[bytes]:
        scope, scoped_at = None, -SCOPE_REFRESH_S
        try:
            yield b": connected\n\n"
            while not await request.is_disconnected():
                try:
                    event = await asyncio.wait_for(subscription.get(), timeout=15)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if time.monotonic() - scoped_at >= SCOPE_REFRESH_S:
                    scope = await asyncio.to_thread(scope_of, user, worklist, settings)
                    scoped_at = time.monotonic()
                if not await visible(event, scope):
                    continue
                yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n".encode()
        finally:
            subscription.close()

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
