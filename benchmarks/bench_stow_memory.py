"""Peak memory of a real `triage serve` process while it takes one large STOW-RS request (issue 9, item 6).

For each checkout given (default: this one) the script starts `python -m triage serve` with that checkout's code
(in-process runner, its own data folder), reads the process's peak resident memory (VmHWM, /proc/<pid>/status)
once the service is ready, posts one STOW-RS body of about --body-mb MB, and reads VmHWM again. The instances
are Secondary Captures, which no model analyses, so the figures are those of receiving and storing alone.

Two bodies of the same size: many instances of 2 MiB (a CT or radiograph series), and a single instance that
fills the whole body (a large multi-frame object). A benchmark, not a test: it prints figures, asserts nothing.

    python benchmarks/bench_stow_memory.py                              # this checkout
    python benchmarks/bench_stow_memory.py --code /tmp/old --code .     # before and after, in the same run
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from triage.config import Settings  # noqa: E402
from triage.worklist.accounts import add_user  # noqa: E402

BOUNDARY = "bench-stow-memory"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _instance(study_uid: str, rows: int, columns: int, seed: int) -> bytes:
    """A grey 16-bit Secondary Capture (PS3.3 A.8) as Part-10 bytes, of about rows * columns * 2 bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = "BENCH^STOW", "BENCH-0001", "OT", "WSD"
    ds.InstanceNumber = seed + 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write_body(path: Path, body_mb: int, single: bool) -> int:
    """A multipart/related STOW-RS body at `path`; returns the number of instances in it."""
    study = generate_uid()
    if single:
        columns = 4096
        shapes = [(max(1, body_mb * 1024 * 1024 // (columns * 2)), columns)]
    else:
        shapes = [(1024, 1024)] * max(1, body_mb // 2)  # 2 MiB each
    with path.open("wb") as out:
        for index, (rows, columns) in enumerate(shapes):
            out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            out.write(_instance(study, rows, columns, index))
            out.write(b"\r\n")
        out.write(f"--{BOUNDARY}--\r\n".encode())
    return len(shapes)


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status (Linux only)")


def _stream(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            yield chunk


def measure(code: Path, body: Path, work: Path) -> tuple[float, float, int, float]:
    """(VmHWM MB when ready, VmHWM MB after the request, HTTP status, seconds) for one server run."""
    data_dir = work / "data"
    settings = Settings()
    settings.data_dir = data_dir
    _, token = add_user(settings, "bench-service", "service")
    http_port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "TRIAGE_DICOMWEB__STOW_MAX_BODY_BYTES": str(4 * 1024**3),
        "TRIAGE_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "triage", "serve", "--runner", "inprocess", "--data-dir", str(data_dir)]
    command += ["--http-port", str(http_port), "--dicom-port", str(_free_port())]
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(work / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        time.sleep(2)  # let start-up settle
        ready = _vm_hwm_mb(proc.pid)
        started = time.monotonic()
        response = httpx.post(
            url + "/dicomweb/studies",
            content=_stream(body),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                "Content-Length": str(body.stat().st_size),
            },
            timeout=600,
        )
        elapsed = time.monotonic() - started
        return ready, _vm_hwm_mb(proc.pid), response.status_code, elapsed
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", type=Path, help="a checkout whose triage/ to run (repeatable)")
    parser.add_argument("--body-mb", type=int, default=256)
    args = parser.parse_args()
    checkouts = [c.resolve() for c in (args.code or [REPO])]
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        tmp_path = Path(tmp)
        bodies = {}
        for kind, single in (("many 2 MiB instances", False), ("one instance", True)):
            path = tmp_path / f"body-{int(single)}"
            count = _write_body(path, args.body_mb, single)
            bodies[kind] = (path, count)
        print(f"{'code':<40} {'body':<34} {'ready MB':>9} {'peak MB':>8} {'added MB':>9} {'HTTP':>5} {'s':>6}")
        for code in checkouts:
            for kind, (path, count) in bodies.items():
                work = Path(tempfile.mkdtemp(dir=tmp_path))
                ready, peak, status, seconds = measure(code, path, work)
                label = f"{path.stat().st_size / 1e6:.0f} MB, {kind} ({count})"
                print(
                    f"{str(code)[-40:]:<40} {label:<34} {ready:>9.0f} {peak:>8.0f} {peak - ready:>9.0f} "
                    f"{status:>5} {seconds:>6.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
