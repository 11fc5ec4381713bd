"""Certificates the CA makes for itself, with keys made here in software: the daemon's
TLS listener (OpenSSL must use its key for every handshake) and the admin
credential. Ordered by the registration authority like any other, signed and
recorded by the issuers."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import ra
from ca.issuance.issue import Issuance, decision_context
from ca.issuance.profiles import pem
from ca.policy import Policy


class LocalCert(NamedTuple):
    cert_pem: str
    key_pem: bytes
    issuer: str  # the issuing key that signed it: its chain is the one served with it


async def local_cert(issuance: Issuance, policy: Policy, *, role: str, names: list[str],
                     days: int) -> LocalCert:
    """A certificate and PKCS#8 key PEM of a new P-256 key for `role` (server|admin)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ctx = decision_context(policy, issuance.issuers)
    order = ra.order(ctx, ra.Local(), ra.LocalCertRequest(
        role, key.public_key(), tuple(names), dt.timedelta(days=days)))
    issued = await issuance.x509(order)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return LocalCert(pem(issued.cert), key_pem, issued.issuer)
