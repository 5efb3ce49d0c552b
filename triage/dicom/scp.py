"""The storage SCP: receives C-STORE (and answers C-ECHO) with pynetdicom and hands each instance to `accept`."""

from __future__ import annotations

import inspect
import io
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
    ACCEPTED_TRANSFER_SYNTAXES,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    resolve_sop_classes,
)
from triage.dicom.status import DicomStatus, describe_status, is_permanent_failure, status_for_exception
from triage.errors import TriageError
from triage.tls import server_context

logger = logging.getLogger(__name__)

# The identifiers of C-FIND/C-GET/C-MOVE requests carry patient names; pynetdicom logs them unless told not to.
# This SCP offers none of those services, but an AE in the same process might.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

_ERROR_COMMENT_MAX_CHARS = 64  # (0000,0902) Error Comment is LO (PS3.7 E.1)

# accept(dataset, calling_ae) or accept(dataset, calling_ae, encoded=bytes): the second form also gets the data
# set's bytes as received, so the store can keep them bit for bit instead of encoding the data set again.
Accept = Callable[..., object]


def _takes_encoded(accept: Accept) -> bool:
    try:
        return "encoded" in inspect.signature(accept).parameters
    except (TypeError, ValueError):
        return False


# A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21): (result, source, reason/diagnostic).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected permanent, service user: calling AE title not recognised
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected permanent, service user: called AE title not recognised
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected transient, service provider (presentation): local limit
# pynetdicom's own association limit counts every open connection, those that have not yet sent their
# A-ASSOCIATE-RQ included (an experiment: 12 idle sockets filled a limit of 10). triage counts requested
# associations itself, so pynetdicom's limit only stops a flood of idle connections, each dropped after
# `association_request_timeout_s`.
_CONNECTIONS_PER_ASSOCIATION = 4


def _peer(assoc: Association) -> str:
    requestor = assoc.requestor
    return f"{requestor.ae_title.strip()}@{requestor.address}:{requestor.port}"


class StorageSCP:
    """A storage SCP (PS3.4 B) in a background thread.

    Accepts C-ECHO, and C-STORE for every standard storage SOP class (or those of `accepted_sop_classes`) in any
    of `ACCEPTED_TRANSFER_SYNTAXES`. Each received instance goes to `accept(dataset, calling_ae)` (normally
    `DicomStore.write`); the SCP answers Success only after `accept` has returned, i.e. once the instance is on
    disk and indexed. A TriageError from `accept` (bad data: the store wraps pydicom's errors) becomes the
    permanent failure status of `status_for_exception`; OSError, MemoryError and anything unexpected 0xA700
    (transient: the sender retries). Each refusal is one log line saying which case it was; the server goes on.

    Each A-ASSOCIATE-RQ is checked, and a refusal logged with its reason (PS3.8 9.3.4): a calling AE title
    outside `settings.allowed_calling_aets` (when not empty) is rejected "calling AE title not recognised", a
    called AE title other than ours (unless `require_called_aet` is off) "called AE title not recognised", and
    beyond `max_associations` at once, or `max_associations_per_peer` from one address, "local limit exceeded"
    (transient: the sender retries). A connection that sends no A-ASSOCIATE-RQ within
    `association_request_timeout_s` is closed (the ARTIM timer, PS3.8 9.1.5); it never counts against the limits.

    Args:
        settings: AE title, bind address, port (0: any free port), allowed calling AEs, maximum PDU size,
            timeouts, association limits, accepted SOP classes.
        accept: stores one instance; raises to refuse it.
    """

    def __init__(self, settings: DicomSettings, accept: Accept) -> None:
        self.settings = settings
        self._accept = accept
        self._pass_encoded = _takes_encoded(accept)
        self._ae = self._build_ae(settings)
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self._admission = threading.Lock()
        self._counts: dict[int, list[int]] = {}

    @staticmethod
    def _build_ae(settings: DicomSettings) -> AE:
        ae = AE(ae_title=settings.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = int(settings.max_pdu_bytes)
        # For an acceptor the ACSE timeout is how long a new connection may take to send its A-ASSOCIATE-RQ.
        ae.acse_timeout = float(settings.association_request_timeout_s)
        ae.network_timeout = float(settings.association_idle_timeout_s)
        ae.maximum_associations = max(1, int(settings.max_associations)) * _CONNECTIONS_PER_ASSOCIATION
        ae.add_supported_context(Verification)
        # An acceptor may support any number of presentation contexts; the 128 limit (PS3.8 9.3.2.2) is on
        # what a requestor proposes in one association.
        for sop_class in sorted(resolve_sop_classes(list(settings.accepted_sop_classes))):
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
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        address = (self.settings.bind_address, int(self.settings.port))
        context = None
        if self.settings.tls_certfile and self.settings.tls_keyfile:
            context = server_context(self.settings.tls_certfile, self.settings.tls_keyfile, self.settings.tls_client_ca)
        self._server = self._ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=context)
        settings = self.settings
        logger.info(
            "storage SCP %s listening on %s:%d (calling AEs allowed: %s; called AE checked: %s; at most %d "
            "associations, %d per peer; association request timeout %.1f s)",
            settings.ae_title,
            settings.bind_address,
            self.port,
            ", ".join(settings.allowed_calling_aets) or "any",
            "yes" if settings.require_called_aet else "no",
            settings.max_associations,
            settings.max_associations_per_peer,
            settings.association_request_timeout_s,
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

    def _on_requested(self, event: evt.Event) -> None:
        """Admit or reject an A-ASSOCIATE-RQ, logging the reason of a rejection (before pynetdicom negotiates)."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        if request is None:
            return
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        address = assoc.requestor.address
        settings = self.settings
        allowed = [a.strip() for a in settings.allowed_calling_aets]
        with self._admission:
            if allowed and calling not in allowed:
                reject, reason = _REJECT_CALLING_AE, f"calling AE title {calling!r} is not in the allow-list"
            elif settings.require_called_aet and called != settings.ae_title.strip():
                reject, reason = _REJECT_CALLED_AE, f"called AE title {called!r} is not ours ({settings.ae_title!r})"
            else:
                others = [a for a in self._requested_associations() if a is not assoc]
                from_peer = sum(1 for a in others if a.requestor.address == address)
                if len(others) >= settings.max_associations:
                    reject = _REJECT_LOCAL_LIMIT
                    reason = (
                        f"local limit exceeded: {len(others)} associations open, at most {settings.max_associations} "
                        "(TRIAGE_DICOM__MAX_ASSOCIATIONS)"
                    )
                elif from_peer >= settings.max_associations_per_peer:
                    reject = _REJECT_LOCAL_LIMIT
                    reason = (
                        f"local limit exceeded: {from_peer} associations open from {address}, at most "
                        f"{settings.max_associations_per_peer} per peer (TRIAGE_DICOM__MAX_ASSOCIATIONS_PER_PEER)"
                    )
                else:
                    return
            # Under the lock, so that a concurrent request no longer counts this one.
            assoc.acse.send_reject(*reject)
        logger.warning("association from %s@%s:%s rejected: %s", calling, address, assoc.requestor.port, reason)
        # As pynetdicom does after its own rejections: stop the association's DUL once the RJ is sent.
        assoc.kill()

    def _requested_associations(self) -> list[Association]:
        """Associations of this SCP that sent an A-ASSOCIATE-RQ and are neither rejected nor finished."""
        return [
            a
            for a in self._ae.active_associations
            if a.is_acceptor
            and a.requestor.primitive is not None
            and not (a.is_rejected or a.is_aborted or a.is_released)
        ]

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
        except MemoryError:
            logger.error("C-STORE of %s from %s refused (resource trouble): out of memory", sop_instance, calling_ae)
            return self._failure(event, DicomStatus.OUT_OF_RESOURCES, "out of memory while decoding")
        except Exception as exc:  # the bytes are not a data set in the negotiated transfer syntax
            logger.warning(
                "C-STORE of %s from %s refused (bad data) with %s: cannot decode the data set: %s",
                sop_instance,
                calling_ae,
                describe_status(DicomStatus.CANNOT_UNDERSTAND),
                exc,
            )
            return self._failure(event, DicomStatus.CANNOT_UNDERSTAND, "cannot decode the data set")
        if not decoded:
            logger.warning("C-STORE of %s from %s: no data element could be decoded", sop_instance, calling_ae)
            return self._failure(event, DicomStatus.CANNOT_UNDERSTAND, "no data element could be decoded")
        try:
            if self._pass_encoded:
                # The bytes the data set was decoded from, in the negotiated transfer syntax (PS3.7 9.3.1.1).
                received = getattr(event.request, "DataSet", None)
                encoded = received.getvalue() if isinstance(received, io.BytesIO) else None
                self._accept(ds, calling_ae, encoded=encoded)
            else:
                self._accept(ds, calling_ae)
        except TriageError as exc:
            # Expected bad input: one line, no traceback. The message quotes UIDs and values, never identity.
            status = status_for_exception(exc)
            kind = "bad data" if is_permanent_failure(status) else "resource trouble"
            logger.warning(
                "C-STORE of %s from %s refused (%s) with %s: %s",
                sop_instance,
                calling_ae,
                kind,
                describe_status(status),
                exc,
            )
            return self._failure(event, status, str(exc))
        except (OSError, MemoryError) as exc:
            # Disk full, read-only, memory exhausted: the sender may retry once it is solved (PS3.4 B.2.3).
            logger.error(
                "C-STORE of %s from %s refused (resource trouble) with %s: %s: %s",
                sop_instance,
                calling_ae,
                describe_status(DicomStatus.OUT_OF_RESOURCES),
                type(exc).__name__,
                exc,
            )
            return self._failure(event, DicomStatus.OUT_OF_RESOURCES, f"out of resources: {type(exc).__name__}")
        except Exception:
            logger.exception(
                "C-STORE of %s from %s failed unexpectedly (resource trouble or a bug); answering 0xA700",
                sop_instance,
                calling_ae,
            )
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
        # Only pynetdicom's own limit gets here (triage's checks reject in `_on_requested`, with their reason).
        logger.warning(
            "association from %s rejected: local limit exceeded: more than %d connections open, including "
            "connections that have not sent an association request yet",
            _peer(event.assoc),
            self._ae.maximum_associations,
        )

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stored, failed = self._counts.pop(id(event.assoc), [0, 0])
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        logger.info("association %s from %s: %d stored, %d refused", how, _peer(event.assoc), stored, failed)
