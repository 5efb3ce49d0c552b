"""The storage SCP: receives C-STORE (and answers C-ECHO) with pynetdicom and hands each instance to `accept`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from triage.config import DicomSettings
from triage.dicom.sopclasses import (
    ACCEPTED_SOP_CLASSES,
    ACCEPTED_TRANSFER_SYNTAXES,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from triage.dicom.status import DicomStatus, describe_status, status_for_exception
from triage.errors import TriageError

logger = logging.getLogger(__name__)

# The identifiers of C-FIND/C-GET/C-MOVE requests carry patient names; pynetdicom logs them unless told not to.
# This SCP offers none of those services, but an AE in the same process might.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

_ERROR_COMMENT_MAX_CHARS = 64  # (0000,0902) Error Comment is LO (PS3.7 E.1)

Accept = Callable[[Dataset, str], object]


def _peer(assoc: Association) -> str:
    requestor = assoc.requestor
    return f"{requestor.ae_title.strip()}@{requestor.address}:{requestor.port}"


class StorageSCP:
    """A storage SCP (PS3.4 B) in a background thread.

    Accepts C-ECHO, and C-STORE for `ACCEPTED_SOP_CLASSES` in any of `ACCEPTED_TRANSFER_SYNTAXES`. Each received
    instance goes to `accept(dataset, calling_ae)` (normally `DicomStore.write`); the SCP answers Success only
    after `accept` has returned, i.e. once the instance is on disk and indexed. A TriageError from `accept`
    becomes the failure status of `status_for_exception`; any other exception 0xA700, and the server goes on.

    Associations from calling AE titles outside `settings.allowed_calling_aets` (when it is not empty) are
    rejected with "calling AE title not recognised" (PS3.8 9.3.4).

    Args:
        settings: AE title, bind address, port (0: any free port), allowed calling AEs, maximum PDU size.
        accept: stores one instance; raises to refuse it.
    """

    def __init__(self, settings: DicomSettings, accept: Accept) -> None:
        self.settings = settings
        self._accept = accept
        self._ae = self._build_ae(settings)
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self._counts: dict[int, list[int]] = {}

    @staticmethod
    def _build_ae(settings: DicomSettings) -> AE:
        ae = AE(ae_title=settings.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = int(settings.max_pdu_bytes)
        ae.require_calling_aet = list(settings.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class in sorted(ACCEPTED_SOP_CLASSES):
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        """The TCP port the server is bound to (the real one when settings.port is 0).

        Raises:
            RuntimeError: when the server is not running.
        """
        if self._server is None:
            raise RuntimeError("the storage SCP is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Bind and serve in a background thread; returns at once.

        Raises:
            OSError: when the address cannot be bound (port in use, no permission).
            RuntimeError: when already started.
        """
        if self._server is not None:
            raise RuntimeError("the storage SCP is already running")
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        address = (self.settings.bind_address, int(self.settings.port))
        self._server = self._ae.start_server(address, block=False, evt_handlers=handlers)
        logger.info(
            "storage SCP %s listening on %s:%d (calling AEs allowed: %s)",
            self.settings.ae_title,
            self.settings.bind_address,
            self.port,
            ", ".join(self.settings.allowed_calling_aets) or "any",
        )

    def stop(self) -> None:
        """Stop listening and abort any association still open (its sender will retry what was unanswered)."""
        if self._server is None:
            return
        self._ae.shutdown()
        self._server = None
        logger.info("storage SCP %s stopped", self.settings.ae_title)

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- event handlers (run in the association's thread) ---------------------------------------------------

    def _on_c_echo(self, event: evt.Event) -> int:
        logger.debug("C-ECHO from %s", _peer(event.assoc))
        return DicomStatus.SUCCESS

    def _on_c_store(self, event: evt.Event) -> int | Dataset:
        """Decode, hand to `accept`, answer. Never raises: pynetdicom would answer 0xC211 and log a traceback."""
        calling_ae = event.assoc.requestor.ae_title.strip()
        sop_instance = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            decoded = len(ds) > 0
        except Exception as exc:  # the bytes are not a data set in the negotiated transfer syntax
            logger.warning("C-STORE of %s from %s: cannot decode the data set: %s", sop_instance, calling_ae, exc)
            return self._failure(event, DicomStatus.CANNOT_UNDERSTAND, "cannot decode the data set")
        if not decoded:
            logger.warning("C-STORE of %s from %s: no data element could be decoded", sop_instance, calling_ae)
            return self._failure(event, DicomStatus.CANNOT_UNDERSTAND, "no data element could be decoded")
        try:
            self._accept(ds, calling_ae)
        except TriageError as exc:
            status = status_for_exception(exc)
            logger.warning(
                "C-STORE of %s from %s refused with %s: %s", sop_instance, calling_ae, describe_status(status), exc
            )
            return self._failure(event, status, str(exc))
        except Exception:
            logger.exception("C-STORE of %s from %s failed unexpectedly; answering 0xA700", sop_instance, calling_ae)
            return self._failure(event, DicomStatus.OUT_OF_RESOURCES, "internal error while storing")
        self._count(event.assoc, stored=1)
        return DicomStatus.SUCCESS

    def _failure(self, event: evt.Event, status: DicomStatus, comment: str) -> Dataset:
        self._count(event.assoc, failed=1)
        response = Dataset()
        response.Status = int(status)
        # The message quotes UIDs and attribute values, never patient identity (see triage.dicom.store).
        response.ErrorComment = comment.replace("\\", "/")[:_ERROR_COMMENT_MAX_CHARS]
        return response

    def _count(self, assoc: Association, stored: int = 0, failed: int = 0) -> None:
        with self._lock:
            counts = self._counts.setdefault(id(assoc), [0, 0])
            counts[0] += stored
            counts[1] += failed

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._counts[id(event.assoc)] = [0, 0]
        logger.info("association accepted from %s", _peer(event.assoc))

    def _on_rejected(self, event: evt.Event) -> None:
        logger.info("association rejected from %s", _peer(event.assoc))

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stored, failed = self._counts.pop(id(event.assoc), [0, 0])
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        logger.info("association %s from %s: %d stored, %d refused", how, _peer(event.assoc), stored, failed)
