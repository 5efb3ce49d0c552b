"""One exception root for the service, with the few specific kinds that callers handle differently."""

from __future__ import annotations

from typing import Any


class TriageError(Exception):
    """Root of every error raised on purpose by triage."""


class InvalidStudyError(TriageError):
    """A study, series or instance cannot be used as it is (corrupt, inconsistent geometry, too few slices)."""


class UnsupportedInputError(TriageError):
    """The input is well formed but not something triage handles (SOP class, modality, transfer syntax)."""


class ModelLoadError(TriageError):
    """A model cannot be loaded: missing card or weights, sha256 mismatch, card disagrees with the ONNX graph."""


class InferenceError(TriageError):
    """Running a model failed on an input that passed validation."""


class ConflictError(TriageError):
    """The requested state change conflicts with the current state (for example a study claimed by someone else)."""


class NotFoundError(TriageError):
    """The referenced study, series, model or user does not exist."""


class MissingDependencyError(TriageError):
    """An optional dependency is not installed; the message carries the install hint."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed; install it with: pip install 'triage[{extra}]'")
        self.package = package
        self.extra = extra


class NotPermittedError(TriageError):
    """The user is signed in but may not do this here (for example read a site they hold no privilege for)."""


def validation_problems(exc: Any, what: str) -> str:
    """Every problem of a pydantic `ValidationError` on one line: "field.path: message; ..." (`what` names the
    whole record when the problem is not in one field)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or what}: {str(err['msg']).removeprefix('Value error, ')}"
        for err in exc.errors()
    )
