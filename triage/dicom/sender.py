"""The C-STORE client: find DICOM files (folders, DICOMDIR) and send them, or data sets built in memory (the AI
results), to a storage SCP. The one place triage opens a storage association as SCU."""

from __future__ import annotations

import logging
import os
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from pynetdicom import AE
from pynetdicom.association import Association

from triage.dicom.sopclasses import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from triage.dicom.status import describe_status, status_category
from triage.errors import InvalidStudyError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# PS3.8 9.3.2.2: a presentation context ID is an odd number 1..255, so at most 128 contexts per association.
MAX_CONTEXTS_PER_ASSOCIATION = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)


@dataclass(frozen=True)
class FileScan:
    """What `scan_paths` found: DICOM instance files to send, and files skipped as not DICOM (or missing)."""

    files: list[Path]
    skipped: list[Path]


@dataclass(frozen=True)
class SendResult:
    """The outcome for one file or data set. `status` is the peer's C-STORE status, None when none was received.
    `path` is None for a data set sent from memory."""

    path: Path | None
    sop_instance_uid: str
    status: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        """Stored by the peer (success, or a warning such as coercion of data elements, PS3.4 B.2.3)."""
        return self.status is not None and status_category(self.status) in ("success", "warning")


@dataclass
class SendReport:
    """The outcome of `send_files`: one result per file, in the order given."""

    results: list[SendResult] = field(default_factory=list)
    associations: int = 0

    @property
    def sent(self) -> int:
        return sum(1 for r in self.results if r.ok)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    @property
    def statuses(self) -> Counter[int | None]:
        """How many files got each status (None: no response)."""
        return Counter(r.status for r in self.results)

    @property
    def failures(self) -> list[SendResult]:
        return [r for r in self.results if not r.ok]


def _has_part10_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_bare_dataset(path: Path) -> bool:
    """A data set written without preamble and File Meta (older devices): it names its SOP class and instance.

    Only files starting with a group 0002 or 0008 tag (either byte order) are parsed, so that text files and
    the like are not fed to pydicom's lenient reader.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    if head not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return False
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception:
        return False
    return bool(ds.get("SOPClassUID")) and bool(ds.get("SOPInstanceUID"))


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        meta = read_file_meta_info(path)
    except Exception:
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MediaStorageDirectoryStorage


def _resolve_case_insensitive(base: Path, components: Sequence[str]) -> Path | None:
    """Find base/components..., matching each component case-insensitively (DICOMDIR IDs are upper case, PS3.10
    8.2, but copies on case-sensitive file systems often are not)."""
    current = base
    for component in components:
        candidate = current / component
        if candidate.exists():
            current = candidate
            continue
        try:
            matches = [entry for entry in os.listdir(current) if entry.upper() == component.upper()]
        except OSError:
            return None
        if not matches:
            return None
        current = current / matches[0]
    return current if current.is_file() else None


def _dicomdir_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(referenced files that exist, referenced files that are missing) of a DICOMDIR."""
    try:
        ds = dcmread(path, force=True)
    except Exception as exc:
        raise InvalidStudyError(f"cannot read DICOMDIR {path}: {exc}") from exc
    found: list[Path] = []
    missing: list[Path] = []
    for record in ds.get("DirectoryRecordSequence", None) or []:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        components = [file_id] if isinstance(file_id, str) else [str(c) for c in file_id]
        resolved = _resolve_case_insensitive(path.parent, components)
        if resolved is None:
            missing.append(path.parent.joinpath(*components))
        else:
            found.append(resolved)
    return found, missing


def _walk(folder: Path) -> Iterable[Path]:
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            yield Path(root) / name


def scan_paths(paths: Sequence[Path]) -> FileScan:
    """Expand files and folders (recursively) into DICOM instance files; follow DICOMDIRs to the files they list.

    Each file appears once, in the order found. A DICOMDIR itself is not an instance and is not sent.

    Raises:
        FileNotFoundError: when one of `paths` does not exist (quoted).
    """
    files: list[Path] = []
    skipped: list[Path] = []
    seen: set[Path] = set()

    def add(candidate: Path) -> None:
        key = candidate.resolve()
        if key in seen:
            return
        seen.add(key)
        if _is_dicomdir(candidate):
            referenced, missing = _dicomdir_files(candidate)
            skipped.extend(missing)
            for item in referenced:
                add(item)
        elif _has_part10_preamble(candidate) or _is_bare_dataset(candidate):
            files.append(candidate)
        else:
            skipped.append(candidate)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for candidate in _walk(path):
                add(candidate)
        elif path.is_file():
            add(path)
        else:
            raise FileNotFoundError(f"{str(path)!r} is neither a file nor a folder")
    return FileScan(files=files, skipped=skipped)


def collect_files(paths: Sequence[Path]) -> list[Path]:
    """The DICOM instance files under `paths` (see `scan_paths`); logs a warning with the count of skipped files."""
    scan = scan_paths(paths)
    if scan.skipped:
        logger.warning("skipped %d files that are not DICOM instances (or are listed but missing)", len(scan.skipped))
    return scan.files


@dataclass(frozen=True)
class _Item:
    path: Path | None
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset: Dataset | None = None


def _describe(path: Path) -> _Item:
    """SOP class, instance and transfer syntax of a file, from its File Meta (or its header for a bare data set)."""
    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
    except Exception:
        sop_class = sop_instance = syntax = ""
    if not (sop_class and sop_instance and syntax):
        ds = dcmread(path, force=True, stop_before_pixels=True)
        sop_class = sop_class or str(ds.get("SOPClassUID", "") or "")
        sop_instance = sop_instance or str(ds.get("SOPInstanceUID", "") or "")
        if not syntax:
            implicit, little = ds.original_encoding
            syntax = (
                ImplicitVRLittleEndian
                if implicit
                else (ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian)
            )
    if not (sop_class and sop_instance):
        raise InvalidStudyError(f"{path} names no SOP Class UID or SOP Instance UID")
    return _Item(path, sop_class.strip("\x00 "), sop_instance.strip("\x00 "), syntax.strip("\x00 "))


def _proposed_syntaxes(transfer_syntax: str) -> list[str]:
    """The file's own transfer syntax first; uncompressed data may also go in any other uncompressed syntax."""
    if transfer_syntax in _UNCOMPRESSED:
        return list(dict.fromkeys([transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return [transfer_syntax]


def _batches(items: list[_Item]) -> list[list[_Item]]:
    """Split items so that each association needs at most 128 presentation contexts."""
    batches: list[list[_Item]] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        key = (item.sop_class, item.transfer_syntax)
        if not batches or (key not in contexts and len(contexts) >= MAX_CONTEXTS_PER_ASSOCIATION):
            batches.append([])
            contexts = set()
        contexts.add(key)
        batches[-1].append(item)
    return batches


def _read_for_sending(item: _Item) -> Dataset:
    if item.dataset is not None:
        return item.dataset
    assert item.path is not None
    ds = dcmread(item.path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = UID(item.transfer_syntax)
    return ds


def _describe_dataset(ds: Dataset) -> _Item:
    """SOP class, instance and transfer syntax of a data set in memory (Explicit VR Little Endian unless its
    File Meta says otherwise)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    return _Item(None, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax or ExplicitVRLittleEndian, ds)


def send_files(
    files: Sequence[Path],
    host: str,
    port: int,
    called_ae: str = "TRIAGE",
    calling_ae: str = "TRIAGE-INGEST",
    progress: Progress | None = None,
    *,
    timeout_s: float = 60.0,
) -> SendReport:
    """Send files to a storage SCP with C-STORE, each in its own transfer syntax.

    Uses one association for up to 128 distinct (SOP class, transfer syntax) pairs. When the peer drops the
    association after having answered at least one request, a new one is opened and the unanswered file is
    sent again once; when an association cannot be opened, the remaining files fail with the reason.

    Args:
        files: Part-10 files (or bare data sets), e.g. from `collect_files`.
        host, port: the SCP.
        called_ae, calling_ae: AE titles (the SCP may allow only listed calling AEs).
        progress: called as progress(done, total) after every file.
        timeout_s: ACSE, DIMSE and network timeout in seconds.

    Returns:
        A report with one SendResult per file; never raises for a single file's failure.
    """
    results: dict[int, SendResult] = {}
    items: list[tuple[int, _Item]] = []
    for index, path in enumerate(files):
        try:
            items.append((index, _describe(Path(path))))
        except Exception as exc:
            results[index] = SendResult(Path(path), "", None, f"cannot read: {exc}")
    return _send_items(len(files), items, results, host, port, called_ae, calling_ae, progress, timeout_s)


def send_datasets(
    datasets: Sequence[Dataset],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "TRIAGE",
    *,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> SendReport:
    """Send data sets built in memory (with File Meta) to a storage SCP, as `send_files` sends files: same
    associations, same retry of an unanswered instance on a new association, one SendResult per data set.
    With `ssl_context` the associations run over TLS (PS3.15 B.9)."""
    items = list(enumerate(_describe_dataset(ds) for ds in datasets))
    return _send_items(len(datasets), items, {}, host, port, called_ae, calling_ae, None, timeout_s, ssl_context)


def _send_items(
    total: int,
    items: list[tuple[int, _Item]],
    results: dict[int, SendResult],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    progress: Progress | None,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> SendReport:
    report = SendReport()
    done = len(results)
    if progress is not None and done:
        progress(done, total)

    by_item = {id(item): index for index, item in items}
    for batch in _batches([item for _, item in items]):
        ae = AE(ae_title=calling_ae)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        for sop_class, syntax in dict.fromkeys((i.sop_class, i.transfer_syntax) for i in batch):
            ae.add_requested_context(sop_class, _proposed_syntaxes(syntax))
        session = _Session(ae, host, int(port), called_ae, report, ssl_context)
        for item in batch:
            results[by_item[id(item)]] = session.send(item)
            done += 1
            if progress is not None:
                progress(done, total)
        assoc = session.assoc
        if assoc is not None and assoc.is_established:
            assoc.release()
        ae.shutdown()

    report.results = [results[i] for i in range(total)]
    logger.info(
        "sent %d of %d instances to %s@%s:%d (%d failed)", report.sent, total, called_ae, host, port, report.failed
    )
    return report


class _Session:
    """One association at a time for a batch of files: opens it lazily, re-opens it when the peer dropped it
    after making progress, and gives up (failing the remaining files) when it cannot be (re-)opened."""

    def __init__(
        self, ae: AE, host: str, port: int, called_ae: str, report: SendReport, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.ae = ae
        self.tls_args = (ssl_context, host) if ssl_context is not None else None
        self.host = host
        self.port = port
        self.called_ae = called_ae
        self.report = report
        self.assoc: Association | None = None
        self.answered_since_open = 0
        self.error = ""

    def _ensure_open(self) -> bool:
        if self.error:
            return False
        if self.assoc is not None and self.assoc.is_established:
            return True
        if self.assoc is not None and self.answered_since_open == 0:
            self.error = f"{self.called_ae}@{self.host}:{self.port} closed the association before answering"
            return False
        self.assoc = self.ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=self.tls_args)
        self.report.associations += 1
        self.answered_since_open = 0
        if not self.assoc.is_established:
            self.error = _association_failure(self.assoc, self.host, self.port, self.called_ae)
            logger.warning("%s", self.error)
            return False
        return True

    def send(self, item: _Item) -> SendResult:
        """Send one file; when the association drops before the answer, send it once more on a new one."""
        result: SendResult | None = None
        for _attempt in range(2):
            if not self._ensure_open():
                break
            assert self.assoc is not None
            result, dropped = _send_one(self.assoc, item)
            if result.status is not None:
                self.answered_since_open += 1
                return result
            if not dropped:
                return result  # a local problem (unreadable file, no context): another association won't help
            # No answer: the association timed out, was aborted, or got an invalid response. Make sure it is
            # closed on our side too before opening a new one.
            if self.assoc.is_established:
                self.assoc.abort()
        if result is not None and not self.error:
            return result
        return SendResult(item.path, item.sop_instance, None, self.error or "not sent")


def _association_failure(assoc: Association, host: str, port: int, called_ae: str) -> str:
    target = f"{called_ae}@{host}:{port}"
    if assoc.is_rejected:
        return f"association rejected by {target} (check the calling and called AE titles)"
    return f"cannot associate with {target} (connection refused, timed out or aborted by the peer)"


def _send_one(assoc: Association, item: _Item) -> tuple[SendResult, bool]:
    """Send one file; returns its result and whether the association was lost without an answer."""
    try:
        ds = _read_for_sending(item)
    except Exception as exc:
        return SendResult(item.path, item.sop_instance, None, f"cannot read: {exc}"), False
    try:
        response = assoc.send_c_store(ds)
    except ValueError as exc:  # no accepted presentation context for this SOP class / transfer syntax
        reason = (
            f"the peer accepted no presentation context for {UID(item.sop_class).name} in "
            f"{UID(item.transfer_syntax).name}: {exc}"
        )
        return SendResult(item.path, item.sop_instance, None, reason), False
    except (AttributeError, RuntimeError) as exc:
        return SendResult(item.path, item.sop_instance, None, f"cannot send: {exc}"), not assoc.is_established
    if response is None or "Status" not in response:
        return SendResult(item.path, item.sop_instance, None, "no response (association aborted or timed out)"), True
    status = int(response.Status)
    comment = str(response.get("ErrorComment", "") or "")
    error = "" if status_category(status) in ("success", "warning") else describe_status(status)
    if comment and error:
        error = f"{error}: {comment}"
    return SendResult(item.path, item.sop_instance, status, error), False
