"""POST /dicomweb/studies: STOW-RS (PS3.18 10.5), split into parts as it arrives and stored one instance at a time."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from triage.dicom.stow import MultipartRelatedReceiver, refusal_for_content_type, store_received
from triage.errors import InvalidStudyError
from triage.serve.auth import current_user
from triage.serve.deps import CurrentUser, Service
from triage.worklist.sites import STOW_PREFIX

logger = logging.getLogger(__name__)

# Request bytes are handed to the multipart parser in pieces of about this size, off the event loop.
_STOW_FEED_BYTES = 1 << 20


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


async def _receive_request_body(request: Request, receiver: MultipartRelatedReceiver, limit: int) -> bool:
    """Feed the request body to `receiver` as it arrives; False as soon as it grows past `limit` bytes.

    Chunked uploads carry no Content-Length, so the limit is enforced while reading, not only up front.

    Raises:
        InvalidStudyError: the multipart framing is broken (the rest of the body is not read).
        ClientDisconnect: the client went away before the body was complete.
        OSError: a part could not be spooled to disk.
    """
    received = 0
    pending = bytearray()
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            return False
        pending += chunk
        if len(pending) >= _STOW_FEED_BYTES:
            await asyncio.to_thread(receiver.feed, bytes(pending))
            pending.clear()
    if pending:
        await asyncio.to_thread(receiver.feed, bytes(pending))
    return True


router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(current_user)])


@router.post(
    "/studies",
    summary='STOW-RS: store instances (multipart/related; type="application/dicom")',
    response_class=JSONResponse,
)
async def stow(request: Request, service: Service, user: CurrentUser) -> Response:
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
    # The body is split into its parts as it arrives, each part to its own spooled file (unlinked on creation, so
    # a crash leaves nothing behind); once the closing delimiter is in, the parts are stored one at a time:
    # memory stays about one instance, whatever the size of the request.
    try:
        await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
        with MultipartRelatedReceiver(
            content_type, spool_dir=spool_dir, spool_memory_bytes=settings.dicomweb.stow_spool_memory_bytes
        ) as receiver:
            if not await _receive_request_body(request, receiver, limit):
                return _stow_too_large(limit)
            parts = receiver.finish()
            # The account names the sender: a site registered with this STOW-RS account claims the studies.
            source = f"{STOW_PREFIX}{user.name}"
            status, payload = await asyncio.to_thread(store_received, parts, service.store, base_url, source=source)
    except InvalidStudyError as exc:  # broken multipart framing, a truncated body: nothing was stored
        return JSONResponse({"error": str(exc)}, status_code=400, headers={"Connection": "close"})
    except ClientDisconnect:
        return JSONResponse({"error": "the client closed the connection before the body was complete"}, 400)
    except OSError as exc:  # the disk under data_dir is full or unwritable: nothing was stored, try later
        logger.error("STOW-RS request not spooled to %s: %s: %s", spool_dir, type(exc).__name__, exc)
        return JSONResponse(
            {"error": f"the request could not be received ({type(exc).__name__}: out of disk space?); try again"},
            status_code=503,
            headers={"Retry-After": "60", "Connection": "close"},
        )
    _count(service, payload)
    return JSONResponse(payload, status_code=status, media_type="application/dicom+json")


def _count(service: Any, payload: dict[str, Any]) -> None:
    """Instances stored and refused (by PS3.18 failure reason) in one STOW-RS response, for /metrics."""
    metrics = service.service_metrics
    stored = len((payload.get("00081199") or {}).get("Value") or [])
    if stored:
        metrics.received.labels("stow-rs").inc(stored)
    for item in (payload.get("00081198") or {}).get("Value") or []:
        reason = ((item.get("00081197") or {}).get("Value") or ["unknown"])[0]
        metrics.refused.labels("stow-rs", f"0x{reason:04X}" if isinstance(reason, int) else str(reason)).inc()
