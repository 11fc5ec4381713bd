"""The CA's issuing side: builds X.509 certificates, CRLs and OCSP responses and
signs them through the audited HSM path, recording them in the inventory.

It decides nothing: callers pass requests that `ca.policy` has already approved.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import datetime as dt
import hashlib
import json
import secrets
import sqlite3
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import SSHCertificate
from cryptography.x509 import ocsp

from ca import x509 as prof
from ca.audit.link import AuditLink
from ca.config import Config
from ca.generations import Generations, OnChange
from ca.policy import PARSE_ERRORS, Refused, TokenGrant
from ca.ssh import RevokedCerts, SSHPublicKey, blob_of, build_krl, parse_public_key
from ca.store import CertRecord, Store
from hsm.signers import HSMKey
from hsm.worker import HSMWorker

CRL_VALIDITY = dt.timedelta(hours=24)
OCSP_VALIDITY = dt.timedelta(hours=1)
REASONS = {r.name: r for r in x509.ReasonFlags if r not in (
    x509.ReasonFlags.unspecified, x509.ReasonFlags.remove_from_crl)}


@dataclass(frozen=True)
class Token:
    id: str
    role: str
    names: tuple[tuple[str, str], ...]
    principals: tuple[str, ...]
    expires: str
    used_at: str | None


@dataclass
class Authority:
    config: Config
    hsm: HSMWorker
    store: Store
    audit: AuditLink
    keys: dict[str, HSMKey]
    root: x509.Certificate
    issuing: x509.Certificate
    generations: Generations
    _crl_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _ocsp_cache: dict[int, tuple[int, dt.datetime, bytes]] = field(default_factory=dict)
    _identity_cache: dict[str, CertRecord] = field(default_factory=dict)
    revocations: OnChange[dict[int, tuple[dt.datetime, str | None]]] = field(init=False)
    revoked_ssh_keys: OnChange[frozenset[str]] = field(init=False)
    krl: OnChange[bytes] = field(init=False)

    def __post_init__(self) -> None:
        # What revocations made by any process of the daemon come to here, rebuilt
        # when the shared counters move (ca/generations.py).
        self.revocations = OnChange(self.generations, "revocations", self._load_revoked)
        self.revoked_ssh_keys = OnChange(
            self.generations, "ssh_revocations",
            lambda: frozenset(r[0] for r in self.store.read(
                "SELECT public_key FROM ssh_revoked_keys")))
        self.krl = OnChange(self.generations, "ssh_revocations", lambda: _build_krl(self))
        der = self.issuing.public_bytes(serialization.Encoding.DER)
        self.chain_pem = prof.pem(self.issuing) + prof.pem(self.root)
        self.chain_der = [der, self.root.public_bytes(serialization.Encoding.DER)]
        self._hash = prof.hash_for(self.keys["issuing"])
        self._hash_name = self._hash.name if self._hash else "none"

    # ---- tokens -------------------------------------------------------------------------

    async def create_token(self, grant: TokenGrant, actor: str) -> tuple[str, str, str]:
        """Return (secret token, id, expires). Only the secret's SHA-256 is stored."""
        token_id = secrets.token_hex(8)
        secret = f"hsmca-{token_id}-{secrets.token_urlsafe(32)}"
        now = prof.utcnow()
        expires = (now + dt.timedelta(seconds=grant.ttl_s)).isoformat()
        names = [list(n) for n in grant.names]

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO tokens (id, secret_sha256, role, names, principals, expires, "
                       "created_at, created_by) VALUES (?,?,?,?,?,?,?,?)",
                       (token_id, hashlib.sha256(secret.encode()).hexdigest(), grant.role,
                        json.dumps(names), json.dumps(list(grant.principals)), expires,
                        now.isoformat(), actor))

        await self.store.write(insert)
        await self.audit.append("token.create", id=token_id, role=grant.role,
                                names=[v for _, v in grant.names],
                                principals=list(grant.principals), expires=expires, actor=actor)
        return secret, token_id, expires

    def find_token(self, secret: str) -> Token | None:
        rows = self.store.read(
            "SELECT id, role, names, principals, expires, used_at FROM tokens "
            "WHERE secret_sha256 = ?", (hashlib.sha256(secret.encode()).hexdigest(),))
        if not rows:
            return None
        r = rows[0]
        return Token(r[0], r[1], tuple((k, v) for k, v in json.loads(r[2])),
                     tuple(json.loads(r[3])), r[4], r[5])

    async def consume_token(self, token: Token) -> None:
        """Mark a token used; exactly one concurrent caller succeeds."""
        now = prof.utcnow().isoformat()

        def consume(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE tokens SET used_at = ? WHERE id = ? AND used_at IS NULL",
                              (now, token.id)).rowcount

        if await self.store.write(consume) != 1:
            raise Refused("this bootstrap token has already been used", 401, "token")

    async def give_back_token(self, token: Token) -> None:
        """Issuance failed before anything was issued (HSM or log unavailable): the
        token is usable again, so the service can retry once the CA recovers."""

        def restore(db: sqlite3.Connection) -> None:
            db.execute("UPDATE tokens SET used_at = NULL WHERE id = ? AND used_serial IS NULL",
                       (token.id,))

        await self.store.write(restore)

    # ---- X.509 --------------------------------------------------------------------------

    async def issue_x509(self, *, subject: prof.SubjectKey, role: str,
                         names: tuple[tuple[str, str], ...],
                         principals: tuple[str, ...], lifetime_s: int, actor: str,
                         request_id: str | None, token_id: str | None = None,
                         ) -> x509.Certificate:
        by_kind: dict[str, list[str]] = {"dns": [], "ip": [], "uri": [], "email": []}
        for kind, value in names:
            by_kind[kind].append(value)
        url = self.config.public_url
        profile = prof.LeafProfile(
            public_key=subject.public_key, ski=subject.ski,
            common_name=prof.common_name_for([v for _, v in names]),
            dns_names=by_kind["dns"],
            ip_addresses=by_kind["ip"], uris=by_kind["uri"], emails=by_kind["email"],
            lifetime=dt.timedelta(seconds=lifetime_s), serial=prof.random_serial(),
            crl_url=f"{url}/v1/x509/crl" if url else None,
            ocsp_url=f"{url}/v1/x509/ocsp" if url else None)
        now = prof.utcnow()
        builder = prof.leaf_builder(profile, self.issuing, now)
        not_before = now - prof.BACKDATE
        not_after = min(now + profile.lifetime, self.issuing.not_valid_after_utc)
        spki = subject.spki_sha256
        serial_hex = format(profile.serial, "x")
        flat = [v for _, v in names]
        h = self._hash
        issued: list[tuple[bytes, str]] = []  # (DER, fingerprint): describe() runs first

        def describe(cert: x509.Certificate) -> dict[str, str]:
            der = cert.public_bytes(serialization.Encoding.DER)
            issued.append((der, hashlib.sha256(der).hexdigest()))
            return {"fingerprint": issued[0][1]}

        def record(cert: x509.Certificate) -> cf.Future[None]:
            der, fingerprint = issued[0]

            def insert(db: sqlite3.Connection) -> None:
                Store.insert_cert(
                    db, serial=cert.serial_number, fingerprint=fingerprint, role=role,
                    subject=cert.subject.rfc4514_string(), names=flat,
                    principals=list(principals), spki_sha256=spki,
                    not_before=not_before.isoformat(), not_after=not_after.isoformat(),
                    issued_at=now.isoformat(), der=der)
                if token_id is not None:
                    db.execute("UPDATE tokens SET used_serial = ? WHERE id = ?",
                               (serial_hex, token_id))
            return self.store.write_future(insert)

        return await self.hsm.sign(
            self.keys["issuing"], lambda k: builder.sign(k, h), purpose="x509", actor=actor,
            request_id=request_id, hash_name=self._hash_name,
            details={"serial": serial_hex, "role": role, "names": flat,
                     "principals": list(principals), "spki_sha256": spki,
                     "not_before": not_before.isoformat(), "not_after": not_after.isoformat()},
            describe=describe, also=record)

    def identity(self, fp: str) -> CertRecord | None:
        """The inventory record of a presented client certificate, by the SHA-256 of its
        DER (cached)."""
        rec = self._identity_cache.get(fp)
        if rec is None:
            rec = self.store.cert_by_fingerprint(fp)
            if rec is None:
                return None
            if len(self._identity_cache) > 10_000:
                self._identity_cache.clear()
            self._identity_cache[fp] = rec
        return rec

    def _load_revoked(self) -> dict[int, tuple[dt.datetime, str | None]]:
        return {int(serial_hex, 16): (dt.datetime.fromisoformat(at), reason)
                for serial_hex, at, reason in self.store.revoked()}

    def is_revoked(self, serial_hex: str) -> bool:
        return int(serial_hex, 16) in self.revocations.get()[1]

    async def revoke(self, serial: int, reason: str | None, actor: str,
                     request_id: str | None) -> dt.datetime:
        if reason is not None and reason not in REASONS:
            raise Refused(f"reason must be one of {', '.join(sorted(REASONS))}")
        rec = self.store.cert(serial)
        if rec is None:
            raise Refused(f"no certificate with serial {serial:x} was issued by this CA",
                          404, "not-found")
        if rec.revoked_at is not None:
            raise Refused(f"certificate {serial:x} is already revoked", 409, "conflict")
        now = prof.utcnow()
        # The record first: a revocation the log does not show never happened.
        await self.audit.append("cert.revoke", serial=format(serial, "x"), reason=reason,
                                actor=actor, request_id=request_id)

        def mark(db: sqlite3.Connection) -> int:
            return db.execute("UPDATE certs SET revoked_at = ?, reason = ? WHERE serial = ? "
                              "AND revoked_at IS NULL",
                              (now.isoformat(), reason, format(serial, "x"))).rowcount

        if await self.store.write(mark) != 1:
            raise Refused(f"certificate {serial:x} is already revoked", 409, "conflict")
        self.generations.bump("revocations")  # committed: every process reloads
        # The stored CRL is stale from now on (its generation is behind): if re-signing
        # fails here, the next GET tries again.
        await self.refresh_crl(actor, request_id)
        return now

    # ---- CRL and OCSP -------------------------------------------------------------------

    async def crl(self) -> bytes:
        """The newest CRL, re-signed when a revocation is missing from it or half its
        validity has passed. Kept in the inventory, so every worker serves the same
        one and CRL numbers only grow. (Revocations are never undone, so a CRL that
        lists as many as the inventory holds lists them all.)"""
        for _ in range(3):  # a revocation racing the refresh: sign again, with it
            der = self._current_crl()
            if der is not None:
                return der
            await self.refresh_crl("local", None, only_if_stale=True)
        latest = self.store.latest_crl()
        if latest is None:  # refresh_crl raises when it cannot sign; never serve nothing
            raise RuntimeError("no CRL after a successful refresh")
        return latest[3]

    def _current_crl(self) -> bytes | None:
        """The newest stored CRL if it lists every revocation and is fresh."""
        _, revoked = self.revocations.get()
        latest = self.store.latest_crl()
        if latest is None:
            return None
        _, listed, this_update, der = latest
        age = prof.utcnow() - dt.datetime.fromisoformat(this_update)
        return der if listed >= len(revoked) and age <= CRL_VALIDITY / 2 else None

    async def refresh_crl(self, actor: str, request_id: str | None,
                          only_if_stale: bool = False) -> None:
        async with self._crl_lock:
            if only_if_stale and self._current_crl() is not None:
                return  # another request re-signed it while this one waited
            _, revoked = self.revocations.get()
            number = await self.store.write(_next_crl_number)
            now = prof.utcnow()
            b = (x509.CertificateRevocationListBuilder().issuer_name(self.issuing.subject)
                 .last_update(now).next_update(now + CRL_VALIDITY)
                 .add_extension(x509.CRLNumber(number), critical=False)
                 .add_extension(prof._aki(self.issuing), critical=False))
            for serial, (at, reason) in sorted(revoked.items()):
                rb = (x509.RevokedCertificateBuilder().serial_number(serial)
                      .revocation_date(at))
                if reason:
                    rb = rb.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
                b = b.add_revoked_certificate(rb.build())
            h = self._hash
            crl = await self.hsm.sign(
                self.keys["issuing"], lambda k: b.sign(k, h), purpose="crl", actor=actor,
                request_id=request_id, hash_name=self._hash_name,
                details={"crl_number": number, "revoked": len(revoked),
                         "this_update": now.isoformat(),
                         "next_update": (now + CRL_VALIDITY).isoformat()},
                describe=lambda c: {"fingerprint": hashlib.sha256(
                    c.public_bytes(serialization.Encoding.DER)).hexdigest()})
            der = crl.public_bytes(serialization.Encoding.DER)

            def keep(db: sqlite3.Connection) -> None:
                db.execute("INSERT INTO crls (number, revoked, this_update, der) "
                           "VALUES (?,?,?,?)", (number, len(revoked), now.isoformat(), der))
                db.execute("DELETE FROM crls WHERE number < ?", (number - 16,))

            await self.store.write(keep)

    async def ocsp(self, request_der: bytes, request_id: str | None) -> bytes:
        try:
            req = ocsp.load_der_ocsp_request(request_der)
            extensions = req.extensions  # parsed lazily: anything malformed shows here
            nonce = _nonce(extensions)
        except PARSE_ERRORS as exc:
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, exc)
        try:
            issuer_key_hash = _key_hash(self.issuing, req.hash_algorithm)
        except (UnsupportedAlgorithm, ValueError) as exc:  # e.g. an MD5 CertID
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, exc)
        if req.issuer_key_hash != issuer_key_hash:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED, None)
        serial = req.serial_number
        now = prof.utcnow()
        gen, revoked = self.revocations.get()
        cached = self._ocsp_cache.get(serial)
        if (cached is not None and cached[0] == gen and now - cached[1] < OCSP_VALIDITY / 2
                and not extensions):
            return cached[2]
        status, rev_time, rev_reason = ocsp.OCSPCertStatus.GOOD, None, None
        if serial in revoked:
            at, reason = revoked[serial]
            status, rev_time = ocsp.OCSPCertStatus.REVOKED, at
            rev_reason = REASONS[reason] if reason else None
        elif self.store.cert(serial) is None:
            status = ocsp.OCSPCertStatus.UNKNOWN
        b = (ocsp.OCSPResponseBuilder()
             .add_response_by_hash(
                 issuer_name_hash=req.issuer_name_hash, issuer_key_hash=req.issuer_key_hash,
                 serial_number=serial, algorithm=req.hash_algorithm, cert_status=status,
                 this_update=now, next_update=now + OCSP_VALIDITY, revocation_time=rev_time,
                 revocation_reason=rev_reason)
             .responder_id(ocsp.OCSPResponderEncoding.HASH, self.issuing))
        if nonce is not None:
            b = b.add_extension(nonce, critical=False)
        h = self._hash
        resp = await self.hsm.sign(
            self.keys["issuing"], lambda k: b.sign(k, h), purpose="ocsp", actor="anonymous",
            request_id=request_id, hash_name=self._hash_name,
            details={"serial": format(serial, "x"), "status": status.name})
        der = resp.public_bytes(serialization.Encoding.DER)
        if not extensions:
            if len(self._ocsp_cache) > 10_000:
                self._ocsp_cache.clear()
            self._ocsp_cache[serial] = (gen, now, der)
        return der


def _nonce(extensions: x509.Extensions) -> x509.OCSPNonce | None:
    try:
        return extensions.get_extension_for_class(x509.OCSPNonce).value
    except x509.ExtensionNotFound:
        return None


def _next_crl_number(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT v FROM meta WHERE k = 'crl_number'").fetchone()
    number = int(row[0]) + 1 if row else 1
    db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('crl_number', ?)", (str(number),))
    return number


def _key_hash(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    """RFC 6960 issuerKeyHash of `cert`, computed by cryptography's own request builder."""
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, cert, algorithm).build()
    return req.issuer_key_hash


def _unsuccessful(status: ocsp.OCSPResponseStatus, _exc: Exception | None) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)


# ---- SSH ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SSHRequest:
    """An approved SSH certificate request (policy has checked everything)."""

    cert_type: str  # "user" | "host"
    public_key: SSHPublicKey
    principals: tuple[str, ...]
    lifetime_s: int
    identity: str
    owner_serial: str
    extensions: tuple[str, ...] = ()
    source_address: str | None = None


async def issue_ssh(auth: Authority, req: SSHRequest, actor: str, request_id: str | None
                    ) -> SSHCertificate:
    if req.public_key.line in auth.revoked_ssh_keys.get()[1]:
        raise Refused(f"the public key {req.public_key.sha256} has been revoked; make a new "
                      "key", 403, "revoked-key")
    serial = 0
    while serial == 0:
        serial = secrets.randbits(64)
    key_id = f"{req.identity}:{serial}"
    now = int(prof.utcnow().timestamp())
    valid_after, valid_before = now - 60, now + req.lifetime_s
    user = req.cert_type == "user"
    b = (serialization.SSHCertificateBuilder()
         .public_key(req.public_key.key)  # type: ignore[arg-type]
         .serial(serial)
         .type(serialization.SSHCertificateType.USER if user
               else serialization.SSHCertificateType.HOST)
         .key_id(key_id.encode())
         .valid_principals([p.encode() for p in req.principals])
         .valid_after(valid_after).valid_before(valid_before))
    for ext in sorted(req.extensions):
        b = b.add_extension(ext.encode(), b"")
    if req.source_address:
        b = b.add_critical_option(b"source-address", req.source_address.encode())
    key = auth.keys["ssh_user" if user else "ssh_host"]
    issued_at = prof.utcnow().isoformat()

    def record(cert: SSHCertificate) -> cf.Future[None]:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO ssh_certs (serial, key_id, cert_type, key_sha256, public_key, "
                "principals, valid_after, valid_before, owner_serial, issued_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                (str(serial), key_id, req.cert_type, req.public_key.sha256, req.public_key.line,
                 json.dumps(list(req.principals)), str(valid_after), str(valid_before),
                 req.owner_serial, issued_at))
        return auth.store.write_future(insert)

    # RSA CA keys sign SSH certificates with rsa-sha2-512 (cryptography's choice).
    hash_name = "sha512" if key.key_type.startswith("rsa") else "sha256"
    return await auth.hsm.sign(
        key, lambda k: b.sign(k), purpose=f"ssh-{req.cert_type}", actor=actor,
        request_id=request_id, hash_name=hash_name,
        details={"serial": str(serial), "key_id": key_id, "principals": list(req.principals),
                 "public_key_sha256": req.public_key.sha256, "valid_after": valid_after,
                 "valid_before": valid_before, "source_address": req.source_address},
        describe=lambda c: {"fingerprint": hashlib.sha256(c.public_bytes()).hexdigest()},
        also=record)


async def revoke_ssh(auth: Authority, *, serial: str | None, key_id: str | None,
                     public_key: SSHPublicKey | None, actor: str, request_id: str | None
                     ) -> int:
    """Revoke by serial, key id or public key; returns how many certificates it hit."""
    now = prof.utcnow().isoformat()
    if serial is not None:
        where, arg = "serial = ?", serial
    elif key_id is not None:
        where, arg = "key_id = ?", key_id
    elif public_key is not None:
        where, arg = "key_sha256 = ?", public_key.sha256
    else:
        raise Refused("give a serial, a key id or a public key to revoke")
    matching = len(auth.store.read(
        f"SELECT 1 FROM ssh_certs WHERE {where} AND revoked_at IS NULL", (arg,)))
    if matching == 0 and public_key is None:
        what = f"serial {serial}" if serial is not None else f"key id {key_id!r}"
        raise Refused(f"no unrevoked SSH certificate with {what}", 404, "not-found")
    # The record first, as for X.509: a revocation the log does not show never happened.
    await auth.audit.append("ssh.revoke", serial=serial, key_id=key_id,
                            public_key_sha256=public_key.sha256 if public_key else None,
                            certificates=matching, actor=actor, request_id=request_id)

    def mark(db: sqlite3.Connection) -> int:
        if public_key is not None:
            db.execute("INSERT OR IGNORE INTO ssh_revoked_keys (public_key, revoked_at) "
                       "VALUES (?, ?)", (public_key.line, now))
        return db.execute(f"UPDATE ssh_certs SET revoked_at = ? WHERE {where} "
                          "AND revoked_at IS NULL", (now, arg)).rowcount

    hit = await auth.store.write(mark)
    auth.generations.bump("ssh_revocations")  # committed: every process rebuilds its KRL
    return hit


def build_current_krl(auth: Authority) -> bytes:
    return auth.krl.get()[1]


def _build_krl(auth: Authority) -> bytes:
    rows = auth.store.read("SELECT cert_type, serial FROM ssh_certs WHERE revoked_at IS NOT NULL")
    keys = [r[0] for r in auth.store.read("SELECT public_key FROM ssh_revoked_keys")]
    groups = []
    for cert_type, purpose in (("user", "ssh_user"), ("host", "ssh_host")):
        serials = [int(s) for t, s in rows if t == cert_type]
        groups.append(RevokedCerts(blob_of(auth.keys[purpose].public_key()), serials, []))
    now = int(prof.utcnow().timestamp())
    blobs = [parse_public_key(k).blob for k in keys]
    return build_krl(now, now, groups, blobs)
