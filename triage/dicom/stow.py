"""STOW-RS without HTTP: split a multipart/related body of DICOM instances, store each, build the DICOM JSON answer."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import IO, Any, Protocol

from pydicom.dataset import Dataset

from triage.dicom.status import DicomStatus, status_for_exception
from triage.dicom.store import StoredInstance, read_dataset_bytes, validate_uid
from triage.errors import InvalidStudyError, TriageError, UnsupportedInputError

logger = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
_ACCEPTED_PART_ENCODINGS = ("", "binary", "8bit", "7bit")

# The body is scanned in blocks of this size, so a large body is never read into memory whole.
_SCAN_BLOCK_BYTES = 1 << 20
# A boundary line is "--boundary" (at most 72 bytes, RFC 2046 5.1.1) plus transport padding and CRLF.
_MAX_BOUNDARY_LINE_BYTES = 1024
# The header section of one part (Content-Type, Content-Transfer-Encoding, Content-Location, ...).
_MAX_PART_HEADER_BYTES = 16 * 1024

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


def request_boundary(content_type: str) -> bytes:
    """The multipart boundary of a STOW-RS request's Content-Type, after checking the media type (PS3.18 10.5.1).

    Raises:
        UnsupportedInputError: the request is not `multipart/related` or its `type` is not application/dicom
            (metadata with bulk data, application/dicom+json, is not supported).
        InvalidStudyError: no or an invalid boundary (RFC 2046 5.1.1: 1 to 70 characters, no trailing space).
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
    return boundary.encode("latin-1")


def refusal_for_content_type(content_type: str) -> tuple[int, dict[str, Any]] | None:
    """(HTTP status, {"error": message}) when the request's Content-Type alone refuses it, else None.

    Lets the HTTP edge refuse such a request (415 another media type, 400 no usable boundary) before reading a
    possibly large body; `stow_instances` gives the same answer.
    """
    try:
        request_boundary(content_type)
    except UnsupportedInputError as exc:
        return 415, {"error": str(exc)}
    except InvalidStudyError as exc:
        return 400, {"error": str(exc)}
    return None


class _Body:
    """Random access to a request body held in a seekable binary file, read in bounded pieces."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.size = stream.seek(0, io.SEEK_END)

    def read(self, start: int, length: int) -> bytes:
        self._stream.seek(start)
        return self._stream.read(max(0, min(length, self.size - start)))

    def startswith(self, prefix: bytes, position: int) -> bool:
        return self.read(position, len(prefix)) == prefix

    def find(self, pattern: bytes, start: int) -> int:
        """Offset of the first `pattern` at or after `start`, or -1; scans block by block."""
        overlap = len(pattern) - 1
        position = start
        while position < self.size:
            block = self.read(position, _SCAN_BLOCK_BYTES + overlap)
            found = block.find(pattern)
            if found >= 0:
                return position + found
            position += _SCAN_BLOCK_BYTES
        return -1


@dataclass(frozen=True)
class BodyPart:
    """One body part of a multipart/related request: where its content lies in the body, or why it is unusable.

    `error` is set when the part's own headers make it unusable (another media type, base64); the other parts
    are not affected by it.
    """

    number: int
    start: int
    end: int
    error: TriageError | None = None


def split_multipart_related(stream: IO[bytes], content_type: str) -> list[BodyPart]:
    """Find the body parts of a STOW-RS request body (PS3.18 10.5) without reading it into memory whole.

    The request must be `multipart/related; type="application/dicom"; boundary=...` (the `type` parameter may
    be omitted); each part may say `Content-Type: application/dicom` and must not use any other content transfer
    encoding than binary. Per RFC 2046 5.1.1 the preamble before the first boundary and the epilogue after the
    closing boundary are ignored, the CRLF before each boundary belongs to the boundary, and whitespace may
    follow a boundary on its line. Bare LF line ends are tolerated.

    Args:
        stream: the whole body, seekable (a file the request was spooled to, or `io.BytesIO`).
        content_type: the request's Content-Type header.

    Returns:
        The parts in order; a part with unusable headers carries its error (UnsupportedInputError for another
        media type or encoding, InvalidStudyError for a header section without its blank line).

    Raises:
        UnsupportedInputError: the request is not multipart/related with type application/dicom.
        InvalidStudyError: no or an invalid boundary, a malformed boundary line, no parts, or no closing boundary
            (a truncated upload): the framing itself is broken, so no part can be trusted.
    """
    boundary = request_boundary(content_type)
    delimiter = b"--" + boundary
    body = _Body(stream)

    # The first boundary: at the very start, or at the start of a line after the preamble.
    if body.startswith(delimiter, 0):
        position = 0
    else:
        found = body.find(b"\n" + delimiter, 0)
        if found < 0:
            raise InvalidStudyError(f"the body contains no part delimited by boundary {boundary.decode('latin-1')!r}")
        position = found + 1

    parts: list[BodyPart] = []
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):  # the closing boundary
            break
        line = body.read(position, _MAX_BOUNDARY_LINE_BYTES)
        line_end = line.find(b"\n")
        if line_end < 0 or line[:line_end].strip(b" \t\r"):
            raise InvalidStudyError(
                f"malformed boundary line for boundary {boundary.decode('latin-1')!r} at byte {position}"
            )
        start = position + line_end + 1
        next_line = _find_delimiter_line(body, delimiter, start)
        if next_line < 0:
            raise InvalidStudyError(
                f"the body ends without the closing boundary '--{boundary.decode('latin-1')}--' (truncated upload?) "
                f"after {len(parts)} complete parts"
            )
        # The line break before the boundary belongs to the boundary (RFC 2046 5.1.1), not to the content.
        end = next_line - 1
        if end > start and body.read(end - 1, 1) == b"\r":
            end -= 1
        parts.append(_part_content(body, start, max(end, start), len(parts) + 1))
        position = next_line
    if not parts:
        raise InvalidStudyError("the multipart body has no parts")
    return parts


def parse_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The content of each part of a STOW-RS body held in memory, strictly: a part with unusable headers raises.

    See `split_multipart_related` for the rules; `stow_instances` uses that instead, so that one bad part does
    not refuse the whole request.

    Raises:
        UnsupportedInputError: the request or a part has another media type (quoted), or a part uses base64 or
            quoted-printable encoding.
        InvalidStudyError: no or an invalid boundary, no parts, or no closing boundary (a truncated upload).
    """
    stream = io.BytesIO(body)
    parts = split_multipart_related(stream, content_type)
    for part in parts:
        if part.error is not None:
            raise part.error
    return [body[part.start : part.end] for part in parts]


def _find_delimiter_line(body: _Body, delimiter: bytes, start: int) -> int:
    """Offset of the next line that is a boundary (`--boundary` then `--`, whitespace or a line end), or -1."""
    search = start
    while True:
        found = body.find(b"\n" + delimiter, max(search - 1, 0))
        if found < 0:
            return -1
        after = found + 1 + len(delimiter)
        tail = body.read(after, 2)
        if tail == b"--" or tail[:1] in (b"\r", b"\n", b" ", b"\t") or after >= body.size:
            return found + 1
        search = after


def _part_content(body: _Body, start: int, end: int, number: int) -> BodyPart:
    """The content of one body part after its header section; checks its Content-Type and encoding."""
    head = body.read(start, min(end - start, _MAX_PART_HEADER_BYTES))
    if head.startswith(b"\r\n"):
        return BodyPart(number, start + 2, end)  # no header fields
    if head.startswith(b"\n"):
        return BodyPart(number, start + 1, end)
    separator = head.find(b"\r\n\r\n")
    skip = 4
    bare = head.find(b"\n\n")
    if bare >= 0 and (separator < 0 or bare < separator):
        separator, skip = bare, 2
    if separator < 0:
        error = InvalidStudyError(
            f"part {number} has no blank line between its headers and its content "
            f"(within its first {_MAX_PART_HEADER_BYTES} bytes)"
        )
        return BodyPart(number, end, end, error)
    headers: dict[str, str] = {}
    for line in head[:separator].decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    content = BodyPart(number, start + separator + skip, end)
    media_type, _ = _content_type_parts(headers.get("content-type", DICOM_MEDIA_TYPE))
    if media_type != DICOM_MEDIA_TYPE:
        unsupported = UnsupportedInputError(
            f"part {number} has Content-Type {headers.get('content-type')!r}; only {DICOM_MEDIA_TYPE} is accepted"
        )
        return BodyPart(number, content.start, end, unsupported)
    encoding = headers.get("content-transfer-encoding", "").lower()
    if encoding not in _ACCEPTED_PART_ENCODINGS:
        unsupported = UnsupportedInputError(
            f"part {number} has Content-Transfer-Encoding {encoding!r}; only binary is accepted"
        )
        return BodyPart(number, content.start, end, unsupported)
    return content


def _decode_every_element(ds: Dataset) -> None:
    """Convert every element now, items of sequences included, so a value pydicom cannot decode fails here.

    pydicom converts raw elements lazily, on first access: an unknown VR (say 'ZZ' on SOP Instance UID) or an
    undecodable value would otherwise raise a pydicom error wherever the element is first read.
    """
    for element in ds:  # iterating converts each raw element
        if element.VR == "SQ":
            for item in element.value:
                _decode_every_element(item)


def _part_uids(ds: Dataset) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of a parsed part, for its outcome; "" where unreadable or invalid.

    Falls back on the File Meta's Media Storage UIDs (PS3.10 7.1) when the data set's own cannot be decoded, so
    that a client can tell which of its instances failed.
    """
    uids = []
    for keyword, meta_keyword in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        uid = ""
        for source, name in ((ds, keyword), (ds.file_meta, meta_keyword)):
            try:
                uid = _reference_uid(source.get(name))
            except Exception:  # noqa: BLE001 - an undecodable value is reported by _decode_every_element
                uid = ""
            if uid:
                break
        uids.append(uid)
    return uids[0], uids[1]


def _reference_uid(value: object) -> str:
    """A UID to echo in the response: the value if it is a valid UID, else "" (garbage is not echoed back)."""
    try:
        return validate_uid(value, "UID")
    except (TriageError, TypeError, ValueError):
        return ""


def _sop_item(sop_class: str, sop_instance: str) -> Dataset:
    """An item with the SOP Instance Reference Macro (PS3.3 Table 10-11), empty UIDs where unknown."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _instance_url(base: str, stored: StoredInstance) -> str:
    meta = stored.meta
    return f"{base}/studies/{meta.study_uid}/series/{meta.series_uid}/instances/{meta.sop_instance_uid}"


def build_stow_response(
    stored: list[StoredInstance], failures: list[Failure], retrieve_base_url: str
) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I, Table I.1-1) in DICOM JSON (PS3.18 Annex F).

    (0008,1190) Retrieve URL of the study is present when every stored instance belongs to one study;
    (0008,1198) Failed SOP Sequence lists each failure with its (0008,1197) Failure Reason (Table I.2-2);
    (0008,1199) Referenced SOP Sequence lists each stored instance with its own Retrieve URL.
    Attributes are added in tag order, which DICOM JSON keeps (PS3.18 F.2).

    Args:
        stored: instances written (duplicates included: they are stored).
        failures: (SOP Class UID, SOP Instance UID, failure reason status) per refused part.
        retrieve_base_url: the DICOMweb base, e.g. "https://triage.example/dicomweb".
    """
    base = retrieve_base_url.rstrip("/")
    response = Dataset()
    studies = {s.meta.study_uid for s in stored}
    if len(studies) == 1:
        response.RetrieveURL = f"{base}/studies/{next(iter(studies))}"
    if failures:
        failed = []
        for sop_class, sop_instance, reason in failures:
            item = _sop_item(sop_class, sop_instance)
            item.FailureReason = int(reason)
            failed.append(item)
        response.FailedSOPSequence = failed
    if stored:
        referenced = []
        for s in stored:
            item = _sop_item(s.meta.sop_class_uid, s.meta.sop_instance_uid)
            item.RetrieveURL = _instance_url(base, s)
            referenced.append(item)
        response.ReferencedSOPSequence = referenced
    return response.to_json_dict()


def _store_part(
    part: BodyPart,
    read: Callable[[int, int], bytes],
    total: int,
    store: InstanceWriter,
    study_uid: str | None,
    source: str,
) -> StoredInstance | Failure:
    """Parse and store one part; every failure becomes this part's outcome, never an exception.

    Bad input (unparseable bytes, an unknown VR, missing UIDs, another study) is logged as a warning without a
    traceback; resource trouble (disk, memory) gets 0xA700, which a sender may retry; anything else is a bug in
    triage, logged with its traceback and answered 0x0110 Processing failure (PS3.18 Table I.2-2).
    """
    where = f"STOW-RS part {part.number} of {total}"
    if part.error is not None:
        logger.warning("%s refused (0x%04X): %s", where, DicomStatus.CANNOT_UNDERSTAND, part.error)
        return ("", "", int(DicomStatus.CANNOT_UNDERSTAND))

    try:
        content = read(part.start, part.end - part.start)
        ds = read_dataset_bytes(content)
        # The data set holds its own copy of every value; the in-memory file it was read from (pydicom keeps it
        # for deferred values, and none are deferred here) would keep the part's bytes alive as a second copy.
        buffer = getattr(ds, "buffer", None)
        if isinstance(buffer, io.BytesIO):
            buffer.close()
        del content, buffer
    except (OSError, MemoryError) as exc:
        status = status_for_exception(exc)
        logger.error("%s could not be read (0x%04X, resources): %s", where, status, _describe(exc))
        return ("", "", int(status))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes; all mean "cannot parse"
        logger.warning("%s cannot be parsed (0x%04X): %s", where, DicomStatus.CANNOT_UNDERSTAND, _describe(exc))
        return ("", "", int(DicomStatus.CANNOT_UNDERSTAND))

    sop_class, sop_instance = _part_uids(ds)
    try:
        _decode_every_element(ds)
    except MemoryError as exc:
        status = status_for_exception(exc)
        logger.error("%s, instance %r, could not be decoded (0x%04X, resources)", where, sop_instance, status)
        return (sop_class, sop_instance, int(status))
    except Exception as exc:  # noqa: BLE001 - an unknown VR, a value of the wrong length, bad character set...
        logger.warning(
            "%s, instance %r, cannot be decoded (0x%04X): %s",
            where,
            sop_instance,
            DicomStatus.CANNOT_UNDERSTAND,
            _describe(exc),
        )
        return (sop_class, sop_instance, int(DicomStatus.CANNOT_UNDERSTAND))

    try:
        if study_uid is not None:
            instance_study = str(ds.get("StudyInstanceUID", "") or "").strip()
            if instance_study != study_uid:
                raise InvalidStudyError(
                    f"instance {sop_instance!r} belongs to study {instance_study!r}, "
                    f"not to {study_uid!r} named in the request"
                )
        return store.write(ds, calling_ae=source)
    except TriageError as exc:
        status = status_for_exception(exc)
        logger.warning("%s, instance %r, refused (0x%04X): %s", where, sop_instance, status, _describe(exc))
        return (sop_class, sop_instance, int(status))
    except (OSError, MemoryError) as exc:
        status = status_for_exception(exc)
        logger.error("%s, instance %r, not stored (0x%04X, resources): %s", where, sop_instance, status, _describe(exc))
        return (sop_class, sop_instance, int(status))
    except Exception:
        logger.exception(
            "%s, instance %r, failed unexpectedly (0x%04X)", where, sop_instance, DicomStatus.PROCESSING_FAILURE
        )
        return (sop_class, sop_instance, int(DicomStatus.PROCESSING_FAILURE))


def _describe(exc: BaseException) -> str:
    """One line for the log: the error's first line (pydicom appends whole tracebacks to some messages)."""
    lines = str(exc).strip().splitlines()
    text = lines[0][:300] if lines else ""
    return text if isinstance(exc, TriageError) else f"{type(exc).__name__}: {text}"


def stow_instances(
    body: bytes | IO[bytes],
    content_type: str,
    store: InstanceWriter,
    base_url: str,
    *,
    study_uid: str | None = None,
    source: str = "STOW-RS",
) -> tuple[int, dict[str, Any]]:
    """Everything of a STOW-RS Store Instances transaction (PS3.18 10.5) except HTTP itself.

    Each part is parsed and written with `store.write(ds, calling_ae=source)` on its own: a part that fails, for
    whatever reason, gets its own entry in the Failed SOP Sequence and does not affect the others. Only one part
    is held in memory at a time. With `study_uid` (POST /studies/{study}), instances of another study are
    refused (0xA900).

    Args:
        body: the request body, as bytes or a seekable binary file (e.g. the file the request was spooled to).
        content_type: the request's Content-Type header.
        store: where instances go (a `DicomStore`).
        base_url: DICOMweb base URL for Retrieve URLs.
        study_uid: the study named in the request path, if any.
        source: recorded as the instances' calling AE (at most 16 characters are kept in the file).

    Returns:
        (HTTP status, DICOM JSON body): 200 all stored, 202 some failed, 409 none stored (PS3.18 Table 10.5.3-1);
        415 wrong media type and 400 malformed multipart framing, each with {"error": message}.
    """
    stream: IO[bytes] = io.BytesIO(body) if isinstance(body, bytes | bytearray | memoryview) else body
    try:
        parts = split_multipart_related(stream, content_type)
    except UnsupportedInputError as exc:
        return 415, {"error": str(exc)}
    except InvalidStudyError as exc:
        return 400, {"error": str(exc)}
    reader = _Body(stream)

    stored: list[StoredInstance] = []
    failures: list[Failure] = []
    for part in parts:
        outcome = _store_part(part, reader.read, len(parts), store, study_uid, source)
        if isinstance(outcome, StoredInstance):
            stored.append(outcome)
        else:
            failures.append(outcome)

    if not failures:
        http_status = 200
    elif stored:
        http_status = 202
    else:
        http_status = 409
    if failures:
        logger.info("STOW-RS: %d of %d parts stored, %d failed", len(stored), len(parts), len(failures))
    return http_status, build_stow_response(stored, failures, base_url)
