"""What a certificate's holder presents above it: the CA certificates of its chain but
the self-signed root, which relying parties hold already.

While a root rotation hands over (docs/keys.md), the chain is the issuing CA, the new
root certified by the old one, then the old root; a relying party that trusts only the
old root needs the middle one too (a key trial: renewed services sent the issuing CA
alone, and such parties refused them). The two roots share one name, so a root is told
by its signature, not by its names."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature


def self_signed(cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def presented(chain: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """`chain` (issuing CA first) without its self-signed roots."""
    return [c for c in chain if not self_signed(c)]
