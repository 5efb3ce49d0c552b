"""Change events: thread-safe publish of small dicts to asyncio subscribers (for server-sent events)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

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

    def publish(self, event: dict[str, Any]) -> None:
        """Send `event` (a small JSON-ready dict with a "type") to every subscriber; never raises."""
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
