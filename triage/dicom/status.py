"""DICOM status codes (PS3.4 Annex B, PS3.7 Annex C) in one place, and the mapping from triage errors to them."""

from __future__ import annotations

from enum import IntEnum

from triage.errors import InvalidStudyError, TriageError, UnsupportedInputError


class DicomStatus(IntEnum):
    """The C-STORE response statuses triage sends; STOW-RS reuses them as Failure Reason (0008,1197)."""

    SUCCESS = 0x0000
    # PS3.7 C.5 (general statuses): the operation failed for a reason not otherwise classified.
    PROCESSING_FAILURE = 0x0110
    # PS3.7 C.5 (general statuses): refused, the SCP does not support the SOP class of the instance.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    # PS3.4 B.2.3: out of resources: disk full or read-only, memory exhausted, the index unavailable, or an
    # unexpected failure while storing. Senders treat it as transient and retry, so bad data never gets it.
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: the data set does not match the SOP class (missing UIDs or Pixel Data, UIDs that disagree).
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # PS3.4 B.2.3: the data set cannot be parsed (unknown VR, bytes that disagree with the transfer syntax,
    # unreadable compressed fragments), or triage cannot process it (beyond the site's decode limits). Permanent.
    CANNOT_UNDERSTAND = 0xC000


class CannotUnderstandError(InvalidStudyError):
    """The instance's bytes cannot be parsed as a data set in its transfer syntax, or its pixels could not be
    decoded within the site's limits: resending the same bytes can never succeed (0xC000, PS3.4 B.2.3)."""


_DESCRIPTIONS: dict[int, str] = {
    DicomStatus.SUCCESS: "success",
    DicomStatus.PROCESSING_FAILURE: "processing failure",
    DicomStatus.SOP_CLASS_NOT_SUPPORTED: "SOP class not supported",
    DicomStatus.OUT_OF_RESOURCES: "out of resources",
    DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS: "data set does not match SOP class",
    DicomStatus.CANNOT_UNDERSTAND: "cannot understand",
}


def status_for_exception(exc: BaseException) -> DicomStatus:
    """The failure status to answer when storing an instance raised `exc`.

    UnsupportedInputError (a SOP class or transfer syntax we do not take) -> 0x0122; CannotUnderstandError
    (unparseable bytes, pixels beyond the decode limits) -> 0xC000; InvalidStudyError (missing or malformed
    UIDs, missing or truncated Pixel Data) -> 0xA900; any other TriageError -> 0xC000; anything else (disk full,
    memory, a database outage, a bug) -> 0xA700, which senders treat as transient and retry.

    The store wraps every parse or validation failure of pydicom into CannotUnderstandError (`from exc`), so an
    exception that is not a TriageError here really is resource trouble or a bug, never bad input.
    """
    if isinstance(exc, UnsupportedInputError):
        return DicomStatus.SOP_CLASS_NOT_SUPPORTED
    if isinstance(exc, CannotUnderstandError):
        return DicomStatus.CANNOT_UNDERSTAND
    if isinstance(exc, InvalidStudyError):
        return DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, TriageError):
        return DicomStatus.CANNOT_UNDERSTAND
    return DicomStatus.OUT_OF_RESOURCES


def is_permanent_failure(code: int) -> bool:
    """Whether a failure status tells the sender not to resend the same bytes (all but 0xA7xx Out of Resources)."""
    return status_category(code) == "failure" and not 0xA700 <= code <= 0xA7FF


def status_category(code: int) -> str:
    """Classify a DIMSE status code: "success", "warning", "failure", "cancel" or "pending" (PS3.7 Annex C)."""
    if code == 0x0000:
        return "success"
    if code == 0x0001 or 0xB000 <= code <= 0xBFFF:
        return "warning"
    if code == 0xFE00:
        return "cancel"
    if code in (0xFF00, 0xFF01):
        return "pending"
    return "failure"


def describe_status(code: int) -> str:
    """A short human text for a status code, e.g. "0xA900 (failure: data set does not match SOP class)"."""
    text = _DESCRIPTIONS.get(code)
    category = status_category(code)
    if text is None:
        if 0xA700 <= code <= 0xA7FF:
            text = "out of resources"
        elif 0xC000 <= code <= 0xCFFF:
            text = "cannot understand"
        elif 0xB000 <= code <= 0xBFFF:
            text = "coercion or elements discarded"
        else:
            text = category
    return f"0x{code:04X} ({category}: {text})" if code else "0x0000 (success)"
