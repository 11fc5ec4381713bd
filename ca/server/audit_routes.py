"""Auditor endpoints: entries byte for byte, checkpoints, the key, Merkle proofs, and
the log as C2SP tlog-tiles (c2sp.org/tlog-tiles) under the prefix /v1/audit/:
`checkpoint`, `tile/<L>/<N>[.p/<W>]` and `tile/entries/<N>[.p/<W>]`, so that
standard tlog tooling can follow it. Tiles and entries are what proofs and entries
are: for auditors and admins only.

In cluster mode every node keeps its own log, and any node serves all of them:
`GET /v1/audit/logs` lists them with their latest checkpoints, and `?log=NODE` on
the checkpoint, entries, proof and tile endpoints reads another node's log from
PostgreSQL (ca/server/other_logs.py), so an auditor follows a dead node's log too.
Tlog tooling takes a prefix URL, not a query: `/v1/audit/logs/NODE/` is one, with
that node's `checkpoint` and `tile/...` under it."""

from __future__ import annotations

import base64

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from ca.audit.cluster import CEREMONIES
from ca.audit.link import RecorderRefused
from ca.audit.note import verifier_key
from ca.audit.recorder import MAX_ENTRIES
from ca.audit.tiles import parse_tile_path
from ca.decimal_text import is_decimal
from ca.server.common import AUDIT, ISSUANCE, SETTINGS, identity, known_query
from ca.server.other_logs import other_log, other_logs
from ca.server.problems import Problem

routes = web.RouteTableDef()


def _int(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise Problem(400, "Bad Request", f"query parameter {name!r} is required",
                          "bad-query")
        return default
    if not is_decimal(raw) or len(raw) > 18:
        raise Problem(400, "Bad Request", f"{name} must be a non-negative integer", "bad-query")
    return int(raw)


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


@routes.get("/v1/audit/logs")
async def logs(request: web.Request) -> web.Response:
    """Every node's log with its latest checkpoint (one log, unnamed, on SQLite)."""
    other = other_logs(request)
    if other is None:
        return web.json_response({"logs": [{"name": request.app[SETTINGS].node,
                                             "checkpoint": await request.app[AUDIT].checkpoint(),
                                             "self": True}]})
    return web.json_response({"logs": [
        {"name": name, "size": size, "checkpoint": note,
         "self": name == request.app[SETTINGS].node}
        for name, size, note in await other.logs()]})


@routes.get("/v1/audit/entries")
async def entries(request: web.Request) -> web.Response:
    await identity(request, "auditor", "admin")
    known_query(request, "start", "limit", "log")
    start = _int(request, "start", 0)
    limit = _int(request, "limit", 100)
    if limit > MAX_ENTRIES:
        # Refused, not cut to the maximum: a client reading until a page comes back
        # shorter than it asked took the cut page for the log's end (an API trial)
        raise Problem(400, "Bad Request", f"limit is at most {MAX_ENTRIES} lines a page",
                      "bad-query")
    other = other_log(request)
    if other is not None:
        return web.Response(body=await other.read(start, limit), content_type="application/jsonl")
    data = await request.app[AUDIT].read(start, limit)
    return web.Response(body=data, content_type="application/jsonl")


# C2SP: the checkpoint changes, so no caching beyond a few seconds; a tile or a
# bundle of a given width never changes (and goes only to an authenticated auditor).
_MUTABLE = {"Cache-Control": "no-cache"}
_IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}


@routes.get("/v1/audit/checkpoint")
@routes.get("/v1/audit/logs/{log}/checkpoint")
async def checkpoint(request: web.Request) -> web.Response:
    other = other_log(request)
    latest = await (other.checkpoint() if other is not None else request.app[AUDIT].checkpoint())
    if not latest:
        if other is not None and not await other.exists():
            raise Problem(404, "Not Found", f"this CA has no log named {other.node!r} "
                          "(GET /v1/audit/logs lists them)")
        raise Problem(404, "Not Found", "no checkpoint has been signed yet")
    return web.Response(text=latest, content_type="text/plain", charset="utf-8",
                        headers=_MUTABLE)


@routes.get("/v1/audit/checkpoint.cosigned")
@routes.get("/v1/audit/logs/{log}/checkpoint.cosigned")
async def cosigned_checkpoint(request: web.Request) -> web.Response:
    """The latest checkpoint the witnesses cosigned: the log's note with their
    cosignature lines (c2sp.org/tlog-cosignature). It may be older than the latest."""
    other = other_log(request)
    if other is not None:  # each node keeps what the witnesses answered it
        raise Problem(404, "Not Found", f"the witnesses' cosignatures of log {other.node!r} "
                      f"are kept by node {other.node} only: ask that node for "
                      "/v1/audit/checkpoint.cosigned")
    latest = await request.app[AUDIT].checkpoint(cosigned=True)
    if not latest:
        raise Problem(404, "Not Found", "no witness has cosigned a checkpoint yet")
    return web.Response(text=latest, content_type="text/plain", charset="utf-8",
                        headers=_MUTABLE)


@routes.get("/v1/audit/witnesses")
@routes.get("/v1/audit/logs/{log}/witnesses")
async def witnesses(request: web.Request) -> web.Response:
    """Where each configured witness stands: cosigning, failing (down, misconfigured) or
    refused (it saw another log: the one signed now was cut or rewritten since).
    ca.audit.witnessing `report`; auditors' tools fail on a refusal."""
    await identity(request, "auditor", "admin")
    known_query(request, "log")
    other = other_log(request)
    if other is not None:
        if not await other.exists():
            raise Problem(404, "Not Found", f"this CA has no log named {other.node!r} "
                          "(GET /v1/audit/logs lists them)")
        # Each node keeps what its witnesses answered it: said, not a 404 that an
        # auditor's tool reads as a daemon that predates this endpoint (a review).
        return web.json_response({"witnesses": None, "kept_by": other.node,
                                  "detail": f"the witnesses of log {other.node!r} answer "
                                  f"node {other.node} only: ask it for /v1/audit/witnesses"},
                                 headers=_MUTABLE)
    return web.Response(text=await request.app[AUDIT].witnesses(),
                        content_type="application/json", headers=_MUTABLE)


@routes.get("/v1/audit/tile/{path:.+}")
@routes.get("/v1/audit/logs/{log}/tile/{path:.+}")
async def tile(request: web.Request) -> web.Response:
    await identity(request, "auditor", "admin")
    other = other_log(request)
    try:
        level, index, width = parse_tile_path(request.match_info["path"])
    except ValueError as exc:
        raise Problem(400, "Bad Request", f"not a C2SP tile path: {exc}", "bad-query") from None
    audit = other if other is not None else request.app[AUDIT]
    if level is None:
        data = await audit.entries(index, width)
    else:
        data = await audit.tile(level, index, width)
    if data is None:
        raise Problem(404, "Not Found", "the log has no such tile (yet): fetch the checkpoint, "
                                        "and only the tiles its size needs")
    response = web.Response(body=data, content_type="application/octet-stream",
                            headers=_IMMUTABLE)
    if level is None:
        response.enable_compression()  # C2SP: bundles SHOULD be compressed (gzip if asked)
        # Cached for a year, gzip'd or not: a shared cache must key on the encoding.
        response.headers["Vary"] = "Accept-Encoding"
    return response


@routes.get("/v1/audit/key")
@routes.get("/v1/audit/logs/{log}/key")
async def key(request: web.Request) -> web.Response:
    pub = request.app[ISSUANCE].issuers.audit.public_key
    pem = pub.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    settings = request.app[SETTINGS]
    origin = settings.audit_origin
    other = other_log(request)
    if other is not None:
        # One audit key signs every node's log; the key's name is the log's origin:
        # its checkpoints say it, and until one exists, the node's is `<base>/<node>`.
        note = await other.checkpoint()
        base = origin.removesuffix(f"/{settings.node}") if settings.node else origin
        origin = (note.split("\n", 1)[0] if note else
                  base if other.node == CEREMONIES else f"{base}/{other.node}")
    return web.json_response({"pem": pem, "name": origin,
                              "verifier_key": verifier_key(origin, pub)})  # type: ignore[arg-type]


@routes.get("/v1/audit/proof/inclusion")
async def inclusion(request: web.Request) -> web.Response:
    await identity(request, "auditor", "admin")
    known_query(request, "index", "size", "log")
    index, size = _int(request, "index"), _int(request, "size")
    proof = await _proof(request, "inclusion", index=index, size=size)
    return web.json_response({"index": index, "size": size, "proof": _b64(proof)})


@routes.get("/v1/audit/proof/consistency")
async def consistency(request: web.Request) -> web.Response:
    await identity(request, "auditor", "admin")
    known_query(request, "old", "size", "log")
    old, size = _int(request, "old"), _int(request, "size")
    proof = await _proof(request, "consistency", old=old, size=size)
    return web.json_response({"old": old, "size": size, "proof": _b64(proof)})


async def _proof(request: web.Request, kind: str, **args: int) -> list[bytes]:
    """A proof from the primary process, which computes it from the tiles."""
    other = other_log(request)
    audit = other if other is not None else request.app[AUDIT]
    try:
        if kind == "inclusion":
            return await audit.inclusion_proof(args["index"], args["size"])
        return await audit.consistency_proof(args["old"], args["size"])
    except (RecorderRefused, ValueError) as exc:
        raise Problem(400, "Bad Request", str(exc), "bad-query") from None
