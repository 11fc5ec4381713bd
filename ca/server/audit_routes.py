"""Auditor endpoints: entries byte for byte, checkpoints, the key, Merkle proofs."""

from __future__ import annotations

import base64

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from ca.audit.note import verifier_key
from ca.server.common import CHECKPOINTER, authority, identity
from ca.server.problems import Problem

routes = web.RouteTableDef()
MAX_ENTRIES = 1000


def _int(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise Problem(400, "Bad Request", f"query parameter {name!r} is required",
                          "bad-query")
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise Problem(400, "Bad Request", f"{name} must be a non-negative integer", "bad-query")
    return int(raw)


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


@routes.get("/v1/audit/entries")
async def entries(request: web.Request) -> web.Response:
    identity(request, "auditor", "admin")
    start = _int(request, "start", 0)
    limit = min(_int(request, "limit", 100), MAX_ENTRIES)
    data = authority(request).audit.read_lines(start, limit)
    return web.Response(body=data, content_type="application/jsonl")


@routes.get("/v1/audit/checkpoint")
async def checkpoint(request: web.Request) -> web.Response:
    latest = request.app[CHECKPOINTER].latest
    if not latest:
        raise Problem(404, "Not Found", "no checkpoint has been signed yet")
    return web.Response(text=latest, content_type="text/plain", charset="utf-8")


@routes.get("/v1/audit/key")
async def key(request: web.Request) -> web.Response:
    auth = authority(request)
    pub = auth.keys["audit"].public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    origin = auth.config.audit_origin
    return web.json_response({"pem": pem, "name": origin,
                              "verifier_key": verifier_key(origin, pub)})  # type: ignore[arg-type]


@routes.get("/v1/audit/proof/inclusion")
async def inclusion(request: web.Request) -> web.Response:
    identity(request, "auditor", "admin")
    index, size = _int(request, "index"), _int(request, "size")
    audit = authority(request).audit
    if not 0 <= index < size <= audit.size:
        raise Problem(400, "Bad Request", f"need 0 <= index < size <= {audit.size} (the log's "
                      "current size)", "bad-query")
    return web.json_response({"index": index, "size": size,
                              "proof": _b64(audit.inclusion_proof(index, size))})


@routes.get("/v1/audit/proof/consistency")
async def consistency(request: web.Request) -> web.Response:
    identity(request, "auditor", "admin")
    old, size = _int(request, "old"), _int(request, "size")
    audit = authority(request).audit
    if not 0 < old <= size <= audit.size:
        raise Problem(400, "Bad Request", f"need 0 < old <= size <= {audit.size} (the log's "
                      "current size)", "bad-query")
    return web.json_response({"old": old, "size": size,
                              "proof": _b64(audit.consistency_proof(old, size))})
