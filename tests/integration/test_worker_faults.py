"""Fault injection on the real service: inference workers (Ray Serve replicas) killed with SIGKILL (found by their
process IDs) during and between analyses, and a model that cannot load. A dead replica is replaced, an
interrupted study is retried and ends analysed, `/readyz` says not ready while a model cannot run, and studies
that failed meanwhile are analysed once the model is back. The service runs on a local Ray instance, studies
arrive over storescu."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pydicom
import pytest

from tests.integration.conftest import HEAD_CT, Server, start_server, stop_server
from triage.config import REPO_ROOT

pytestmark = pytest.mark.integration

XRAY_MODEL = "xr-chest-pneumothorax"
CT_MODEL = "ct-head-ich"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the installed models that the tests may break and repair."""
    target = tmp_path_factory.mktemp("weights") / "weights"
    shutil.copytree(REPO_ROOT / "weights", target)
    return target


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("faults") / "data"
    env = {
        "TRIAGE_WEIGHTS_DIR": str(weights_dir),
        "TRIAGE_INFERENCE__RETRY_BACKOFF_S": "2",
        "TRIAGE_INFERENCE__MAX_ATTEMPTS": "3",
        "TRIAGE_INFERENCE__HEALTH_INTERVAL_S": "1",
        "TRIAGE_INFERENCE__PROBE_TIMEOUT_S": "20",
        "TRIAGE_RAY__WORKER_REPLACE_BACKOFF_S": "1",
    }
    srv = start_server(data_dir, extra_env=env, runner="ray")
    try:
        yield srv
    finally:
        stop_server(srv)


def _worker_pid(server: Server, model: str, timeout_s: float = 120) -> int:
    """The process ID of `model`'s inference worker, as the service's last health probe saw it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in server.get("/api/v1/models").json():
            if entry["name"] == model and entry["workers"] and not entry["error"]:
                pid = int(entry["workers"][0]["pid"])
                if psutil.pid_exists(pid):
                    return pid
        time.sleep(0.5)
    raise AssertionError(f"no live worker reported for {model}: {server.get('/api/v1/models').json()}")


def _send_xray(server: Server, folder: Path, seed: int) -> str:
    from triage.training.synth_xray import generate_dataset

    generate_dataset(folder, n=1, positive_fraction=0.0, seed=seed, fmt="dicom")
    files = sorted(folder.rglob("*.dcm"))
    result = server.storescu(folder)
    assert result.returncode == 0, result.stderr
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _study(server: Server, study_uid: str) -> dict:
    response = server.get(f"/api/v1/studies/{study_uid}")
    response.raise_for_status()
    return response.json()


def _wait_status(server: Server, study_uid: str, wanted: set[str], timeout_s: float = 300) -> dict:
    def check(items: list[dict]) -> dict | None:
        item = next((i for i in items if i["study_uid"] == study_uid), None)
        return item if item and item["ai_status"] in wanted else None

    return server.wait_for(check, timeout_s=timeout_s, what=f"study {study_uid} to be {sorted(wanted)}")


def _history_kinds(detail: dict) -> list[str]:
    return [event["kind"] for event in detail["history"]]


def test_worker_killed_between_analyses_is_replaced_and_the_next_study_is_analysed(
    server: Server, tmp_path: Path
) -> None:
    pid = _worker_pid(server, XRAY_MODEL)
    os.kill(pid, signal.SIGKILL)
    study_uid = _send_xray(server, tmp_path, seed=11)

    item = _wait_status(server, study_uid, {"done", "failed"})
    assert item["ai_status"] == "done", f"{item['ai_status']}: {item['ai_reason']}"
    assert [f["model"] for f in item["findings"]] == [XRAY_MODEL]
    assert _worker_pid(server, XRAY_MODEL) != pid, "the killed worker was replaced by a new process"


def test_worker_killed_during_inference_the_study_is_retried_and_done(server: Server, tmp_path: Path) -> None:
    pid = _worker_pid(server, CT_MODEL)
    worker = psutil.Process(pid)
    cpu_before = sum(worker.cpu_times()[:2])
    result = server.storescu(HEAD_CT)
    assert result.returncode == 0, result.stderr
    study_uid = str(
        pydicom.dcmread(
            next(p for p in sorted(HEAD_CT.iterdir()) if p.suffix == ".dcm"), stop_before_pixels=True
        ).StudyInstanceUID
    )
    # Inference has started when the worker process itself burns CPU (preprocessing runs in another process).
    deadline = time.monotonic() + 300
    while sum(worker.cpu_times()[:2]) - cpu_before < 1.0:
        assert time.monotonic() < deadline, "the CT inference never started"
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)

    retrying = _wait_status(server, study_uid, {"pending", "done", "failed"}, timeout_s=120)
    if retrying["ai_status"] == "pending":
        # One short sentence for the radiologist, not Ray's error text.
        assert "retrying (2 of 3)" in retrying["ai_reason"], retrying["ai_reason"]
        assert len(retrying["ai_reason"]) < 200 and "\n" not in retrying["ai_reason"]
    item = _wait_status(server, study_uid, {"done", "failed"}, timeout_s=600)
    assert item["ai_status"] == "done", f"{item['ai_status']}: {item['ai_reason']}"
    assert [f["model"] for f in item["findings"]] == [CT_MODEL]
    detail = _study(server, study_uid)
    retries = [e for e in detail["history"] if e["kind"] == "analysis-retry"]
    assert len(retries) == 1, _history_kinds(detail)
    assert "the model worker stopped unexpectedly" in retries[0]["detail"]["reason"]
    assert retries[0]["detail"]["attempt"] == 1

    # And the studies after it are analysed as usual.
    after = _send_xray(server, tmp_path, seed=12)
    assert _wait_status(server, after, {"done", "failed"})["ai_status"] == "done"


def test_model_that_cannot_load_makes_readyz_not_ready_and_its_studies_run_when_it_is_back(
    server: Server, weights_dir: Path, tmp_path: Path
) -> None:
    onnx = weights_dir / XRAY_MODEL / "1.0.0" / "model.onnx"
    hidden = onnx.with_name("model.onnx.away")
    pid = _worker_pid(server, XRAY_MODEL)
    onnx.rename(hidden)
    try:
        os.kill(pid, signal.SIGKILL)  # Ray restarts the worker, which now cannot load its model

        deadline = time.monotonic() + 120
        while True:
            ready = httpx.get(server.url + "/readyz", timeout=10)
            # First "stopped unexpectedly" (the kill), then, once Ray's restart failed, why it cannot run.
            problem = ready.json()["model_errors"].get(XRAY_MODEL, "")
            if ready.status_code == 503 and "cannot load the model" in problem:
                break
            assert time.monotonic() < deadline, f"/readyz still says {ready.status_code} {ready.json()}"
            time.sleep(0.5)
        assert "model.onnx" in problem or "not installed" in problem or "NotFound" in problem, problem
        models = {m["name"]: m for m in server.get("/api/v1/models").json()}
        assert models[XRAY_MODEL]["error"], "the models API reports the model that cannot run"

        study_uid = _send_xray(server, tmp_path / "down", seed=13)
        item = _wait_status(server, study_uid, {"failed", "done"}, timeout_s=300)
        assert item["ai_status"] == "failed", item["ai_reason"]
        assert "re-queued when the model can run again" in item["ai_reason"]
        assert item["priority"]["level"] == item["clinical_priority"], "an AI failure never changes the priority"
        detail = _study(server, study_uid)
        assert detail["failure_kind"] == "transient"
        assert _history_kinds(detail).count("analysis-retry") == 2  # three attempts in all
    finally:
        hidden.rename(onnx)

    deadline = time.monotonic() + 180
    while httpx.get(server.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the model never came back"
        time.sleep(0.5)
    item = _wait_status(server, study_uid, {"done"}, timeout_s=300)
    assert [f["model"] for f in item["findings"]] == [XRAY_MODEL]
    assert "requeued" in _history_kinds(_study(server, study_uid))


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A service whose stage deadline (8 s) is shorter than a head CT's inference on this machine."""
    data_dir = tmp_path_factory.mktemp("deadline") / "data"
    env = {
        "TRIAGE_INFERENCE__TIMEOUT_S": "8",
        "TRIAGE_INFERENCE__RETRY_BACKOFF_S": "1",
        "TRIAGE_INFERENCE__MAX_ATTEMPTS": "2",
        "TRIAGE_INFERENCE__HEALTH_INTERVAL_S": "1",
    }
    srv = start_server(data_dir, extra_env=env, runner="ray")
    try:
        yield srv
    finally:
        stop_server(srv)


def test_a_call_past_its_deadline_is_cancelled_and_the_service_carries_on(
    impatient_server: Server, tmp_path: Path
) -> None:
    server = impatient_server
    _worker_pid(server, CT_MODEL)  # its replica is up
    result = server.storescu(HEAD_CT)
    assert result.returncode == 0, result.stderr
    first = next(p for p in sorted(HEAD_CT.iterdir()) if p.suffix == ".dcm")
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)

    item = _wait_status(server, study_uid, {"done", "failed"}, timeout_s=600)
    assert item["ai_status"] == "failed", "the CT finished within 8 s: the deadline was never reached"
    assert "re-queued when the model can run again" in item["ai_reason"]
    detail = _study(server, study_uid)
    assert detail["failure_kind"] == "transient"
    assert [a["status"] for a in detail["analyses"]] == ["retry", "failed"]
    # The first attempt ran past its deadline. (The second may instead meet the worker still restarting after
    # that: "the model worker stopped unexpectedly" - transient too.)
    first = detail["analyses"][0]["reason"]
    assert "did not finish within its deadline of 8 s" in first, first
    if "inference did not finish" in first:
        # The request was cancelled on its Ray Serve replica, which goes on serving (the same or a new process).
        assert _worker_pid(server, CT_MODEL) > 0
    else:  # on a slow machine preprocessing already ran past the deadline: that task was cancelled
        assert "preprocess did not finish" in first, first
    # The service carries on: a chest X-ray is analysed within the deadline.
    after = _send_xray(server, tmp_path, seed=14)
    assert _wait_status(server, after, {"done", "failed"})["ai_status"] == "done"
