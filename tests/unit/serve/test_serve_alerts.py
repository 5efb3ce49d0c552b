"""Critical alerts end to end on loopback: an AI finding makes a study stat -> a signed webhook (a real HTTP
receiver) and an e-mail (a real SMTP server, aiosmtpd) once; a second flag tells nobody again; unclaimed past the
site's limit -> the escalation contact; the claim acknowledges; every step is in the audit log."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.unit.worklist.test_worklist_repository import T0, ich, meta, uid
from triage.config import AlertSettings, PrioritySettings
from triage.domain import AIStatus
from triage.serve.delivery import EmailDeliverer, WebhookDeliverer
from triage.worklist.accounts import AuditRow
from triage.worklist.alerts import ALERT, EMAIL, ESCALATION, WEBHOOK
from triage.worklist.outbox import Outbox
from triage.worklist.repository import Worklist

SECRET = "hook-secret"


class Hooks(ThreadingHTTPServer):
    received: list[tuple[dict[str, str], bytes]]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((dict(self.headers), body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class Mailbox:
    def __init__(self) -> None:
        self.mails: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        self.mails.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    server = Hooks(("127.0.0.1", 0), _Handler)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    with socket.socket() as sock:  # aiosmtpd checks its own port after starting: it needs a real number
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


def test_an_ai_stat_study_alerts_once_escalates_when_unclaimed_and_the_claim_acknowledges(
    tmp_path, hooks: Hooks, mailbox: tuple[Mailbox, int]
) -> None:
    box, smtp_port = mailbox
    url = f"http://127.0.0.1:{hooks.server_address[1]}/triage"
    settings = AlertSettings(webhooks=[url], emails=["night-lead@example.org"], escalation_emails=["head@example.org"],
                             escalate_after_min=10, webhook_secret=SECRET, smtp_host="127.0.0.1", smtp_port=smtp_port,
                             base_url="https://triage.example.org")  # fmt: skip
    wl = Worklist.open(f"sqlite:///{tmp_path / 'w.db'}", PrioritySettings())
    wl.alert_settings = settings
    outbox = Outbox(wl.engine, {WEBHOOK: WebhookDeliverer(settings), EMAIL: EmailDeliverer(settings)},
                    audited_kinds=frozenset({ALERT, ESCALATION}))  # fmt: skip
    wl.record_instance(meta("1"), T0)
    generation = wl.begin_analysis(uid("1"), T0)
    wl.finish_analysis(uid("1"), generation, [ich()], [], AIStatus.DONE, "", T0 + timedelta(minutes=1))
    assert outbox.deliver_due(T0 + timedelta(minutes=1)) == 2

    ((headers, body),) = hooks.received
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Triage-Signature"] == f"sha256={expected}"
    alert = json.loads(body)
    # When it was sent is signed with it (a receiver can refuse a replayed old delivery).
    assert str(alert["sent_at"]) == headers["X-Triage-Timestamp"] and abs(alert["sent_at"] - time.time()) < 60
    assert alert["event"] == ALERT and alert["finding"] == "intracranial_haemorrhage" and alert["priority"] == "stat"
    assert alert["link"] == f"https://triage.example.org/studies/{uid('1')}"
    assert "3f2a9c" not in body.decode()  # no patient (hash) in an alert
    ((to, raw),) = box.mails
    mail = message_from_bytes(raw)
    assert to == ["night-lead@example.org"] and mail["Subject"].startswith("[triage] CRITICAL: intracranial")

    # New instances and a second analysis that flags it again: nobody is told twice.
    wl.record_instance(meta("1", n=2), T0 + timedelta(minutes=2))
    generation = wl.begin_analysis(uid("1"), T0 + timedelta(minutes=3))
    wl.finish_analysis(uid("1"), generation, [ich()], [], AIStatus.DONE, "", T0 + timedelta(minutes=4))
    assert outbox.deliver_due(T0 + timedelta(minutes=4)) == 0

    # Unclaimed: escalated after the 10 min limit, once.
    assert wl.escalate_alerts(T0 + timedelta(minutes=9)) == []
    assert wl.escalate_alerts(T0 + timedelta(minutes=12)) == [uid("1")]
    assert wl.escalate_alerts(T0 + timedelta(minutes=13)) == []
    assert outbox.deliver_due(T0 + timedelta(minutes=13)) == 1
    assert [to for to, _ in box.mails] == [["night-lead@example.org"], ["head@example.org"]]
    assert message_from_bytes(box.mails[1][1])["Subject"].startswith("[triage] ESCALATION")

    wl.claim(uid("1"), "dr-night", T0 + timedelta(minutes=14))
    with Session(wl.engine) as session:
        actions = session.execute(select(AuditRow.action).where(AuditRow.study_uid == uid("1"))).scalars().all()
    assert actions.count(ALERT) == 1 and actions.count("alert-delivered") == 3
    assert ESCALATION in actions and "alert-acknowledged" in actions
    kinds = [h.kind for h in wl.get_study(uid("1"), T0 + timedelta(minutes=14)).history]
    assert "alert-queued" in kinds and "alert-escalated" in kinds
    wl.close()


def test_an_smtp_login_goes_only_over_tls(tmp_path) -> None:
    """A user name and password are sent after STARTTLS with the server's certificate checked against the CA given;
    a configuration that would send them in clear is refused when it is read."""
    import ssl

    from aiosmtpd.smtp import AuthResult

    from tests.unit.dicom.test_scp_tls import make_pki
    from triage.worklist.outbox import Message

    with pytest.raises(ValueError, match="not encrypted"):
        AlertSettings(smtp_host="127.0.0.1", smtp_user="triage", smtp_password="secret")

    pki = make_pki(tmp_path / "pki")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki["server_cert"], pki["server_key"])
    logins: list[tuple[str, bool]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001 - aiosmtpd's signature
        logins.append((auth_data.login.decode(), session.ssl is not None))
        return AuthResult(success=auth_data.login == b"triage" and auth_data.password == b"secret")

    box = Mailbox()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    controller = Controller(box, hostname="127.0.0.1", port=port, tls_context=tls, require_starttls=True,
                            authenticator=authenticator, auth_required=True)  # fmt: skip
    controller.start()
    try:
        settings = AlertSettings(smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=True, smtp_tls_ca=str(pki["ca"]),
                                 smtp_user="triage", smtp_password="secret")  # fmt: skip
        message = Message(1, EMAIL, "night-lead@example.org", uid("1"), ALERT, {"finding": "pneumothorax"}, 1, T0)
        EmailDeliverer(settings).__call__(message)
    finally:
        controller.stop()
    assert logins == [("triage", True)]
    assert [to for to, _ in box.mails] == [["night-lead@example.org"]]
