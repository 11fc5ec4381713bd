"""The CA's keys: list (admin or auditor), rotate, retire, destroy, and revoke an issuing
key's CA certificate (admin)."""

from __future__ import annotations

import structlog
from aiohttp import web

from ca import ra
from ca.chains import first_cert
from ca.issuance.profiles import fingerprint
from ca.server.common import (
    GATE,
    LIFECYCLE,
    REVOCATIONS,
    SETTINGS,
    decide,
    field,
    identity,
    json_body,
)
from ca.server.problems import Problem
from ca.store.errors import StoreUnavailable
from hsm.errors import AuditUnavailable, HSMUnavailable

routes = web.RouteTableDef()
log = structlog.get_logger("hsmca.keys")
_DONE = {"rotate": "key rotated", "retire": "key retired", "destroy": "key destroyed",
         "revoke": "CA certificate revoked"}


@routes.get("/v1/keys")
async def listing(request: web.Request) -> web.Response:
    await identity(request, "admin", "auditor")
    return web.json_response({"keys": await request.app[LIFECYCLE].listing()})


async def _act(request: web.Request, action: str) -> web.Response:
    who = await identity(request)
    lifecycle = request.app[LIFECYCLE]
    if action == "rotate":
        body = await json_body(request, {"kind", "stage"})
        stage = body.get("stage", False)
        if not isinstance(stage, bool):
            raise Problem(400, "Bad Request", "field 'stage' must be true or false",
                          "bad-field")
        req = await lifecycle.request(action, field(body, "kind", str), None, stage=stage)
    else:
        body = await json_body(request, {"label", "confirm"} | (
            {"reason"} if action == "revoke" else set()))
        confirm = body.get("confirm")  # (None: not said; a retire goes on, see ra)
        if confirm is not None and not isinstance(confirm, bool):
            raise Problem(400, "Bad Request", "field 'confirm' must be true or false",
                          "bad-field")
        asker = None
        if action == "revoke" and isinstance(who, ra.CertHolder) \
                and not _hosts_own_admin(request, who):
            rec = await request.app[GATE].record(who.fingerprint)
            asker = rec.issuer if rec is not None and rec.issuer else ""
        req = await lifecycle.request(action, None, field(body, "label", str), confirm,
                                      reason=body.get("reason"), asker_issuer=asker)
    order: ra.KeyOrder = await decide(request, who, req)
    context = await request.app[GATE].context()
    done = await lifecycle.carry_out(order, context, request.get("request_id"))
    if order.action == "revoke" and done.get("root"):
        # Its root's CRL says so now, not at its next round (half a day away)
        try:
            await request.app[REVOCATIONS].refresh_crl(request.get("request_id"),
                                                       done["root"])
        except (AuditUnavailable, HSMUnavailable, StoreUnavailable) as exc:
            # Revoked all the same (committed): the root's CRL, found stale, is signed
            # again at its next round or GET
            done["warnings"] = [f"the root's CRL is not re-signed yet ({exc}): it will be "
                                "when the HSM, the audit log and the inventory answer"]
    # The operator reads the daemon's log, not the audit log: a change of the CA's keys
    # is said there too (a key lifecycle trial found none).
    log.warning("key staged" if order.action == "stage" else _DONE[action],
                kind=done.get("kind"), label=done.get("label"),
                previous=done.get("previous"), fingerprint=done.get("fingerprint"),
                live=done.get("live"), warnings=done.get("warnings"), actor=order.actor,
                request_id=request.get("request_id"))
    return web.json_response(done, status=201 if action == "rotate" else 200)


def _hosts_own_admin(request: web.Request, who: ra.CertHolder) -> bool:
    """Whether `who` asks with this node's own admin credential, which its daemon renews
    from the active key as soon as the CA certificate of its issuer is revoked (so asking
    with it cuts nobody off: a docs trial's runbook renewed it by hand, for a day)."""
    path = request.app[SETTINGS].admin_cert
    held = first_cert(path) if path else None
    return held is not None and fingerprint(held) == who.fingerprint


@routes.post("/v1/keys/rotate")
async def rotate(request: web.Request) -> web.Response:
    return await _act(request, "rotate")


@routes.post("/v1/keys/retire")
async def retire(request: web.Request) -> web.Response:
    return await _act(request, "retire")


@routes.post("/v1/keys/destroy")
async def destroy(request: web.Request) -> web.Response:
    return await _act(request, "destroy")


@routes.post("/v1/keys/revoke")
async def revoke(request: web.Request) -> web.Response:
    """A retired issuing key's CA certificate, revoked by its root (its CRL lists it)."""
    return await _act(request, "revoke")
