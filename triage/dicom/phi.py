"""Salted one-way hashes of patient identifiers, so logs and the database never hold the identifier itself."""

from __future__ import annotations

import hashlib
import hmac

HASH_HEX_CHARS = 16


def hash_identifier(value: str, salt: str) -> str:
    """A keyed SHA-256 (HMAC, key = the site's salt) of an identifier, as 16 hex characters.

    Used for the Patient ID in the database and the Accession Number in logs: equal identifiers give equal
    hashes at one site (so studies of one patient can be grouped), and without the salt the identifier cannot
    be recovered by hashing a list of candidate IDs. Surrounding whitespace is ignored, because DICOM pads
    LO and SH values with spaces (PS3.5 6.2).

    Args:
        value: the identifier (Patient ID, Accession Number).
        salt: the site's secret (`Settings.phi_salt`).

    Returns:
        16 lowercase hex characters (64 bits), or "" when `value` is empty or only whitespace.
    """
    text = (value or "").strip()
    if not text:
        return ""
    digest = hmac.new(salt.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:HASH_HEX_CHARS]
