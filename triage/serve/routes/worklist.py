"""GET /api/v1/worklist: the open studies, highest priority first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from triage.domain import utcnow
from triage.serve.deps import Audit, Claimant, CurrentUser, ReadingDep, WorklistDep
from triage.serve.visibility import for_reader
from triage.worklist.repository import WorklistItem

router = APIRouter(tags=["worklist"])


@router.get("/worklist", response_model=list[WorklistItem], summary="The worklist, highest priority first")
def list_worklist(
    worklist: WorklistDep,
    user: CurrentUser,
    reading: ReadingDep,
    status: Annotated[
        str | None, Query(description="AI status: pending, analysing, done, failed, not-applicable")
    ] = None,
    modality: Annotated[str | None, Query(description="Modality, e.g. CT, CR, DX")] = None,
    level: Annotated[str | None, Query(description="Priority level: stat, urgent, routine")] = None,
    site: str | None = None,
    accession: str | None = None,
    include_reported: bool = False,
    claimed: Annotated[bool | None, Query(description="Only claimed (true) or unclaimed (false) studies")] = None,
    flagged: Annotated[bool | None, Query(description="Only studies with (true) or without (false) an AI flag")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many studies (a page)")] = 100,
    offset: Annotated[int, Query(ge=0, description="Skip this many studies of the order first")] = 0,
) -> list[WorklistItem]:
    try:
        items = worklist.list_worklist(
            utcnow(),
            status=status,
            modality=modality,
            level=level,
            site=site,
            accession=accession,
            include_reported=include_reported,
            limit=limit,
            offset=offset,
            scope=reading.scope,
            claimed=claimed,
            flagged=flagged,
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return [for_reader(item, user) for item in items]


@router.get("/worklist/counts", summary="How many studies (that you may read) are at each priority level now")
def counts(
    worklist: WorklistDep,
    reading: ReadingDep,
    status: str | None = None,
    modality: str | None = None,
    site: str | None = None,
    claimed: bool | None = None,
    flagged: bool | None = None,
) -> dict[str, int]:
    try:
        return worklist.count_by_level(
            utcnow(), status=status, modality=modality, site=site, scope=reading.scope, claimed=claimed, flagged=flagged
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc


@router.post(
    "/worklist/next",
    response_model=WorklistItem,
    responses={204: {"description": "No unclaimed study is left that you may read"}},
    summary="Claim the highest-priority unclaimed study you may read (people; atomic)",
)
def next_study(worklist: WorklistDep, user: Claimant, reading: ReadingDep, audit: Audit) -> WorklistItem | Response:
    item = worklist.next_study(user.name, utcnow(), reading.scope)
    if item is None:
        return Response(status_code=204)
    audit(user, "claim", item.study_uid, via="api", next_study=True)
    return for_reader(item, user)
