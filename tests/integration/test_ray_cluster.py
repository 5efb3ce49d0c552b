"""The service on a real multi-node Ray cluster on this machine: a head node without CPUs (the service's driver
joins it through TRIAGE_RAY__ADDRESS) and two 1-CPU worker nodes, each with its own ports and label.

Shown here: every stage of a study ran on a worker node, not on the node the study arrived at; a model replica
killed mid-request is replaced by Ray Serve and the study still finishes; a worker node lost (its raylet
SIGKILLed) during a head CT's inference leaves the study done on the remaining node, analysed once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pydicom
import pytest

from tests.integration.conftest import HEAD_CT, Server, start_server, stop_server
from tests.integration.test_worker_faults import CT_MODEL, XRAY_MODEL, _send_xray, _study, _wait_status
from tests.ray_cluster import RayCluster, ray_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]

STAGES = ("load", "preprocess", "inference", "postprocess")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(workers=2, cpus_per_worker=1) as running:
        yield running


@pytest.fixture(scope="module")
def server(cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("cluster") / "data"
    env = {
        **cluster.env,
        "TRIAGE_INFERENCE__RETRY_BACKOFF_S": "3",
        "TRIAGE_INFERENCE__MAX_ATTEMPTS": "4",
        "TRIAGE_INFERENCE__HEALTH_INTERVAL_S": "2",
        "TRIAGE_ANALYSIS__CONCURRENCY": "1",
    }
    srv = start_server(data_dir, extra_env=env, runner="ray")
    try:
        yield srv
    finally:
        stop_server(srv)


def _driver_node(server: Server) -> str:
    node = server.get("/readyz").json()["ray_node_id"]
    assert node, "the analysis process reports the Ray node it runs on"
    return str(node)


def _replica(server: Server, model: str, timeout_s: float = 180) -> dict:
    """`model`'s replica as the service's last health check saw it (a live process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in server.get("/api/v1/models").json():
            if entry["name"] == model and entry["workers"] and not entry["error"]:
                worker = entry["workers"][0]
                if psutil.pid_exists(int(worker["pid"])):
                    return dict(worker)
        time.sleep(0.5)
    raise AssertionError(f"no live replica reported for {model}: {server.get('/api/v1/models').json()}")


def _wait_burning(pid: int, cpu_s: float = 1.0, timeout_s: float = 300) -> None:
    """Until process `pid` has used `cpu_s` more CPU seconds (inference runs in the replica process)."""
    proc = psutil.Process(pid)
    before = sum(proc.cpu_times()[:2])
    deadline = time.monotonic() + timeout_s
    while sum(proc.cpu_times()[:2]) - before < cpu_s:
        assert time.monotonic() < deadline, "the replica never started the inference"
        time.sleep(0.2)


def _head_ct_uid() -> str:
    first = next(p for p in sorted(HEAD_CT.iterdir()) if p.suffix == ".dcm")
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _stage_nodes(run: dict) -> dict[str, str]:
    return {s["stage"]: s["node_id"] for s in run["stages"]}


def test_every_stage_runs_on_a_worker_node_not_the_ingest_node(
    cluster: RayCluster, server: Server, tmp_path: Path
) -> None:
    ingest_node = _driver_node(server)
    head, *workers = cluster.nodes
    assert ingest_node == head.node_id, "the service's driver joined the cluster on the head node"
    study_uid = _send_xray(server, tmp_path, seed=31)
    item = _wait_status(server, study_uid, {"done", "failed"})
    assert item["ai_status"] == "done", item["ai_reason"]

    (run,) = [a for a in _study(server, study_uid)["analyses"] if a["status"] == "done"]
    nodes = _stage_nodes(run)
    assert set(STAGES) <= set(nodes), run["stages"]
    worker_ids = {w.node_id for w in workers}
    for stage in STAGES:
        assert nodes[stage] in worker_ids, f"{stage} ran on {nodes[stage]}, not on a worker node {worker_ids}"
        assert nodes[stage] != ingest_node
    assert all(s["attempts"] == 1 for s in run["stages"])
    assert run["attempts"] == 1


def test_replica_killed_mid_request_is_replaced_and_the_study_finishes(server: Server) -> None:
    replica = _replica(server, CT_MODEL)
    result = server.storescu(HEAD_CT)
    assert result.returncode == 0, result.stderr
    study_uid = _head_ct_uid()
    _wait_burning(int(replica["pid"]))
    os.kill(int(replica["pid"]), signal.SIGKILL)

    item = _wait_status(server, study_uid, {"done", "failed"}, timeout_s=900)
    assert item["ai_status"] == "done", f"{item['ai_status']}: {item['ai_reason']}"
    assert [f["model"] for f in item["findings"]] == [CT_MODEL]
    detail = _study(server, study_uid)
    statuses = [a["status"] for a in detail["analyses"] if a["generation"] == detail["analysed_generation"]]
    assert statuses[-1] == "done" and statuses.count("done") == 1, statuses
    assert "retry" in statuses, "the interrupted attempt is recorded"
    retried = [a for a in detail["analyses"] if a["status"] == "retry"][0]
    assert "stopped unexpectedly" in retried["reason"], retried["reason"]
    done = [a for a in detail["analyses"] if a["status"] == "done"][0]
    assert done["attempts"] >= 2 and all(s["attempts"] == done["attempts"] for s in done["stages"])
    assert int(_replica(server, CT_MODEL)["pid"]) != int(replica["pid"]), "Serve started a new replica"


def test_worker_node_lost_during_head_ct_the_study_is_done_once_on_the_other_node(
    cluster: RayCluster, server: Server, tmp_path: Path
) -> None:
    replica = _replica(server, CT_MODEL)
    doomed = next(n for n in cluster.nodes if n.node_id == replica["node_id"])
    survivor = next(n for n in cluster.nodes[1:] if n is not doomed)
    # A fresh copy of the head CT: same pixels, new UIDs (the study of the previous test is already done).
    folder = _fresh_copy(HEAD_CT, tmp_path / "ct")
    result = server.storescu(folder)
    assert result.returncode == 0, result.stderr
    study_uid = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    _wait_burning(int(replica["pid"]))
    cluster.kill_raylet(doomed)

    item = _wait_status(server, study_uid, {"done", "failed"}, timeout_s=900)
    assert item["ai_status"] == "done", f"{item['ai_status']}: {item['ai_reason']}"
    assert [f["model"] for f in item["findings"]] == [CT_MODEL], "analysed once: one finding per model"
    detail = _study(server, study_uid)
    done = [a for a in detail["analyses"] if a["status"] == "done"]
    assert len(done) == 1, [a["status"] for a in detail["analyses"]]
    nodes = _stage_nodes(done[0])
    assert nodes["inference"] == survivor.node_id, nodes
    assert nodes["preprocess"] == survivor.node_id, nodes
    assert any(a["status"] == "retry" for a in detail["analyses"]), "the lost attempt is recorded"
    # The X-ray model still runs too (its replica moved to the surviving node if it was on the lost one).
    after = _send_xray(server, tmp_path / "xr", seed=32)
    assert _wait_status(server, after, {"done", "failed"}, timeout_s=600)["ai_status"] == "done"
    assert _replica(server, XRAY_MODEL)["node_id"] == survivor.node_id


def _fresh_copy(source: Path, target: Path) -> Path:
    """The series in `source` with new Study, Series and SOP Instance UIDs (pixels unchanged)."""
    from pydicom.uid import generate_uid

    target.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted(p for p in source.iterdir() if p.suffix == ".dcm"):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(target / path.name)
    return target
