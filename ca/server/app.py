"""The aiohttp application factory and the TLS context of the listener."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import HttpVersion10, web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import cluster_policy
from ca.audit import wire
from ca.config import AcmeConfig
from ca.generations import Generations
from ca.issuance.issue import Issuance
from ca.lifecycle import KeyLifecycle
from ca.listener import PEER
from ca.metrics import Metrics
from ca.revocation import Revocations
from ca.server.audit_routes import routes as audit_routes
from ca.server.common import (
    AUDIT,
    GATE,
    HSM_HEALTH,
    ISSUANCE,
    LIFECYCLE,
    LIMIT,
    METRICS,
    REVOCATIONS,
    SETTINGS,
    STORE,
    TOKENS,
    AuditReader,
    Gate,
    Health,
    Settings,
    TokenLimit,
    identity,
    peer_der,
)
from ca.server.inventory_routes import routes as inventory_routes
from ca.server.key_routes import routes as key_routes
from ca.server.problems import Handler, Problem, problem, problem_middleware
from ca.server.ssh_routes import routes as ssh_routes
from ca.server.throttle import Throttle
from ca.server.x509_routes import routes as x509_routes
from ca.store import Store
from ca.store.errors import StoreUnavailable
from ca.tokens import Tokens
from hsm.errors import AuditUnavailable, HSMError
from hsm.ids import IdSource

MAX_BODY = 64 * 1024
log = structlog.get_logger("hsmca.http")
_request_ids = IdSource(4)


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request id for the logs, the audit lines and the client; latency and status."""
    rid = _request_ids.next()
    request["request_id"] = rid
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    resp: web.StreamResponse | None = None
    try:
        if request.version < HttpVersion10:
            # aiohttp takes a request line without a version for HTTP/0.9, and answered
            # it (a security trial; docs/api.md says not-http)
            resp = problem(400, "Bad Request", "a request line without an HTTP version "
                           "(HTTP/0.9) is not served: send HTTP/1.1; nothing was done",
                           "not-http")
            resp.force_close()
        else:
            resp = await handler(request)
        status = resp.status
        resp.headers["X-Request-Id"] = rid
        resp.headers["Server"] = SERVER  # not aiohttp's and Python's versions
        return resp
    except asyncio.CancelledError:
        # No answer went out (nginx's 499): a stop's grace ran out (an SRE trial's
        # request was said as a 500 it never got), or the connection went.
        status = ABANDONED
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics = request.app[METRICS]
        metrics.child(metrics.requests, route, str(status)).inc()
        metrics.child(metrics.latency, route).observe(elapsed)
        if status >= 400 and (unlogged := REFUSED_REQUESTS.allow(status)) is not None:
            if unlogged:
                _refused_requests_unlogged(status, unlogged)
            who = request.get("identity")
            # A 500 is a fault to look into; a 503 says an outage the log says once by
            # itself, and a 4xx the client's (an SRE trial: with log-level "warning" the
            # 500s were gone too).
            said = log.warning if status in (500, ABANDONED) else log.info
            said("request abandoned: no answer was sent" if status == ABANDONED else
                 "request refused", request_id=rid, method=request.method, route=route,
                 status=status, ms=round(elapsed * 1000, 2), client=request.remote,
                 **({"cert_serial": who.serial} if who is not None else {}),
                 **({"account": a} if (a := request.get("acme_account")) else {}),
                 **_problem_of(resp))


SERVER = "hsmca"  # the Server header: which software, not which versions to look up
ABANDONED = 499  # the status a request without an answer is counted and logged as


def _problem_of(resp: web.StreamResponse | None) -> dict[str, str]:
    """The problem type and detail a refusal told its client (ACME's and ours), for the
    operator's log line: what the client saw, where only the status was before."""
    if not isinstance(resp, web.Response) or resp.content_type != "application/problem+json":
        return {}
    try:
        doc = json.loads(resp.body) if isinstance(resp.body, bytes) else {}
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: str(doc[k])[:300] for k in ("type", "detail") if k in doc}


def _refused_requests_unlogged(status: object, unlogged: int) -> None:
    log.warning("requests refused and not logged one by one", status=status,
                unlogged=unlogged, interval_s=REFUSED_REQUESTS.interval_s,
                burst=REFUSED_REQUESTS.burst)


REFUSED_REQUESTS = Throttle(burst=50, on_quiet=_refused_requests_unlogged)  # per status
routes = web.RouteTableDef()


async def audit_state(audit: AuditReader) -> dict[str, Any]:
    """The audit log's state ({healthy, problem, size}), from the primary process,
    which writes it; unhealthy if the primary does not answer."""
    try:
        h = await asyncio.wait_for(audit.health(), timeout=2.0)
        return {"healthy": h.healthy, "problem": h.problem, "size": h.size,
                "damaged_seq": h.damaged_seq, "changed": h.changed}
    except (AuditUnavailable, TimeoutError):
        return {"healthy": False, "problem": audit.problem or _silent(audit.waited())}


def _silent(waited: float) -> str:
    """Why the primary did not answer: its recorder answers nothing while a group
    commit waits (a trial's held PostgreSQL COMMIT read as "does not answer", with the
    store "ok"), so a write this process has had waiting for seconds names that."""
    if waited >= wire.WRITE_WAIT_SAID_S:
        return wire.write_waits(waited)
    return ("the primary process does not answer within 2 s (it may be waiting for the "
            "audit log's disk, or for PostgreSQL in a cluster: its log says)")


async def store_state(store: Store, generations: Generations) -> str:
    """"ok", or "unavailable: why", asking the inventory itself (within 2 s), and
    whether the primary's check of every page found damage (ca.daemon.primary)."""
    if generations.gauge("inventory_damaged"):
        return ("unavailable: the inventory is damaged (a check of its every page found "
                "damage, which the daemon's log names): stop hsmca and restore it from a "
                "backup (docs/operator.md, Backup and restore)")
    try:
        await asyncio.wait_for(store.probe(), timeout=2.0)
        held = await asyncio.wait_for(store.writes_held(), timeout=2.0) \
            if store.healthy else None
    except StoreUnavailable:
        held = None  # `healthy` below says so
    except TimeoutError:  # a database that hangs takes requests' time as well
        # with why the last attempt failed, when it is known (a refused password)
        return f"unavailable: {store.problem or 'no answer within 2 s'}"
    if held is not None:
        return f"unavailable: {held}"
    return "ok" if store.healthy else f"unavailable: {store.problem or 'not answering'}"


async def policy_state(store: Store, node: str | None) -> str | None:
    """Cluster mode: whether the running nodes have the same [policy] in force
    (ca/cluster_policy.py); None on one node, or when the inventory cannot say."""
    if node is None:
        return None
    try:
        running = await asyncio.wait_for(store.running_node_policies(), timeout=2.0)
    except (StoreUnavailable, TimeoutError):
        return None  # "store" says why
    return cluster_policy.describe(node, running) if node in running else None


def _workers(generations: Generations) -> str | None:
    """How many of the daemon's workers serve: the answering worker speaks for its own
    HSM session only, and one that cannot start (its PIN file gone) left /health at 200
    with nothing said (an operator trial). Not a 503: the node still serves."""
    wanted = generations.gauge("workers_wanted")
    if not wanted or not generations.gauge("workers_serving"):
        return None  # not a daemon's worker (an app in a test), or the daemon starting
    serving = generations.gauge("workers_serving")
    silent = generations.gauge("workers_silent")
    said = f"{serving} of {wanted} serving"
    if serving < wanted:
        # Named by the lines there are: a worker killed a moment ago is being started
        # again, and only one that cannot be is "failed to restart" (an SRE trial).
        said += ("; the daemon's log says why the others do not (\"a worker exited; "
                 "restarting it\", or \"a worker failed to restart\")")
    if silent > 0:
        # Its share of the connections hangs meanwhile (an SRE trial saw half of them).
        said += (f"; {silent} of them not answering the primary (stopped or stuck: "
                 "killed and started again after [server] worker-timeout-s)")
    return said


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    hsm = request.app[HSM_HEALTH]

    async def ask_hsm() -> None:
        try:
            # The keys in use as the inventory has them now, so that the probe asks the
            # token only for those: a worker that served nothing since a key was retired
            # and destroyed took it for lost, and /health said 503 (a review).
            await asyncio.wait_for(request.app[ISSUANCE].keys.refresh(), timeout=2.0)
        except (HSMError, StoreUnavailable, TimeoutError):
            pass  # the parts below say what is wrong
        try:  # the HSM itself: a removed token is otherwise noticed only at the next sign
            await asyncio.wait_for(hsm.probe(max_wait=1.0), timeout=2.0)
        except (HSMError, TimeoutError):
            pass  # the signing thread now knows; its state below says why

    # At once, not one after the other: each may take its 2 s when its part is away, and
    # a load balancer's 5 s health check then saw a timeout instead of the 503 and its
    # reason (a cluster trial, with the database stopped under load: 6 s).
    node = request.app[SETTINGS].node
    _, store, state, policy = await asyncio.gather(
        ask_hsm(), store_state(request.app[STORE], request.app[LIFECYCLE].generations),
        audit_state(request.app[AUDIT]), policy_state(request.app[STORE], node))
    audit = "ok" if state["healthy"] else f"unavailable: {state['problem']}"
    parts = {"hsm": "ok" if hsm.healthy else f"unavailable: {hsm.problem or 'busy'}",
             "audit": audit, "store": store}
    ok = all(v == "ok" for v in parts.values())
    if state.get("damaged_seq") is not None or state.get("changed") is not None:
        # For auditors' tools, which fail on it (ca.audit.remote): the line the daemon
        # found rewritten in its own log file, or the file cut, appended to or replaced
        # under it, which no proof of the lines it serves shows (it serves them from
        # what it wrote: a web view stayed green beside a 503 saying so).
        if state.get("damaged_seq") is not None:
            parts["audit_damaged_seq"] = state["damaged_seq"]
        else:
            parts["audit_file_changed"] = True
        if request.app[SETTINGS].node is not None:  # a cluster: the node's own log
            parts["audit_damaged_log"] = request.app[SETTINGS].node
    if workers := _workers(request.app[LIFECYCLE].generations):
        parts["workers"] = workers
    if policy is not None:  # said, not judged: each node still decides by a policy
        parts["policy"] = policy
    # A 503 says when to look again, as every other 503 does (docs/api.md): a damaged
    # inventory waits for its operator; anything else may be back within a second.
    # (damage found by the primary's check of every page, or by this worker's own
    # transaction: a review found the latter said with 1)
    retry = None if ok else "300" if request.app[LIFECYCLE].generations.gauge(
        "inventory_damaged") or "is damaged" in store else "1"
    if not ok and not _may_see_paths(request):
        parts = {k: _no_paths(v) if isinstance(v, str) else v for k, v in parts.items()}
    return web.json_response({"status": "ok" if ok else "unavailable", **parts},
                             status=200 if ok else 503,
                             headers={"Retry-After": retry} if retry else None)


def _may_see_paths(request: web.Request) -> bool:
    """Whether /health may name the host's files: to `metrics-allow` addresses (the
    host's monitoring, by default loopback) and to a client certificate of this CA
    (auditors' tools read the damage it names). Anyone else who reaches the port hears
    what is wrong, not where its files are (a security review: the audit log's full
    path and sizes, to anyone)."""
    return peer_der(request) is not None or _metrics_allowed(request)


def _metrics_allowed(request: web.Request) -> bool:
    """Whether the asker's address is in `[server] metrics-allow`."""
    try:
        remote = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(remote in net for net in request.app[SETTINGS].metrics_allow)


# An absolute path (not a URL's): every directory but the last left out.
_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.@+-]+/)+([\w.@+-]+)")


def _no_paths(text: str) -> str:
    return _PATH.sub(lambda m: f".../{m.group(1)}", text)


@routes.get("/v1/whoami")
async def whoami(request: web.Request) -> web.Response:
    """What the CA knows of the presented client certificate (any role)."""
    who = await identity(request)
    rec = await request.app[GATE].record(who.fingerprint)
    return web.json_response({"serial": who.serial, "role": who.role, "names": list(who.names),
                              "principals": list(who.principals),
                              "not_after": rec.not_after if rec else None})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    allowed = request.app[SETTINGS].metrics_allow
    if not _metrics_allowed(request):
        to = (f"is served to {', '.join(map(str, allowed))} only" if allowed else
              "is served to no address")  # (an empty list read "served to  only")
        raise Problem(403, "Forbidden", f"/metrics {to} ([server] metrics-allow in "
                      "hsmca.toml)", "metrics-forbidden")
    body = request.app[METRICS].render(request.app[HSM_HEALTH],
                                       await audit_state(request.app[AUDIT]),
                                       await store_state(
                                           request.app[STORE],
                                           request.app[LIFECYCLE].generations) == "ok")
    return web.Response(body=body,
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def build_app(*, gate: Gate, tokens: Tokens, issuance: Issuance, revocations: Revocations,
              audit: AuditReader, limit: TokenLimit, hsm: Health, store: Store,
              settings: Settings, lifecycle: KeyLifecycle,
              metrics: Metrics | None = None,
              acme: AcmeConfig | None = None, public_path: str = "") -> web.Application:
    """`public_path`: the path of `[server] public-url`, under which the CRLs and OCSP
    are served too (add_revocation_routes)."""
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[request_middleware, problem_middleware])
    app[GATE], app[TOKENS], app[ISSUANCE], app[REVOCATIONS] = gate, tokens, issuance, revocations
    app[AUDIT], app[LIMIT], app[HSM_HEALTH], app[STORE] = audit, limit, hsm, store
    app[SETTINGS], app[LIFECYCLE] = settings, lifecycle
    app[METRICS] = metrics or Metrics()
    for table in (routes, x509_routes, ssh_routes, audit_routes, key_routes, inventory_routes):
        app.add_routes(table)
    add_revocation_routes(app.router, "")
    if public_path:
        add_revocation_routes(app.router, public_path)
    if acme is not None:  # ACME is on whenever the config has an [acme] section
        from ca.acme.server import install
        install(app, acme)
    return app


def add_revocation_routes(router: web.UrlDispatcher, prefix: str) -> None:
    """The CRLs and OCSP under `prefix` (the path of `[server] public-url`, "" for
    none): the addresses written into certificates are public-url's, so a public-url
    with a path named addresses that nothing served, 404 for good (a relying-party
    trial). A proxy that strips the path before the daemon finds them at the root."""
    from ca.server import x509_routes as x
    router.add_get(f"{prefix}/v1/x509/crl", x.crl)
    router.add_get(f"{prefix}/v1/x509/crl/{{issuer}}", x.issuer_crl)
    router.add_get(f"{prefix}/v1/x509/crls.pem", x.all_crls)
    router.add_post(f"{prefix}/v1/x509/ocsp", x.ocsp_post)
    router.add_get(f"{prefix}/v1/x509/ocsp/{{b64:.+}}", x.ocsp_get)


def public_prefix(public_url: str | None) -> str:
    """The path of `[server] public-url` ("" for none or "/")."""
    from urllib.parse import urlsplit
    return urlsplit(public_url).path.rstrip("/") if public_url else ""


def build_plain_http_app(app: web.Application, prefix: str = "") -> web.Application:
    """What `[server] http-listen` serves: the CRLs and OCSP of `app`, and nothing else
    (at the root, and under `prefix`, the path of public-url). They are signed, so they
    need no TLS; most relying parties fetch them only over plain HTTP (nginx's ssl_ocsp
    and ssl_stapling, OpenSSL's -crl_download: RFC 5280 and RFC 6960 Appendix A speak
    of http), and none could use the https addresses (a service team's trial). Nothing
    that takes a token, a key or a name is here."""
    public = web.Application(client_max_size=MAX_BODY,
                             middlewares=[request_middleware, problem_middleware])
    for key in app:
        public[key] = app[key]
    add_revocation_routes(public.router, "")
    if prefix:
        add_revocation_routes(public.router, prefix)
    return public


class _Refusals:
    """Refused TLS handshakes, logged once per reason per interval with how many there
    were: a client with an expired certificate retries in a loop."""

    def __init__(self) -> None:
        self._throttle = Throttle(burst=1, on_quiet=self._unlogged)
        self.on_refused: Callable[[str], None] | None = None  # a metric, per kind

    def note(self, exc: ssl.SSLError) -> None:
        reason = _reason(exc)
        if self.on_refused is not None:
            self.on_refused(_kind(exc))
        if (unlogged := self._throttle.allow(reason)) is not None:
            log.warning("refused a TLS handshake", reason=reason, client=PEER.get(),
                        refused_since_last_line=unlogged + 1)

    @staticmethod
    def _unlogged(reason: object, count: int) -> None:
        log.warning("refused TLS handshakes not logged one by one", reason=reason,
                    refused_since_last_line=count)


REFUSALS = _Refusals()


class _Trust:
    """The intermediates the TLS layer trusts for client certificates, reloaded before
    a connection's TLS object is made (_ListenerContext) when a key rotation (in any
    process) moved the shared `keys` counter: a certificate from a new intermediate,
    handed out by another worker a moment ago, is accepted by this one at once."""

    def __init__(self) -> None:
        self.generations: Generations | None = None
        self.bundle: Path | None = None
        self.listener: tuple[Path, Path] | None = None  # the daemon's certificate and key
        self.listener_gen = 0  # the `tls` counter when the listener last loaded them
        self._seen = -1
        self._said = Throttle(burst=1)

    def check(self, context: ssl.SSLContext) -> None:
        if self.generations is None or self.bundle is None:
            return
        self._listener(context)
        gen = self.generations.get("keys")
        if gen != self._seen:
            try:
                context.load_verify_locations(cafile=str(self.bundle))
            except (OSError, ssl.SSLError) as exc:
                # Tried again at the next handshake (out of descriptors for a moment,
                # say), and said once in 10 s meanwhile.
                if self._said.allow("bundle") is not None:
                    log.error("cannot load the CA bundle for client certificates",
                              bundle=str(self.bundle), error=str(exc))
            else:
                self._seen = gen

    def _listener(self, context: ssl.SSLContext) -> None:
        """The daemon's own certificate, renewed while it runs (ca/server_cert.py): the
        handshakes from now on present the new one."""
        assert self.generations is not None
        gen = self.generations.get("tls")
        if gen == self.listener_gen or self.listener is None:
            return
        try:
            # Checked first: OpenSSL drops the context's key when the new certificate
            # does not match it, and a failed load then left a listener no handshake
            # could complete with (a review); a pair that does not match is kept out.
            cert_pem, key_pem = self.listener[0].read_bytes(), self.listener[1].read_bytes()
            cert = x509.load_pem_x509_certificates(cert_pem)[0]
            key = serialization.load_pem_private_key(key_pem, None)
            if cert.public_key() != key.public_key():
                raise ValueError("the certificate and the key do not match")
            _load_pair(context, cert_pem, key_pem)
        except (OSError, ValueError, IndexError, TypeError, ssl.SSLError) as exc:
            if self._said.allow("listener") is not None:  # tried at the next handshake
                log.error("cannot load the daemon's renewed TLS certificate",
                          cert=str(self.listener[0]), error=str(exc))
        else:
            self.listener_gen = gen
            log.info("the listener presents the daemon's renewed TLS certificate")


def _load_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """The very bytes just checked, loaded from memory: OpenSSL reads only files, and
    read again from the state directory, a renewal landing between the check and the
    load could hand it another pair than the one checked (a flake review)."""
    fds = []
    try:
        for data in (cert_pem, key_pem):
            fds.append(os.memfd_create("hsmca-listener", os.MFD_CLOEXEC))
            with open(fds[-1], "wb", closefd=False) as fh:
                fh.write(data)
        context.load_cert_chain(*(f"/proc/self/fd/{fd}" for fd in fds))
    finally:
        for fd in fds:
            os.close(fd)


TRUST = _Trust()


class _CheckedSSLObject(ssl.SSLObject):
    """asyncio drops a failed server handshake without a word (it is an OSError, logged
    only in debug mode), so a client whose certificate is expired or from another CA
    sees 'connection reset' and the operator sees nothing. This says why."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except ssl.SSLWantReadError:
            raise
        except ssl.SSLError as exc:
            REFUSALS.note(exc)
            raise


def _reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate: {exc.verify_message}"
    return (exc.reason or type(exc).__name__).lower().replace("_", " ")


# OpenSSL's reasons for a client that speaks no TLS (plain HTTP, a port scanner's
# probe) and for one whose TLS this daemon does not take (1.1 and older, no shared
# suite).
_NOT_TLS = frozenset({"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER",
                      "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH",
                      "UNKNOWN_PROTOCOL"})
# The client refused this daemon's certificate (an expired one, or one of a chain the
# client does not trust: a renewal onto a new chain after a rotation).
_SERVER_CERTIFICATE = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "TLSV1_ALERT_ACCESS_DENIED"})
_PROTOCOL = frozenset({"UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "NO_PROTOCOLS_AVAILABLE",
                       "NO_SHARED_CIPHER", "TLSV1_ALERT_PROTOCOL_VERSION",
                       "NO_SUITABLE_SIGNATURE_ALGORITHM", "NO_SHARED_GROUPS"})


def _kind(exc: ssl.SSLError) -> str:
    """The metric's few labels: the log line has OpenSSL's own words. Raw reasons made
    a port scan or plain HTTP count as refused client certificates, which the docs said
    to alert on (an operator trial)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "client-certificate"
    if exc.reason in _NOT_TLS:
        return "not-tls"
    if exc.reason in _SERVER_CERTIFICATE:
        return "server-certificate"
    if exc.reason in _PROTOCOL:
        return "protocol"
    return "other"


X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's; Python's ssl has no name for it


class _ListenerContext(ssl.SSLContext):
    """A connection's TLS object takes the context's certificate chain when it is made:
    the daemon's renewed certificate (or its chain, after a root is retired) is loaded
    before, not in its first handshake, which presented the old chain still (a review:
    a client of the retired root alone got through a worker per connection)."""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        TRUST.check(self)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def tls_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS 1.2+ (1.3 preferred by OpenSSL), asking for, not requiring, a client cert.

    The chain of a presented client certificate is checked by OpenSSL against our CA
    (a certificate from another CA fails the handshake); routes that need one then
    look it up in the inventory, which also says whether it expired. Not the TLS layer:
    a handshake refused for an expired certificate ends without a word to the client
    (asyncio sends no alert), and a client that always presents its certificate (EST
    clients do) could not even enroll again with a token. Routes answer 403 with what
    to do instead; a leaf never outlives its issuer, so the leaf's time is the chain's.
    """
    ctx = _ListenerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=str(client_ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # TLS 1.2: forward-secret AEAD suites only (no CBC); TLS 1.3 has nothing else.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.sslobject_class = _CheckedSSLObject
    return ctx
