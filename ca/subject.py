"""A certificate's subject public key with what every certificate for it needs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def spki_sha256(public_key: Any) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class SubjectKey:
    """A subject public key, its SHA-256 fingerprint (audit and inventory) and its
    SubjectKeyIdentifier."""

    public_key: Any
    spki_sha256: str
    ski: x509.SubjectKeyIdentifier


def subject_key(public_key: Any) -> SubjectKey:
    return SubjectKey(public_key, spki_sha256(public_key),
                      x509.SubjectKeyIdentifier.from_public_key(public_key))
