"""The ACME server's routes (RFC 8555, RFC 8737, RFC 9773): parse, ask the registration
authority, answer. Registered by `ca.server.app.build_app` only when the config has an
[acme] section.

Every answer carries a fresh Replay-Nonce and a Link to the directory; every error is
an ACME problem document (urn:ietf:params:acme:error:*), never a stack trace. What
workers must agree on (accounts, orders, authorizations, challenges, nonces, rate
limits) is in the inventory, so a client's requests may reach any worker.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import ipaddress
import json
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import josepy as jose
import structlog
from aiohttp import web
from cryptography import x509

from ca import ra
from ca.acme import jws as acme_jws
from ca.acme.nonces import Nonces
from ca.acme.problems import PREFIX, AcmeProblem, from_refusal
from ca.acme.validation import Failed, Validator, longest_s
from ca.audit.voided import void
from ca.config import CA_SERVER_NAME, AcmeConfig
from ca.http_body import read_body
from ca.issuance.profiles import pem, utcnow
from ca.logs import keep_trying
from ca.policy import PARSE_ERRORS, Reason, Refused, parse_error
from ca.revocation import RecordedNotCommitted
from ca.server.common import AUDIT, ISSUANCE, REVOCATIONS, SETTINGS, STORE, decide, identity
from ca.server.common import json_body as admin_json_body
from ca.server.problems import NOT_UNICODE
from ca.store import (
    AcmeAccount,
    AcmeAuthz,
    AcmeChallenge,
    AcmeEAB,
    AcmeOrder,
    CertRecord,
    Store,
)
from ca.store.errors import StoreDamaged, StoreUnavailable, TooManyPending
from ca.subject import spki_sha256
from hsm.errors import AuditUnavailable, HSMUnavailable

log = structlog.get_logger("hsmca.acme")
ORDER_LIFETIME = dt.timedelta(days=7)
RATE_WINDOW = dt.timedelta(hours=1)
ARI_RETRY_AFTER_S = 6 * 3600
POLL_AGAIN_S = 1  # Retry-After of what is being worked on (see _json)
# A validation still processing this long after its deadline lost its worker.
STALE_GRACE = dt.timedelta(seconds=30)
PEM_CHAIN = "application/pem-certificate-chain"
RELEASE_RETRY_S = 5  # an order whose valid could not be written: tried again this often

routes = web.RouteTableDef()


class AcmeServer:
    """What the ACME routes of one worker share."""

    def __init__(self, cfg: AcmeConfig, store: Store) -> None:
        self.cfg, self.store = cfg, store
        self.nonces = Nonces(store)
        self.validator = Validator(cfg)
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


ACME = web.AppKey("acme", AcmeServer)


def install(app: web.Application, cfg: AcmeConfig) -> None:
    server = AcmeServer(cfg, app[STORE])
    app[ACME] = server
    app.add_routes(routes)
    # Last: whatever else reaches /acme/ (an unknown path, a wrong method) gets an ACME
    # problem document too, not the API's own problem type.
    app.router.add_route("*", "/acme/{tail:.*}", _unknown)
    app.on_cleanup.append(server.close)


# ---- URLs -------------------------------------------------------------------------------------

def base(request: web.Request) -> str:
    """The origin the client used: URLs in answers and the JWS url check agree with it.
    Only one of the daemon's own names (SETTINGS.own_names): any Host made the
    directory's URLs and the `url` a JWS is bound to (RFC 8555 6.4) another origin's,
    whatever a proxy or cache in front keyed them by (a security trial). The origin is
    built from the Host as checked, never the header's raw text, which a review got
    past the check with `evil.example/@localhost`."""
    origin = _own_origin(request)
    if origin is None:
        names = [n for n in request.app[SETTINGS].own_names
                 if n not in _LOOPBACK and n != CA_SERVER_NAME]
        raise AcmeProblem("malformed", f"this CA answers ACME by its own names only "
                          f"({', '.join([*names, 'a loopback address'])}): the request's Host "
                          f"is {request.host[:100]!r}", 400)
    return origin


_LOOPBACK = ("localhost", "127.0.0.1", "::1")
# A Host header: a DNS name or a bracketed IPv6 address, then an optional port.
_HOST = re.compile(r"(?:(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))|\[(?P<v6>[0-9A-Fa-f:.]+)\])"
                   r"(?::(?P<port>[0-9]{1,5}))?")


def _own_origin(request: web.Request) -> str | None:
    """`scheme://host[:port]` from the request's Host if it is well formed and names the
    daemon (any name, when the app was built without its names), else None."""
    m = _HOST.fullmatch(request.host or "")
    if m is None or (m["port"] is not None and not 0 < int(m["port"]) < 65536):
        return None
    if m["v6"] is not None:
        try:
            host = str(ipaddress.IPv6Address(m["v6"]))
        except ValueError:
            return None
        shown = f"[{host}]"
    else:
        host = shown = m["name"].lower().rstrip(".")
    names = request.app[SETTINGS].own_names
    if names and host not in names:
        return None
    return f"{request.scheme}://{shown}" + (f":{int(m['port'])}" if m["port"] else "")


def url_of(request: web.Request, path: str) -> str:
    return f"{base(request)}/acme/{path}"


# ---- answers and errors ---------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _problem_response(p: AcmeProblem) -> web.Response:
    return web.Response(status=p.status, text=p.body(), content_type="application/problem+json",
                        headers=p.headers)


def acme_route(fn: Handler) -> Handler:
    """Every answer an ACME answer: problems as documents, a nonce, the index link."""

    @functools.wraps(fn)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            resp = await fn(request)
        except AcmeProblem as p:
            resp = _problem_response(p)
        except Refused as r:
            if r.operator_detail:  # the rule the requester is not told
                log.info("acme request refused by the name policy", path=request.path,
                         detail=r.operator_detail, request_id=request.get("request_id"))
            resp = _problem_response(from_refusal(r))
        except StoreDamaged:  # a retry helps only once the operator acts
            resp = _problem_response(AcmeProblem(
                "serverInternal", "the inventory (database) is damaged, so nothing can be "
                "done now; the CA's operator must restore it from a backup (a retry will not "
                "help until then)", 503, {"Retry-After": "300"}))
        except (AuditUnavailable, HSMUnavailable, StoreUnavailable) as exc:
            part = ("audit log" if isinstance(exc, AuditUnavailable) else "HSM"
                    if isinstance(exc, HSMUnavailable) else "inventory (database)")
            resp = _problem_response(AcmeProblem(
                "serverInternal", f"the {part} is unavailable, so nothing can be signed now; "
                "retry later", 503, {"Retry-After": "1"}))
        except web.HTTPException as exc:
            if exc.status_code < 400:
                raise
            own = exc.text if exc.text and not exc.text.startswith(f"{exc.status_code}:") \
                else None  # a text of hsmca's own (a body too slow), not aiohttp's default
            detail = ("request bodies are limited to 64 KiB" if exc.status_code == 413
                      else own or exc.reason)
            resp = _problem_response(AcmeProblem(
                "malformed", detail, exc.status_code,
                {k: v for k, v in exc.headers.items() if k in ("Allow", "Accept-Encoding")}))
        except UnicodeError:  # a client's text that no encoder takes
            resp = _problem_response(AcmeProblem("malformed", NOT_UNICODE))
        except ConnectionResetError:
            raise  # the client left: the problem middleware notes it
        except Exception:
            rid = request.get("request_id", "-")
            log.exception("unhandled error", request_id=rid, path=request.path)
            resp = _problem_response(AcmeProblem(
                "serverInternal", f"an unexpected error occurred; the operator can find it "
                f"in the logs under request id {rid}", 500))
        try:
            resp.headers["Replay-Nonce"] = await request.app[ACME].nonces.new()
        except Exception as exc:  # the inventory is away: the answer still goes out
            log.warning("no nonce for the answer", error=str(exc))
        if _own_origin(request) is not None:  # (else the answer refuses its Host)
            resp.headers.add("Link", f'<{url_of(request, "directory")}>;rel="index"')
        return resp
    return wrapper


def _json(body: object, status: int = 200, location: str | None = None,
          links: tuple[str, ...] = (), busy: bool = False) -> web.Response:
    """`busy`: a challenge, an authorization or an order whose state is being worked
    on now, which its client polls: it is told to look again in a second (RFC 8555
    7.5.1 and 7.4). Without it lego waits 5 s after each name's validation, which takes
    milliseconds here (an ACME trial: 19 s for three names)."""
    resp = web.json_response(body, status=status)
    if location:
        resp.headers["Location"] = location
    for link in links:
        resp.headers.add("Link", link)
    if busy:
        resp.headers["Retry-After"] = str(POLL_AGAIN_S)
    return resp


async def _unknown(request: web.Request) -> web.StreamResponse:
    @acme_route
    async def answer(request: web.Request) -> web.Response:
        for resource in request.app.router.resources():
            if resource.canonical == "/acme/{tail}":
                continue
            _match, allowed = await resource.resolve(request)
            if allowed:  # the path is an ACME resource, the method is not one it takes
                raise AcmeProblem("malformed", f"{request.method} is not allowed on "
                                  f"{request.path[:200]}", 405,
                                  {"Allow": ", ".join(sorted(allowed))})
        raise AcmeProblem("malformed", f"no such ACME resource: {request.path[:200]}", 404)
    return await answer(request)


# ---- verifying a request --------------------------------------------------------------------

async def _verified(request: web.Request, want: str = "kid") -> acme_jws.Verified:
    server = request.app[ACME]
    raw = await read_body(request)
    verified = await acme_jws.verify(
        raw, request.content_type, f"{base(request)}{request.path_qs}", server.nonces,
        want=want, account_of=server.store.acme_account,
        account_prefix=url_of(request, "acct/"))
    if verified.account is not None:  # the operator's log line of a refusal names it
        request["acme_account"] = verified.account.id
    return verified


def _holder(account: AcmeAccount) -> ra.AcmeAccountHolder:
    return ra.AcmeAccountHolder(account.id, account.status, account.names,
                                account.eab_kid is not None,
                                spki_sha256(acme_jws.crypto_key(jose.JWK.json_loads(account.jwk))))


def _account_obj(request: web.Request, account: AcmeAccount) -> dict[str, Any]:
    return {"status": account.status, "contact": list(account.contact),
            "orders": url_of(request, f"acct/{account.id}/orders")}  # RFC 8555 7.1.2: required


def _new_id() -> str:
    # Not beginning with '-': an admin passes an account's id to `hsmca acme account
    # deactivate`, whose parser (and many a shell tool) took one such as -Xy3... for an
    # option (a test run drew one: 1 id in 64).
    while (new := secrets.token_urlsafe(12)).startswith("-"):
        pass
    return new


def _client(request: web.Request) -> str:
    return request.remote or "-"


# ---- directory and nonces ---------------------------------------------------------------

@routes.get("/acme/directory")
@acme_route
async def directory(request: web.Request) -> web.Response:
    cfg = request.app[ACME].cfg
    return _json({
        "newNonce": url_of(request, "new-nonce"), "newAccount": url_of(request, "new-account"),
        "newOrder": url_of(request, "new-order"), "revokeCert": url_of(request, "revoke-cert"),
        "keyChange": url_of(request, "key-change"),
        "renewalInfo": url_of(request, "renewal-info"),
        "meta": {"externalAccountRequired": cfg.eab_required},
    })


@routes.get("/acme/new-nonce")  # HEAD too (aiohttp adds it)
@acme_route
async def new_nonce(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.method == "HEAD" else 204,
                        headers={"Cache-Control": "no-store"})


# ---- accounts --------------------------------------------------------------------------------

def _contact(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 10:
        raise AcmeProblem("invalidContact", "contact must be a list of at most 10 mailto: URLs")
    out = []
    for c in value:
        if not isinstance(c, str) or len(c) > 254:
            raise AcmeProblem("invalidContact", "each contact is a mailto: URL")
        if not c.startswith("mailto:"):
            raise AcmeProblem("unsupportedContact", "only mailto: contacts are supported")
        addr = c[len("mailto:"):]
        # printable ASCII only: an ESC or BEL stored here reaches an admin's terminal
        if addr.count("@") != 1 or any(ch in addr for ch in ",;<>") \
                or not (addr.isascii() and addr.isprintable()) or " " in addr:
            raise AcmeProblem("invalidContact", f"{c[:80]!r} is not one e-mail address")
        out.append(c)
    return tuple(out)


async def _not_compromised(request: web.Request, jwk: jose.JWK) -> None:
    """badPublicKey for a key a certificate of which was revoked for keyCompromise, as
    Boulder refuses blocked keys: its thief would otherwise hold an account (an ACME
    trial registered one with such a key, which every CSR refuses)."""
    _, compromised = await request.app[REVOCATIONS].compromised_keys.get()
    if spki_sha256(acme_jws.crypto_key(jwk)) in compromised:
        raise AcmeProblem("badPublicKey", "this key was reported compromised (a certificate "
                          "of it was revoked for keyCompromise): make a new account key")


@routes.post("/acme/new-account")
@acme_route
async def new_account(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request, want="jwk")
    body = v.json()
    assert body is not None
    thumb = acme_jws.thumbprint(v.jwk)
    existing = await server.store.acme_account_by_thumbprint(thumb)
    if existing is not None:
        if existing.status != "valid":  # RFC 8555 7.3.6: the account no longer acts
            raise AcmeProblem("unauthorized", f"the account of this key is {existing.status}",
                              401)
        return _json(_account_obj(request, existing), 200, url_of(request, f"acct/{existing.id}"))
    if body.get("onlyReturnExisting") is True:
        raise AcmeProblem("accountDoesNotExist", "no account has this key")
    await _not_compromised(request, v.jwk)
    contact = _contact(body.get("contact"))
    now = utcnow()
    kid: str | None = None
    names: tuple[str, ...] = ()
    if body.get("externalAccountBinding") is not None:
        kid, check = acme_jws.verify_eab(body["externalAccountBinding"], v.jwk,
                                         url_of(request, "new-account"))
        eab = await server.store.acme_eab(kid)
        state = "unknown" if eab is None else _eab_state(eab, now.isoformat())
        why = state if state != "unused" else (
            None if eab is not None and eab.mac_key and check(bytes(eab.mac_key))
            else "wrongly MACed")
        if why is not None:
            # The client is not told which (a kid's existence is the operator's to know);
            # the operator is, with the kid, never the key.
            log.info("ACME account refused: its external account binding is " + why,
                     request_id=request.get("request_id", "-"), kid=kid[:80])
            raise AcmeProblem("unauthorized", "the external account binding is unknown, "
                              "used, expired, withdrawn or wrongly MACed: ask the CA's "
                              "operator for a new EAB key (hsmca acme eab create)", 403)
        names = eab.names
    elif server.cfg.eab_required:
        raise AcmeProblem("externalAccountRequired", "this CA requires an external account "
                          "binding (ask its operator: hsmca acme eab create)", 403)
    else:
        # Without a binding anyone may register, and each account is a row and an audit
        # line: so many an hour per address (a binding is the operator's own limit).
        limit = server.cfg.accounts_per_hour
        key = f"ip:{_client(request)}"
        if await server.store.acme_rate_take("new-account", [key], now, now - RATE_WINDOW,
                                             limit) is not None:
            await _rate_limited(request, f"new accounts: {limit} per hour for "
                                f"{_client(request)} reached", "new-account", key, limit, now)
    account = AcmeAccount(_new_id(), thumb, v.jwk.json_dumps(), "valid", contact, names, kid,
                          now.isoformat())
    # The record first, as for a revocation: an account the log does not show never
    # came to be (a log that cannot be written leaves no row for a retry to find).
    seq = await request.app[AUDIT].append(
        "acme.account.create", account=account.id, thumbprint=thumb, eab_kid=kid,
        names=list(names), request_id=request.get("request_id"))
    if not await server.store.add_acme_account(account, now):
        await void(request.app[AUDIT], seq, "acme.account.create",
                   "the EAB key was bound by another account meanwhile" if kid is not None
                   else "the same key was registered meanwhile", request.get("request_id"),
                   account=account.id)
        again = await server.store.acme_account_by_thumbprint(thumb)
        if again is not None:  # this key, registered meanwhile: its account, as a
            # registration after it gets (RFC 8555 7.3.1), its binding left unspent
            return _json(_account_obj(request, again), 200, url_of(request, f"acct/{again.id}"))
        # Said to the operator as every refused binding is, with its kid (a trial's
        # registrations that lost the race left no such line)
        log.info("ACME account refused: its external account binding is used (by another "
                 "account's registration at the same moment)",
                 request_id=request.get("request_id", "-"), kid=(kid or "")[:80])
        raise AcmeProblem("unauthorized", "the external account binding was used meanwhile, "
                          "by another account's registration: ask the CA's operator for a "
                          "new EAB key (hsmca acme eab create)", 403)
    log.info("acme account created", account=account.id, eab_kid=kid,
             request_id=request.get("request_id"))
    return _json(_account_obj(request, account), 201, url_of(request, f"acct/{account.id}"))


@routes.post("/acme/acct/{id}")
@acme_route
async def account(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request)
    assert v.account is not None
    if v.account.id != request.match_info["id"]:
        raise AcmeProblem("unauthorized", "a request about an account is signed by it", 403)
    body = v.json(empty_ok=True) or {}
    acct = v.account
    if "contact" in body:
        contact = _contact(body["contact"])
        await server.store.set_acme_contact(acct.id, contact)
        # Not in the audit log, which keeps no one's address: the operator's log is
        # where an admin asks who the CA would have warned about an account.
        log.info("acme account contact changed", account=acct.id, contact=list(contact),
                 request_id=request.get("request_id"))
    if "status" in body:
        if body["status"] != "deactivated":
            raise AcmeProblem("malformed", "an account's status can only be set to deactivated")
        await request.app[AUDIT].append("acme.account.deactivate", account=acct.id,
                                        request_id=request.get("request_id"))
        await server.store.deactivate_acme_account(acct.id)
        log.info("acme account deactivated", account=acct.id, by="its client")
    fresh = await server.store.acme_account(acct.id)
    assert fresh is not None
    return _json(_account_obj(request, fresh), 200, url_of(request, f"acct/{acct.id}"))


ORDERS_LISTED = 1000


@routes.post("/acme/acct/{id}/orders")
@acme_route
async def account_orders(request: web.Request) -> web.Response:
    """RFC 8555 7.1.2.1: the account's orders that are not invalid, newest first (the
    latest ORDERS_LISTED: an account's old valid orders are of little use to it)."""
    server = request.app[ACME]
    v = await _verified(request)
    assert v.account is not None
    if v.account.id != request.match_info["id"]:
        raise AcmeProblem("unauthorized", "an account's orders are asked for by it", 403)
    v.post_as_get("the orders list")
    ids = await server.store.acme_order_ids(v.account.id, utcnow().isoformat(), ORDERS_LISTED)
    return _json({"orders": [url_of(request, f"order/{i}") for i in ids]})


@routes.post("/acme/key-change")
@acme_route
async def key_change(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request)
    assert v.account is not None
    outer = acme_jws.loads(v.payload, "payload")
    new_jwk, inner = acme_jws.verify_inner(outer, v.url)
    acct_url = url_of(request, f"acct/{v.account.id}")
    if inner.get("account") != acct_url:
        raise AcmeProblem("malformed", "the inner payload's account is not the signer's")
    try:
        old = jose.JWK.from_json(inner.get("oldKey"))
    except Exception:
        raise AcmeProblem("malformed", "oldKey is not a JWK") from None
    if acme_jws.thumbprint(old) != v.account.thumbprint:
        raise AcmeProblem("malformed", "oldKey is not the account's current key")
    new_thumb = acme_jws.thumbprint(new_jwk)
    if new_thumb == v.account.thumbprint:  # not "another account has it" (an ACME trial)
        raise AcmeProblem("malformed", "the new key is the account's current key: sign the "
                          "inner JWS with the key to change to")
    await _not_compromised(request, new_jwk)
    other = await server.store.acme_account_by_thumbprint(new_thumb)
    if other is not None:
        raise AcmeProblem("malformed", "another account has the new key", 409,
                          {"Location": url_of(request, f"acct/{other.id}")})
    # Recorded before it is committed: a change the log cannot show must not lock the
    # client out of its account with the key it still believes current.
    seq = await request.app[AUDIT].append(
        "acme.account.key-change", account=v.account.id, old_thumbprint=v.account.thumbprint,
        thumbprint=new_thumb, request_id=request.get("request_id"))
    if not await server.store.change_acme_key(v.account.id, v.account.thumbprint, new_thumb,
                                              new_jwk.json_dumps()):
        await void(request.app[AUDIT], seq, "acme.account.key-change", "the account's key "
                   "changed meanwhile, or another account has the new key",
                   request.get("request_id"), account=v.account.id)
        raise AcmeProblem("malformed", "the account's key changed meanwhile, or another "
                          "account has the new key", 409)
    log.info("acme account key changed", account=v.account.id, thumbprint=new_thumb)
    fresh = await server.store.acme_account(v.account.id)
    assert fresh is not None
    return _json(_account_obj(request, fresh), 200, acct_url)


# ---- orders ------------------------------------------------------------------------------------

def _status(order: AcmeOrder, now: str) -> str:
    if order.status in ("pending", "ready") and order.expires <= now:
        return "invalid"
    return order.status


def _order_obj(request: web.Request, order: AcmeOrder) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": _status(order, utcnow().isoformat()),
        "expires": order.expires,
        "identifiers": [{"type": "dns", "value": n} for n in order.names],
        "authorizations": [url_of(request, f"authz/{a}") for a in order.authz_ids],
        "finalize": url_of(request, f"order/{order.id}/finalize"),
    }
    if order.cert_serial and order.status == "valid":  # released: see finalize
        out["certificate"] = url_of(request, f"cert/{order.cert_serial}")
    if order.error:
        out["error"] = json.loads(order.error)
    if order.replaces:
        out["replaces"] = order.replaces
    return out


# The [acme] setting of each limit, as refusals name it.
RATE_SETTINGS = {"new-order": "orders-per-hour",
                 "failed-validation": "failed-validations-per-hour",
                 "new-account": "accounts-per-hour"}


async def _rate(request: web.Request, kind: str, account: AcmeAccount, limit: int,
                take: bool) -> None:
    server = request.app[ACME]
    now = utcnow()
    # Per client address too only for accounts anyone may open: one bound to an EAB key
    # is one the operator handed out, and a fleet behind one NAT, proxy or load balancer
    # would otherwise share one count that any account could use up (with eab-required
    # = false, an ACME trial's unbound accounts used up a bound one's).
    keys = [f"account:{account.id}"] + ([] if server.cfg.eab_required or account.eab_kid
                                        else [f"ip:{_client(request)}"])
    if take:
        over = await server.store.acme_rate_take(kind, keys, now, now - RATE_WINDOW, limit)
    else:
        over = await server.store.acme_rate_over(kind, keys, now - RATE_WINDOW, limit)
    if over is not None:
        what = "this account" if over.startswith("account:") else f"{_client(request)}"
        await _rate_limited(request, f"{kind}: {limit} per hour for {what} reached", kind,
                            over, limit, now)


async def _rate_limited(request: web.Request, said: str, kind: str, key: str, limit: int,
                        now: dt.datetime) -> NoReturn:
    """A 429 whose Retry-After is when the key is under its limit again: its oldest
    counted event a window old (not a fixed minute, which sent clients back too soon)."""
    frees = await request.app[ACME].store.acme_rate_frees(kind, key, now - RATE_WINDOW,
                                                          limit)
    wait = (dt.datetime.fromisoformat(frees) + RATE_WINDOW - now).total_seconds() \
        if frees else 60
    seconds = max(1, math.ceil(wait))
    raise AcmeProblem("rateLimited", f"{said} ([acme] {RATE_SETTINGS[kind]}); retry in "
                      f"{seconds} s", 429, {"Retry-After": str(seconds)})


@routes.post("/acme/new-order")
@acme_route
async def new_order(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request)
    assert v.account is not None
    body = v.json()
    assert body is not None
    extra = set(body) - {"identifiers", "replaces", "profile"}
    if extra:
        raise AcmeProblem("malformed", f"unsupported newOrder field(s): "
                          f"{', '.join(sorted(extra))[:100]} (notBefore and notAfter are not "
                          "offered: the CA's policy sets the lifetime)")
    if "profile" in body:
        raise AcmeProblem("malformed", "this CA offers no profiles")
    dns01 = server.cfg.resolver is not None
    replaces = await _replaced(request, body["replaces"]) if "replaces" in body else None
    grant: ra.AcmeOrderGrant = await decide(request, _holder(v.account), ra.AcmeOrderRequest(
        body.get("identifiers"), dns01_available=dns01, replaces=replaces))
    now = utcnow()
    # Names waiting for validation, bounded per account: each is a row kept until it
    # expires, and an account that never validates could fill the inventory's disk
    # (a security trial: 65 KB an order of 100 names, at 300 orders an hour).
    # Counted here, so that a refusal here takes no order from the hourly limit, and
    # again where the order is inserted: orders sent at once all passed this count alone
    # (one refused there has taken its order from the limit: a race's, and rare).
    cap = server.cfg.pending_authorizations
    waiting = await server.store.acme_pending_authzs(v.account.id, now.isoformat())
    if len(grant.names) > cap:
        # The order alone: no wait helps, so no Retry-After (an ACME trial's client
        # obeyed one every hour, told to validate the none it had waiting)
        raise AcmeProblem("rateLimited", f"this order has {len(grant.names)} names, and at "
                          f"most {cap} may wait for validation at once ([acme] "
                          "pending-authorizations): order them in smaller orders", 400)
    if waiting + len(grant.names) > cap:
        raise _too_many_pending(waiting, cap)
    await _rate(request, "new-order", v.account, server.cfg.orders_per_hour, take=True)
    expires = (now + ORDER_LIFETIME).isoformat()
    order_id = _new_id()
    authzs = []
    for name in grant.names:
        wildcard = name.startswith("*.")
        kinds = ["dns-01"] if wildcard else ["http-01", "tls-alpn-01"] + (
            ["dns-01"] if dns01 else [])
        authz_id = _new_id()
        authzs.append(AcmeAuthz(authz_id, order_id, v.account.id, name.removeprefix("*."),
                                wildcard, "pending", expires, tuple(
            AcmeChallenge(_new_id(), authz_id, k, secrets.token_urlsafe(32), "pending")
            for k in kinds)))
    order = AcmeOrder(order_id, v.account.id, "pending", grant.names, expires, now.isoformat(),
                      tuple(a.id for a in authzs), replaces=grant.replaces)
    try:
        added = await server.store.add_acme_order(order, authzs, pending_cap=cap)
    except TooManyPending as exc:
        raise _too_many_pending(exc.waiting, cap) from None
    if not added:
        raise AcmeProblem("alreadyReplaced", f"the certificate {grant.replaces} is already "
                          "being replaced by another order of this account", 409)
    return _json(_order_obj(request, order), 201, url_of(request, f"order/{order_id}"))


def _too_many_pending(waiting: int, cap: int) -> AcmeProblem:
    return AcmeProblem("rateLimited", f"this account has {waiting} names waiting for "
                       f"validation, and at most {cap} may wait at once ([acme] "
                       "pending-authorizations; deactivated ones count until their order "
                       "expires): validate those first, or wait until they expire (7 days "
                       "after their order)", 429, {"Retry-After": "3600"})


async def _replaced(request: web.Request, text: object) -> ra.ReplacedCert:
    """What the inventory says of the certificate a newOrder's `replaces` names (RFC 9773
    5), for the registration authority to judge; its canonical CertID (the same
    certificate always gives the same text, so one order at a time can replace it)."""
    if not isinstance(text, str):
        raise AcmeProblem("malformed", "replaces is a CertID string: base64url(AKI) \".\" "
                          "base64url(serial)")
    rec, issuer = await _cert_of_id(request, text, 400)
    issued = await request.app[ACME].store.acme_cert(int(rec.serial, 16))
    return ra.ReplacedCert(cert_id(_ski(issuer), int(rec.serial, 16)),
                           issued.account_id if issued is not None else None, rec.names)


def cert_id(aki: bytes, serial: int) -> str:
    """The RFC 9773 CertID of a certificate, in its one canonical spelling."""
    der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # DER: a leading 0 if needed
    return f"{_b64(aki)}.{_b64(der)}"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def _own_order(request: web.Request, account: AcmeAccount, order_id: str) -> AcmeOrder:
    order = await request.app[ACME].store.acme_order(order_id)
    if order is None or order.account_id != account.id:
        raise AcmeProblem("malformed", "no such order for this account", 404)
    return order


@routes.post("/acme/order/{id}")
@acme_route
async def get_order(request: web.Request) -> web.Response:
    v = await _verified(request)
    assert v.account is not None
    v.post_as_get("an order")
    order = await _own_order(request, v.account, request.match_info["id"])
    return _json(_order_obj(request, order), 200, url_of(request, f"order/{order.id}"),
                 busy=order.status == "processing")


def _csr(body: dict[str, Any]) -> x509.CertificateSigningRequest:
    der = acme_jws.b64decode(body.get("csr"), "csr")
    try:
        return x509.load_der_x509_csr(der)
    except PARSE_ERRORS as exc:
        raise AcmeProblem("badCSR", f"the CSR cannot be parsed: {parse_error(exc)}") from None


_RELEASING: set[asyncio.Task[None]] = set()  # orders to say valid once the inventory is back


@routes.post("/acme/order/{id}/finalize")
@acme_route
async def finalize(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request)
    assert v.account is not None
    body = v.json()
    assert body is not None
    order = await _own_order(request, v.account, request.match_info["id"])
    csr = _csr(body)
    statuses = []
    for authz_id in order.authz_ids:
        authz = await server.store.acme_authz(authz_id)
        statuses.append(authz.status if authz is not None else "missing")
    x509_order: ra.X509Order = await decide(request, _holder(v.account), ra.AcmeFinalizeRequest(
        order.id, order.account_id, _status(order, utcnow().isoformat()), order.names,
        tuple(statuses), csr))
    if not await server.store.begin_acme_finalize(order.id):
        raise AcmeProblem("orderNotReady", "the order is being finalized or was already", 403)
    try:
        issued = await request.app[ISSUANCE].x509(x509_order, request.get("request_id"))
    except BaseException:
        # Nothing was issued: the client may finalize again once the CA recovers.
        await asyncio.shield(server.store.fail_acme_finalize(order.id, "ready", None))
        raise
    # Valid, offering its certificate, only now that it was released (its outcome line
    # durable): the row, committed before, named it while the order said processing.
    try:
        await server.store.release_acme_order(order.id)
    except StoreUnavailable:
        # The inventory away now: the order stays processing (the client polls it) and
        # is said valid once the inventory takes the write; a stop before that is
        # settled by the next start (complete_acme_finalizes).
        keep_trying(_RELEASING, log, f"ACME order {order.id} said valid",
                    lambda: server.store.release_acme_order(order.id), RELEASE_RETRY_S,
                    (StoreUnavailable,))
        raise
    log.info("issued", kind="acme", serial=issued.serial_hex, account=v.account.id,
             order=order.id, names=list(order.names), request_id=request.get("request_id"),
             audit_seq=issued.intent_seq)
    done = await server.store.acme_order(order.id)
    assert done is not None
    return _json(_order_obj(request, done), 200, url_of(request, f"order/{order.id}"))


# ---- authorizations and challenges ---------------------------------------------------------

def _challenge_obj(request: web.Request, c: AcmeChallenge) -> dict[str, Any]:
    out: dict[str, Any] = {"type": c.type, "url": url_of(request, f"chall/{c.id}"),
                           "token": c.token, "status": c.status}
    if c.validated:
        out["validated"] = c.validated
    if c.error:
        out["error"] = json.loads(c.error)
    return out


def _authz_obj(request: web.Request, a: AcmeAuthz) -> dict[str, Any]:
    status = a.status
    if status == "pending" and a.expires <= utcnow().isoformat():
        status = "expired"
    out: dict[str, Any] = {"identifier": {"type": "dns", "value": a.name}, "status": status,
                           "expires": a.expires,
                           "challenges": [_challenge_obj(request, c) for c in a.challenges]}
    if a.wildcard:
        out["wildcard"] = True
    return out


async def _own_authz(request: web.Request, account: AcmeAccount, authz_id: str) -> AcmeAuthz:
    authz = await request.app[ACME].store.acme_authz(authz_id)
    if authz is None or authz.account_id != account.id:
        raise AcmeProblem("malformed", "no such authorization for this account", 404)
    return authz


@routes.post("/acme/authz/{id}")
@acme_route
async def get_authz(request: web.Request) -> web.Response:
    v = await _verified(request)
    assert v.account is not None
    body = v.json(empty_ok=True)
    authz = await _own_authz(request, v.account, request.match_info["id"])
    if body is not None:  # RFC 8555 7.5.2: the only change a client may make
        # Other fields are the authorization's own, echoed back (lego sends an empty
        # identifier and expires with its status): ignored, as RFC 8555 7.1 has servers
        # ignore what a client may not change.
        if not isinstance(body, dict) or body.get("status") != "deactivated":
            raise AcmeProblem("malformed", 'an authorization can only be deactivated: '
                              '{"status": "deactivated"}')
        if not await request.app[ACME].store.deactivate_acme_authz(authz.id):
            raise AcmeProblem("malformed", f"the authorization is {authz.status}; only a "
                              "pending or valid one can be deactivated")
        fresh = await request.app[ACME].store.acme_authz(authz.id)
        assert fresh is not None
        authz = fresh
    else:
        authz = await _restart_stale(request, authz, v)
    return _json(_authz_obj(request, authz), busy=authz.status == "pending" and any(
        c.status == "processing" for c in authz.challenges))


@routes.post("/acme/chall/{id}")
@acme_route
async def challenge(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request)
    assert v.account is not None
    body = v.json(empty_ok=True)
    ch = await server.store.acme_challenge(request.match_info["id"])
    if ch is None:
        raise AcmeProblem("malformed", "no such challenge for this account", 404)
    authz = await _own_authz(request, v.account, ch.authz_id)
    up = f'<{url_of(request, f"authz/{authz.id}")}>;rel="up"'
    if body is not None:  # {}: the client is ready, validate now
        if authz.status == "pending" and authz.expires <= utcnow().isoformat():
            raise AcmeProblem("malformed", "the authorization has expired")
        if ch.status == "pending":
            await _rate(request, "failed-validation", v.account,
                        server.cfg.failed_validations_per_hour, take=False)
            if not await _start(request, ch, authz, v):
                await _not_started(server, ch, authz)
        fresh = await server.store.acme_challenge(ch.id)
        assert fresh is not None
        ch = fresh
    return _json(_challenge_obj(request, ch), links=(up,), busy=ch.status == "processing")


async def _start(request: web.Request, ch: AcmeChallenge, authz: AcmeAuthz,
                 v: acme_jws.Verified) -> bool:
    """Validate `ch` in the background if this request is the one to: it was pending, or
    its validation began so long ago that the worker running it must have gone away.
    Whether it started."""
    server = request.app[ACME]
    assert v.account is not None
    now = utcnow()
    stale = now - dt.timedelta(seconds=longest_s(server.cfg)) - STALE_GRACE
    if not await server.store.start_acme_challenge(ch.id, now, stale):
        return False
    # A failure counts for the client's address only where _rate asks that count: a
    # bound account's used up the unbound ones' (a review)
    by_address = None if server.cfg.eab_required or v.account.eab_kid else _client(request)
    server.spawn(_validate(server, ch, authz, v.jwk, v.account.id, by_address))
    return True


async def _not_started(server: AcmeServer, ch: AcmeChallenge, authz: AcmeAuthz) -> None:
    """Refuse a pending challenge's POST that started nothing, saying why: its
    authorization is no longer pending, or another of its challenges is being
    validated. Answered 200 "pending", a client waited for a validation that never came
    (an ACME trial: RFC 8555 7.5.1 has the reply be the challenge as updated)."""
    now = await server.store.acme_authz(authz.id) or authz
    if now.status != "pending":
        raise AcmeProblem("malformed", f"the authorization is {now.status}: only a pending "
                          "authorization's challenges are validated")
    mine = next((c for c in now.challenges if c.id == ch.id), None)
    if mine is not None and mine.status != "pending":
        return  # started by another request meanwhile: the reply says how it goes
    busy = [c.type for c in now.challenges if c.status == "processing" and c.id != ch.id]
    if busy:
        raise AcmeProblem("malformed", f"this authorization's {busy[0]} challenge is being "
                          "validated: poll the authorization for its result")


async def _restart_stale(request: web.Request, authz: AcmeAuthz,
                         v: acme_jws.Verified) -> AcmeAuthz:
    """Clients poll the authorization: a validation orphaned by a worker that went away
    (still processing long after its deadline) starts again here."""
    server = request.app[ACME]
    limit = (utcnow() - dt.timedelta(seconds=longest_s(server.cfg)) - STALE_GRACE).isoformat()
    stale = [c for c in authz.challenges if c.status == "processing"
             and c.started is not None and c.started < limit]
    if authz.status != "pending" or not stale:
        return authz
    for ch in stale:
        log.warning("acme validation started again: the process running it went away",
                    account=authz.account_id,
                    challenge=ch.id, type=ch.type, name=authz.name)
        await _start(request, ch, authz, v)
    fresh = await server.store.acme_authz(authz.id)
    return fresh if fresh is not None else authz


async def _validate(server: AcmeServer, ch: AcmeChallenge, authz: AcmeAuthz, jwk: jose.JWK,
                    account_id: str, client: str | None) -> None:
    """In the background (the client polls): validate, record the result; a failure
    counts for the account, and for the `client` address if given."""
    error: str | None = None
    busy = False  # it never ran: not the client's failure, so not counted as one
    try:
        await server.validator.validate(ch.type, authz.name, ch.token, jwk, account_id)
    except Failed as f:
        error = json.dumps({"type": PREFIX + f.kind, "detail": f.detail, "status": 400})
        busy = f.kind == "rateLimited"
    except Exception as exc:
        log.exception("validation error", challenge=ch.id)
        error = json.dumps({"type": PREFIX + "serverInternal",
                            "detail": f"validation failed: {str(exc)[:100]}", "status": 500})
    now = utcnow()
    try:
        await server.store.finish_acme_challenge(ch.id, error is None, error, now)
        if error is not None and not busy:
            await server.store.acme_rate_take("failed-validation", [
                f"account:{account_id}", *([f"ip:{client}"] if client else [])], now,
                now - RATE_WINDOW, None)
    except Exception:
        log.exception("cannot record a validation", challenge=ch.id)
    log.info("acme validation", account=account_id, challenge=ch.id, type=ch.type,
             name=authz.name, valid=error is None,
             error=json.loads(error)["detail"] if error else None)


# ---- certificates -----------------------------------------------------------------------------

def _serial(text: str) -> int:
    try:
        serial = int(text, 16)
        if serial <= 0 or len(text) > 40:
            raise ValueError
    except ValueError:
        raise AcmeProblem("malformed", "no such certificate", 404) from None
    return serial


@routes.post("/acme/cert/{serial}")
@acme_route
async def certificate(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request)
    assert v.account is not None
    v.post_as_get("a certificate")
    rec = await server.store.acme_cert(_serial(request.match_info["serial"]))
    if rec is None:
        raise AcmeProblem("malformed", "no such certificate", 404)
    if rec.account_id != v.account.id:
        raise AcmeProblem("unauthorized", "this certificate was issued to another account", 403)
    order = await server.store.acme_order(rec.order_id)
    if order is None or order.status != "valid" or order.cert_serial != rec.serial:
        # Not released (its outcome line not durable yet, or never: revoked at a start
        # and its order ready again): the order offers no certificate, nor does this.
        raise AcmeProblem("malformed", "no such certificate (its order is not valid)", 404)
    leaf = x509.load_der_x509_certificate(bytes(rec.der))
    # Its issuing CA, and while a root rotation hands over the new root certified by
    # the old one (ca/chains.py): certbot's fullchain.pem is what a server sends.
    issuers = request.app[ISSUANCE].issuers
    label = issuers.x509_of(rec.issuer)
    if label in issuers.x509:
        above = issuers.x509[label].presented_pem
    else:
        issuer = issuers.past.get(label)
        above = pem(issuer) if issuer is not None else ""
    return web.Response(text=pem(leaf) + above, content_type=PEM_CHAIN)


def _issuer_cert(request: web.Request, label: str | None) -> x509.Certificate | None:
    """The certificate of the issuing key a record names: in use, or retired since."""
    issuers = request.app[ISSUANCE].issuers
    label = issuers.x509_of(label)
    return issuers.x509[label].cert if label in issuers.x509 else issuers.past.get(label)


@routes.post("/acme/revoke-cert")
@acme_route
async def revoke_cert(request: web.Request) -> web.Response:
    server = request.app[ACME]
    v = await _verified(request, want="either")
    body = v.json()
    assert body is not None
    der = acme_jws.b64decode(body.get("certificate"), "certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        serial = cert.serial_number
    except PARSE_ERRORS:
        raise AcmeProblem("malformed", "certificate is not a DER certificate") from None
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, int) or isinstance(reason, bool)):
        raise AcmeProblem("badRevocationReason", "reason is an RFC 5280 reason code")
    rec = await server.store.cert(serial) if 0 < serial < 2 ** 160 else None
    link = await server.store.acme_cert(serial) if rec is not None else None
    # The certificate sent must be the one this CA issued, byte for byte.
    found = rec is not None and rec.fingerprint == hashlib.sha256(der).hexdigest()
    who: ra.Requester = (_holder(v.account) if v.account is not None
                         else ra.CertKeyHolder(spki_sha256(acme_jws.crypto_key(v.jwk))))
    owner = link.account_id if link else None
    # Another account may revoke one issued over ACME if it holds the names (RFC 8555
    # 7.6: a MUST, which an ACME trial found missing); never one the CA issued otherwise
    # (a service's or host's mutual-TLS identity, a review: holding its name over http-01
    # is not being that service).
    authorized = (found and rec is not None and v.account is not None and owner is not None
                  and owner != v.account.id and await server.store.acme_authorized(
                      v.account.id, rec.names, utcnow().isoformat()))
    order: ra.RevokeOrder = await decide(request, who, ra.AcmeRevokeRequest(
        serial, reason, found=found, revoked=rec is not None and rec.revoked_at is not None,
        revoked_reason=rec.reason if rec is not None else None, owner_account=owner,
        spki_sha256=rec.spki_sha256 if rec else None, authorized=authorized))
    try:
        done = await request.app[REVOCATIONS].revoke(order, request.get("request_id"))
    except RecordedNotCommitted as exc:
        # Recorded, so it stands and is committed once the inventory takes it: a 503
        # would have the client send it again, for a second line (a review).
        log.warning("revoked: recorded in the audit log, the inventory not yet",
                    kind="acme", serial=format(serial, "x"), error=str(exc),
                    actor=order.actor, request_id=request.get("request_id"))
        return web.Response(status=200)
    log.info("revoked", kind="acme", serial=format(serial, "x"), reason=order.reason,
             actor=order.actor, request_id=request.get("request_id"),
             audit_seq=done.audit_seq)
    return web.Response(status=200)


# ---- ACME Renewal Information (RFC 9773) --------------------------------------------------

@routes.get("/acme/renewal-info/{cert_id}")
@acme_route
async def renewal_info(request: web.Request) -> web.Response:
    rec, _ = await _cert_of_id(request, request.match_info["cert_id"], 404)
    now = utcnow()
    if rec.revoked_at is not None:  # renew at once: the window is already open
        start, end = now - dt.timedelta(hours=1), now
    else:
        nb = dt.datetime.fromisoformat(rec.not_before)
        life = dt.datetime.fromisoformat(rec.not_after) - nb
        start, end = nb + life * 2 / 3, nb + life * 5 / 6
    z = lambda t: t.replace(microsecond=0).isoformat().replace("+00:00", "Z")  # noqa: E731
    resp = _json({"suggestedWindow": {"start": z(start), "end": z(end)}})
    # RFC 9773's usual 6 h, but at most a quarter of the window: a day's certificate has a
    # 4 h window, which a client polling every 6 h could step over (an ACME trial).
    retry = min(ARI_RETRY_AFTER_S, max(60, int((end - start).total_seconds() / 4)))
    resp.headers["Retry-After"] = str(retry)
    return resp


async def _cert_of_id(request: web.Request, text: str, missing: int
                      ) -> tuple[CertRecord, x509.Certificate]:
    """The certificate an RFC 9773 CertID names, with its issuer; AcmeProblem
    `malformed` if it names none (with status `missing`)."""
    aki_text, dot, serial_text = text.partition(".")
    if not dot:
        raise AcmeProblem("malformed", "the CertID is base64url(AKI keyIdentifier) \".\" "
                          "base64url(serial)")
    aki = acme_jws.b64decode(aki_text, "the AKI part")
    raw_serial = acme_jws.b64decode(serial_text, "the serial part")
    if not raw_serial or len(raw_serial) > 21 or raw_serial[0] & 0x80:
        raise AcmeProblem("malformed", "the serial part is not a positive DER integer")
    rec = await request.app[ACME].store.cert(int.from_bytes(raw_serial, "big"))
    issuer = _issuer_cert(request, rec.issuer) if rec else None
    if rec is None or issuer is None or _ski(issuer) != aki:
        raise AcmeProblem("malformed", "no certificate with this CertID", missing)
    return rec, issuer


def _ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


# ---- the admin side: EAB keys ------------------------------------------------------------

@routes.post("/v1/acme/eab")
async def create_eab(request: web.Request) -> web.Response:
    """An EAB key for `names` (admin, mutual TLS): {kid, hmac, expires}; the HMAC key is
    shown once and erased from the inventory when an account binds it."""
    who = await identity(request)
    body = await admin_json_body(request, {"names", "ttl"})
    grant: ra.AcmeEABGrant = await decide(request, who, ra.AcmeEABRequest(
        body.get("names"), body.get("ttl", "24h")))
    now = utcnow()
    kid = f"eab-{secrets.token_hex(8)}"
    mac_key, mac_text = new_eab_key()
    expires = (now + dt.timedelta(seconds=grant.ttl_s)).isoformat()
    await request.app[ACME].store.add_acme_eab(AcmeEAB(
        kid, mac_key, grant.names, expires, now.isoformat(), grant.actor))
    await request.app[AUDIT].append("acme.eab.create", kid=kid, names=list(grant.names),
                                    expires=expires, actor=grant.actor,
                                    request_id=request.get("request_id"))
    log.info("acme eab key created", kid=kid, names=list(grant.names), expires=expires,
             actor=grant.actor)
    return web.json_response({"kid": kid, "hmac": mac_text, "expires": expires,
                              "names": list(grant.names), "warnings": list(grant.warnings)},
                             status=201)


LISTED = 1000  # the latest EAB keys and accounts an admin's listing shows


def _eab_state(eab: AcmeEAB, now: str) -> str:
    if eab.used_at is not None:
        return "used"
    if eab.mac_key is None:
        return "withdrawn"
    return "expired" if eab.expires <= now else "unused"


@routes.get("/v1/acme/eab")
async def list_eabs(request: web.Request) -> web.Response:
    """The latest EAB keys (admin): kid, names, who made it and when, until when, and
    its state (unused, used by an account, expired, withdrawn); never a MAC key."""
    await identity(request, "admin")
    now = utcnow().isoformat()
    eabs = await request.app[ACME].store.acme_eabs(LISTED)
    return web.json_response({"eab": [
        {"kid": e.kid, "names": list(e.names), "state": _eab_state(e, now),
         "created_at": e.created_at, "created_by": e.created_by, "expires": e.expires,
         "used_at": e.used_at, "account": e.account_id} for e in eabs]})


@routes.post("/v1/acme/eab/withdraw")
async def withdraw_eab(request: web.Request) -> web.Response:
    """Withdraw an EAB key not yet bound (admin): its MAC key is erased, so no account
    can bind it (a key handed to the wrong person, or leaked)."""
    who = await identity(request)
    body = await admin_json_body(request, {"kid"})
    kid = str(body.get("kid", ""))[:100]
    store = request.app[ACME].store
    eab = await store.acme_eab(kid)
    state = _eab_state(eab, utcnow().isoformat()) if eab is not None else None
    order: ra.AcmeAdminOrder = await decide(request, who, ra.AcmeAdminRequest(
        "withdraw-eab", kid, state))
    # The record first: a withdrawal the log does not show never happened.
    seq = await request.app[AUDIT].append("acme.eab.withdraw", kid=kid, actor=order.actor,
                                          request_id=request.get("request_id"))
    if not await store.withdraw_acme_eab(kid, utcnow()):
        await void(request.app[AUDIT], seq, "acme.eab.withdraw", "the key was bound, "
                   "withdrawn or erased meanwhile", request.get("request_id"), kid=kid)
        raise Refused(f"the EAB key {kid!r} was bound meanwhile: deactivate the account "
                      "that bound it instead", Reason.CONFLICT)
    log.info("acme eab key withdrawn", kid=kid, actor=order.actor)
    return web.json_response({"kid": kid, "state": "withdrawn"})


@routes.get("/v1/acme/accounts")
async def list_accounts(request: web.Request) -> web.Response:
    """The latest ACME accounts (admin): id, status, contact, name patterns, the EAB
    key it bound and when it was made."""
    await identity(request, "admin")
    accounts = await request.app[ACME].store.acme_accounts(LISTED)
    return web.json_response({"accounts": [
        {"id": a.id, "status": a.status, "contact": list(a.contact), "names": list(a.names),
         "eab_kid": a.eab_kid, "created_at": a.created_at} for a in accounts]})


@routes.post("/v1/acme/accounts/deactivate")
async def deactivate_account(request: web.Request) -> web.Response:
    """Deactivate an ACME account (admin), as its holder could (RFC 8555 7.3.6): it
    orders, finalizes and revokes nothing more; its certificates stay valid (revoke
    them apart)."""
    who = await identity(request)
    body = await admin_json_body(request, {"account"})
    account_id = str(body.get("account", ""))[:100]
    store = request.app[ACME].store
    account = await store.acme_account(account_id)
    order: ra.AcmeAdminOrder = await decide(request, who, ra.AcmeAdminRequest(
        "deactivate-account", account_id, account.status if account else None))
    await request.app[AUDIT].append("acme.account.deactivate", account=account_id,
                                    actor=order.actor, request_id=request.get("request_id"))
    await store.deactivate_acme_account(account_id)
    log.info("acme account deactivated", account=account_id, by=order.actor)
    return web.json_response({"account": account_id, "status": "deactivated"})


def new_eab_key() -> tuple[bytes, str]:
    """A 256-bit EAB HMAC key and its base64url text, which never starts with '-':
    certbot and lego read `--eab-hmac-key -x...` as a missing value followed by an
    option, so one key in 64 could not be pasted. Redrawing those costs 0.03 bits."""
    while True:
        key = secrets.token_bytes(32)
        text = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
        if not text.startswith("-"):
            return key, text
