"""STOW-RS without HTTP: parse a multipart/related body of DICOM instances, store them, build the DICOM JSON answer."""

from __future__ import annotations

import logging
from email.message import Message
from typing import Any, Protocol

from triage.dicom.status import DicomStatus, status_for_exception
from triage.dicom.store import StoredInstance, read_dataset_bytes
from triage.errors import InvalidStudyError, TriageError, UnsupportedInputError

logger = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
_ACCEPTED_PART_ENCODINGS = ("", "binary", "8bit", "7bit")

# (SOP Class UID, SOP Instance UID, Failure Reason); UIDs are "" when the part could not be parsed.
Failure = tuple[str, str, int]


class InstanceWriter(Protocol):
    """What `stow_instances` needs of the store (`DicomStore` is one)."""

    def write(self, ds: Any, calling_ae: str = "") -> StoredInstance: ...


def _content_type_parts(content_type: str) -> tuple[str, dict[str, str]]:
    """(media type in lower case, parameters) of a Content-Type header, quoted values unquoted (RFC 2045 5.1)."""
    message = Message()
    message["Content-Type"] = content_type
    params = message.get_params(header="Content-Type") or []
    if not params:
        return "", {}
    media_type = params[0][0].strip().lower()
    values = {str(name).strip().lower(): str(value) for name, value in params[1:]}
    return media_type, values


def parse_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """Split a STOW-RS request body (PS3.18 10.5) into the bytes of each DICOM part.

    The request must be `multipart/related; type="application/dicom"; boundary=...` (the `type` parameter may
    be omitted); each part may say `Content-Type: application/dicom` and must not use any other content transfer
    encoding than binary. Per RFC 2046 5.1.1 the preamble before the first boundary and the epilogue after the
    closing boundary are ignored, the CRLF before each boundary belongs to the boundary, and whitespace may
    follow a boundary on its line. Bare LF line ends are tolerated.

    Raises:
        UnsupportedInputError: the request or a part has another media type (quoted), e.g. application/dicom+json
            (metadata with bulk data is not supported), or a part uses base64 or quoted-printable encoding.
        InvalidStudyError: no or an invalid boundary, no parts, or no closing boundary (a truncated upload).
    """
    media_type, params = _content_type_parts(content_type or "")
    if media_type != "multipart/related":
        raise UnsupportedInputError(
            f"Content-Type {content_type!r} is not supported; "
            f'send multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary=...'
        )
    part_type = params.get("type", DICOM_MEDIA_TYPE).strip().lower()
    if part_type != DICOM_MEDIA_TYPE:
        raise UnsupportedInputError(
            f'multipart/related type {params.get("type")!r} is not supported; only type="{DICOM_MEDIA_TYPE}" '
            "(Part-10 instances) is accepted"
        )
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70 or boundary.endswith(" "):
        raise InvalidStudyError(
            f"multipart boundary {boundary!r} is missing or invalid (RFC 2046: 1 to 70 characters, no trailing space)"
        )
    delimiter = b"--" + boundary.encode("latin-1")

    # The first boundary: at the very start, or at the start of a line after the preamble.
    if body.startswith(delimiter):
        position = 0
    else:
        found = body.find(b"\n" + delimiter)
        if found < 0:
            raise InvalidStudyError(f"the body contains no part delimited by boundary {boundary!r}")
        position = found + 1

    parts: list[bytes] = []
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):  # the closing boundary
            break
        line_end = body.find(b"\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t\r"):
            raise InvalidStudyError(f"malformed boundary line for boundary {boundary!r} at byte {position}")
        start = line_end + 1
        next_line = _find_delimiter_line(body, delimiter, start)
        if next_line < 0:
            raise InvalidStudyError(
                f"the body ends without the closing boundary '--{boundary}--' (truncated upload?) "
                f"after {len(parts)} complete parts"
            )
        # The line break before the boundary belongs to the boundary (RFC 2046 5.1.1), not to the content.
        end = next_line - 1
        if end > start and body[end - 1 : end] == b"\r":
            end -= 1
        parts.append(_part_content(body[start : max(end, start)], len(parts) + 1))
        position = next_line
    if not parts:
        raise InvalidStudyError("the multipart body has no parts")
    return parts


def _find_delimiter_line(body: bytes, delimiter: bytes, start: int) -> int:
    """Index of the next line that is a boundary (`--boundary` then `--`, whitespace or a line end), or -1."""
    search = start
    while True:
        found = body.find(b"\n" + delimiter, max(search - 1, 0))
        if found < 0:
            return -1
        after = found + 1 + len(delimiter)
        tail = body[after : after + 2]
        if tail == b"--" or tail[:1] in (b"\r", b"\n", b" ", b"\t") or after >= len(body):
            return found + 1
        search = after


def _part_content(part: bytes, number: int) -> bytes:
    """The content of one body part after its header section; checks its Content-Type and encoding."""
    if part.startswith(b"\r\n"):
        return part[2:]  # no header fields
    if part.startswith(b"\n"):
        return part[1:]
    separator = part.find(b"\r\n\r\n")
    skip = 4
    bare = part.find(b"\n\n")
    if bare >= 0 and (separator < 0 or bare < separator):
        separator, skip = bare, 2
    if separator < 0:
        raise InvalidStudyError(f"part {number} has no blank line between its headers and its content")
    headers: dict[str, str] = {}
    for line in part[:separator].decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    media_type, _ = _content_type_parts(headers.get("content-type", DICOM_MEDIA_TYPE))
    if media_type != DICOM_MEDIA_TYPE:
        raise UnsupportedInputError(
            f"part {number} has Content-Type {headers.get('content-type')!r}; only {DICOM_MEDIA_TYPE} is accepted"
        )
    encoding = headers.get("content-transfer-encoding", "").lower()
    if encoding not in _ACCEPTED_PART_ENCODINGS:
        raise UnsupportedInputError(
            f"part {number} has Content-Transfer-Encoding {encoding!r}; only binary is accepted"
        )
    return part[separator + skip :]


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _instance_url(base: str, stored: StoredInstance) -> str:
    meta = stored.meta
    return f"{base}/studies/{meta.study_uid}/series/{meta.series_uid}/instances/{meta.sop_instance_uid}"


def build_stow_response(
    stored: list[StoredInstance], failures: list[Failure], retrieve_base_url: str
) -> dict[str, Any]:
    """The Store Instances response in DICOM JSON (PS3.18 10.5.3 and Annex F), attributes in tag order.

    (0008,1190) Retrieve URL of the study is present when every stored instance belongs to one study;
    (0008,1198) Failed SOP Sequence lists each failure with its (0008,1197) Failure Reason;
    (0008,1199) Referenced SOP Sequence lists each stored instance with its own Retrieve URL.

    Args:
        stored: instances written (duplicates included: they are stored).
        failures: (SOP Class UID, SOP Instance UID, failure reason status) per refused part.
        retrieve_base_url: the DICOMweb base, e.g. "https://triage.example/dicomweb".
    """
    base = retrieve_base_url.rstrip("/")
    response: dict[str, Any] = {}
    studies = {s.meta.study_uid for s in stored}
    if len(studies) == 1:
        response["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{next(iter(studies))}"]}
    if failures:
        response["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _ui(sop_class),
                    "00081155": _ui(sop_instance),
                    "00081197": {"vr": "US", "Value": [int(reason)]},
                }
                for sop_class, sop_instance, reason in failures
            ],
        }
    if stored:
        response["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _ui(s.meta.sop_class_uid),
                    "00081155": _ui(s.meta.sop_instance_uid),
                    "00081190": {"vr": "UR", "Value": [_instance_url(base, s)]},
                }
                for s in stored
            ],
        }
    return response


def stow_instances(
    body: bytes,
    content_type: str,
    store: InstanceWriter,
    base_url: str,
    *,
    study_uid: str | None = None,
    source: str = "STOW-RS",
) -> tuple[int, dict[str, Any]]:
    """Everything of a STOW-RS Store Instances transaction except HTTP itself.

    Each part is parsed and written with `store.write(ds, calling_ae=source)`; a part that fails does not stop
    the others. With `study_uid` (POST /studies/{study}), instances of another study are refused (0xA900).

    Args:
        body: the request body.
        content_type: the request's Content-Type header.
        store: where instances go (a `DicomStore`).
        base_url: DICOMweb base URL for Retrieve URLs.
        study_uid: the study named in the request path, if any.
        source: recorded as the instances' calling AE (at most 16 characters are kept in the file).

    Returns:
        (HTTP status, DICOM JSON body): 200 all stored, 202 some failed, 409 none stored (PS3.18 10.5.3);
        415 wrong media type and 400 malformed multipart, each with {"error": message}.
    """
    try:
        parts = parse_multipart_related(body, content_type)
    except UnsupportedInputError as exc:
        return 415, {"error": str(exc)}
    except InvalidStudyError as exc:
        return 400, {"error": str(exc)}

    stored: list[StoredInstance] = []
    failures: list[Failure] = []
    for number, part in enumerate(parts, 1):
        try:
            ds = read_dataset_bytes(part)
        except InvalidStudyError as exc:
            logger.warning("STOW-RS part %d of %d cannot be parsed: %s", number, len(parts), exc)
            failures.append(("", "", int(DicomStatus.CANNOT_UNDERSTAND)))
            continue
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        sop_instance = str(ds.get("SOPInstanceUID", "") or "").strip()
        try:
            if study_uid is not None:
                instance_study = str(ds.get("StudyInstanceUID", "") or "").strip()
                if instance_study != study_uid:
                    raise InvalidStudyError(
                        f"instance {sop_instance!r} belongs to study {instance_study!r}, "
                        f"not to {study_uid!r} named in the request"
                    )
            stored.append(store.write(ds, calling_ae=source))
        except TriageError as exc:
            status = status_for_exception(exc)
            logger.warning("STOW-RS instance %s refused (0x%04X): %s", sop_instance, status, exc)
            failures.append((sop_class, sop_instance, int(status)))
        except Exception:
            logger.exception("STOW-RS instance %s failed unexpectedly", sop_instance)
            failures.append((sop_class, sop_instance, int(DicomStatus.OUT_OF_RESOURCES)))

    if not failures:
        http_status = 200
    elif stored:
        http_status = 202
    else:
        http_status = 409
    return http_status, build_stow_response(stored, failures, base_url)
