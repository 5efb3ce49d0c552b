"""The command line as a new user meets it: a mistake ends in one line that says what to do, and a non-zero exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def triage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k not in ("TRIAGE_LOG_LEVEL", "TRIAGE_API_TOKEN")}
    environment = {**inherited, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "triage", *args], capture_output=True, text=True, timeout=120, env=environment
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error line; fails when there is a traceback or more than one line on stderr."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "╭" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("triage: ")
    return lines[0]


def test_worklist_without_a_server_says_how_to_start_one() -> None:
    port = closed_port()
    result = triage("worklist", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert one_line(result) == (
        f"triage: cannot reach the triage server at http://127.0.0.1:{port} (connection refused);"
        " start it with `triage serve` or pass --url"
    )


def test_debug_shows_the_traceback() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    for result in (
        triage("--debug", "worklist", "--url", url),
        triage("worklist", "--url", url, TRIAGE_LOG_LEVEL="DEBUG"),
    ):
        assert result.returncode == 1
        assert "ConnectError" in result.stderr and len(result.stderr.splitlines()) > 5


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("infer", "/missing"), "triage: /missing does not exist; give a study folder or a DICOM file"),
        (("ingest", "/missing"), "triage: /missing does not exist; give a DICOM file, a folder of them or a DICOMDIR"),
        (
            ("models", "evaluate", "xr-chest-pneumothorax", "--data", "/missing"),
            "triage: /missing does not exist; give the folder of labelled images (--data)",
        ),
    ],
    ids=["infer", "ingest", "models-evaluate"],
)
def test_a_missing_path_is_named_with_the_fix(args: tuple[str, ...], expected: str) -> None:
    result = triage(*args)
    assert result.returncode == 2  # a usage error: the argument names nothing
    assert one_line(result) == expected


def test_ingest_to_a_closed_port_says_nothing_listens_there(tmp_path: Path) -> None:
    from tests.dicom_factory import make_radiograph

    make_radiograph("DX", 32, 32).save_as(tmp_path / "xr.dcm", enforce_file_format=True)
    port = closed_port()
    result = triage("ingest", str(tmp_path), "--port", str(port))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("triage: 1 of 1 instance(s) not stored: cannot associate with TRIAGE@127.0.0.1:")
    assert last.endswith(f"is `triage serve` listening on 127.0.0.1:{port}? pass --host/--port")


def test_an_unknown_model_is_one_line_naming_the_installed_ones(tmp_path: Path) -> None:
    result = triage("models", "evaluate", "no-such-model", "--data", str(tmp_path))
    assert result.returncode == 1
    line = one_line(result)
    assert "'no-such-model'" in line and "xr-chest-pneumothorax" in line


def test_usage_errors_keep_exit_status_2() -> None:
    result = triage("users", "add")
    assert result.returncode == 2
    assert "Missing argument" in result.stderr


@pytest.mark.parametrize("which", ["http", "dicom"])
def test_serve_on_a_port_in_use_says_so_before_starting(tmp_path: Path, which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = closed_port()
        http, dicom = (port, other) if which == "http" else (other, port)
        result = triage(
            "serve", "--runner", "inprocess", "--http-port", str(http), "--dicom-port", str(dicom),
            "--data-dir", str(tmp_path / "data"),
        )  # fmt: skip
    assert result.returncode == 1
    line = one_line(result)
    assert f"port {port}" in line and "is not free" in line and f"--{which}-port" in line
    assert not (tmp_path / "data").exists()  # refused before anything started
