"""The CA's issuers: which key signs what, with which certificate.

There is one X.509 issuing CA and one SSH CA per certificate type today, but no
code may assume so (key rotation means two at once): every order names its issuer,
and the registration authority picks it through this directory (`ra.Directory`).
An issuer is known by its key's label in the token.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca.issuance import profiles as prof
from hsm.session import KeyInfo


class IssuerError(ValueError):
    """A certificate file does not belong to the key the token holds."""


@dataclass(frozen=True)
class X509Issuer:
    id: str
    key: KeyInfo
    cert: x509.Certificate
    root: x509.Certificate

    @property
    def hash(self) -> hashes.HashAlgorithm | None:
        return prof.hash_for(self.key.public_key)

    @property
    def hash_name(self) -> str | None:
        return prof.hash_name(self.key.public_key)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.cert, self.root)

    @property
    def chain_pem(self) -> str:
        return prof.pem(self.cert) + prof.pem(self.root)


@dataclass(frozen=True)
class SSHIssuer:
    id: str
    key: KeyInfo
    cert_type: str  # user | host

    @property
    def hash_name(self) -> str:
        # RSA CA keys sign SSH certificates with rsa-sha2-512 (cryptography's choice).
        return "sha512" if self.key.key_type.startswith("rsa") else "sha256"

    def authorized_key(self, comment: str) -> str:
        line = self.key.public_key.public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode()
        return f"{line} {comment}"


@dataclass(frozen=True)
class Issuers:
    """What the process may sign with; implements `ca.ra.Directory`."""

    root: x509.Certificate
    x509: dict[str, X509Issuer]
    current_x509: str
    ssh: dict[str, SSHIssuer]
    current_ssh: dict[str, str]  # cert type -> issuer id
    audit: KeyInfo  # signs the audit log's checkpoints
    # The issuer of certificates whose inventory record names none (made before
    # issuers were named): the issuing key `init` made.
    first_x509: str

    def x509_issuer(self) -> str:
        return self.current_x509

    def x509_not_after(self, issuer: str) -> dt.datetime:
        return self.x509[issuer].cert.not_valid_after_utc

    def ssh_issuer(self, cert_type: str) -> str:
        return self.current_ssh[cert_type]

    @property
    def current(self) -> X509Issuer:
        return self.x509[self.current_x509]


def load(root_pem: Path, issuing_pem: Path, keys: dict[str, KeyInfo]) -> Issuers:
    """The issuers of a state directory, from its certificates and the keys the token
    holds (`keys`: root, issuing, ssh_user, ssh_host); refused if a certificate does
    not belong to its key (a swapped token or state directory)."""
    root = x509.load_pem_x509_certificate(root_pem.read_bytes())
    issuing = x509.load_pem_x509_certificate(issuing_pem.read_bytes())
    if root.public_key() != keys["root"].public_key:
        raise IssuerError(f"{root_pem} does not belong to the root key in the HSM")
    if issuing.public_key() != keys["issuing"].public_key:
        raise IssuerError(f"{issuing_pem} does not belong to the issuing key in the HSM")
    return from_certs(root, issuing, keys)


def from_certs(root: x509.Certificate, issuing: x509.Certificate,
               keys: dict[str, KeyInfo]) -> Issuers:
    x = X509Issuer(keys["issuing"].label, keys["issuing"], issuing, root)
    user = SSHIssuer(keys["ssh_user"].label, keys["ssh_user"], "user")
    host = SSHIssuer(keys["ssh_host"].label, keys["ssh_host"], "host")
    return Issuers(root, {x.id: x}, x.id, {user.id: user, host.id: host},
                   {"user": user.id, "host": host.id}, keys["audit"], x.id)
