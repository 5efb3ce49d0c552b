"""The durable instance store: validate a received instance, write it atomically as a Part-10 file, index it."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from triage.dicom.phi import hash_identifier
from triage.dicom.sopclasses import (
    ACCEPTED_SOP_CLASSES,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_accepted_sop_class,
    is_accepted_transfer_syntax,
    is_image_sop_class,
    is_native_transfer_syntax,
)
from triage.domain import InstanceMeta
from triage.errors import InvalidStudyError, UnsupportedInputError

logger = logging.getLogger(__name__)

# PS3.5 9.1: a UID is dot-separated digit components, at most 64 characters. Checking this strictly also
# makes a UID safe as a path component: no "/", no "..", no empty name.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX_CHARS = 64
_TEMP_SUFFIX = ".tmp"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, the first bytes of encapsulated Pixel Data (PS3.5 A.4)
_ITEM_TAG_BE = b"\xff\xfe\xe0\x00"


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


def _expected_native_pixel_bytes(ds: Dataset) -> int:
    try:
        rows = int(ds.Rows)
        columns = int(ds.Columns)
        bits_allocated = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidStudyError(
            "image without Rows, Columns or Bits Allocated: it cannot be decoded "
            f"(SOP Instance UID {ds.get('SOPInstanceUID', '')!s})"
        ) from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return (rows * columns * samples * frames * bits_allocated + 7) // 8


def validate_instance(ds: Dataset) -> None:
    """Check that `ds` is an instance triage can store and later read.

    Checks, in order: the bytes were complete; SOP Class UID present, valid and accepted; SOP Instance, Study
    Instance and Series Instance UIDs present and valid; the File Meta (if any) names the same SOP instance;
    the transfer syntax is accepted; image SOP classes carry Pixel Data of the length their attributes imply
    (native transfer syntaxes) or encapsulated in items (compressed ones).

    Raises:
        UnsupportedInputError: the SOP class or transfer syntax is not one triage accepts.
        InvalidStudyError: anything else, quoting the offending value.
    """
    check_complete(ds)
    sop_class = validate_uid(ds.get("SOPClassUID"), "SOP Class UID (0008,0016)")
    if not is_accepted_sop_class(sop_class):
        accepted = sorted(UID(uid).name for uid in ACCEPTED_SOP_CLASSES)
        raise UnsupportedInputError(
            f"SOP class not accepted: {UID(sop_class).name} ({sop_class!r}); accepted: {', '.join(accepted)}"
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

    if not is_image_sop_class(sop_class):
        return
    pixel_data = ds.get("PixelData")
    if not pixel_data:
        raise InvalidStudyError(
            f"no Pixel Data (7FE0,0010) in {UID(sop_class).name} instance {sop_instance!r} "
            "(an image SOP class must carry it; the data may also be truncated)"
        )
    if is_native_transfer_syntax(syntax):
        expected = _expected_native_pixel_bytes(ds)
        if len(pixel_data) < expected:
            raise InvalidStudyError(
                f"truncated Pixel Data: {len(pixel_data)} bytes where Rows, Columns, Samples per Pixel, "
                f"Bits Allocated and Number of Frames imply {expected} (instance {sop_instance!r})"
            )
    elif bytes(pixel_data[:4]) not in (_ITEM_TAG_LE, _ITEM_TAG_BE):
        raise InvalidStudyError(
            f"Pixel Data not encapsulated although the transfer syntax {UID(syntax).name} is compressed "
            f"(PS3.5 A.4; instance {sop_instance!r})"
        )


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


def extract_meta(ds: Dataset, path: Path | str, calling_ae: str, salt: str) -> InstanceMeta:
    """What the store indexes about one instance: UIDs, descriptions, routing hints; no patient identity.

    The Patient ID enters only as `hash_identifier(PatientID, salt)`; names and birth dates are never read.

    Args:
        ds: the received instance (validated).
        path: where it is stored.
        calling_ae: the AE title (or "STOW") it came from.
        salt: the site's `phi_salt`.
    """
    return InstanceMeta(
        study_uid=validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID (0020,000D)"),
        series_uid=validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID (0020,000E)"),
        sop_instance_uid=validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)"),
        sop_class_uid=validate_uid(ds.get("SOPClassUID"), "SOP Class UID (0008,0016)"),
        modality=_text(ds, "Modality").upper(),
        path=str(path),
        accession_number=_text(ds, "AccessionNumber"),
        patient_hash=hash_identifier(_text(ds, "PatientID"), salt),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined").upper(),
        requested_priority=_requested_priority(ds),
        calling_ae=(calling_ae or "").strip(),
        institution=_text(ds, "InstitutionName"),
        transfer_syntax_uid=transfer_syntax_of(ds),
    )


def read_dataset_bytes(data: bytes) -> Dataset:
    """Parse one instance from bytes: a Part-10 file, or a bare data set without preamble and File Meta.

    A bare data set is given File Meta with the transfer syntax it was found to be encoded in.

    Raises:
        InvalidStudyError: when the bytes are empty, cannot be parsed, or are truncated.
    """
    if not data:
        raise InvalidStudyError("the DICOM data is empty (0 bytes)")
    part10 = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = dcmread(BytesIO(data), force=not part10)
        check_complete(ds)
    except InvalidStudyError:
        raise
    except Exception as exc:  # pydicom raises many kinds (struct.error, zlib.error, ValueError, ...)
        raise InvalidStudyError(f"cannot parse the DICOM data ({len(data)} bytes): {exc}") from exc
    if len(ds) == 0:
        raise InvalidStudyError(f"no DICOM data set found in {len(data)} bytes")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax_of(ds))
    return ds


def _fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (POSIX: fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DicomStore:
    """Instances on disk as root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm.

    `write` returns only once the file is durable (fsynced, atomically renamed, directory fsynced) and
    indexed: a storage SCP's success response tells the sender it may forget the instance (PS3.4 Annex B).

    Args:
        root: the store's folder (created if missing).
        salt: the site's `phi_salt` for the patient hash.
        index: records an instance; returns False when its SOP Instance UID was already indexed.
    """

    def __init__(self, root: Path, salt: str, index: Callable[[InstanceMeta], bool]) -> None:
        self.root = Path(root)
        self.salt = salt
        self.index = index
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """The file an instance is stored in (UIDs validated, so the path stays under `root`)."""
        study = validate_uid(study_uid, "Study Instance UID (0020,000D)")
        series = validate_uid(series_uid, "Series Instance UID (0020,000E)")
        sop = validate_uid(sop_instance_uid, "SOP Instance UID (0008,0018)")
        return self.root / study / series / f"{sop}.dcm"

    def write(self, ds: Dataset, calling_ae: str = "") -> StoredInstance:
        """Validate, store and index one instance, in its received transfer syntax.

        A second copy of an instance already stored replaces the file (same SOP Instance UID: same
        instance) and is reported as `duplicate`.

        Raises:
            UnsupportedInputError: SOP class or transfer syntax not accepted.
            InvalidStudyError: the instance is malformed (see `validate_instance`).
            OSError: the file could not be written (disk full, permissions); nothing is indexed then.
        """
        validate_instance(ds)
        path = self.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        syntax = transfer_syntax_of(ds)

        encoded = copy.copy(ds)  # shallow: the caller's File Meta stays as it was
        encoded.file_meta = self._file_meta(ds, syntax, calling_ae)
        self._ensure_directory(path.parent)
        self._write_atomic(encoded, path)

        meta = extract_meta(ds, path, calling_ae, self.salt)
        is_new = self.index(meta)
        logger.debug(
            "stored instance %s of study %s%s", meta.sop_instance_uid, meta.study_uid, "" if is_new else " (duplicate)"
        )
        return StoredInstance(meta=meta, duplicate=not is_new)

    def iter_files(self) -> Iterator[Path]:
        """Every stored instance file (not temporary files), study by study, e.g. to re-index on start-up."""
        for study in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for series in sorted(p for p in study.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for path in sorted(series.iterdir()):
                    if path.suffix == ".dcm" and not path.name.startswith(".") and path.is_file():
                        yield path

    def reindex(self) -> tuple[int, int, int]:
        """Offer every stored file to `index` again, e.g. on start-up after the database was lost or restored.

        Reads headers only (no pixels). The calling AE comes back from the File Meta's Source Application Entity
        Title, which `write` records.

        Returns:
            (newly indexed, already indexed, unreadable) file counts; unreadable files are logged, not raised.
        """
        new = known = unreadable = 0
        for path in self.iter_files():
            try:
                ds = dcmread(path, stop_before_pixels=True)
                calling_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "")
                meta = extract_meta(ds, path, calling_ae, self.salt)
            except Exception as exc:
                unreadable += 1
                logger.warning("cannot re-index stored file %s: %s", path.name, exc)
                continue
            if self.index(meta):
                new += 1
            else:
                known += 1
        logger.info("re-indexed the store: %d new, %d already indexed, %d unreadable", new, known, unreadable)
        return new, known, unreadable

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by a crash during a write; returns how many were removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.glob(f"*/*/.*{_TEMP_SUFFIX}"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

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
        return file_meta

    def _ensure_directory(self, directory: Path) -> None:
        """Create the study and series folders; fsync each parent that gained an entry."""
        for folder in (directory.parent, directory):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            _fsync_directory(folder.parent)

    @staticmethod
    def _write_atomic(ds: Dataset, path: Path) -> None:
        """Write to a temporary file beside `path`, fsync, rename over `path`, fsync the folder.

        A reader (or a crash) sees either no file or the whole file, never a partial one.
        """
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=_TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                ds.save_as(handle, enforce_file_format=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        _fsync_directory(path.parent)
