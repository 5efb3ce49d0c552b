"""HL7 with a real RIS peer over MLLP on loopback: orders in (malformed ones NAKed, nothing lost), an order joining
its study by accession number and raising its clinical priority, ORU^R01 results out; the RIS stopped for a while
and the service killed with SIGKILL with messages in its outbox: after both come back every message is delivered
once, in order per study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Server, free_port, start_server, stop_server
from triage.hl7.messages import ack_status
from triage.hl7.mllp import send
from triage.training.synth_xray import make_chest_radiograph_dataset

pytestmark = pytest.mark.integration

ORDER = (
    "MSH|^~\\&|HIS|CITY HOSPITAL|TRIAGE|READING|20261204220000||ORM^O01|{control}|P|2.5.1\r"
    "PID|1||MRN-{accession}^^^CITY||SYNTHETIC^PATIENT\r"
    "ORC|NW|PL-{accession}|{accession}||SC||^^^^^{priority}\r"
    "OBR|1|PL-{accession}|{accession}|XRCHEST^XR CHEST 1 VIEW|{priority}|||||||||||||{accession}"
    "|||||||||||||breathless after fall, left chest pain\r"  # OBR-31 reason for study
)


class Ris:
    def __init__(self, port: int, path: Path) -> None:
        self.port, self.path = port, path
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ris_peer", str(self.port), str(self.path)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline().startswith("listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def messages(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.strip().split("|~|") for line in self.path.read_text().splitlines() if line.strip()]

    def wait_for(self, predicate, what: str, timeout_s: float = 240) -> list[list[str]]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.messages()
            if predicate(got):
                return got
            time.sleep(1)
        raise AssertionError(
            f"RIS did not receive {what}; got:\n" + "\n".join("|".join(m[:1]) for m in self.messages())
        )


def field(message: list[str], segment: str, index: int) -> str:
    """Field `index` of `segment` (for MSH, whose field 1 is the separator itself, MSH-n is index n - 1)."""
    for line in message:
        parts = line.split("|")
        if parts[0] == segment:
            return parts[index] if index < len(parts) else ""
    return ""


def accession_of(message: list[str]) -> str:
    return field(message, "OBR", 3).split("^")[0]


@pytest.fixture
def ris(tmp_path: Path) -> Iterator[Ris]:
    peer = Ris(free_port(), tmp_path / "ris-received.txt")
    peer.start()
    yield peer
    peer.stop()


def done(items: list[dict], accession: str) -> dict | None:
    return next((i for i in items if i["accession_number"] == accession and i["ai_status"] == "done"), None)


def film(tmp_path: Path, accession: str, seed: int) -> Path:
    ds = make_chest_radiograph_dataset(seed, positive=False, shape=(256, 256))
    ds.AccessionNumber = accession
    path = tmp_path / "films" / accession / "film.dcm"
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def start(data_dir: Path, ris: Ris, hl7_port: int, token: str | None = None) -> Server:
    env = {"TRIAGE_HL7__PORT": str(hl7_port), "TRIAGE_HL7__RIS_HOST": "127.0.0.1",
           "TRIAGE_HL7__RIS_PORT": str(ris.port), "TRIAGE_OUTBOX__INTERVAL_S": "0.5",
           "TRIAGE_OUTBOX__RETRY_BASE_S": "1", "TRIAGE_OUTBOX__RETRY_MAX_S": "3"}  # fmt: skip
    return start_server(data_dir, extra_env=env, runner="inprocess", token=token)


def test_orders_results_and_an_outage_of_the_ris_and_of_triage(tmp_path: Path, ris: Ris) -> None:
    data_dir, hl7_port = tmp_path / "data", free_port()
    server = start(data_dir, ris, hl7_port)
    try:
        # A malformed message and one without an accession number are refused with a reason; nothing is lost.
        code, text = ack_status(send("127.0.0.1", hl7_port, "this is not HL7"))
        assert code == "AR" and text
        no_accession = ORDER.format(control="BAD1", accession="", priority="S")
        code, text = ack_status(send("127.0.0.1", hl7_port, no_accession), "BAD1")
        assert code == "AE" and "accession" in text.lower()
        # A STAT order before its images: kept, then joined when the study arrives.
        code, _ = ack_status(
            send("127.0.0.1", hl7_port, ORDER.format(control="ORD1", accession="ACC1", priority="S")), "ORD1"
        )
        assert code == "AA"
        server.storescu(film(tmp_path, "ACC1", 1))
        item = server.wait_for(lambda items: done(items, "ACC1"), what="ACC1 analysed")
        assert item["clinical_priority"] == "stat" and item["indication"] == "breathless after fall, left chest pain"
        got = ris.wait_for(lambda m: any(accession_of(x) == "ACC1" for x in m), "the ORU of ACC1")
        oru = next(x for x in got if accession_of(x) == "ACC1")
        assert field(oru, "MSH", 8).startswith("ORU^R01") and field(oru, "OBR", 25) == "P"  # MSH-9, OBR-25
        assert any("not a diagnosis" in line for line in oru)

        # The RIS goes away; two more studies are analysed meanwhile; then triage is killed outright.
        ris.stop()
        for n, accession in enumerate(("ACC2", "ACC3"), start=2):
            server.storescu(film(tmp_path, accession, n))
        server.wait_for(lambda items: sum(i["accession_number"] in ("ACC2", "ACC3") and i["ai_status"] == "done"
                                          for i in items) == 2, what="ACC2 and ACC3 analysed")  # fmt: skip
        time.sleep(2)  # a few delivery attempts fail against the stopped RIS
        token = (server.headers or {})["Authorization"].removeprefix("Bearer ")
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
    finally:
        stop_server(server)

    ris.start()
    server = start(data_dir, ris, hl7_port, token)
    try:
        got = ris.wait_for(lambda m: {"ACC2", "ACC3"} <= {accession_of(x) for x in m}, "the ORUs held in the outbox")
        time.sleep(3)  # nothing more should come
        got = ris.messages()
        ids = [field(m, "MSH", 9) for m in got]  # MSH-10, the message control id
        assert len(ids) == len(set(ids)), "a message was delivered twice"
        assert [accession_of(m) for m in got].count("ACC2") == 1 and [accession_of(m) for m in got].count("ACC3") == 1
    finally:
        stop_server(server)
