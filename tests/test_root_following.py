"""What a renewer adds to its --ca on a root rotation's word (ca/client.py
`follow_root`): only a new root the served chain's path vouches for. The ways a chain
could talk a renewer into trusting another root are refused here before anything is
asked of the daemon (the case that adds one: tests/test_rotation.py, end to end)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.client import ClientError, _followed_root

NOW = dt.datetime.now(dt.UTC)
ROOT_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root CA")])


def ca_cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
            signer: ec.EllipticCurvePrivateKey, *, ca: bool = True,
            ends: dt.timedelta = dt.timedelta(days=365)) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=2)).not_valid_after(NOW + ends)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256()))


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def test_a_chain_that_does_not_vouch_for_a_new_root_adds_nothing(tmp_path: Path) -> None:
    old_key, new_key, issuing_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    old_root = ca_cert(ROOT_NAME, old_key, ROOT_NAME, old_key)
    issuing_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuing CA")])
    issuing = ca_cert(issuing_name, issuing_key, ROOT_NAME, new_key)
    pinned = tmp_path / "root.pem"
    pinned.write_text(pem(old_root))

    def added(*chain: x509.Certificate, ca: Path = pinned) -> list[str]:
        # an unreachable URL: asked only if the chain vouches for a root
        return asyncio.run(_followed_root("https://127.0.0.1:1", ca, pem(*chain)))
    # The new root's certificate signed by the old one, but expired
    expired = ca_cert(ROOT_NAME, new_key, ROOT_NAME, old_key, ends=-dt.timedelta(days=1))
    assert added(issuing, expired, old_root) == []
    # ... not a CA certificate
    leafish = ca_cert(ROOT_NAME, new_key, ROOT_NAME, old_key, ca=False)
    assert added(issuing, leafish, old_root) == []
    # ... signed by a key --ca does not hold as a root
    other = ec.generate_private_key(ec.SECP256R1())
    assert added(issuing, ca_cert(ROOT_NAME, new_key, ROOT_NAME, other), old_root) == []
    # ... not on the path: the chain's issuing CA is not signed by its key
    stray = ca_cert(ROOT_NAME, other, ROOT_NAME, old_key)
    assert added(issuing, stray, old_root) == []
    # ... vouched for by an intermediate --ca holds, not a root
    mixed = tmp_path / "mixed.pem"
    mixed.write_text(pem(ca_cert(issuing_name, issuing_key, ROOT_NAME, old_key)))
    assert added(issuing, ca_cert(ROOT_NAME, new_key, issuing_name, issuing_key),
                 ca=mixed) == []
    assert pinned.read_text() == pem(old_root)  # untouched
    # While a valid one is asked about: the daemon's roots are fetched (none here)
    with pytest.raises(ClientError, match="cannot connect"):
        added(issuing, ca_cert(ROOT_NAME, new_key, ROOT_NAME, old_key), old_root)
