"""The outbox: everything triage sends out (HL7 to the RIS, webhooks, e-mail) as rows in the worklist database.

A message is written in the same transaction as the change that caused it, so a change and what it announces are
never separated by a crash: after a SIGKILL the message is still there and is sent once the service is back.
A delivery worker takes due messages and hands each to its channel's deliverer; the peer's acknowledgement ends a
message (delivered); a transient failure (peer down, timeout, negative acknowledgement that may pass) is retried
with exponential backoff; a permanent one (the peer refuses the message itself) is kept as failed, with the reason,
for an admin. Messages of one study to one destination go out in the order they were written: a later one waits
while an earlier one is still pending, so a RIS never sees a priority notice before the result it refers to.

Delivery is at least once: a crash between the peer's acknowledgement and the commit resends that message (once its
lease has run out), with the same identifier (`message_id`), so that the peer can recognise the repeat. A message
that still fails transiently after `give_up_after_s` is kept as failed, like a refused one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Integer, String, Text, and_, exists, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column

from triage.errors import TriageError
from triage.worklist.accounts import AuditRow
from triage.worklist.db import WRITE_OPTION
from triage.worklist.tables import UID_LEN, Base, UTCDateTime

log = logging.getLogger(__name__)

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"  # permanently: the peer refused the message itself


class DeliveryError(TriageError):
    """A delivery that did not succeed. `permanent` when retrying cannot help (the peer refused the content)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class OutboxRow(Base):
    """One message to send: its channel and destination, the event it announces (JSON), and how delivery went."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(32), index=True)
    destination: Mapped[str] = mapped_column(Text)
    study_uid: Mapped[str] = mapped_column(String(UID_LEN), default="", index=True)
    kind: Mapped[str] = mapped_column(String(64))
    # Suppresses duplicates: a second message with the same key is not written (e.g. one alert per finding).
    dedupe_key: Mapped[str | None] = mapped_column(Text, nullable=True, unique=True)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


@dataclass(frozen=True)
class Message:
    """A message as a deliverer gets it. `message_id` is stable across retries (HL7 MSH-10, webhook id)."""

    id: int
    channel: str
    destination: str
    study_uid: str
    kind: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime

    @property
    def message_id(self) -> str:
        return f"TRIAGE{self.id:010d}"


Deliverer = Callable[[Message], None]


def enqueue(
    session: Session,
    channel: str,
    destination: str,
    kind: str,
    payload: Mapping[str, Any],
    now: datetime,
    study_uid: str = "",
    dedupe_key: str | None = None,
) -> bool:
    """Write one message inside the caller's transaction. Returns False when `dedupe_key` was written before."""
    values = {
        "channel": channel,
        "destination": destination,
        "study_uid": study_uid,
        "kind": kind,
        "dedupe_key": dedupe_key,
        "payload": json.dumps(payload, sort_keys=True, default=str),
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "last_error": "",
        "created_at": now,
    }
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(OutboxRow).values(**values).on_conflict_do_nothing().returning(OutboxRow.id)
    return session.execute(statement).first() is not None


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before retry number `attempts` (1, 2, ...): base, x3 each time, capped."""
    return min(max_s, base_s * math.pow(3, max(0, attempts - 1)))


class Outbox:
    """Delivers due messages through the deliverer of their channel.

    Args:
        engine: The worklist database.
        deliverers: Channel name -> function that sends one message and returns once the peer acknowledged it,
            raising `DeliveryError` (or any exception: treated as transient) otherwise.
        retry_base_s, retry_max_s: The backoff of transient failures (x3 per attempt, capped).
        give_up_after_s: A message still failing transiently this long after it was written is kept as failed
            (with the reason, for an admin) instead of being retried for ever.
        lease_s: How long a claimed message is not due again: longer than any deliverer's own timeout.
        audited_kinds: Message kinds whose deliveries and failures are written to the audit log as well.
    """

    def __init__(
        self,
        engine: Engine,
        deliverers: Mapping[str, Deliverer],
        retry_base_s: float = 5.0,
        retry_max_s: float = 600.0,
        audited_kinds: frozenset[str] = frozenset(),
        give_up_after_s: float = 72 * 3600.0,
        lease_s: float = 300.0,
    ) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        self.deliverers = dict(deliverers)
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.give_up_after_s = give_up_after_s
        self.lease_s = lease_s
        # Kinds whose every delivery and failure goes to the audit log too (critical alerts).
        self.audited_kinds = audited_kinds

    def _due(self, now: datetime, study_uid: str | None = None) -> Any:
        earlier = aliased(OutboxRow)
        blocked = exists().where(
            and_(
                earlier.channel == OutboxRow.channel,
                earlier.destination == OutboxRow.destination,
                earlier.study_uid == OutboxRow.study_uid,
                earlier.status == PENDING,
                earlier.id < OutboxRow.id,
            )
        )
        query = (
            select(OutboxRow)
            .where(
                OutboxRow.status == PENDING,
                OutboxRow.next_attempt_at <= now,
                OutboxRow.channel.in_(sorted(self.deliverers)),
                ~blocked,  # in order per study and destination: an earlier pending message goes first
            )
            .order_by(OutboxRow.id)
            .limit(1)
        )
        if study_uid is not None:
            query = query.where(OutboxRow.study_uid == study_uid)
        if self.engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=OutboxRow)
        return query

    def deliver_one(self, now: datetime, study_uid: str | None = None) -> Message | None:
        """Deliver the oldest due message. Returns it (with its outcome stored), or None when nothing is due.

        The message is claimed in a short transaction (a lease: it is not due again for `lease_s`), sent with no
        database transaction open, and its outcome recorded in a second one. A slow or dead peer so never holds
        a lock on the worklist database, and a worker that dies while sending leaves the message to be sent
        again (with the same `message_id`) once the lease runs out.
        """
        message = self._claim(now, study_uid)
        if message is None:
            return None
        try:
            self.deliverers[message.channel](message)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded; the worker goes on
            self._record(message, now, exc)
        else:
            self._record(message, now, None)
        return message

    def _claim(self, now: datetime, study_uid: str | None) -> Message | None:
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            row = session.execute(self._due(now, study_uid)).scalars().first()
            if row is None:
                return None
            row.attempts += 1
            row.next_attempt_at = now + timedelta(seconds=self.lease_s)
            return Message(
                row.id, row.channel, row.destination, row.study_uid, row.kind, json.loads(row.payload),
                row.attempts, row.created_at,
            )  # fmt: skip

    def _record(self, message: Message, now: datetime, exc: Exception | None) -> None:
        with Session(self._write_engine) as session, session.begin():
            row = session.get(OutboxRow, message.id, with_for_update=self.engine.dialect.name == "postgresql")
            if row is None or row.status != PENDING or row.attempts != message.attempts:
                # The lease ran out while the peer was answering and another worker took the message over:
                # its outcome is the one that counts.
                log.warning("outbox %s %s to %s: outcome of attempt %d dropped, the message was taken over",
                            message.channel, message.kind, message.destination, message.attempts)  # fmt: skip
                return
            if exc is None:
                row.status = DELIVERED
                row.delivered_at = now
                row.last_error = ""
            else:
                permanent = isinstance(exc, DeliveryError) and exc.permanent
                row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
                age_s = (now - row.created_at).total_seconds()
                if permanent:
                    row.status = FAILED
                    # The peer's own words stay in the database (they may quote the patient), not in the log.
                    log.error("outbox %s %s to %s failed permanently (%s)", row.channel, row.kind, row.destination,
                              type(exc).__name__)  # fmt: skip
                elif age_s >= self.give_up_after_s:
                    row.status = FAILED
                    row.last_error = (f"gave up after {row.attempts} attempts over {age_s / 3600:.1f} h; last: "
                                      + row.last_error)[:2000]  # fmt: skip
                    log.error("outbox %s %s to %s: gave up after %d attempts over %.1f h (%s)", row.channel,
                              row.kind, row.destination, row.attempts, age_s / 3600, type(exc).__name__)  # fmt: skip
                else:
                    wait = backoff_s(row.attempts, self.retry_base_s, self.retry_max_s)
                    row.next_attempt_at = now + timedelta(seconds=wait)
                    log.warning("outbox %s %s to %s: attempt %d failed (%s); retry in %.0f s", row.channel, row.kind,
                                row.destination, row.attempts, type(exc).__name__, wait)  # fmt: skip
            if row.kind in self.audited_kinds:
                action = {DELIVERED: "alert-delivered", FAILED: "alert-failed"}.get(row.status, "alert-retry")
                detail = {"channel": row.channel, "destination": row.destination, "message": message.message_id,
                          "attempts": row.attempts, "error": row.last_error}  # fmt: skip
                session.add(AuditRow(at=now, user_name="triage", action=action, study_uid=row.study_uid or None,
                                     detail=detail))  # fmt: skip

    def deliver_due(self, now: datetime, limit: int = 100, study_uid: str | None = None) -> int:
        """Deliver due messages (of one study, or all) until none is left (or `limit`); returns how many were
        tried."""
        tried = 0
        while tried < limit and self.deliver_one(now, study_uid) is not None:
            tried += 1
        return tried

    def depth(self) -> dict[tuple[str, str], int]:
        """Pending messages per (channel, destination)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(OutboxRow.channel, OutboxRow.destination, func.count())
                .where(OutboxRow.status == PENDING)
                .group_by(OutboxRow.channel, OutboxRow.destination)
            ).all()
        return {(c, d): int(n) for c, d, n in rows}

    def messages(self, study_uid: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Messages (newest first) as plain data: for the study page, the API and tests."""
        query = select(OutboxRow).order_by(OutboxRow.id.desc()).limit(limit)
        if study_uid is not None:
            query = query.where(OutboxRow.study_uid == study_uid)
        with Session(self.engine) as session:
            rows = session.execute(query).scalars().all()
        return [
            {
                "id": r.id, "channel": r.channel, "destination": r.destination, "study_uid": r.study_uid,
                "kind": r.kind, "status": r.status, "attempts": r.attempts, "last_error": r.last_error,
                "created_at": r.created_at.isoformat(), "next_attempt_at": r.next_attempt_at.isoformat(),
                "delivered_at": r.delivered_at.isoformat() if r.delivered_at else None,
                "payload": json.loads(r.payload),
            }
            for r in rows
        ]  # fmt: skip
