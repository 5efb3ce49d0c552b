"""Radiologists' feedback on a study's findings, and its export as training labels."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from triage.domain import utcnow
from triage.serve.deps import AccountsDep, Audit, Exporter, Human, ReadingDep, WorklistDep
from triage.serve.schemas import FeedbackIn, FeedbackOut
from triage.serve.visibility import sees_shadow
from triage.worklist.feedback import export_labels, record_feedback

router = APIRouter(tags=["feedback"])


@router.post("/studies/{study_uid}/feedback", response_model=FeedbackOut, status_code=201)
def feedback(
    study_uid: str, body: FeedbackIn, worklist: WorklistDep, accounts: AccountsDep, user: Human, reading: ReadingDep
) -> FeedbackOut:
    reading.check(study_uid, "feedback")
    entry = record_feedback(
        worklist,
        accounts,
        study_uid,
        user.name,
        body.verdict,
        body.finding,
        body.label,
        body.model,
        body.comment,
        body.model_version,
        now=utcnow(),
        include_shadow=sees_shadow(user),
    )
    return FeedbackOut(
        study_uid=study_uid,
        label=entry.label,
        verdict=entry.verdict.value,
        model=entry.model,
        model_version=entry.model_version,
        truth=entry.truth,
    )


@router.get(
    "/feedback/labels.csv",
    summary="Feedback as a label CSV for the training tools (image, label 0/1, ...)",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
def feedback_labels(
    worklist: WorklistDep,
    accounts: AccountsDep,
    user: Exporter,
    audit: Audit,
    model: Annotated[str | None, Query(description="Only feedback on this model's findings")] = None,
    label: Annotated[str | None, Query(description="Only this finding label")] = None,
) -> Response:
    body = export_labels(accounts, worklist, model, label)
    audit(user, "export-feedback", None, model=model, label=label)
    return Response(
        body, media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="triage-labels.csv"'}
    )
