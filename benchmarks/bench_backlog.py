"""A backlog of studies queued at once: throughput and ready -> worklist latency, one process vs a Ray cluster.

A benchmark, not a test: it prints figures and asserts nothing. The same studies (copies of the real head CT
with new UIDs and synthetic chest X-rays, mixed) are sent with dcmtk's storescu in one association to:
  - `triage serve --runner inprocess` (the single-process path: every stage in the service process);
  - `triage serve` joined to a real Ray cluster on this machine (tests/ray_cluster.py: a head node without CPUs
    and 1, 2, 3 one-CPU worker nodes), each model a Ray Serve deployment autoscaling up to one replica per worker
    node, the scheduler analysing two studies per worker node at once.
For each: studies per hour (studies / (last analysis finished - first study ready)) and p50 / p95 of
ready -> worklist updated, where ready = the last instance's arrival + the completion rule's stable age.

Usage: python benchmarks/bench_backlog.py [--studies 40] [--ct 10] [--workers 1,2,3] [--no-single]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.conftest import HEAD_CT, Server, start_server, stop_server  # noqa: E402
from tests.ray_cluster import ray_cluster  # noqa: E402

STABLE_AGE_S = 2.0


def make_backlog(folder: Path, studies: int, head_cts: int) -> list[str]:
    """`head_cts` copies of the real head CT (new UIDs) and synthetic chest X-rays up to `studies`, in one folder."""
    from triage.training.synth_xray import generate_dataset

    uids = []
    for n in range(head_cts):
        study, series = generate_uid(), generate_uid()
        target = folder / f"ct{n:02d}"
        target.mkdir(parents=True)
        for path in sorted(p for p in HEAD_CT.iterdir() if p.suffix == ".dcm"):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(target / path.name)
        uids.append(study)
    xrays = folder / "xr"
    generate_dataset(xrays, n=studies - head_cts, positive_fraction=0.25, seed=7, fmt="dicom")
    for path in sorted(xrays.rglob("*.dcm")):
        uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    return sorted(set(uids))


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run_backlog(server: Server, folder: Path, uids: list[str], timeout_s: float) -> dict[str, float]:
    result = server.storescu(folder)
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    deadline = time.monotonic() + timeout_s
    wanted = set(uids)
    while True:
        items = server.get("/api/v1/worklist", params={"limit": 500}).json()
        finished = {i["study_uid"] for i in items if i["study_uid"] in wanted and i["ai_status"] in ("done", "failed")}
        if finished == wanted:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(wanted - finished)} of {len(wanted)} studies not analysed in {timeout_s} s")
        time.sleep(2)
    latencies, readies, ends, failed = [], [], [], 0
    for uid in uids:
        detail = server.get(f"/api/v1/studies/{uid}").json()
        ready = _time(detail["last_instance_at"]) + timedelta(seconds=STABLE_AGE_S)
        end = _time(detail["analysis_finished_at"])
        failed += detail["ai_status"] == "failed"
        readies.append(ready)
        ends.append(end)
        latencies.append((end - ready).total_seconds())
    span_s = (max(ends) - min(readies)).total_seconds()
    latencies.sort()
    return {
        "studies_per_hour": len(uids) / span_s * 3600.0,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
        "span_s": span_s,
        "failed": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--ct", type=int, default=10, help="how many of the studies are head CTs")
    parser.add_argument("--workers", default="1,2,3", help="cluster sizes to measure (worker nodes)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-process path")
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="backlog-"))
    try:
        backlog = scratch / "studies"
        uids = make_backlog(backlog, args.studies, args.ct)
        print(f"{len(uids)} studies ({args.ct} head CTs, {len(uids) - args.ct} chest X-rays); {os.cpu_count()} cores")
        rows: list[tuple[str, dict[str, float]]] = []
        env_common = {"TRIAGE_DICOM__STABLE_AGE_S": str(STABLE_AGE_S)}
        if not args.no_single:
            server = start_server(scratch / "single" / "data", extra_env=env_common, runner="inprocess")
            try:
                rows.append(("single process (inprocess)", run_backlog(server, backlog, uids, args.timeout_s)))
            finally:
                stop_server(server)
            print(rows[-1], flush=True)
        for workers in [int(w) for w in args.workers.split(",") if w.strip()]:
            with ray_cluster(workers=workers, cpus_per_worker=1) as cluster:
                env = {
                    **env_common,
                    **cluster.env,
                    "TRIAGE_ANALYSIS__CONCURRENCY": str(2 * workers),
                    "TRIAGE_RAY__DEPLOYMENT__MAX_REPLICAS": str(workers),
                }
                server = start_server(scratch / f"cluster{workers}" / "data", extra_env=env, runner="ray")
                try:
                    measured = run_backlog(server, backlog, uids, args.timeout_s)
                    rows.append((f"Ray cluster, {workers} worker node(s)", measured))
                finally:
                    stop_server(server)
            print(rows[-1], flush=True)
        base = rows[0][1]["studies_per_hour"] if rows and not args.no_single else None
        print()
        print(f"{'path':34} {'studies/h':>10} {'ratio':>6} {'p50 s':>8} {'p95 s':>8} {'failed':>6}")
        for name, row in rows:
            ratio = f"{row['studies_per_hour'] / base:.2f}" if base else "-"
            print(
                f"{name:34} {row['studies_per_hour']:10.1f} {ratio:>6} {row['p50_s']:8.1f} {row['p95_s']:8.1f} "
                f"{int(row['failed']):6d}"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
