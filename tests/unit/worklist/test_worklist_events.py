"""The Broadcaster: events published from other threads reach asyncio subscribers in their own loop."""

from __future__ import annotations

import asyncio
import threading

from triage.worklist.events import RESYNC, Broadcaster


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
