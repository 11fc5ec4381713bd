"""Revocation: what is revoked, the CRL, OCSP answers, and SSH revocations and KRL.

What revocations made by any process of the daemon come to here is rebuilt when
the shared counters move (ca/generations.py). A revocation is written to the audit
log before the inventory: a revocation the log does not show never happened.
Every signature (CRL, OCSP) is ordered by the registration authority and made by
the issuers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ca import ra
from ca.generations import Generations, OnChange
from ca.issuance import profiles as prof
from ca.issuance.issue import Issuance
from ca.policy import PARSE_ERRORS, Reason, Refused
from ca.ssh import RevokedCerts, SSHPublicKey, blob_of, build_krl, parse_public_key
from ca.store import CRLRecord, SSHSelector, Store
from ca.x509_reasons import REASON_FLAGS

CRL_VALIDITY = ra.CRL_VALIDITY
OCSP_VALIDITY = dt.timedelta(hours=1)
Revoked = dict[int, tuple[dt.datetime, str | None]]


class AuditAppend(Protocol):
    async def append(self, event: str, **fields: Any) -> int: ...


class Revocations:
    def __init__(self, store: Store, audit: AuditAppend, issuance: Issuance,
                 generations: Generations,
                 context: Callable[[], Awaitable[ra.Context]]) -> None:
        self.store, self.audit, self.issuance = store, audit, issuance
        self.generations = generations
        self._context = context  # the RA's context, as of now
        self._crl_lock = asyncio.Lock()
        self._ocsp_cache: dict[int, tuple[int, dt.datetime, bytes]] = {}
        self.revoked: OnChange[Revoked] = OnChange(generations, "revocations", self._load)
        self.revoked_ssh_keys: OnChange[frozenset[str]] = OnChange(
            generations, "ssh_revocations", self._load_ssh_keys)
        self.krl: OnChange[bytes] = OnChange(generations, "ssh_revocations", self._build_krl)

    async def _load(self) -> Revoked:
        return {serial: (at, reason) for serial, at, reason in await self.store.revoked_certs()}

    async def _load_ssh_keys(self) -> frozenset[str]:
        return frozenset(await self.store.revoked_ssh_keys())

    async def is_revoked(self, serial_hex: str) -> bool:
        return int(serial_hex, 16) in (await self.revoked.get())[1]

    # ---- X.509 ---------------------------------------------------------------------------

    async def revoke(self, order: ra.RevokeOrder, request_id: str | None) -> dt.datetime:
        now = prof.utcnow()
        # The record first: a revocation the log does not show never happened.
        await self.audit.append("cert.revoke", serial=format(order.serial, "x"),
                                reason=order.reason, actor=order.actor, request_id=request_id)
        if not await self.store.revoke_cert(order.serial, now, order.reason):
            raise Refused(f"certificate {order.serial:x} is already revoked", Reason.CONFLICT)
        self.generations.bump("revocations")  # committed: every process reloads
        # The stored CRL is stale from now on (it lists fewer than the inventory): if
        # re-signing fails here, the next GET tries again.
        await self.refresh_crl(request_id)
        return now

    async def crl(self) -> bytes:
        """The newest CRL, re-signed when a revocation is missing from it or half its
        validity has passed. Kept in the inventory, so every worker serves the same
        one and CRL numbers only grow. (Revocations are never undone, so a CRL that
        lists as many as the inventory holds lists them all.)"""
        for _ in range(3):  # a revocation racing the refresh: sign again, with it
            der = await self._current_crl()
            if der is not None:
                return der
            await self.refresh_crl(None, only_if_stale=True)
        latest = await self.store.latest_crl()
        if latest is None:  # refresh_crl raises when it cannot sign; never serve nothing
            raise RuntimeError("no CRL after a successful refresh")
        return latest.der

    async def _current_crl(self) -> bytes | None:
        _, revoked = await self.revoked.get()
        latest = await self.store.latest_crl()
        if latest is None:
            return None
        age = prof.utcnow() - dt.datetime.fromisoformat(latest.this_update)
        return latest.der if latest.revoked >= len(revoked) and age <= CRL_VALIDITY / 2 else None

    async def refresh_crl(self, request_id: str | None, only_if_stale: bool = False) -> None:
        async with self._crl_lock:
            if only_if_stale and await self._current_crl() is not None:
                return  # another request re-signed it while this one waited
            order = ra.order(await self._context(), ra.Local(), ra.CRLRequest())
            _, revoked = await self.revoked.get()
            number = await self.store.next_crl_number()
            crl = await self.issuance.crl(
                order, number, [(s, at, r) for s, (at, r) in revoked.items()], request_id)
            await self.store.add_crl(CRLRecord(number, len(revoked),
                                               order.this_update.isoformat(),
                                               crl.public_bytes(serialization.Encoding.DER)))

    async def ocsp(self, request_der: bytes, request_id: str | None) -> bytes:
        try:
            req = ocsp.load_der_ocsp_request(request_der)
            extensions = req.extensions  # parsed lazily: anything malformed shows here
            nonce = _nonce(extensions)
        except PARSE_ERRORS:
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        issuer = self.issuance.issuers.current
        try:
            issuer_key_hash = _key_hash(issuer.cert, req.hash_algorithm)
        except (UnsupportedAlgorithm, ValueError):  # e.g. an MD5 CertID
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        if req.issuer_key_hash != issuer_key_hash:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        serial = req.serial_number
        now = prof.utcnow()
        gen, revoked = await self.revoked.get()
        cached = self._ocsp_cache.get(serial)
        if (cached is not None and cached[0] == gen and now - cached[1] < OCSP_VALIDITY / 2
                and not extensions):
            return cached[2]
        status, rev_time, rev_reason = ocsp.OCSPCertStatus.GOOD, None, None
        if serial in revoked:
            at, reason = revoked[serial]
            status, rev_time = ocsp.OCSPCertStatus.REVOKED, at
            rev_reason = REASON_FLAGS[reason] if reason else None
        elif await self.store.cert(serial) is None:
            status = ocsp.OCSPCertStatus.UNKNOWN
        b = (ocsp.OCSPResponseBuilder()
             .add_response_by_hash(
                 issuer_name_hash=req.issuer_name_hash, issuer_key_hash=req.issuer_key_hash,
                 serial_number=serial, algorithm=req.hash_algorithm, cert_status=status,
                 this_update=now, next_update=now + OCSP_VALIDITY, revocation_time=rev_time,
                 revocation_reason=rev_reason)
             .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert))
        if nonce is not None:
            b = b.add_extension(nonce, critical=False)
        resp = await self.issuance.ocsp(issuer.id, b, serial=serial, status=status.name,
                                        request_id=request_id)
        der = resp.public_bytes(serialization.Encoding.DER)
        if not extensions:
            if len(self._ocsp_cache) > 10_000:
                self._ocsp_cache.clear()
            self._ocsp_cache[serial] = (gen, now, der)
        return der

    # ---- SSH ---------------------------------------------------------------------------------

    async def revoke_ssh(self, *, serial: int | None, key_id: str | None,
                         public_key: SSHPublicKey | None, actor: str,
                         request_id: str | None) -> int:
        """Revoke by serial, key id or public key; how many certificates it hit."""
        which = SSHSelector(serial=serial, key_id=key_id,
                            key_sha256=public_key.sha256 if public_key else None)
        matching = await self.store.count_ssh_certs(which)
        if matching == 0 and public_key is None:
            what = f"serial {serial}" if serial is not None else f"key id {key_id!r}"
            raise Refused(f"no unrevoked SSH certificate with {what}", Reason.NOT_FOUND)
        # The record first, as for X.509: a revocation the log does not show never happened.
        await self.audit.append("ssh.revoke", serial=None if serial is None else str(serial),
                                key_id=key_id,
                                public_key_sha256=public_key.sha256 if public_key else None,
                                certificates=matching, actor=actor, request_id=request_id)
        hit = await self.store.revoke_ssh(which, prof.utcnow(),
                                          public_key.line if public_key else None)
        self.generations.bump("ssh_revocations")  # committed: every process rebuilds its KRL
        return hit

    async def _build_krl(self) -> bytes:
        certs = await self.store.revoked_ssh_certs()
        keys = await self.store.revoked_ssh_keys()
        groups = []
        for issuer in self.issuance.issuers.ssh.values():
            serials = [s for t, s in certs if t == issuer.cert_type]
            groups.append(RevokedCerts(blob_of(issuer.key.public_key), serials, []))
        now = int(prof.utcnow().timestamp())
        return build_krl(now, now, groups, [parse_public_key(k).blob for k in keys])


def _nonce(extensions: x509.Extensions) -> x509.OCSPNonce | None:
    try:
        return extensions.get_extension_for_class(x509.OCSPNonce).value
    except x509.ExtensionNotFound:
        return None


def _key_hash(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    """RFC 6960 issuerKeyHash of `cert`, computed by cryptography's own request builder."""
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, cert, algorithm).build()
    return req.issuer_key_hash


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)
