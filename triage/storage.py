"""Storage addressed by key: where instance files and overlays live, behind one interface.

Everything else in triage names a stored thing by its key, never by a path: an instance is
"<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm" (what the database's `instances.store_key`
holds), an overlay is its study UID and a file name. Only a store knows where (or whether) a key is a file,
so a reader on another machine asks the store for bytes instead of assuming a shared file system.

Three implementations:
- `LocalStore`: the service's folder (default `<data_dir>/dicom` and `<data_dir>/overlays`); writes are atomic
  and durable (temporary file, fsync, rename; the folder is fsynced by the caller, see `fsync_folders`).
- `PathSource`: read-only, keys are file paths (`triage infer PATH` on a folder outside the store, tests).
- `MemorySource`: read-only, keys mapped to bytes fetched elsewhere (what a Ray task on a node without the
  store's disk receives).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
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


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (POSIX: fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """Instances under `root` as <study>/<series>/<sop>.dcm, overlays under `overlay_root` as <study>/<name>.

    Picklable (two paths), so a Ray task pinned to this node can be handed the store and read from it.

    Args:
        root: the instance folder (created if missing).
        overlay_root: the overlay folder; default `root`/../overlays.
    """

    def __init__(self, root: Path | str, overlay_root: Path | str | None = None) -> None:
        self.root = Path(root)
        self.overlay_root = Path(overlay_root) if overlay_root is not None else self.root.parent / "overlays"
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, {str(self.overlay_root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStore) and (self.root, self.overlay_root) == (other.root, other.overlay_root)

    def __hash__(self) -> int:
        return hash((self.root, self.overlay_root))

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
        return removed

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
