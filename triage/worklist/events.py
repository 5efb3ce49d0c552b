"""Change events: thread-safe publish of small dicts to asyncio subscribers, relayed between processes by
PostgreSQL LISTEN/NOTIFY when several processes share one database."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from triage.errors import MissingDependencyError, TriageError
from triage.worklist.db import _normalise_url, create_engine_for

log = logging.getLogger(__name__)

STUDY_UPDATED = "study.updated"
# Put in a subscriber's queue in place of the events it was too slow to take: it should reload everything.
RESYNC = "resync"


class Subscription:
    """One subscriber: an asyncio queue bound to the event loop it was created in."""

    def __init__(self, broadcaster: Broadcaster, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=maxsize)
        self.loop = loop
        self.dropped = 0
        self._broadcaster = broadcaster

    async def get(self) -> dict[str, Any]:
        """The next event, waiting for one."""
        return await self.queue.get()

    def close(self) -> None:
        """Stop receiving events."""
        self._broadcaster.unsubscribe(self)

    def _deliver(self, event: dict[str, Any]) -> None:
        # Runs in the subscriber's loop. A slow consumer loses its backlog, not the publisher's time:
        # the queue is emptied and one resync event tells it to reload.
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += self.queue.qsize() + 1
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait({"type": RESYNC, "dropped": self.dropped})


class Broadcaster:
    """Publishes change events from any thread to every subscribed asyncio queue.

    Subscribers register from inside a running event loop (`subscribe()` or `async with subscription()`);
    `publish()` may be called from any thread (SCP handlers, the pipeline runner) and hands the event to each
    subscriber's loop with `call_soon_threadsafe`. Plain callbacks (`add_listener`) run in the publishing
    thread, for consumers without an event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []
        self._listeners: list[Any] = []
        # Where published events also go beyond this process (a PgNotifyRelay sets it); None: local only.
        self._outbound: Callable[[dict[str, Any]], None] | None = None

    def subscribe(self, maxsize: int = 256) -> Subscription:
        """A new subscription bound to the running event loop.

        Raises:
            RuntimeError: when called outside a running event loop.
        """
        loop = asyncio.get_running_loop()
        sub = Subscription(self, loop, maxsize)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)

    @asynccontextmanager
    async def subscription(self, maxsize: int = 256) -> AsyncIterator[Subscription]:
        """`async with broadcaster.subscription() as sub: event = await sub.get()`; unsubscribes on exit."""
        sub = self.subscribe(maxsize)
        try:
            yield sub
        finally:
            self.unsubscribe(sub)

    @contextmanager
    def listening(self, callback: Any) -> Iterator[None]:
        """Call `callback(event)` in the publishing thread for every event while the block runs."""
        with self._lock:
            self._listeners.append(callback)
        try:
            yield
        finally:
            with self._lock:
                self._listeners.remove(callback)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscriptions) + len(self._listeners)

    def relay_to(self, outbound: Callable[[dict[str, Any]], None] | None) -> None:
        """Also hand every published event to `outbound` (another process's way in); None stops that."""
        with self._lock:
            self._outbound = outbound

    def publish(self, event: dict[str, Any]) -> None:
        """Send `event` (a small JSON-ready dict with a "type") to every subscriber here and, when a relay is
        attached, to every other process sharing the database; never raises."""
        self.deliver(event)
        with self._lock:
            outbound = self._outbound
        if outbound is not None:
            try:
                outbound(dict(event))
            except Exception:
                log.exception("relaying event %s to other processes failed", event.get("type"))

    def deliver(self, event: dict[str, Any]) -> None:
        """Send `event` to the subscribers of this process only (a relay delivers what others published)."""
        with self._lock:
            subs = list(self._subscriptions)
            listeners = list(self._listeners)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(sub._deliver, dict(event))
            except RuntimeError:
                # The subscriber's loop has closed: it will never read again.
                self.unsubscribe(sub)
        for callback in listeners:
            try:
                callback(dict(event))
            except Exception:
                log.exception("event listener failed on %s", event.get("type"))


# ---------------------------------------------------------------------------------------------------- relay
# The channel every triage process of one database listens on (NOTIFY is scoped to the database).
DEFAULT_CHANNEL = "triage_events"
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (default build); events are far smaller.
MAX_PAYLOAD_BYTES = 7999
_CHANNEL_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _pg_url(url: str | URL | Engine) -> URL:
    parsed = url.url if isinstance(url, Engine) else _normalise_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise TriageError(
            f"LISTEN/NOTIFY needs PostgreSQL, not {parsed.get_backend_name()!r}; "
            "a single process on SQLite uses the Broadcaster alone"
        )
    return parsed


class PgNotifyRelay:
    """Carries change events between every process on one PostgreSQL database with LISTEN/NOTIFY.

    Once started, every event published on `broadcaster` is delivered to this process's subscribers at once
    (as without a relay) and sent with `pg_notify` to the channel; a listener thread holding one dedicated
    psycopg 3 connection hands every event that another process sent to `broadcaster.deliver`. Each event
    reaches each process exactly once: the envelope carries this relay's origin id and the listener skips its
    own echo. Local delivery comes first, rather than only through the echo, so this process's live worklist
    never waits on (or depends on) the listener connection, and SQLite and PostgreSQL behave alike locally.

    The NOTIFY is sent after the change committed (`Worklist` publishes after its transaction), on a pooled
    autocommit connection of its own: a rolled-back change is never announced; a process that dies between
    its commit and the NOTIFY leaves the others to see the change on their next reload. A caller that can
    reach the transaction uses `notify_in` instead, so the announcement commits or rolls back with the change.

    Notifications sent while the listener is disconnected are lost (PostgreSQL queues them only for
    connected listeners), so after every reconnect the local subscribers get a RESYNC event: reload.

    Args:
        url: the database, as a URL (`postgresql+psycopg://...`) or the engine the worklist uses.
        broadcaster: this process's broadcaster.
        channel: the NOTIFY channel (a lower-case SQL identifier).
        poll_s: how often the listener thread checks whether it should stop (bounds `stop()`).
        max_backoff_s: the longest wait between reconnection attempts (doubling from 0.1 s).
        connect_timeout_s: how long one connection attempt may take.

    Raises:
        TriageError: when `url` is not PostgreSQL or `channel` is not a plain identifier.
        MissingDependencyError: when psycopg is not installed.
    """

    def __init__(
        self,
        url: str | URL | Engine,
        broadcaster: Broadcaster,
        *,
        channel: str = DEFAULT_CHANNEL,
        poll_s: float = 0.5,
        max_backoff_s: float = 5.0,
        connect_timeout_s: int = 5,
    ) -> None:
        if not _CHANNEL_PATTERN.match(channel):
            raise TriageError(f"invalid NOTIFY channel {channel!r}: use 1-63 lower-case letters, digits or '_'")
        parsed = _pg_url(url)
        try:
            import psycopg  # noqa: F401 - fail here, with the install hint, not in the thread
        except ImportError as exc:
            raise MissingDependencyError("psycopg", "postgres") from exc
        self.broadcaster = broadcaster
        self.channel = channel
        # Unique per relay (so per process): tells this process's own notifications apart from others'.
        self.origin = uuid.uuid4().hex
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnects = 0
        self._conninfo = self._conninfo_for(parsed)
        if isinstance(url, Engine):
            self._owns_engine = False
            send_engine = url
        else:
            self._owns_engine = True
            send_engine = create_engine_for(
                parsed, pool_size=2, max_overflow=2, connect_args={"connect_timeout": connect_timeout_s}
            )
        self._send_engine = send_engine.execution_options(isolation_level="AUTOCOMMIT")
        # Set when a NOTIFY failed: the next one that gets through is preceded by a RESYNC for the others.
        self._send_failed = False
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._backend_pid: int | None = None

    @staticmethod
    def _conninfo_for(parsed: URL) -> dict[str, Any]:
        conninfo: dict[str, Any] = parsed.translate_connect_args(username="user", database="dbname")
        for key, value in parsed.query.items():
            conninfo[key] = value if isinstance(value, str) else value[-1]
        # The listener only reads, so a silently dead peer (a server host gone, a dropped NAT entry) shows up
        # through TCP keepalives within about a minute instead of never.
        for option, seconds in (("keepalives", 1), ("keepalives_idle", 30), ("keepalives_interval", 10)):
            conninfo.setdefault(option, seconds)
        conninfo.setdefault("keepalives_count", 3)
        return conninfo

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self, ready_timeout_s: float = 10.0) -> bool:
        """Attach to the broadcaster and start listening; waits up to `ready_timeout_s` for LISTEN to hold.

        Returns:
            True once listening; False when the database did not answer in time (the thread keeps trying,
            and the first connection is not followed by a RESYNC since nothing was subscribed before it).
        """
        if self._thread is not None:
            raise RuntimeError("the relay is already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen_forever, name="events-listener", daemon=True)
        self._thread.start()
        self.broadcaster.relay_to(self._send)
        ready = self._listening.wait(ready_timeout_s)
        if not ready:
            log.warning("event listener not connected after %.0f s; retrying in the background", ready_timeout_s)
        return ready

    def stop(self, timeout_s: float = 5.0) -> None:
        """Detach from the broadcaster (publishing becomes local only) and end the listener thread."""
        self.broadcaster.relay_to(None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._owns_engine:
            self._send_engine.dispose()

    @property
    def listening(self) -> bool:
        """True while the listener connection holds its LISTEN."""
        return self._listening.is_set()

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the listener connection (None while disconnected)."""
        return self._backend_pid

    def wait_listening(self, timeout_s: float) -> bool:
        return self._listening.wait(timeout_s)

    # ------------------------------------------------------------------------------------------------ sending
    def _payload(self, event: dict[str, Any]) -> str:
        payload = json.dumps({"origin": self.origin, "event": event}, separators=(",", ":"), default=str)
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            # Too large for NOTIFY: the others reload instead of missing the change.
            log.warning("event %s too large for NOTIFY (%d bytes); sending resync", event.get("type"), len(payload))
            payload = json.dumps({"origin": self.origin, "event": {"type": RESYNC, "reason": "event-too-large"}})
        return payload

    def notify_in(self, connection: Connection, event: dict[str, Any]) -> None:
        """Queue `event` for the other processes inside the caller's transaction on `connection`.

        PostgreSQL sends a NOTIFY when its transaction commits and drops it on rollback, so a change announced
        this way is announced exactly when it is committed. The caller then delivers the event locally after
        the commit with `broadcaster.deliver(event)`, not `publish` (which would announce it a second time).
        """
        connection.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": self.channel, "payload": self._payload(event)}
        )

    def _send(self, event: dict[str, Any]) -> None:
        payloads = [self._payload(event)]
        if self._send_failed:
            # An earlier event never left this process: the others reload before hearing this one.
            resync = {"type": RESYNC, "reason": "events-lost"}
            payloads.insert(0, json.dumps({"origin": self.origin, "event": resync}))
        try:
            with self._send_engine.connect() as conn:
                for payload in payloads:
                    conn.execute(
                        text("SELECT pg_notify(:channel, :payload)"), {"channel": self.channel, "payload": payload}
                    )
        except Exception as exc:
            self._send_failed = True
            log.warning("NOTIFY of event %s failed (%s: %s)", event.get("type"), type(exc).__name__, exc)
            return
        self._send_failed = False

    # ------------------------------------------------------------------------------------------------ listening
    def _listen_forever(self) -> None:
        import psycopg
        from psycopg import sql

        delay_s = 0.1
        connected_before = False
        while not self._stop.is_set():
            try:
                conn = psycopg.connect(**self._conninfo, autocommit=True, connect_timeout=self.connect_timeout_s)
            except psycopg.Error as exc:
                log.warning("event listener cannot connect (%s); retrying in %.1f s", type(exc).__name__, delay_s)
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, self.max_backoff_s)
                continue
            connected_at = time.monotonic()
            try:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                self._backend_pid = conn.info.backend_pid
                self._listening.set()
                if connected_before:
                    self.reconnects += 1
                    log.info("event listener reconnected; subscribers resynchronise")
                    # Listening again first, then the resync: whatever changes after the subscribers reload
                    # is announced to them.
                    self.broadcaster.deliver({"type": RESYNC, "reason": "events-reconnected"})
                connected_before = True
                while not self._stop.is_set():
                    for notify in conn.notifies(timeout=self.poll_s):
                        self._receive(notify.payload)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    log.warning("event listener connection lost (%s); reconnecting", type(exc).__name__)
            finally:
                self._listening.clear()
                self._backend_pid = None
                conn.close()
            if self._stop.is_set():
                break
            # A connection that held for a while resets the backoff; one that keeps dropping at once does not.
            if time.monotonic() - connected_at > 10 * self.max_backoff_s:
                delay_s = 0.1
            self._stop.wait(delay_s)
            delay_s = min(delay_s * 2, self.max_backoff_s)

    def _receive(self, payload: str) -> None:
        try:
            envelope = json.loads(payload)
            origin, event = envelope["origin"], envelope["event"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed notification on channel %s", self.channel)
            return
        if origin == self.origin:
            return  # this process's own event: delivered locally when it was published
        if not isinstance(event, dict) or "type" not in event:
            log.warning("ignoring a notification without an event type on channel %s", self.channel)
            return
        self.broadcaster.deliver(event)


def relay_for(url: str | URL | Engine, broadcaster: Broadcaster, **options: Any) -> PgNotifyRelay | None:
    """A relay for `broadcaster` when `url` is PostgreSQL (start it); None for SQLite, where one process
    holds every subscriber and the Broadcaster alone suffices."""
    parsed = url.url if isinstance(url, Engine) else _normalise_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return PgNotifyRelay(url, broadcaster, **options)
