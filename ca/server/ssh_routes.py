"""SSH endpoints: host and user certificates, CA keys, revocation, KRL."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from ca import ra, ssh
from ca.decimal_text import is_decimal
from ca.issuance.issue import IssuedSSH
from ca.revocation import RecordedNotCommitted, sent_or_withheld
from ca.server.common import (
    ISSUANCE,
    REVOCATIONS,
    STORE,
    decide,
    field,
    identity,
    json_body,
    revalidated,
)
from ca.server.problems import Problem

routes = web.RouteTableDef()
log = structlog.get_logger("hsmca.issue")


async def _answer(request: web.Request, order: ra.SSHOrder, issued: IssuedSSH) -> web.Response:
    cert = issued.cert
    # A revocation of the X.509 certificate it rests on may have run while it was signed.
    async with sent_or_withheld(request.app[ISSUANCE], issued):
        await request.app[REVOCATIONS].settle(order.owner_serial, request.get("request_id"),
                                              ssh_serial=cert.serial)
    log.info("issued", kind=f"ssh-{order.cert_type}", serial=str(cert.serial),
             key_id=issued.key_id, principals=list(order.principals), actor=order.actor,
             request_id=request.get("request_id"), audit_seq=issued.intent_seq)
    return web.json_response({"serial": str(cert.serial),
                              "certificate": cert.public_bytes().decode(),
                              "valid_before": cert.valid_before}, status=201)


@routes.get("/v1/ssh/ca")
async def ssh_ca(request: web.Request) -> web.Response:
    """Every CA key still trusted, one authorized_keys line each, newest first: during a
    rotation both, so TrustedUserCAKeys and @cert-authority lines carry both."""
    issuers = await request.app[ISSUANCE].keys.refresh()
    return web.json_response({
        "user": "\n".join(issuers.ssh_lines("user", "hsmca-user-ca")),
        "host": "\n".join(issuers.ssh_lines("host", "hsmca-host-ca"))})


@routes.post("/v1/ssh/host")
async def ssh_host(request: web.Request) -> web.Response:
    who = await identity(request)
    body = await json_body(request, {"public_key", "principals"})
    key = ssh.parse_public_key(field(body, "public_key", str))
    order: ra.SSHOrder = await decide(request, who, ra.SSHHostRequest(
        key, field(body, "principals", list, required=False)))
    return await _answer(request, order, await request.app[ISSUANCE].ssh(
        order, request.get("request_id")))


@routes.post("/v1/ssh/user")
async def ssh_user(request: web.Request) -> web.Response:
    who = await identity(request)
    body = await json_body(request, {"public_key", "principals", "ttl", "source_address"})
    key = ssh.parse_public_key(field(body, "public_key", str))
    order: ra.SSHOrder = await decide(request, who, ra.SSHUserRequest(
        key, field(body, "principals", list, required=False),
        field(body, "ttl", str, required=False),
        ssh.source_addresses(field(body, "source_address", list, required=False))))
    return await _answer(request, order, await request.app[ISSUANCE].ssh(
        order, request.get("request_id")))


@routes.post("/v1/ssh/revoke")
async def ssh_revoke(request: web.Request) -> web.Response:
    who = await identity(request)
    body = await json_body(request, {"serial", "key_id", "public_key"})
    given = [k for k in ("serial", "key_id", "public_key") if k in body]
    if len(given) != 1:
        raise Problem(400, "Bad Request", "give exactly one of serial, key_id, public_key",
                      "bad-field")
    serial: int | None = None
    key_id: str | None = None
    public_key = None
    if "serial" in body:
        raw: Any = body["serial"]
        # At most 20 digits before int(): Python refuses to read over 4300 (a 500).
        if isinstance(raw, bool) or not isinstance(raw, int | str) or len(str(raw)) > 20 \
                or not is_decimal(str(raw)) or not 0 < int(raw) < 2**64:
            raise Problem(400, "Bad Request", "serial must be the decimal SSH certificate serial",
                          "bad-field")
        serial = int(raw)
    elif "key_id" in body:
        key_id = field(body, "key_id", str)
        if not key_id.strip():  # (an SSH trial's '' was answered with blanks in its advice)
            raise Problem(400, "Bad Request", "key_id is empty: give the key id of the "
                          "certificate to revoke (IDENTITY:SERIAL, as `ssh-keygen -L` shows "
                          "it)", "bad-field")
        if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in key_id):
            # No key id the CA writes holds one; a NUL, recorded in the audit line, was
            # refused by PostgreSQL after it (a review found the like of it in a key)
            raise Problem(400, "Bad Request", "key_id cannot hold control characters (a "
                          "NUL, a newline): no key id this CA issues does", "bad-field")
    else:  # any key: the KRL refuses it everywhere, whether this CA certifies its kind
        public_key = ssh.revocable_key(field(body, "public_key", str))
    revocations = request.app[REVOCATIONS]
    matching = await revocations.count_ssh(serial, key_id, public_key)
    revoked = await revocations.count_ssh(serial, key_id, None, revoked=True) \
        if matching == 0 and public_key is None else 0
    ca_key = None
    if public_key is not None:
        issuers = await request.app[ISSUANCE].keys.refresh()
        if (found := issuers.ssh_ca_key(public_key.line)) is not None:
            state = next((r.state for r in await request.app[STORE].keys()
                          if r.label == found[0]), "previous")
            ca_key = (*found, state)
    order: ra.SSHRevokeOrder = await decide(request, who, ra.SSHRevokeRequest(
        serial, key_id, public_key, matching, revoked, ca_key))
    try:
        hit = await revocations.revoke_ssh(order, matching, request.get("request_id"))
    except RecordedNotCommitted as exc:
        log.warning("ssh revoked: recorded in the audit log, the inventory not yet",
                    certificates=exc.count, error=str(exc), actor=order.actor)
        return web.json_response({
            "revoked_certificates": exc.count,
            "revoked_key": public_key.sha256 if public_key else None, "committed": False,
            "warnings": [exc.advice("the KRL lists it")]})
    log.info("ssh revoked", serial=str(serial) if serial is not None else None, key_id=key_id,
             public_key=public_key.sha256 if public_key else None, certificates=hit,
             actor=order.actor, request_id=request.get("request_id"))
    return web.json_response({"revoked_certificates": hit,
                              "revoked_key": public_key.sha256 if public_key else None})


@routes.get("/v1/ssh/krl")
async def ssh_krl(request: web.Request) -> web.Response:
    return revalidated(request, await request.app[REVOCATIONS].served_krl(),
                       "application/octet-stream")
