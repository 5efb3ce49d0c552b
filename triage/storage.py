"""Storage addressed by key: where instance files, overlays and AI results live, behind one interface.

Everything else in triage names a stored thing by its key, never by a path: an instance is
"<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm" (what the database's `instances.store_key`
holds), an overlay is its study UID and a file name, a result instance (triage's own SR, SEG and overlay capture)
is "<StudyInstanceUID>/<results id>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm". Only a store knows where (or
whether) a key is a file, so a reader on another machine asks the store for bytes instead of assuming a shared file
system.

Results are kept apart from received instances (their own area, their own key shape): they are never listed by
`instance_keys`, so they are never indexed, analysed or counted as received images.

Three implementations:
- `LocalStore`: the service's folder (default `<data_dir>/dicom`, `<data_dir>/overlays` and `<data_dir>/results`);
  writes are atomic and durable (temporary file, fsync, rename; the folder is fsynced by the caller, see
  `fsync_folders`; a study's results are replaced as one set).
- `PathSource`: read-only, keys are file paths (`triage infer PATH` on a folder outside the store, tests).
- `MemorySource`: read-only, keys mapped to bytes fetched elsewhere (what a Ray task on a node without the
  store's disk receives).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from triage.domain import Overlay, SliceMasks
from triage.errors import InvalidStudyError, NotFoundError

# PS3.5 9.1: a UID is dot-separated digit components, at most 64 characters; checked strictly, a UID is also a
# safe path component (no "/", no "..", no empty name).
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_CHARS = 64
INSTANCE_SUFFIX = ".dcm"
TEMP_SUFFIX = ".tmp"
_OVERLAY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# A results id names one build of a study's results (lowercase hex, e.g. a digest of what they were built from).
_RESULTS_ID = re.compile(r"^[0-9a-f]{8,64}$")


def _is_uid(text: str) -> bool:
    return len(text) <= UID_MAX_CHARS and bool(UID_PATTERN.match(text))


def instance_key(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """The key of one instance: "<study>/<series>/<sop>.dcm" (the layout of every store).

    Raises:
        InvalidStudyError: one of the UIDs is not a valid UID (PS3.5 9.1).
    """
    for value, name in ((study_uid, "Study"), (series_uid, "Series"), (sop_instance_uid, "SOP Instance")):
        if not _is_uid(str(value)):
            raise InvalidStudyError(f"{name} Instance UID {str(value)[:80]!r} is not a valid UID (PS3.5 9.1)")
    return f"{study_uid}/{series_uid}/{sop_instance_uid}{INSTANCE_SUFFIX}"


def parse_instance_key(key: str) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs of an instance key.

    Raises:
        NotFoundError: `key` is not an instance key (so no path outside the store can be named with one).
    """
    parts = str(key).split("/")
    if len(parts) == 3 and parts[2].endswith(INSTANCE_SUFFIX):
        study, series, sop = parts[0], parts[1], parts[2][: -len(INSTANCE_SUFFIX)]
        if _is_uid(study) and _is_uid(series) and _is_uid(sop):
            return study, series, sop
    raise NotFoundError(f"{str(key)[:200]!r} is not an instance key (<study>/<series>/<sop>.dcm)")


def result_key(study_uid: str, results_id: str, series_uid: str, sop_instance_uid: str) -> str:
    """The key of one result instance: "<study>/<results id>/<series>/<sop>.dcm".

    Raises:
        InvalidStudyError: a UID is not a valid UID (PS3.5 9.1), or `results_id` is not lowercase hex (8-64).
    """
    if not _RESULTS_ID.match(str(results_id)):
        raise InvalidStudyError(f"results id {str(results_id)[:80]!r} is not 8 to 64 lowercase hex digits")
    study, series, sop = parse_instance_key(instance_key(study_uid, series_uid, sop_instance_uid))
    return f"{study}/{results_id}/{series}/{sop}{INSTANCE_SUFFIX}"


def parse_result_key(key: str) -> tuple[str, str, str, str]:
    """(study UID, results id, series UID, SOP instance UID) of a result key.

    Raises:
        NotFoundError: `key` is not a result key (so no path outside the store can be named with one).
    """
    parts = str(key).split("/")
    if len(parts) == 4 and _RESULTS_ID.match(parts[1]):
        with contextlib.suppress(NotFoundError):
            study, series, sop = parse_instance_key(f"{parts[0]}/{parts[2]}/{parts[3]}")
            return study, parts[1], series, sop
    raise NotFoundError(f"{str(key)[:200]!r} is not a result key (<study>/<results id>/<series>/<sop>.dcm)")


def is_result_key(key: str) -> bool:
    """Whether `key` names a result instance (rather than a received one)."""
    try:
        parse_result_key(key)
    except NotFoundError:
        return False
    return True


def _check_overlay(study_uid: str, name: str) -> None:
    if not _is_uid(study_uid) or not _OVERLAY_NAME.match(name) or ".." in name:
        raise NotFoundError(f"overlay {name!r} of study {study_uid!r} is not stored")


@runtime_checkable
class InstanceSource(Protocol):
    """Reads stored instances by key (what the pipelines and the DICOM readers are given)."""

    def open(self, key: str) -> BinaryIO:
        """A readable binary file-like object of the instance (the caller closes it).

        Raises:
            NotFoundError: nothing is stored under `key`.
        """
        ...

    def read_bytes(self, key: str) -> bytes:
        """The instance's bytes (a Part-10 file).

        Raises:
            NotFoundError: nothing is stored under `key`.
        """
        ...


class Store(InstanceSource, Protocol):
    """Where a deployment keeps instance files and overlays. `LocalStore` is the local-folder implementation."""

    def put_instance(self, key: str, write: Callable[[BinaryIO], None]) -> str:
        """Write an instance atomically and durably as a file; returns the folder token to `fsync_folders`."""
        ...

    def fsync_folders(self, folders: Iterable[str]) -> None:
        """Make the new entries of these folders durable (one fsync per folder, however many instances)."""
        ...

    def instance_keys(self, study_uid: str | None = None) -> Iterator[str]:
        """Every stored instance key (of one study, or all), study by study, series by series."""
        ...

    def modified_at(self, key: str) -> datetime:
        """When the instance was last written (UTC)."""
        ...

    def exists(self, key: str) -> bool: ...

    def put_overlay(self, study_uid: str, name: str, data: bytes) -> None: ...

    def get_overlay(self, study_uid: str, name: str) -> bytes: ...

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int: ...

    def put_results(self, study_uid: str, results_id: str, instances: Mapping[str, bytes]) -> None:
        """Keep a study's results (result key -> Part-10 bytes) as the set `results_id`, whole or not at all, and
        remove the study's other result sets (a re-analysis replaces what an earlier one left)."""
        ...

    def result_keys(self, study_uid: str, results_id: str) -> list[str]:
        """The keys of the study's result set `results_id`, series by series; [] when it is not stored."""
        ...

    def open_result(self, key: str) -> BinaryIO:
        """A result instance's Part-10 file (the caller closes it).

        Raises:
            NotFoundError: nothing is stored under `key`, or it is not a result key.
        """
        ...


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (POSIX: fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """Instances under `root` as <study>/<series>/<sop>.dcm, overlays under `overlay_root` as <study>/<name>, AI
    results under `results_root` as <study>/<results id>/<series>/<sop>.dcm.

    Picklable (three paths), so a Ray task pinned to this node can be handed the store and read from it.

    Args:
        root: the instance folder (created if missing).
        overlay_root: the overlay folder; default `root`/../overlays.
        results_root: the results folder; default `root`/../results (never inside `root`: results are not
            received instances and must not be re-indexed as such).
    """

    def __init__(
        self, root: Path | str, overlay_root: Path | str | None = None, results_root: Path | str | None = None
    ) -> None:
        self.root = Path(root)
        self.overlay_root = Path(overlay_root) if overlay_root is not None else self.root.parent / "overlays"
        self.results_root = Path(results_root) if results_root is not None else self.root.parent / "results"
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, {str(self.overlay_root)!r}, {str(self.results_root)!r})"

    def _roots(self) -> tuple[Path, Path, Path]:
        return self.root, self.overlay_root, self.results_root

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStore) and self._roots() == other._roots()

    def __hash__(self) -> int:
        return hash(self._roots())

    # ------------------------------------------------------------------ instances
    def _path(self, key: str) -> Path:
        study, series, sop = parse_instance_key(key)
        return self.root / study / series / f"{sop}{INSTANCE_SUFFIX}"

    def local_path(self, key: str) -> Path:
        """The file of `key` on this machine: for tools that need a file name (dcmtk), not for triage's readers."""
        return self._path(key)

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError(f"instance {key!r} is not stored") from exc

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as handle:
            return handle.read()

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except NotFoundError:
            return False

    def modified_at(self, key: str) -> datetime:
        try:
            return datetime.fromtimestamp(self._path(key).stat().st_mtime, UTC)
        except FileNotFoundError as exc:
            raise NotFoundError(f"instance {key!r} is not stored") from exc

    def put_instance(self, key: str, write: Callable[[BinaryIO], None]) -> str:
        """Write to a temporary file beside the instance's file, fsync it, rename it over the file.

        A reader (or a crash) sees either no file or the whole file, never a partial one. The rename is durable
        only once its folder is fsynced: the caller does that with `fsync_folders` (once per folder for a whole
        batch of instances) before it tells anyone the instance is stored.

        Returns:
            The folder token to pass to `fsync_folders`.

        Raises:
            OSError: writing, fsync or rename failed (disk full, read-only file system): resource trouble.
            Exception: whatever `write` raised (nothing is left behind).
        """
        path = self._path(key)
        self._ensure_directory(path.parent)
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        return str(path.parent.relative_to(self.root))

    def fsync_folders(self, folders: Iterable[str]) -> None:
        for folder in dict.fromkeys(folders):
            fsync_directory(self.root / folder)

    def _ensure_directory(self, directory: Path) -> None:
        """Create the study and series folders; fsync each parent that gained an entry."""
        for folder in (directory.parent, directory):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            fsync_directory(folder.parent)

    def instance_keys(self, study_uid: str | None = None) -> Iterator[str]:
        if study_uid is not None:
            if not _is_uid(study_uid):
                return
            studies = [self.root / study_uid] if (self.root / study_uid).is_dir() else []
        else:
            studies = sorted(p for p in self.root.iterdir() if p.is_dir() and _is_uid(p.name))
        for study in studies:
            for series in sorted(p for p in study.iterdir() if p.is_dir() and _is_uid(p.name)):
                for path in sorted(series.iterdir()):
                    sop = path.name[: -len(INSTANCE_SUFFIX)]
                    if path.name.endswith(INSTANCE_SUFFIX) and _is_uid(sop) and path.is_file():
                        yield f"{study.name}/{series.name}/{path.name}"

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by a crash during a write; returns how many were removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.glob(f"*/*/.*{TEMP_SUFFIX}"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        # A results set being written is a temporary folder of the study (see `put_results`).
        for path in self.results_root.glob(f"*/.*{TEMP_SUFFIX}") if self.results_root.is_dir() else ():
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # ------------------------------------------------------------------ results
    def _results_folder(self, study_uid: str, results_id: str) -> Path:
        if not _is_uid(study_uid) or not _RESULTS_ID.match(results_id):
            raise NotFoundError(f"results {results_id!r} of study {study_uid!r} are not stored")
        return self.results_root / study_uid / results_id

    def put_results(self, study_uid: str, results_id: str, instances: Mapping[str, bytes]) -> None:
        """Write the set into a temporary folder (each file fsynced), rename it to <study>/<results id>, then remove
        the study's other sets. A reader sees the whole set or none of it; storing a set that is already there
        (the same results built twice) keeps the one stored.

        Raises:
            InvalidStudyError: a key is not a result key of this study and set.
            OSError: writing failed (disk full, read-only file system).
        """
        target = self._results_folder(study_uid, results_id)
        for key in instances:
            study, rid, _series, _sop = parse_result_key(key)
            if (study, rid) != (study_uid, results_id):
                raise InvalidStudyError(f"{key_name(key)} is not a result of study {study_uid} set {results_id}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_dir():
            temp = Path(tempfile.mkdtemp(prefix=f".{results_id}.", suffix=TEMP_SUFFIX, dir=target.parent))
            try:
                for key, data in instances.items():
                    _study, _rid, series, sop = parse_result_key(key)
                    path = temp / series / f"{sop}{INSTANCE_SUFFIX}"
                    path.parent.mkdir(exist_ok=True)
                    with path.open("wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                for folder in {p.parent for p in temp.glob(f"*/*{INSTANCE_SUFFIX}")} | {temp}:
                    fsync_directory(folder)
                try:
                    os.rename(temp, target)
                except OSError:
                    if not target.is_dir():
                        raise
                    # Stored meanwhile by another builder of the same results: that copy stands.
                fsync_directory(target.parent)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
        for other in target.parent.iterdir():
            if other.name != results_id and _RESULTS_ID.match(other.name):
                shutil.rmtree(other, ignore_errors=True)

    def result_keys(self, study_uid: str, results_id: str) -> list[str]:
        try:
            folder = self._results_folder(study_uid, results_id)
        except NotFoundError:
            return []
        if not folder.is_dir():
            return []
        return [
            f"{study_uid}/{results_id}/{series.name}/{path.name}"
            for series in sorted(p for p in folder.iterdir() if p.is_dir() and _is_uid(p.name))
            for path in sorted(series.iterdir())
            if path.name.endswith(INSTANCE_SUFFIX) and _is_uid(path.name[: -len(INSTANCE_SUFFIX)])
        ]

    def open_result(self, key: str) -> BinaryIO:
        study, results_id, series, sop = parse_result_key(key)
        try:
            return (self.results_root / study / results_id / series / f"{sop}{INSTANCE_SUFFIX}").open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError(f"result {key_name(key)} of study {study} is not stored") from exc

    # ------------------------------------------------------------------ overlays
    def put_overlay(self, study_uid: str, name: str, data: bytes) -> None:
        """Store a finding's overlay (replacing an earlier one of the same name), atomically."""
        _check_overlay(study_uid, name)
        folder = self.overlay_root / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temp_name, folder / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise

    def get_overlay(self, study_uid: str, name: str) -> bytes:
        """A stored overlay's bytes.

        Raises:
            NotFoundError: not stored, or the name is not an overlay name (no path can be named with it).
        """
        _check_overlay(study_uid, name)
        try:
            return (self.overlay_root / study_uid / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFoundError(f"overlay {name!r} of study {study_uid!r} is not stored") from exc


class PathSource:
    """Read-only: keys are file paths on this machine (a study folder outside the store, `triage infer`)."""

    def open(self, key: str) -> BinaryIO:
        try:
            return Path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFoundError(f"file {Path(key).name!r} does not exist") from exc

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as handle:
            return handle.read()


class MemorySource:
    """Read-only: keys mapped to bytes read from a store elsewhere (picklable; Ray puts it in its object store)."""

    def __init__(self, data: Mapping[str, bytes]) -> None:
        self.data = dict(data)

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self.read_bytes(key))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.data[key]
        except KeyError as exc:
            raise NotFoundError(f"instance {key!r} was not fetched from the store") from exc


def fetch(source: InstanceSource, keys: Iterable[str]) -> MemorySource:
    """Read `keys` from `source` into memory (run next to the store's disk; the result travels)."""
    return MemorySource({key: source.read_bytes(key) for key in keys})


def key_name(key: str) -> str:
    """The last part of a key or path, for messages (no folder names, which may hold patient data elsewhere)."""
    return str(key).replace("\\", "/").rsplit("/", 1)[-1]


def overlay_bytes(overlay: Overlay) -> bytes:
    """An overlay as stored: a compressed .npz with mask (float32), stride, sop_instance_uid and kind."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        mask=np.asarray(overlay.mask, dtype=np.float32),
        stride=overlay.stride,
        sop_instance_uid=overlay.sop_instance_uid,
        kind=overlay.kind,
    )
    return buffer.getvalue()


def segmentation_bytes(segmentation: SliceMasks) -> bytes:
    """A segmentation as stored: a compressed .npz with the masks (bool, packed) and the images they belong to."""
    import numpy as np

    masks = np.asarray(segmentation.masks, dtype=bool)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, masks=masks, sop_instance_uids=np.array(segmentation.sop_instance_uids, dtype=np.str_))
    return buffer.getvalue()


def segmentation_from_bytes(data: bytes, name: str = "segmentation") -> SliceMasks:
    """Read back what `segmentation_bytes` wrote (no pickles are loaded).

    Raises:
        InvalidStudyError: the bytes are not such a segmentation.
    """
    import numpy as np

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            masks = np.asarray(npz["masks"], dtype=bool)
            uids = [str(u) for u in npz["sop_instance_uids"]]
    except Exception as exc:  # noqa: BLE001 - numpy raises several kinds for a bad file
        raise InvalidStudyError(f"{name} is not a stored segmentation: {exc}") from exc
    if masks.ndim != 3 or masks.shape[0] != len(uids):
        raise InvalidStudyError(f"{name}: {masks.shape[0] if masks.ndim else 0} masks for {len(uids)} images")
    return SliceMasks(uids, masks)


def overlay_from_bytes(data: bytes, name: str = "overlay") -> Overlay:
    """Read back what `overlay_bytes` wrote (no pickles are loaded).

    Raises:
        InvalidStudyError: the bytes are not such an overlay.
    """
    import numpy as np

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return Overlay(
                sop_instance_uid=str(npz["sop_instance_uid"]),
                mask=np.asarray(npz["mask"], dtype=np.float32),
                stride=int(npz["stride"]) if "stride" in npz else 1,
                kind=str(npz["kind"]) if "kind" in npz else "mask",
            )
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidStudyError(f"overlay {name!r} cannot be read: {exc}") from exc
