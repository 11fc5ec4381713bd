"""Issuers at work: build what an order says, sign it through the pipeline, record it.

They decide nothing: an order (ca/ra.py) fixes issuer, names, principals, key and
validity; here only the serial is drawn and the object built with cryptography's
builders. A certificate reaches its caller only after its outcome line and its
inventory row are durable (the pipeline's rule).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import SSHCertificate

from ca.issuance import profiles as prof
from ca.issuance.issuers import Issuers
from ca.issuance.pipeline import SigningJob, SigningPipeline, SignResult
from ca.policy import Policy
from ca.ra import CACertOrder, Context, CRLOrder, Directory, SSHOrder, X509Order
from ca.store import NewCert, NewSSHCert, Store
from ca.store.errors import StoreUnavailable
from ca.subject import spki_sha256
from ca.x509_reasons import REASON_FLAGS
from hsm.session import KeyInfo
from hsm.signers import HSMKey

log = structlog.get_logger("hsmca.issue")


@dataclass(frozen=True)
class Issued:
    """A certificate as the client gets it, with where the audit log has it."""

    cert: x509.Certificate
    issuer: str
    intent_seq: int
    outcome_seq: int
    signed: SignResult[x509.Certificate]  # what the pipeline released

    @property
    def serial_hex(self) -> str:
        return format(self.cert.serial_number, "x")


@dataclass(frozen=True)
class IssuedSSH:
    cert: SSHCertificate
    key_id: str
    intent_seq: int
    outcome_seq: int
    signed: SignResult[SSHCertificate]


def decision_context(policy: Policy, issuers: Directory,
                     ssh_key_revoked: Callable[[str], bool] = lambda _line: False,
                     key_compromised: Callable[[str], bool] = lambda _spki: False
                     ) -> Context:
    """The registration authority's context as of now (to the second): the policy and
    the issuers in force."""
    return Context(policy, dt.datetime.now(dt.UTC).replace(microsecond=0), issuers,
                   ssh_key_revoked, key_compromised)


async def sign_ca_cert(pipeline: SigningPipeline, signer: KeyInfo, order: CACertOrder,
                       request_id: str | None = None) -> x509.Certificate:
    """A CA certificate as the registration authority ordered it, signed by `signer`
    (the key its order names: a ceremony's new root is not in any directory yet)."""
    if signer.label != order.signer or x509.SubjectKeyIdentifier.from_public_key(
            signer.public_key).digest != order.issuer_key_id:  # type: ignore[arg-type]
        raise ValueError(f"the order is for the signature of {order.signer}, whose key "
                         f"identifier it names; {signer.label} is not that key")
    serial = prof.random_serial()
    builder = prof.ca_builder(order, serial)
    h = prof.hash_for(signer.public_key)
    cert: x509.Certificate = await pipeline.sign(
        signer.label, lambda k: builder.sign(k, h), purpose="x509-ca", actor=order.actor,
        request_id=request_id, hash_name=prof.hash_name(signer.public_key),
        details={"what": order.kind, "serial": format(serial, "x"),
                 "subject": order.subject.rfc4514_string(),
                 "issuer": order.issuer_name.rfc4514_string(),
                 "spki_sha256": spki_sha256(order.public_key),
                 "not_before": order.not_before.isoformat(),
                 "not_after": order.not_after.isoformat()},
        describe=lambda c: {"fingerprint": prof.fingerprint(c)})
    return cert


class IssuerSource(Protocol):
    """The issuers in force (a daemon's rotate: ca/daemon/keys.py `Keyring`)."""

    issuers: Issuers

    async def refresh(self) -> Issuers: ...


class Issuance:
    def __init__(self, pipeline: SigningPipeline, store: Store, keys: IssuerSource,
                 public_url: str | None, audit_log: str | None = None) -> None:
        """`audit_log`: the name of the log this process's signatures go to (cluster
        mode: the node's), recorded with each certificate; None: the CA's one log."""
        self.pipeline, self.store, self.keys = pipeline, store, keys
        self.public_url = public_url
        self.audit_log = audit_log

    @property
    def issuers(self) -> Issuers:
        return self.keys.issuers

    async def can_record(self) -> None:
        """Nothing is signed that the inventory could not record: while its last write
        failed (a full disk), each request first tries it again, and is refused with
        StoreUnavailable (503) until it goes through."""
        if not self.store.healthy:
            await self.store.probe()
            if not self.store.healthy:
                raise StoreUnavailable("the inventory cannot be written")

    async def x509(self, order: X509Order, request_id: str | None = None) -> Issued:
        await self.can_record()
        issuer = self.issuers.x509[order.issuer]
        by_kind: dict[str, list[str]] = {"dns": [], "ip": [], "uri": [], "email": []}
        for kind, value in order.names:
            by_kind[kind].append(value)
        url = self.public_url if order.role != "server" else None
        flat = [v for _, v in order.names]
        profile = prof.LeafProfile(
            public_key=order.subject.public_key, ski=order.subject.ski,
            common_name=prof.common_name_for(flat), dns_names=by_kind["dns"],
            ip_addresses=by_kind["ip"], uris=by_kind["uri"], emails=by_kind["email"],
            serial=prof.random_serial(),
            crl_url=f"{url}/v1/x509/crl/{issuer.id}" if url else None,
            ocsp_url=f"{url}/v1/x509/ocsp" if url else None,
            client_only=order.client_only)
        builder = prof.leaf_builder(profile, issuer.cert, order.not_before, order.not_after)
        serial_hex = format(profile.serial, "x")
        issued_at = prof.utcnow().isoformat()
        h = issuer.hash
        kept: list[tuple[bytes, str]] = []  # (DER, fingerprint): describe() runs first
        intents: list[int] = []  # the intent's seq, kept in the inventory for auditors

        def sign(key: HSMKey) -> x509.Certificate:
            intents.append(key.intent_seq)
            return builder.sign(key, h)

        def describe(cert: x509.Certificate) -> dict[str, str]:
            der = cert.public_bytes(serialization.Encoding.DER)
            kept.append((der, hashlib.sha256(der).hexdigest()))
            return {"fingerprint": kept[0][1]}

        def record(cert: x509.Certificate) -> object:
            der, fingerprint = kept[0]
            return self.store.add_cert(NewCert(
                serial=cert.serial_number, fingerprint=fingerprint, role=order.role,
                subject=cert.subject.rfc4514_string(), names=tuple(flat),
                principals=order.principals, spki_sha256=order.subject.spki_sha256,
                not_before=order.not_before.isoformat(), not_after=order.not_after.isoformat(),
                issued_at=issued_at, der=der, issuer=issuer.id, token_id=order.token_id,
                renewed_from=order.renewed_from, acme_account=order.acme_account,
                acme_order=order.acme_order, audit_seq=intents[0],
                audit_log=self.audit_log))

        job = SigningJob(
            issuer.key.label, "tls" if order.role == "server" else "x509", order.actor,
            sign, request_id=request_id, hash_name=issuer.hash_name,
            details={"serial": serial_hex, "role": order.role, "names": flat,
                     **({"acme_account": order.acme_account, "acme_order": order.acme_order}
                        if order.acme_order else {}),
                     "principals": list(order.principals),
                     "spki_sha256": order.subject.spki_sha256,
                     "not_before": order.not_before.isoformat(),
                     "not_after": order.not_after.isoformat()},
            describe=describe, record=record)  # type: ignore[arg-type]
        result = await self.pipeline.submit(job)
        return Issued(result.value, issuer.id, result.intent_seq, result.outcome_seq, result)

    async def ssh(self, order: SSHOrder, request_id: str | None = None) -> IssuedSSH:
        await self.can_record()
        issuer = self.issuers.ssh[order.issuer]
        serial = 0
        while serial == 0:
            serial = secrets.randbits(64)
        key_id = f"{order.identity}:{serial}"
        b = (serialization.SSHCertificateBuilder()
             .public_key(order.public_key.key)  # type: ignore[arg-type]
             .serial(serial)
             .type(serialization.SSHCertificateType.USER if order.cert_type == "user"
                   else serialization.SSHCertificateType.HOST)
             .key_id(key_id.encode())
             .valid_principals([p.encode() for p in order.principals])
             .valid_after(order.valid_after).valid_before(order.valid_before))
        for ext in sorted(order.extensions):
            b = b.add_extension(ext.encode(), b"")
        if order.source_address:
            b = b.add_critical_option(b"source-address", order.source_address.encode())
        issued_at = prof.utcnow().isoformat()

        def record(_cert: SSHCertificate) -> object:
            return self.store.add_ssh_cert(NewSSHCert(
                serial=serial, key_id=key_id, cert_type=order.cert_type,
                key_sha256=order.public_key.sha256, public_key=order.public_key.line,
                principals=order.principals, valid_after=order.valid_after,
                valid_before=order.valid_before, owner_serial=order.owner_serial,
                issued_at=issued_at, issuer=issuer.id))

        job = SigningJob(
            issuer.key.label, f"ssh-{order.cert_type}", order.actor, lambda k: b.sign(k),
            request_id=request_id, hash_name=issuer.hash_name,
            details={"serial": str(serial), "key_id": key_id,
                     "principals": list(order.principals),
                     "public_key_sha256": order.public_key.sha256,
                     "valid_after": order.valid_after, "valid_before": order.valid_before,
                     "source_address": order.source_address,
                     # What it permits (port forwarding, a pty...), which a reload may
                     # change: an auditor could not tell it from the log (an SSH trial)
                     "extensions": sorted(order.extensions),
                     # The X.509 certificate it is issued on the strength of: a revocation
                     # of that one (its cert.revoke line) revokes this one too.
                     "owner_serial": order.owner_serial},
            describe=lambda c: {"fingerprint": hashlib.sha256(c.public_bytes()).hexdigest()},
            record=record)  # type: ignore[arg-type]
        result: SignResult[SSHCertificate] = await self.pipeline.submit(job)
        return IssuedSSH(result.value, key_id, result.intent_seq, result.outcome_seq, result)

    def withhold(self, issued: Issued | IssuedSSH, error: BaseException) -> None:
        """`issued` is not sent after all: a check after its signing failed. Noted for
        the next start, said in the audit log, and revoked once the inventory answers
        (the pipeline's `withhold`); done before the caller answers, and not awaited, so
        that a stop's cancellation cannot cut it short."""
        serial = (issued.serial_hex if isinstance(issued, Issued)
                  else str(issued.cert.serial))
        try:
            self.pipeline.withhold(issued.signed, serial, error)
        except Exception as exc:
            revoke = "hsmca revoke" if isinstance(issued, Issued) else "hsmca ssh revoke --serial"
            log.error(f"a certificate signed and not sent may stay valid: revoke it by hand "
                      f"({revoke} {serial}) if it still is", serial=serial,
                      error=str(exc) or type(exc).__name__)

    async def crl(self, order: CRLOrder, number: int,
                  revoked: Sequence[tuple[int, dt.datetime, str | None]],
                  request_id: str | None = None) -> x509.CertificateRevocationList:
        """A CRL of `order.issuer` listing `revoked` (serial, time, reason name)."""
        issuer = self.issuers.crl_signer(order.issuer)
        assert issuer is not None, order.issuer  # the RA names only an issuer that signs
        b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
             .last_update(order.this_update).next_update(order.next_update)
             .add_extension(x509.CRLNumber(number), critical=False)
             .add_extension(prof.aki(issuer.cert), critical=False))
        for serial, at, reason in sorted(revoked):
            rb = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at)
            if reason:
                rb = rb.add_extension(x509.CRLReason(REASON_FLAGS[reason]), critical=False)
            b = b.add_revoked_certificate(rb.build())
        h = issuer.hash
        return await self.pipeline.sign(
            issuer.key.label, lambda k: b.sign(k, h), purpose="crl", actor=order.actor,
            request_id=request_id, hash_name=issuer.hash_name,
            details={"crl_number": number, "revoked": len(revoked),
                     "this_update": order.this_update.isoformat(),
                     "next_update": order.next_update.isoformat()},
            describe=lambda c: {"fingerprint": hashlib.sha256(
                c.public_bytes(serialization.Encoding.DER)).hexdigest()})
