"""What every route uses: the app's parts (typed keys), the caller's identity, JSON
bodies, CSR parsing. Routes parse and answer; the registration authority decides."""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from cryptography import x509

from ca import ra, strict_json
from ca.audit import wire
from ca.http_body import read_body
from ca.issuance.issue import Issuance, IssuerSource, decision_context
from ca.lifecycle import KeyLifecycle
from ca.metrics import Metrics
from ca.policy import PARSE_ERRORS, Policy, parse_error
from ca.revocation import Revocations
from ca.server.problems import Problem
from ca.store import CertRecord, Store
from ca.tokens import Tokens
from ca.validity import ended


class AuditReader(Protocol):
    """The audit log as the routes see it (ca/audit/link.py in a worker)."""

    problem: str | None

    def waited(self) -> float: ...
    async def append(self, event: str, **fields: Any) -> int: ...
    async def read(self, start: int, limit: int) -> bytes: ...
    async def inclusion_proof(self, index: int, size: int) -> list[bytes]: ...
    async def consistency_proof(self, old: int, size: int) -> list[bytes]: ...
    async def tile(self, level: int, index: int, width: int) -> bytes | None: ...
    async def entries(self, index: int, width: int) -> bytes | None: ...
    async def checkpoint(self, cosigned: bool = False) -> str | None: ...
    async def witnesses(self) -> str: ...
    async def health(self) -> wire.Health: ...


class TokenLimit(Protocol):
    async def token_failed(self, client: str) -> int: ...


class Health(Protocol):
    """The signing thread's HSM session, as /health and /metrics see it."""

    @property
    def healthy(self) -> bool: ...
    @property
    def problem(self) -> str | None: ...
    @property
    def queue_depth(self) -> int: ...
    async def probe(self, max_wait: float = 1.0) -> None: ...


@dataclass
class Settings:
    metrics_allow: tuple[Any, ...]
    audit_origin: str
    node: str | None = None  # cluster mode: this node's name, which names its log
    # The names clients reach the daemon by (its certificate's, the public URL's host,
    # loopback): the only Host an ACME request may name, since its URLs are built on it
    own_names: tuple[str, ...] = ()
    # This node's own admin credential (STATE/admin/cert.pem), which its daemon renews
    admin_cert: Path | None = None


class Gate:
    """Who a client is (from the inventory) and the registration authority's context
    as of now."""

    def __init__(self, store: Store, revocations: Revocations, keys: IssuerSource,
                 policy: Callable[[], Policy]) -> None:
        self.store, self.revocations, self.keys, self._policy = (
            store, revocations, keys, policy)
        self._cache: OrderedDict[str, CertRecord] = OrderedDict()

    # The clients seen lately. Each renewal presents a certificate never seen before, so
    # a larger bound only held records nobody would present again: a soak trial watched
    # each worker grow about 4 KB a certificate, toward 10,000 of them.
    CACHED_RECORDS = 1024

    async def record(self, fingerprint: str) -> CertRecord | None:
        """The inventory record of a presented client certificate, by the SHA-256 of its
        DER (cached: records never change but for revocation, checked apart)."""
        rec = self._cache.get(fingerprint)
        if rec is not None:
            self._cache.move_to_end(fingerprint)
            return rec
        rec = await self.store.cert_by_fingerprint(fingerprint)
        if rec is None:
            return None
        self._cache[fingerprint] = rec
        if len(self._cache) > self.CACHED_RECORDS:
            self._cache.popitem(last=False)
        return rec

    async def context(self) -> ra.Context:
        _, revoked_keys = await self.revocations.revoked_ssh_keys.get()
        _, compromised = await self.revocations.compromised_keys.get()
        return decision_context(self._policy(), await self.keys.refresh(),
                                revoked_keys.__contains__, compromised.__contains__)


GATE = web.AppKey("gate", Gate)
TOKENS = web.AppKey("tokens", Tokens)
ISSUANCE = web.AppKey("issuance", Issuance)
REVOCATIONS = web.AppKey("revocations", Revocations)
AUDIT = web.AppKey("audit", AuditReader)
LIMIT = web.AppKey("token_limit", TokenLimit)
HSM_HEALTH = web.AppKey("hsm_health", Health)
STORE = web.AppKey("store", Store)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", KeyLifecycle)


def peer_der(request: web.Request) -> bytes | None:
    transport = request.transport
    sslobj: ssl.SSLObject | None = transport.get_extra_info("ssl_object") if transport else None
    if sslobj is None:
        return None
    return sslobj.getpeercert(binary_form=True)


async def identity(request: web.Request, *roles: str) -> ra.CertHolder:
    """The inventory record behind the client certificate; 401/403 otherwise.

    The TLS layer has already checked the chain to our CA (not the validity period:
    see ca/server/app.py tls_context); here the certificate must also be one we issued
    (in the inventory), unrevoked, unexpired, and (for the read-only endpoints that name
    them) of one of `roles`, from the inventory, never from anything the client says.
    """
    cached: ra.CertHolder | None = request.get("identity")
    if cached is None:
        der = peer_der(request)
        if der is None:
            # 403, not 401: a 401 must name an HTTP scheme that would do (RFC 9110
            # 15.5.2), and none would; the credential is the TLS client certificate.
            # Some HTTP stacks treat a 401 without a challenge as a protocol error (an
            # API trial), and EST's simplereenroll already answered 403.
            raise Problem(403, "Forbidden", "this endpoint needs a client certificate issued "
                          "by this CA (mutual TLS)", "client-certificate-required")
        gate = request.app[GATE]
        fingerprint = hashlib.sha256(der).hexdigest()
        rec = await gate.record(fingerprint)
        if rec is None:
            # It chains to this CA (the handshake checked), so this CA issued it and
            # does not know it: restored from a backup older than the certificate (an
            # operator trial was told no more than the first half).
            raise Problem(403, "Forbidden", "the client certificate is not in this CA's "
                          "inventory: this CA's key signed it, but the CA does not know it "
                          "(it was restored from a backup taken before the certificate was "
                          "issued); enroll again with a new bootstrap token from an admin "
                          "(hsmca token create)", "unknown-certificate")
        if await gate.revocations.is_revoked(rec.serial):
            raise Problem(403, "Forbidden", f"the client certificate {rec.serial} has been "
                          "revoked: it can no longer renew or ask for anything; enroll "
                          "again with a new bootstrap token from an admin",
                          "revoked-certificate")
        issuers = await request.app[ISSUANCE].keys.refresh()  # a counter read
        if issuers.revoked_ca and (by := issuers.x509_of(rec.issuer)) in issuers.revoked_ca:
            reason = issuers.revoked_ca[by][2] or "unspecified"
            raise Problem(403, "Forbidden", f"the CA certificate of {by}, which issued the "
                          f"client certificate {rec.serial}, was revoked ({reason}): nothing "
                          "it issued authenticates any more; enroll again with a new "
                          "bootstrap token from an admin", "revoked-certificate")
        if ended(dt.datetime.fromisoformat(rec.not_after), dt.datetime.now(dt.UTC)):
            raise Problem(403, "Forbidden", "the client certificate has expired: enroll "
                          "again with a new bootstrap token from an admin",
                          "expired-certificate")
        cached = ra.CertHolder(rec.serial, fingerprint, rec.subject, rec.role, rec.names,
                               rec.principals, der, rec.acme_order)
        request["identity"] = cached
    if roles and cached.role not in roles:
        raise Problem(403, "Forbidden", f"this endpoint is for role {' or '.join(roles)}; your "
                      f"certificate has role {cached.role}", "wrong-role")
    return cached


async def decide(request: web.Request, who: ra.Requester, req: ra.Request) -> Any:
    """The registration authority's order for `req`, or its refusal raised."""
    return ra.order(await request.app[GATE].context(), who, req)


async def json_body(request: web.Request, allowed: set[str] | None = None) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Problem(415, "Unsupported Media Type", "send the body as JSON with "
                      "'Content-Type: application/json'")
    raw = await read_body(request)
    if not raw:
        return {}
    try:
        body = strict_json.loads(raw)
    except strict_json.NotUnicode as exc:
        raise Problem(400, "Bad Request", f"the body {exc}", "bad-json") from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # nesting bombs included
        raise Problem(400, "Bad Request", "the body is not valid JSON", "bad-json") from None
    if not isinstance(body, dict):
        raise Problem(400, "Bad Request", "the body must be a JSON object", "bad-json")
    if allowed is not None:
        extra = set(body) - allowed
        if extra:
            raise Problem(400, "Bad Request", f"unknown field(s): {', '.join(sorted(extra))}",
                          "bad-field")
    return body


# A field's expected type as JSON says it (not Python's `str`, `int`).
_JSON_KINDS = {str: "a string", int: "a whole number", float: "a number",
               bool: "true or false", list: "a list", dict: "an object"}


# What a field's value looks like, said when its type is wrong (a `ttl` of 60 was
# told "must be a string" where the RA had said "like \"60s\"": a review).
_LIKE = {"ttl": ' (a duration such as "900s", "15m", "24h" or "7d")'}


def known_query(request: web.Request, *names: str) -> None:
    """A parameter the endpoint does not take is refused, as a body's unknown field is:
    an API trial's misspelt `?stauts=revoked` listed every certificate, and another's
    `?strat=500` of the audit log read from line 0."""
    unknown = sorted(set(request.query) - set(names))
    if unknown:
        raise Problem(400, "Bad Request", f"unknown query parameter(s): {', '.join(unknown)} "
                      f"(this endpoint takes {', '.join(names)})", "bad-query")


def field(body: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    """`body[name]` if it is of JSON type `kind`; a missing optional field, or one
    given as null, is None."""
    if body.get(name) is None:
        if required:  # (null said as such: an SSH trial's was told "missing")
            said = f"field {name!r} is null" if name in body else f"missing field {name!r}"
            raise Problem(400, "Bad Request", f"{said}: it is required, as "
                          f"{_JSON_KINDS.get(kind, kind.__name__)}{_LIKE.get(name, '')}",
                          "bad-field")
        return None
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Problem(400, "Bad Request",
                      f"field {name!r} must be {_JSON_KINDS.get(kind, kind.__name__)}"
                      f"{_LIKE.get(name, '')}", "bad-field")
    return value


def parse_csr(data: str | bytes, der: bool = False) -> x509.CertificateSigningRequest:
    try:
        if der:
            return x509.load_der_x509_csr(data if isinstance(data, bytes) else data.encode())
        text = data.encode() if isinstance(data, str) else data
        # The older label (Windows certreq, keytool) names the same structure.
        text = text.replace(b"-----BEGIN NEW CERTIFICATE REQUEST-----",
                            b"-----BEGIN CERTIFICATE REQUEST-----").replace(
            b"-----END NEW CERTIFICATE REQUEST-----", b"-----END CERTIFICATE REQUEST-----")
        if b"-----BEGIN CERTIFICATE REQUEST-----" not in text:
            raise ValueError("no PEM CERTIFICATE REQUEST block")
        # One block: cryptography reads the first alone, and a second one (other names,
        # CA:TRUE) was accepted unread (a security trial). Text around it is left alone
        # (`openssl req -text` writes the request's dump before it).
        if text.count(b"-----BEGIN ") != 1:
            raise ValueError("the PEM holds more than one block; send one CERTIFICATE "
                             "REQUEST")
        return x509.load_pem_x509_csr(text)
    except (*PARSE_ERRORS, UnicodeError) as exc:
        raise Problem(400, "Bad Request", f"the CSR cannot be parsed: {parse_error(exc)}",
                      "bad-csr") from None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_date(when: dt.datetime) -> str:
    return email.utils.format_datetime(when.astimezone(dt.UTC), usegmt=True)


def revalidated(request: web.Request, body: bytes, content_type: str, *,
                modified: dt.datetime | None = None) -> web.Response:
    """`body` for a GET that relying parties poll (CRLs, the KRL, CA certificates):
    with an ETag, and Last-Modified when the document says when it was made, under
    `Cache-Control: no-cache`: a cache may keep it but asks each time, since a CRL is
    re-signed at every revocation. A GET with `If-None-Match` naming it gets 304 and no
    body (an API client's trial polled full CRLs, with nothing to go by).

    `If-Modified-Since` is not honoured (RFC 9110 13.1.3 lets a server ignore it): a
    CRL's time is whole seconds, so two signed in one second look alike, and a review
    kept a CRL without the later one's revocation; a poller's clock off by a little
    would lose revocations too. The ETag is the body's hash: it cannot."""
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"Cache-Control": "no-cache", "ETag": etag}
    if modified is not None:
        headers["Last-Modified"] = http_date(modified)
    if not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=content_type, headers=headers)


def not_modified(request: web.Request, etag: str) -> bool:
    """Whether a GET's `If-None-Match` names `etag` (RFC 9110 13.1.2): the client's copy
    is current, and it gets 304 with no body."""
    match = request.headers.get("If-None-Match")
    return request.method in ("GET", "HEAD") and match is not None and (
        match.strip() == "*" or etag in (tag.strip().removeprefix("W/")
                                         for tag in match.split(",")))

