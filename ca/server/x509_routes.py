"""X.509 endpoints: tokens, enroll, renew, revoke, CRL, OCSP, chain, EST."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from ca import policy
from ca import x509 as prof
from ca.authority import Authority, Token
from ca.server.common import authority, field, identity, json_body, parse_csr
from ca.server.problems import Problem
from ca.x509 import pem, utcnow

routes = web.RouteTableDef()
PKCS7_CERTS = "application/pkcs7-mime; smime-type=certs-only"


def _issued(cert: x509.Certificate, auth: Authority) -> dict[str, Any]:
    return {"serial": format(cert.serial_number, "x"), "certificate": pem(cert),
            "chain": auth.chain_pem, "not_after": cert.not_valid_after_utc.isoformat()}


def _lifetime(auth: Authority, body: dict[str, Any]) -> int:
    p = auth.config.policy
    ttl = body.get("ttl")
    if ttl is None:
        return p.x509_default_ttl_s
    if not isinstance(ttl, str):
        raise Problem(400, "Bad Request", "field 'ttl' must be a string like '24h'", "bad-field")
    seconds = policy.parse_ttl(ttl)
    if seconds > p.x509_max_ttl_s:
        raise policy.Refused(f"ttl {ttl} exceeds the maximum of {p.x509_max_ttl_s}s")
    return seconds


@routes.post("/v1/tokens")
async def create_token(request: web.Request) -> web.Response:
    who = identity(request, "admin")
    auth = authority(request)
    grant = policy.token_request(await json_body(request), auth.config.policy)
    secret, token_id, expires = await auth.create_token(grant, who.actor)
    return web.json_response({"token": secret, "id": token_id, "expires": expires}, status=201)


async def _bearer(request: web.Request) -> Token:
    # The failure counts are the primary's, so the limit holds for the whole daemon
    # whichever worker a client's connections reach.
    auth = authority(request)
    link = auth.audit
    client = request.remote or "-"
    wait = (await link.ask("limit", client=client))["retry_after"]
    if wait:
        raise Problem(429, "Too Many Requests", f"too many failed bootstrap-token attempts "
                      f"from {client}; retry in {wait} s", "rate-limited")
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        await link.ask("limit", client=client, failed=True)
        raise Problem(401, "Unauthorized", "send the bootstrap token as 'Authorization: Bearer "
                      "<token>'", "token-required")
    token = auth.find_token(secret.strip()[:512])
    if token is None:
        await link.ask("limit", client=client, failed=True)
        raise Problem(401, "Unauthorized", "unknown bootstrap token", "bad-token")
    if token.used_at is not None:
        raise Problem(401, "Unauthorized", "this bootstrap token has already been used",
                      "bad-token")
    if token.expires < utcnow().isoformat():
        raise Problem(401, "Unauthorized", f"this bootstrap token expired at {token.expires}",
                      "bad-token")
    return token


async def _enroll_with_token(request: web.Request, token: Token,
                             csr: x509.CertificateSigningRequest,
                             body: dict[str, Any]) -> x509.Certificate:
    auth = authority(request)
    policy.check_csr(csr)
    names = policy.names_within(policy.csr_names(csr), token.names,
                                auth.config.policy.allow_wildcards)
    lifetime = _lifetime(auth, body)
    await auth.consume_token(token)  # after every check, so a bad CSR does not burn it
    try:
        return await auth.issue_x509(
            subject=prof.subject_key(csr.public_key()), role=token.role, names=names,
            principals=token.principals, lifetime_s=lifetime,
            actor=f"bootstrap-token:{token.id}", request_id=request.get("request_id"),
            token_id=token.id)
    except Exception:
        # Nothing reached the inventory (used_serial is set in the same transaction
        # as the certificate row), so the token may be used again.
        await auth.give_back_token(token)
        raise


@routes.post("/v1/x509/enroll")
async def enroll(request: web.Request) -> web.Response:
    token = await _bearer(request)
    body = await json_body(request)
    csr = parse_csr(field(body, "csr", str))
    cert = await _enroll_with_token(request, token, csr, body)
    return web.json_response(_issued(cert, authority(request)), status=201)


async def _renew(request: web.Request, csr: x509.CertificateSigningRequest | None,
                 body: dict[str, Any]) -> x509.Certificate:
    who = identity(request)
    auth = authority(request)
    rec = who.record
    if csr is not None:
        policy.check_csr(csr)
        subject = prof.subject_key(csr.public_key())
    else:
        subject = prof.presented_subject_key(who.der)
    # Names come from the inventory record of the presented certificate: never widened.
    names = tuple(policy.classify(n, True) for n in rec.names)
    return await auth.issue_x509(
        subject=subject, role=rec.role, names=names, principals=tuple(rec.principals),
        lifetime_s=_lifetime(auth, body), actor=who.actor, request_id=request.get("request_id"))


@routes.post("/v1/x509/renew")
async def renew(request: web.Request) -> web.Response:
    body = await json_body(request)
    unknown = set(body) - {"csr", "ttl"}
    if unknown:
        raise Problem(400, "Bad Request", f"unknown field(s): {', '.join(sorted(unknown))}")
    csr = parse_csr(field(body, "csr", str)) if "csr" in body else None
    cert = await _renew(request, csr, body)
    return web.json_response(_issued(cert, authority(request)), status=201)


@routes.post("/v1/x509/revoke")
async def revoke(request: web.Request) -> web.Response:
    who = identity(request)
    body = await json_body(request)
    serial_text = field(body, "serial", str)
    reason = field(body, "reason", str, required=False)
    try:
        serial = int(serial_text, 16)
        if serial <= 0 or len(serial_text) > 40:
            raise ValueError
    except ValueError:
        raise Problem(400, "Bad Request", "serial must be the certificate's serial number in "
                      "hex (as returned at issuance)", "bad-field") from None
    if who.record.role != "admin" and serial != who.serial:
        raise Problem(403, "Forbidden", "only an admin may revoke another certificate; you may "
                      "revoke your own", "wrong-role")
    at = await authority(request).revoke(serial, reason, who.actor, request.get("request_id"))
    return web.json_response({"serial": format(serial, "x"), "revoked_at": at.isoformat()})


@routes.get("/v1/x509/crl")
async def crl(request: web.Request) -> web.Response:
    return web.Response(body=await authority(request).crl(), content_type="application/pkix-crl")


@routes.post("/v1/x509/ocsp")
async def ocsp_post(request: web.Request) -> web.Response:
    der = await request.read()
    resp = await authority(request).ocsp(der, request.get("request_id"))
    return web.Response(body=resp, content_type="application/ocsp-response")


@routes.get("/v1/x509/ocsp/{b64:.+}")
async def ocsp_get(request: web.Request) -> web.Response:
    text = request.match_info["b64"]
    try:
        der = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_"
                               if "-" in text or "_" in text else None, validate=False)
    except (binascii.Error, ValueError):
        der = b""
    resp = await authority(request).ocsp(der, request.get("request_id"))
    return web.Response(body=resp, content_type="application/ocsp-response")


@routes.get("/v1/x509/roots")
async def roots(request: web.Request) -> web.Response:
    return web.Response(text=pem(authority(request).root), content_type="application/x-pem-file")


@routes.get("/v1/x509/chain")
async def chain(request: web.Request) -> web.Response:
    return web.Response(text=authority(request).chain_pem, content_type="application/x-pem-file")


# ---- EST (RFC 7030) ---------------------------------------------------------------------

def _pkcs7_b64(certs: list[x509.Certificate]) -> web.Response:
    der = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
    body = base64.encodebytes(der)
    return web.Response(body=body, headers={"Content-Type": PKCS7_CERTS,
                                            "Content-Transfer-Encoding": "base64"})


async def _est_csr(request: web.Request) -> x509.CertificateSigningRequest:
    if request.content_type != "application/pkcs10":
        raise Problem(415, "Unsupported Media Type", "EST enrollment takes a base64 DER PKCS#10 "
                      "body with 'Content-Type: application/pkcs10'")
    raw = await request.read()
    try:
        der = base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Problem(400, "Bad Request", "the body is not base64", "bad-csr") from None
    return parse_csr(der, der=True)


@routes.get("/.well-known/est/cacerts")
async def est_cacerts(request: web.Request) -> web.Response:
    auth = authority(request)
    return _pkcs7_b64([auth.issuing, auth.root])


@routes.post("/.well-known/est/simpleenroll")
async def est_simpleenroll(request: web.Request) -> web.Response:
    csr = await _est_csr(request)
    if request.headers.get("Authorization"):
        cert = await _enroll_with_token(request, await _bearer(request), csr, {})
    else:
        cert = await _renew(request, csr, {})
    return _pkcs7_b64([cert])


@routes.post("/.well-known/est/simplereenroll")
async def est_simplereenroll(request: web.Request) -> web.Response:
    csr = await _est_csr(request)
    return _pkcs7_b64([await _renew(request, csr, {})])
