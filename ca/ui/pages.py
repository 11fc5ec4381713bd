"""The pages: each asks the follower for the verdict first (every page shows it at the
top), then asks the daemon for what it shows, concurrently, and renders a template.
Nothing here writes to the daemon: every call is a GET, but OCSP's POST, which only
reads a pre-signed response."""

from __future__ import annotations

import asyncio
import base64
import csv
import datetime as dt
import io
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.cluster import CEREMONIES
from ca.audit.cosignature import VerifierKey
from ca.audit.merkle import TreeHead
from ca.audit.note import NoteError, NoteSignature, key_id
from ca.audit.verify import PinnedKey
from ca.audit.voided import EVENT as VOID_EVENT
from ca.client import ClientError
from ca.commands.args import serial_hex
from ca.decimal_text import is_decimal
from ca.subject import spki_sha256
from ca.ui import certs, charts, proofs
from ca.ui import metrics as prom
from ca.ui.ca_api import CA
from ca.ui.follow import Logs, Verdict, ago, seconds_since

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PAGE_SIZE = 50
CSV_MAX = 10_000
SCAN_LINES = 20_000  # the most lines one audit page reads to find matches for its filters
_SERIAL = re.compile(r"[0-9a-fA-F]{1,40}")
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass
class UI:
    """Everything the pages share."""

    ca: CA
    logs: Logs
    root: x509.Certificate  # the root the auditor pinned (--ca)
    audit_key: Ed25519PublicKey
    witness_keys: list[VerifierKey]
    env: jinja2.Environment
    allowed_hosts: set[str] | None = None  # None: any Host header (--listen-public)
    # The local users whose connections it serves (its own, and root); None: any
    # (--listen-public, or no /proc/net/tcp to tell by: ca/ui/peer.py)
    local_users: frozenset[int] | None = None
    whoami: dict[str, Any] | None = field(default=None)


UI_KEY = web.AppKey("ui", UI)


def environment() -> jinja2.Environment:
    """Templates from the package, every value escaped (log lines and names are
    attacker-influenced), a missing value an error rather than an empty string."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("ca.ui", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["hex"] = lambda b: b.hex() if isinstance(b, bytes) else ""
    # A checkpoint's root as its note writes it, so it can be compared by eye with
    # `cat checkpoint` (an auditor trial could not, against hex)
    env.filters["b64"] = lambda b: base64.b64encode(b).decode() if isinstance(b, bytes) else ""
    env.filters["ago"] = ago
    env.globals["kind_label"] = charts.kind_label
    return env


async def _try(call: Awaitable[T]) -> tuple[T | None, str | None]:
    """(result, None), or (None, why) when the daemon could not answer."""
    try:
        return await call, None
    except ClientError as exc:
        return None, str(exc)


def _html(request: web.Request, template: str, verdict: Verdict, **context: Any) -> str:
    ui = request.app[UI_KEY]
    return ui.env.get_template(template).render(
        verdict=verdict, ca_url=ui.ca.url, path=request.path, whoami=ui.whoami,
        logs=ui.logs.names if ui.logs.cluster else [], log_q=log_query(verdict.log),
        **context)


def _render(request: web.Request, template: str, verdict: Verdict, status: int = 200,
            **context: Any) -> web.Response:
    return web.Response(text=_html(request, template, verdict, **context),
                        content_type="text/html", charset="utf-8", status=status)


def log_query(log: str | None) -> str:
    """What a link to another audit page adds to stay in the same log."""
    return f"?{urlencode({'log': log})}" if log is not None else ""


def default_log(names: list[str | None]) -> str | None:
    """The log a page shows when it names none: a single node's one log; on a cluster
    the first node's (the ceremonies' log only if there is no other)."""
    nodes = [n for n in names if n != CEREMONIES]
    return (nodes or names or [None])[0]


async def _verdict(request: web.Request, strict: bool = True, fresh: bool = False) -> Verdict:
    """The verdict on the log the page is about (`?log=NODE` on a cluster), with the
    other logs' beside it; 404 for a log the daemon does not serve (with `strict`: not
    for the banner's refresh of that 404 page, which shows the default log's)."""
    ui = request.app[UI_KEY]
    if ui.whoami is None:
        ui.whoami, _ = await _try(ui.ca.json("/v1/whoami"))
    names = await ui.logs.list()
    asked = request.query.get("log") or None
    known = asked is None or asked in names or not names
    verdict = await ui.logs.verdict(asked if asked in names else default_log(names),
                                    fresh=fresh)
    if not known and strict:
        served = ", ".join(str(n) for n in names if n is not None) or "one unnamed log"
        raise web.HTTPNotFound(text=_html(
            request, "missing.html", verdict, title="Not found",
            what=f"the daemon serves no audit log named {asked[:64]!r} (it serves "
            f"{served})"), content_type="text/html")
    return verdict


async def _refused(request: web.Request, verdict: Verdict, exc: ClientError) -> Verdict:
    """The verdict to show beside a daemon's 503 (its log damaged, say): from a run
    begun now, not the one of the last seconds. A web view trial's page quoted the
    daemon's "line 150 ... was rewritten on disk" under a green banner."""
    if exc.status != 503:
        return verdict
    return await request.app[UI_KEY].logs.verdict(verdict.log, fresh=True)


async def _report(request: web.Request, verdict: Verdict, log: str | None,
                  *lines: proofs.Line | None) -> Verdict:
    """A line the daemon served against what the auditor verified of `log` turns that
    log's verdict red for the life of the process (the follower's failures are sticky);
    the page that found it shows it so at once."""
    line = next((x for x in lines if x is not None and x.contradiction), None)
    if line is None or line.contradiction is None:
        return verdict
    request.app[UI_KEY].logs.follower(log).caught(line.seq, line.contradiction)
    return await _verdict(request)


def not_found(request: web.Request, verdict: Verdict, what: str) -> web.Response:
    return _render(request, "missing.html", verdict, status=404, title="Not found", what=what)


async def no_such_page(request: web.Request) -> web.Response:
    return not_found(request, await _verdict(request, strict=False),
                     f"this view has no page {request.path[:80]!r}: its pages are in the "
                     "menu above")


# ---- / -------------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    ui = request.app[UI_KEY]
    verdict = await _verdict(request)
    tree = verdict.tree
    (health, health_err), (scrape_text, metrics_err), (issued, issued_err), last = \
        await asyncio.gather(_try(ui.ca.health()), _try(ui.ca.metrics()),
                             _try(ui.ca.json("/v1/inventory/issuance", hours=168)),
                             _try(proofs.line(ui.ca.for_log(verdict.log), tree, tree.size - 1))
                             if tree and tree.size else _none())
    scrape = prom.parse(scrape_text) if scrape_text else None
    issuance_chart = None
    by_kind: list[tuple[str, int]] = []
    if issued is not None:
        counts = [(c["kind"], c["hour"], int(c["count"])) for c in issued["counts"]]
        since = dt.datetime.fromisoformat(issued["since"])
        until = dt.datetime.fromisoformat(issued["until"])
        issuance_chart = charts.issuance(counts, since, 168)
        day = (until - dt.timedelta(hours=24)).isoformat()[:13]
        kinds = charts.kind_order({k for k, _, _ in counts})
        by_kind = [(k, sum(n for kk, h, n in counts if kk == k and h >= day)) for k in kinds]
    latency_chart = charts.latency(scrape.latency) if scrape and scrape.latency else None
    last_line = last[0][0] if last and last[0] else None
    verdict = await _report(request, verdict, verdict.log, last_line)
    if isinstance(health, dict) and health.get("audit_damaged_seq") is not None:
        # The daemon says its log is damaged: the banner from a run begun now, not a
        # green one of the last seconds above that word (a web view trial)
        verdict = await ui.logs.verdict(verdict.log, fresh=True)
    signer = (_signer(verdict.checkpoint.signatures, _pinned(ui, verdict))
              if verdict.checkpoint else "")
    return _render(request, "overview.html", verdict, title="Overview", health=health,
                   signer=signer,
                   health_err=health_err, scrape=scrape, metrics_err=metrics_err,
                   issuance_chart=issuance_chart, issued_err=issued_err, by_kind=by_kind,
                   latency_chart=latency_chart, last_line=last_line,
                   # (not once the view failed: it stopped following there, and the
                   # daemon was blamed for the checkpoint's age: a web view trial)
                   stale=verdict.status != "failed" and _stale(
                       last_line.get("ts") if last_line else None))


STALE_S = 300  # five heartbeats at the default [audit] heartbeat-s


def _stale(ts: object) -> bool:
    """Whether the latest checkpoint covers only lines older than STALE_S: a daemon
    signs one at least every heartbeat, so it has stopped signing, or the checkpoint
    served is not its latest (an auditor trial: a checkpoint frozen for 10 min showed
    green, "✓ verified")."""
    seconds = seconds_since(ts) if ts is not None else None
    return seconds is not None and seconds > STALE_S


async def _none() -> tuple[None, None]:
    return None, None


# ---- /certificates ---------------------------------------------------------------------------

CERT_PARAMS = ("q", "status", "role", "kind", "sort", "order")


def _cert_query(request: web.Request, params: tuple[str, ...] = CERT_PARAMS
                ) -> dict[str, str]:
    """The search's parameters as given (the daemon checks them and says what is
    wrong), only those that are set."""
    return {k: request.query[k][:256] for k in params if request.query.get(k)}


def _pages(total: int) -> int:
    return max(1, -(-total // PAGE_SIZE))


def _page(request: web.Request) -> int | None:
    """The page asked for; None for one that is no page number (it showed page 1)."""
    raw = request.query.get("page", "1")
    return int(raw) if is_decimal(raw) and len(raw) < 7 and int(raw) > 0 else None


def _no_page(request: web.Request, verdict: Verdict) -> web.Response:
    raw = request.query.get("page", "")
    return bad_request(request, verdict, f"page must be a page number (1, 2, ...), not "
                       f"{raw[:40]!r}")


def _list_links(path: str, query: dict[str, str], page: int
                ) -> tuple[Callable[..., str], Callable[[str], str]]:
    """A list page's links: to another page of it, and to sort it by a column (a second
    click on the same column turns the order round)."""
    def link(**change: Any) -> str:
        params = {**query, "page": str(page), **{k: str(v) for k, v in change.items()}}
        params = {k: v for k, v in params.items() if v and not (k == "page" and v == "1")}
        return f"{path}?{urlencode(params)}" if params else path

    def sort_link(column: str) -> str:
        same = query.get("sort", "issued") == column
        order = "asc" if same and query.get("order", "desc") == "desc" else "desc"
        return link(sort=column, order=order, page=1)
    return link, sort_link


async def _listed(request: web.Request, path: str, query: dict[str, str], page: int
                  ) -> tuple[dict[str, Any] | None, str | None, int]:
    """A page of an inventory list: (what was found, why not, the HTTP status). A
    search the daemon refuses is the page's 400 in its words (a web trial got 200 and
    the API's URL); a page past the last one leads to the last."""
    try:
        found = await request.app[UI_KEY].ca.json(path, **query, limit=PAGE_SIZE,
                                                  offset=(page - 1) * PAGE_SIZE)
    except ClientError as exc:
        if exc.status == 400 and exc.detail:
            return None, f"this search cannot be made: {exc.detail}", 400
        return None, str(exc), 200
    if page > _pages(found["total"]) and found["total"]:
        raise web.HTTPFound(request.rel_url.update_query(page=_pages(found["total"])).path_qs)
    return found, None, 200


async def certificates(request: web.Request) -> web.Response:
    ui = request.app[UI_KEY]
    verdict = await _verdict(request)
    query = _cert_query(request)
    page = _page(request)
    if page is None:
        return _no_page(request, verdict)
    found, error, status = await _listed(request, "/v1/inventory/certificates", query, page)
    total = found["total"] if found else 0
    pages = _pages(total)
    # A search names hosts and people: say when SSH certificates match it too.
    ssh_total = 0
    if query.get("q"):
        ssh, _ = await _try(ui.ca.json("/v1/inventory/ssh-certificates", q=query["q"],
                                       limit=1))
        ssh_total = ssh["total"] if ssh else 0
    link, sort_link = _list_links("/certificates", query, page)
    csv_link = "/certificates.csv" + (f"?{urlencode(query)}" if query else "")
    return _render(request, "certificates.html", verdict, status, title="Certificates",
                   query=query, found=found, error=error, page=page, pages=pages, total=total,
                   link=link, sort_link=sort_link, csv_link=csv_link, ssh_total=ssh_total,
                   ssh_link="/ssh?" + urlencode({"q": query.get("q", "")}))


SSH_PARAMS = ("q", "status", "type", "owner", "sort", "order")


async def ssh_certificates(request: web.Request) -> web.Response:
    verdict = await _verdict(request)
    query = _cert_query(request, SSH_PARAMS)
    page = _page(request)
    if page is None:
        return _no_page(request, verdict)
    found, error, status = await _listed(request, "/v1/inventory/ssh-certificates", query,
                                         page)
    if found and query.get("owner") and any(r.get("owner_serial") != query["owner"]
                                            for r in found["certificates"]):
        found, error = None, ("the daemon does not search SSH certificates by the certificate "
                              "that asked for them (an hsmca older than this view)")
    total = found["total"] if found else 0
    link, sort_link = _list_links("/ssh", query, page)

    def audit_link(rec: dict[str, Any]) -> str:
        # The lines of the minute it was issued in: its signature's intent and outcome.
        at = dt.datetime.fromisoformat(rec["issued_at"]).replace(second=0, microsecond=0)
        return "/audit?" + urlencode({
            "event": "hsm.sign", "since": at.strftime("%Y-%m-%dT%H:%M"),
            "until": (at + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")})
    csv_link = "/ssh.csv" + (f"?{urlencode(query)}" if query else "")
    return _render(request, "ssh.html", verdict, status, title="SSH certificates", query=query,
                   found=found, error=error, page=page, pages=_pages(total),
                   total=total, link=link, sort_link=sort_link, audit_link=audit_link,
                   csv_link=csv_link)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """A CSV cell that a spreadsheet will not run: names are attacker-influenced."""
    if value is None:
        return ""
    text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
    return "'" + text if text.startswith(_FORMULA) else text


CSV_COLUMNS = ("serial", "status", "reason", "kind", "role", "subject", "names", "principals",
               "not_before", "not_after", "issued_at", "revoked_at", "issuer", "renewed_from",
               "audit_seq", "audit_log", "fingerprint")
SSH_CSV_COLUMNS = ("serial", "status", "type", "key_id", "principals", "valid_after",
                   "valid_before", "issued_at", "revoked_at", "issuer", "owner_serial",
                   "key_sha256")


async def _csv(request: web.Request, path: str, query: dict[str, str],
               columns: tuple[str, ...], name: str) -> web.Response:
    """Every record the search finds, up to CSV_MAX, as a spreadsheet's download."""
    ui = request.app[UI_KEY]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    offset = 0
    while offset < CSV_MAX:
        try:
            found = await ui.ca.json(path, **query, limit=500, offset=offset)
        except ClientError as exc:
            if exc.status == 400 and exc.detail:
                raise web.HTTPBadRequest(text=f"this search cannot be made: {exc.detail}\n"
                                         ) from None
            raise web.HTTPBadGateway(text=f"the daemon could not be asked: {exc}\n") from None
        for rec in found["certificates"]:
            writer.writerow([_cell(rec.get(c)) for c in columns])
        offset += len(found["certificates"])
        if not found["certificates"] or offset >= found["total"]:
            break
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{name}-{stamp}.csv"'})


async def certificates_csv(request: web.Request) -> web.Response:
    return await _csv(request, "/v1/inventory/certificates", _cert_query(request),
                      CSV_COLUMNS, "certificates")


async def ssh_csv(request: web.Request) -> web.Response:
    return await _csv(request, "/v1/inventory/ssh-certificates",
                      _cert_query(request, SSH_PARAMS), SSH_CSV_COLUMNS, "ssh-certificates")


async def certificate(request: web.Request) -> web.Response:
    ui = request.app[UI_KEY]
    verdict = await _verdict(request)
    asked = request.match_info["serial"]
    # The forms the CLI takes (0x..., openssl's 1a:2b:...) lead to the one hsmca prints
    # (a web trial got 404s for them; leading zeros were kept in the title).
    try:
        serial = serial_hex(asked)
    except ValueError as exc:
        return not_found(request, verdict, str(exc))
    if serial != asked:
        raise web.HTTPFound(f"/certificates/{serial}" + (f"?{request.query_string}"
                                                         if request.query_string else ""))
    try:
        rec = await ui.ca.json(f"/v1/inventory/certificates/{serial}")
    except ClientError as exc:
        if exc.status == 404:
            return not_found(request, verdict, f"the inventory has no certificate {serial}")
        return _render(request, "certificate.html", verdict, title=f"Certificate {serial}",
                       rec=None, error=str(exc))
    cert = x509.load_pem_x509_certificate(rec["pem"].encode())
    der_ok = certs.fingerprint(cert) == rec["fingerprint"]
    bundle_text, bundle_err = await _try(ui.ca.get("/v1/x509/bundle"))
    bundle = x509.load_pem_x509_certificates(bundle_text) if bundle_text else []
    links, issuer = certs.chain(cert, bundle, ui.root)
    crl, ocsp, (audit, audit_log), (revoked, revoked_log), ssh, (keys, _) = \
        await asyncio.gather(
            certs.crl_status(ui.ca, cert, issuer, rec.get("issuer")),
            certs.ocsp_status(ui.ca, cert, issuer),
            _evidence(ui, verdict, rec, cert), _revocation(ui, verdict, rec),
            _ssh_asked(ui, serial), _try(ui.ca.json("/v1/keys")))
    # Its issuing CA's certificate revoked (`hsmca key revoke`): said here, where the
    # certificate looked valid (a web trial).
    issuer_revoked = next((k for k in (keys or {}).get("keys", []) if k.get("revoked_at")
                           and k.get("label") == rec.get("issuer")), None)
    verdict = await _report(request, verdict, audit_log, audit.intent, audit.outcome)
    if revoked is not None:
        verdict = await _report(request, verdict, revoked_log, revoked.line)

    def failed(log: str | None) -> bool:
        """Whether the log a line is in failed (on a cluster, it may not be the page's:
        a review)."""
        return next((v.status for v in (verdict, *verdict.others) if v.log == log),
                    verdict.status) == "failed"
    return _render(request, "certificate.html", verdict, title=f"Certificate {serial}",
                   audit_failed=failed(audit_log), revoked_failed=failed(revoked_log),
                   rec=rec, error=None, der_ok=der_ok, fields=certs.describe(cert),
                   pem=rec["pem"], links=links, bundle_err=bundle_err, crl=crl, ocsp=ocsp,
                   audit=audit, audit_log_q=log_query(audit_log), summary=_summary,
                   revoked=revoked, revoked_log_q=log_query(revoked_log), ssh=ssh,
                   # the certificate's own names, not the inventory's (a web trial saw
                   # names changed in the inventory shown beside every ✓)
                   cert_names=certs.san_values(cert), issuer_revoked=issuer_revoked)


async def _ssh_asked(ui: UI, serial: str) -> tuple[int, int] | None:
    """How many SSH certificates this certificate asked for, and how many of those are
    revoked (with it, or on their own); None if the daemon could not say. A web trial
    found a revoked certificate's page silent about the SSH certificates revoked with it."""
    (every, _), (revoked, _) = await asyncio.gather(
        _try(ui.ca.json("/v1/inventory/ssh-certificates", owner=serial, limit=1)),
        _try(ui.ca.json("/v1/inventory/ssh-certificates", owner=serial, status="revoked",
                        limit=1)))
    if every is None or revoked is None:
        return None
    if any(r.get("owner_serial") != serial for r in every["certificates"]):
        return None  # a daemon older than owner=, which listed every SSH certificate
    return every["total"], revoked["total"]


async def _revocation(ui: UI, verdict: Verdict, rec: dict[str, Any]
                      ) -> tuple[certs.RevocationEvidence | None, str | None]:
    """The revocation line of a revoked certificate, and whose log it is in (cluster: any
    node's, the one whose worker took the request)."""
    if not rec.get("revoked_at") or not ui.logs.names:
        return None, None
    if not ui.logs.cluster:
        return await certs.revocation_evidence(ui.ca, verdict.tree, rec), None
    found = certs.RevocationEvidence()
    for log in ui.logs.names:
        tree = next((v.tree for v in (verdict, *verdict.others) if v.log == log), None)
        found = await certs.revocation_evidence(ui.ca.for_log(log), tree, rec, log)
        if found.line is not None:
            return found, log
    found.problem = "no node's log has a cert.revoke line naming it near its revocation time"
    return found, None


async def _evidence(ui: UI, verdict: Verdict, rec: dict[str, Any], cert: x509.Certificate
                    ) -> tuple[certs.AuditEvidence, str | None]:
    """The audit evidence of a certificate, checked in the log its record names, against
    what was verified of that log; and that log."""
    log = rec.get("audit_log")
    seq = rec.get("audit_seq")
    if not ui.logs.names:
        found = certs.AuditEvidence()
        found.problem = f"the daemon's audit logs are not known yet: {ui.logs.problem}"
        return found, None
    if not ui.logs.cluster:
        return await certs.audit_evidence(ui.ca, verdict.tree, seq, cert), None
    if seq is not None and log not in ui.logs.names:
        found = certs.AuditEvidence()
        found.problem = (f"its signature is recorded in the log of {log}, line {seq}, which the "
                         "daemon does not serve" if isinstance(log, str) else
                         "the inventory does not say which node's log holds its line "
                         f"{seq} (it was issued before hsmca recorded that)")
        return found, None
    tree = next((v.tree for v in (verdict, *verdict.others) if v.log == log), None)
    return await certs.audit_evidence(ui.ca.for_log(log), tree, seq, cert, log), log


# ---- /audit ----------------------------------------------------------------------------------


def _summary(line: proofs.Line) -> list[tuple[str, str]]:
    """The fields of a line worth a glance, as (name, text)."""
    if line.obj is None:
        return [("unparsable", line.text[:200])]
    skip = {"seq", "ts", "event", "prev", "checkpoint", "actor", "phase"}
    out = []
    for k in sorted(line.obj):
        if k in skip:
            continue
        v = line.obj[k]
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        if _HASH.fullmatch(text):
            text = text[:12] + "…"  # digests: the line's own page shows them whole
        out.append((k, text if len(text) <= 120 else text[:117] + "..."))
    # What a reader looks for first, then the rest in name order.
    first = ("purpose", "result", "serial", "names", "principals", "role", "reason", "size")
    return sorted(out, key=lambda kv: (first.index(kv[0]) if kv[0] in first else len(first),
                                       kv[0]))


@dataclass(frozen=True)
class Filters:
    event: str = ""
    actor: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    @property
    def any(self) -> bool:
        return bool(self.event or self.actor or self.since or self.until)

    def matches(self, line: proofs.Line) -> bool:
        if self.event:
            event = line.get("event")
            if self.event == "checkpoint":
                if not (event == "hsm.sign" and line.get("checkpoint")):
                    return False
            elif not (isinstance(event, str) and event.startswith(self.event)):
                return False
        if self.actor:
            actor = line.get("actor")
            if not (isinstance(actor, str) and self.actor.lower() in actor.lower()):
                return False
        ts = proofs.line_time(line)
        if self.since and (ts is None or ts < self.since):
            return False
        return not (self.until and (ts is None or ts > self.until))

    def query(self) -> dict[str, str]:
        q = {"event": self.event, "actor": self.actor,
             "since": self.since.strftime("%Y-%m-%dT%H:%M") if self.since else "",
             "until": self.until.strftime("%Y-%m-%dT%H:%M") if self.until else ""}
        return {k: v for k, v in q.items() if v}


def _when_param(raw: str | None) -> dt.datetime | None:
    """A datetime-local field's value (or a full ISO 8601 time), read as UTC."""
    if not raw:
        return None
    try:
        t = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def _seq_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name, "")
    return int(raw) if is_decimal(raw) and len(raw) < 19 else None


def _unreadable(request: web.Request, seqs: tuple[str, ...], times: tuple[str, ...] = ()
                ) -> str | None:
    """What of the query cannot be read, in words; None if all can. A value that could
    not be read was dropped without a word, and the whole log was shown as if it had
    been filtered (a web trial), where the inventory's searches say why (400)."""
    for name in seqs:
        raw = request.query.get(name)
        if raw and _seq_param(request, name) is None:
            return f"{name} must be a line's seq (0, 1, 2, ...), not {raw[:40]!r}"
    for name in times:
        raw = request.query.get(name)
        if raw and raw.strip() and _when_param(raw) is None:
            return (f"{name} must be a time such as 2026-12-01T08:00 (UTC), not "
                    f"{raw[:40]!r}")
    return None


def bad_request(request: web.Request, verdict: Verdict, what: str) -> web.Response:
    return _render(request, "missing.html", verdict, status=400, title="Bad request",
                   what=what)


async def audit_log(request: web.Request) -> web.Response:
    ui = request.app[UI_KEY]
    verdict = await _verdict(request)
    ca = ui.ca.for_log(verdict.log)
    tree = verdict.tree
    if bad := _unreadable(request, ("before", "after"), ("since", "until")):
        return bad_request(request, verdict, f"this search cannot be made: {bad}")
    filters = Filters(request.query.get("event", "")[:64].strip(),
                      request.query.get("actor", "")[:256].strip(),
                      _when_param(request.query.get("since")),
                      _when_param(request.query.get("until")))
    before, after = _seq_param(request, "before"), _seq_param(request, "after")
    shown: list[proofs.Line] = []
    error = None
    lowest = highest = end = 0
    try:
        end = await proofs.log_end(ca, tree)
        if after is not None:
            start, forward = after + 1, True
        else:
            if before is None:
                before = end
                if filters.until is not None:
                    before = await proofs.first_after(ca, end, filters.until)
            start, forward = min(before, end), False
        shown, lowest, highest, lie = await _scan(ca, tree, filters, start, end, forward)
        verdict = await _report(request, verdict, verdict.log, lie)
    except ClientError as exc:
        error = str(exc)
        # (a web view trial: the daemon's "rewritten on disk" quoted under a green banner)
        verdict = await _refused(request, verdict, exc)
    key = _pinned(ui, verdict)
    checkpoints = {line.seq: _checkpoint_of(line, key) for line in shown
                   if line.get("checkpoint")}
    # A line voided by a record.void on this page, marked in the list (a web view trial
    # found the losing lines of a race looking like the winner; their own pages say it)
    voided = {v: line.seq for line in shown if line.get("event") == VOID_EVENT
              and isinstance(v := line.get("voids"), int)}
    base = {**filters.query(), **({"log": verdict.log} if verdict.log is not None else {})}
    older = f"/audit?{urlencode({**base, 'before': lowest})}" if shown and lowest > 0 else None
    newer = f"/audit?{urlencode({**base, 'after': highest})}" \
        if shown and highest < end - 1 else None
    return _render(request, "audit.html", verdict, title="Audit log", lines=shown,
                   filters=filters, error=error, older=older, newer=newer, end=end,
                   checkpoints=checkpoints, voided=voided, summary=_summary,
                   witnessed=verdict.witnessed,
                   latest_checkpoint=_checkpoint_text(verdict, key))


async def _scan(ca: CA, tree: TreeHead | None, filters: Filters, start: int, end: int,
                forward: bool) -> tuple[list[proofs.Line], int, int, proofs.Line | None]:
    """Up to PAGE_SIZE lines matching `filters`, read from `start` on (forward) or down
    from just before it, a verified window at a time; newest first. Also the lowest and
    highest seq read, where the next page starts, and the first line read, matching or
    not, that contradicts the verified log."""
    found: list[proofs.Line] = []
    lie: proofs.Line | None = None
    read = 0
    lowest, highest = start, start - 1
    while len(found) < PAGE_SIZE and read < SCAN_LINES:
        if forward:
            lo, hi = start + read, min(end, start + read + 1000)
        else:
            lo, hi = max(0, start - read - 1000), start - read
        if lo >= hi:
            break
        raws = await ca.entries(lo, hi - lo)
        window = await proofs.window(ca, tree, lo, raws) if raws else []
        # A line left out shows where the seqs stop matching; one missing at the end only
        # in the count.
        lie = lie or next((line for line in window if line.contradiction), None)
        if tree is not None and lie is None and len(raws) < min(hi, tree.size) - lo:
            seq = lo + len(raws)
            lie = proofs.Line(seq, b"", None, False, "", f"the daemon served no line {seq}, "
                              f"which the {tree.size} lines verified include")
        if not raws:
            break
        read += len(raws)
        ordered = window if forward else list(reversed(window))
        for line in ordered:
            if filters.matches(line):
                found.append(line)
                if len(found) == PAGE_SIZE:
                    break
            lowest, highest = min(lowest, line.seq), max(highest, line.seq)
            if len(found) == PAGE_SIZE:
                break
        first = proofs.line_time(window[0]) if window else None
        last = proofs.line_time(window[-1]) if window else None
        if not forward and filters.since and window and (first or filters.since) < filters.since:
            break  # older lines are all before `since`
        if forward and filters.until and window and (last or filters.until) > filters.until:
            break
    found.sort(key=lambda line: -line.seq)
    if found:
        lowest = min(lowest, found[-1].seq)
        highest = max(highest, found[0].seq)
    return found, lowest, highest, lie


def _pinned(ui: UI, verdict: Verdict) -> PinnedKey | None:
    """The pinned audit key and the keys the verified log handed over to (a checkpoint
    after a rotation is signed by the new key, alone once the old one is retired)."""
    if verdict.key is not None:
        return verdict.key
    name = verdict.checkpoint.origin if verdict.checkpoint else None
    return PinnedKey(ui.audit_key, name, name) if name else None


@dataclass(frozen=True)
class CheckpointView:
    text: str
    size: int | None
    root: str
    signatures: tuple[tuple[str, str], ...]  # (key name, key id hex)
    verified: bool
    problem: str | None
    signer: str = ""  # which trusted key verified it, in words


def _signer(signatures: Sequence[NoteSignature], key: PinnedKey | None) -> str:
    """Which of the keys the auditor trusts signed a verified checkpoint: the pinned
    one, or one it handed the log over to. After a rotation and the old key's
    retirement only the new key signs, and the page said "the pinned audit key" all
    the same (a web trial)."""
    ids = {s.key_id for s in signatures if key is not None and s.name == key.name}
    if key is None or key_id(key.name, key.public_key) in ids:
        return "the pinned audit key"
    # Verified, so one of the keys handed over to signed it
    handed = next(key_id(key.name, k) for k in key.trusted() if key_id(key.name, k) in ids)
    return f"the audit key {handed.hex()}, which the pinned key handed the log over to"


def _checkpoint_view(text: str, key: PinnedKey | None,
                     seq: int | None = None) -> CheckpointView:
    """`text` checked with `key`: as logged at `seq` (the keys trusted there), or as one
    from outside the log (None)."""
    from ca.audit.note import parse_checkpoint
    try:
        cp = parse_checkpoint(text)
    except NoteError as exc:
        return CheckpointView(text, None, "", (), False, f"malformed: {exc}")
    sigs = tuple((s.name, s.key_id.hex()) for s in cp.signatures)
    root = cp.root.hex()
    if key is None:
        return CheckpointView(text, cp.size, root, sigs, False, "no verified checkpoint names "
                              "the audit key yet")
    try:
        key.verify(text, seq)
    except NoteError as exc:
        return CheckpointView(text, cp.size, root, sigs, False, str(exc))
    return CheckpointView(text, cp.size, root, sigs, True, None,
                          _signer(cp.signatures, key))


def _checkpoint_of(line: proofs.Line, key: PinnedKey | None) -> CheckpointView:
    text = line.get("checkpoint")
    return _checkpoint_view(text if isinstance(text, str) else "", key, line.seq)


def _checkpoint_text(verdict: Verdict, key: PinnedKey | None) -> CheckpointView | None:
    return _checkpoint_view(verdict.checkpoint_text, key) if verdict.checkpoint_text else None


async def audit_line(request: web.Request) -> web.Response:
    ui = request.app[UI_KEY]
    verdict = await _verdict(request)
    raw_seq = request.match_info["seq"]
    if not is_decimal(raw_seq) or len(raw_seq) > 18:
        return not_found(request, verdict, "a seq is a line number: 0, 1, 2, ...")
    seq = int(raw_seq)
    ca = ui.ca.for_log(verdict.log)
    try:
        got = await proofs.line(ca, verdict.tree, seq)
    except ClientError as exc:
        return _render(request, "line.html", await _refused(request, verdict, exc),
                       title=f"Audit line {seq}", seq=seq, line=None, proof=None,
                       error=str(exc))
    if got is None:
        tree = verdict.tree
        if tree is None or seq >= tree.size:
            return not_found(request, verdict, f"the log has no line {seq} (yet)")
        why = f"the daemon served no line {seq}, which the {tree.size} lines verified include"
        verdict = await _report(request, verdict, verdict.log,
                                proofs.Line(seq, b"", None, False, "", why))
        return not_found(request, verdict, f"{why}: it is withholding a line of its log")
    line, proof = got
    verdict = await _report(request, verdict, verdict.log, line)
    related: tuple[str, int] | None = None
    try:
        if line.get("phase") == "intent":
            at = await proofs.find_outcome(ca, line)
            related = ("its outcome", at[0]) if at else None
        elif line.get("phase") == "outcome":
            at = await proofs.find_intent(ca, line)
            related = ("its intent", at[0]) if at else None
        elif line.get("event") == "record.void" and isinstance(line.get("voids"), int):
            related = ("the line it says changed nothing", line.get("voids"))
        elif line.get("event") in proofs.VOIDABLE:
            # A web trial saw a voided revocation shown as any other line.
            void = await proofs.find_void(ca, line)
            related = ("voided: it changed nothing, says", void) if void is not None \
                else None
    except ClientError:
        related = None
    serial = line.get("serial")
    cert_link = f"/certificates/{serial}" if line.get("purpose") in ("x509", "tls") and \
        isinstance(serial, str) and _SERIAL.fullmatch(serial) else None
    pretty = json.dumps(line.obj, indent=2, sort_keys=True, ensure_ascii=False) \
        if line.obj is not None else None
    key = _pinned(ui, verdict)
    checkpoint = _checkpoint_of(line, key) if line.get("checkpoint") else None
    return _render(request, "line.html", verdict, title=f"Audit line {seq}", seq=seq,
                   line=line, proof=proof, error=None, related=related, cert_link=cert_link,
                   pretty=pretty, checkpoint=checkpoint)


async def go_to_line(request: web.Request) -> web.Response:
    """The "open a seq" form, which works without JavaScript."""
    seq = _seq_param(request, "seq")
    if bad := _unreadable(request, ("seq",)):
        return bad_request(request, await _verdict(request), f"no line to open: {bad}")
    stay = log_query(request.query.get("log") or None)
    raise web.HTTPSeeOther(("/audit" if seq is None else f"/audit/{seq}") + stay)


# ---- /keys -----------------------------------------------------------------------------------


async def keys(request: web.Request) -> web.Response:
    ui = request.app[UI_KEY]
    verdict = await _verdict(request)
    found, error = await _try(ui.ca.json("/v1/keys"))
    pinned = {spki_sha256(ui.audit_key): "the audit key you pinned (--audit-key)",
              spki_sha256(ui.root.public_key()): "the root you pinned (--ca)"}
    listed = {k["fingerprint"] for k in found["keys"]} if found else set()
    # A pinned key that is none of the CA's (destroyed ones are still listed): say so,
    # rather than leave its row without the ✓ for the reader to notice.
    strangers = [(what, fp) for fp, what in pinned.items() if found and fp not in listed]
    return _render(request, "keys.html", verdict, title="Keys",
                   keys=found["keys"] if found else [], error=error, pinned=pinned,
                   strangers=strangers)


# ---- /status.json (the banner's refresh) ---------------------------------------------------------


async def status(request: web.Request) -> web.Response:
    """The banner of a page (`?log=` as the page has it). A page's 404 for a log the
    daemon does not serve shows the default log's banner, and so does its refresh: a
    404 here turned the banner to "hsmca ui does not answer" (a web trial)."""
    # `fresh=1`: a click on the banner, "check again now": a run begun now, not the
    # verdict of the last seconds (a web view trial's click, 3 s after the daemon
    # stopped, stayed green).
    verdict = await _verdict(request, strict=False, fresh=request.query.get("fresh") == "1")
    return web.json_response({"status": verdict.overall, "banner": verdict.banner,
                              "detail": verdict.detail})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", overview)
    app.router.add_get("/certificates", certificates)
    app.router.add_get("/certificates.csv", certificates_csv)
    app.router.add_get("/certificates/{serial}", certificate)
    app.router.add_get("/ssh", ssh_certificates)
    app.router.add_get("/ssh.csv", ssh_csv)
    app.router.add_get("/audit", audit_log)
    app.router.add_get("/audit/go", go_to_line)
    app.router.add_get("/audit/{seq}", audit_line)
    app.router.add_get("/keys", keys)
    app.router.add_get("/status.json", status)
