"""MLLP over a real loopback socket: the listener answers every message (even when its handler fails), several
messages per connection and several clients at once, TLS with a certificate made here, and a sender that says
when the RIS is down."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hl7.mllp import open_hl7_connection

from triage.hl7 import HL7Error, MLLPError, MLLPServer, ack, ack_status, parse_order, send

LOCALHOST = "127.0.0.1"


def order(control_id: str, accession: str = "ACC-1") -> str:
    return "\r".join(
        [
            f"MSH|^~\\&|RIS|NORTH|TRIAGE|RC|20260312101500||ORM^O01^ORM_O01|{control_id}|P|2.5.1",
            "PID|1||MRN-1^^^NORTH^MR",
            "ORC|NW|PLC-1|FIL-1||SC||^^^^^S",
            f"OBR|1|PLC-1|FIL-1|CTHEAD^CT head^L||||||||||||||{accession}",
        ]
    )


class Recorder:
    """A handler that reads the order as the service would, keeps it and accepts it."""

    def __init__(self) -> None:
        self.accessions: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, text: str) -> str:
        accession = parse_order(text).accession_number  # HL7Error -> the listener's NAK
        with self.lock:
            self.accessions.append(accession)
        return ack(text)


@pytest.fixture
def serve() -> Iterator[Callable[..., MLLPServer]]:
    servers: list[MLLPServer] = []

    def start(handle: Callable[[str], str], **kwargs: Any) -> MLLPServer:
        server = MLLPServer(LOCALHOST, 0, handle, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return int(probe.getsockname()[1])


def test_a_message_is_handled_and_its_ack_comes_back(serve: Callable[..., MLLPServer]) -> None:
    recorder = Recorder()
    server = serve(recorder)
    assert server.port > 0  # port 0 took a free one

    reply = send(LOCALHOST, server.port, order("C-1", "ACC-9"), timeout_s=10)

    assert ack_status(reply, control_id="C-1") == ("AA", "")
    assert recorder.accessions == ["ACC-9"]


def test_several_messages_on_one_connection_are_answered_in_order(serve: Callable[..., MLLPServer]) -> None:
    recorder = Recorder()
    server = serve(recorder)

    async def exchange() -> list[str]:
        reader, writer = await open_hl7_connection(LOCALHOST, server.port)
        replies = []
        for number in range(3):
            writer.writeblock(order(f"C-{number}", f"ACC-{number}").encode())
            await writer.drain()
            replies.append((await asyncio.wait_for(reader.readblock(), 10)).decode())
        writer.close()
        return replies

    replies = asyncio.run(exchange())
    assert [ack_status(r) for r in replies] == [("AA", "")] * 3
    assert [ack_status(r, control_id=f"C-{n}") for n, r in enumerate(replies)]  # each answers its own message
    assert recorder.accessions == ["ACC-0", "ACC-1", "ACC-2"]


def test_clients_are_served_at_the_same_time(serve: Callable[..., MLLPServer]) -> None:
    # Each handler call waits until three are running together: it passes only if three clients are served at once.
    together = threading.Barrier(3, timeout=20)

    def handle(text: str) -> str:
        together.wait()
        return ack(text)

    server = serve(handle, workers=4)
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda n: send(LOCALHOST, server.port, order(f"C-{n}"), timeout_s=30), range(3)))
    assert [ack_status(r, control_id=f"C-{n}")[0] for n, r in enumerate(replies)] == ["AA", "AA", "AA"]


def test_a_handler_that_raises_gets_an_ae_and_the_listener_keeps_serving(serve: Callable[..., MLLPServer]) -> None:
    calls: list[str] = []

    def handle(text: str) -> str:
        calls.append(text)
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return ack(text)

    server = serve(handle)
    code, text = ack_status(send(LOCALHOST, server.port, order("C-1"), timeout_s=10), control_id="C-1")
    assert code == "AE" and "internal error" in text and "database" not in text  # no internals to the sender

    assert ack_status(send(LOCALHOST, server.port, order("C-2"), timeout_s=10), control_id="C-2") == ("AA", "")


def test_a_malformed_message_gets_the_nak_of_its_error(serve: Callable[..., MLLPServer]) -> None:
    server = serve(Recorder())
    no_accession = "\r".join(order("C-1").split("\r")[:2] + ["ORC|NW|PLC-1", "OBR|1|PLC-1|"])
    code, text = ack_status(send(LOCALHOST, server.port, no_accession, timeout_s=10))
    assert (code, "no accession number" in text) == ("AE", True)
    code, text = ack_status(send(LOCALHOST, server.port, "MSH|^~\\&|X|||||||ADT^A08|C-2|P|2.5.1", timeout_s=10))
    assert (code, "accepts ORM^O01, OMI^O23" in text) == ("AR", True)


def test_a_handler_that_returns_no_ack_still_answers(serve: Callable[..., MLLPServer]) -> None:
    server = serve(lambda text: "")
    assert ack_status(send(LOCALHOST, server.port, order("C-1"), timeout_s=10))[0] == "AE"


def test_a_message_over_the_size_limit_is_refused_and_its_connection_closed(serve: Callable[..., MLLPServer]) -> None:
    server = serve(Recorder(), max_message_bytes=2000)
    big = order("C-1") + "\rNTE|1||" + "x" * 3000
    code, text = ack_status(send(LOCALHOST, server.port, big, timeout_s=10))
    assert code == "AR" and "longer than 2000 bytes" in text
    assert ack_status(send(LOCALHOST, server.port, order("C-2"), timeout_s=10))[0] == "AA"


def test_a_block_without_start_byte_is_refused_and_the_connection_goes_on(serve: Callable[..., MLLPServer]) -> None:
    server = serve(Recorder())
    with socket.create_connection((LOCALHOST, server.port), timeout=10) as client:
        client.sendall(b"hello\x1c\r")
        assert ack_status(read_block(client))[0] == "AR"
        client.sendall(b"\x0b" + order("C-1").encode() + b"\x1c\r")
        assert ack_status(read_block(client), control_id="C-1")[0] == "AA"


def test_an_idle_connection_is_closed(serve: Callable[..., MLLPServer]) -> None:
    server = serve(Recorder(), idle_timeout_s=0.2)
    with socket.create_connection((LOCALHOST, server.port), timeout=10) as client:
        client.sendall(b"\x0bMSH|^~\\&|")  # a message begun and never finished
        assert client.recv(1024) == b""  # closed by the server, not timed out here


def read_block(client: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\x1c\r"):
        chunk = client.recv(65536)
        assert chunk, "connection closed before a whole block"
        data += chunk
    assert data.startswith(b"\x0b")
    return data[1:-2].decode()


# TLS: MLLP inside TLS, with a CA and a server certificate for 127.0.0.1 made here.


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "triage test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "triage hl7")])).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCALHOST))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    client_context = ssl.create_default_context(cafile=str(ca_file))  # verifies the chain and the IP address
    return server_context, client_context


def test_mllp_inside_tls(serve: Callable[..., MLLPServer], tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls
    recorder = Recorder()
    server = serve(recorder, ssl_context=server_context)

    reply = send(LOCALHOST, server.port, order("C-1", "ACC-TLS"), timeout_s=10, ssl_context=client_context)

    assert ack_status(reply, control_id="C-1") == ("AA", "")
    assert recorder.accessions == ["ACC-TLS"]


def test_a_tls_server_the_client_does_not_trust_is_an_error(
    serve: Callable[..., MLLPServer], tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server = serve(Recorder(), ssl_context=tls[0])
    stranger = ssl.create_default_context(cafile=None, cadata=None)  # the system's CAs only
    with pytest.raises(MLLPError, match="TLS"):
        send(LOCALHOST, server.port, order("C-1"), timeout_s=10, ssl_context=stranger)


def test_plain_tcp_to_a_tls_listener_gets_no_ack(
    serve: Callable[..., MLLPServer], tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server = serve(Recorder(), ssl_context=tls[0])
    with pytest.raises(MLLPError):
        send(LOCALHOST, server.port, order("C-1"), timeout_s=5)


# The RIS is down, silent or hangs up: MLLPError, which an outbox retries.


def test_a_server_that_is_down_is_an_mllp_error() -> None:
    with pytest.raises(MLLPError, match=f"cannot send HL7 to {LOCALHOST}"):
        send(LOCALHOST, free_port(), order("C-1"), timeout_s=5)


def test_a_stopped_server_no_longer_answers(serve: Callable[..., MLLPServer]) -> None:
    server = serve(Recorder())
    port = server.port
    server.stop()
    with pytest.raises(MLLPError):
        send(LOCALHOST, port, order("C-1"), timeout_s=5)


def test_a_stopped_server_starts_again(serve: Callable[..., MLLPServer]) -> None:
    server = serve(Recorder())
    server.stop()
    server.start()
    assert ack_status(send(LOCALHOST, server.port, order("C-1"), timeout_s=10))[0] == "AA"


@pytest.fixture
def silent_peer() -> Iterator[tuple[int, threading.Event]]:
    """A TCP peer that accepts one connection, reads, and answers nothing until released."""
    listener = socket.create_server((LOCALHOST, 0))
    release = threading.Event()

    def run() -> None:
        connection, _ = listener.accept()
        with connection:
            release.wait(30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1]), release
    release.set()
    thread.join(30)
    listener.close()


def test_no_ack_within_the_timeout_is_an_mllp_error(silent_peer: tuple[int, threading.Event]) -> None:
    port, _ = silent_peer
    with pytest.raises(MLLPError, match="no HL7 ACK"):
        send(LOCALHOST, port, order("C-1"), timeout_s=0.3)


def test_a_peer_that_hangs_up_without_ack_is_an_mllp_error(silent_peer: tuple[int, threading.Event]) -> None:
    port, release = silent_peer
    release.set()  # the peer closes as soon as it has accepted
    with pytest.raises(MLLPError, match="without an HL7 ACK|cannot send"):
        send(LOCALHOST, port, order("C-1"), timeout_s=10)


def test_a_port_in_use_cannot_be_listened_on() -> None:
    with socket.create_server((LOCALHOST, 0)) as taken:
        server = MLLPServer(LOCALHOST, int(taken.getsockname()[1]), Recorder())
        with pytest.raises(MLLPError, match="cannot listen for HL7"):
            server.start()


def test_hl7_error_from_the_handler_is_answered_with_its_own_codes(serve: Callable[..., MLLPServer]) -> None:
    def handle(text: str) -> str:
        raise HL7Error("204", "unknown accession: the study is not on this worklist", "AE")

    server = serve(handle)
    reply = send(LOCALHOST, server.port, order("C-1"), timeout_s=10)
    assert ack_status(reply) == ("AE", "unknown accession: the study is not on this worklist")
    assert "|204^" in reply
