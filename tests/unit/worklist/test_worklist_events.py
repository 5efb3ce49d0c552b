"""The Broadcaster: events published from other threads reach asyncio subscribers in their own loop; with
PostgreSQL, the relay carries them to every other process on the database."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from triage.domain import InstanceMeta
from triage.errors import TriageError
from triage.worklist.db import create_engine_for
from triage.worklist.events import RESYNC, STUDY_UPDATED, Broadcaster, PgNotifyRelay, relay_for
from triage.worklist.repository import Worklist

ROOT = Path(__file__).resolve().parents[3]


def test_events_published_from_threads_reach_async_subscribers():
    broadcaster = Broadcaster()

    async def main():
        async with broadcaster.subscription() as first, broadcaster.subscription() as second:
            assert broadcaster.subscriber_count == 2
            threads = [
                threading.Thread(target=broadcaster.publish, args=({"type": "study.updated", "study_uid": str(i)},))
                for i in range(5)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            got_first = [await asyncio.wait_for(first.get(), 5) for _ in range(5)]
            got_second = [await asyncio.wait_for(second.get(), 5) for _ in range(5)]
        assert broadcaster.subscriber_count == 0
        return got_first, got_second

    got_first, got_second = asyncio.run(main())
    assert sorted(e["study_uid"] for e in got_first) == ["0", "1", "2", "3", "4"]
    assert sorted(e["study_uid"] for e in got_second) == ["0", "1", "2", "3", "4"]


def test_slow_subscriber_gets_a_resync_instead_of_a_backlog():
    broadcaster = Broadcaster()

    async def main():
        sub = broadcaster.subscribe(maxsize=3)
        for i in range(10):
            broadcaster.publish({"type": "study.updated", "study_uid": str(i)})
        await asyncio.sleep(0.05)  # let the loop run the deliveries
        events = []
        while not sub.queue.empty():
            events.append(sub.queue.get_nowait())
        sub.close()
        return events

    events = asyncio.run(main())
    assert len(events) <= 3
    assert any(e["type"] == RESYNC for e in events)
    # Nothing is lost silently: the newest change is either queued or covered by a later resync.
    assert events[-1]["type"] == RESYNC or events[-1]["study_uid"] == "9"


def test_subscriber_whose_loop_closed_is_dropped_and_publish_never_raises():
    broadcaster = Broadcaster()

    async def subscribe_only():
        broadcaster.subscribe()

    asyncio.run(subscribe_only())  # the loop closes with the subscription still registered
    assert broadcaster.subscriber_count == 1
    broadcaster.publish({"type": "study.updated", "study_uid": "1"})
    assert broadcaster.subscriber_count == 0


def test_failing_listener_does_not_stop_others():
    broadcaster = Broadcaster()
    seen = []

    def bad(event):
        raise RuntimeError("listener bug")

    with broadcaster.listening(bad), broadcaster.listening(seen.append):
        broadcaster.publish({"type": "study.updated", "study_uid": "1"})
    assert seen == [{"type": "study.updated", "study_uid": "1"}]
    assert broadcaster.subscriber_count == 0


# ---------------------------------------------------------------------------------------------------- relay
# A second process, as a replica would be: its own interpreter, engine and listener connection. It prints every
# event its subscribers receive as one JSON line, and publishes each JSON line it reads on stdin.
_REPLICA = """
import json, sys
from triage.worklist.events import Broadcaster, PgNotifyRelay

broadcaster = Broadcaster()
relay = PgNotifyRelay(sys.argv[1], broadcaster)
with broadcaster.listening(lambda event: print(json.dumps(event), flush=True)):
    print("ready" if relay.start() else "not listening", flush=True)
    for line in sys.stdin:
        broadcaster.publish(json.loads(line))
relay.stop()
"""

UID_A = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000000001"
UID_B = "1.2.826.0.1.3680043.8.498.20000000000000000000000000000000000002"
UID_C = "1.2.826.0.1.3680043.8.498.30000000000000000000000000000000000003"


def _event(uid: str, change: str) -> dict:
    return {"type": STUDY_UPDATED, "study_uid": uid, "change": change}


class _Replica:
    """The replica script in a subprocess, with its output lines read into a queue."""

    def __init__(self, url: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REPLICA, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next_line(self, timeout_s: float = 20.0) -> str:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"the replica printed nothing within {timeout_s} s") from None

    def publish(self, event: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(event) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._reader.join(timeout=5)  # every line the replica printed is queued before anyone looks


def _take(events: queue.Queue[dict], timeout_s: float = 15.0) -> dict:
    try:
        return events.get(timeout=timeout_s)
    except queue.Empty:
        raise AssertionError(f"no event arrived within {timeout_s} s") from None


@pytest.fixture
def relays(postgres_database: str) -> Iterator[list[tuple[Broadcaster, PgNotifyRelay]]]:
    """Two relays on their own engines and listener connections, as two processes have; stopped afterwards."""
    started: list[tuple[Broadcaster, PgNotifyRelay]] = []
    for _ in range(2):
        broadcaster = Broadcaster()
        relay = PgNotifyRelay(postgres_database, broadcaster)
        assert relay.start(ready_timeout_s=15)
        started.append((broadcaster, relay))
    yield started
    for _, relay in started:
        relay.stop()


@pytest.mark.postgres
def test_event_published_in_one_process_reaches_the_other_and_its_own_subscribers_exactly_once(postgres_database):
    broadcaster = Broadcaster()
    relay = PgNotifyRelay(postgres_database, broadcaster)
    replica = _Replica(postgres_database)
    here: queue.Queue[dict] = queue.Queue()
    try:
        assert relay.start(ready_timeout_s=15)
        assert replica.next_line(60) == "ready"
        with broadcaster.listening(here.put):
            broadcaster.publish(_event(UID_A, "created"))
            # The other process hears it, exactly as published (the relay's envelope does not show).
            assert json.loads(replica.next_line()) == _event(UID_A, "created")
            replica.publish(_event(UID_B, "analysed"))
            assert json.loads(replica.next_line()) == _event(UID_B, "analysed")  # its own subscriber, locally
            # PostgreSQL delivers notifications in commit order, so an echo of UID_A would be here before UID_B.
            assert [_take(here), _take(here)] == [_event(UID_A, "created"), _event(UID_B, "analysed")]
            broadcaster.publish(_event(UID_C, "claimed"))
            assert json.loads(replica.next_line()) == _event(UID_C, "claimed")
            replica.close()
            # The replica printed nothing more: its own UID_B was not delivered a second time by its echo.
            assert replica.lines.empty()
            assert here.get(timeout=0.5) == _event(UID_C, "claimed")
            assert here.empty()
    finally:
        replica.close()
        relay.stop()


@pytest.mark.postgres
def test_listener_killed_by_the_server_reconnects_resyncs_and_delivers_later_events(postgres_database, relays):
    (here, relay), (there, _) = relays
    killed: list[int] = []

    def kill() -> None:
        import psycopg

        pid = relay.backend_pid
        assert pid is not None
        killed.append(pid)
        with psycopg.connect(_libpq(postgres_database), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

    async def main() -> list[dict]:
        got = []
        async with here.subscription() as sub:
            for round_ in range(2):  # killed twice: each reconnect is followed by a resync
                await asyncio.to_thread(kill)
                got.append(await asyncio.wait_for(sub.get(), 15))
                # Events from the other process arrive again over the new connection.
                await asyncio.to_thread(there.publish, _event(UID_B, f"re-queued-{round_}"))
                got.append(await asyncio.wait_for(sub.get(), 15))
        return got

    got = asyncio.run(main())
    assert [e["type"] for e in got[::2]] == [RESYNC, RESYNC]
    assert got[1::2] == [_event(UID_B, "re-queued-0"), _event(UID_B, "re-queued-1")]
    assert relay.reconnects == 2
    assert relay.backend_pid not in (None, *killed)
    # And this process's events still reach the other one.
    seen: queue.Queue[dict] = queue.Queue()
    with there.listening(seen.put):
        here.publish(_event(UID_A, "reported"))
        assert _take(seen) == _event(UID_A, "reported")


def test_relay_without_a_reachable_server_keeps_local_delivery_and_stops_promptly():
    pytest.importorskip("psycopg")
    broadcaster = Broadcaster()
    relay = PgNotifyRelay("postgresql+psycopg://postgres@127.0.0.1:1/postgres", broadcaster, connect_timeout_s=1)
    seen: list[dict] = []
    try:
        assert relay.start(ready_timeout_s=0.5) is False  # nothing listens on port 1: it keeps retrying
        with broadcaster.listening(seen.append):
            broadcaster.publish(_event(UID_A, "created"))  # the NOTIFY fails; publish never raises
    finally:
        relay.stop()
    assert seen == [_event(UID_A, "created")]
    assert not relay.listening


@pytest.mark.postgres
def test_event_too_large_for_notify_reaches_the_others_as_a_resync(relays):
    (here, _), (there, _) = relays
    local: queue.Queue[dict] = queue.Queue()
    remote: queue.Queue[dict] = queue.Queue()
    large = {**_event(UID_A, "analysed"), "detail": "x" * 9000}
    with here.listening(local.put), there.listening(remote.put):
        here.publish(large)
        assert _take(local) == large
        got = _take(remote)
    assert got["type"] == RESYNC


@pytest.mark.postgres
def test_stopped_relay_ends_its_listener_and_publishes_locally_only(postgres_database):
    broadcaster = Broadcaster()
    relay = PgNotifyRelay(postgres_database, broadcaster)
    assert relay.start(ready_timeout_s=15)
    relay.stop()
    assert not relay.listening and relay.backend_pid is None
    seen: list[dict] = []
    with broadcaster.listening(seen.append):
        broadcaster.publish(_event(UID_A, "created"))
    assert seen == [_event(UID_A, "created")]


def test_sqlite_keeps_the_in_process_broadcaster(tmp_path):
    url = f"sqlite:///{tmp_path / 'worklist.db'}"
    assert relay_for(url, Broadcaster()) is None
    with pytest.raises(TriageError, match="PostgreSQL"):
        PgNotifyRelay(url, Broadcaster())


def test_channel_must_be_a_plain_identifier():
    with pytest.raises(TriageError, match="channel"):
        PgNotifyRelay("postgresql+psycopg://postgres@127.0.0.1/postgres", Broadcaster(), channel="x; DROP TABLE y")


def _libpq(url: str) -> str:
    parsed = make_url(url)
    return f"host={parsed.host} port={parsed.port or 5432} user={parsed.username} dbname={parsed.database}"


@pytest.mark.postgres
def test_an_event_notified_inside_a_transaction_is_announced_only_when_it_commits(postgres_database, relays):
    (_, relay), (there, _) = relays
    seen: queue.Queue[dict] = queue.Queue()
    engine = create_engine_for(postgres_database)
    try:
        with there.listening(seen.put):
            with engine.connect() as conn:
                with conn.begin() as transaction:
                    relay.notify_in(conn, _event(UID_A, "created"))
                    transaction.rollback()
                with conn.begin():
                    relay.notify_in(conn, _event(UID_B, "created"))
            # Notifications arrive in commit order: had the rolled-back one been sent, it would come first.
            assert _take(seen) == _event(UID_B, "created")
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_study_recorded_through_one_replica_is_announced_on_another(postgres_migrated):
    ingest_events, api_events = Broadcaster(), Broadcaster()
    ingest = Worklist(create_engine_for(postgres_migrated), events=ingest_events)
    api = Worklist(create_engine_for(postgres_migrated), events=api_events)
    # Built from each worklist's own engine, as the service would wire them.
    relays = [relay_for(ingest.engine, ingest_events), relay_for(api.engine, api_events)]
    study_uid = "1.2.826.0.1.3680043.8.498.40000000000000000000000000000000000004"
    instance = InstanceMeta(
        study_uid=study_uid,
        series_uid=f"{study_uid}.1",
        sop_instance_uid=f"{study_uid}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        key="store/key",
    )

    async def main() -> dict:
        async with api_events.subscription() as sub:
            await asyncio.to_thread(ingest.record_instance, instance, datetime.now(UTC))
            return await asyncio.wait_for(sub.get(), 15)

    try:
        for relay in relays:
            assert relay is not None and relay.start(ready_timeout_s=15)
        assert asyncio.run(main()) == {"type": STUDY_UPDATED, "study_uid": study_uid, "change": "created"}
        assert api.get_study(study_uid, datetime.now(UTC)).instance_count == 1  # and B reads it at once
    finally:
        for relay in relays:
            if relay is not None:
                relay.stop()
        ingest.close()
        api.close()
