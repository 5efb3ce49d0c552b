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
    # PS3.4 B.2.3: out of resources (disk full, or an unexpected failure while storing: the sender may retry).
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: the data set does not match the SOP class (missing UIDs or Pixel Data, UIDs that disagree).
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # PS3.4 B.2.3: the data set cannot be parsed.
    CANNOT_UNDERSTAND = 0xC000


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

    UnsupportedInputError (a SOP class or transfer syntax we do not take) -> 0x0122; InvalidStudyError (missing
    or malformed UIDs, missing or truncated Pixel Data) -> 0xA900; any other TriageError -> 0xC000; anything
    else (disk full, a bug) -> 0xA700, which senders treat as transient and retry.
    """
    if isinstance(exc, UnsupportedInputError):
        return DicomStatus.SOP_CLASS_NOT_SUPPORTED
    if isinstance(exc, InvalidStudyError):
        return DicomStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, TriageError):
        return DicomStatus.CANNOT_UNDERSTAND
    return DicomStatus.OUT_OF_RESOURCES


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
