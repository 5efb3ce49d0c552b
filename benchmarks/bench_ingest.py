"""C-STORE ingest rate: the same files, the same client (dcmtk storescu), 1 and N parallel associations, into
triage's SCP before and after group commit, dcmtk's storescp and Orthanc, in one run (nothing is asserted).

Targets:
- triage (after): this checkout's SCP, ingest role only (`TriageService` with the SCP, no analysis): each instance
  validated, written to a temporary file, fsynced, renamed, its folder fsynced and indexed in SQLite before
  the success response; concurrent associations share folder fsyncs and the index transaction.
- triage (before): the same at another commit (default aa48038, `git worktree add /tmp/triage-before aa48038`).
- Orthanc (Debian package): its own SQLite index, `SyncStorageArea` true (it fsyncs the stored file).
- dcmtk storescp: writes each file without fsync or index: the ceiling of this machine and client.

Each (target, associations) pair gets a fresh, empty target. Association k sends its own studies (folder k), as
several modalities or forwarders do. Files: the real head CT (tests/data/ct-head-ge, 28 slices of 512x512),
copied with fresh UIDs, plus generated 512x512 CT series (tests/dicom_factory.py).

Usage: python benchmarks/bench_ingest.py [--before DIR] [--copies N] [--generated N] [--associations 1,4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from triage.dicom.dcmtk import DCMTK_ENV, find_dcmtk  # noqa: E402

HEAD_CT = REPO / "tests" / "data" / "ct-head-ge"
ORTHANC = "/usr/sbin/Orthanc"
TRIAGE_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from triage.config import Settings
    from triage.serve.service import TriageService

    settings = Settings()
    settings.data_dir = Path(sys.argv[1])
    settings.dicom.port = int(sys.argv[2])
    settings.dicom.bind_address = "127.0.0.1"
    settings.dicom.stable_age_s = 1e9
    service = TriageService(settings, runner_kind="inprocess", start_scp=True)
    service.scp.start()  # the ingest role: no analysis, no model loading
    print("READY", flush=True)
    sys.stdin.read()
    service.scp.stop()
    close = getattr(service.store, "close", None)
    if close is not None:
        close()
    committer = getattr(service.store, "committer", None)
    if committer is not None and committer.batches:
        print(f"BATCHES {committer.batches} {committer.largest_batch}", flush=True)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


@dataclass
class Target:
    """A running storage SCP: its port, called AE title and how to stop it."""

    name: str
    port: int
    aet: str
    process: subprocess.Popen[bytes]
    storage: Path
    note: str = ""

    def stop(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=10)
                if self.process.stdout is not None:
                    for line in self.process.stdout.read().decode(errors="replace").splitlines():
                        if line.startswith("BATCHES"):
                            _, batches, largest = line.split()
                            self.note = f"{batches} index transactions, largest {largest} instances"
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(self.process.pid, signal.SIGKILL)
                    self.process.wait()


def start_triage(name: str, code_dir: Path, work: Path) -> Target:
    port = free_port()
    data = work / "data"
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    process = subprocess.Popen(
        [sys.executable, "-c", TRIAGE_CHILD, str(data), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=code_dir,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(b"READY"):
        raise RuntimeError(f"{name} did not start")
    wait_port(port)
    return Target(name, port, "TRIAGE", process, data)


def start_storescp(work: Path) -> Target:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    process = subprocess.Popen(
        # --fork: one process per association (else storescp serves one at a time).
        [find_dcmtk("storescp") or "storescp", "--fork", "-od", str(out), str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **DCMTK_ENV},
        start_new_session=True,
    )
    wait_port(port)
    return Target("dcmtk storescp (no fsync)", port, "ANY-SCP", process, out)


def start_orthanc(work: Path) -> Target:
    port, http_port = free_port(), free_port()
    storage = work / "orthanc"
    config = {
        "Name": "bench",
        "StorageDirectory": str(storage / "storage"),
        "IndexDirectory": str(storage / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "SyncStorageArea": True,  # the default: the stored file is fsynced before the response
        "Plugins": [],
        "DicomThreadsCount": 4,
    }
    storage.mkdir()
    path = work / "orthanc.json"
    path.write_text(json.dumps(config))
    process = subprocess.Popen(
        [ORTHANC, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(port)
    return Target("Orthanc (SyncStorageArea)", port, "ORTHANC", process, storage)


def send(target: Target, folders: list[Path]) -> float:
    """storescu, one association per folder, all at once; seconds until the last one finished."""
    storescu = find_dcmtk("storescu") or "storescu"
    started = time.perf_counter()
    clients = [
        subprocess.Popen(
            [storescu, "-aec", target.aet, "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(target.port), str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **DCMTK_ENV},
        )
        for folder in folders
    ]
    failures = []
    for client in clients:
        _, err = client.communicate(timeout=1800)
        if client.returncode != 0:
            failures.append(err.decode(errors="replace")[-300:])
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{target.name}: storescu failed: {failures[0]}")
    return elapsed


def build_files(out: Path, copies: int, generated: int, series_slices: int) -> list[Path]:
    """Studies as folders (one per study): head CT copies with fresh UIDs and generated CT series."""
    from tests.dicom_factory import make_ct_series, write_dataset

    studies = []
    for copy in range(copies):
        folder = out / f"head-{copy:03d}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        for path in sorted(HEAD_CT.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / path.name)
        studies.append(folder)
    for k in range(generated):
        folder = out / f"generated-{k:03d}"
        for n, ds in enumerate(make_ct_series(series_slices, rows=512, columns=512, pixel_spacing_mm=(0.45, 0.45),
                                              noise_hu=0.0, seed=k)):  # fmt: skip
            write_dataset(ds, folder / f"{n:04d}.dcm")
        studies.append(folder)
    return studies


def split(studies: list[Path], n: int, work: Path) -> list[Path]:
    """n folders of whole studies (symlinks), as even in instance count as possible."""
    folders = [work / f"assoc-{k}" for k in range(n)]
    counts = [0] * n
    for folder in folders:
        folder.mkdir(parents=True)
    for study in sorted(studies, key=lambda s: -len(list(s.glob("*.dcm")))):
        k = counts.index(min(counts))
        (folders[k] / study.name).symlink_to(study, target_is_directory=True)
        counts[k] += len(list(study.glob("*.dcm")))
    return folders


def ensure_before(path: Path, commit: str) -> None:
    if (path / "triage" / "dicom" / "store.py").is_file():
        return
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=Path("/tmp/triage-before"))
    parser.add_argument("--before-commit", default="aa48038")
    parser.add_argument("--copies", type=int, default=4, help="copies of the real head CT (28 slices each)")
    parser.add_argument("--generated", type=int, default=8, help="generated CT series")
    parser.add_argument("--slices", type=int, default=28, help="slices per generated series")
    parser.add_argument("--associations", default="1,4", help="parallel associations, comma-separated")
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell (targets take turns); the best is kept")
    args = parser.parse_args()
    if find_dcmtk("storescu") is None or find_dcmtk("storescp") is None:
        sys.exit("dcmtk (storescu, storescp) is required: apt-get install dcmtk")
    if not Path(ORTHANC).exists():
        sys.exit("Orthanc is required: apt-get install orthanc")
    ensure_before(args.before, args.before_commit)

    work = Path(tempfile.mkdtemp(prefix="triage-bench-ingest-"))
    try:
        studies = build_files(work / "files", args.copies, args.generated, args.slices)
        n_files = sum(len(list(s.glob("*.dcm"))) for s in studies)
        size_mb = sum(p.stat().st_size for s in studies for p in s.glob("*.dcm")) / 1e6
        starts = {
            "triage (after)": lambda w: start_triage("triage (after)", REPO, w),
            f"triage (before, {args.before_commit})": lambda w: start_triage("triage (before)", args.before, w),
            "Orthanc (SyncStorageArea)": start_orthanc,
            "dcmtk storescp (no fsync)": start_storescp,
        }
        rates: dict[tuple[str, int], float] = {}
        notes: dict[tuple[str, int], str] = {}
        for n in [int(x) for x in args.associations.split(",")]:
            folders = split(studies, n, work / f"split-{n}")
            # Targets take turns within each repeat, so a change in the machine's load hits all of them alike.
            for attempt in range(args.repeat):
                for index, (name, start) in enumerate(starts.items()):
                    run_dir = work / f"run-{n}-{index}-{attempt}"
                    run_dir.mkdir()
                    target = start(run_dir)
                    try:
                        seconds = send(target, folders)
                    finally:
                        target.stop()
                        shutil.rmtree(run_dir, ignore_errors=True)
                    if n_files / seconds > rates.get((name, n), 0.0):
                        rates[(name, n)], notes[(name, n)] = n_files / seconds, target.note
            for name in starts:
                print(f"  {name:34s} {n} association(s): {rates[(name, n)]:8.1f} instances/s  {notes[(name, n)]}")

        counts = sorted({n for _, n in rates})
        print(f"\nC-STORE ingest: {n_files} CT instances ({size_mb:.0f} MB, 512x512), storescu, same files per run")
        header = f"{'target':36s}" + "".join(f"{f'{n} assoc inst/s':>16s}{'x Orthanc':>11s}" for n in counts)
        print(header)
        for name in starts:
            cells = ""
            for n in counts:
                orthanc = rates[("Orthanc (SyncStorageArea)", n)]
                cells += f"{rates[(name, n)]:16.1f}{rates[(name, n)] / orthanc:11.2f}"
            print(f"{name:36s}{cells}")
        after, before = "triage (after)", f"triage (before, {args.before_commit})"
        for n in counts:
            print(f"after / before at {n} association(s): {rates[(after, n)] / rates[(before, n)]:.2f}x")
        print(f"measured {datetime.now(UTC).isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, "
              f"storage {work} (fsync kept for triage and Orthanc; storescp does not fsync)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
