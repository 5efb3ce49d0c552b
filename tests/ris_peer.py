"""A RIS on loopback for the tests: an HL7 MLLP listener in its own process that acknowledges (AA) every message
and appends it to a file, one message per line (segments joined with "|~|"). Run: python -m tests.ris_peer PORT FILE"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from triage.hl7.messages import ack
from triage.hl7.mllp import MLLPServer


def main() -> None:
    port, path = int(sys.argv[1]), Path(sys.argv[2])
    lock = threading.Lock()

    def handle(text: str) -> str:
        with lock, path.open("a") as out:
            out.write(text.replace("\r", "|~|").replace("\n", "|~|") + "\n")
        return ack(text, "AA")

    server = MLLPServer("127.0.0.1", port, handle)
    server.start()
    print(f"listening {server.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
