"""pynetdicom as a raw C-STORE peer: sends the data-set bytes of a case exactly as they are, which storescu
cannot do (it parses and re-encodes what it sends).

pynetdicom's chunked mode (`_config.STORE_SEND_CHUNKED_DATASET`) reads the File Meta of a Part-10 file to pick
the presentation context and streams the remaining bytes untouched. Bytes whose File Meta is unusable (not
DICOM, truncated inside the File Meta, a flipped UID) are sent behind a File Meta of our own, so the SCP still
receives them as a data set: what a hostile or broken sender could do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from pydicom.filereader import read_preamble
from pydicom.uid import (
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
    XRayRadiationDoseSRStorage,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.fuzz.corpus import body_offset

CLASSES = (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    MRImageStorage,
    EnhancedMRImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayRadiationDoseSRStorage,
)
SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless, JPEG2000Lossless)
_FALLBACK_INSTANCE = "2.25.1"


def _fallback_meta(sop_class: str = CTImageStorage, syntax: str = ExplicitVRLittleEndian) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(_FALLBACK_INSTANCE)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue()


def as_sendable_file(data: bytes, path: Path) -> tuple[Path, bool]:
    """Write `data` so that pynetdicom's chunked mode can send its data set; returns (path, wrapped) where
    `wrapped` says a File Meta of our own had to be put in front."""
    path.write_bytes(data)
    try:
        with path.open("rb") as handle:
            read_preamble(handle, False)
        meta, offset = split_dataset(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        syntax = str(meta.TransferSyntaxUID)
        UID(str(meta.MediaStorageSOPInstanceUID))
        if sop_class in CLASSES and syntax in SYNTAXES and offset <= len(data):
            return path, False
    except Exception:  # noqa: BLE001 - any unusable File Meta: send the bytes behind ours
        pass
    part10 = len(data) >= 144 and data[128:132] == b"DICM"
    body = data[body_offset(data) :] if part10 and body_offset(data) <= len(data) else data
    path.write_bytes(_fallback_meta() + body)
    return path, True


class RawStoreClient:
    """One association (renewed when the SCP aborts it) that C-STOREs raw cases; use as a context manager."""

    def __init__(self, port: int, folder: Path, called_ae: str = "TRIAGE", calling_ae: str = "FUZZ") -> None:
        self.port = port
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.called_ae = called_ae
        self.ae = AE(ae_title=calling_ae)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        self.ae.add_requested_context(Verification)
        for sop_class in CLASSES:
            for syntax in SYNTAXES:
                self.ae.add_requested_context(sop_class, [syntax])
        self.assoc: Association | None = None
        self.reconnects = 0

    def _association(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            if self.assoc is not None:
                self.reconnects += 1
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
            if not self.assoc.is_established:
                raise ConnectionError(f"association to port {self.port} not established")
        return self.assoc

    def send(self, name: str, data: bytes) -> int | None:
        """C-STORE the case; the response status, or None when no response came (aborted, timed out)."""
        path, _ = as_sendable_file(data, self.folder / (name.replace("/", "_") + ".dcm"))
        assoc = self._association()
        with chunked():
            response = assoc.send_c_store(path)
        path.unlink(missing_ok=True)
        if "Status" not in response:
            self.assoc = None
            return None
        return int(response.Status)

    def echo(self) -> int | None:
        response = self._association().send_c_echo()
        return int(response.Status) if "Status" in response else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()

    def __enter__(self) -> RawStoreClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def chunked() -> Iterator[None]:
    """pynetdicom sends a file's data set bytes as they are (no decoding, no re-encoding) inside this block."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
