"""A certificate this CA signed that its inventory lacks (issued after the backup the CA
was restored from), recorded so that it can be revoked: its CRL and OCSP can say so only
of a certificate the inventory has. The `cert.adopt` audit line holds the certificate
itself, so that an inventory copied before its commit gets it from the log at the next
start, as the revocation after it (ca/revocation/from_log.py)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.store import NewCert
from ca.subject import spki_sha256


def adopted(cert: x509.Certificate, issuer: str, audit_log: str | None) -> NewCert:
    """Its inventory record. Its role is unknown ("unknown": no route serves it); it was
    issued at its notBefore, as far as anyone can tell; and it has no intent line in
    this log to point to (audit_seq None: the `cert.adopt` line is no signature's)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n.value) for n in sans)
    except x509.ExtensionNotFound:
        names = ()
    return NewCert(
        serial=cert.serial_number, fingerprint=hashlib.sha256(der).hexdigest(),
        role="unknown", subject=cert.subject.rfc4514_string(), names=names, principals=(),
        spki_sha256=spki_sha256(cert.public_key()),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        issued_at=cert.not_valid_before_utc.isoformat(), der=der, issuer=issuer,
        audit_log=audit_log)


def line_fields(new: NewCert) -> dict[str, Any]:
    """What the `cert.adopt` line says of it, the certificate included."""
    return {"serial": format(new.serial, "x"), "fingerprint": new.fingerprint,
            "issuer": new.issuer, "names": list(new.names), "not_after": new.not_after,
            "spki_sha256": new.spki_sha256, "der": base64.b64encode(new.der).decode()}


def from_line(line: dict[str, Any], audit_log: str | None) -> NewCert | None:
    """The record a `cert.adopt` line holds, or None if it holds none that reads."""
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(line["der"], validate=True))
        if format(cert.serial_number, "x") != line["serial"]:
            return None
        return adopted(cert, str(line["issuer"]), audit_log)
    except (KeyError, TypeError, ValueError):
        return None
