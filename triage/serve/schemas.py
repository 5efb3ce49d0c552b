"""What the JSON API reads and writes, where it is not a record of the layers below (those are returned as they
are: `WorklistItem`, `StudyDetail`, `Finding`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from triage.domain import UtcTime


class ActionResult(BaseModel):
    study_uid: str
    action: str
    user: str


class Me(BaseModel):
    name: str
    role: str


class FeedbackIn(BaseModel):
    """Feedback on finding number `finding` of the study, or a finding the AI missed (verdict "missed" + label)."""

    model_config = ConfigDict(protected_namespaces=())

    verdict: Literal["agree", "disagree", "missed"]
    finding: int | None = Field(default=None, description="Index into the study's findings (agree, disagree)")
    label: str = Field(default="", description="The missed finding's label (missed only)")
    model: str = Field(default="", description="The model (missed: the one that missed it; else checked)")
    model_version: str = Field(default="", description="Optional check that the finding is still this version's")
    comment: str = ""


class FeedbackOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    study_uid: str
    label: str
    verdict: str
    model: str
    model_version: str
    truth: int


class AuditEntryOut(BaseModel):
    at: UtcTime
    user: str
    action: str
    study_uid: str | None
    detail: dict[str, Any]


class ModelInfo(BaseModel):
    """An installed model with the facts of its card that a site needs."""

    name: str
    version: str
    task: str
    synthetic: bool
    raises_priority: bool = Field(
        description="Whether its flags may raise a study's priority at this site (a synthetic-data model only "
        "where the site names it in priority.unvalidated_models_may_raise)"
    )
    summary: str
    licence: str
    error: str | None = Field(description="Why the model cannot run now, if it cannot")
    workers: list[dict[str, Any]] = Field(description="Each inference worker's process and node at the last probe")
