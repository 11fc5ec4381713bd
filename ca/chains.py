"""What a certificate's holder presents above it: the CA certificates of its chain but
the self-signed root, which relying parties hold already.

While a root rotation hands over (docs/keys.md), the chain is the issuing CA, the new
root certified by the old one, then the old root; a relying party that trusts only the
old root needs the middle one too (a key trial: renewed services sent the issuing CA
alone, and such parties refused them). The two roots share one name, so a root is told
by its signature, not by its names."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm


def first_cert(path: Path) -> x509.Certificate | None:
    """The first certificate of a PEM file (a credential's leaf); None if it has none
    or cannot be read."""
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (its name and its signature; False for another
    signer, another key type, an algorithm cryptography does not know)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def self_signed(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)


def presented(chain: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """`chain` (issuing CA first) without its self-signed roots."""
    return [c for c in chain if not self_signed(c)]
