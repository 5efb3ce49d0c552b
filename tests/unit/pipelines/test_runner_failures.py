"""Which stage failures are transient (retried) and what one sentence the worklist shows for each."""

from __future__ import annotations

import pytest
import ray.exceptions as rex

from triage.errors import InvalidStudyError, UnsupportedInputError
from triage.pipelines.runner import classify_failure


@pytest.mark.parametrize(
    ("exc", "sentence"),
    [
        (rex.OutOfMemoryError("Task was killed due to the node running low on memory."), "ran out of memory"),
        (rex.ActorDiedError(), "the model worker stopped unexpectedly"),
        (rex.ActorUnavailableError("RpcError: Socket closed", b"\0" * 16), "the model worker stopped unexpectedly"),
        (rex.WorkerCrashedError(), "a worker process crashed"),
        (rex.NodeDiedError("node 1 died"), "a cluster node was lost"),
        (rex.ObjectLostError("0" * 56, "owner", ""), "intermediate data was lost"),
        (rex.GetTimeoutError("timed out"), "a stage did not finish within its deadline of 30 s"),
        (rex.RayTaskError("infer", "Traceback ...", MemoryError()), "ran out of memory"),
        (MemoryError(), "ran out of memory"),
    ],
)
def test_worker_deaths_memory_and_deadlines_are_transient(exc: BaseException, sentence: str) -> None:
    transient, reason = classify_failure(exc, timeout_s=30)
    assert transient
    assert sentence in reason
    assert "\n" not in reason and len(reason) <= 160


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (InvalidStudyError("series has 2 slices; at least 8 are needed"), "series has 2 slices; at least 8 are needed"),
        (
            rex.RayTaskError("load", "Traceback", UnsupportedInputError("transfer syntax 1.2.3 is not decodable")),
            "transfer syntax 1.2.3 is not decodable",
        ),
        (ValueError("bad axis\nTraceback: lots of lines"), "ValueError: bad axis"),
    ],
)
def test_bad_input_and_pipeline_errors_are_permanent_with_their_first_line(exc: BaseException, reason: str) -> None:
    assert classify_failure(exc) == (False, reason)


def test_a_worker_whose_model_cannot_load_is_transient_and_says_why() -> None:
    exc = rex.ActorDiedError()
    exc._actor_init_failed = True
    exc.error_msg = "The actor died because of an error in its creation task\n  File x\nNotFoundError: no model 'x'"
    transient, reason = classify_failure(exc)
    assert transient
    assert reason == "the model worker cannot load the model (NotFoundError: no model 'x')"


def test_long_messages_are_cut_to_one_short_line() -> None:
    transient, reason = classify_failure(RuntimeError("x" * 1000))
    assert not transient and len(reason) == 160 and reason.endswith("\u2026")


def test_a_stage_past_its_deadline_stops_itself_and_says_which_stage() -> None:
    import time

    from triage.pipelines.runner import StageDeadlineError, run_deadline

    started = time.monotonic()
    with pytest.raises(StageDeadlineError), run_deadline(0.2):
        while True:  # a stage that would never end
            sum(range(1000))
    assert time.monotonic() - started < 5
    with run_deadline(5):  # disarmed on the way out: nothing fires later
        pass
    time.sleep(0.3)
    wrapped = rex.RayTaskError("_ray_preprocess", "Traceback ...", StageDeadlineError("ran past its deadline of 8 s"))
    assert classify_failure(wrapped, timeout_s=8, stage="preprocess") == (
        True,
        "preprocess did not finish within its deadline of 8 s",
    )


def test_a_deadline_or_memory_error_inside_a_transform_is_still_transient() -> None:
    from triage.pipelines.runner import StageDeadlineError

    for inner, sentence in ((StageDeadlineError("past"), "did not finish"), (MemoryError(), "ran out of memory")):
        try:
            try:
                raise inner
            except Exception as exc:  # MONAI's wrapping of a failed transform
                raise RuntimeError("applying transform <CropHeadd>") from exc
        except RuntimeError as wrapped:
            transient, reason = classify_failure(rex.RayTaskError("pre", "Traceback", wrapped), 8, "preprocess")
        assert transient and sentence in reason


def test_a_deadline_that_a_library_rewraps_is_raised_as_the_deadline() -> None:
    from triage.pipelines.runner import StageDeadlineError, run_deadline

    with pytest.raises(StageDeadlineError), run_deadline(0.2):
        try:
            while True:
                sum(range(1000))
        except Exception as exc:
            raise RuntimeError("applying transform <CropHeadd>") from exc
