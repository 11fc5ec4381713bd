"""The registration authority: the one function that decides.

Every path that ends in a signature asks `decide(context, who, request)`: bootstrap
tokens, enrollment, renewal, EST, SSH host and user certificates, revocation, CRLs,
OCSP, and the CA's own certificates: its roots, cross-certificates and issuing CAs
(`init`, key and root rotation) and its TLS and admin certificates. It takes who asks (as
the inventory knows them, never as they claim), what they ask for, and the policy
in force *now* (so a name added to the deny list, a shorter maximum lifetime or a
removed principal applies to the next renewal of an identity that was allowed
yesterday), and returns either a `Refusal` (a typed reason and a sentence) or an
immutable order that says everything the issuer needs: issuer, profile, names,
principals, key, validity. Routes parse and answer; issuers build and sign; neither
decides.

Pure: no I/O, no clock (the context carries `now`), no HSM (the issuers it may
choose from are named by a `Directory`), so it is tested without a daemon
(tests/test_ra.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from ca import policy
from ca.policy import PARSE_ERRORS, Policy, Reason, Refused
from ca.ssh import SSHPublicKey
from ca.subject import SubjectKey, spki_sha256, subject_key
from ca.validity import ended

BACKDATE = dt.timedelta(minutes=1)
CRL_VALIDITY = dt.timedelta(hours=24)
OCSP_VALIDITY = dt.timedelta(days=1)  # a pre-signed response's thisUpdate to nextUpdate
ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=1825)
LOCAL = "local"

# RFC 5280 revocation reasons: the names, their snake-case spelling and their codes.
REASON_CODES = {"unspecified": 0, "keyCompromise": 1, "cACompromise": 2,
                "affiliationChanged": 3, "superseded": 4, "cessationOfOperation": 5,
                "certificateHold": 6, "privilegeWithdrawn": 9, "aACompromise": 10}
SSH_USER_MIN_TTL_S = 60  # the shortest user certificate issued
# What a certificate's holder may say about their own certificate; an admin may also say
# privilegeWithdrawn. Never certificateHold, which this CA does not offer (a hold cannot
# be lifted here, so it would be a revocation that lies about itself), nor cACompromise
# and aACompromise, which X.509 and the CA/B Baseline Requirements (7.2.2) keep for CA
# and attribute authority certificates: every certificate revoked here is a leaf.
HOLDER_REASONS = frozenset({"unspecified", "keyCompromise", "superseded", "affiliationChanged",
                            "cessationOfOperation"})
LEAF_REASONS = HOLDER_REASONS | {"privilegeWithdrawn"}


class Directory(Protocol):
    """The issuers the CA has now; the RA picks among them, by name."""

    def x509_issuer(self) -> str:
        """The issuer new X.509 leaves come from."""
        ...

    def x509_not_after(self, issuer: str) -> dt.datetime:
        """When that issuer's certificate expires (no leaf outlives it)."""
        ...

    def ssh_issuer(self, cert_type: str) -> str:
        """The SSH CA new `user` or `host` certificates come from."""
        ...

    def root_issuer(self) -> str:
        """The root key's label: it signs issuing CA certificates."""
        ...

    def ssh_ca_key(self, line: str) -> tuple[str, str] | None:
        """(label, cert type) of the CA's SSH CA key whose OpenSSH public key is `line`
        ("<type> <base64>"); None for any other key."""
        ...

    def x509_signs_for(self, issuer: str | None) -> str | None:
        """The issuer that signs CRLs and OCSP for the certificates an inventory record
        says `issuer` issued (None: the first issuing key); None once it is retired."""
        ...

    def crl_labels(self) -> list[str]:
        """The labels of every CRL the CA signs now."""
        ...

    @property
    def root(self) -> x509.Certificate: ...


class NoIssuers:
    """The directory of a CA being made (`init`): no issuers yet, so only requests that
    name their signer can be ordered."""

    def _none(self, *_: object) -> Any:
        raise Refused("the CA has no issuers yet", Reason.CONFLICT)

    x509_issuer = x509_not_after = ssh_issuer = root_issuer = x509_signs_for = _none
    crl_labels = ssh_ca_key = _none

    @property
    def root(self) -> x509.Certificate:
        return self._none()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Context:
    policy: Policy
    now: dt.datetime
    issuers: Directory
    ssh_key_revoked: Callable[[str], bool] = field(default=lambda _line: False)
    # Whether a key (its SPKI SHA-256) had a certificate revoked for keyCompromise.
    key_compromised: Callable[[str], bool] = field(default=lambda _spki: False)


# ---- who asks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenHolder:
    """The holder of a bootstrap token (already found and unexpired)."""

    token_id: str
    role: str
    names: tuple[tuple[str, str], ...]
    principals: tuple[str, ...]

    @property
    def actor(self) -> str:
        return f"bootstrap-token:{self.token_id}"


@dataclass(frozen=True)
class CertHolder:
    """The holder of a client certificate this CA issued (from the inventory)."""

    serial: str  # hex
    fingerprint: str
    subject: str
    role: str
    names: tuple[str, ...]
    principals: tuple[str, ...]
    der: bytes
    acme_order: str | None = None  # issued over ACME, to this order

    @property
    def actor(self) -> str:
        return f"cert:{self.fingerprint}:{self.subject}"


@dataclass(frozen=True)
class Local:
    """The CA itself: `init`, start-up, refreshes, an operator on the CA host."""

    actor: str = LOCAL


@dataclass(frozen=True)
class AcmeAccountHolder:
    """An ACME account (from the inventory) whose key signed the request."""

    account_id: str
    status: str  # valid | deactivated | revoked
    names: tuple[str, ...]  # the patterns of the EAB key it was bound with
    eab_bound: bool  # False: registered without EAB ([acme] eab-required = false)
    key_spki_sha256: str  # its account key, which a certificate must not reuse

    @property
    def actor(self) -> str:
        return f"acme-account:{self.account_id}"


@dataclass(frozen=True)
class CertKeyHolder:
    """Whoever signed an ACME revocation with a certificate's own private key."""

    spki_sha256: str

    @property
    def actor(self) -> str:
        return f"cert-key:{self.spki_sha256}"


Requester = TokenHolder | CertHolder | Local | AcmeAccountHolder | CertKeyHolder


# ---- what they ask for ------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenRequest:
    role: object
    names: object
    principals: object = ()
    ttl: object = "1h"


@dataclass(frozen=True)
class EnrollRequest:
    csr: x509.CertificateSigningRequest
    ttl: object = None


@dataclass(frozen=True)
class EnrollAgainRequest:
    """A spent bootstrap token presented again with a CSR (an enrollment whose answer
    was lost, retried): the certificate it enrolled, to the holder of that certificate's
    key. The evidence, from the inventory: that certificate and where it stands."""

    csr: x509.CertificateSigningRequest
    serial: int
    released: bool  # its outcome line durable and its answer sent (tokens.released_at)
    revoked: bool
    not_after: dt.datetime
    issuer_in_use: bool  # its issuing key still among the issuers
    spki_sha256: str  # of its key
    ttl: object = None  # as the retry asks it: one the first request could have asked


@dataclass(frozen=True)
class RenewRequest:
    csr: x509.CertificateSigningRequest | None = None  # None: keep the presented key
    ttl: object = None


@dataclass(frozen=True)
class SSHHostRequest:
    public_key: SSHPublicKey
    principals: object = None


@dataclass(frozen=True)
class SSHUserRequest:
    public_key: SSHPublicKey
    principals: object = None
    ttl: object = None
    source_address: str | None = None


@dataclass(frozen=True)
class RevokeRequest:
    serial: int
    reason: object = None
    found: bool = True  # whether the inventory has the certificate
    revoked: bool = False  # whether it is revoked already
    revoked_reason: str | None = None  # then the reason it was revoked for
    # The certificate itself was given (`certificate`): whether it is the inventory's one
    # of that serial, and, if the inventory lacks it, whether one of this CA's issuing
    # keys signed it. Then it is recorded, and revoked (a CA restored from a backup
    # older than the certificate).
    given: bool = False
    matches: bool = True
    proven: bool = False


@dataclass(frozen=True)
class RevokeIdentityRequest:
    """Everything live issued to a name, with the lineages it belongs to."""

    name: str
    reason: object = None


@dataclass(frozen=True)
class SSHRevokeRequest:
    """SSH certificates by exactly one of serial, key id or subject key; a key is also
    listed in the KRL itself, so it needs no certificate to match."""

    serial: int | None = None
    key_id: str | None = None
    public_key: SSHPublicKey | None = None
    matching: int = 0  # unrevoked SSH certificates the selector matches now
    revoked: int = 0  # and revoked ones
    # The key is this CA's own SSH CA key that signs, or can (label, cert type, whether
    # it is the active one): in the KRL it revokes every certificate it ever signed.
    ca_key: tuple[str, str, str] | None = None  # (label, cert type, its state)


@dataclass(frozen=True)
class CRLRequest:
    issuer: str | None = None


@dataclass(frozen=True)
class OCSPRequest:
    """Pre-signed OCSP responses for certificates that `issuer` issued (the label their
    inventory records carry; None: the first issuing key)."""

    issuer: str | None = None


@dataclass(frozen=True)
class KeyRequest:
    """rotate a kind of key, or retire or destroy a key (by label, in `state` now)."""

    action: str  # rotate | retire | destroy
    kind: str
    label: str | None = None
    state: str | None = None
    # True: asked and confirmed; False: not (the CLI asked nothing: the key could not be
    # retired when it looked); None: not said (an API client's retire)
    confirmed: bool | None = None
    # An audit key's retirement: the logs whose latest checkpoint only it still signs.
    not_handed_over: tuple[str, ...] = ()
    # A rotation: whether to stage the new key (published, signing nothing yet), and
    # the kind's staged key if it has one (a rotation puts that one in use).
    stage: bool = False
    staged: str | None = None
    # A revocation of an issuing key's CA certificate by its root: the reason given,
    # whether it is revoked already, and whether the root that certified it still signs
    # a CRL (the active root, or the previous one while a root rotation hands over).
    reason: object = None
    revoked: bool = False
    root_signs: bool = False
    asked_with_its_cert: bool = False  # the requester's own certificate is of that key


@dataclass(frozen=True)
class RootRequest:
    """A self-signed root for a key the operator's ceremony has just made (init, a
    root rotation); `signer` is that key's label."""

    signer: str
    public_key: Any
    subject: x509.Name
    lifetime: dt.timedelta = ROOT_LIFETIME


@dataclass(frozen=True)
class CrossRequest:
    """The root `certified` certified by the root `issuer`, whose key is `signer` (a
    root rotation's NewWithOld and OldWithNew, RFC 4210 section 4.4)."""

    signer: str
    issuer: x509.Certificate
    certified: x509.Certificate


@dataclass(frozen=True)
class IntermediateRequest:
    """A new issuing CA certificate for a key the CA has just made: certified by the
    directory's root (a running CA's key rotation), or by the root `issuer` whose key is
    `signer` (a ceremony, whose root is not in the directory yet)."""

    public_key: Any
    common_name: str
    lifetime: dt.timedelta = INTERMEDIATE_LIFETIME
    signer: str | None = None
    issuer: x509.Certificate | None = None
    public_url: str | None = None  # [server] public-url: where its root's CRL is


@dataclass(frozen=True)
class LocalCertRequest:
    """A certificate the CA makes for itself: its TLS listener, the admin credential."""

    role: str  # server | admin
    public_key: Any
    names: tuple[str, ...]
    # A new one's lifetime; a renewal's (renewed_from set): the whole life of the one it
    # renews, notBefore to notAfter, which the renewal gets again (a year at most)
    lifetime: dt.timedelta
    renewed_from: str | None = None  # the one it renews (hex serial): its lineage


@dataclass(frozen=True)
class AcmeEABRequest:
    """An admin asks for an ACME external account binding key for these patterns."""

    names: object
    ttl: object = "24h"


@dataclass(frozen=True)
class ReplacedCert:
    """The certificate a newOrder says it replaces (RFC 9773 5), as the inventory has it."""

    cert_id: str  # its canonical CertID
    account_id: str | None  # the ACME account it was issued to; None: not through ACME
    names: tuple[str, ...]


@dataclass(frozen=True)
class AcmeOrderRequest:
    """newOrder: the identifiers as the client sent them (RFC 8555 7.4)."""

    identifiers: object
    dns01_available: bool = False  # a wildcard can be validated only over dns-01
    replaces: ReplacedCert | None = None


@dataclass(frozen=True)
class AcmeFinalizeRequest:
    """finalize: everything is decided again (Boulder's validateFinalizeRequest)."""

    order_id: str
    order_account: str
    order_status: str
    order_names: tuple[str, ...]
    authz_statuses: tuple[str, ...]
    csr: x509.CertificateSigningRequest


@dataclass(frozen=True)
class AcmeRevokeRequest:
    """revokeCert, signed by the account the certificate was issued to or by the
    certificate's own key."""

    serial: int
    reason: object = None
    found: bool = True
    revoked: bool = False
    revoked_reason: str | None = None
    owner_account: str | None = None  # the ACME account it was issued to, if any
    spki_sha256: str | None = None  # its subject key
    # The requesting account holds valid authorizations for every name it bears.
    authorized: bool = False


@dataclass(frozen=True)
class RevokedMeanwhile:
    """A certificate just recorded on the strength of `parent` (an X.509 renewal,
    `child`, or an SSH certificate, `ssh_serial`), whose parent turned out revoked once
    it was: a revocation that ran while the request was signed. Asked by the CA itself,
    after the recording, so that the revocation reaches what it raced (the revocation
    sweeps once more after its own commit: between them nothing escapes)."""

    parent: int
    parent_reason: str | None
    child: int | None = None
    ssh_serial: int | None = None


@dataclass(frozen=True)
class AcmeAdminRequest:
    """An admin's step on ACME's own records: withdraw an EAB key not yet bound, or
    deactivate an account. `state`: the record's state now (None if there is none)."""

    action: str  # withdraw-eab | deactivate-account
    target: str  # the kid, or the account id
    state: str | None


Request = (TokenRequest | EnrollRequest | EnrollAgainRequest | RenewRequest | SSHHostRequest
           | SSHUserRequest
           | RevokeRequest | RevokeIdentityRequest | SSHRevokeRequest | CRLRequest | OCSPRequest
           | LocalCertRequest | RevokedMeanwhile
           | KeyRequest | RootRequest | CrossRequest | IntermediateRequest | AcmeEABRequest
           | AcmeOrderRequest | AcmeFinalizeRequest | AcmeRevokeRequest | AcmeAdminRequest)


# ---- what the RA hands on -----------------------------------------------------------------------

@dataclass(frozen=True)
class TokenGrant:
    role: str
    names: tuple[tuple[str, str], ...]  # (kind, value)
    principals: tuple[str, ...]
    ttl_s: int
    actor: str


@dataclass(frozen=True)
class X509Order:
    issuer: str
    profile: str  # "leaf"
    role: str
    names: tuple[tuple[str, str], ...]
    principals: tuple[str, ...]
    subject: SubjectKey
    not_before: dt.datetime
    not_after: dt.datetime
    actor: str
    token_id: str | None = None
    renewed_from: str | None = None  # hex serial of the certificate renewed
    acme_account: str | None = None  # ACME: the account and order it is issued for
    acme_order: str | None = None
    # EKU clientAuth alone: a person's or operator's credential, no TLS server's
    # (policy.CLIENT_ONLY_ROLES); decided here, with the names, not where it is built
    client_only: bool = False


@dataclass(frozen=True)
class AcmeEABGrant:
    names: tuple[str, ...]  # patterns the bound account may order
    ttl_s: int
    actor: str
    # Patterns whose names the CA's lists refuse now (every order for them would be):
    # said to the admin, not refused, since the lists may change.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class AcmeOrderGrant:
    """A new ACME order for these DNS names ("*.x" for a wildcard)."""

    account_id: str
    names: tuple[str, ...]
    actor: str
    replaces: str | None = None  # the CertID of the certificate it replaces


@dataclass(frozen=True)
class SSHOrder:
    issuer: str
    cert_type: str  # user | host
    public_key: SSHPublicKey
    principals: tuple[str, ...]
    identity: str  # the key id is "<identity>:<serial>"
    valid_after: int
    valid_before: int
    extensions: tuple[str, ...]
    source_address: str | None
    owner_serial: str  # the X.509 certificate it is issued on the strength of
    actor: str


@dataclass(frozen=True)
class RevokeOrder:
    """Revoke `serial`; with `lineage`, every live certificate connected to it by
    renewals too; with `identity` (and no serial), everything live issued to that name
    and their lineages. SSH certificates issued on the strength of any of them go
    with them."""

    serial: int | None
    reason: str | None  # RFC 5280 name; None for unspecified
    actor: str
    lineage: bool = False
    identity: str | None = None
    follows: int | None = None  # the revoked certificate it was renewed from, if it raced


@dataclass(frozen=True)
class SSHRevokeOrder:
    serial: int | None
    key_id: str | None
    public_key: SSHPublicKey | None
    actor: str


@dataclass(frozen=True)
class CRLOrder:
    issuer: str
    this_update: dt.datetime
    next_update: dt.datetime
    actor: str


@dataclass(frozen=True)
class OCSPOrder:
    """Sign responses with `issuer`'s key, valid from `this_update` to `next_update`."""

    issuer: str
    this_update: dt.datetime
    next_update: dt.datetime
    actor: str


@dataclass(frozen=True)
class KeyOrder:
    action: str  # rotate | stage | promote (the staged key `label`) | retire | destroy |
    kind: str    # revoke (its CA certificate, by its root)
    label: str | None
    actor: str
    reason: str | None = None  # a revocation's RFC 5280 reason (None: unspecified)


@dataclass(frozen=True)
class CACertOrder:
    """A CA certificate, fully specified: the issuer builds exactly this."""

    kind: str  # root | cross | issuing
    signer: str  # the label of the key that signs
    public_key: Any
    subject: x509.Name
    issuer_name: x509.Name
    issuer_key_id: bytes  # the signer's key identifier, for the AKI
    path_length: int  # 1 for roots and their cross-certificates, 0 for issuing CAs
    not_before: dt.datetime
    not_after: dt.datetime
    actor: str
    crl_url: str | None = None  # an issuing CA's: its root's CRL (RFC 5280 4.2.1.13)


@dataclass(frozen=True)
class AcmeAdminOrder:
    action: str
    target: str
    actor: str


@dataclass(frozen=True)
class EnrollAgainOrder:
    """Send the certificate `serial` again; nothing is signed."""

    serial: int


Order = (TokenGrant | X509Order | EnrollAgainOrder | SSHOrder | RevokeOrder | SSHRevokeOrder
         | CRLOrder | OCSPOrder
         | KeyOrder
         | CACertOrder | AcmeEABGrant | AcmeOrderGrant | AcmeAdminOrder)


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    detail: str
    subproblems: tuple[tuple[str, Reason, str], ...] = ()  # see Refused
    operator_detail: str | None = None  # see Refused

    def raise_(self) -> Any:
        raise Refused(self.detail, self.reason, subproblems=self.subproblems,
                      operator_detail=self.operator_detail)


def decide(ctx: Context, who: Requester, request: Request) -> Order | Refusal:
    """The decision on one request (see the module docstring)."""
    handler = _HANDLERS.get(type(request))
    if handler is None:
        return Refusal(Reason.MALFORMED, f"no rule for a {type(request).__name__}")
    try:
        return handler(ctx, who, request)  # type: ignore[no-any-return]
    except Refused as r:
        return Refusal(r.reason, r.detail, r.subproblems, r.operator_detail)


def order(ctx: Context, who: Requester, request: Request) -> Any:
    """`decide`, raising the refusal (for callers that answer it as an error)."""
    result = decide(ctx, who, request)
    if isinstance(result, Refusal):
        result.raise_()
    return result


# ---- the rules ------------------------------------------------------------------------------

MAX_GRANT_CHARS = 16384


def _token(ctx: Context, who: Requester, req: TokenRequest) -> TokenGrant:
    _need_role(who, "admin")
    p = ctx.policy
    if req.role not in policy.ROLES:
        raise Refused(f"role must be one of {', '.join(policy.ROLES)}")
    role = str(req.role)
    raw_names = req.names
    if not isinstance(raw_names, list | tuple) or not raw_names or len(raw_names) > 100:
        raise Refused("names must be a list of 1 to 100 names")
    names = tuple(dict.fromkeys(policy.classify(n, p.allow_wildcards) for n in raw_names))
    for kind, value in names:  # new names: the stricter rule (policy.email says why)
        if kind == "email":
            policy.new_email(value)
    kinds = {k for k, _ in names}
    if role in ("service", "host") and "email" in kinds:
        raise Refused(f"a {role} certificate names DNS names, IP addresses or URIs, not e-mail")
    if role == "host" and "dns" not in kinds:
        raise Refused("a host needs at least one DNS name (its SSH principals)")
    if role == "user" and kinds != {"email"}:
        raise Refused("a user's names are e-mail addresses")
    if role in ("auditor", "admin") and (len(names) != 1 or kinds - {"dns", "email"}):
        raise Refused(f"an {role} has exactly one identity: a DNS name or an e-mail address")
    raw_principals = req.principals
    if not isinstance(raw_principals, list | tuple) or len(raw_principals) > 100:
        raise Refused("principals must be a list of at most 100 logins")
    if raw_principals and role != "user":
        raise Refused("principals are granted to role user only (a host's principals are its "
                      "DNS names)")
    principals = tuple(dict.fromkeys(policy.login(x) for x in raw_principals))
    if sum(len(v) for _, v in names) + sum(map(len, principals)) > MAX_GRANT_CHARS:
        # Its token.create line (and a certificate's intent) must fit an audit line.
        raise Refused(f"the names and principals of one token take at most "
                      f"{MAX_GRANT_CHARS} characters in all")
    ttl = policy.parse_ttl(req.ttl if req.ttl is not None else "1h", "ttl")
    if ttl > p.token_max_ttl_s:
        raise Refused(f"token ttl {policy.show_ttl(ttl)} exceeds the maximum "
                      f"{policy.show_ttl(p.token_max_ttl_s)} ([policy] token-max-ttl-s)",
                      Reason.LIFETIME)
    policy.check_allowed(names, p, role)
    return TokenGrant(role, names, principals, ttl, who.actor)


def _lifetime(ctx: Context, ttl: object) -> dt.timedelta:
    p = ctx.policy
    if ttl is None:
        return dt.timedelta(seconds=min(p.x509_default_ttl_s, p.x509_max_ttl_s))
    seconds = policy.parse_ttl(ttl)
    if seconds > p.x509_max_ttl_s:
        raise Refused(f"ttl {ttl} exceeds the maximum of {policy.show_ttl(p.x509_max_ttl_s)} "
                      "([policy] x509-max-ttl-s)", Reason.LIFETIME)
    return dt.timedelta(seconds=seconds)


def _x509(ctx: Context, who: Requester, *, role: str, names: tuple[tuple[str, str], ...],
          principals: tuple[str, ...], subject: SubjectKey, lifetime: dt.timedelta,
          token_id: str | None = None, check_names: bool = True,
          renewed_from: str | None = None) -> X509Order:
    if check_names:
        policy.check_allowed(names, ctx.policy, role)
    if ctx.key_compromised(subject.spki_sha256):
        # Re-enrolled with the same key (EST clients keep theirs), its thief would get a
        # new certificate for it: a stolen key must not outlive its revocation.
        # An ACME client that keeps its key sends it at every renewal (an ACME trial's
        # certbot --reuse-key): it is told the switch.
        acme = (" (certbot: renew with --no-reuse-key once, or drop reuse_key from its "
                "renewal file; lego: without --reuse-key)"
                if isinstance(who, AcmeAccountHolder) else "")
        raise Refused(f"this key (SPKI SHA-256 {subject.spki_sha256}) was reported "
                      "compromised: a certificate for it was revoked for keyCompromise. "
                      f"Make a new key and send a CSR for it{acme}", Reason.REVOKED_KEY)
    issuer = ctx.issuers.x509_issuer()
    not_after = min(ctx.now + lifetime, ctx.issuers.x509_not_after(issuer))
    return X509Order(issuer, "leaf", role, names, principals, subject, ctx.now - BACKDATE,
                     not_after, who.actor, token_id, renewed_from,
                     client_only=role in policy.CLIENT_ONLY_ROLES)


def _enroll(ctx: Context, who: Requester, req: EnrollRequest) -> X509Order:
    if not isinstance(who, TokenHolder):
        raise Refused("enrollment needs a bootstrap token", Reason.WRONG_ROLE)
    policy.check_csr(req.csr)
    asked = policy.csr_names(req.csr)
    if not asked:
        policy.common_names_within(req.csr, who.names)
    names = policy.names_within(asked, who.names, ctx.policy.allow_wildcards)
    return _x509(ctx, who, role=who.role, names=names, principals=who.principals,
                 subject=subject_key(req.csr.public_key()), lifetime=_lifetime(ctx, req.ttl),
                 token_id=who.token_id)


def _enroll_again(ctx: Context, who: Requester, req: EnrollAgainRequest) -> EnrollAgainOrder:
    """Only a certificate that was released (a row commits before its outcome, and one
    whose outcome never made it is revoked as never released: a review's first draft
    handed such a one out), still live, and only to its key's holder: a copied token
    gains nothing without the key."""
    if not isinstance(who, TokenHolder):
        raise Refused("sending an enrolled certificate again needs its bootstrap token",
                      Reason.WRONG_ROLE)
    # A retry is the same request: one the first answer would have refused is refused
    # (a docs trial got the certificate back for "ttl": "7 days", which is 400 at first).
    _lifetime(ctx, req.ttl)
    if not req.released:
        raise Refused("the certificate it enrolled is not known to have been released, so "
                      "it is not sent again", Reason.TOKEN_SPENT)
    if req.revoked or ended(req.not_after, ctx.now) or not req.issuer_in_use:
        raise Refused("the certificate it enrolled is no longer live", Reason.TOKEN_SPENT)
    try:
        valid = req.csr.is_signature_valid
    except PARSE_ERRORS:
        valid = False
    if not valid or spki_sha256(req.csr.public_key()) != req.spki_sha256:
        raise Refused("a retry with the key it enrolled would get that certificate; this "
                      "CSR's key is another", Reason.TOKEN_SPENT)
    return EnrollAgainOrder(req.serial)


def _renew(ctx: Context, who: Requester, req: RenewRequest) -> X509Order:
    if not isinstance(who, CertHolder) or who.role not in policy.ROLES:
        raise Refused("renewal needs a client certificate of a service, host, user, auditor "
                      "or admin", Reason.WRONG_ROLE)
    if who.acme_order is not None:
        # Its names were validated for an ACME account, which may since have been
        # deactivated or lost them; renewed here it would live on without either, at
        # any lifetime up to the maximum.
        raise Refused("this certificate was issued over ACME; renew it with your ACME "
                      "client (for example `certbot renew`), which validates its names "
                      "again", Reason.WRONG_ROLE)
    if req.csr is not None:
        policy.check_csr(req.csr)
        _same_names(req.csr, who.names)
        subject = subject_key(req.csr.public_key())
    else:
        subject = presented_subject_key(who.der)
    # Names come from the inventory record of the presented certificate: never widened,
    # and checked against the policy in force now (a wildcard too, once wildcards are
    # turned off).
    names = tuple(policy.classify(n, ctx.policy.allow_wildcards) for n in who.names)
    return _x509(ctx, who, role=who.role, names=names, principals=who.principals,
                 subject=subject, lifetime=_lifetime(ctx, req.ttl), renewed_from=who.serial)


def _same_names(csr: x509.CertificateSigningRequest, names: tuple[str, ...]) -> None:
    """A re-key's CSR asks for the certificate's own names or none (RFC 7030 4.2.2: the
    renewed certificate's SAN): one asking for others is refused rather than quietly
    given the old ones. Its subject is not read: a certificate's subject comes from its
    names here, as at enrollment."""
    asked = policy.csr_names(csr)
    if asked and {n.lower() for n in asked} != {n.lower() for n in names}:
        raise Refused(f"the CSR names {', '.join(asked)[:300]}, but a renewal keeps the "
                      f"certificate's names ({', '.join(names)[:300]}): leave names out of "
                      "the CSR, or enroll with a token for other names", Reason.BAD_CSR)


def _principals(asked: object, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if what == "logins":  # a pattern granted before they were refused is no login
        allowed = tuple(p for p in allowed if not policy.is_pattern(p))
    if asked is None:
        if not allowed:
            how = (" (its token had no --principal): ask an admin for a token that grants "
                   "them, and enroll again" if what == "logins" else "")
            raise Refused(f"no {what} were granted to this certificate{how}",
                          Reason.PRINCIPAL_NOT_GRANTED)
        return allowed
    if not isinstance(asked, list | tuple) or not asked or len(asked) > 100:
        raise Refused("principals must be a list of 1 to 100 strings")
    check = policy.login if what == "logins" else policy.principal
    out = tuple(dict.fromkeys(check(x) for x in asked))
    outside = [x for x in out if x not in allowed]
    if outside:
        raise Refused(f"principal(s) {', '.join(outside)} not granted; allowed: "
                      f"{', '.join(allowed) or 'none'}", Reason.PRINCIPAL_NOT_GRANTED)
    return out


def _ssh_key(ctx: Context, key: SSHPublicKey) -> None:
    if ctx.issuers.ssh_ca_key(key.line) is not None:
        # A certificate for the CA's own key (a security trial): no one can use it (SSH
        # asks no proof of possession), and its key revoked would be the CA's.
        raise Refused(f"the public key {key.sha256} is one of this CA's own SSH CA keys, "
                      "not a key of yours: give your own public key (e.g. ~/.ssh/"
                      "id_ed25519.pub)", Reason.BAD_KEY)
    if ctx.ssh_key_revoked(key.line):
        raise Refused(f"the public key {key.sha256} has been revoked; make a new key",
                      Reason.REVOKED_KEY)


def _valid_now(name: str) -> bool:
    """Whether a name of an earlier certificate is one the CA would issue now (an
    IPv4-mapped IPv6 address is not)."""
    try:
        policy.classify(name, True)
    except Refused:
        return False
    return True


# A security trial: OpenSSH (9.2) compares a host certificate's principals with the
# name the user typed, so a wildcard one matched no host at all; and a client that took
# it as a pattern would match names any depth below it (`*` crosses dots there), some of
# which the policy denies, where an X.509 wildcard covers one label.
_NO_WILDCARD = ("a wildcard is no SSH host principal (OpenSSH matches a host "
                "certificate's principals with the exact name the user typed)")


def _ssh_host(ctx: Context, who: Requester, req: SSHHostRequest) -> SSHOrder:
    _need_role(who, "host")
    assert isinstance(who, CertHolder)
    # Its DNS names and IP addresses: ssh checks a host certificate's principals against
    # the name or the address the user typed.
    kinds = {n: policy.lookup(n)[0] for n in who.names}
    names = tuple(n for n, kind in kinds.items()
                  if kind == "dns" or (kind == "ip" and _valid_now(n)))
    if req.principals is None:  # by default, its names but wildcards (_NO_WILDCARD)
        kept = tuple(n for n in names if not n.startswith("*."))
        if names and not kept:  # an SSH trial: "no host names were granted" named no cause
            raise Refused(f"this certificate's names ({', '.join(names)}) are wildcards: "
                          f"{_NO_WILDCARD}; enroll the host with its own names",
                          Reason.PRINCIPAL_NOT_GRANTED)
        names = kept
    principals = _principals(req.principals, names, "host names")
    for name in principals:
        if kinds[name] == "dns":
            if name.startswith("*."):  # before "wildcards are not enabled": no switch helps
                raise Refused(f"principal {name}: {_NO_WILDCARD}",
                              Reason.PRINCIPAL_NOT_GRANTED)
            policy.dns_name(name, ctx.policy.allow_wildcards)
    policy.check_allowed([(kinds[x], x) for x in principals], ctx.policy, "host")
    _ssh_key(ctx, req.public_key)
    now = int(ctx.now.timestamp())
    identity = next((n for n, kind in kinds.items() if kind == "dns"), principals[0])
    return SSHOrder(ctx.issuers.ssh_issuer("host"), "host", req.public_key, principals,
                    identity, now - 60, now + ctx.policy.ssh_host_ttl_s, (), None,
                    who.serial, who.actor)


def _ssh_user(ctx: Context, who: Requester, req: SSHUserRequest) -> SSHOrder:
    _need_role(who, "user")
    assert isinstance(who, CertHolder)
    p = ctx.policy
    policy.check_allowed([policy.classify(n, True) for n in who.names], p, "user")
    principals = _principals(req.principals, who.principals, "logins")
    ttl = p.ssh_user_default_ttl_s
    if req.ttl is not None:
        ttl = policy.parse_ttl(req.ttl)
        if ttl < SSH_USER_MIN_TTL_S:
            # An SSH trial's `--ttl 1s` ended before it reached the agent, which then
            # refused it, and it had replaced the user's working certificate meanwhile.
            # (bad-request: `lifetime-too-long` tells a client to shorten it: an API trial)
            raise Refused(f"ttl {req.ttl} is under a minute: such a certificate ends before "
                          "ssh can use it (give 1m or more)")
        if ttl > p.ssh_user_max_ttl_s:
            raise Refused(f"ttl {req.ttl} exceeds the maximum of "
                          f"{policy.show_ttl(p.ssh_user_max_ttl_s)} for user certificates "
                          "([policy] ssh-user-max-ttl-s)", Reason.LIFETIME)
    ttl = min(ttl, p.ssh_user_max_ttl_s)
    _ssh_key(ctx, req.public_key)
    now = int(ctx.now.timestamp())
    return SSHOrder(ctx.issuers.ssh_issuer("user"), "user", req.public_key, principals,
                    who.names[0], now - 60, now + ttl, p.ssh_user_extensions,
                    req.source_address, who.serial, who.actor)


def revocation_reason(value: object, offered: Collection[str] | None = None) -> str | None:
    """An RFC 5280 reason from its name (keyCompromise), snake case (key_compromise) or
    code (1); None for unspecified. A refusal names the reasons `offered` (all)."""
    names = ", ".join(r for r in REASON_CODES if offered is None or r in offered)
    if value is None:
        return None
    if isinstance(value, bool):
        raise Refused(f"reason must be a reason name or code, one of {names}")
    if isinstance(value, int):
        for name, code in REASON_CODES.items():
            if code == value:
                return None if name == "unspecified" else name
        if value == 8:  # RFC 5280's, but for delta CRLs only (an ACME trial)
            raise Refused("reason code 8 (removeFromCRL) is for delta CRLs, not a revocation: "
                          f"give one of {names}")
        raise Refused(f"reason code {value} is not an RFC 5280 revocation reason: give one "
                      f"of {names}")
    if isinstance(value, str):
        wanted = value.replace("_", "").lower()
        for name in REASON_CODES:
            if name.lower() == wanted:
                return None if name == "unspecified" else name
    raise Refused(f"reason {value!r} is not one of {names} (snake case and the numeric "
                  "codes work too)")


def _leaf_reason(value: object, offered: frozenset[str] = LEAF_REASONS) -> str | None:
    """The reason a leaf may be revoked for, for anyone (an admin too)."""
    # (its refusals name the reasons `offered` to the asker, not every RFC 5280 one: a
    # relying-party trial was offered three that were then refused)
    reason = revocation_reason(value, offered)
    if reason == "certificateHold":
        raise Refused("certificateHold is not offered: a revocation here is final",
                      Reason.REASON_NOT_ALLOWED)
    if (reason or "unspecified") not in LEAF_REASONS:
        # A relying party reads it as "the issuing CA's key leaked", which revoking a
        # leaf does not make true (a relying-party trial).
        raise Refused(f"{reason} is a reason for revoking a CA's certificate, not a leaf "
                      "(CA/B Baseline Requirements 7.2.2): give keyCompromise if this "
                      "certificate's own key leaked; for an issuing key feared compromised, "
                      "`hsmca key rotate issuing`, retire the old key, and revoke its CA "
                      "certificate with `hsmca key revoke` (docs/keys.md)",
                      Reason.REASON_NOT_ALLOWED)
    return reason


def _revoke(ctx: Context, who: Requester, req: RevokeRequest) -> RevokeOrder:
    admin = isinstance(who, Local) or (isinstance(who, CertHolder) and who.role == "admin")
    reason = _leaf_reason(req.reason, LEAF_REASONS if admin else HOLDER_REASONS)
    if not admin:
        if not isinstance(who, CertHolder) or req.serial != int(who.serial, 16):
            raise Refused("only an admin may revoke another certificate; you may revoke your "
                          "own", Reason.WRONG_ROLE)
        if (reason or "unspecified") not in HOLDER_REASONS:
            raise Refused(f"a certificate's holder may give the reasons "
                          f"{', '.join(sorted(HOLDER_REASONS))}; {reason} is for an admin",
                          Reason.REASON_NOT_ALLOWED)
    if req.given and req.found and not req.matches:
        raise Refused(f"the inventory's certificate with serial {req.serial:x} is another "
                      "one than the one given", Reason.CONFLICT)
    if req.given and not req.found:
        if not admin:
            raise Refused("only an admin may revoke a certificate the inventory does not "
                          "know", Reason.WRONG_ROLE)
        if not req.proven:
            raise Refused("the certificate is not signed by any issuing key this CA uses "
                          "(another CA's, or one of a retired key)", Reason.NOT_FOUND)
        return RevokeOrder(req.serial, reason, who.actor, lineage=reason == "keyCompromise")
    if not req.found:
        # Not "was not issued by this CA": a CA restored from an older backup issued it
        # and does not know it (an operator trial was told that of its own certificate).
        raise Refused(f"this CA's inventory has no certificate with serial {req.serial:x} "
                      "(hex). A certificate issued after the backup this CA was restored "
                      "from is revoked by giving the certificate itself (`hsmca revoke "
                      "--cert-file FILE`); an SSH certificate's serial, which ssh-keygen -L "
                      "shows in decimal, with `hsmca ssh revoke --serial`", Reason.NOT_FOUND)
    if req.revoked:
        _revoked_again(req.serial, req.revoked_reason, reason, Reason.ALREADY_REVOKED)
    # A compromised key compromises what was renewed from it and what it renewed: a
    # renewal with a new key proves only that the old key was held.
    return RevokeOrder(req.serial, reason, who.actor, lineage=reason == "keyCompromise")


def _revoked_again(serial: int, was: str | None, reason: str | None, why: Reason) -> None:
    """A revoked certificate is revoked again only to make its reason keyCompromise (RFC
    5280 5.3.1; the CA/B Baseline Requirements allow it too): a key found leaked after
    its certificate was revoked as superseded must still be barred, and its lineage
    revoked. Anything else changes nothing, and is said so."""
    if reason == "keyCompromise" and was != "keyCompromise":
        return
    raise Refused(f"certificate {serial:x} is already revoked ({was or 'unspecified'})"
                  + ("" if was == "keyCompromise" else "; only keyCompromise may be given "
                     "again, to bar its key and revoke its lineage"), why)


def _revoke_identity(ctx: Context, who: Requester, req: RevokeIdentityRequest) -> RevokeOrder:
    if not (isinstance(who, Local) or (isinstance(who, CertHolder) and who.role == "admin")):
        raise Refused("only an admin may revoke everything issued to a name", Reason.WRONG_ROLE)
    reason = _leaf_reason(req.reason)
    _kind, name = policy.lookup(req.name)
    return RevokeOrder(None, reason, who.actor, lineage=True, identity=name)


def _ssh_revoke(ctx: Context, who: Requester, req: SSHRevokeRequest) -> SSHRevokeOrder:
    if not (isinstance(who, Local) or (isinstance(who, CertHolder) and who.role == "admin")):
        raise Refused("only an admin may revoke SSH certificates; a holder revokes the X.509 "
                      "certificate they were issued on, and they go with it", Reason.WRONG_ROLE)
    if req.ca_key is not None:
        # A security trial listed the user CA's own key: every user certificate, those
        # signed after it too, was then refused by every sshd reading the KRL, and
        # nothing could take it back out.
        label, cert_type, state = req.ca_key
        # As it is: a staged key signed nothing yet (an SSH trial was told it "signed
        # certificates still in use")
        role = {"active": f"which signs every new {cert_type} certificate",
                "next": f"staged to sign {cert_type} certificates from the next rotation "
                        "(hosts and clients trust it already)"}.get(
            state, f"which signed {cert_type} certificates still in use")
        how = (f"rotate it (`hsmca key rotate ssh-{cert_type}`), then retire it"
               if state == "active" else "retire it first")
        raise Refused(f"that is this CA's own SSH {cert_type} CA key {label!r}, {role}: in "
                      "the KRL it would revoke every certificate it ever signed, new ones "
                      f"included. To stop trusting it, {how} (`hsmca key retire {label}`, "
                      "docs/keys.md); a retired CA key can be revoked here",
                      Reason.CONFLICT)
    if req.matching == 0 and req.public_key is None:
        what = f"serial {req.serial}" if req.serial is not None else f"key id {req.key_id!r}"
        if req.revoked:  # a retry, say: told apart from a typo (an API client's trial)
            raise Refused(f"the SSH certificate with {what} is already revoked",
                          Reason.ALREADY_REVOKED)
        hint = ""
        if req.key_id is not None and ":" not in req.key_id:
            # A key id is <identity>:<serial>: the bare identity matched nothing (an SSH
            # trial, from the help's own example, took it for "has none")
            hint = (f"; a key id is <identity>:<serial>: `hsmca ssh list --search "
                    f"{req.key_id}` lists that identity's, and `hsmca revoke --identity "
                    f"{req.key_id}` revokes everything issued to it")
        # "Was issued by this CA" was false for one issued after the backup the CA was
        # restored from (a restore trial): its key still revokes it, in the KRL.
        raise Refused(f"no SSH certificate with {what} is in this CA's inventory{hint}; "
                      "one it issued after the backup it was restored from (or another "
                      "CA's) is revoked by its public key (`hsmca ssh revoke --pubkey FILE`, "
                      "the API's {\"public_key\"}), which the KRL then lists",
                      Reason.NOT_FOUND)
    return SSHRevokeOrder(req.serial, req.key_id, req.public_key, who.actor)


def _revoked_meanwhile(ctx: Context, who: Requester,
                       req: RevokedMeanwhile) -> RevokeOrder | SSHRevokeOrder:
    if not isinstance(who, Local):
        raise Refused("only the CA itself carries a revocation over to what raced it",
                      Reason.WRONG_ROLE)
    if req.ssh_serial is not None:  # every revocation reaches the SSH certificates
        return SSHRevokeOrder(req.ssh_serial, None, None, who.actor)
    assert req.child is not None
    # The child inherits the revocation whatever its reason: it was recorded after its
    # parent stopped being good, so nothing vouches for it. keyCompromise takes what
    # was renewed from it too, as for any revocation for that reason.
    return RevokeOrder(req.child, req.parent_reason, who.actor,
                       lineage=req.parent_reason == "keyCompromise", follows=req.parent)


def _crl(ctx: Context, who: Requester, req: CRLRequest) -> CRLOrder:
    if not isinstance(who, Local):
        raise Refused("CRLs are signed by the CA itself", Reason.WRONG_ROLE)
    issuer = req.issuer or ctx.issuers.x509_issuer()
    # An issuing CA that still signs, for what it issued; or a root (the previous one
    # too, while it hands over), for the CA certificates it issued (an empty list:
    # issuing CAs end by retiring).
    if issuer not in ctx.issuers.crl_labels():
        raise Refused(f"no CRL of an issuer {issuer!r}: it signs nothing now",
                      Reason.NOT_FOUND)
    # Backdated as certificates are: a CRL signed at a revocation and fetched at once by a
    # relying party whose clock is a second behind was "not yet valid" to OpenSSL, which
    # allows CRLs no skew, so every certificate it checked failed (a relying-party
    # trial). (At least this: the time its number is taken sets it, so that one numbered
    # later is never older, ca/revocation.)
    return CRLOrder(issuer, ctx.now - BACKDATE, ctx.now + CRL_VALIDITY, who.actor)


def _ocsp(ctx: Context, who: Requester, req: OCSPRequest) -> OCSPOrder:
    if not isinstance(who, Local):
        raise Refused("OCSP responses are signed by the CA itself, ahead of time",
                      Reason.WRONG_ROLE)
    issuer = ctx.issuers.x509_signs_for(req.issuer)
    if issuer is None:
        # A retired key signs nothing: its certificates' last responses age out.
        raise Refused(f"the issuer {req.issuer!r} is retired and signs no OCSP responses",
                      Reason.NOT_FOUND)
    # Backdated as certificates and CRLs are (clients allow OCSP a few minutes' skew,
    # but not all of them).
    return OCSPOrder(issuer, ctx.now - BACKDATE, ctx.now + OCSP_VALIDITY, who.actor)


def _local_cert(ctx: Context, who: Requester, req: LocalCertRequest) -> X509Order:
    if not isinstance(who, Local):
        raise Refused("only the CA itself makes its own certificates", Reason.WRONG_ROLE)
    names = tuple(policy.classify(n, True) for n in req.names)
    lifetime = req.lifetime
    if req.renewed_from is not None:
        # As long as the one it renews was made for (its notBefore was backdated), a year
        # at most: the admin credential `init` made is renewed so (ca/own_certs.py).
        lifetime = max(dt.timedelta(seconds=1), min(lifetime - BACKDATE, LOCAL_RENEWAL_MAX))
    # The CA's own names: not subject to the lists that govern what others may get.
    return _x509(ctx, who, role=req.role, names=names, principals=(),
                 subject=subject_key(req.public_key), lifetime=lifetime,
                 check_names=False, renewed_from=req.renewed_from)


LOCAL_RENEWAL_MAX = dt.timedelta(days=365)  # as `hsmca init` makes the admin credential


ROTATABLE = ("issuing", "ssh-user", "ssh-host", "audit")
STAGED = ("ssh-user", "ssh-host")  # kinds whose new key may be published before it signs
CEREMONY_LOG = "init"  # ca.audit.cluster.CEREMONIES: the decisions load no audit code
SINGLE_LOG = ""  # the one log of a CA on SQLite, as KeyRequest.not_handed_over names it


def _rotate_root(ctx: Context, who: Requester) -> KeyOrder:
    """Only the offline ceremony rotates the root, and one rotation at a time: a second
    one while the previous root is still trusted would chain every new certificate to a
    root no relying party has yet (a key lifecycle trial rotated twice, by mistake and
    after a ceremony cut short, and cut off every client that trusted the original)."""
    if not isinstance(who, Local):
        raise Refused("the root is rotated offline, with the daemon stopped: a new root "
                      "and its cross-certificates are a ceremony (hsmca key rotate-root "
                      "--config FILE; docs/keys.md)", Reason.MALFORMED)
    previous = ctx.issuers.previous_root
    if previous is not None:
        raise Refused(
            f"the previous root {previous!r} is still in its hand-over: one root rotation "
            "at a time (docs/keys.md). Once every relying party trusts the current root "
            f"(x509/root.pem), `hsmca key retire {previous}`, then rotate again. (A "
            "rotation cut short? Its new root is already the current one: `hsmca serve` "
            "serves its chain.)", Reason.CONFLICT)
    return KeyOrder("rotate", "root", None, who.actor)


def _key(ctx: Context, who: Requester, req: KeyRequest) -> KeyOrder:
    if not (isinstance(who, Local) or (isinstance(who, CertHolder) and who.role == "admin")):
        raise Refused("only an admin manages the CA's keys", Reason.WRONG_ROLE)
    if req.action == "rotate":
        if req.kind == "root":
            return _rotate_root(ctx, who)
        if req.kind not in ROTATABLE:
            raise Refused(f"rotate one of {', '.join(ROTATABLE)}, not {req.kind!r}")
        if req.kind == "audit" and ctx.issuers.audit_previous:
            # Every audit key still in use signs each checkpoint; a third would make the
            # closing lines of a log more than an auditor's verify allows, and a chain
            # of hand-overs no one can follow at a glance.
            previous = ctx.issuers.audit_previous[0].label
            raise Refused(f"the previous audit key {previous!r} still signs checkpoints: "
                          f"retire it first (hsmca key retire {previous}), then rotate again",
                          Reason.CONFLICT)
        if req.stage:
            if req.kind not in STAGED:
                raise Refused(f"only SSH CA keys ({', '.join(STAGED)}) are staged: hosts and "
                              "clients must trust one before it signs; an issuing key's "
                              "chain travels with each certificate (/v1/x509/bundle has the "
                              "new one from its rotation)")
            if req.staged is not None:
                raise Refused(f"{req.staged!r} is staged already: `hsmca key rotate "
                              f"{req.kind}` puts it in use, `hsmca key retire {req.staged}` "
                              "drops it", Reason.CONFLICT)
            return KeyOrder("stage", req.kind, None, who.actor)
        if req.staged is not None:
            return KeyOrder("promote", req.kind, req.staged, who.actor)
        return KeyOrder("rotate", req.kind, None, who.actor)
    if req.state is None:
        raise Refused(f"the CA has no key labelled {req.label!r} (`hsmca key list` lists "
                      "the labels)", Reason.NOT_FOUND)
    if req.action == "retire":
        if req.state == "active":
            how = ("hsmca key rotate-root, on the CA host" if req.kind == "root"
                   else f"hsmca key rotate {req.kind}")
            raise Refused(f"{req.label!r} is the active {req.kind} key: rotate first ({how}), "
                          "then retire the previous one", Reason.CONFLICT)
        if req.state not in ("previous", "next"):  # a staged key may be dropped unused
            raise Refused(f"{req.label!r} is {req.state} already", Reason.CONFLICT)
        if req.not_handed_over == (SINGLE_LOG,):  # one node: its next checkpoint
            raise Refused(f"{req.label!r} still signs the audit log's latest checkpoint, "
                          "which the active audit key has not signed yet: retired now, the "
                          "log would verify with neither key. Its next checkpoint hands "
                          "over (at the next issuance, or within [audit] heartbeat-s): try "
                          "again then", Reason.CONFLICT)
        if req.not_handed_over:  # retired now, those logs would verify with neither key
            # What to do for each kind of log it names: a cluster trial was left with a
            # removed node's name and no way on.
            hows = []
            if set(req.not_handed_over) - {CEREMONY_LOG}:
                hows.append("a node hands over at its next checkpoint: start it, or wait for "
                            "its heartbeat; a node removed for good, start a node of its name "
                            "once, anywhere (its log comes back from PostgreSQL)")
            if CEREMONY_LOG in req.not_handed_over:
                hows.append("the init log hands over at the root's next rotation, `hsmca key "
                            "rotate-root`")
            how = f" ({'; '.join(hows)})"
            raise Refused(f"{req.label!r} still signs the latest checkpoint of log(s) "
                          f"{', '.join(req.not_handed_over)}, which the active audit key has "
                          f"not signed yet: retired now, they would verify with neither "
                          f"key{how}", Reason.CONFLICT)
        if req.confirmed is False:
            # The CLI looked, found nothing it could retire, so asked nothing; the key
            # became retirable since (another admin's rotation): never retired unasked
            # (a review).
            raise Refused(f"{req.label!r} is {req.state} now, but was not when you were "
                          "asked: retiring it cannot be undone, so it is not retired unasked; "
                          "ask again (`hsmca key retire`, or \"confirm\": true)",
                          Reason.CONFLICT)
        return KeyOrder("retire", req.kind, req.label, who.actor)
    if req.action == "destroy":
        if req.state == "destroyed":  # as retire says "retired already" (a key trial)
            raise Refused(f"{req.label!r} is destroyed already", Reason.CONFLICT)
        if req.state != "retired":
            rotate = "hsmca key rotate-root" if req.kind == "root" else \
                f"hsmca key rotate {req.kind}"
            first = (f": retire it first (hsmca key retire {req.label})"
                     if req.state in ("previous", "next") else
                     f": rotate first ({rotate}), then retire and destroy the key it "
                     "replaces" if req.state == "active" else "")
            raise Refused(f"only a retired key is destroyed; {req.label!r} is {req.state}"
                          f"{first}", Reason.CONFLICT)
        if not req.confirmed:
            raise Refused("destroying a key cannot be undone: confirm it (--yes, or "
                          "\"confirm\": true)")
        return KeyOrder("destroy", req.kind, req.label, who.actor)
    if req.action == "revoke":
        return _revoke_ca(who, req)
    raise Refused(f"no key action {req.action!r}")


# What a CA certificate may be revoked for (RFC 5280 5.3.1): keyCompromise is a leaf's,
# cACompromise the CA's own key's.
CA_REASONS = frozenset({"unspecified", "cACompromise", "affiliationChanged", "superseded",
                        "cessationOfOperation"})


def _revoke_ca(who: Requester, req: KeyRequest) -> KeyOrder:
    """An issuing key's CA certificate, revoked by the root that certified it: relying
    parties that check the root's CRL refuse everything the key issued, as after a
    compromise of the key (a relying-party trial found no way to say so: retiring only
    stops hsmca's own use). Only a retired key's, so that the CA has stopped using it."""
    if req.kind != "issuing":
        why = {"root": "a root is not revoked: relying parties stop trusting it (take it "
                       "out of their trust stores); rotate it with `hsmca key rotate-root`",
               "ssh-user": "an SSH CA key has no certificate to revoke: retire it, and hosts "
                           "that refresh their trusted keys from /v1/ssh/ca stop trusting it",
               "ssh-host": "an SSH CA key has no certificate to revoke: retire it, and "
                           "clients that refresh known_hosts stop trusting it",
               "audit": "the audit key has no certificate to revoke: rotate it"}
        raise Refused(f"only an issuing key's CA certificate is revoked; {req.label!r}: "
                      f"{why.get(req.kind, 'not an issuing key')}", Reason.CONFLICT)
    try:
        reason = revocation_reason(req.reason)
    except Refused:  # named among a CA certificate's, not a leaf's (a docs trial)
        raise Refused(f"reason {req.reason!r}: a CA certificate is revoked as one of "
                      f"{', '.join(sorted(CA_REASONS))}") from None
    if (reason or "unspecified") not in CA_REASONS:
        hint = " (for the CA's key: cACompromise)" if reason == "keyCompromise" else ""
        raise Refused(f"a CA certificate is revoked as one of "
                      f"{', '.join(sorted(CA_REASONS))}, not {reason}{hint}",
                      Reason.REASON_NOT_ALLOWED)
    if req.revoked:
        raise Refused(f"the CA certificate of {req.label!r} is revoked already",
                      Reason.ALREADY_REVOKED)
    if req.state not in ("retired", "destroyed"):
        first = ("rotate first (hsmca key rotate issuing), then " if req.state == "active"
                 else "")
        raise Refused(f"{req.label!r} is {req.state}: {first}retire it (hsmca key retire "
                      f"{req.label}) so that nothing signs with it, then revoke its CA "
                      "certificate", Reason.CONFLICT)
    if req.asked_with_its_cert:
        # An admin cut off from the CA by their own revocation (a first test did it to
        # itself with init's admin credential, which every later command uses).
        raise Refused(f"the certificate you ask with was issued by {req.label!r}: once its "
                      "CA certificate is revoked, it authenticates no more. Renew it first "
                      "(hsmca renew --cert CERT --key KEY), which moves it to the active "
                      "key, or ask with a node's own admin credential (--config), which its "
                      "daemon renews at once", Reason.CONFLICT)
    if not req.root_signs:
        raise Refused(f"the root that certified {req.label!r} is retired and signs no CRL: "
                      "relying parties that still trust it must take it out of their trust "
                      "stores", Reason.CONFLICT)
    if not req.confirmed:
        raise Refused("revoking a CA certificate cannot be undone, and every certificate "
                      "it issued is refused where the root's CRL is checked: confirm it "
                      "(--yes, or \"confirm\": true)")
    return KeyOrder("revoke", req.kind, req.label, who.actor, reason)


def _ceremony(who: Requester, what: str) -> None:
    if not isinstance(who, Local):
        raise Refused(f"only the CA itself makes {what}: the operator's ceremony on the CA "
                      "host (hsmca init, hsmca key rotate-root) or its key rotation",
                      Reason.WRONG_ROLE)


def _key_id(public_key: Any) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def _root_ca(ctx: Context, issuer: x509.Certificate, what: str) -> bytes:
    """The key identifier of `issuer`, a root that may still certify: a CA certificate
    that names itself and has not expired."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound as exc:
        raise Refused(f"{what}: the issuer's certificate has no {exc.oid._name}") from None
    if not bc.ca or issuer.subject != issuer.issuer:
        raise Refused(f"{what}: the issuer {issuer.subject.rfc4514_string()} is not a root CA")
    if issuer.not_valid_after_utc <= ctx.now:
        raise Refused(f"{what}: the root {issuer.subject.rfc4514_string()} expired at "
                      f"{issuer.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", Reason.CONFLICT)
    return ski.digest


def _root(ctx: Context, who: Requester, req: RootRequest) -> CACertOrder:
    _ceremony(who, "root certificates")
    if not req.subject.rdns:
        raise Refused("a root needs a subject name")
    if not dt.timedelta(days=1) <= req.lifetime <= ROOT_LIFETIME:
        raise Refused(f"a root lives from a day to {ROOT_LIFETIME.days} days, not "
                      f"{req.lifetime.days}")
    return CACertOrder("root", req.signer, req.public_key, req.subject, req.subject,
                       _key_id(req.public_key), 1, ctx.now - BACKDATE,
                       ctx.now + req.lifetime, who.actor)


def _cross(ctx: Context, who: Requester, req: CrossRequest) -> CACertOrder:
    _ceremony(who, "cross-certificates")
    key_id = _root_ca(ctx, req.issuer, "cross-certificate")
    if req.certified.subject != req.issuer.subject:
        # Self-issued (the same name) or it would count against the roots' path length.
        raise Refused("a cross-certificate joins two roots of the same name: "
                      f"{req.certified.subject.rfc4514_string()} is not "
                      f"{req.issuer.subject.rfc4514_string()}")
    if _key_id(req.certified.public_key()) == key_id:
        raise Refused("a cross-certificate joins two different root keys")
    # Neither root's relying parties get a path that outlives what they trust.
    not_after = min(req.certified.not_valid_after_utc, req.issuer.not_valid_after_utc)
    return CACertOrder("cross", req.signer, req.certified.public_key(), req.issuer.subject,
                       req.issuer.subject, key_id, 1, ctx.now - BACKDATE, not_after,
                       who.actor)


def _intermediate(ctx: Context, who: Requester, req: IntermediateRequest) -> CACertOrder:
    _ceremony(who, "issuing CA certificates")
    if (req.issuer is None) != (req.signer is None):
        raise Refused("name both the root's certificate and its key, or neither")
    if req.issuer is None or req.signer is None:
        signer, issuer = ctx.issuers.root_issuer(), ctx.issuers.root
    else:
        signer, issuer = req.signer, req.issuer
    key_id = _root_ca(ctx, issuer, "issuing CA")
    if _key_id(req.public_key) == key_id:
        raise Refused("an issuing CA needs a key of its own, not the root's")
    if not dt.timedelta(days=1) <= req.lifetime <= INTERMEDIATE_LIFETIME:
        raise Refused(f"an issuing CA lives from a day to {INTERMEDIATE_LIFETIME.days} days, "
                      f"not {req.lifetime.days}")
    if not req.common_name:
        raise Refused("an issuing CA needs a common name")
    not_after = min(ctx.now + req.lifetime, issuer.not_valid_after_utc)
    # Where its root's CRL is, for relying parties that fetch what a chain names (Java,
    # Windows, .NET, openssl -crl_download): without it they could not check the issuing
    # CA, and failed or passed over it (a relying-party trial).
    crl_url = f"{req.public_url}/v1/x509/crl/{signer}" if req.public_url else None
    return CACertOrder("issuing", signer, req.public_key,
                       x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                     req.common_name)]),
                       issuer.subject, key_id, 0, ctx.now - BACKDATE, not_after, who.actor,
                       crl_url)


def _need_role(who: Requester, role: str) -> None:
    have = who.role if isinstance(who, CertHolder) else (
        "local" if isinstance(who, Local) else "bootstrap token")
    if not isinstance(who, CertHolder) or who.role != role:
        raise Refused(f"this needs a client certificate of role {role}; yours is {have}",
                      Reason.WRONG_ROLE)


# A renewal that keeps its key shows the same certificate again only within one
# request's checks; a small bound (each entry holds a certificate's DER: a soak trial
# saw 4,096 of them among what grew a worker by 4 KB a certificate).
@functools.lru_cache(maxsize=256)
def presented_subject_key(der: bytes) -> SubjectKey:
    """The key of a presented client certificate (a renewal that keeps its key). An
    Ed25519 one is checked again: a key of small order certified before the CA refused
    them would otherwise renew for good, a credential of whoever holds a copy of the
    certificate (a review). The other kinds were checked when first certified."""
    key = x509.load_der_x509_certificate(der).public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        policy.check_ed25519(key)
    return subject_key(key)


# ---- ACME (RFC 8555) -------------------------------------------------------------------------

ACME_MAX_IDENTIFIERS = 100
ACME_EAB_MAX_TTL_S = 30 * 24 * 3600


def _eab_pattern(p: object) -> str:
    """An EAB name pattern: a DNS name, or "*.name" for every name below it."""
    if not isinstance(p, str):
        raise Refused("every name pattern must be a string", Reason.BAD_NAME)
    if policy.lookup_kind(p) == "ip":  # dns_name would say "give an IP as an IP"
        raise Refused(f"{p[:60]!r} is an IP address, which this CA does not issue over ACME "
                      "(only DNS names): give DNS name patterns, or enroll the address "
                      "with a bootstrap token (hsmca token create)", Reason.BAD_NAME)
    return policy.dns_name(p, allow_wildcards=True)


def _acme_eab(ctx: Context, who: Requester, req: AcmeEABRequest) -> AcmeEABGrant:
    _need_role(who, "admin")
    if not isinstance(req.names, list | tuple) or not req.names or len(req.names) > 100:
        raise Refused("names must be a list of 1 to 100 DNS name patterns")
    names = tuple(dict.fromkeys(_eab_pattern(p) for p in req.names))
    ttl = policy.parse_ttl(req.ttl if req.ttl is not None else "24h", "ttl")
    if ttl > ACME_EAB_MAX_TTL_S:
        raise Refused(f"an EAB key lives at most {ACME_EAB_MAX_TTL_S // 86400}d, not "
                      f"{req.ttl}", Reason.LIFETIME)
    warnings = []
    for pattern in names:
        # A name the pattern covers: the exact name, or one label below a wildcard's.
        example = "name" + pattern[1:] if pattern.startswith("*.") else pattern
        try:
            _not_loopback(example)
            policy.check_allowed([("dns", example)], ctx.policy, "service")
        except Refused as exc:
            warnings.append(f"{pattern}: names like {example} are refused by the CA's "
                            f"policy now ({exc.detail}); orders for them will fail")
    return AcmeEABGrant(names, ttl, who.actor, tuple(warnings))


def _acme_admin(ctx: Context, who: Requester, req: AcmeAdminRequest) -> AcmeAdminOrder:
    _need_role(who, "admin")
    assert isinstance(who, CertHolder)
    what = {"withdraw-eab": "EAB key", "deactivate-account": "ACME account"}.get(req.action)
    if what is None:
        raise Refused(f"unknown ACME step {req.action!r}")
    if req.state is None:
        raise Refused(f"no {what} {req.target[:80]!r}", Reason.NOT_FOUND)
    if req.action == "withdraw-eab" and req.state != "unused":
        why = {"withdrawn": "withdrawn already",
               "expired": "expired: it can bind no account, and there is nothing to withdraw",
               }.get(req.state, f"{req.state}: only one not yet bound can be withdrawn "
                                "(deactivate the account it bound instead)")
        raise Refused(f"the EAB key {req.target!r} is {why}", Reason.CONFLICT)
    if req.action == "deactivate-account" and req.state != "valid":
        raise Refused(f"the ACME account {req.target!r} is {req.state} already",
                      Reason.CONFLICT)
    return AcmeAdminOrder(req.action, req.target, who.actor)


def _acme_names(ctx: Context, who: AcmeAccountHolder, names: list[str]) -> None:
    """The names are inside the account's EAB patterns and the CA's lists, now."""
    if who.eab_bound:
        # A wildcard *.X covers the names one label below X, so it is granted by the
        # patterns that grant all of those (*.X or *.Y with X under Y), not by X itself:
        # *.svc.example grants *.svc.example (an ACME trial found it refused, and the
        # refusal naming the very pattern).
        outside = [n for n in names if not policy.matches_any(n, who.names)]
        if outside:
            raise Refused(f"name {outside[0]!r} is outside the names this ACME account may "
                          f"order ({', '.join(who.names)})", Reason.NAME_NOT_GRANTED)
    # An account holder is not the fleet: it learns that the CA refuses a name, not
    # the CA's lists (an account without EAB is anyone who can reach the directory).
    policy.check_allowed([("dns", n) for n in names], ctx.policy, "service", reveal=False)


def _not_loopback(name: str) -> None:
    """No ACME certificate for localhost or a name under it: its validation reaches the
    CA's own host, where the daemon's HTTPS certificate bears that name (an ACME trial
    got one, which every client of a CA at https://localhost would have taken for it;
    the fleet's own `localhost` hosts enroll with a token, docs/operator.md)."""
    bare = name.removeprefix("*.")
    if bare == "localhost" or bare.endswith(".localhost"):
        raise Refused(f"name {name!r} is a loopback name: its validation would reach the "
                      "CA's own host, so no ACME certificate is issued for it",
                      Reason.NAME_RESERVED)


def _acme_account(who: Requester) -> AcmeAccountHolder:
    if not isinstance(who, AcmeAccountHolder):
        raise Refused("this needs an ACME account", Reason.WRONG_ROLE)
    if who.status != "valid":
        raise Refused(f"the ACME account is {who.status}", Reason.WRONG_ROLE)
    return who


def _acme_identifier(ctx: Context, account: AcmeAccountHolder, req: AcmeOrderRequest,
                     ident: dict[str, Any]) -> str:
    """One identifier of a new order: the DNS name to order, or why it is refused."""
    if ident.get("type") != "dns":
        hint = (": for an IP address, enroll with a bootstrap token (hsmca enroll)"
                if ident.get("type") == "ip" else "")
        raise Refused(f"identifier type {str(ident.get('type'))[:20]!r} is not supported "
                      f"(only dns){hint}", Reason.UNSUPPORTED_IDENTIFIER)
    if policy.lookup_kind(ident["value"]) == "ip":  # not "give an IP as an IP": no way
        raise Refused(f"{ident['value'][:60]!r} is an IP address, which this CA does not "
                      "issue over ACME (only dns identifiers): order a DNS name, or "
                      "enroll with a bootstrap token (hsmca enroll)",
                      Reason.UNSUPPORTED_IDENTIFIER)
    name = policy.dns_name(_acme_case(ident["value"]), ctx.policy.allow_wildcards)
    _not_loopback(name)
    if name.startswith("*.") and not req.dns01_available:
        raise Refused(f"wildcard name {name!r} needs dns-01 validation, which needs "
                      "[acme] resolver", Reason.BAD_NAME)
    _acme_names(ctx, account, [name])
    return name


def _acme_order(ctx: Context, who: Requester, req: AcmeOrderRequest) -> AcmeOrderGrant:
    account = _acme_account(who)
    raw = req.identifiers
    if not isinstance(raw, list | tuple) or not raw or len(raw) > ACME_MAX_IDENTIFIERS:
        raise Refused(f"identifiers must be a list of 1 to {ACME_MAX_IDENTIFIERS} "
                      "identifiers")
    names: list[str] = []
    refused: list[tuple[str, Refused]] = []
    for ident in raw:
        if not isinstance(ident, dict) or set(ident) - {"type", "value"} \
                or not isinstance(ident.get("value"), str):
            raise Refused('each identifier is {"type": "dns", "value": NAME}')
        try:
            names.append(_acme_identifier(ctx, account, req, ident))
        except Refused as exc:
            refused.append((f"{ident.get('type')}:{ident['value']}", exc))
    if len(refused) == 1:
        raise refused[0][1]
    if refused:
        # Every identifier's reason at once (RFC 8555 6.7.1 subproblems), not the first
        # only: an ACME trial fixed its names one request at a time.
        raise Refused(f"{len(refused)} identifiers are refused: "
                      + "; ".join(exc.detail for _, exc in refused), refused[0][1].reason,
                      subproblems=tuple((name, exc.reason, exc.detail)
                                        for name, exc in refused),
                      operator_detail="; ".join(exc.operator_detail for _, exc in refused
                                                if exc.operator_detail) or None)
    unique = list(dict.fromkeys(names))
    old = req.replaces
    if old is not None:  # RFC 9773 5: the account's own certificate, for a name it had
        if old.account_id != account.account_id:
            raise Refused("replaces names a certificate not issued to this account",
                          Reason.UNAUTHORIZED)
        if not {n.lower() for n in old.names} & {n.lower() for n in unique}:
            raise Refused("the new order shares no identifier with the certificate it "
                          "replaces")
    return AcmeOrderGrant(account.account_id, tuple(unique), account.actor,
                          old.cert_id if old is not None else None)


def _acme_case(name: str) -> str:
    """An ACME client's DNS name in lower case, as Let's Encrypt takes them: lego sends
    `-d WEB.example` as typed, in the order and in its CSR, and was refused "must be
    lower case" (an ACME trial). The order, and so the certificate, hold the lower case;
    a name that is not ASCII is left for dns_name to refuse with its A-label."""
    return name.lower() if isinstance(name, str) and name.isascii() else name


def _acme_finalize(ctx: Context, who: Requester, req: AcmeFinalizeRequest) -> X509Order:
    account = _acme_account(who)
    if req.order_account != account.account_id:
        raise Refused("this order belongs to another account", Reason.NOT_FOUND)
    if req.order_status != "ready":
        raise Refused(f"the order is {req.order_status}, not ready", Reason.ORDER_NOT_READY)
    if not req.authz_statuses or any(s != "valid" for s in req.authz_statuses):
        raise Refused("not every authorization of the order is valid", Reason.ORDER_NOT_READY)
    policy.check_csr(req.csr)
    subject = subject_key(req.csr.public_key())
    if subject.spki_sha256 == account.key_spki_sha256:
        raise Refused("the certificate's key must not be the ACME account's key",
                      Reason.BAD_CSR)
    try:
        in_csr = policy.csr_names(req.csr)
    except Refused as exc:  # a name asked as another kind: the CSR's fault (RFC 8555
        # badCSR), not an identifier this CA refuses (a review)
        if exc.reason is not Reason.BAD_NAME:
            raise
        raise Refused(exc.detail, Reason.BAD_CSR) from None
    asked = [policy.classify(_acme_case(n), ctx.policy.allow_wildcards) for n in in_csr]
    try:
        cns = [a.value for a in req.csr.subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME)]
    except policy.PARSE_ERRORS:
        raise Refused("the CSR's subject cannot be read", Reason.BAD_CSR) from None
    # RFC 8555 7.4: each identifier in the subject's commonName, the SAN, or both.
    asked += [policy.classify(_acme_case(str(cn)), ctx.policy.allow_wildcards) for cn in cns]
    names = {v for _, v in asked}
    if any(k != "dns" for k, _ in asked) or names != set(req.order_names):
        raise Refused("the CSR must name exactly the order's identifiers "
                      f"({', '.join(req.order_names)}) as DNS names (in its subjectAltName "
                      "or its commonName), and nothing else", Reason.BAD_CSR)
    # The account's patterns and the lists in force now: a name denied since the order
    # was placed is refused here.
    _acme_names(ctx, account, list(req.order_names))
    order = _x509(ctx, who, role="service", names=tuple(("dns", n) for n in req.order_names),
                  principals=(), subject=subject, lifetime=_lifetime(ctx, None),
                  check_names=False)
    return dataclasses.replace(order, acme_account=account.account_id,
                               acme_order=req.order_id)


def _acme_revoke(ctx: Context, who: Requester, req: AcmeRevokeRequest) -> RevokeOrder:
    try:
        reason = revocation_reason(req.reason, HOLDER_REASONS)
    except Refused as exc:  # RFC 8555 7.6: badRevocationReason, whatever is wrong with it
        raise Refused(exc.detail, Reason.REASON_NOT_ALLOWED) from None
    if isinstance(who, AcmeAccountHolder):
        _acme_account(who)
        if not req.found or (req.owner_account != who.account_id and not req.authorized):
            # Not "not found": whether a serial exists is none of another account's business.
            raise Refused("this account may revoke only certificates issued to it, or ones "
                          "issued over ACME whose names it holds valid authorizations for "
                          "(RFC 8555 7.6); a certificate the CA issued otherwise (a "
                          "service's mutual-TLS identity) is revoked with its own key, as "
                          "the signer of revokeCert, or by the CA's admin",
                          Reason.UNAUTHORIZED)
        if req.owner_account != who.account_id and reason not in (None,
                                                                  "cessationOfOperation"):
            # As Let's Encrypt does: holding the names says they are no longer the
            # holder's, not that the key was compromised (which its own key shows).
            raise Refused("an account that did not order the certificate revokes it for "
                          "cessationOfOperation (5) or without a reason; keyCompromise is "
                          "shown by signing the request with the certificate's key",
                          Reason.REASON_NOT_ALLOWED)
    elif isinstance(who, CertKeyHolder):
        if not req.found or req.spki_sha256 != who.spki_sha256:
            raise Refused("the request is not signed by the certificate's key",
                          Reason.UNAUTHORIZED)
    else:
        raise Refused("revokeCert is signed by an ACME account or the certificate's key",
                      Reason.WRONG_ROLE)
    if (reason or "unspecified") not in HOLDER_REASONS:
        raise Refused(f"the reasons accepted are {', '.join(sorted(HOLDER_REASONS))}",
                      Reason.REASON_NOT_ALLOWED)
    if req.revoked:
        _revoked_again(req.serial, req.revoked_reason, reason, Reason.ALREADY_REVOKED)
    return RevokeOrder(req.serial, reason, who.actor, lineage=reason == "keyCompromise")


_HANDLERS: dict[type, Callable[[Context, Requester, Any], Order]] = {
    TokenRequest: _token, EnrollRequest: _enroll, EnrollAgainRequest: _enroll_again,
    RenewRequest: _renew,
    SSHHostRequest: _ssh_host, SSHUserRequest: _ssh_user, RevokeRequest: _revoke,
    RevokeIdentityRequest: _revoke_identity, SSHRevokeRequest: _ssh_revoke, KeyRequest: _key,
    RootRequest: _root, CrossRequest: _cross, IntermediateRequest: _intermediate,
    CRLRequest: _crl, OCSPRequest: _ocsp, LocalCertRequest: _local_cert,
    RevokedMeanwhile: _revoked_meanwhile,
    AcmeEABRequest: _acme_eab, AcmeOrderRequest: _acme_order,
    AcmeFinalizeRequest: _acme_finalize, AcmeRevokeRequest: _acme_revoke,
    AcmeAdminRequest: _acme_admin,
}
