"""Helpers every route uses: the caller's identity, JSON bodies, CSR parsing."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509

from ca.authority import Authority
from ca.metrics import Metrics
from ca.policy import PARSE_ERRORS
from ca.server.problems import Problem
from ca.store import CertRecord

AUTHORITY = web.AppKey("authority", Authority)
METRICS = web.AppKey("metrics", Metrics)


@dataclass(frozen=True)
class Identity:
    record: CertRecord
    der: bytes
    fingerprint: str

    @property
    def actor(self) -> str:
        return f"cert:{self.fingerprint}:{self.record.subject}"

    @property
    def serial(self) -> int:
        return int(self.record.serial, 16)


def authority(request: web.Request) -> Authority:
    return request.app[AUTHORITY]


def peer_der(request: web.Request) -> bytes | None:
    transport = request.transport
    sslobj: ssl.SSLObject | None = transport.get_extra_info("ssl_object") if transport else None
    if sslobj is None:
        return None
    return sslobj.getpeercert(binary_form=True)


def identity(request: web.Request, *roles: str) -> Identity:
    """The inventory record behind the client certificate; 401/403 otherwise.

    The TLS layer has already checked the chain to our CA and the validity period;
    here the certificate must also be one we issued (in the inventory), unrevoked,
    and of one of `roles` (from the inventory, never from anything the client says).
    """
    cached = request.get("identity")
    if cached is None:
        der = peer_der(request)
        if der is None:
            raise Problem(401, "Unauthorized", "this endpoint needs a client certificate issued "
                          "by this CA (mutual TLS)", "client-certificate-required")
        auth = authority(request)
        fingerprint = hashlib.sha256(der).hexdigest()
        rec = auth.identity(fingerprint)
        if rec is None:
            raise Problem(403, "Forbidden", "the client certificate is not in this CA's "
                          "inventory", "unknown-certificate")
        if auth.is_revoked(rec.serial):
            raise Problem(403, "Forbidden", f"the client certificate {rec.serial} has been "
                          "revoked", "revoked-certificate")
        if dt.datetime.fromisoformat(rec.not_after) < dt.datetime.now(dt.UTC):
            raise Problem(403, "Forbidden", "the client certificate has expired",
                          "expired-certificate")
        cached = Identity(rec, der, fingerprint)
        request["identity"] = cached
    if roles and cached.record.role not in roles:
        raise Problem(403, "Forbidden", f"this endpoint is for role {' or '.join(roles)}; your "
                      f"certificate has role {cached.record.role}", "wrong-role")
    return cached


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Problem(415, "Unsupported Media Type", "send the body as JSON with "
                      "'Content-Type: application/json'")
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nesting bombs included
        raise Problem(400, "Bad Request", "the body is not valid JSON", "bad-json") from None
    if not isinstance(body, dict):
        raise Problem(400, "Bad Request", "the body must be a JSON object", "bad-json")
    return body


def field(body: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    if name not in body:
        if required:
            raise Problem(400, "Bad Request", f"missing field {name!r}", "bad-field")
        return None
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Problem(400, "Bad Request", f"field {name!r} must be a {kind.__name__}",
                      "bad-field")
    return value


def parse_csr(data: str | bytes, der: bool = False) -> x509.CertificateSigningRequest:
    try:
        if der:
            return x509.load_der_x509_csr(data if isinstance(data, bytes) else data.encode())
        text = data.encode() if isinstance(data, str) else data
        if b"-----BEGIN CERTIFICATE REQUEST-----" not in text:
            raise ValueError("no PEM CERTIFICATE REQUEST block")
        return x509.load_pem_x509_csr(text)
    except (*PARSE_ERRORS, UnicodeError) as exc:
        raise Problem(400, "Bad Request", f"the CSR cannot be parsed: {str(exc)[:200]}",
                      "bad-csr") from None
