"""The outbox on SQLite and PostgreSQL: written in the caller's transaction, delivered once in order per study and
destination, retried with backoff while the peer is down, duplicates suppressed, never two workers on one message."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from triage.worklist.db import create_engine_for
from triage.worklist.outbox import (
    DELIVERED,
    FAILED,
    PENDING,
    DeliveryError,
    Message,
    Outbox,
    OutboxRow,
    backoff_s,
    enqueue,
)

T0 = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)


@pytest.fixture
def engine(db_url):
    engine = create_engine_for(db_url)
    yield engine
    engine.dispose()


def write(engine, *messages: tuple[str, str, str], dedupe: str | None = None) -> list[bool]:
    """(study, kind, destination) messages written in one transaction."""
    with Session(engine) as session, session.begin():
        return [
            enqueue(session, "hl7", dest, kind, {"study": study, "kind": kind}, T0, study_uid=study, dedupe_key=dedupe)
            for study, kind, dest in messages
        ]


class Peer:
    """A RIS that records what it acknowledged and can be down."""

    def __init__(self) -> None:
        self.up = True
        self.got: list[Message] = []
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        if not self.up:
            raise DeliveryError("connection refused")
        with self.lock:
            self.got.append(message)


def test_messages_go_out_in_order_per_study_and_are_retried_while_the_peer_is_down(engine) -> None:
    write(engine, ("s1", "result", "ris:2575"), ("s1", "priority", "ris:2575"), ("s2", "result", "ris:2575"))
    peer = Peer()
    outbox = Outbox(engine, {"hl7": peer}, retry_base_s=10, retry_max_s=60)
    peer.up = False
    assert outbox.deliver_due(T0) == 2  # s1's first and s2's: s1's second waits behind its first
    assert peer.got == []
    rows = {(m["study_uid"], m["kind"]): m for m in outbox.messages()}
    assert rows[("s1", "result")]["attempts"] == 1 and rows[("s1", "result")]["status"] == PENDING
    assert rows[("s1", "priority")]["attempts"] == 0
    assert "connection refused" in rows[("s1", "result")]["last_error"]
    assert outbox.deliver_due(T0 + timedelta(seconds=5)) == 0  # not due before the backoff
    assert outbox.deliver_due(T0 + timedelta(seconds=10)) == 2  # attempt 2: still down
    peer.up = True
    assert outbox.deliver_due(T0 + timedelta(seconds=39)) == 0  # 10 s then 30 s
    assert outbox.deliver_due(T0 + timedelta(seconds=40)) == 3
    assert [(m.study_uid, m.kind) for m in peer.got] == [("s1", "result"), ("s1", "priority"), ("s2", "result")]
    assert {m["status"] for m in outbox.messages()} == {DELIVERED}
    assert outbox.depth() == {}
    # The identifier a peer sees is stable across retries.
    assert peer.got[0].message_id == f"TRIAGE{peer.got[0].id:010d}" and peer.got[0].attempts == 3


def test_a_refused_message_is_kept_as_failed_and_does_not_block_the_next(engine) -> None:
    write(engine, ("s1", "result", "ris"), ("s1", "priority", "ris"))

    def refuse_results(message: Message) -> None:
        if message.kind == "result":
            raise DeliveryError("AR: segment OBX malformed", permanent=True)

    outbox = Outbox(engine, {"hl7": refuse_results})
    assert outbox.deliver_due(T0) == 2
    status = {m["kind"]: m["status"] for m in outbox.messages()}
    assert status == {"result": FAILED, "priority": DELIVERED}


def test_a_duplicate_is_suppressed_and_unknown_channels_wait(engine) -> None:
    assert write(engine, ("s1", "alert", "hook"), dedupe="alert:s1:ich") == [True]
    assert write(engine, ("s1", "alert", "hook"), dedupe="alert:s1:ich") == [False]
    with Session(engine) as session, session.begin():
        enqueue(session, "smtp", "night@example.org", "alert", {}, T0, study_uid="s1")
    peer = Peer()
    assert Outbox(engine, {"hl7": peer}).deliver_due(T0) == 1
    assert len(peer.got) == 1
    assert Outbox(engine, {"hl7": peer}).depth() == {("smtp", "night@example.org"): 1}


def test_two_workers_never_deliver_one_message_twice(engine) -> None:
    write(engine, *[(f"s{n}", "result", "ris") for n in range(30)])
    peer = Peer()
    workers = [Outbox(engine, {"hl7": peer}) for _ in range(2)]
    threads = [threading.Thread(target=w.deliver_due, args=(T0,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [m.id for m in peer.got]
    assert len(ids) == 30 and len(set(ids)) == 30


def test_backoff_grows_by_three_and_is_capped() -> None:
    assert [backoff_s(n, 5, 100) for n in (1, 2, 3, 4)] == [5, 15, 45, 100]


def test_no_database_lock_is_held_while_the_peer_answers(engine) -> None:
    """A slow peer must not hold the worklist database: while it answers, another writer gets through at once."""
    write(engine, ("s1", "result", "ris"))
    writes_done: list[float] = []

    def other_writer() -> None:
        with Session(engine.execution_options(triage_write=True)) as session, session.begin():
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("SET LOCAL lock_timeout = '3s'"))
            session.execute(update(OutboxRow).values(last_error="touched by another writer"))
        writes_done.append(1.0)

    def slow_peer(message: Message) -> None:
        writer = threading.Thread(target=other_writer, daemon=True)
        writer.start()
        writer.join(timeout=5)

    Outbox(engine, {"hl7": slow_peer}).deliver_due(T0)
    assert writes_done, "a write to the outbox waited for the peer's answer"
    assert {m["status"] for m in Outbox(engine, {}).messages()} == {DELIVERED}


def test_a_message_claimed_by_a_worker_that_died_is_sent_again_after_its_lease(engine) -> None:
    write(engine, ("s1", "result", "ris"))

    def dies(message: Message) -> None:
        raise SystemExit  # a worker killed between claim and outcome: nothing is recorded

    crashed = Outbox(engine, {"hl7": dies}, lease_s=120)
    with pytest.raises(SystemExit):
        crashed.deliver_due(T0)
    peer = Peer()
    survivor = Outbox(engine, {"hl7": peer}, lease_s=120)
    assert survivor.deliver_due(T0 + timedelta(seconds=60)) == 0  # still leased to the dead worker
    assert survivor.deliver_due(T0 + timedelta(seconds=120)) == 1
    assert [m.attempts for m in peer.got] == [2]
    assert peer.got[0].message_id == f"TRIAGE{peer.got[0].id:010d}"
    assert {m["status"] for m in survivor.messages()} == {DELIVERED}


def test_an_outcome_after_the_lease_was_taken_over_does_not_overwrite_the_newer_attempt(engine) -> None:
    write(engine, ("s1", "result", "ris"))
    late: list[Message] = []
    peer = Peer()

    def stalls_past_its_lease(message: Message) -> None:
        # While this worker waits, its lease runs out and another worker delivers the message.
        Outbox(engine, {"hl7": peer}, lease_s=10).deliver_due(T0 + timedelta(seconds=11))
        late.append(message)
        raise DeliveryError("timed out")

    Outbox(engine, {"hl7": stalls_past_its_lease}, lease_s=10).deliver_due(T0)
    assert len(late) == 1 and len(peer.got) == 1
    (row,) = Outbox(engine, {}).messages()
    assert row["status"] == DELIVERED and row["attempts"] == 2 and row["last_error"] == ""


def test_a_peer_down_for_days_ends_the_message_as_failed_with_the_reason(engine) -> None:
    write(engine, ("s1", "result", "ris"))
    peer = Peer()
    peer.up = False
    outbox = Outbox(engine, {"hl7": peer}, retry_base_s=600, retry_max_s=6 * 3600, give_up_after_s=24 * 3600)
    at = T0
    for _ in range(20):
        outbox.deliver_due(at)
        (row,) = outbox.messages()
        if row["status"] != PENDING:
            break
        at = datetime.fromisoformat(row["next_attempt_at"])
    assert row["status"] == FAILED
    assert row["last_error"].startswith("gave up after") and "connection refused" in row["last_error"]
    assert at - T0 >= timedelta(hours=24)
    assert outbox.deliver_due(at + timedelta(days=1)) == 0
