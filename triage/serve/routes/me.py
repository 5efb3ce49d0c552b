"""GET /api/v1/me: who the credentials belong to."""

from __future__ import annotations

from fastapi import APIRouter

from triage.serve.deps import CurrentUser
from triage.serve.schemas import Me

router = APIRouter(tags=["worklist"])


@router.get("/me", response_model=Me, summary="Who the credentials belong to")
def me(user: CurrentUser) -> Me:
    return Me(name=user.name, role=user.role.value)
