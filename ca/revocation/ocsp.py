"""OCSP on the RFC 5019 lightweight profile: responses are signed ahead of time and
served from storage, so asking costs nothing but a database read.

- `OCSPSigner` signs two responses per certificate, one for a SHA-1 CertID (what
  most clients send) and one for SHA-256, each with one SingleResponse (clients,
  cryptography's among them, expect one), each signature audited by the signing
  pipeline. It signs at revocation (the revoked responses, at once) and, through
  `OCSPRefresher`, for new certificates within seconds and for every live
  certificate before its responses' nextUpdate, in batches (one group commit for a
  batch's intents, one for its outcomes).
- `answer` serves a request from storage: the stored response for the request's
  hash algorithm if its CertID is exactly the one asked (hash algorithm, issuer name
  hash, issuer key hash, serial); unsigned `unauthorized` for another issuer or a
  serial this CA never issued; unsigned `tryLater` for a certificate whose response
  is not signed yet, or whose stored response says good although it was revoked
  since (`unauthorized` if its issuer is retired: none will ever be signed); unsigned
  `malformedRequest` for what does not parse. Nonces are ignored. No request causes a
  signature or an audit line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from ca import ra
from ca.issuance import profiles as prof
from ca.issuance.issue import Issuance
from ca.issuance.issuers import Issuers
from ca.issuance.pipeline import SigningJob
from ca.logs import Recurring
from ca.policy import PARSE_ERRORS
from ca.store import OCSPDue, OCSPRecord, Store
from ca.store.errors import StoreUnavailable
from ca.x509_reasons import REASON_FLAGS

log = structlog.get_logger("hsmca.ocsp")
REFRESH_BEFORE = ra.OCSP_VALIDITY / 2  # re-signed when less than this is left
MAX_AGE_S = 3600  # what HTTP caches may keep a response for, at most
BATCH = 256
UNKNOWN_ISSUER = "unknown issuer"


@dataclass(frozen=True)
class Answer:
    der: bytes
    max_age: int = 0  # seconds a cache may keep it (0: no-cache)
    status: str = "successful"
    this_update: dt.datetime | None = None  # a signed response's, for caches (RFC 5019 6.2)
    next_update: dt.datetime | None = None


def _unsigned(status: ocsp.OCSPResponseStatus) -> Answer:
    return Answer(ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER), 0, status.name.lower())


CERT_ID_HASHES: dict[str, hashes.HashAlgorithm] = {"sha1": hashes.SHA1(),
                                                   "sha256": hashes.SHA256()}


@functools.lru_cache(maxsize=16)
def cert_ids(issuer: x509.Certificate) -> dict[str, tuple[bytes, bytes]]:
    """(issuerNameHash, issuerKeyHash) of `issuer` by CertID hash, as cryptography's own
    request builder makes them for a certificate it issued (a throwaway one: only its
    issuer name counts)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    probe = (x509.CertificateBuilder().subject_name(issuer.subject)
             .issuer_name(issuer.subject).public_key(key.public_key()).serial_number(1)
             .not_valid_before(now).not_valid_after(now + dt.timedelta(minutes=1))
             .sign(key, hashes.SHA256()))
    out = {}
    for name, algorithm in CERT_ID_HASHES.items():
        req = ocsp.OCSPRequestBuilder().add_certificate(probe, issuer, algorithm).build()
        out[name] = (req.issuer_name_hash, req.issuer_key_hash)
    return out


class OCSPSigner:
    """Signs what the registration authority orders: for each issuer of a batch one
    `ra.OCSPRequest`, whose order names the key and the validity (a retired issuer's
    certificates are refused, and passed over)."""

    def __init__(self, issuance: Issuance, context: Callable[[], Awaitable[ra.Context]]
                 ) -> None:
        self.issuance, self._context = issuance, context
        self.pipeline, self.store = issuance.pipeline, issuance.store
        self._failing = Recurring(log, "OCSP responses not signed; tried again every second",
                                  "OCSP responses are signed again")

    async def _orders(self, due: Sequence[OCSPDue]) -> dict[str | None, ra.OCSPOrder]:
        ctx = await self._context()
        orders = {}
        for label in {d.issuer for d in due}:
            order = ra.decide(ctx, ra.Local(), ra.OCSPRequest(label))
            if isinstance(order, ra.OCSPOrder):
                orders[label] = order
        return orders

    async def sign(self, due: Sequence[OCSPDue], actor: str = "local",
                   request_id: str | None = None) -> int:
        """Sign and store the responses of each; how many were not (a retired issuer's
        certificates are passed over, not failed, but counted: the refresher's round
        then ends, and the next one's list of issuers leaves them out). The jobs go in
        together, so the pipeline signs them as one group. Not while the inventory that
        stores them cannot be written: each would be a signature for nothing."""
        await self.issuance.can_record()
        orders = await self._orders(due)
        jobs: list[SigningJob[ocsp.OCSPResponse]] = []
        asked, due = len(due), [d for d in due if d.issuer in orders]
        for d in due:
            order = orders[d.issuer]
            issuer = self.issuance.issuers.x509[order.issuer]
            at = dt.datetime.fromisoformat(d.revoked_at) if d.revoked_at else None
            serial_hex = format(d.serial, "x")
            times = {"this_update": order.this_update.isoformat(),
                     "next_update": order.next_update.isoformat()}
            for name, (name_hash, key_hash) in cert_ids(issuer.cert).items():
                b = (ocsp.OCSPResponseBuilder()
                     .add_response_by_hash(
                         issuer_name_hash=name_hash, issuer_key_hash=key_hash,
                         serial_number=d.serial, algorithm=CERT_ID_HASHES[name],
                         cert_status=ocsp.OCSPCertStatus.REVOKED if at
                         else ocsp.OCSPCertStatus.GOOD,
                         this_update=order.this_update, next_update=order.next_update,
                         revocation_time=at,
                         revocation_reason=REASON_FLAGS[d.reason] if at and d.reason else None)
                     .responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert))
                h = issuer.hash
                jobs.append(SigningJob(
                    issuer.key.label, "ocsp", actor, lambda k, b=b, h=h: b.sign(k, h),
                    request_id=request_id, hash_name=issuer.hash_name,
                    details={"serial": serial_hex, "cert_id": name,
                             "status": "revoked" if at else "good", **times}))
        results = await self.pipeline.submit_all(jobs)
        records = []
        unsigned: list[tuple[int, BaseException]] = []
        for i, d in enumerate(due):
            pair = results[2 * i:2 * i + 2]
            failed = [r for r in pair if isinstance(r, BaseException)]
            if failed:
                unsigned.append((d.serial, failed[0]))
                continue
            sha1, sha256 = (r.value.public_bytes(serialization.Encoding.DER)  # type: ignore[union-attr]
                            for r in pair)
            order = orders[d.issuer]
            records.append(OCSPRecord(d.serial, "revoked" if d.revoked_at else "good",
                                      order.this_update.isoformat(),
                                      order.next_update.isoformat(), sha1, sha256,
                                      _refresh_at(order.next_update, d.not_after)))
        if records:
            await self.store.put_ocsp(records)
        if unsigned:  # tried again at the refresher's next round
            self._failing.failed(str(unsigned[0][1]), certificates=len(unsigned),
                                 **{"serials" if len(unsigned) <= 5 else "first_serials":
                                    [format(s, "x") for s, _ in unsigned[:5]]})
        elif records:
            self._failing.ok()
        return asked - len(records)


def _refresh_at(next_update: dt.datetime, not_after: str) -> str | None:
    """When responses valid until `next_update` are due again: REFRESH_BEFORE ahead of
    it; never if the certificate expires first (its last responses outlive it)."""
    at = next_update - REFRESH_BEFORE
    return at.isoformat() if at < dt.datetime.fromisoformat(not_after) else None


class OCSPRefresher:
    """Keeps every live certificate's response signed and fresh (a background task of
    one process: the primary)."""

    def __init__(self, signer: OCSPSigner, interval: float = 1.0,
                 on_current: Callable[[], None] = lambda: None) -> None:
        """`on_current`: called at each round that finds nothing left due (a metric)."""
        self.signer, self.interval, self.on_current = signer, interval, on_current

    async def round(self) -> None:
        issuers = await self.signer.issuance.keys.refresh()
        now = prof.utcnow()
        await self.signer.store.ocsp_settle(now, list(issuers.x509))
        while True:
            due = await self.signer.store.ocsp_due(now, BATCH, list(issuers.x509))
            if not due:
                self.on_current()
                return
            # Not all signed: the HSM or the log is away, or an issuer was retired since
            # `issuers` was read (its rows came back at every turn, and the loop, which
            # then awaited nothing that waits, held the primary's event loop: a review).
            # The next round, a second on, reads the issuers again.
            if await self.signer.sign(due):
                return

    async def run(self) -> None:
        # Said once per error while it lasts (a cluster trial's node said it every 4 s
        # through a 10-minute database outage: 154 lines), and its end once.
        failing = Recurring(log, "OCSP refresh failed", "OCSP refresh works again")
        while True:
            try:
                await self.round()
            except Exception as exc:  # the store or the HSM is away: next round
                failing.failed(str(exc) or type(exc).__name__)
            else:
                failing.ok()
            await asyncio.sleep(self.interval)  # periodic work, not synchronisation


def issuer_of(request: ocsp.OCSPRequest, issuers: Issuers) -> x509.Certificate | None:
    """The issuer whose name and key hash the request's CertID carries (retired ones
    too: their last responses are served until they age out)."""
    name = request.hash_algorithm.name
    for cert in [*(i.cert for i in issuers.x509.values()), *issuers.past.values()]:
        ids = cert_ids(cert).get(name)
        if ids == (request.issuer_name_hash, request.issuer_key_hash):
            return cert
    return None


async def answer(request_der: bytes, store: Store, issuers: Issuers) -> Answer:
    """The response to an OCSP request; with the inventory away, the unsigned tryLater
    (RFC 6960 2.3), an OCSP answer rather than an HTTP error. (Not a response this
    process served before: a revocation committed on another node just before the
    database went away may not have reached this one, and a revoked certificate must
    never get its old 'good'.)"""
    try:
        req = ocsp.load_der_ocsp_request(request_der)
        req.extensions  # parsed lazily: anything malformed shows here  # noqa: B018
        serial = req.serial_number
        algorithm = req.hash_algorithm.name
    except (*PARSE_ERRORS, NotImplementedError):
        # NotImplementedError: several CertIDs in one request. RFC 5019 2.1.1 has
        # clients send one; each response here is signed ahead of time for one
        # certificate, and a combined one would mean signing on demand.
        return _unsigned(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    if algorithm not in ("sha1", "sha256") or issuer_of(req, issuers) is None:
        return _unsigned(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    now = prof.utcnow()
    try:
        return await _from_store(req, algorithm, serial, store, issuers, now)
    except StoreUnavailable:
        return _unsigned(ocsp.OCSPResponseStatus.TRY_LATER)


async def _from_store(req: ocsp.OCSPRequest, algorithm: str, serial: int, store: Store,
                      issuers: Issuers, now: dt.datetime) -> Answer:
    stored = await store.ocsp(serial)
    if stored is not None and dt.datetime.fromisoformat(stored.next_update) > now:
        der = stored.der_sha1 if algorithm == "sha1" else stored.der_sha256
        if not _same_cert_id(ocsp.load_der_ocsp_response(der), req):
            return _unsigned(ocsp.OCSPResponseStatus.UNAUTHORIZED)  # another issuer's
        left = (dt.datetime.fromisoformat(stored.next_update) - now).total_seconds()
        return Answer(der, max(0, min(MAX_AGE_S, int(left))), "successful",
                      dt.datetime.fromisoformat(stored.this_update),
                      dt.datetime.fromisoformat(stored.next_update))
    cert = await store.cert(serial)
    if cert is None or dt.datetime.fromisoformat(cert.not_after) <= now:
        return _unsigned(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    if cert.revoked_at is not None and issuers.x509_of(cert.issuer) not in issuers.x509:
        # Revoked after its issuer retired: no response will ever say so, and this
        # responder will not say 'good'.
        return _unsigned(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    return _unsigned(ocsp.OCSPResponseStatus.TRY_LATER)


def _same_cert_id(single: ocsp.OCSPResponse, req: ocsp.OCSPRequest) -> bool:
    return (single.hash_algorithm.name == req.hash_algorithm.name
            and single.issuer_name_hash == req.issuer_name_hash
            and single.issuer_key_hash == req.issuer_key_hash
            and single.serial_number == req.serial_number)
