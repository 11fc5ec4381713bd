"""OCSP on the RFC 5019 lightweight profile: responses are signed ahead of time and
served from storage, so asking costs nothing but a database read.

- `OCSPSigner` signs one response per certificate, carrying its status for a SHA-1
  and a SHA-256 CertID (ocsp_der.py), each signature ordered like any other and
  audited by the signing pipeline. It signs at revocation (the revoked response,
  at once) and, through `OCSPRefresher`, for new certificates within seconds and
  for every live certificate before its response's nextUpdate, in batches.
- `answer` serves a request from storage: the stored response if one of its
  CertIDs is exactly the one asked (hash algorithm, issuer name hash, issuer key
  hash, serial); unsigned `unauthorized` for another issuer or a serial this CA
  never issued; unsigned `tryLater` for a certificate whose response is not signed
  yet; unsigned `malformedRequest` for what does not parse. Nonces are ignored. No
  request causes a signature or an audit line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp

from ca.issuance import profiles as prof
from ca.issuance.issuers import Issuers, X509Issuer
from ca.issuance.pipeline import SigningJob, SigningPipeline
from ca.policy import PARSE_ERRORS
from ca.revocation import ocsp_der
from ca.store import OCSPDue, OCSPRecord, Store

log = structlog.get_logger("hsmca.ocsp")
VALIDITY = dt.timedelta(days=1)
REFRESH_BEFORE = VALIDITY / 2  # re-signed when less than this is left
MAX_AGE_S = 3600  # what HTTP caches may keep a response for, at most
BATCH = 256
UNKNOWN_ISSUER = "unknown issuer"


@dataclass(frozen=True)
class Answer:
    der: bytes
    max_age: int = 0  # seconds a cache may keep it (0: no-cache)
    status: str = "successful"


def _unsigned(status: ocsp.OCSPResponseStatus) -> Answer:
    return Answer(ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER), 0, status.name.lower())


def _sign_with(key: object, hash_name: str | None, tbs: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(tbs, ec.ECDSA(prof.HASHES[hash_name or "sha256"]))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(tbs)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(tbs, padding.PKCS1v15(), prof.HASHES[hash_name or "sha256"])
    raise TypeError(f"cannot sign OCSP with {type(key).__name__}")


class OCSPSigner:
    def __init__(self, pipeline: SigningPipeline, store: Store, issuers: Issuers) -> None:
        self.pipeline, self.store, self.issuers = pipeline, store, issuers

    def _issuer(self, label: str | None) -> X509Issuer:
        return self.issuers.x509[label or self.issuers.first_x509]

    async def sign(self, due: Sequence[OCSPDue], actor: str = "local",
                   request_id: str | None = None) -> int:
        """Sign and store a response for each; how many were signed. The jobs go in
        together, so the pipeline signs them as one group (two group commits)."""
        now = prof.utcnow()
        jobs = []
        for d in due:
            issuer = self._issuer(d.issuer)
            status = ocsp_der.CertStatus(
                dt.datetime.fromisoformat(d.revoked_at) if d.revoked_at else None, d.reason)
            tbs = ocsp_der.response_data(issuer.cert, d.serial, status, now, now + VALIDITY)
            algorithm = ocsp_der.signature_algorithm(issuer.key.public_key, issuer.hash_name)
            h = issuer.hash_name

            def build(k: object, tbs: bytes = tbs, algorithm: bytes = algorithm,
                      h: str | None = h) -> ocsp.OCSPResponse:
                return ocsp_der.sign_response(tbs, algorithm, lambda b: _sign_with(k, h, b))

            jobs.append(self.pipeline.submit(SigningJob(
                issuer.key.label, "ocsp", actor, build, request_id=request_id, hash_name=h,
                details={"serial": format(d.serial, "x"),
                         "status": "revoked" if d.revoked_at else "good",
                         "this_update": now.isoformat(),
                         "next_update": (now + VALIDITY).isoformat()})))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        records = []
        for d, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("OCSP response not signed", serial=format(d.serial, "x"),
                            error=str(result))
                continue
            records.append(OCSPRecord(
                d.serial, "revoked" if d.revoked_at else "good", now.isoformat(),
                (now + VALIDITY).isoformat(),
                result.value.public_bytes(serialization.Encoding.DER)))
        if records:
            await self.store.put_ocsp(records)
        return len(records)


class OCSPRefresher:
    """Keeps every live certificate's response signed and fresh (a background task of
    one process: the primary)."""

    def __init__(self, signer: OCSPSigner, interval: float = 1.0) -> None:
        self.signer, self.interval = signer, interval

    async def round(self) -> int:
        now = prof.utcnow()
        done = 0
        while True:
            due = await self.signer.store.ocsp_due(now, now + REFRESH_BEFORE, BATCH)
            if not due:
                return done
            signed = await self.signer.sign(due)
            done += signed
            if signed < len(due):  # the HSM or the log is away: try again next round
                return done

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as exc:  # the store or the HSM is away: next round
                log.warning("OCSP refresh failed", error=str(exc))
            await asyncio.sleep(self.interval)  # periodic work, not synchronisation


def issuer_of(request: ocsp.OCSPRequest, issuers: Issuers) -> X509Issuer | None:
    """The issuer whose name and key hash the request's CertID carries."""
    name = request.hash_algorithm.name
    for issuer in issuers.x509.values():
        ids = ocsp_der.cert_ids(issuer.cert).get(name)
        if ids == (request.issuer_name_hash, request.issuer_key_hash):
            return issuer
    return None


async def answer(request_der: bytes, store: Store, issuers: Issuers) -> Answer:
    try:
        req = ocsp.load_der_ocsp_request(request_der)
        req.extensions  # parsed lazily: anything malformed shows here  # noqa: B018
        serial = req.serial_number
        algorithm = req.hash_algorithm.name
    except PARSE_ERRORS:
        return _unsigned(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    if algorithm not in ("sha1", "sha256") or issuer_of(req, issuers) is None:
        return _unsigned(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    now = prof.utcnow()
    stored = await store.ocsp(serial)
    if stored is not None and dt.datetime.fromisoformat(stored.next_update) > now:
        resp = ocsp.load_der_ocsp_response(stored.der)
        if not any(_same_cert_id(single, req) for single in resp.responses):
            return _unsigned(ocsp.OCSPResponseStatus.UNAUTHORIZED)  # another issuer's
        left = (dt.datetime.fromisoformat(stored.next_update) - now).total_seconds()
        return Answer(stored.der, max(0, min(MAX_AGE_S, int(left))))
    cert = await store.cert(serial)
    if cert is None or dt.datetime.fromisoformat(cert.not_after) <= now:
        return _unsigned(ocsp.OCSPResponseStatus.UNAUTHORIZED)
    return _unsigned(ocsp.OCSPResponseStatus.TRY_LATER)


def _same_cert_id(single: ocsp.OCSPSingleResponse, req: ocsp.OCSPRequest) -> bool:
    return (single.hash_algorithm.name == req.hash_algorithm.name
            and single.issuer_name_hash == req.issuer_name_hash
            and single.issuer_key_hash == req.issuer_key_hash
            and single.serial_number == req.serial_number)


def responses_of(der: bytes) -> list[tuple[str, x509.ReasonFlags | None]]:
    """(status, reason) of each SingleResponse (for the tests and the CLI)."""
    return [(s.certificate_status.name.lower(), s.revocation_reason)
            for s in ocsp.load_der_ocsp_response(der).responses]
