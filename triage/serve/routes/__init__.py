"""The JSON API and DICOMweb routes, one module per resource; `api_router` puts the API together."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from triage.serve.auth import current_user
from triage.serve.routes import audit, events, feedback, me, models, sites, studies, worklist


def api_router() -> APIRouter:
    """Everything under /api/v1; every route needs a signed-in session or an API token."""
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(current_user)])
    for module in (worklist, me, studies, feedback, audit, models, sites, events):
        api.include_router(module.router)
    return api
