"""What goes into the inventory and what comes out: frozen records, no SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def authz_bases(names: Iterable[str]) -> list[str]:
    """The names the ACME authorizations for certificate names are for."""
    return sorted({n.removeprefix("*.") for n in names})


def authz_cover(names: Iterable[str], held: Iterable[tuple[str, object]]) -> bool:
    """Whether the valid authorizations `held` (name, wildcard) cover every one of
    `names` (none: no): a wildcard name needs a wildcard one of its base name."""
    wanted = {(n.removeprefix("*."), n.startswith("*.")) for n in names}
    return bool(wanted) and wanted <= {(n, bool(w)) for n, w in held}


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
    # Filled by the inventory reads (`find_certs`, `issued_cert`, `renewal_family`) only:
    issued_at: str | None = None
    audit_seq: int | None = None  # the seq of its hsm.sign intent line; None: not recorded
    acme_order: str | None = None  # the ACME order it was issued to, if any
    audit_log: str | None = None  # whose log audit_seq is in (cluster); None: the CA's one
    acme_account: str | None = None  # the ACME account it was issued to, if any


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
    # ACME: the account and order it is issued to; the order turns valid with this row.
    acme_account: str | None = None
    acme_order: str | None = None
    audit_seq: int | None = None  # the seq of its hsm.sign intent line
    audit_log: str | None = None  # cluster mode: the issuing node, whose log that is in


def crl_time(now: dt.datetime, last: str | None, lead: dt.timedelta) -> dt.datetime:
    """The time handed out with a CRL number (Store.next_crl_number): `now` in whole
    seconds, or a second after `last` (the one before) if that is later, at most `lead`
    ahead of now."""
    at = now.replace(microsecond=0)
    if last:
        at = min(max(at, dt.datetime.fromisoformat(last) + dt.timedelta(seconds=1)),
                 at + lead)
    return at


@dataclass(frozen=True)
class CertQuery:
    """A search of the X.509 inventory, for auditors and operators (`find_certs`).

    `text` matches a certificate whose names, principals or subject contain it (ASCII
    case-insensitive), whose hex serial starts with it (colons and leading zeros
    ignored), or whose role is exactly it. `status` is one of CERT_STATUSES, each
    disjoint from the others: revoked; expired (not revoked, past not_after);
    expiring (live, ending before the `soon` given to the search and past two thirds
    of its lifetime); valid (the other live ones). `kind` is "acme" (issued through
    ACME) or "x509" (the others); `account` the ACME account it was issued to; `issuer`
    the label of the key that signed it. Sorted by
    one of CERT_SORTS, ties broken by serial."""

    text: str | None = None
    status: str | None = None
    role: str | None = None
    kind: str | None = None
    account: str | None = None
    issuer: str | None = None  # the issuing key's label (`hsmca key list`)
    sort: str = "issued"
    descending: bool = True
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class CertPage:
    """One page of a search: how many certificates match in all, and this page's."""

    total: int
    certs: tuple[CertRecord, ...]


@dataclass(frozen=True)
class IssuedCert:
    """A certificate of the inventory with its DER."""

    record: CertRecord
    der: bytes


@dataclass(frozen=True)
class IssuanceCount:
    """How many certificates of a kind were issued in one hour (UTC).

    kind: "x509-<role>" for an X.509 certificate not issued through ACME, "acme",
    "ssh-host" or "ssh-user"; hour: "YYYY-MM-DDTHH", the first 13 characters of
    the ISO 8601 issuance times the inventory keeps."""

    kind: str
    hour: str
    count: int


@dataclass(frozen=True)
class TokenRecord:
    id: str
    role: str
    names: tuple[tuple[str, str], ...]  # (kind, value)
    principals: tuple[str, ...]
    expires: str
    used_at: str | None
    used_serial: str | None = None  # hex: the certificate it enrolled, once committed
    released_at: str | None = None  # when that certificate was released to its client


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
class SSHCertQuery:
    """A search of the SSH certificates (`find_ssh_certs`), as CertQuery is of the X.509
    ones: `text` matches a key id or a principal that contains it (ASCII
    case-insensitive), or the decimal serial it starts; `status` is one of
    CERT_STATUSES, on validBefore; `cert_type` is "host" or "user"; `owner` is the
    X.509 certificate (its serial) that asked for them."""

    text: str | None = None
    status: str | None = None
    cert_type: str | None = None
    owner: int | None = None
    sort: str = "issued"
    descending: bool = True
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class SSHCertRecord:
    serial: int
    key_id: str
    cert_type: str
    key_sha256: str
    principals: tuple[str, ...]
    valid_after: int  # Unix seconds, as in the certificate
    valid_before: int
    owner_serial: str  # the X.509 certificate (hex serial) that asked for it
    issued_at: str
    revoked_at: str | None
    issuer: str | None  # the SSH CA key's label (None: the first key of its type)


@dataclass(frozen=True)
class SSHCertPage:
    total: int
    certs: tuple[SSHCertRecord, ...]


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
    state: str  # next (staged, SSH only) | active | previous | retired | destroyed
    algorithm: str
    created_at: str
    fingerprint: str  # SHA-256 of its SubjectPublicKeyInfo
    uri: str
    cert: bytes | None  # the CA certificate (DER) of a root or issuing key
    changed_at: str
    # An SSH CA key's public key (OpenSSH), kept after it is retired or destroyed: the KRL
    # names its revoked certificates for as long as anyone may trust it.
    ssh_public_key: str | None = None
    # An issuing key's CA certificate revoked by its root: when, and the RFC 5280 reason
    # (None: unspecified). Its root's CRL lists it.
    revoked_at: str | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True)
class CrossCert:
    """A certificate one root key made for another root key (docs/keys.md, the root):
    with it, a relying party that trusts either root accepts what the other anchors."""

    subject_label: str  # the root key it certifies
    issuer_label: str  # the root key that signed it
    der: bytes
    made_at: str


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
    not_after: str


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
    refresh_at: str | None = None  # when they are next due ('' now, None never)


# ---- ACME (RFC 8555) ------------------------------------------------------------------------

@dataclass(frozen=True)
class AcmeEAB:
    """An external account binding key. `mac_key` is the HMAC key the client signs
    with (it must be kept to verify that MAC); it is erased when the key is used."""

    kid: str
    mac_key: bytes | None
    names: tuple[str, ...]  # the patterns the bound account may order
    expires: str
    created_at: str
    created_by: str
    used_at: str | None = None
    account_id: str | None = None


@dataclass(frozen=True)
class AcmeAccount:
    id: str
    thumbprint: str  # RFC 7638 SHA-256 thumbprint of its JWK, base64url
    jwk: str  # the public JWK, JSON
    status: str  # valid | deactivated | revoked
    contact: tuple[str, ...]
    names: tuple[str, ...]  # patterns from its EAB key; () when bound to none
    eab_kid: str | None
    created_at: str


@dataclass(frozen=True)
class AcmeChallenge:
    id: str
    authz_id: str
    type: str  # http-01 | tls-alpn-01 | dns-01
    token: str
    status: str  # pending | processing | valid | invalid
    validated: str | None = None
    error: str | None = None  # the problem document, JSON
    started: str | None = None  # when its validation last began (processing)


@dataclass(frozen=True)
class AcmeAuthz:
    id: str
    order_id: str
    account_id: str
    name: str  # the DNS name validated (without the "*." of a wildcard order)
    wildcard: bool
    status: str  # pending | valid | invalid | deactivated | expired
    expires: str
    challenges: tuple[AcmeChallenge, ...] = ()


@dataclass(frozen=True)
class AcmeOrder:
    id: str
    account_id: str
    status: str  # pending | ready | processing | valid | invalid
    names: tuple[str, ...]
    expires: str
    created_at: str
    authz_ids: tuple[str, ...] = ()
    cert_serial: str | None = None  # hex, once valid
    error: str | None = None  # the problem document, JSON
    replaces: str | None = None  # the CertID (RFC 9773) of the certificate it replaces


@dataclass(frozen=True)
class AcmeCert:
    """A certificate issued through ACME, with the account and order it went to."""

    serial: str  # hex
    account_id: str
    order_id: str
    der: bytes
    issuer: str | None
    not_before: str
    not_after: str
    revoked_at: str | None
    spki_sha256: str


# The columns a key's row is inserted with, in the order of `key_row`.
KEY_COLUMNS = ("label, kind, state, algorithm, created_at, fingerprint, uri, cert, "
               "changed_at, ssh_public_key")


def key_row(r: KeyRecord, state: str | None = None) -> tuple[Any, ...]:
    """`r` as the values of KEY_COLUMNS (with `state` instead of its own, if given)."""
    return (r.label, r.kind, state or r.state, r.algorithm, r.created_at, r.fingerprint,
            r.uri, r.cert, r.changed_at, r.ssh_public_key)


def latest_of(times: Sequence[str | None]) -> dt.datetime | None:
    """The latest of ISO 8601 times as the stores keep them (None for none)."""
    return max((dt.datetime.fromisoformat(t) for t in times if t), default=None)
