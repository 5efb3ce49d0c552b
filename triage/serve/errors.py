"""The one place where triage errors become HTTP statuses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from triage.errors import (
    ConflictError,
    InferenceError,
    InvalidStudyError,
    ModelLoadError,
    NotFoundError,
    NotPermittedError,
    TriageError,
    UnsupportedInputError,
)
from triage.worklist.accounts import InvalidAccountError
from triage.worklist.preview import PreviewError
from triage.worklist.sites import InvalidSiteError

STATUS_BY_ERROR: list[tuple[type[TriageError], int]] = [
    (InvalidAccountError, 400),
    (InvalidSiteError, 400),
    (NotPermittedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    # The study and finding exist but the stored image or overlay cannot be drawn.
    (PreviewError, 422),
    (InvalidStudyError, 400),
    (UnsupportedInputError, 415),
    (ModelLoadError, 503),
    (InferenceError, 500),
    (TriageError, 500),
]


def status_for(exc: TriageError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TriageError)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status_for(exc))

    app.add_exception_handler(TriageError, handle)
