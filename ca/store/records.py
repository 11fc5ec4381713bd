"""What goes into the inventory and what comes out: frozen records, no SQL."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CertRecord:
    serial: str  # hex, lower case
    fingerprint: str  # SHA-256 of the DER certificate
    role: str
    subject: str
    names: tuple[str, ...]
    principals: tuple[str, ...]
    spki_sha256: str
    not_before: str  # ISO 8601
    not_after: str
    revoked_at: str | None
    reason: str | None
    issuer: str | None = None  # key label of its issuer; None: the first issuing key
    renewed_from: str | None = None  # hex serial of the certificate it renewed


@dataclass(frozen=True)
class NewCert:
    serial: int
    fingerprint: str
    role: str
    subject: str
    names: tuple[str, ...]
    principals: tuple[str, ...]
    spki_sha256: str
    not_before: str
    not_after: str
    issued_at: str
    der: bytes
    issuer: str
    token_id: str | None = None  # the bootstrap token spent on it
    renewed_from: str | None = None


@dataclass(frozen=True)
class TokenRecord:
    id: str
    role: str
    names: tuple[tuple[str, str], ...]  # (kind, value)
    principals: tuple[str, ...]
    expires: str
    used_at: str | None


@dataclass(frozen=True)
class NewToken:
    id: str
    secret_sha256: str
    role: str
    names: tuple[tuple[str, str], ...]
    principals: tuple[str, ...]
    expires: str
    created_at: str
    created_by: str


@dataclass(frozen=True)
class NewSSHCert:
    serial: int
    key_id: str
    cert_type: str  # user | host
    key_sha256: str  # SHA256:... of the subject public key
    public_key: str  # its OpenSSH line
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    owner_serial: str  # the X.509 certificate (hex serial) that asked for it
    issued_at: str
    issuer: str | None = None  # the SSH CA key's label


@dataclass(frozen=True)
class SSHSelector:
    """SSH certificates by serial, by key id, or by subject key (SHA256:...)."""

    serial: int | None = None
    key_id: str | None = None
    key_sha256: str | None = None


@dataclass(frozen=True)
class CRLRecord:
    number: int
    revoked: int  # how many revocations it lists
    this_update: str
    der: bytes
    issuer: str | None = None  # its issuer's key label (None: the first issuing key)


@dataclass(frozen=True)
class KeyRecord:
    """One of the CA's keys in the token, and where it is in its life."""

    label: str
    kind: str  # root | issuing | ssh-user | ssh-host | audit
    state: str  # active | previous | retired | destroyed
    algorithm: str
    created_at: str
    fingerprint: str  # SHA-256 of its SubjectPublicKeyInfo
    uri: str
    cert: bytes | None  # the CA certificate (DER) of a root or issuing key
    changed_at: str


@dataclass(frozen=True)
class Revoked:
    """What one revocation reached: the X.509 serials it revoked now, and how many SSH
    certificates issued on the strength of any of them went with them."""

    serials: tuple[int, ...]
    ssh_certs: int


@dataclass(frozen=True)
class OCSPDue:
    """A live certificate whose pre-signed OCSP response is missing, stale, or says
    good while the certificate is revoked."""

    serial: int
    issuer: str | None
    revoked_at: str | None
    reason: str | None


@dataclass(frozen=True)
class OCSPRecord:
    """A certificate's pre-signed responses: one for a SHA-1 CertID, one for SHA-256
    (one SingleResponse each: clients, cryptography's among them, expect one)."""

    serial: int
    status: str  # good | revoked
    this_update: str
    next_update: str
    der_sha1: bytes
    der_sha256: bytes
