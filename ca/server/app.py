"""The aiohttp application factory and the TLS context of the listener."""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path

import structlog
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from ca.audit.note import verifier_key
from ca.authority import Authority
from ca.server.common import AUTHORITY, authority
from ca.server.problems import Handler, problem, problem_middleware
from ca.server.ssh_routes import routes as ssh_routes
from ca.server.x509_routes import routes as x509_routes

MAX_BODY = 64 * 1024
CHECKPOINTER = web.AppKey("checkpointer", object)
log = structlog.get_logger("hsmca.http")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = uuid.uuid4().hex[:16]
    request["request_id"] = rid
    resp = await handler(request)
    resp.headers["X-Request-Id"] = rid
    return resp


routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    auth = authority(request)
    parts = {"hsm": "ok" if auth.hsm.healthy else f"unavailable: {auth.hsm.problem}",
             "audit": "ok" if auth.audit.healthy else f"unavailable: {auth.audit.problem}"}
    ok = all(v == "ok" for v in parts.values())
    return web.json_response({"status": "ok" if ok else "unavailable", **parts},
                             status=200 if ok else 503)


@routes.get("/v1/audit/checkpoint")
async def audit_checkpoint(request: web.Request) -> web.Response:
    cp = request.app[CHECKPOINTER]
    latest = getattr(cp, "latest", None)
    if not latest:
        return problem(404, "Not Found", "no checkpoint has been signed yet")
    return web.Response(text=latest, content_type="text/plain", charset="utf-8")


@routes.get("/v1/audit/key")
async def audit_key(request: web.Request) -> web.Response:
    auth = authority(request)
    pub = auth.keys["audit"].public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    origin = auth.config.audit_origin
    return web.json_response({"pem": pem, "name": origin,
                              "verifier_key": verifier_key(origin, pub)})  # type: ignore[arg-type]


def build_app(auth: Authority, checkpointer: object) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[request_id_middleware, problem_middleware])
    app[AUTHORITY] = auth
    app[CHECKPOINTER] = checkpointer
    app.add_routes(routes)
    app.add_routes(x509_routes)
    app.add_routes(ssh_routes)
    return app


def tls_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.2+ (1.3 preferred by OpenSSL), asking for, not requiring, a client cert.

    The chain of a presented client certificate is checked by OpenSSL against our CA
    (a certificate from another CA, or an expired one, fails the handshake); routes
    that need one then look it up in the inventory.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=str(client_ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx
