"""DICOM over TLS (PS3.15 B.9, BCP 195): dcmtk's storescu with TLS stores into the TLS SCP; a plain association is
refused there; with a client CA, a sender without a certificate is refused. Certificates are made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.dicom_factory import make_ct_series, write_dataset
from tests.unit.dicom.test_scp import Received, start_scp


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          ca: bool) -> x509.Certificate:  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("triage test CA", ca_key, None, ca=True)
    paths: dict[str, Path] = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"triage {name}", key, (ca.subject, ca_key), ca=False)
        paths[f"{name}_cert"] = folder / f"{name}.pem"
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        paths[f"{name}_key"].write_bytes(pem)
    return paths


def storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("storescu")
    if binary is None:
        pytest.skip("dcmtk's storescu is not installed")
    return subprocess.run([binary, "-aec", "TRIAGE", "-aet", "TLS_SCU", *tls, "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_storescu_over_tls_stores_and_a_plain_association_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    received = Received(tmp_path / "store")
    ds = make_ct_series(1, rows=32, columns=32)[0]
    path = tmp_path / "one.dcm"
    write_dataset(ds, path)
    scp = start_scp(received.store.write, tls_certfile=str(pki["server_cert"]), tls_keyfile=str(pki["server_key"]))
    try:
        done = storescu(scp.port, path, "+tla", "+cf", str(pki["ca"]))
        assert done.returncode == 0, done.stdout + done.stderr
        assert str(ds.SOPInstanceUID) in received.metas
        plain = storescu(scp.port, path)
        assert plain.returncode != 0  # the TLS port does not speak plain DICOM
    finally:
        scp.stop()


def test_with_a_client_ca_a_sender_needs_its_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    received = Received(tmp_path / "store")
    ds = make_ct_series(1, rows=32, columns=32)[0]
    path = tmp_path / "one.dcm"
    write_dataset(ds, path)
    scp = start_scp(received.store.write, tls_certfile=str(pki["server_cert"]), tls_keyfile=str(pki["server_key"]),
                    tls_client_ca=str(pki["ca"]))  # fmt: skip
    try:
        anonymous = storescu(scp.port, path, "+tla", "+cf", str(pki["ca"]))
        assert anonymous.returncode != 0 and str(ds.SOPInstanceUID) not in received.metas
        done = storescu(scp.port, path, "+tls", str(pki["client_key"]), str(pki["client_cert"]), "+cf", str(pki["ca"]))
        assert done.returncode == 0, done.stdout + done.stderr
        assert str(ds.SOPInstanceUID) in received.metas
    finally:
        scp.stop()


def test_results_go_to_a_pacs_over_tls_with_its_certificate_checked(tmp_path: Path) -> None:
    from triage.dicom.results import ResultsExportError, send_results
    from triage.tls import client_context

    pki = make_pki(tmp_path / "pki")
    pacs = Received(tmp_path / "pacs")
    scp = start_scp(pacs.store.write, tls_certfile=str(pki["server_cert"]), tls_keyfile=str(pki["server_key"]))
    ds = make_ct_series(1, rows=32, columns=32)[0]
    try:
        trusted = client_context(str(pki["ca"]))
        assert send_results([ds], ("TRIAGE", "127.0.0.1", scp.port), ssl_context=trusted, timeout_s=10) == [0]
        assert str(ds.SOPInstanceUID) in pacs.metas
        other = make_pki(tmp_path / "other-pki")  # a CA that did not sign the PACS's certificate
        with pytest.raises(ResultsExportError):
            send_results([ds], ("TRIAGE", "127.0.0.1", scp.port), ssl_context=client_context(str(other["ca"])),
                         timeout_s=10)  # fmt: skip
    finally:
        scp.stop()
