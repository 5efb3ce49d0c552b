"""Benchmark the spine on this machine and print the figures (a benchmark, not a test: nothing is asserted).

1. Study-ready -> worklist-updated for the real head CT and for a synthetic chest X-ray, split by stage
   (load, preprocess, inference, post-process, database), through the same service code `triage serve` runs
   (Ray runner unless --runner inprocess).
2. C-STORE ingest rate in instances per second: dcmtk's storescu sending the same files to triage's SCP
   (durable write + index) and to dcmtk's own storescp on this machine, in the same run, as a ratio.

Usage: python benchmarks/bench_spine.py [--runner ray|inprocess] [--copies N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from triage.config import Settings  # noqa: E402
from triage.dicom.dcmtk import DCMTK_ENV, find_dcmtk  # noqa: E402
from triage.serve.service import TriageService  # noqa: E402

HEAD_CT = REPO / "tests" / "data" / "ct-head-ge"
STAGES = ("load", "preprocess", "inference", "postprocess", "database")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def storescu(port: int, folder: Path, aet: str = "TRIAGE") -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            find_dcmtk("storescu") or "storescu",
            "-aec",
            aet,
            "+sd",
            "+r",
            "+sp",
            "*.dcm",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, **DCMTK_ENV},
    )
    return time.perf_counter() - started


def copies_of(folder: Path, out: Path, copies: int) -> int:
    """Write `copies` copies of a study with fresh UIDs (so none is a duplicate); returns the file count."""
    count = 0
    for copy in range(copies):
        study, series = generate_uid(), generate_uid()
        for path in sorted(folder.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(out / f"{copy:03d}-{path.name}")
            count += 1
    return count


def wait_outcome(service: TriageService, study_uid: str, timeout_s: float = 900) -> tuple[object, float]:
    """Poll until the study has been analysed; returns the outcome and seconds from ready to updated."""
    deadline = time.monotonic() + timeout_s
    ready_at = None
    while time.monotonic() < deadline:
        if ready_at is None and study_uid in service.dispatch_ready():
            ready_at = time.perf_counter()
        for outcome in service.outcomes:
            if outcome.study_uid == study_uid and ready_at is not None:
                return outcome, time.perf_counter() - ready_at
        time.sleep(0.05)
    raise TimeoutError(f"study {study_uid} not analysed in {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", default="ray", choices=["ray", "inprocess"])
    parser.add_argument("--copies", type=int, default=4, help="copies of the head CT for the ingest rate")
    args = parser.parse_args()
    if find_dcmtk("storescu") is None or find_dcmtk("storescp") is None:
        sys.exit("dcmtk (storescu, storescp) is required: apt-get install dcmtk")

    work = Path(tempfile.mkdtemp(prefix="triage-bench-"))
    settings = Settings()
    settings.data_dir = work / "data"
    settings.dicom.port = free_port()
    # The benchmark dispatches studies itself, so the background watcher must not pick them up first.
    settings.dicom.stable_age_s = 1e9
    service = TriageService(settings, runner_kind=args.runner)
    started = time.perf_counter()
    service.start()
    print(f"service start (runner {args.runner}, models loaded): {time.perf_counter() - started:.1f} s")
    load_s = {name: 0.0 for name in service.registry.names()}
    try:
        # ---------------------------------------------------------------- 1. study-ready -> worklist-updated
        from triage.training.synth_xray import generate_dataset

        xr_dir = work / "xr"
        generate_dataset(xr_dir, n=1, positive_fraction=1.0, seed=5, fmt="dicom")
        cases = [("head CT (28 slices)", HEAD_CT), ("chest X-ray (synthetic)", xr_dir)]
        rows = []
        for label, folder in cases:
            storescu(settings.dicom.port, folder)
            study_uid = str(pydicom.dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
            settings.dicom.stable_age_s = 0.0
            outcome, total_s = wait_outcome(service, study_uid)
            settings.dicom.stable_age_s = 1e9
            rows.append((label, outcome, total_s))
        print("\nstudy-ready -> worklist-updated, seconds by stage (model load happens once, at start-up)")
        print(f"{'study':26s} " + " ".join(f"{s:>11s}" for s in STAGES) + f" {'total':>9s}  ai_status")
        for label, outcome, total_s in rows:
            seconds = outcome.timings.seconds  # type: ignore[attr-defined]
            cells = " ".join(f"{seconds.get(s, 0.0):11.3f}" for s in STAGES)
            print(f"{label:26s} {cells} {total_s:9.2f}  {outcome.ai_status}")  # type: ignore[attr-defined]
        del load_s

        # ---------------------------------------------------------------- 2. C-STORE ingest rate
        copies_dir = work / "copies"
        copies_dir.mkdir()
        n_files = copies_of(HEAD_CT, copies_dir, args.copies)
        triage_s = storescu(settings.dicom.port, copies_dir)
        storescp_port = free_port()
        received = work / "storescp"
        received.mkdir()
        scp = subprocess.Popen(
            [find_dcmtk("storescp") or "storescp", "-od", str(received), "+B", str(storescp_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **DCMTK_ENV},
        )
        time.sleep(0.5)
        try:
            dcmtk_s = storescu(storescp_port, copies_dir, aet="ANY-SCP")
        finally:
            scp.terminate()
            scp.wait()
        print(f"\nC-STORE ingest, {n_files} instances of 512x512 CT sent by storescu, one association")
        print(f"  triage SCP (fsync + rename + index): {n_files / triage_s:8.1f} instances/s ({triage_s:.2f} s)")
        print(f"  dcmtk storescp (+B, no fsync):       {n_files / dcmtk_s:8.1f} instances/s ({dcmtk_s:.2f} s)")
        print("  (both with TCP_NODELAY=1; storescp writes without fsync, triage fsyncs file and folder)")
        print(f"  triage takes {triage_s / dcmtk_s:.2f}x as long as storescp for the same files")
        print(f"\nmeasured {datetime.now(UTC).isoformat(timespec='seconds')} on this machine")
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
