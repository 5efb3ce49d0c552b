"""Radiologists' feedback on AI findings, and its export as training labels (used by the API and the pages alike)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from triage.errors import ConflictError, NotFoundError
from triage.worklist.accounts import Accounts, FeedbackEntry, Verdict, feedback_label_rows
from triage.worklist.preview import series_files
from triage.worklist.repository import StudyDetail, Worklist

LABEL_CSV_COLUMNS = [
    "image",
    "label",
    "finding",
    "verdict",
    "model",
    "model_version",
    "study_uid",
    "series_uid",
    "user",
    "at",
]


def _missed_by(detail: StudyDetail, model: str) -> tuple[str, str, str]:
    """(series UID, model, model version) a missed finding is recorded against: the first series routed to
    `model` (or to any model when none is named), else the study's first series."""
    series_uid, version = "", ""
    for series in detail.series:
        routed = series.routing
        if routed is not None and routed.model and (not model or routed.model == model):
            series_uid, model, version = series.series_uid, model or routed.model, routed.model_version or ""
            break
    if not series_uid and detail.series:
        series_uid = detail.series[0].series_uid
    version = version or next((f.model_version for f in detail.findings if f.model == model), "")
    return series_uid, model, version


def record_feedback(
    worklist: Worklist,
    accounts: Accounts,
    study_uid: str,
    user: str,
    verdict: str,
    finding_index: int | None,
    label: str,
    model: str,
    comment: str,
    model_version: str = "",
    *,
    now: datetime,
    include_shadow: bool = True,
) -> FeedbackEntry:
    """Store one piece of feedback with the model name and version it is about, and audit it.

    For agree/disagree, the finding is named by its index on the page plus, when given, its label, model and
    version: if a re-analysis replaced the findings since the page was shown, the feedback is refused rather than
    attached to a different finding (it becomes a training label).

    Raises:
        NotFoundError: unknown study or finding index.
        ConflictError: the finding changed since it was shown.
        InvalidAccountError: a bad verdict, label or comment.

    `include_shadow` False (a radiologist): the findings of models in shadow do not exist for this feedback.
    """
    detail = worklist.get_study(study_uid, now)
    parsed = Verdict.parse(verdict)
    # A radiologist (include_shadow False) neither sees nor judges a shadow model's findings; they are stored after
    # the active ones, so the numbers of the others are the same.
    findings = detail.findings if include_shadow else [f for f in detail.findings if not f.shadow]
    if parsed == Verdict.MISSED:
        series_uid, model, version = _missed_by(detail, model)
        entry = accounts.add_feedback(
            user,
            study_uid,
            label,
            parsed,
            now,
            series_uid=series_uid,
            model=model,
            model_version=version,
            comment=comment.strip(),
        )
    else:
        if finding_index is None or not 0 <= finding_index < len(findings):
            raise NotFoundError(f"study {study_uid!r} has no finding number {finding_index}")
        found = findings[finding_index]
        expected = {"label": label, "model": model, "model_version": model_version}
        shown = {"label": found.label, "model": found.model, "model_version": found.model_version}
        changed = [k for k, v in expected.items() if v and shown[k] != v]
        if changed:
            raise ConflictError(
                f"finding {finding_index} of study {study_uid!r} changed since it was shown ({', '.join(changed)});"
                " reload the study and give the feedback again"
            )
        entry = accounts.add_feedback(
            user,
            study_uid,
            found.label,
            parsed,
            now,
            series_uid=found.series_uid,
            ai_flagged=found.flagged,
            ai_probability=found.probability,
            model=found.model,
            model_version=found.model_version,
            comment=comment.strip(),
        )
    accounts.audit(
        user,
        "feedback",
        now,
        study_uid,
        {
            "label": entry.label,
            "verdict": entry.verdict.value,
            "model": entry.model,
            "model_version": entry.model_version,
        },
    )
    return entry


def series_image_path(worklist: Worklist, study_uid: str, series_uid: str) -> str | None:
    """What the label CSV's `image` column names, relative to the store's folder (store keys are): the stored
    instance of a one-image series, else the series folder "<study>/<series>"."""
    files = series_files(worklist.engine, study_uid, series_uid) if series_uid else []
    if not files:
        return None
    if len(files) == 1:
        return files[0][1]
    parents = {key.rsplit("/", 1)[0] for _, key in files}
    return parents.pop() if len(parents) == 1 else files[0][1].split("/", 1)[0]


def label_csv(rows: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LABEL_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def export_labels(accounts: Accounts, worklist: Worklist, model: str | None = None, label: str | None = None) -> str:
    """The feedback as a label CSV for the training tools: image (stored DICOM file or series folder), label 0/1."""
    entries = accounts.feedback_entries(model=model or None, label=label or None)
    rows = feedback_label_rows(entries, lambda st, se: series_image_path(worklist, st, se), model or None)
    return label_csv(rows)
