"""TLS contexts for every link that crosses a network (DICOM, HL7/MLLP, HTTPS): TLS 1.2 or later with the cipher
suites of BCP 195 (RFC 9325: ECDHE with AES-GCM or ChaCha20-Poly1305, forward secrecy only), as the DICOM secure
transport connection profiles of PS3.15 B.9 ("BCP 195 TLS Profile") ask. One place, so that all links agree."""

from __future__ import annotations

import ssl

# RFC 9325 4.2 recommended suites for TLS 1.2 (TLS 1.3 suites are all acceptable and on by default).
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    return context


def server_context(certfile: str, keyfile: str, client_ca: str = "") -> ssl.SSLContext:
    """A listener's context: its certificate and key; with `client_ca`, peers must present a certificate that CA
    signed (mutual TLS, for a site whose senders have certificates).

    Raises:
        OSError / ssl.SSLError: when the files cannot be read or do not match.
    """
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(certfile, keyfile)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    cafile: str = "", certfile: str = "", keyfile: str = "", check_hostname: bool = True
) -> ssl.SSLContext:
    """A sender's context: the peer's certificate verified against `cafile` (empty: the system's CAs), with our
    own certificate where the peer asks for one."""
    context = _harden(ssl.create_default_context(cafile=cafile or None))
    context.check_hostname = check_hostname
    if certfile:
        context.load_cert_chain(certfile, keyfile or None)
    return context
