"""STOW-RS without HTTP: receive a multipart/related body part by part, store each, build the DICOM JSON answer."""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from pydicom.dataset import Dataset
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError

from triage.dicom.status import DicomStatus, status_for_exception
from triage.dicom.store import StoredInstance, read_dataset_bytes, validate_uid
from triage.errors import InvalidStudyError, TriageError, UnsupportedInputError

logger = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
_ACCEPTED_PART_ENCODINGS = ("", "binary", "8bit", "7bit")

# The parts of one request keep at most this many bytes in memory together; the rest goes to temporary files.
DEFAULT_SPOOL_MEMORY_BYTES = 8 * 1024**2
# A body held in a file or in memory is handed to the parser in blocks of this size.
_FEED_BLOCK_BYTES = 1 << 20
# The header section of one part: a STOW-RS sender may add Content-Length, Content-Location, Content-ID and
# Content-Description to Content-Type, more than python-multipart's default of 8 header lines allows for.
_MAX_PART_HEADERS = 32
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


def _part_refusal(number: int, headers: dict[str, str]) -> TriageError | None:
    """Why part `number` cannot be taken, from its own header fields (names in lower case), or None.

    A part may omit Content-Type (the request's type applies); `application/dicom` may carry a transfer-syntax
    parameter (PS3.18 8.7.3.5), which names the encoding the Part-10 File Meta states anyway.
    """
    media_type, _ = _content_type_parts(headers.get("content-type", DICOM_MEDIA_TYPE))
    if media_type != DICOM_MEDIA_TYPE:
        return UnsupportedInputError(
            f"part {number} has Content-Type {headers.get('content-type')!r}; only {DICOM_MEDIA_TYPE} is accepted"
        )
    encoding = headers.get("content-transfer-encoding", "").lower()
    if encoding not in _ACCEPTED_PART_ENCODINGS:
        return UnsupportedInputError(
            f"part {number} has Content-Transfer-Encoding {encoding!r}; only binary is accepted"
        )
    return None


@dataclass(eq=False)
class ReceivedPart:
    """One body part of a STOW-RS request: its content in a spooled temporary file, or why it was refused.

    `error` is set when the part's own header fields make it unusable (another media type, base64); its content
    is then not kept, and the other parts are not affected.
    """

    number: int
    error: TriageError | None = None
    size: int = 0
    content: IO[bytes] | None = field(default=None, repr=False)

    def read(self) -> bytes:
        """The part's content, read back from its spool file (one instance in memory)."""
        if self.content is None:
            return b""
        self.content.seek(0)
        return self.content.read()

    def close(self) -> None:
        """Let go of the spool file (unlinked on creation: closing it frees the disk space)."""
        if self.content is not None:
            self.content.close()
            self.content = None


class MultipartRelatedReceiver:
    """A STOW-RS request body (PS3.18 10.5), taken chunk by chunk as it arrives and split into its parts.

    python-multipart's streaming `MultipartParser` finds the delimiters (RFC 2046 5.1.1: the CRLF before a
    delimiter belongs to it, whitespace may follow it on its line, a line that only starts like it is content,
    anything after the closing delimiter is ignored) and reads each part's header fields. Each part's content
    goes to its own spooled temporary file in `spool_dir`. A request whose parts together fit in
    `spool_memory_bytes` stays in memory; once they outgrow it, every part goes to disk, so memory stays about
    one instance whatever the size of the body.

    Nothing is stored here: a body that breaks off before its closing delimiter (a dropped upload) is refused
    whole by `finish`, so that none of it is half-stored. Line ends must be CRLF, as RFC 2046 requires.

    Use it as a context manager, or call `close`: the spool files go when it is closed.
    """

    def __init__(
        self,
        content_type: str,
        *,
        spool_dir: Path | str | None = None,
        spool_memory_bytes: int = DEFAULT_SPOOL_MEMORY_BYTES,
    ) -> None:
        """Check the request's Content-Type and get ready for its body.

        Raises:
            UnsupportedInputError: the request is not multipart/related with type application/dicom.
            InvalidStudyError: no or an invalid boundary.
        """
        self.boundary = request_boundary(content_type)
        self._spool_dir = None if spool_dir is None else str(spool_dir)
        self._memory_left = spool_memory_bytes
        self._in_memory: list[ReceivedPart] = []  # complete parts whose content is still in memory
        self._parts: list[ReceivedPart] = []
        self._current: ReceivedPart | None = None
        self._current_max_memory = 0
        self._headers: dict[str, str] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._number = 0  # real parts begun so far (the skipped preamble part is not one)
        self._skipping = False  # the next part the parser begins is a skipped one (see `_start_parser`)
        self._in_skipped = False  # the parser is in a skipped part: its content is dropped
        self._in_headers = False  # the parser is in a real part's header section
        self._framing_errors: list[str] = []
        self._ended = False
        self._received = 0
        self._parser = self._start_parser()

    def _start_parser(self) -> MultipartParser:
        """A new parser, primed so that everything up to the next delimiter is skipped.

        RFC 2046 5.1.1: the preamble before the first delimiter is ignored, and that delimiter is found at the
        start of the body or after a CRLF. python-multipart wants the body to start with the delimiter, so it is
        first told of a part without header fields, then given a CRLF ahead of the body: the preamble (if any) is
        that skipped part's content, the first delimiter ends it, and the parser's own delimiter matching (and
        tolerance of whitespace after a delimiter) applies to the first delimiter line as to all others. The same
        priming lets the receiver read on after a part whose header section is broken (see `feed`).
        """
        parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_begin": self._on_header_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=_MAX_PART_HEADERS,
            max_header_size=_MAX_PART_HEADER_BYTES,
        )
        self._skipping = True
        parser.write(b"--" + self.boundary + b"\r\n\r\n\r\n")
        return parser

    def feed(self, chunk: bytes) -> None:
        """Parse the next piece of the body and write what it holds of each part's content to that part's file.

        A part whose header section is broken (not header lines, a blank line, then content; or far too long) is
        refused on its own, with the reason, and the receiver reads on from the next delimiter: the parts after
        it get their own outcomes.

        Raises:
            InvalidStudyError: the framing itself is broken (a delimiter line that does not end in CRLF, bare LF
                line ends): where the next part starts cannot be trusted, so the request is refused whole.
            OSError: a spool file cannot be written (the disk under `spool_dir` is full).
        """
        data = chunk
        while data:
            try:
                self._parser.write(data)
                break
            except MultipartParseError as exc:
                offset = min(max(getattr(exc, "offset", 0) or 0, 0), len(data))
                at = self._received + len(chunk) - len(data) + offset
                if not self._in_headers:
                    part = max(self._number, 1)
                    raise InvalidStudyError(
                        f"the multipart body is malformed near byte {at}, in part {part}: {exc}; each part is header "
                        "lines, a blank line, then its content, with CRLF line ends (RFC 2046 5.1.1)"
                    ) from exc
                # This part alone is refused; what is left of it, up to the next delimiter, is skipped.
                number = self._number
                reason = f"part {number} has a malformed header section near byte {at} ({exc})"
                self._framing_errors.append(reason)
                self._parts.append(ReceivedPart(number, InvalidStudyError(
                    f"{reason}: each part is header lines, a blank line, then its content, with CRLF line ends"
                    " (RFC 2046 5.1.1); the other parts were read on"
                )))  # fmt: skip
                self._in_headers = False
                self._parser = self._start_parser()
                data = data[offset:]
        self._received += len(chunk)

    def finish(self) -> list[ReceivedPart]:
        """The parts, in order, once the whole body has been fed; each with its content or its refusal.

        Raises:
            InvalidStudyError: no part, or no closing delimiter (a truncated upload): the framing itself is broken.
        """
        boundary = self.boundary.decode("latin-1")
        if not self._ended:
            if self._number == 0:
                raise InvalidStudyError(
                    f"the body contains no part delimited by boundary {boundary!r} "
                    "(a delimiter line starts a line and ends in CRLF, RFC 2046 5.1.1)"
                )
            complete = len(self._parts) - (1 if self._current is not None else 0)
            raise InvalidStudyError(
                f"the body ends without the closing boundary '--{boundary}--' (truncated upload?) "
                f"after {complete} complete parts; nothing was stored"
            )
        if not self._parts:
            raise InvalidStudyError("the multipart body has no parts")
        return list(self._parts)

    def close(self) -> None:
        for part in self._parts:
            part.close()

    def __enter__(self) -> MultipartRelatedReceiver:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # python-multipart's callbacks: data callbacks get (buffer, start, end), possibly several per header or part.

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._in_skipped = self._skipping
        self._skipping = False
        if not self._in_skipped:
            self._number += 1
            self._in_headers = True

    def _on_header_begin(self) -> None:
        self._header_field.clear()
        self._header_value.clear()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._headers[name] = self._header_value.decode("latin-1").strip()

    def _on_headers_finished(self) -> None:
        self._in_headers = False
        if self._in_skipped:
            return  # the preamble, or the rest of a part whose header section was broken: its content is dropped
        number = self._number
        part = ReceivedPart(number, _part_refusal(number, self._headers))
        if part.error is None:
            part.content = self._spool_file()
        self._parts.append(part)
        self._current = part

    def _spool_file(self) -> IO[bytes]:
        """A spooled file for the next part: in memory while the request's memory allowance lasts."""
        self._current_max_memory = max(self._memory_left, 0)
        # The file belongs to the part, which closes it (ReceivedPart.close, or this receiver's close).
        spool = tempfile.SpooledTemporaryFile(max_size=self._current_max_memory, dir=self._spool_dir)  # noqa: SIM115
        if self._current_max_memory == 0:
            spool.rollover()  # straight to disk (for a SpooledTemporaryFile, max_size=0 means "never")
        return spool

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is not None and part.content is not None:
            part.content.write(data[start:end])
            part.size += end - start

    def _on_part_end(self) -> None:
        part, self._current = self._current, None
        if part is None or part.content is None:
            return
        if part.size <= self._current_max_memory:  # still in memory (a SpooledTemporaryFile rolls over past it)
            self._in_memory.append(part)
            self._memory_left -= part.size
            return
        # The request has outgrown its memory allowance: the parts kept so far go to disk too, and all after them.
        for kept in self._in_memory:
            if isinstance(kept.content, tempfile.SpooledTemporaryFile):
                kept.content.rollover()
        self._in_memory.clear()
        self._memory_left = 0

    def _on_end(self) -> None:
        self._ended = True


def _chunks(body: bytes | IO[bytes] | Iterable[bytes]) -> Iterator[bytes]:
    """A body given whole, as a binary file or as chunks, in pieces for `MultipartRelatedReceiver.feed`."""
    if isinstance(body, bytes | bytearray | memoryview):
        whole = bytes(body)
        for start in range(0, len(whole), _FEED_BLOCK_BYTES):
            yield whole[start : start + _FEED_BLOCK_BYTES]
    elif hasattr(body, "read"):
        while block := body.read(_FEED_BLOCK_BYTES):
            yield block
    else:
        yield from body


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
    part: ReceivedPart,
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
        content = part.read()
        part.close()  # its spool file is not needed any more: the disk space goes back before the next part
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


def store_received(
    parts: list[ReceivedPart],
    store: InstanceWriter,
    base_url: str,
    *,
    study_uid: str | None = None,
    source: str = "STOW-RS",
) -> tuple[int, dict[str, Any]]:
    """Store the parts of a received STOW-RS request one at a time and answer for each (PS3.18 10.5.3).

    Each part is parsed and written with `store.write(ds, calling_ae=source)` on its own: a part that fails, for
    whatever reason, gets its own entry in the Failed SOP Sequence and does not affect the others. Only one part
    is held in memory at a time, and each part's spool file is closed once it has been read. `store.write` returns
    once the instance is durable, so the answer promises only what is on disk. With `study_uid`
    (POST /studies/{study}), instances of another study are refused (0xA900).

    Returns:
        (HTTP status, DICOM JSON body): 200 all stored, 202 some failed, 409 none stored (PS3.18 Table 10.5.3-1).
    """
    stored: list[StoredInstance] = []
    failures: list[Failure] = []
    for part in parts:
        outcome = _store_part(part, len(parts), store, study_uid, source)
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


def stow_instances(
    body: bytes | IO[bytes] | Iterable[bytes],
    content_type: str,
    store: InstanceWriter,
    base_url: str,
    *,
    study_uid: str | None = None,
    source: str = "STOW-RS",
    spool_dir: Path | str | None = None,
    spool_memory_bytes: int = DEFAULT_SPOOL_MEMORY_BYTES,
) -> tuple[int, dict[str, Any]]:
    """Everything of a STOW-RS Store Instances transaction (PS3.18 10.5) except HTTP itself.

    The body is split as it is read (`MultipartRelatedReceiver`), then the parts are stored one at a time
    (`store_received`); the HTTP route does the same with the request's chunks as they arrive.

    Args:
        body: the request body: bytes, a binary file, or its chunks in order (e.g. as they came off the socket).
        content_type: the request's Content-Type header.
        store: where instances go (a `DicomStore`).
        base_url: DICOMweb base URL for Retrieve URLs.
        study_uid: the study named in the request path, if any.
        source: recorded as the instances' calling AE (at most 16 characters are kept in the file).
        spool_dir: where parts go once they outgrow `spool_memory_bytes` (default: the system's temporary folder).
        spool_memory_bytes: how much of the request's parts may stay in memory.

    Returns:
        (HTTP status, DICOM JSON body): 200 all stored, 202 some failed, 409 none stored (PS3.18 Table 10.5.3-1);
        415 wrong media type and 400 malformed multipart framing (nothing stored), each with {"error": message}.

    Raises:
        OSError: a part could not be spooled (the disk under `spool_dir` is full); nothing was stored.
    """
    try:
        with MultipartRelatedReceiver(
            content_type, spool_dir=spool_dir, spool_memory_bytes=spool_memory_bytes
        ) as received:
            for chunk in _chunks(body):
                received.feed(chunk)
            parts = received.finish()
            return store_received(parts, store, base_url, study_uid=study_uid, source=source)
    except UnsupportedInputError as exc:
        return 415, {"error": str(exc)}
    except InvalidStudyError as exc:
        return 400, {"error": str(exc)}
