"""One study: its detail (series, routing, findings, analysis runs, history), its preview, and the actions
people take on it (claim, release, report) or an admin does (requeue). Every view and action is audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, Field

from triage.domain import utcnow
from triage.serve.auth import RIS_BRIDGE
from triage.serve.deps import Admin, Audit, Claimant, CurrentUser, Human, ReadingDep, Reporter, Service, WorklistDep
from triage.serve.schemas import ActionResult
from triage.serve.visibility import for_reader, sees_shadow
from triage.worklist.accounts import Role
from triage.worklist.preview import preview_png, series_slices, slice_png
from triage.worklist.repository import Communication, StudyDetail

router = APIRouter(prefix="/studies", tags=["worklist"])


@router.get("/{study_uid}", response_model=StudyDetail, summary="One study with its series, routing and findings")
def study(study_uid: str, worklist: WorklistDep, user: CurrentUser, reading: ReadingDep, audit: Audit) -> StudyDetail:
    reading.check(study_uid, "view")
    now = utcnow()
    detail = worklist.get_study(study_uid, now)
    worklist.touch_claim(study_uid, user.name, now)
    audit(user, "view", study_uid, via="api")
    return for_reader(detail, user)


@router.get(
    "/{study_uid}/preview.png",
    summary="Key slice or radiograph with the AI region drawn over it (not for diagnostic use)",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def preview(
    study_uid: str,
    worklist: WorklistDep,
    service: Service,
    user: CurrentUser,
    reading: ReadingDep,
    audit: Audit,
    finding: Annotated[int | None, Query(description="Index into the study's findings")] = None,
) -> Response:
    reading.check(study_uid, "view-image")
    worklist.touch_claim(study_uid, user.name, utcnow())
    png = preview_png(worklist, service.files, study_uid, finding, utcnow(), include_shadow=sees_shadow(user))
    audit(user, "view-image", study_uid, finding=finding)
    # An image of a patient: not cached anywhere.
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/{study_uid}/claim", response_model=ActionResult, summary="Claim a study to report it (people)")
def claim(study_uid: str, worklist: WorklistDep, user: Claimant, reading: ReadingDep, audit: Audit) -> ActionResult:
    reading.check(study_uid, "claim")
    worklist.claim(study_uid, user.name, utcnow(), reading.scope)
    audit(user, "claim", study_uid, via="api")
    return ActionResult(study_uid=study_uid, action="claim", user=user.name)


@router.post("/{study_uid}/release", response_model=ActionResult, summary="Give a claim back (people)")
def release(study_uid: str, worklist: WorklistDep, user: Claimant, reading: ReadingDep, audit: Audit) -> ActionResult:
    reading.check(study_uid, "release")
    # Only the claimant or an admin may release a claim; the worklist raises ConflictError (409) otherwise.
    worklist.release(study_uid, user.name, is_admin=user.is_admin, now=utcnow())
    audit(user, "release", study_uid, via="api")
    return ActionResult(study_uid=study_uid, action="release", user=user.name)


@router.post(
    "/{study_uid}/report",
    response_model=ActionResult,
    summary="Mark a study reported (people; a RIS bridge's service account where TRIAGE_RIS_BRIDGE_MAY_REPORT)",
)
def report(study_uid: str, worklist: WorklistDep, user: Reporter, reading: ReadingDep, audit: Audit) -> ActionResult:
    reading.check(study_uid, "report")
    now = utcnow()
    if user.role == Role.SERVICE:
        # A RIS bridge relays a report signed in the RIS: a claim still held here is moot, so it is given
        # back first (recorded), else the reported study would stay claimed and listed.
        claimed_by = worklist.get_study(study_uid, now).claimed_by
        if claimed_by is not None and claimed_by != user.name:
            worklist.release(study_uid, user.name, is_admin=True, now=now)
        worklist.mark_reported(study_uid, user.name, now)
        audit(
            user, "report", study_uid, via="api", account="service", acting_as=RIS_BRIDGE,
            released_claim_of=claimed_by,
        )  # fmt: skip
    else:
        worklist.mark_reported(study_uid, user.name, now)
        audit(user, "report", study_uid, via="api")
    return ActionResult(study_uid=study_uid, action="report", user=user.name)


class CommunicationIn(BaseModel):
    recipient: str = Field(description="Who was told: name and role, e.g. 'Dr A. Rao, ED consultant'")
    method: str = Field(description="phone, secure-message, in-person, pager, email or other")
    at: datetime | None = Field(default=None, description="When (timezone-aware); default: now")
    note: str = ""


@router.post(
    "/{study_uid}/communications",
    response_model=Communication,
    status_code=201,
    summary="Record that a critical result was told to the care team: whom, by what means, when (people; audited)",
)
def communicate(
    study_uid: str, body: CommunicationIn, worklist: WorklistDep, user: Human, reading: ReadingDep, audit: Audit
) -> Communication:
    reading.check(study_uid, "communicate")
    now = utcnow()
    try:
        entry = worklist.record_communication(
            study_uid, user.name, body.recipient, body.method, body.at or now, now, body.note
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    audit(
        user,
        "critical-communicated",
        study_uid,
        recipient=entry.recipient,
        method=entry.method,
        at=entry.at.isoformat(),
    )
    return entry


@router.get(
    "/{study_uid}/series/{series_uid}/slices",
    summary="The images of a series in order along the slice normal, for the study page's scroller",
)
def slices(study_uid: str, series_uid: str, service: Service, reading: ReadingDep) -> dict[str, Any]:
    reading.check(study_uid, "view-image")
    ordered = series_slices(service.worklist, service.files, study_uid, series_uid)
    return {"count": len(ordered), "sop_instance_uids": [uid for uid, _ in ordered]}


@router.get(
    "/{study_uid}/series/{series_uid}/slices/{index}.png",
    summary="One image of a series in a window (brain, subdural, bone), the AI region drawn (not for diagnostic use)",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def slice_image(
    study_uid: str,
    series_uid: str,
    index: int,
    service: Service,
    user: CurrentUser,
    reading: ReadingDep,
    audit: Audit,
    window: Annotated[str, Query(description="brain, subdural or bone")] = "brain",
    overlay: Annotated[bool, Query(description="Draw the AI region")] = True,
) -> Response:
    reading.check(study_uid, "view-image")
    # Scrolling the images is working on the study: the claimant's claim is not idle.
    service.worklist.touch_claim(study_uid, user.name, utcnow())
    try:
        png = slice_png(service.worklist, service.files, study_uid, series_uid, index, window, overlay,
                        include_shadow=sees_shadow(user))  # fmt: skip
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    audit(user, "view-image", study_uid, series=series_uid, image=index, window=window)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get(
    "/{study_uid}/messages",
    summary="What was sent about the study (critical alerts, HL7 to the RIS) and how delivery went",
)
def messages(study_uid: str, service: Service, user: CurrentUser, reading: ReadingDep) -> list[dict[str, Any]]:
    reading.check(study_uid, "view-messages")
    return [{k: v for k, v in m.items() if k != "payload"} | {"event": m["payload"].get("event", m["kind"])}
            for m in service.outbox.messages(study_uid)]  # fmt: skip


@router.post(
    "/{study_uid}/requeue",
    response_model=ActionResult,
    summary="Queue a study for a fresh AI analysis now (admins; audited)",
)
def requeue(study_uid: str, service: Service, user: Admin, audit: Audit) -> ActionResult:
    service.requeue(study_uid, user=user.name)
    audit(user, "requeue", study_uid, via="api")
    return ActionResult(study_uid=study_uid, action="requeue", user=user.name)
