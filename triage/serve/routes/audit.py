"""GET /api/v1/audit: the audit log, newest first (admins)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from triage.serve.deps import AccountsDep, Admin
from triage.serve.schemas import AuditEntryOut

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=list[AuditEntryOut], summary="The audit log, newest first (admins)")
def audit_log(
    user: Admin,
    accounts: AccountsDep,
    who: str | None = None,
    action: str | None = None,
    study_uid: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[AuditEntryOut]:
    entries = accounts.audit_entries(limit, offset, user=who, action=action, study_uid=study_uid)
    return [
        AuditEntryOut(at=e.at, user=e.user, action=e.action, study_uid=e.study_uid, detail=e.detail) for e in entries
    ]
