"""X.509 endpoints: tokens, enroll, renew, revoke, CRL, OCSP, chain, EST."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from ca import ra
from ca.chains import first_cert
from ca.errors import PrimaryUnavailable
from ca.http_body import read_body
from ca.issuance.issue import Issued
from ca.issuance.profiles import fingerprint, pem, utcnow
from ca.policy import Reason, Refused
from ca.process import DAEMON_STARTED
from ca.revocation import RecordedNotCommitted, ocsp, sent_or_withheld
from ca.server.common import (
    AUDIT,
    GATE,
    ISSUANCE,
    LIMIT,
    REVOCATIONS,
    SETTINGS,
    STORE,
    TOKENS,
    decide,
    field,
    http_date,
    identity,
    json_body,
    not_modified,
    parse_csr,
    peer_der,
    revalidated,
)
from ca.server.problems import Problem
from ca.server.throttle import Throttle
from ca.store.errors import StoreUnavailable

routes = web.RouteTableDef()
log = structlog.get_logger("hsmca.issue")
PKCS7_CERTS = "application/pkcs7-mime; smime-type=certs-only"


@dataclass(frozen=True)
class Replayed:
    """The certificate a bootstrap token already enrolled, sent again to the holder of
    its key: an enrollment whose answer was lost is retried with the same token."""

    cert: x509.Certificate
    issuer: str


def _answer(request: web.Request, issued: Issued | Replayed) -> dict[str, Any]:
    cert = issued.cert
    issuer = request.app[ISSUANCE].issuers.x509[issued.issuer]
    answer = {"serial": format(cert.serial_number, "x"), "certificate": pem(cert),
              "chain": issuer.chain_pem, "not_after": cert.not_valid_after_utc.isoformat()}
    if cert.not_valid_after_utc >= issuer.cert.not_valid_after_utc:
        # Cut to the issuing CA's end, which no leaf outlives: said, not silent (a service
        # team asked for 10 years and got the issuer's remaining 5 without a word).
        answer["warnings"] = [
            f"the lifetime was cut to the issuing CA's expiry "
            f"({issuer.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC): a certificate never "
            "outlives its issuer; rotate the issuing key for longer ones (docs/keys.md)"]
    return answer


def _logged(request: web.Request, order: ra.X509Order, issued: Issued) -> Issued:
    log.info("issued", kind="x509", serial=issued.serial_hex, role=order.role,
             names=[v for _, v in order.names], actor=order.actor,
             request_id=request.get("request_id"), audit_seq=issued.intent_seq)
    return issued


@routes.post("/v1/tokens")
async def create_token(request: web.Request) -> web.Response:
    who = await identity(request)
    body = await json_body(request, {"role", "names", "principals", "ttl"})
    # Each field's JSON type here (400 bad-field, as api.md says), its value in the RA.
    grant: ra.TokenGrant = await decide(request, who, ra.TokenRequest(
        field(body, "role", str), field(body, "names", list),
        field(body, "principals", list, required=False) or [],
        field(body, "ttl", str, required=False) or "1h"))
    made = await request.app[TOKENS].create(grant)
    return web.json_response({"token": made.secret, "id": made.id, "expires": made.expires},
                             status=201)


def _token_refusals_unlogged(why: object, unlogged: int) -> None:
    log.warning("bootstrap tokens refused and not logged one by one", reason=why,
                unlogged=unlogged, interval_s=TOKEN_REFUSALS.interval_s,
                burst=TOKEN_REFUSALS.burst)


# Per reason: anyone can send a thousand guesses a second, and the log must not echo them
# (the guesses are counted for the rate limit and the metrics all the same).
TOKEN_REFUSALS = Throttle(burst=20, on_quiet=_token_refusals_unlogged)


async def _token_failed(request: web.Request, why: str, detail: str,
                        token_id: str | None = None) -> Problem:
    """401 with the reason. A guess (no token, or one the CA never made) is counted for
    the whole daemon, and once the client is over the limit it is told to wait
    instead (429); a real token that is spent or expired is not a guess. A real one is
    logged as a warning with its id (not its secret): used twice, it was copied or
    raced, which the admin who made it should hear of."""
    client = request.remote or "-"
    if (unlogged := TOKEN_REFUSALS.allow(why)) is not None:
        if unlogged:
            _token_refusals_unlogged(why, unlogged)
        (log.info if token_id is None else log.warning)(
            "bootstrap token refused", reason=why, client=client,
            request_id=request.get("request_id"),
            **({} if token_id is None else {"token_id": token_id}))
    try:
        wait = await request.app[LIMIT].token_failed(client) if why in ("missing", "unknown") \
            else 0
    except PrimaryUnavailable as exc:
        return Problem(503, "Service Unavailable", f"{exc}; retry later", "unavailable",
                       {"Retry-After": "1"})
    if wait:
        return Problem(429, "Too Many Requests", f"too many failed bootstrap-token attempts "
                       f"from {client}; retry in {wait} s", "rate-limited",
                       {"Retry-After": str(wait)})  # RFC 6585 4: for clients, not prose
    # A client tells these apart: a typo (bad-token) is not retried, a spent token may
    # be its own earlier attempt, an expired one needs a new token (an API client's
    # trial branched on the detail's words).
    kind = {"used": "token-spent", "expired": "token-expired"}.get(why, "bad-token")
    return Problem(401, "Unauthorized", detail, kind,
                   {"WWW-Authenticate": _challenge(request)})


def _is_est(request: web.Request) -> bool:
    return request.path.startswith("/.well-known/est/")


def _challenge(request: web.Request) -> str:
    """RFC 9110 11.6.1: a 401 names the schemes that would do. EST clients (libest's
    estclient -u/-h, curl --user) answer a Basic challenge (RFC 7030 3.2.3), so EST
    offers it first; the API takes RFC 6750's Bearer."""
    if _is_est(request):
        return 'Basic realm="hsmca", Bearer realm="hsmca"'
    return 'Bearer realm="hsmca"'


def _token_from_basic(credentials: str) -> str | None:
    """The token from HTTP Basic credentials: the password; the user name is the
    client's to choose (EST clients need one) and is not looked at, in whatever
    characters it is (RFC 7617 leaves them to the client: a device named `gerät-01`
    was refused as if its token were wrong, an EST trial)."""
    try:
        raw = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    _, colon, password = raw.partition(b":")
    if not colon or not password or not password.isascii():
        return None
    return password.decode("ascii")


def _secret_sent(request: web.Request) -> tuple[str, str | None]:
    """The Authorization header's scheme (lower case) and the token it carries: a
    Bearer token, or on EST the HTTP Basic password; None if it carries none. A token is
    ASCII: other bytes (aiohttp keeps them as surrogates) are simply not one of ours."""
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    scheme = scheme.lower()
    if scheme == "basic" and _is_est(request):
        secret = _token_from_basic(secret) or ""
    elif scheme != "bearer":
        return scheme, None
    secret = secret.strip()[:512]
    return scheme, secret if secret and secret.isascii() else None


async def _bearer(request: web.Request) -> tuple[ra.TokenHolder, Any]:
    scheme, secret = _secret_sent(request)
    if scheme == "basic" and _is_est(request) and secret is None:
        raise await _token_failed(request, "missing", "HTTP Basic credentials for EST "
                                  "are base64 of 'any-name:<bootstrap token>'")
    if secret is None and (scheme != "bearer" or not request.headers.get(
            "Authorization", "").partition(" ")[2].strip()):
        raise await _token_failed(request, "missing", "send the bootstrap token as "
                                  "'Authorization: Bearer <token>'"
                                  + (" (EST also takes it as the HTTP Basic password)"
                                     if _is_est(request) else ""))
    token = await request.app[TOKENS].find(secret) if secret is not None else None
    if token is None:
        raise await _token_failed(request, "unknown", "unknown bootstrap token")
    if token.expires < utcnow().isoformat():
        if token.used_at is not None:
            raise await _token_used(request, token)
        raise await _token_failed(request, "expired", f"this bootstrap token expired at "
                                  f"{token.expires}: ask an admin for a new one", token.id)
    if token.used_at is not None and token.used_serial is None:
        raise await _being_spent(request, token)  # being spent now, or lost by a kill
    return ra.TokenHolder(token.id, token.role, token.names, token.principals), token


SPENDING_S = 60  # a token marked spent without a certificate this long is not being spent


def _daemon_started() -> dt.datetime:
    """When the daemon started (its primary says, in the environment its workers
    inherit): a token marked before is not being spent by a request it serves (a kill's
    left-over, which the start settled: token-spent, as a crash test expects)."""
    try:
        return dt.datetime.fromisoformat(os.environ[DAEMON_STARTED])
    except (KeyError, ValueError):
        return utcnow()


_STARTED = _daemon_started()


async def _being_spent(request: web.Request, token: Any, why: str | None = None) -> Problem:
    """Another request is spending `token` right now: 409, retry in a second (it then
    gets the certificate, if its key is the one that enrolled, or token-spent). A
    device's retry while its first request was still being signed was told to ask an
    admin for a new token (an EST trial). Marked long ago with no certificate, it was
    lost (a killed process; the next start gives it back): token-spent, as before."""
    try:
        marked = dt.datetime.fromisoformat(token.used_at)
        # (abs: marked by a node whose clock is ahead, it is not younger than now)
        since = abs((utcnow() - marked).total_seconds())
    except (TypeError, ValueError):
        marked, since = _STARTED, SPENDING_S
    if since >= SPENDING_S or marked < _STARTED:
        return await _token_used(request, token, why)
    return _spending(request, token.id)


async def _log_takes_lines(request: web.Request) -> bool:
    try:
        return (await request.app[AUDIT].health()).healthy
    except Exception:  # the primary away or busy: not known to, so no "retry in a second"
        return False


def _spending(request: web.Request, token_id: str) -> Problem:
    # Logged as a spent token's reuse is: used twice at once, it was copied or raced,
    # which the admin who made it should hear of (a review: the 409 said nothing).
    if (unlogged := TOKEN_REFUSALS.allow("spending")) is not None:
        if unlogged:
            _token_refusals_unlogged("spending", unlogged)
        log.warning("bootstrap token refused", reason="spending", token_id=token_id,
                    client=request.remote or "-", request_id=request.get("request_id"))
    # 409, not 503: nothing is wrong with the CA, and a client that treats 5xx as an
    # outage would wait it out; the state (a spend under way) changes within a second.
    return Problem(409, "Conflict", "this bootstrap token is being spent by another "
                   "request right now: retry in a second (a retry with the key that "
                   "request sent gets the certificate it enrolls; another key is told the "
                   "token is spent)", "conflict", {"Retry-After": "1"})


async def _token_used(request: web.Request, token: Any, why: str | None = None) -> Problem:
    """401 token-spent, with `why` a retry was not answered with its certificate when
    there is one to say (an upgrade trial was told "a retry with the same key gets it"
    for a token spent before retries were answered)."""
    return await _token_failed(request, "used", "this bootstrap token has already been used "
                               f"(each enrolls once{'; ' + why if why else ''}): ask an "
                               "admin for a new one", token.id)


async def _replay(request: web.Request, holder: ra.TokenHolder, token: Any,
                  csr: x509.CertificateSigningRequest, ttl: object) -> Replayed:
    """The certificate `token` enrolled, sent again if the registration authority says
    so (ra.EnrollAgainRequest): the client whose 201 was lost (a timeout, a reset) would
    otherwise hold a spent token and no certificate (an API client's trial). Nothing is
    signed, so nothing is logged in the audit log; the daemon's log says it."""
    issued = await request.app[STORE].issued_cert(int(token.used_serial, 16))
    if issued is None:  # (a row removed by hand)
        raise await _token_used(request, token, "the certificate it enrolled is gone")
    record = issued.record
    issuers = await request.app[ISSUANCE].keys.refresh()  # a key retired meanwhile counts
    issuer = record.issuer or issuers.first_x509
    try:
        await decide(request, holder, ra.EnrollAgainRequest(
            csr, int(record.serial, 16), released=token.released_at is not None,
            revoked=record.revoked_at is not None,
            not_after=dt.datetime.fromisoformat(record.not_after),
            issuer_in_use=issuer in issuers.x509, spki_sha256=record.spki_sha256, ttl=ttl))
    except Refused as exc:
        if exc.reason is not Reason.TOKEN_SPENT:
            raise
        if token.released_at is None and await _log_takes_lines(request):
            # Its request may still be answering (its row is in, its release not yet):
            # as _bearer. Not while the log takes no lines: the outcome is owed, and the
            # certificate revoked as never released once it is back (then the token
            # enrolls again), which a retry in a second does not see.
            raise await _being_spent(request, token, exc.detail) from None
        raise await _token_used(request, token, exc.detail) from None
    log.info("enrollment answered again: the retry's key is the certificate's",
             serial=record.serial, token_id=token.id, request_id=request.get("request_id"))
    return Replayed(x509.load_der_x509_certificate(issued.der), issuer)


async def _enroll(request: web.Request, bearer: tuple[ra.TokenHolder, Any],
                  csr: x509.CertificateSigningRequest, ttl: object) -> Issued | Replayed:
    holder, token = bearer
    if token.used_at is not None:
        return await _replay(request, holder, token, csr, ttl)
    order: ra.X509Order = await decide(request, holder, ra.EnrollRequest(csr, ttl))
    tokens = request.app[TOKENS]
    # Spent after the decision, so a refused CSR does not burn the token.
    if not await tokens.spend(token):
        # Unspent a moment ago: another request is spending it now, and may be signing.
        raise _spending(request, token.id)
    try:
        issued = await request.app[ISSUANCE].x509(order, request.get("request_id"))
    except Exception:
        # Nothing reached the inventory (the token is marked spent on the certificate in
        # the same transaction as its row), so the token may be used again.
        await tokens.give_back(token)
        raise
    # Released: its outcome line is durable. Said before the answer, so that a retry of
    # this key after it is answered with this certificate; if it cannot be said, such a
    # retry is refused as spent (as before retries were answered), which is safe.
    try:
        await tokens.released(token)
    except StoreUnavailable as exc:
        log.warning("a retry of this enrollment will be refused: its release could not be "
                    "recorded", token_id=token.id, error=str(exc))
    return _logged(request, order, issued)


async def _renew(request: web.Request, csr: x509.CertificateSigningRequest | None,
                 ttl: object) -> Issued:
    who = await identity(request)
    order: ra.X509Order = await decide(request, who, ra.RenewRequest(csr, ttl))
    issued = await request.app[ISSUANCE].x509(order, request.get("request_id"))
    assert order.renewed_from is not None
    # A revocation of the presented certificate may have run while this was signed.
    async with sent_or_withheld(request.app[ISSUANCE], issued):
        await request.app[REVOCATIONS].settle(order.renewed_from, request.get("request_id"),
                                              child=issued.cert.serial_number)
    return _logged(request, order, issued)


@routes.post("/v1/x509/enroll")
async def enroll(request: web.Request) -> web.Response:
    bearer = await _bearer(request)
    body = await json_body(request, {"csr", "ttl"})  # a misspelt ttl is not ignored
    csr = parse_csr(field(body, "csr", str))
    issued = await _enroll(request, bearer, csr, field(body, "ttl", str, required=False))
    return web.json_response(_answer(request, issued),
                             status=200 if isinstance(issued, Replayed) else 201)


@routes.post("/v1/x509/renew")
async def renew(request: web.Request) -> web.Response:
    # Who asks, before what is asked: a revoked or expired certificate with a misspelt
    # field was told to mend the field, and only then that it can renew nothing (an
    # HTTP trial).
    await identity(request)
    body = await json_body(request, {"csr", "ttl"})
    csr = parse_csr(field(body, "csr", str)) if "csr" in body else None
    issued = await _renew(request, csr, field(body, "ttl", str, required=False))
    return web.json_response(_answer(request, issued), status=201)


_HEX_SERIAL = re.compile(r"[0-9a-fA-F]{1,40}")


def parse_serial(text: str) -> int:
    try:
        # Hex digits only: int() would also take spaces, '_' and a 0x prefix.
        if not _HEX_SERIAL.fullmatch(text):
            raise ValueError
        serial = int(text, 16)
        if serial <= 0:
            raise ValueError
    except ValueError:
        raise Problem(400, "Bad Request", "serial must be the certificate's serial number in "
                      "hex (as returned at issuance)", "bad-field") from None
    return serial


def _recorded(exc: RecordedNotCommitted, order: ra.RevokeOrder) -> dict[str, Any]:
    """The answer to a revocation the audit log records and the inventory has not taken
    yet: it stands, and says when it takes effect."""
    log.warning("revoked: recorded in the audit log, the inventory not yet",
                serials=[format(s, "x") for s in exc.serials], reason=order.reason,
                error=str(exc), actor=order.actor)
    answer: dict[str, Any] = {
        "revoked_at": exc.at.isoformat(), "revoked": [format(s, "x") for s in exc.serials],
        "ssh_certificates": 0, "committed": False, "published": False,
        "warnings": [exc.advice("takes effect in the CRL, OCSP and mutual TLS (with the "
                                "SSH certificates issued on their strength)",
                                "until then those still say the certificate is good")]}
    if order.serial is not None:
        answer["serial"] = format(order.serial, "x")
    return answer


def _given_certificate(body: dict[str, Any]) -> x509.Certificate:
    text = field(body, "certificate", str)
    try:
        return x509.load_pem_x509_certificate(text.encode())
    except ValueError:
        raise Problem(400, "Bad Request", "certificate is not a PEM certificate",
                      "bad-field") from None


@routes.post("/v1/x509/revoke")
async def revoke(request: web.Request) -> web.Response:
    """Body {"serial", "reason"?}, or, for an admin, {"identity", "reason"?}: everything
    live issued to that name, or {"certificate" (PEM), "reason"?}: that certificate, also
    one the inventory does not know that this CA's key signed (issued after the backup
    the CA was restored from), which is then recorded. keyCompromise reaches the whole
    lineage."""
    who = await identity(request)
    body = await json_body(request, {"serial", "reason", "identity", "certificate"})
    if sum(k in body for k in ("serial", "identity", "certificate")) != 1:
        raise Problem(400, "Bad Request", "give one of serial (hex), identity (a name) or "
                      "certificate (PEM)", "bad-field")
    rec = None
    revocations = request.app[REVOCATIONS]
    if "identity" in body:
        order: ra.RevokeOrder = await decide(request, who, ra.RevokeIdentityRequest(
            field(body, "identity", str), body.get("reason")))
    else:
        given = _given_certificate(body) if "certificate" in body else None
        serial = (given.serial_number if given is not None
                  else parse_serial(field(body, "serial", str)))
        rec = await request.app[GATE].store.cert(serial)
        # The facts the registration authority decides on: the one given is the
        # inventory's, or, one the inventory lacks, this CA's keys signed it.
        issuer = (await revocations.issuer_of(given)
                  if given is not None and rec is None else None)
        order = await decide(request, who, ra.RevokeRequest(
            serial, body.get("reason"), found=rec is not None,
            revoked=rec is not None and rec.revoked_at is not None,
            revoked_reason=rec.reason if rec is not None else None,
            given=given is not None, proven=issuer is not None,
            matches=given is None or rec is None or rec.fingerprint == fingerprint(given)))
        if given is not None and issuer is not None:
            await revocations.adopt(given, issuer, order.actor, request.get("request_id"))
            log.warning("recorded a certificate this CA signed and its inventory lacked, to "
                        "revoke it", serial=format(serial, "x"), issuer=issuer,
                        actor=order.actor)
    # Read before: the daemon may replace it the moment the revocation commits.
    host_admin = request.app[SETTINGS].admin_cert
    held = first_cert(host_admin) if host_admin else None
    try:
        done = await request.app[REVOCATIONS].revoke(order, request.get("request_id"))
    except RecordedNotCommitted as exc:
        return web.json_response(_recorded(exc, order))
    log.info("revoked", serials=[format(s, "x") for s in done.serials], reason=order.reason,
             ssh_certificates=done.ssh_certs, actor=order.actor,
             request_id=request.get("request_id"), audit_seq=done.audit_seq)
    # A revoked certificate whose reason is changed keeps its revocation's time (the CRL
    # and OCSP say that one): the answer said the second request's (a cluster trial).
    standing = rec.revoked_at if rec is not None and rec.revoked_at is not None else None
    answer: dict[str, Any] = {"revoked_at": standing or done.at.isoformat(),
                              "revoked": [format(s, "x") for s in done.serials],
                              "ssh_certificates": done.ssh_certs}
    if order.serial is not None:
        answer["serial"] = format(order.serial, "x")
    warnings = []
    if done.unpublished:
        labels = ", ".join(sorted(set(done.unpublished.values())))
        listed = ", ".join(format(s, "x") for s in done.unpublished)
        n = len(done.unpublished)
        which = ("it was" if len(done.serials) == 1 else f"1 of them ({listed}) was"
                 if n == 1 else f"{n} of them ({listed}) were")
        it, its, is_, they = (("it", "its", "is", "it") if n == 1 else
                              ("them", "their", "are", "they"))
        revoked_ca = (await request.app[ISSUANCE].keys.refresh()).revoked_ca
        standing = sorted(set(done.unpublished.values()) - set(revoked_ca))
        # (a docs trial was told to revoke a CA certificate revoked already, by "LABEL")
        then = (f"To have relying parties refuse everything that key issued, revoke its CA "
                f"certificate: hsmca key revoke {' / '.join(standing)}" if standing else
                "Its CA certificate is revoked already: relying parties that check its "
                "root's CRL refuse everything it issued")
        warnings.append(
            f"{which} issued by a key retired or destroyed ({labels}), which signs nothing: "
            f"{its} CRL and OCSP cannot say {they} {is_} revoked, so relying parties that "
            f"check only those trust {it} until {they} expire{'s' if n == 1 else ''}. "
            f"hsmca itself refuses {it}. {then}")
        answer["unpublished"] = [format(s, "x") for s in done.unpublished]
    if rec is not None and order.reason != "superseded":
        # An SSH trial: "revoking Alice's certificate" by its serial left the one it was
        # renewed from (the same key) live, and it went on getting SSH certificates.
        # Renewals overlap by design; the revoker is told, and how to cut the holder
        # off. (Not for `superseded`: the one that replaced it is meant to stay.)
        same_key = [s for s in await request.app[GATE].store.live_certs_with_keys(
            [rec.spki_sha256], utcnow()) if s not in done.serials]
        if same_key:
            shown = ", ".join(format(s, "x") for s in same_key[:5])
            how = ("revoke with --identity NAME (everything issued to that name) or "
                   "--reason keyCompromise (everything of this key)"
                   if who.role == "admin" else "revoke them too, each with its own "
                   "credential, or --reason keyCompromise (everything of this key)")
            warnings.append(
                f"{len(same_key)} other live certificate(s) of the same key ({shown}"
                f"{', ...' if len(same_key) > 5 else ''}) still authenticate its holder, "
                "who can renew with them and ask for SSH certificates until they expire; "
                f"to cut the holder off, {how}")
            answer["same_key_live"] = [format(s, "x") for s in same_key]
    if held is not None and held.serial_number in done.serials:
        # The daemon replaces it with a new key (ca/own_certs.py); a revoker who revoked
        # it because the directory leaked must know where the new one is (a review).
        warnings.append(f"it was the CA host's own admin credential ({host_admin}): the "
                        "daemon replaces it at once with a new key in the same directory; "
                        "if that directory was exposed, remove both files there (no "
                        "credential is then made) and enroll admins with admin tokens")
    if done.pending is not None:
        warnings.append(f"the CRL and OCSP responses are not re-signed yet ({done.pending}): "
                        "they will be when the HSM and the audit log are back, without "
                        "another request; meanwhile OCSP answers tryLater for them")
        answer["published"] = False
    if warnings:
        answer["warnings"] = warnings
    return web.json_response(answer)


async def crl(request: web.Request) -> web.Response:
    """The current issuer's CRL."""
    return _crl_response(request, await request.app[REVOCATIONS].crl())


async def issuer_crl(request: web.Request) -> web.Response:
    """An issuer's CRL, by its key's label (the CRL distribution point of its leaves)."""
    return _crl_response(request,
                         await request.app[REVOCATIONS].crl(request.match_info["issuer"]))


def _crl_response(request: web.Request, der: bytes) -> web.Response:
    return revalidated(request, der, "application/pkix-crl",
                       modified=x509.load_der_x509_crl(der).last_update_utc)


async def all_crls(request: web.Request) -> web.Response:
    """Every CRL a relying party that checks whole chains needs, in one PEM file: each
    issuing key's still in use (after a rotation, the previous key's certificates name
    its CRL), the root's, and during a root's hand-over the previous root's. nginx's
    ssl_crl takes one file and refuses every client whose chain lacks a CRL (a
    relying-party trial, after an issuing-key rotation)."""
    issuers = await request.app[ISSUANCE].keys.refresh()
    revocations = request.app[REVOCATIONS]
    crls = [x509.load_der_x509_crl(await revocations.crl(label))
            for label in issuers.crl_labels()]
    # A retired issuing key's last CRL, while it is valid: its certificates still valid
    # were refused by every such relying party the moment it was retired (a key trial);
    # now when the CRL ends, as `key retire` says.
    for label in issuers.crl_past():
        if (kept := await revocations.still_valid_crl(label)) is not None:
            crls.append(x509.load_der_x509_crl(kept))
    return revalidated(request, b"".join(c.public_bytes(serialization.Encoding.PEM)
                                         for c in crls), "application/x-pem-file",
                       modified=max(c.last_update_utc for c in crls))


def _ocsp_response(request: web.Request, answer: ocsp.Answer) -> web.Response:
    # A POST's answer carries them too, as SPEC has every response do (a relying-party
    # trial asked for no-store: an HTTP cache reuses a POST's answer for no other request
    # unless told to, RFC 9111 4, and SPEC's own check reads max-age from POSTs).
    cache = f"max-age={answer.max_age}, public, no-transform, must-revalidate" \
        if answer.max_age else "no-cache"
    headers = {"Cache-Control": cache}
    if answer.this_update is not None and answer.next_update is not None:
        # RFC 5019 6.2: what a cache needs to keep a response and to ask again cheaply.
        etag = f'"{hashlib.sha256(answer.der).hexdigest()[:32]}"'
        headers.update({"Last-Modified": http_date(answer.this_update),
                        "Expires": http_date(answer.next_update), "ETag": etag})
        # must-revalidate sends caches back with the ETag; the answer is 304 while the
        # response stands (a protocol trial got the whole body again every time).
        if not_modified(request, etag):
            return web.Response(status=304, headers=headers)
    return web.Response(body=answer.der, content_type="application/ocsp-response",
                        headers=headers)


async def ocsp_post(request: web.Request) -> web.Response:
    der = await read_body(request)
    return _ocsp_response(request, await _ocsp_answer(request, der))


async def ocsp_get(request: web.Request) -> web.Response:
    text = request.match_info["b64"]
    bare = text.rstrip("=")
    # Padding of its own length or none: more `=` made one more cache key each (a review)
    text = bare if len(text) - len(bare) <= 2 else ""
    try:
        # Strictly: loosely, any junk around a request (`!!!`, spaces) got the same
        # cacheable response, an unbounded number of cache keys for one (a relying-party
        # trial). Unpadded and base64url are taken, as clients send both.
        der = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_"
                               if "-" in text or "_" in text else None, validate=True)
    except (binascii.Error, ValueError):
        der = b""
    return _ocsp_response(request, await _ocsp_answer(request, der))


async def _ocsp_answer(request: web.Request, der: bytes) -> ocsp.Answer:
    # The issuers as of now: a key another process retired a moment ago counts (a
    # counter read; rebuilt only when a key changed).
    issuers = await request.app[ISSUANCE].keys.refresh()
    return await ocsp.answer(der, request.app[GATE].store, issuers)


@routes.get("/v1/x509/roots")
async def roots(request: web.Request) -> web.Response:
    return revalidated(request, pem(request.app[ISSUANCE].issuers.root).encode(),
                       "application/x-pem-file")


@routes.get("/v1/x509/chain")
async def chain(request: web.Request) -> web.Response:
    """The current issuing CA, then the root."""
    issuers = await request.app[ISSUANCE].keys.refresh()
    return revalidated(request, issuers.current.chain_pem.encode(), "application/x-pem-file")


@routes.get("/v1/x509/bundle")
async def bundle(request: web.Request) -> web.Response:
    """Every issuing CA certificate still anchoring a certificate, newest first (during
    a rotation, the previous ones too), then every root, the active one first (not the
    roots' cross-certificates: as trust anchors they make a loop; x509/cross.pem)."""
    issuers = await request.app[ISSUANCE].keys.refresh()
    # Revalidated as roots and chain are: it is the document that changes when an
    # issuing CA certificate is revoked or retired (an API trial found no ETag on it).
    return revalidated(request, "".join(pem(c) for c in [
        *issuers.intermediates(), *(issuers.roots or (issuers.root,))]).encode(),
        "application/x-pem-file")


# ---- EST (RFC 7030) ---------------------------------------------------------------------

def _pkcs7_b64(certs: list[x509.Certificate], request: web.Request | None = None
               ) -> web.Response:
    """base64 PKCS#7 certs-only (RFC 7030 4.1.3); with `request`, a document devices poll
    (cacerts), revalidated by its ETag as the chain is (an EST trial found none)."""
    der = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
    body = base64.encodebytes(der)
    response = revalidated(request, body, "application/pkcs7-mime") if request is not None \
        else web.Response(body=body)
    response.headers["Content-Type"] = PKCS7_CERTS
    if response.status == 200:
        response.headers["Content-Transfer-Encoding"] = "base64"
    return response


async def _est_csr(request: web.Request) -> x509.CertificateSigningRequest:
    if request.content_type != "application/pkcs10":
        raise Problem(415, "Unsupported Media Type", "EST enrollment takes a base64 DER PKCS#10 "
                      "body with 'Content-Type: application/pkcs10'")
    raw = await read_body(request)
    if not raw.strip():
        raise Problem(400, "Bad Request", "the body is empty: EST enrollment takes the CSR "
                      "as base64 DER (RFC 7030 4.2.1), `openssl req -outform DER | base64`",
                      "bad-csr")
    if raw.lstrip().startswith(b"-----BEGIN"):
        raise Problem(400, "Bad Request", "EST takes the CSR as base64 DER without PEM "
                      "armour (RFC 7030 4.2.1): send the lines between the BEGIN and END "
                      "lines, or `openssl req -outform DER | base64`", "bad-csr")
    try:
        der = base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Problem(400, "Bad Request", "the body is not base64 (EST takes the CSR as "
                      "base64 DER, RFC 7030 4.2.1)", "bad-csr") from None
    return parse_csr(der, der=True)


@routes.get("/.well-known/est/cacerts")
async def est_cacerts(request: web.Request) -> web.Response:
    issuers = await request.app[ISSUANCE].keys.refresh()
    return _pkcs7_b64(list(issuers.current.chain), request)


@routes.post("/.well-known/est/simpleenroll")
async def est_simpleenroll(request: web.Request) -> web.Response:
    if not request.headers.get("Authorization") and peer_der(request) is None:
        # Neither way in: said both (RFC 7030 3.2.3), before the body is read, so that a
        # client without credentials hears that first, whatever it sent (a trial got
        # bad-csr for a body it could not have sent anyway).
        raise Problem(401, "Unauthorized", "EST enrollment needs a bootstrap token "
                      "('Authorization: Bearer <token>', or as the HTTP Basic password) or "
                      "a client certificate issued by this CA (mutual TLS)",
                      "client-certificate-required", {"WWW-Authenticate": _challenge(request)})
    if request.headers.get("Authorization") and not await _spent_beside_certificate(request):
        bearer = await _bearer(request)  # before the body, as /v1/x509/enroll (a review)
        issued: Issued | Replayed = await _enroll(request, bearer, await _est_csr(request),
                                                  None)
    else:
        await identity(request)  # revoked or expired: said before the body (as renew)
        issued = await _renew(request, await _est_csr(request), None)
    return _pkcs7_b64([issued.cert])


async def _spent_beside_certificate(request: web.Request) -> bool:
    """A device that keeps sending the token it enrolled with (its configured HTTP
    Basic credentials) beside the certificate that token got it, or a renewal of it:
    the token is set aside, and the certificate renews. Its retry was answered with its
    first certificate again, or, with a new key, told to ask an admin for a new token
    (an EST trial). Any other token is the request's (a new token for new names beside
    an old certificate must still be answered again with its own certificate, a
    review), and one this CA never made is still said to be one."""
    der = peer_der(request)
    if der is None or (secret := _secret_sent(request)[1]) is None:
        return False
    token = await request.app[TOKENS].find(secret)
    if token is None or token.used_serial is None:
        return False
    presented = x509.load_der_x509_certificate(der).serial_number
    family = await request.app[STORE].renewal_family(presented)
    return any(rec.serial == token.used_serial for rec in family)


@routes.post("/.well-known/est/simplereenroll")
async def est_simplereenroll(request: web.Request) -> web.Response:
    if peer_der(request) is None:
        # Before the body is read (as simpleenroll's 401): without a certificate, a bad
        # body was answered "bad-csr" (a relying-party trial).
        # Not 401: that status must name an HTTP scheme that would do (RFC 9110 15.5.2),
        # and none would: re-enrollment is authenticated by the certificate it renews,
        # over TLS (RFC 7030 4.2.2). A service team's trial found the 401 without one.
        raise Problem(403, "Forbidden", "EST re-enrollment is authenticated by the "
                      "certificate being renewed: connect with it as the TLS client "
                      "certificate (mutual TLS); a first enrollment is simpleenroll, with a "
                      "bootstrap token", "client-certificate-required")
    await identity(request)  # revoked or expired: said before the body (as renew)
    csr = await _est_csr(request)
    return _pkcs7_b64([(await _renew(request, csr, None)).cert])
