"""A Ray task that runs past its stage deadline stops itself and its worker process lives on (with its imports)
for the next task, on a real local Ray instance."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import ray

from triage.pipelines.runner import classify_failure, run_deadline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def test_a_task_past_its_deadline_fails_transiently_and_its_worker_runs_the_next_task(local_ray: None) -> None:
    def _stage(seconds: float, deadline_s: float) -> int:  # nested: sent to the worker by value
        with run_deadline(deadline_s):
            time.sleep(seconds)
        return os.getpid()

    stage = ray.remote(num_cpus=1, max_retries=0)(_stage)
    first_pid = ray.get(stage.remote(0, 1))
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(stage.remote(60, 1), timeout=30)
    assert time.monotonic() - started < 30
    assert classify_failure(caught.value, timeout_s=1, stage="preprocess") == (
        True,
        "preprocess did not finish within its deadline of 1 s",
    )
    assert ray.get(stage.remote(0, 1)) == first_pid  # the same, warm worker process
