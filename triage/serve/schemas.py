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


class ModelSiteState(BaseModel):
    """A model version's state at one site."""

    site: str = Field(description="Institution Name; '*' for every site without its own setting; '' for none")
    state: str = Field(description="active (its flags raise priority), shadow (runs; changes nothing) or off")
    reason: str
    source: str = Field(description="card (the default from the card), site or all-sites (set by someone)")
    threshold: float | None = Field(description="The site's operating point from its validation report, if set")
    changed_by: str
    changed_at: str | None


class ModelInfo(BaseModel):
    """An installed model with the facts of its card that a site needs."""

    name: str
    version: str
    task: str
    synthetic: bool
    validation: str = Field(description="What validation the card declares: none, external or local")
    raises_priority: bool = Field(
        description="Whether its flags raise priority at sites without their own setting (its state at '*' is "
        "active); each site's own state is in `states`"
    )
    states: list[ModelSiteState] = Field(description="Its state at '*' and at every site seen or set")
    summary: str
    licence: str
    error: str | None = Field(description="Why the model cannot run now, if it cannot")
    workers: list[dict[str, Any]] = Field(description="Each inference worker's process and node at the last probe")
