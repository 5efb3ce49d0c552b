"""The durable instance store: validate a received instance, write it atomically as a Part-10 file, index it."""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from triage.config import DicomSettings
from triage.dicom.phi import hash_identifier
from triage.dicom.sopclasses import (
    ACCEPTED_SOP_CLASSES,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PIXEL_DATA_KEYWORDS,
    SOURCE_INFO_CREATOR_UID,
    is_accepted_transfer_syntax,
    is_image_sop_class,
    is_native_transfer_syntax,
    resolve_sop_classes,
    sop_class_name,
)
from triage.dicom.status import CannotUnderstandError
from triage.domain import InstanceMeta
from triage.errors import InvalidStudyError, TriageError, UnsupportedInputError
from triage.storage import UID_MAX_CHARS, UID_PATTERN, LocalStore, Store, instance_key, key_name

logger = logging.getLogger(__name__)

# PS3.5 9.1: a UID is dot-separated digit components, at most 64 characters. Checking this strictly also
# makes a UID safe as a path component: no "/", no "..", no empty name.
_UID_PATTERN = UID_PATTERN
_UID_MAX_CHARS = UID_MAX_CHARS
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, the first bytes of encapsulated Pixel Data (PS3.5 A.4)
_ITEM_TAG_BE = b"\xff\xfe\xe0\x00"
_SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0"
# What the first fragment of a frame starts with, per compressed transfer syntax (checked without decoding):
# JPEG SOI marker (ISO 10918-1 B.2.1, also JPEG-LS: ISO 14495-1 C.1), JPEG 2000 codestream SOC+SIZ markers or
# a JP2 signature box (ISO 15444-1 A.4.1, I.5.1); RLE has a 64-byte header instead (PS3.5 G.5).
_JPEG_SOI = (b"\xff\xd8",)
_J2K_STARTS = (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")
_FRAME_STARTS: dict[str, tuple[bytes, ...]] = {
    "1.2.840.10008.1.2.4.50": _JPEG_SOI,
    "1.2.840.10008.1.2.4.51": _JPEG_SOI,
    "1.2.840.10008.1.2.4.57": _JPEG_SOI,
    "1.2.840.10008.1.2.4.70": _JPEG_SOI,
    "1.2.840.10008.1.2.4.80": _JPEG_SOI,
    "1.2.840.10008.1.2.4.81": _JPEG_SOI,
    "1.2.840.10008.1.2.4.90": _J2K_STARTS,
    "1.2.840.10008.1.2.4.91": _J2K_STARTS,
}
_RLE = "1.2.840.10008.1.2.5"
_REASON_MAX_CHARS = 240


def parse_reason(exc: BaseException) -> str:
    """pydicom's reason for a parse failure in one line: its messages can carry a whole traceback as text
    (`tag_in_exception`), which must not reach a log line or an Error Comment."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:_REASON_MAX_CHARS]


@dataclass(frozen=True)
class StorePolicy:
    """What a site accepts into its store: the SOP classes, and the limits checked before any pixel is decoded.

    A pixel bomb (a few kilobytes of compressed data declaring 65535 x 65535 pixels) would make a decoder
    allocate gigabytes in the pipelines or the preview; refusing it at the door means every stored instance is
    safe to decode.
    """

    accepted_sop_classes: frozenset[str] = ACCEPTED_SOP_CLASSES
    max_image_dimension_px: int = 16384
    max_frames: int = 10000
    max_decoded_bytes: int = 2 * 1024**3

    @classmethod
    def from_settings(cls, settings: DicomSettings) -> StorePolicy:
        """The policy of `settings` (accepted SOP classes by UID or keyword; empty: all).

        Raises:
            ValueError: a name in `accepted_sop_classes` is not a storage SOP class (quoted).
        """
        return cls(
            accepted_sop_classes=resolve_sop_classes(list(settings.accepted_sop_classes)),
            max_image_dimension_px=int(settings.max_image_dimension_px),
            max_frames=int(settings.max_frames),
            max_decoded_bytes=int(settings.max_decoded_bytes),
        )


DEFAULT_POLICY = StorePolicy()


@dataclass(frozen=True)
class StoredInstance:
    """One instance written to the store: what was indexed, and whether it had been indexed before."""

    meta: InstanceMeta
    duplicate: bool


def validate_uid(value: object, keyword: str) -> str:
    """Return `value` as a UID string, or raise if it is not a valid DICOM UID.

    Raises:
        InvalidStudyError: when the value is missing, longer than 64 characters, or not dot-separated digits
            (which is also what keeps a UID from being used for path traversal in the store).
    """
    text = "" if value is None else str(value).strip().rstrip("\x00")
    if not text:
        raise InvalidStudyError(f"{keyword} is missing or empty; every stored instance needs one")
    if len(text) > _UID_MAX_CHARS or not _UID_PATTERN.match(text):
        raise InvalidStudyError(
            f"{keyword} is not a valid UID: {text[:80]!r} (PS3.5 9.1: digits and dots, at most 64 characters)"
        )
    return text


def transfer_syntax_of(ds: Dataset) -> str:
    """The transfer syntax `ds` is encoded in: its File Meta's, else the encoding it was read with.

    A dataset built in memory with neither is written as Explicit VR Little Endian.
    """
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        return str(file_meta.TransferSyntaxUID).strip()
    implicit, little = ds.original_encoding
    if implicit is None:
        return ExplicitVRLittleEndian
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def check_complete(ds: Dataset) -> None:
    """Reject a dataset that was read from truncated bytes.

    pydicom reads a truncated value silently, giving fewer bytes than the element's length says. Compare the
    two for every top-level element that has not been decoded yet (a defined-length sequence is one element
    here, so truncation inside it is caught too).

    Raises:
        InvalidStudyError: naming the first element whose value is shorter than its declared length.
    """
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if not isinstance(element, RawDataElement):
            continue
        if element.length == _UNDEFINED_LENGTH or not isinstance(element.value, bytes | bytearray):
            continue
        if len(element.value) < element.length:
            raise InvalidStudyError(
                f"truncated data: element {element.tag} declares {element.length} bytes "
                f"but only {len(element.value)} are present"
            )


def _int_attribute(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise InvalidStudyError(
                f"image without {keyword}: it cannot be decoded (SOP Instance UID {ds.get('SOPInstanceUID', '')!s})"
            )
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise CannotUnderstandError(f"{keyword} is not a number: {str(value)[:40]!r}") from exc


def declared_pixel_bytes(ds: Dataset) -> int:
    """The decoded size of an image's pixels as its header declares it: rows x columns x samples x bits x frames.

    Reads the header only, so it is safe on any instance whatever its Pixel Data holds.

    Raises:
        InvalidStudyError: Rows, Columns or Bits Allocated missing, or a dimension that is not positive.
        CannotUnderstandError: one of them is not a number.
    """
    rows = _int_attribute(ds, "Rows")
    columns = _int_attribute(ds, "Columns")
    bits_allocated = _int_attribute(ds, "BitsAllocated")
    samples = _int_attribute(ds, "SamplesPerPixel", 1) or 1
    frames = _int_attribute(ds, "NumberOfFrames", 1) or 1
    if min(rows, columns, bits_allocated, samples, frames) < 1:
        raise InvalidStudyError(
            f"image dimensions must be positive: Rows {rows}, Columns {columns}, Bits Allocated {bits_allocated}, "
            f"Samples per Pixel {samples}, Number of Frames {frames}"
        )
    return (rows * columns * samples * frames * bits_allocated + 7) // 8


def check_decode_limits(ds: Dataset, policy: StorePolicy = DEFAULT_POLICY) -> None:
    """Refuse an image whose declared size is beyond the site's limits, before anything decodes its pixels.

    Raises:
        CannotUnderstandError: Rows or Columns above `max_image_dimension_px`, Number of Frames above
            `max_frames`, or the declared decoded size above `max_decoded_bytes` (each quoted with its limit).
        InvalidStudyError: the image attributes are missing or not positive.
    """
    decoded = declared_pixel_bytes(ds)
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = _int_attribute(ds, "NumberOfFrames", 1) or 1
    if max(rows, columns) > policy.max_image_dimension_px:
        raise CannotUnderstandError(
            f"image of {rows} x {columns} pixels exceeds the limit of {policy.max_image_dimension_px} per side "
            "(refused before decoding; TRIAGE_DICOM__MAX_IMAGE_DIMENSION_PX)"
        )
    if frames > policy.max_frames:
        raise CannotUnderstandError(
            f"{frames} frames exceed the limit of {policy.max_frames} (refused before decoding; "
            "TRIAGE_DICOM__MAX_FRAMES)"
        )
    if decoded > policy.max_decoded_bytes:
        raise CannotUnderstandError(
            f"decoded pixels would take {decoded} bytes, above the limit of {policy.max_decoded_bytes} "
            "(refused before decoding; TRIAGE_DICOM__MAX_DECODED_BYTES)"
        )


def check_encoding(ds: Dataset, syntax: str) -> None:
    """Refuse a data set whose bytes are not in the transfer syntax it was received in.

    pydicom reads Implicit VR data sent as Explicit (and the reverse) by guessing from the first element, and
    only fails on writing (or writes what the sender never meant); the sender's data disagree with the
    negotiated transfer syntax (PS3.5 10.1).

    Raises:
        CannotUnderstandError: naming both encodings.
    """
    declared = UID(syntax)
    if not declared.is_transfer_syntax or declared.is_deflated:
        return
    # Each element read from bytes keeps the encoding it was found in; the data set's own record of it may
    # have been set from the presentation context afterwards (pynetdicom does), so ask the elements.
    implicit, little = ds.original_encoding
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement):
            implicit, little = element.is_implicit_VR, element.is_little_endian
            break
    if implicit is None:
        return
    if bool(implicit) != declared.is_implicit_VR or bool(little) != declared.is_little_endian:
        encoding = f"{'Implicit' if implicit else 'Explicit'} VR {'Little' if little else 'Big'} Endian"
        raise CannotUnderstandError(f"the data set is encoded {encoding} but declared {declared.name} (PS3.5 10.1)")


def check_decodable(ds: Dataset) -> None:
    """Decode every data element's value (not pixels), recursively, so that an unknown VR or a value that
    cannot be read is found now rather than by a later reader.

    Raises:
        CannotUnderstandError: quoting pydicom's reason and the element.
    """

    def visit(dataset: Dataset, element: object) -> None:
        return None

    try:
        ds.walk(visit)
    except TriageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises NotImplementedError, KeyError, ValueError, struct.error ...
        raise CannotUnderstandError(f"cannot decode a data element: {parse_reason(exc)}") from exc


def check_encapsulated(pixel_data: bytes, syntax: str, frames: int, sop_instance: str) -> None:
    """Check the structure of encapsulated Pixel Data (PS3.5 A.4) without decoding a frame.

    The value must start with the Basic Offset Table item, hold at least one fragment per frame in whole items,
    and the first fragment must start as the codec's data do.

    Raises:
        CannotUnderstandError: what is wrong, quoting the instance.
    """
    view = memoryview(pixel_data)
    if bytes(view[:4]) not in (_ITEM_TAG_LE, _ITEM_TAG_BE):
        raise CannotUnderstandError(
            f"Pixel Data not encapsulated although the transfer syntax {UID(syntax).name} is compressed "
            f"(PS3.5 A.4; instance {sop_instance!r})"
        )
    fragments: list[memoryview] = []
    position = 0
    end = len(view)
    first = True
    while True:
        if position == end:
            break  # pydicom's value stops before the Sequence Delimitation Item
        if position + 8 > end:
            raise CannotUnderstandError(
                f"encapsulated Pixel Data ends inside an item header (instance {sop_instance!r})"
            )
        tag = bytes(view[position : position + 4])
        length = int.from_bytes(view[position + 4 : position + 8], "little")
        position += 8
        if tag == _SEQUENCE_DELIMITER_LE:
            break
        if tag != _ITEM_TAG_LE or length == _UNDEFINED_LENGTH or position + length > end:
            raise CannotUnderstandError(
                f"malformed item in encapsulated Pixel Data at byte {position - 8} (instance {sop_instance!r})"
            )
        if not first:
            fragments.append(view[position : position + length])
        first = False
        position += length
    if len(fragments) < frames or any(len(f) == 0 for f in fragments[:1]):
        raise CannotUnderstandError(
            f"encapsulated Pixel Data has {len(fragments)} fragment(s) for {frames} frame(s), or an empty first "
            f"fragment (PS3.5 A.4: at least one fragment per frame; instance {sop_instance!r})"
        )
    head = bytes(fragments[0][:64])
    starts = _FRAME_STARTS.get(str(syntax))
    if starts is not None and not head.startswith(starts):
        raise CannotUnderstandError(
            f"the first fragment is not {UID(syntax).name} data (it starts {head[:4].hex()}; instance {sop_instance!r})"
        )
    if str(syntax) == _RLE:
        segments = int.from_bytes(head[:4], "little") if len(head) == 64 else 0
        if not 1 <= segments <= 15 or int.from_bytes(head[4:8], "little") != 64:
            raise CannotUnderstandError(
                f"the first fragment has no valid RLE header (PS3.5 G.5; instance {sop_instance!r})"
            )


def validate_instance(ds: Dataset, policy: StorePolicy = DEFAULT_POLICY) -> None:
    """Check that `ds` is an instance triage can store and later read, without decoding its pixels.

    Checks, in order: the bytes were complete; SOP Class UID present, valid and accepted by `policy`; SOP
    Instance, Study Instance and Series Instance UIDs present and valid; the File Meta (if any) names the same
    SOP instance; the transfer syntax is accepted and the data are really encoded in it; every element can be
    decoded; image SOP classes carry pixels within the policy's decode limits, of the length their attributes
    imply (native transfer syntaxes) or as well-formed fragments (compressed ones).

    Any failure of pydicom itself while doing so is wrapped into CannotUnderstandError: bad input is refused
    permanently, never answered as if it were a resource problem.

    Raises:
        UnsupportedInputError: the SOP class or transfer syntax is not one triage accepts.
        CannotUnderstandError: the bytes cannot be parsed in their transfer syntax, or the image is beyond the
            decode limits.
        InvalidStudyError: anything else, quoting the offending value.
    """
    try:
        _validate(ds, policy)
    except TriageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises NotImplementedError, KeyError, ValueError, struct.error ...
        raise CannotUnderstandError(f"cannot parse the data set: {parse_reason(exc)}") from exc


def _validate(ds: Dataset, policy: StorePolicy) -> None:
    check_complete(ds)
    check_encoding(ds, transfer_syntax_of(ds))
    sop_class = validate_uid(ds.get("SOPClassUID"), "SOP Class UID (0008,0016)")
    if sop_class not in policy.accepted_sop_classes:
        scope = "this site accepts" if policy.accepted_sop_classes != ACCEPTED_SOP_CLASSES else "not a storage class"
        raise UnsupportedInputError(
            f"SOP class not accepted: {sop_class_name(sop_class)} ({sop_class!r}); {scope} "
            "(TRIAGE_DICOM__ACCEPTED_SOP_CLASSES)"
        )
    sop_instance = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)")
    validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID (0020,000D)")
    validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID (0020,000E)")

    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        meta_instance = str(file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip().rstrip("\x00")
        if meta_instance and meta_instance != sop_instance:
            raise InvalidStudyError(
                f"SOP Instance UID mismatch: the request or File Meta names {meta_instance!r}, "
                f"the data set {sop_instance!r}"
            )
        meta_class = str(file_meta.get("MediaStorageSOPClassUID", "") or "").strip().rstrip("\x00")
        if meta_class and meta_class != sop_class:
            raise InvalidStudyError(
                f"SOP Class UID mismatch: the request or File Meta names {meta_class!r}, the data set {sop_class!r}"
            )

    syntax = transfer_syntax_of(ds)
    if not is_accepted_transfer_syntax(syntax):
        raise UnsupportedInputError(
            f"transfer syntax not accepted: {UID(syntax).name} ({syntax!r}); "
            "see triage.dicom.sopclasses.ACCEPTED_TRANSFER_SYNTAXES"
        )
    check_decodable(ds)

    if not is_image_sop_class(sop_class):
        return
    keyword = next((k for k in PIXEL_DATA_KEYWORDS if k in ds), None)
    pixel_data = ds.get(keyword) if keyword else None
    if not pixel_data:
        raise InvalidStudyError(
            f"no Pixel Data (7FE0,0010) in {sop_class_name(sop_class)} instance {sop_instance!r} "
            "(an image SOP class must carry it; the data may also be truncated)"
        )
    # The decode limits are not checked here: an image beyond them is stored (its bytes are small; only decoding
    # it would be costly) and listed, and every reader refuses it before decoding (`check_decode_limits`).
    expected = declared_pixel_bytes(ds)
    if keyword != "PixelData" or is_native_transfer_syntax(syntax):
        if len(pixel_data) < expected:
            raise InvalidStudyError(
                f"truncated Pixel Data: {len(pixel_data)} bytes where Rows, Columns, Samples per Pixel, "
                f"Bits Allocated and Number of Frames imply {expected} (instance {sop_instance!r})"
            )
    else:
        frames = _int_attribute(ds, "NumberOfFrames", 1) or 1
        check_encapsulated(bytes(pixel_data), syntax, frames, sop_instance)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _requested_priority(ds: Dataset) -> str:
    """(0040,1003) Requested Procedure Priority, at the top level or in the Request Attributes Sequence."""
    priority = _text(ds, "RequestedProcedurePriority")
    if priority:
        return priority
    for item in ds.get("RequestAttributesSequence", None) or []:
        priority = _text(item, "RequestedProcedurePriority")
        if priority:
            return priority
    return ""


def extract_meta(ds: Dataset, key: str, calling_ae: str, salt: str) -> InstanceMeta:
    """What the store indexes about one instance: UIDs, descriptions, routing hints; no patient identity.

    The Patient ID enters only as `hash_identifier(PatientID, salt)`; names and birth dates are never read.

    Args:
        ds: the received instance (validated).
        key: where it is stored (its store key, or a file path for a folder outside the store).
        calling_ae: the AE title (or "STOW") it came from.
        salt: the site's `phi_salt`.
    """
    return InstanceMeta(
        study_uid=validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID (0020,000D)"),
        series_uid=validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID (0020,000E)"),
        sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)"),
        sop_class_uid=validate_uid(ds.get("SOPClassUID"), "SOP Class UID (0008,0016)"),
        modality=_text(ds, "Modality").upper(),
        key=str(key),
        accession_number=_text(ds, "AccessionNumber"),
        patient_hash=hash_identifier(_text(ds, "PatientID"), salt),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined").upper(),
        requested_priority=_requested_priority(ds),
        calling_ae=(calling_ae or "").strip(),
        institution=_text(ds, "InstitutionName"),
        transfer_syntax_uid=transfer_syntax_of(ds),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        indication=_indication(ds),
    )


def _indication(ds: Dataset) -> str:
    """The clinical indication: Reason for the Requested Procedure (0040,1002), from the data set or its Request
    Attributes Sequence, else the Admitting Diagnoses Description (0008,1080)."""
    reason = _text(ds, "ReasonForTheRequestedProcedure")
    if reason:
        return reason
    for item in ds.get("RequestAttributesSequence", None) or []:
        reason = _text(item, "ReasonForTheRequestedProcedure")
        if reason:
            return reason
    return _text(ds, "AdmittingDiagnosesDescription")


def read_dataset_bytes(data: bytes) -> Dataset:
    """Parse one instance from bytes: a Part-10 file, or a bare data set without preamble and File Meta.

    A bare data set is given File Meta with the transfer syntax it was found to be encoded in.

    Raises:
        CannotUnderstandError: when the bytes are empty or cannot be parsed.
        InvalidStudyError: when they are truncated.
    """
    if not data:
        raise CannotUnderstandError("the DICOM data is empty (0 bytes)")
    part10 = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = dcmread(BytesIO(data), force=not part10)
        check_complete(ds)
    except InvalidStudyError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many kinds (struct.error, zlib.error, ValueError, ...)
        raise CannotUnderstandError(f"cannot parse the DICOM data ({len(data)} bytes): {parse_reason(exc)}") from exc
    if len(ds) == 0:
        raise CannotUnderstandError(f"no DICOM data set found in {len(data)} bytes")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_of(ds))
    return ds


class GroupCommitter:
    """Shares the durable work of concurrent writers: one folder fsync per folder and one index transaction per
    batch, each writer waiting for its own instance's outcome.

    A C-STORE sender waits for each response before it sends the next instance, so one association gains
    nothing here; concurrent associations (or STOW requests) do: whatever arrived while the previous batch was
    being committed is committed together. A writer returns only after its folder is fsynced and the index
    transaction holding its instance has committed, so an acknowledged instance survives kill -9 exactly as
    before (PS3.4 B.2.3: success means the SCP has taken responsibility for the instance).

    There is no committer thread: the first writer that finds no batch in progress commits everything queued
    (its own instance included) and the others wait for it, so a lone writer pays no thread hand-off.

    Args:
        fsync_folders: makes the new entries of the given folders durable (`Store.fsync_folders`).
        index_many: indexes a batch in one transaction; one bool per instance (False: already indexed).
        max_batch: the most instances in one transaction.
    """

    def __init__(
        self,
        fsync_folders: Callable[[Iterable[str]], None],
        index_many: Callable[[Sequence[InstanceMeta]], list[bool]],
        max_batch: int = 512,
    ) -> None:
        self._fsync_folders = fsync_folders
        self._index_many = index_many
        self._max_batch = max(1, int(max_batch))
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._committing = False
        self._closed = False
        self.batches = 0  # committed batches, for the benchmark and tests
        self.largest_batch = 0

    def commit(self, folder: str, meta: InstanceMeta) -> bool:
        """Make `meta`'s instance (already written and fsynced in `folder`) durable and indexed; wait for it.

        Returns:
            False when its SOP Instance UID was already indexed.

        Raises:
            OSError: the folder fsync failed. Exception: the index's error for this instance.
        """
        pending = _Pending(folder, meta)
        with self._cond:
            if self._closed:
                raise TriageError("the store is closed")
            self._queue.append(pending)
            while not pending.done and self._committing:
                self._cond.wait()
            if not pending.done:
                # No batch in progress: this writer commits what is queued, its own instance among it.
                self._committing = True
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
        if not pending.done:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._committing = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        return pending.is_new

    def close(self) -> None:
        """Refuse new writes (those waiting are committed by their own writers)."""
        with self._cond:
            self._closed = True

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            try:
                self._fsync_folders([p.folder for p in batch])
            except BaseException as exc:
                for p in batch:
                    p.error = exc
                return
            try:
                results = self._index_many([p.meta for p in batch])
                for p, is_new in zip(batch, results, strict=True):
                    p.is_new = is_new
            except BaseException as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                    return
                # One instance the index refuses must not fail the others: each on its own then.
                logger.warning("batched index of %d instances failed (%s); indexing them one by one", len(batch), exc)
                for p in batch:
                    try:
                        (p.is_new,) = self._index_many([p.meta])
                    except BaseException as single:
                        p.error = single
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
        finally:
            for p in batch:
                p.done = True


@dataclass
class _Pending:
    folder: str
    meta: InstanceMeta
    is_new: bool = False
    error: BaseException | None = None
    done: bool = False


class DicomStore:
    """Receives instances into a `Store` (a `LocalStore` folder by default) and indexes them.

    The layout belongs to the store: an instance is the key <StudyInstanceUID>/<SeriesInstanceUID>/
    <SOPInstanceUID>.dcm, and only the key reaches the index. `write` returns only once the instance is durable
    (fsynced, atomically renamed, folder fsynced) and indexed: a storage SCP's success response tells the sender
    it may forget the instance (PS3.4 Annex B). With `index_many`, concurrent writers share the folder fsyncs
    and the index transaction (`GroupCommitter`).

    Args:
        root: the store, or the folder of a `LocalStore` (created if missing).
        salt: the site's `phi_salt` for the patient hash.
        index: records an instance; returns False when its SOP Instance UID was already indexed.
        policy: the SOP classes accepted and the decode limits (`StorePolicy.from_settings(settings.dicom)`).
        index_many: records a batch of instances in one transaction (one bool each); enables group commit.
    """

    def __init__(
        self,
        root: Path | Store,
        salt: str,
        index: Callable[[InstanceMeta], bool],
        policy: StorePolicy = DEFAULT_POLICY,
        index_many: Callable[[Sequence[InstanceMeta]], list[bool]] | None = None,
    ) -> None:
        self.files: Store = LocalStore(root) if isinstance(root, str | Path) else root
        self.salt = salt
        self.index = index
        self.policy = policy
        self.committer = GroupCommitter(self.files.fsync_folders, index_many) if index_many is not None else None

    @property
    def root(self) -> Path:
        """The instance folder of a `LocalStore` (tests and tools; triage's readers use keys)."""
        return Path(self.files.root)  # type: ignore[attr-defined]

    def key_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """The key an instance is stored under (UIDs validated)."""
        return instance_key(
            validate_uid(study_uid, "Study Instance UID (0020,000D)"),
            validate_uid(series_uid, "Series Instance UID (0020,000E)"),
            validate_uid(sop_instance_uid, "SOP Instance UID (0008,0018)"),
        )

    def write(self, ds: Dataset, calling_ae: str = "", encoded: bytes | None = None) -> StoredInstance:
        """Validate, store and index one instance, in its received transfer syntax.

        With `encoded` (the data set's bytes exactly as received, in the transfer syntax of `ds.file_meta`, as a
        storage SCP has them; `ds` was decoded from them), the file is those bytes after this writer's File
        Meta: stored bit for bit as sent, and without encoding the data set again.

        A second copy of an instance already stored replaces the file (same SOP Instance UID: same
        instance) and is reported as `duplicate`.

        Bad data and resource trouble stay apart: whatever pydicom raises while reading, checking or encoding the
        instance becomes CannotUnderstandError (permanent); only OSError, MemoryError and failures of `index`
        pass through as they are (transient: the sender retries).

        Raises:
            UnsupportedInputError: SOP class or transfer syntax not accepted.
            CannotUnderstandError: the bytes cannot be parsed or encoded. (An image beyond the decode limits is
                stored and logged: its study is listed, and the readers refuse to decode it.)
            InvalidStudyError: the instance is malformed (see `validate_instance`).
            OSError: the file could not be written (disk full, read-only, permissions); nothing is indexed then.
        """
        validate_instance(ds, self.policy)
        try:
            key = self.key_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            syntax = transfer_syntax_of(ds)
            copied = copy.copy(ds)  # shallow: the caller's File Meta stays as it was
            copied.file_meta = self._file_meta(ds, syntax, calling_ae)
            meta = extract_meta(ds, key, calling_ae, self.salt)
        except (TriageError, MemoryError):
            raise
        except Exception as exc:
            raise CannotUnderstandError(f"cannot read the data set: {parse_reason(exc)}") from exc
        if is_image_sop_class(meta.sop_class_uid):
            try:
                check_decode_limits(ds, self.policy)
            except TriageError as exc:
                # Kept, so the study reaches the worklist; it is listed as not analysed with this reason.
                logger.warning("instance %s stored but will never be decoded: %s", meta.sop_instance_uid, exc)
        if encoded is not None:
            write = functools.partial(_write_received, self._file_meta(ds, syntax, calling_ae), encoded)
        else:
            write = functools.partial(_encode, copied)
        folder = self.files.put_instance(key, write)
        if self.committer is not None:
            is_new = self.committer.commit(folder, meta)
        else:
            self.files.fsync_folders([folder])
            is_new = self.index(meta)
        logger.debug(
            "stored instance %s of study %s%s", meta.sop_instance_uid, meta.study_uid, "" if is_new else " (duplicate)"
        )
        return StoredInstance(meta=meta, duplicate=not is_new)

    def close(self) -> None:
        """Commit what writers are waiting for and stop the group committer."""
        if self.committer is not None:
            self.committer.close()

    def instance_keys(self) -> Iterator[str]:
        """Every stored instance key, study by study (the store's listing)."""
        return self.files.instance_keys()

    def reindex(self) -> tuple[int, int, int]:
        """Offer every stored instance to `index` again, e.g. on start-up after the database was lost or restored.

        Reads headers only (no pixels). The sender (calling AE title, or STOW-RS client account) comes back from
        the File Meta, where `write` records it (`stored_source`), so a site recognised by it is recognised again.

        Returns:
            (newly indexed, already indexed, unreadable) instance counts; unreadable ones are logged, not raised.
        """
        new = known = unreadable = 0
        for key in self.files.instance_keys():
            try:
                with self.files.open(key) as handle:
                    ds = dcmread(handle, stop_before_pixels=True)
                calling_ae = stored_source(ds.file_meta)
                meta = extract_meta(ds, key, calling_ae, self.salt)
                if meta.key != key:
                    raise InvalidStudyError("its UIDs do not match where it is stored")
            except Exception as exc:
                unreadable += 1
                logger.warning("cannot re-index stored instance %s: %s", key_name(key), exc)
                continue
            if self.index(meta):
                new += 1
            else:
                known += 1
        logger.info("re-indexed the store: %d new, %d already indexed, %d unreadable", new, known, unreadable)
        return new, known, unreadable

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by a crash during a write; returns how many were removed."""
        return self.files.remove_stale_temp_files(older_than_s)

    @staticmethod
    def _file_meta(ds: Dataset, syntax: str, calling_ae: str) -> FileMetaDataset:
        """File Meta for the stored file (PS3.10 7.1): this writer's implementation, the received syntax."""
        file_meta = FileMetaDataset()
        file_meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
        file_meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
        file_meta.TransferSyntaxUID = UID(syntax)
        file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ae = (calling_ae or "").strip()
        if ae:
            file_meta.SourceApplicationEntityTitle = ae[:16]
            if len(ae) > 16:
                # The sender in full (a STOW-RS account) as PS3.10 private information of this implementation.
                file_meta.PrivateInformationCreatorUID = UID(SOURCE_INFO_CREATOR_UID)
                file_meta.PrivateInformation = json.dumps({"source": ae}).encode()
        return file_meta


def stored_source(file_meta: Dataset) -> str:
    """Who sent a stored instance, as `DicomStore.write` recorded it in the File Meta: the full sender kept in
    triage's private information, else the Source Application Entity Title."""
    if str(file_meta.get("PrivateInformationCreatorUID", "") or "") == SOURCE_INFO_CREATOR_UID:
        try:
            source = json.loads(bytes(file_meta.PrivateInformation).decode())["source"]
            if isinstance(source, str) and source.strip():
                return source.strip()
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return str(file_meta.get("SourceApplicationEntityTitle", "") or "").strip()


def _encode(ds: Dataset, handle: BinaryIO) -> None:
    """Write `ds` as a Part-10 file to `handle`.

    Raises:
        OSError: writing failed (resource trouble).
        CannotUnderstandError: pydicom could not encode the data set (bad data, nothing written).
    """
    try:
        ds.save_as(handle, enforce_file_format=True)
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # an element pydicom read but cannot write back: bad data
        raise CannotUnderstandError(f"cannot encode the data set: {parse_reason(exc)}") from exc


_PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 7.1: 128-byte preamble, then the DICM prefix


def _write_received(file_meta: FileMetaDataset, encoded: bytes, handle: BinaryIO) -> None:
    """Write a Part-10 file from a data set's received bytes: preamble, `file_meta`, the bytes unchanged."""
    meta = DicomBytesIO()
    try:
        write_file_meta_info(meta, file_meta, enforce_standard=True)
    except (OSError, MemoryError):
        raise
    except Exception as exc:
        raise CannotUnderstandError(f"cannot encode the File Meta: {parse_reason(exc)}") from exc
    handle.write(_PREAMBLE)
    handle.write(meta.getvalue())
    handle.write(encoded)
