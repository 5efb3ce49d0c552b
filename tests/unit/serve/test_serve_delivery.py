"""The HL7 deliverer's reading of the RIS's answer (AA delivered, AR permanent, AE or no answer transient), and the
order listener's handler (ACK, NAK with the reason), over a real MLLP socket on loopback."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from triage.config import Hl7Settings
from triage.domain import ClinicalOrder
from triage.hl7.messages import ack, ack_status
from triage.hl7.mllp import MLLPServer
from triage.serve.delivery import AI_RESULT, PRIORITY_CHANGE, Hl7Deliverer, order_handler
from triage.worklist.outbox import DeliveryError, Message

T0 = datetime(2026, 12, 4, 22, 0, tzinfo=UTC)
RESULT = {"accession_number": "ACC1", "priority": "stat", "reason": "AI: possible pneumothorax",
          "results": [{"label": "pneumothorax", "flagged": True, "probability": 0.93, "model": "xr-chest-pneumothorax",
                       "model_version": "1.0.0", "synthetic": True}]}  # fmt: skip


def message(port: int, kind: str = AI_RESULT, payload: dict | None = None) -> Message:
    return Message(7, "hl7", f"127.0.0.1:{port}", "1.2.3.4", kind, payload or RESULT, 1, T0)


@pytest.mark.parametrize(("code", "outcome"), [("AA", None), ("AR", "permanent"), ("AE", "transient")])
def test_the_ris_answer_decides_delivered_refused_or_retried(code: str, outcome: str | None) -> None:
    received: list[str] = []

    def ris(text: str) -> str:
        received.append(text)
        return ack(text, code, "" if code == "AA" else "not now")

    with MLLPServer("127.0.0.1", 0, ris) as server:
        deliver = Hl7Deliverer(Hl7Settings(timeout_s=10))
        if outcome is None:
            deliver(message(server.port))
        else:
            with pytest.raises(DeliveryError) as raised:
                deliver(message(server.port))
            assert raised.value.permanent is (outcome == "permanent")
    (text,) = received
    assert "|TRIAGE0000000007|" in text  # MSH-10: the outbox message id, the same on every retry
    assert "pneumothorax" in text and "ACC1" in text


def test_a_priority_notice_and_a_ris_that_is_down() -> None:
    got: list[str] = []
    with MLLPServer("127.0.0.1", 0, lambda text: got.append(text) or ack(text)) as server:
        notice = {"accession_number": "ACC1", "previous": "routine", "current": "stat", "reason": "AI flag"}
        Hl7Deliverer(Hl7Settings()).__call__(message(server.port, PRIORITY_CHANGE, notice))
        port = server.port
    assert "stat" in got[0].lower()
    with pytest.raises(DeliveryError) as raised:
        Hl7Deliverer(Hl7Settings(timeout_s=5))(message(port))
    assert not raised.value.permanent


def test_the_order_handler_acks_records_and_naks_with_the_reason() -> None:
    recorded: list[ClinicalOrder] = []

    def record(order: ClinicalOrder) -> str | None:
        if order.accession_number == "REFUSE":
            raise ValueError("unknown priority level 'x'")
        recorded.append(order)
        return None

    handle = order_handler(record, salt="s")
    order = ("MSH|^~\\&|HIS|CITY|TRIAGE|RC|20261204220000||ORM^O01|C1|P|2.5.1\rPID|1||MRN1\r"
             "ORC|NW|P1|{acc}||SC||^^^^^S\rOBR|1|P1|{acc}|XR^CHEST|S|||||||||||||{acc}\r")  # fmt: skip
    assert ack_status(handle(order.format(acc="ACC1")), "C1")[0] == "AA"
    assert recorded[0].accession_number == "ACC1" and recorded[0].priority == "stat"
    code, text = ack_status(handle(order.format(acc="REFUSE")), "C1")
    assert code == "AE" and "unknown priority level" in text
    assert ack_status(handle("garbage"))[0] == "AR"
