"""SSH endpoints: host and user certificates, CA keys, revocation, KRL."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from ca import policy, ssh
from ca.authority import SSHRequest, build_current_krl, issue_ssh, revoke_ssh
from ca.server.common import authority, field, identity, json_body
from ca.server.problems import Problem

routes = web.RouteTableDef()


def _ca_line(key: Any, comment: str) -> str:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}"


def _principals(body: dict[str, Any], allowed: list[str], what: str) -> tuple[str, ...]:
    asked = body.get("principals")
    if asked is None:
        if not allowed:
            raise policy.Refused(f"no {what} were granted to this certificate", 403)
        return tuple(allowed)
    if not isinstance(asked, list) or not asked or len(asked) > 100:
        raise Problem(400, "Bad Request", "principals must be a list of 1 to 100 strings",
                      "bad-field")
    out = tuple(dict.fromkeys(policy.principal(p) for p in asked))
    outside = [p for p in out if p not in allowed]
    if outside:
        raise policy.Refused(f"principal(s) {', '.join(outside)} not granted; allowed: "
                             f"{', '.join(allowed) or 'none'}", 403)
    return out


def _unknown(body: dict[str, Any], allowed: set[str]) -> None:
    extra = set(body) - allowed
    if extra:
        raise Problem(400, "Bad Request", f"unknown field(s): {', '.join(sorted(extra))}",
                      "bad-field")


def _issued(cert: Any) -> dict[str, Any]:
    return {"serial": str(cert.serial), "certificate": cert.public_bytes().decode(),
            "valid_before": cert.valid_before}


@routes.get("/v1/ssh/ca")
async def ssh_ca(request: web.Request) -> web.Response:
    auth = authority(request)
    return web.json_response({"user": _ca_line(auth.keys["ssh_user"], "hsmca-user-ca"),
                              "host": _ca_line(auth.keys["ssh_host"], "hsmca-host-ca")})


@routes.post("/v1/ssh/host")
async def ssh_host(request: web.Request) -> web.Response:
    who = identity(request, "host")
    body = await json_body(request)
    _unknown(body, {"public_key", "principals"})
    key = ssh.parse_public_key(field(body, "public_key", str))
    dns = [n for n in who.record.names if policy.classify(n, True)[0] == "dns"]
    principals = _principals(body, dns, "host names")
    auth = authority(request)
    req = SSHRequest("host", key, principals, auth.config.policy.ssh_host_ttl_s,
                     identity=dns[0], owner_serial=who.record.serial)
    cert = await issue_ssh(auth, req, who.actor, request.get("request_id"))
    return web.json_response(_issued(cert), status=201)


@routes.post("/v1/ssh/user")
async def ssh_user(request: web.Request) -> web.Response:
    who = identity(request, "user")
    body = await json_body(request)
    _unknown(body, {"public_key", "principals", "ttl", "source_address"})
    key = ssh.parse_public_key(field(body, "public_key", str))
    principals = _principals(body, who.record.principals, "logins")
    auth = authority(request)
    p = auth.config.policy
    ttl = p.ssh_user_default_ttl_s
    if body.get("ttl") is not None:
        ttl = policy.parse_ttl(field(body, "ttl", str))
        if ttl > p.ssh_user_max_ttl_s:
            raise policy.Refused(f"ttl {body['ttl']} exceeds the maximum of "
                                 f"{p.ssh_user_max_ttl_s // 3600}h for user certificates")
    req = SSHRequest("user", key, principals, ttl, identity=who.record.names[0],
                     owner_serial=who.record.serial, extensions=p.ssh_user_extensions,
                     source_address=ssh.source_addresses(body.get("source_address")))
    cert = await issue_ssh(auth, req, who.actor, request.get("request_id"))
    return web.json_response(_issued(cert), status=201)


@routes.post("/v1/ssh/revoke")
async def ssh_revoke(request: web.Request) -> web.Response:
    who = identity(request, "admin")
    body = await json_body(request)
    _unknown(body, {"serial", "key_id", "public_key"})
    given = [k for k in ("serial", "key_id", "public_key") if k in body]
    if len(given) != 1:
        raise Problem(400, "Bad Request", "give exactly one of serial, key_id, public_key",
                      "bad-field")
    serial = key_id = None
    public_key = None
    if "serial" in body:
        raw = body["serial"]
        if isinstance(raw, bool) or not isinstance(raw, int | str) or not str(raw).isdigit() \
                or not 0 < int(raw) < 2**64:
            raise Problem(400, "Bad Request", "serial must be the decimal SSH certificate serial",
                          "bad-field")
        serial = str(int(raw))
    elif "key_id" in body:
        key_id = field(body, "key_id", str)
    else:
        public_key = ssh.parse_public_key(field(body, "public_key", str))
    hit = await revoke_ssh(authority(request), serial=serial, key_id=key_id,
                           public_key=public_key, actor=who.actor,
                           request_id=request.get("request_id"))
    return web.json_response({"revoked_certificates": hit,
                              "revoked_key": public_key.sha256 if public_key else None})


@routes.get("/v1/ssh/krl")
async def ssh_krl(request: web.Request) -> web.Response:
    return web.Response(body=build_current_krl(authority(request)),
                        content_type="application/octet-stream")
