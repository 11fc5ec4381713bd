"""The CA's issuers: which key signs what, with which certificate.

There is one X.509 issuing CA and one SSH CA per certificate type today, but no
code may assume so (key rotation means two at once): every order names its issuer,
and the registration authority picks it through this directory (`ra.Directory`).
An issuer is known by its key's label in the token.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca.chains import issued_by, presented
from ca.issuance import profiles as prof
from ca.store.records import CrossCert, KeyRecord
from hsm.session import KeyInfo


class IssuerError(ValueError):
    """A certificate file does not belong to the key the token holds."""


@dataclass(frozen=True)
class X509Issuer:
    id: str
    key: KeyInfo
    cert: x509.Certificate
    root: x509.Certificate  # the root that certified it
    # While the root rotates (docs/keys.md): the new root certified by the previous one,
    # then the previous root; a relying party that trusts either builds a path.
    links: tuple[x509.Certificate, ...] = ()

    # Asked at every signature; an issuer never changes (a rotation makes a new one).
    @functools.cached_property
    def hash(self) -> hashes.HashAlgorithm | None:
        return prof.hash_for(self.key.public_key)

    @functools.cached_property
    def hash_name(self) -> str | None:
        return prof.hash_name(self.key.public_key)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.cert, *self.links) if self.links else (self.cert, self.root)

    @functools.cached_property
    def presented_pem(self) -> str:
        """What a holder of its certificates sends above the leaf (ca/chains.py)."""
        return "".join(prof.pem(c) for c in presented(self.chain))

    @functools.cached_property
    def chain_pem(self) -> str:
        """Sent with every certificate issued: encoded once (an issuer never changes;
        a rotation makes a new one)."""
        return "".join(prof.pem(c) for c in self.chain)


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
    """What the process may sign with now; implements `ca.ra.Directory`.

    `x509` and `ssh` hold the issuers that still sign (the active one of each kind and
    the previous ones, which keep signing CRLs and OCSP for what they issued); `past`
    the certificates of retired and destroyed issuing keys, which still anchor the
    client certificates they issued until those expire."""

    root: x509.Certificate
    root_key: KeyInfo
    x509: dict[str, X509Issuer]
    current_x509: str
    ssh: dict[str, SSHIssuer]
    current_ssh: dict[str, str]  # cert type -> issuer id
    audit: KeyInfo  # signs the audit log's checkpoints
    # The issuers of records that name none (made before issuers were named): the
    # keys `init` made.
    first_x509: str
    first_ssh: dict[str, str] = field(default_factory=dict)
    past: dict[str, x509.Certificate] = field(default_factory=dict)
    # Audit keys rotated out but not retired: they co-sign checkpoints (docs/keys.md).
    audit_previous: tuple[KeyInfo, ...] = ()
    # Every root ever made, the active one first (a rotation makes a second one).
    roots: tuple[x509.Certificate, ...] = ()
    # The root a rotation replaced while it is not retired (relying parties still
    # trust it alone): its label, or None.
    previous_root: str | None = None
    # SSH CA keys retired or destroyed: (cert type, public key, OpenSSH) by label. They
    # sign nothing, but hosts and clients may trust them still: the KRL goes on naming
    # their revoked certificates.
    ssh_past: dict[str, tuple[str, str]] = field(default_factory=dict)
    # That previous root's key and certificate: it still signs its own CRL until it is
    # retired, which relying parties that trust it alone and check every link need.
    previous_root_issuer: X509Issuer | None = None
    # Roots retired or destroyed: they sign nothing, and their last CRL is served while
    # it is valid, as a retired issuing key's is.
    past_roots: tuple[str, ...] = ()
    # Issuing keys whose CA certificate its root revoked (`hsmca key revoke`): label ->
    # (the certificate, when, the RFC 5280 reason or None). The root's CRL lists them,
    # and the client certificates they issued no longer authenticate.
    revoked_ca: dict[str, tuple[x509.Certificate, str, str | None]] = field(
        default_factory=dict)

    def x509_issuer(self) -> str:
        return self.current_x509

    def x509_not_after(self, issuer: str) -> dt.datetime:
        return self.x509[issuer].cert.not_valid_after_utc

    def ssh_issuer(self, cert_type: str) -> str:
        return self.current_ssh[cert_type]

    def root_issuer(self) -> str:
        return self.root_key.label

    def crl_signer(self, label: str) -> X509Issuer | None:
        """Who signs the CRL named `label`: an issuing CA that still signs, or the root
        (its CRL lists the issuing CA certificates it revoked, `hsmca key revoke`;
        relying parties that check every link of the chain need it, empty or not)."""
        if label in self.x509:
            return self.x509[label]
        if label == self.root_key.label:
            return X509Issuer(label, self.root_key, self.root, self.root)
        if self.previous_root_issuer is not None and label == self.previous_root_issuer.id:
            return self.previous_root_issuer
        return None

    def crl_labels(self) -> list[str]:
        """Every CRL the CA signs now: each issuing CA's that still signs, the root's, and
        while a root rotation hands over, the previous root's (a key trial: relying
        parties of the old root that check every link refused every certificate)."""
        previous = [self.previous_root_issuer.id] if self.previous_root_issuer else []
        return [*self.x509, self.root_key.label, *previous]

    def certifying_root(self, cert: x509.Certificate) -> str | None:
        """The label of the root that certified the CA certificate `cert`, if it still
        signs a CRL (the active root, or the previous one while it hands over)."""
        aki = cert.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier).value.key_identifier
        for label in (self.root_key.label, self.previous_root):
            signer = self.crl_signer(label) if label is not None else None
            if signer is not None and signer.cert.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier).value.digest == aki:
                return label
        return None

    def revoked_by_root(self, label: str) -> dict[int, tuple[dt.datetime, str | None]]:
        """The CA certificates the root `label` certified and revoked, by serial: what its
        CRL lists (empty for any other label)."""
        return {cert.serial_number: (dt.datetime.fromisoformat(at), reason)
                for cert, at, reason in self.revoked_ca.values()
                if self.certifying_root(cert) == label}

    def crl_past(self) -> list[str]:
        """The keys that sign no CRL any more, whose last CRL is served while it is valid:
        retired and destroyed issuing keys and roots (a key trial: a retired root's CRL
        went at once, and relying parties that trust it and check every link refused the
        certificates still valid under it)."""
        return [*self.past, *self.past_roots]

    @property
    def current(self) -> X509Issuer:
        return self.x509[self.current_x509]

    def x509_of(self, label: str | None) -> str:
        """The issuer label a record names (None: the first issuing key)."""
        return label or self.first_x509

    def x509_signs_for(self, label: str | None) -> str | None:
        issuer = self.x509_of(label)
        return issuer if issuer in self.x509 else None

    def ssh_of(self, label: str | None, cert_type: str) -> str:
        return label or self.first_ssh.get(cert_type) or self.current_ssh[cert_type]

    def intermediates(self) -> list[x509.Certificate]:
        """Every issuing CA certificate still anchoring a client certificate, newest
        first: the current chain's, the previous ones, the retired ones (but those whose
        certificate was revoked)."""
        # Both dicts are in the inventory's order, oldest first, hence reversed (a key
        # lifecycle trial: the bundle listed the oldest previous CA before newer ones).
        live = [self.current.cert] + [i.cert for k, i in reversed(self.x509.items())
                                      if k != self.current_x509]
        # Not one its root revoked: relying parties that take this list as their trust
        # store (Go, Java) check no anchor's revocation, and took it on (a review).
        return live + [c for label, c in reversed(self.past.items())
                       if label not in self.revoked_ca]

    def ssh_ca_key(self, line: str) -> tuple[str, str] | None:
        """(label, cert type) of the SSH CA key that still signs or can (the active one
        of its type, or one rotated out and not retired) whose OpenSSH public key is
        `line` ("<type> <base64>"); None for any other key."""
        for label, issuer in self.ssh.items():
            if issuer.authorized_key("").strip() == line:
                return label, issuer.cert_type
        return None

    def ssh_lines(self, cert_type: str, comment: str) -> list[str]:
        """authorized_keys lines of every SSH CA of a type still trusted, the one that
        signs first, then the others newest first (a staged one among them), each
        commented with its key's label: during an overlap an operator editing
        known_hosts or TrustedUserCAKeys by hand tells the old key from the new."""
        current = self.current_ssh[cert_type]
        ordered = [current] + [k for k, i in reversed(self.ssh.items())
                               if i.cert_type == cert_type and k != current]
        return [self.ssh[k].authorized_key(f"{comment} {k}") for k in ordered]


KINDS = ("root", "issuing", "ssh-user", "ssh-host", "audit")
# The config's [keys] purposes by kind.
PURPOSES = {"root": "root", "issuing": "issuing", "ssh-user": "ssh_user",
            "ssh-host": "ssh_host", "audit": "audit"}


def build(records: list[KeyRecord], infos: dict[str, KeyInfo],
          cross: Sequence[CrossCert] = ()) -> Issuers:
    """The issuers the key records say are in use, with the keys the token holds
    (`infos`, by label, for every record that is neither retired nor destroyed) and the
    roots' cross-certificates; refused if a certificate does not belong to its key."""
    by_kind: dict[str, list[KeyRecord]] = {k: [] for k in KINDS}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)

    def active(kind: str) -> KeyRecord:
        found = [r for r in by_kind[kind] if r.state == "active"]
        if len(found) != 1:
            raise IssuerError(f"the inventory records {len(found)} active {kind} keys, not one")
        return found[0]

    def cert_of(r: KeyRecord) -> x509.Certificate:
        if r.cert is None:
            raise IssuerError(f"the inventory has no certificate for the {r.kind} key "
                              f"{r.label!r}")
        cert = x509.load_der_x509_certificate(r.cert)
        info = infos.get(r.label)
        if info is not None and cert.public_key() != info.public_key:
            raise IssuerError(f"the certificate of {r.label!r} does not belong to the key "
                              "the HSM holds under that label (a swapped token?)")
        return cert

    root_record = active("root")
    roots = {r.label: cert_of(r) for r in by_kind["root"]}
    root = roots[root_record.label]
    links = _links(root_record, by_kind["root"], roots, cross)

    def issuer(r: KeyRecord) -> X509Issuer:
        cert = cert_of(r)
        own = _root_of(cert, roots) or root
        return X509Issuer(r.label, infos[r.label], cert, own,
                          links if own is root else ())

    signing = [r for r in by_kind["issuing"] if r.state in ("active", "previous")]
    x = {r.label: issuer(r) for r in signing}
    past = {r.label: cert_of(r) for r in by_kind["issuing"] if r.state in ("retired",
                                                                           "destroyed")}
    ssh: dict[str, SSHIssuer] = {}
    current_ssh: dict[str, str] = {}
    first_ssh: dict[str, str] = {}
    for kind, cert_type in (("ssh-user", "user"), ("ssh-host", "host")):
        first_ssh[cert_type] = by_kind[kind][0].label if by_kind[kind] else ""
        for r in by_kind[kind]:
            # A staged (next) key is trusted, so /v1/ssh/ca hands it out, and signs
            # nothing until it is promoted: current_ssh is the active one.
            if r.state in ("active", "previous", "next"):
                ssh[r.label] = SSHIssuer(r.label, infos[r.label], cert_type)
        current_ssh[cert_type] = active(kind).label
    first = by_kind["issuing"][0].label
    audit_previous = tuple(infos[r.label] for r in reversed(by_kind["audit"])
                           if r.state == "previous")
    ssh_past = {r.label: (cert_type, r.ssh_public_key)
                for kind, cert_type in (("ssh-user", "user"), ("ssh-host", "host"))
                for r in by_kind[kind]
                if r.state in ("retired", "destroyed") and r.ssh_public_key}
    old_root = previous_root(by_kind["root"])
    old_root_issuer = None
    if old_root is not None and old_root.label in infos:
        old_cert = roots[old_root.label]
        old_root_issuer = X509Issuer(old_root.label, infos[old_root.label], old_cert, old_cert)
    return Issuers(root, infos[root_record.label], x, active("issuing").label, ssh,
                   current_ssh, infos[active("audit").label], first, first_ssh, past,
                   audit_previous,
                   roots=(root, *(c for label, c in reversed(roots.items())
                                  if label != root_record.label)),
                   previous_root=old_root.label if old_root is not None else None,
                   ssh_past=ssh_past, previous_root_issuer=old_root_issuer,
                   past_roots=tuple(r.label for r in by_kind["root"]
                                    if r.state in ("retired", "destroyed")),
                   revoked_ca={r.label: (cert_of(r), r.revoked_at, r.revocation_reason)
                               for r in by_kind["issuing"] if r.revoked_at is not None})


def previous_root(roots: Sequence[KeyRecord]) -> KeyRecord | None:
    """Of the root key records (oldest first), the newest previous one: the root a
    rotation replaced, in its hand-over until it is retired."""
    return next((r for r in reversed(roots) if r.state == "previous"), None)


def _root_of(cert: x509.Certificate, roots: dict[str, x509.Certificate]
             ) -> x509.Certificate | None:
    """The root that signed `cert` (roots made by a rotation share their name: the
    signature tells them apart)."""
    return next((c for c in roots.values() if issued_by(cert, c)), None)


def _links(active: KeyRecord, records: list[KeyRecord], roots: dict[str, x509.Certificate],
           cross: Sequence[CrossCert]) -> tuple[x509.Certificate, ...]:
    """What joins the active root to the newest previous root, while there is one: the
    active root's certificate from that root, and that root."""
    previous = [r.label for r in records if r.state == "previous"]
    for c in reversed(cross):
        if c.subject_label == active.label and c.issuer_label in previous:
            return (x509.load_der_x509_certificate(c.der), roots[c.issuer_label])
    return ()


def seed_records(keys: dict[str, KeyInfo], root: x509.Certificate,
                 issuing: x509.Certificate, at: str) -> list[KeyRecord]:
    """The key records of a CA as `init` made it (every key active)."""
    certs = {"root": root, "issuing": issuing}
    out = []
    for kind in KINDS:
        info = keys[PURPOSES[kind]]
        cert = certs.get(kind)
        out.append(KeyRecord(info.label, kind, "active", info.key_type, at, info.spki_sha256,
                             info.uri, cert.public_bytes(serialization.Encoding.DER)
                             if cert is not None else None, at, ssh_public_key(kind, info)))
    return out


def ssh_public_key(kind: str, info: KeyInfo) -> str | None:
    """What the inventory keeps of an SSH CA key (KeyRecord.ssh_public_key)."""
    if kind not in ("ssh-user", "ssh-host"):
        return None
    return info.public_key.public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()


def from_certs(root: x509.Certificate, issuing: x509.Certificate,
               keys: dict[str, KeyInfo]) -> Issuers:
    """The issuers of a CA as `init` made it (before anything is recorded)."""
    records = seed_records(keys, root, issuing, "")
    return build(records, {r.label: keys[PURPOSES[r.kind]] for r in records})


class Fixed:
    """Issuers that do not change (init's ceremony, a test); what a `Keyring` is for
    the daemon, whose keys rotate."""

    def __init__(self, issuers: Issuers) -> None:
        self.issuers = issuers

    async def refresh(self) -> Issuers:
        return self.issuers
