"""How outbox messages leave: each channel's deliverer (HL7 to the RIS over MLLP), and the HL7 order listener's
handler. Kept apart from the HTTP app: the analysis role delivers and the ingest role listens, each without it."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import smtplib
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import httpx

from triage.config import AlertSettings, Hl7Settings, ResultsSettings
from triage.dicom.phi import hash_identifier
from triage.dicom.results import ResultsExportError, export_study_results, reportable
from triage.domain import ClinicalOrder, PriorityLevel, utcnow
from triage.errors import TriageError
from triage.hl7.messages import (
    AI_NOTICE,
    Envelope,
    HL7Error,
    ResultLine,
    ack,
    ack_status,
    build_oru,
    build_priority_notice,
    nak,
    parse_orders,
)
from triage.hl7.mllp import MLLPError, send
from triage.tls import client_context, server_context
from triage.worklist.alerts import ESCALATION
from triage.worklist.outbox import DeliveryError, Message

log = logging.getLogger(__name__)

HL7 = "hl7"
DICOM = "dicom"
AI_RESULT = "ai-result"
PRIORITY_CHANGE = "priority-change"


def server_tls(settings: Hl7Settings) -> ssl.SSLContext | None:
    """The listener's TLS context (BCP 195), or None for plain MLLP on a private network."""
    if not (settings.certfile and settings.keyfile):
        return None
    return server_context(settings.certfile, settings.keyfile, settings.client_ca)


def ris_tls(settings: Hl7Settings) -> ssl.SSLContext | None:
    """The TLS context for sending to the RIS (its certificate verified), or None for plain MLLP."""
    if not settings.ris_tls:
        return None
    return client_context(settings.ris_ca, settings.ris_certfile, settings.ris_keyfile)


def envelope(settings: Hl7Settings) -> Envelope:
    return Envelope(
        sending_application=settings.sending_application,
        sending_facility=settings.sending_facility,
        receiving_application=settings.receiving_application,
        receiving_facility=settings.receiving_facility,
    )


class Hl7Deliverer:
    """Sends an outbox message to the RIS as HL7 and returns once the RIS acknowledged it (AA/CA).

    AR/CR (the RIS refuses the message itself) is permanent; AE/CE, a refused connection or a timeout are
    transient and retried by the outbox. MSH-10 is the outbox message id, the same on every retry.
    """

    def __init__(self, settings: Hl7Settings) -> None:
        self.settings = settings
        self.context = ris_tls(settings)

    def render(self, message: Message) -> str:
        data = message.payload
        if message.kind == PRIORITY_CHANGE:
            return build_priority_notice(
                data["accession_number"], message.study_uid, PriorityLevel(data["previous"]),
                PriorityLevel(data["current"]), data.get("reason", ""), control_id=message.message_id,
                envelope=envelope(self.settings),
            )  # fmt: skip
        results = [ResultLine(**line) for line in data.get("results", [])]
        return build_oru(
            data["accession_number"], message.study_uid, results, PriorityLevel(data["priority"]),
            data.get("reason", ""), notice=AI_NOTICE, control_id=message.message_id, envelope=envelope(self.settings),
        )  # fmt: skip

    def __call__(self, message: Message) -> None:
        text = self.render(message)
        host, _, port = message.destination.rpartition(":")
        try:
            reply = send(host, int(port), text, timeout_s=self.settings.timeout_s, ssl_context=self.context)
            code, why = ack_status(reply, message.message_id)
        except (MLLPError, OSError) as exc:
            raise DeliveryError(f"RIS at {message.destination} not reached: {exc}") from exc
        except HL7Error as exc:
            raise DeliveryError(f"RIS at {message.destination} answered with no usable ACK: {exc}") from exc
        if code in ("AR", "CR"):
            raise DeliveryError(f"RIS refused the message ({code}): {why}", permanent=True)
        if code not in ("AA", "CA"):
            raise DeliveryError(f"RIS could not take the message now ({code}): {why}")


def order_handler(record: Callable[[ClinicalOrder], str | None], salt: str) -> Callable[[str], str]:
    """The MLLP listener's handler: each order of the message is recorded (joined to its study by accession
    number); the answer is an ACK, or a NAK with the reason for a message that cannot be taken. Logged by message
    control id and a salted hash of the accession number, never the patient."""
    fields = [f.name for f in dataclasses.fields(ClinicalOrder)]

    def handle(text: str) -> str:
        try:
            orders = parse_orders(text)
        except HL7Error as exc:
            log.warning("HL7 message refused: %s", exc)
            return nak(text, exc)
        for order in orders:
            clinical = ClinicalOrder(**{name: getattr(order, name) for name in fields})
            try:
                joined = record(clinical)
            except ValueError as exc:
                log.warning("HL7 order %s refused: %s", order.control_id, exc)
                return ack(text, "AE", str(exc))
            log.info("HL7 %s %s accession#%s: %s", order.message_type, order.control_id,
                     hash_identifier(order.accession_number, salt)[:12],
                     f"joined study {joined}" if joined else "kept until its study arrives")  # fmt: skip
        return ack(text, "AA")

    return handle


class WebhookDeliverer:
    """POSTs a critical alert as JSON, signed: X-Triage-Signature: sha256=HMAC-SHA256(secret, body) in hex (the
    receiver recomputes it over the exact body), X-Triage-Delivery: the message id (the same on every retry),
    X-Triage-Timestamp and the body's `sent_at`: when this attempt was sent (Unix seconds; signed, so a receiver can
    refuse a replayed old delivery). 2xx delivers; 4xx other than 408/429 is permanent (the receiver refuses the
    message); the rest is retried. Without a secret the alerts go unsigned, with a warning in the log."""

    def __init__(self, settings: AlertSettings) -> None:
        self.settings = settings
        self._warned_unsigned = False

    def __call__(self, message: Message) -> None:
        sent_at = int(time.time())
        body = json.dumps({**_with_link(message, self.settings), "sent_at": sent_at}, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "X-Triage-Delivery": message.message_id,
                   "X-Triage-Event": message.kind, "X-Triage-Timestamp": str(sent_at)}  # fmt: skip
        if self.settings.webhook_secret:
            digest = hmac.new(self.settings.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Triage-Signature"] = f"sha256={digest}"
        elif not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("webhook alerts are sent unsigned: set TRIAGE_ALERTS__WEBHOOK_SECRET so receivers can tell "
                        "them from forgeries")  # fmt: skip
        try:
            response = httpx.post(message.destination, content=body, headers=headers, timeout=self.settings.timeout_s)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"webhook {message.destination} not reached: {type(exc).__name__}: {exc}") from exc
        if response.is_success:
            return
        permanent = 400 <= response.status_code < 500 and response.status_code not in (408, 429)
        raise DeliveryError(f"webhook {message.destination} answered {response.status_code}", permanent=permanent)


class EmailDeliverer:
    """Sends a critical alert by e-mail through the configured SMTP server (no patient name or ID in it)."""

    def __init__(self, settings: AlertSettings) -> None:
        self.settings = settings

    def __call__(self, message: Message) -> None:
        data = _with_link(message, self.settings)
        escalated = message.kind == ESCALATION
        mail = EmailMessage()
        subject = "ESCALATION: unclaimed " if escalated else "CRITICAL: "
        subject += f"{data.get('finding', 'stat study').replace('_', ' ')} - {data.get('site', '')}".strip(" -")
        mail["Subject"] = f"[triage] {subject} (accession {data.get('accession_number') or '-'})"
        mail["From"] = self.settings.smtp_from
        mail["To"] = message.destination
        mail["Message-ID"] = f"<{message.message_id}@triage>"
        lines = [
            (
                "No radiologist has claimed this study for " + f"{data.get('unclaimed_min', '?')} min."
                if escalated
                else "An AI finding has made this study stat on the worklist."
            ),  # fmt: skip
            "",
            f"Site: {data.get('site', '')}",
            f"Accession: {data.get('accession_number', '')}",
            f"Study: {data.get('modality', '')} {data.get('study_description', '')}",
        ]
        if not escalated:
            lines.append(f"Finding: {data.get('finding', '').replace('_', ' ')} (probability "
                         f"{data.get('probability')}, {data.get('model')} {data.get('model_version')})")  # fmt: skip
            if data.get("synthetic"):
                lines.append("Synthetic demonstration model, not validated: do not act on it.")
        if data.get("link"):
            lines.append(f"Open: {data['link']}")
        lines += ["", str(data.get("notice", "AI triage aid, not a diagnosis")) + "."]
        mail.set_content("\n".join(lines))
        try:
            settings = self.settings
            context = client_context(settings.smtp_tls_ca) if settings.smtp_ssl or settings.smtp_starttls else None
            smtp: smtplib.SMTP
            if settings.smtp_ssl:
                smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_s,
                                        context=context)  # fmt: skip
            else:
                smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_s)
            with smtp:
                if settings.smtp_starttls:
                    smtp.starttls(context=context)
                if settings.smtp_user:
                    # AlertSettings refuses a user without TLS: the password never goes over a plain connection.
                    smtp.login(settings.smtp_user, settings.smtp_password)
                smtp.send_message(mail)
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"mail server refused {message.destination}: {exc}", permanent=True) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"mail server {self.settings.smtp_host}:{self.settings.smtp_port}: {exc}") from exc


def _with_link(message: Message, settings: AlertSettings) -> dict[str, Any]:
    data = {**message.payload, "id": message.message_id}
    if settings.base_url:
        data["link"] = f"{settings.base_url.rstrip('/')}/studies/{message.study_uid}"
    return data


class DicomResultsDeliverer:
    """Sends a study's results (TID 1500 report, SEG, overlay captures) to the PACS named by the message,
    "AE@host:port", over TLS where the site's (or the service's) results settings ask. The findings sent are the
    study's as stored now (active models only: a shadow finding is never sent out). The results are those kept in the
    store for these findings (built and kept on first use, the same ones triage's DICOMweb shows), so every attempt
    sends the same instances with the same UIDs: a retry after a partial send completes it, it leaves no second
    report in the PACS. A PACS that cannot be reached is retried by the outbox; a study whose results cannot be built
    is failed for good, with the reason."""

    def __init__(
        self,
        worklist: Any,
        store: Any,
        results: ResultsSettings,
        codes: Callable[[], dict[str, tuple[str, str, str]]],
    ) -> None:
        self.worklist, self.store, self.results, self.codes = worklist, store, results, codes

    def __call__(self, message: Message) -> None:
        ae_title, _, address = message.destination.partition("@")
        host, _, port = address.rpartition(":")
        study = self.worklist.get_study(message.study_uid, utcnow())
        findings = reportable(study.findings)
        if not findings:
            return  # nothing of an active model to send (a re-analysis removed it): done
        site = self.worklist.site_record(study.site, study.site_match)
        tls: Any = site.results if site is not None and site.results is not None else self.results
        context = client_context(tls.tls_ca, tls.tls_certfile, tls.tls_keyfile) if tls.tls else None
        try:
            sent = export_study_results(
                self.store, message.study_uid, findings, study.ai_status, study.ai_reason, (ae_title, host, int(port)),
                calling_ae=self.results.calling_ae, codes_by_label=self.codes(), ssl_context=context,
            )  # fmt: skip
        except ResultsExportError as exc:
            raise DeliveryError(str(exc)) from exc
        except TriageError as exc:
            raise DeliveryError(f"results of study {message.study_uid} cannot be built: {exc}", permanent=True) from exc
        log.info("study %s: %d result instance(s) stored by %s", message.study_uid, sent, message.destination)


def results_destination(settings: ResultsSettings) -> Callable[[Any], str | None]:
    """Where a site's results go: its own PACS, else TRIAGE_RESULTS__*; None when neither is set."""

    def destination(site: Any) -> str | None:
        if site is not None and site.results is not None and site.results.host:
            return f"{site.results.ae_title}@{site.results.host}:{site.results.port}"
        if settings.host:
            return f"{settings.ae_title}@{settings.host}:{settings.port}"
        return None

    return destination
