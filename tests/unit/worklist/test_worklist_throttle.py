"""The shared sign-in throttle: failed sign-ins counted in the database, so every replica refuses together."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, func, select

from triage.worklist.accounts import Accounts, SharedSignInThrottle, SignInFailureRow
from triage.worklist.db import create_engine_for

T0 = datetime(2026, 12, 2, 7, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def replicas(db_url: str) -> Iterator[tuple[Accounts, Accounts]]:
    """Two Accounts on engines of their own, as two API replicas on one database have."""
    engines = [create_engine_for(db_url), create_engine_for(db_url)]
    with engines[0].begin() as conn:
        conn.execute(delete(SignInFailureRow))
    yield Accounts(engines[0]), Accounts(engines[1])
    for engine in engines:
        engine.dispose()


def test_failures_spread_over_two_replicas_lock_the_name_on_both(replicas):
    one = replicas[0].sign_in_throttle(max_failures=3, window_s=900, lockout_s=60)
    two = replicas[1].sign_in_throttle(max_failures=3, window_s=900, lockout_s=60)
    one.failed("Reader", at(0))
    two.failed("reader", at(1))
    assert one.wait_s("reader", at(2)) == 0.0 and two.wait_s("reader", at(2)) == 0.0
    one.failed("READER", at(2))
    # Names compare case-insensitively; the lockout counts from the newest failure.
    assert one.wait_s("reader", at(3)) == pytest.approx(59.0)
    assert two.wait_s("Reader", at(3)) == pytest.approx(59.0)
    assert two.wait_s("someone-else", at(3)) == 0.0
    assert one.wait_s("reader", at(62)) == 0.0  # the lockout is over


def test_failures_outside_the_window_count_no_more(replicas):
    one = replicas[0].sign_in_throttle(max_failures=2, window_s=100, lockout_s=10)
    two = replicas[1].sign_in_throttle(max_failures=2, window_s=100, lockout_s=10)
    one.failed("reader", at(0))
    two.failed("reader", at(150))
    assert one.wait_s("reader", at(151)) == 0.0  # the first failure left the window before the second
    one.failed("reader", at(160))
    assert two.wait_s("reader", at(161)) == pytest.approx(9.0)


def test_a_successful_sign_in_on_one_replica_clears_the_name_on_the_other(replicas):
    one = replicas[0].sign_in_throttle(max_failures=2, window_s=900, lockout_s=60)
    two = replicas[1].sign_in_throttle(max_failures=2, window_s=900, lockout_s=60)
    for second in (0, 1):
        one.failed("reader", at(second))
    one.failed("other", at(1))
    one.failed("other", at(1))
    assert two.wait_s("reader", at(2)) > 0
    two.succeeded("Reader")
    assert one.wait_s("reader", at(2)) == 0.0
    assert one.wait_s("other", at(2)) > 0  # only that name is cleared
    one.failed("reader", at(3))
    assert two.wait_s("reader", at(4)) == 0.0  # counting starts again from nothing


def test_lockout_window_and_success_in_time_order(replicas):
    """Hand-checked: 3 failures within 100 s lock the name for 30 s after the last one."""
    shared = replicas[0].sign_in_throttle(max_failures=3, window_s=100, lockout_s=30)
    steps = [
        ("failed", 0, None), ("wait", 1, 0.0), ("failed", 5, None), ("failed", 9, None), ("wait", 10, 29.0),
        ("wait", 38.5, 0.5), ("wait", 39.5, 0.0), ("failed", 40, None), ("wait", 41, 29.0),
        ("failed", 120, None), ("wait", 121, 0.0), ("failed", 200, None), ("wait", 201, 0.0),
        ("succeeded", 202, None), ("wait", 203, 0.0), ("failed", 204, None), ("failed", 205, None),
        ("failed", 206, None), ("wait", 207, 29.0),
    ]  # fmt: skip
    for step, second, expected in steps:
        if step == "wait":
            assert shared.wait_s("reader", at(second)) == pytest.approx(expected), second
        elif step == "failed":
            shared.failed("reader", at(second))
        else:
            shared.succeeded("reader")


def test_guessing_does_not_grow_the_table_without_bound(replicas):
    throttle = replicas[0].sign_in_throttle(max_failures=3, window_s=100, lockout_s=10)
    for second in range(20):
        throttle.failed("reader", at(second))
    throttle.failed("old", at(0))
    throttle.failed("guess", at(500))  # every failure before second 400 is out of the window now
    with replicas[1].engine.connect() as conn:
        rows = conn.scalar(select(func.count()).select_from(SignInFailureRow))
    assert rows == 1


def test_the_wall_clock_is_used_when_given_the_in_memory_throttles_monotonic_seconds(replicas):
    # triage.serve.web passes time.monotonic() today; that clock means nothing in another process.
    throttle: SharedSignInThrottle = replicas[0].sign_in_throttle(max_failures=2, window_s=900, lockout_s=60)
    throttle.failed("reader", time.monotonic())
    throttle.failed("reader", None)
    assert 0 < replicas[1].sign_in_throttle(max_failures=2).wait_s("reader", time.monotonic()) <= 60
    assert 0 < throttle.wait_s("reader", datetime.now(UTC)) <= 60


def test_the_engine_may_be_resolved_on_first_use(replicas):
    holder: dict[str, Accounts] = {}
    throttle = SharedSignInThrottle(lambda: holder["accounts"].engine, max_failures=1, lockout_s=5)
    holder["accounts"] = replicas[0]  # the database opens after the throttle was built (the app's lifespan)
    throttle.failed("reader", at(0))
    assert throttle.wait_s("reader", at(1)) == pytest.approx(4.0)
