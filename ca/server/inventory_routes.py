"""The inventory for auditors and admins, read-only: certificates by name, serial,
principal, role or status, a page at a time; one certificate with its DER, its renewal
family and where its intent is in the audit log; and how many certificates of each
kind were issued per hour. Counts come from the store, not from the log (the log says
what was signed; these say what the inventory holds, and `hsmca ui` shows both).

    GET /v1/inventory/certificates?q=&status=&role=&kind=&sort=&order=&limit=&offset=
    GET /v1/inventory/certificates/{serial hex}
    GET /v1/inventory/ssh-certificates?q=&status=&type=&owner=&sort=&order=&limit=&offset=
    GET /v1/inventory/issuance?hours=
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import policy
from ca.decimal_text import is_decimal
from ca.inventory_terms import CERT_SORTS, CERT_STATUSES, SSH_SORTS
from ca.server.common import ISSUANCE, STORE, identity, known_query
from ca.server.problems import Problem
from ca.server.x509_routes import parse_serial
from ca.store import CertQuery, CertRecord, SSHCertQuery, SSHCertRecord

routes = web.RouteTableDef()
ROLES = ("auditor", "admin")
# A live certificate is "expiring" in its last 7 days, or its last third if that is
# shorter: with 24 h certificates, 7 days would call every one of them expiring.
EXPIRING = dt.timedelta(days=7)
MAX_PAGE = 500
MAX_HOURS = 24 * 31


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _status(revoked_at: str | None, start: dt.datetime, end: dt.datetime,
            now: dt.datetime) -> str:
    """valid | expiring | expired | revoked, as CertQuery defines them."""
    if revoked_at is not None:
        return "revoked"
    if end <= now:
        return "expired"
    return "expiring" if end <= now + min(EXPIRING, (end - start) / 3) else "valid"


def status(rec: CertRecord, now: dt.datetime) -> str:
    return _status(rec.revoked_at, dt.datetime.fromisoformat(rec.not_before),
                   dt.datetime.fromisoformat(rec.not_after), now)


def record_json(rec: CertRecord, now: dt.datetime) -> dict[str, Any]:
    return {"serial": rec.serial, "fingerprint": rec.fingerprint, "role": rec.role,
            "subject": rec.subject, "names": list(rec.names), "principals": list(rec.principals),
            "not_before": rec.not_before, "not_after": rec.not_after,
            "issued_at": rec.issued_at, "revoked_at": rec.revoked_at, "reason": rec.reason,
            "issuer": rec.issuer, "renewed_from": rec.renewed_from,
            "audit_seq": rec.audit_seq, "audit_log": rec.audit_log,
            "acme_order": rec.acme_order, "acme_account": rec.acme_account,
            "kind": "acme" if rec.acme_order else "x509", "status": status(rec, now)}


SEARCH_PARAMS = ("q", "status", "sort", "order", "limit", "offset")


def _choice(request: web.Request, name: str, allowed: tuple[str, ...],
            hint: str = "") -> str | None:
    value = request.query.get(name) or None
    if value is not None and value not in allowed:
        raise Problem(400, "Bad Request", f"{name} must be one of {', '.join(allowed)}{hint}",
                      "bad-query")
    return value


def _number(request: web.Request, name: str, default: int, most: int, least: int = 0
            ) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not is_decimal(raw) or len(raw) > 9 or not least <= int(raw) <= most:
        # (limit=0 was answered with one record: an API trial)
        raise Problem(400, "Bad Request", f"{name} must be a whole number from {least} to "
                      f"{most}", "bad-query")
    return int(raw)


@routes.get("/v1/inventory/certificates")
async def certificates(request: web.Request) -> web.Response:
    await identity(request, *ROLES)
    known_query(request, "role", "kind", "account", "issuer", *SEARCH_PARAMS)
    # The roles certificates carry: the token roles, and the CA's own listener's. One
    # misspelt listed nothing, where a misspelt status is refused (an API trial).
    role = _choice(request, "role", (*policy.ROLES, "server"))
    account = request.query.get("account") or None
    if account is not None and len(account) > 100:
        raise Problem(400, "Bad Request", "account is at most 100 characters", "bad-query")
    issuer = request.query.get("issuer") or None
    if issuer is not None and len(issuer) > 128:
        raise Problem(400, "Bad Request", "issuer is at most 128 characters", "bad-query")
    if issuer is not None and issuer not in {r.label for r in await request.app[STORE].keys()}:
        # A mistyped label read as a key that signed nothing (an upgrade trial)
        raise Problem(404, "Not Found", f"the CA has no key labelled {issuer!r} (`hsmca key "
                      "list` lists the labels)", "not-found")
    query = CertQuery(role=role, kind=_choice(
        request, "kind", ("acme", "x509"),
        " (SSH certificates: GET /v1/inventory/ssh-certificates)"),
                      account=account, issuer=issuer, **_search(request, CERT_SORTS))
    now = _now()
    page = await request.app[STORE].find_certs(query, now, now + EXPIRING)
    return _page_json(query, now, [record_json(r, now) for r in page.certs], page.total)


def _search(request: web.Request, sorts: tuple[str, ...]) -> dict[str, Any]:
    """The parameters every inventory search takes: q, status, sort, order, a page."""
    text = request.query.get("q", "")
    if len(text) > 256:
        raise Problem(400, "Bad Request", "q is at most 256 characters", "bad-query")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        # A NUL matched every certificate, and the web view echoed it raw (a web trial).
        raise Problem(400, "Bad Request", "q cannot hold control characters (a NUL, a "
                      "newline, ...): search for printable text", "bad-query")
    return {"text": text or None, "status": _choice(request, "status", CERT_STATUSES),
            "sort": _choice(request, "sort", sorts) or "issued",
            "descending": (_choice(request, "order", ("asc", "desc")) or "desc") == "desc",
            "limit": _number(request, "limit", 50, MAX_PAGE, least=1),
            "offset": _number(request, "offset", 0, 10**9)}


def _page_json(query: CertQuery | SSHCertQuery, now: dt.datetime,
               certs: list[dict[str, Any]], total: int) -> web.Response:
    return web.json_response({"total": total, "offset": query.offset, "limit": query.limit,
                              "as_of": now.isoformat(), "certificates": certs})


def _serial(text: str) -> int:
    # As people copy it: openssl's `serial=1A2B...`, `0x1a2b`, or `1a:2b:...` too (a
    # service team's trial was refused the forms every CLI command takes)
    text = text.strip().lower().removeprefix("serial=")
    return parse_serial(text.removeprefix("0x").replace(":", ""))


@routes.get("/v1/inventory/certificates/{serial}")
async def certificate(request: web.Request) -> web.Response:
    await identity(request, *ROLES)
    serial = _serial(request.match_info["serial"])
    store = request.app[STORE]
    found = await store.issued_cert(serial)
    if found is None:
        raise Problem(404, "Not Found", "this CA's inventory has no certificate with that "
                      "serial", "unknown-certificate")
    now = _now()
    pem = x509.load_der_x509_certificate(found.der).public_bytes(
        serialization.Encoding.PEM).decode()
    family = await store.renewal_family(serial)
    return web.json_response({**record_json(found.record, now), "pem": pem,
                              "as_of": now.isoformat(),
                              "family": [record_json(r, now) for r in family]})


def _unix_iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


def ssh_status(rec: SSHCertRecord, now: dt.datetime) -> str:
    return _status(rec.revoked_at, dt.datetime.fromtimestamp(rec.valid_after, dt.UTC),
                   dt.datetime.fromtimestamp(rec.valid_before, dt.UTC), now)


def ssh_record_json(rec: SSHCertRecord, now: dt.datetime,
                    ca_key_state: str | None = None) -> dict[str, Any]:
    return {"serial": str(rec.serial), "type": rec.cert_type, "key_id": rec.key_id,
            "ca_key_state": ca_key_state,
            "principals": list(rec.principals), "key_sha256": rec.key_sha256,
            "valid_after": _unix_iso(rec.valid_after),
            "valid_before": _unix_iso(rec.valid_before), "issued_at": rec.issued_at,
            "revoked_at": rec.revoked_at, "issuer": rec.issuer,
            "owner_serial": rec.owner_serial, "status": ssh_status(rec, now)}


@routes.get("/v1/inventory/ssh-certificates")
async def ssh_certificates(request: web.Request) -> web.Response:
    """SSH certificates, searched and paged as X.509 ones; serials are decimal (as
    ssh-keygen -L shows them), as strings (they are 64-bit)."""
    await identity(request, *ROLES)
    known_query(request, "type", "owner", *SEARCH_PARAMS)
    owner = request.query.get("owner")
    try:
        owner_serial = _serial(owner) if owner else None
    except Problem:
        raise Problem(400, "Bad Request", "owner must be the serial (hex) of the X.509 "
                      "certificate that asked for the SSH certificates", "bad-query") from None
    query = SSHCertQuery(cert_type=_choice(request, "type", ("host", "user")),
                         owner=owner_serial,
                         **_search(request, SSH_SORTS))
    now = _now()
    store = request.app[STORE]
    page = await store.find_ssh_certs(query, now, now + EXPIRING)
    # Its CA key's state beside its own: a certificate of a retired CA key is valid by
    # its dates, and refused by every host and client that refreshed the CA keys they
    # trust (a key trial took `--status valid` at its word).
    states = {k.label: k.state for k in await store.keys()}
    issuers = await request.app[ISSUANCE].keys.refresh()
    return _page_json(query, now, [ssh_record_json(
        r, now, states.get(issuers.ssh_of(r.issuer, r.cert_type))) for r in page.certs],
        page.total)


@routes.get("/v1/inventory/issuance")
async def issuance(request: web.Request) -> web.Response:
    """Certificates issued per kind and hour, over the last `hours` hours (default 168),
    the current hour included."""
    await identity(request, *ROLES)
    known_query(request, "hours")
    hours = max(1, _number(request, "hours", 168, MAX_HOURS))
    until = _now().replace(minute=0, second=0) + dt.timedelta(hours=1)
    since = until - dt.timedelta(hours=hours)
    counts = await request.app[STORE].issuance_counts(since, until)
    return web.json_response({"since": since.isoformat(), "until": until.isoformat(),
                              "counts": [{"kind": c.kind, "hour": c.hour, "count": c.count}
                                         for c in counts]})
