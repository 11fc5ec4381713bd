"""One worker process of `hsmca serve`: HTTPS, decisions, signing.

The primary process starts it with three inherited channels: two to its audit
recorder (ca/audit/link.py) and a control channel (ca/daemon/control.py). The
worker opens its own HSM session on its signing thread (its own C_Initialize:
scale with processes, never threads), checks every key it will use cannot be
exported, opens the inventory, and listens on the daemon's address with
SO_REUSEPORT beside the other workers, so the kernel spreads connections over them.

It records nothing itself: every audit line goes to the primary. If the primary
goes away, the worker exits at once, since nothing it signed could be recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from ca import ra
from ca.audit.link import AuditLink
from ca.audit.log import ISSUING
from ca.config import Config, ConfigError, load
from ca.daemon.cluster_limit import ClusterTokenLimit
from ca.daemon.control import EXIT_PIN_REFUSED, ControlClient
from ca.daemon.keys import open_keyring
from ca.generations import Generations
from ca.http_server import app_runner, tcp_site
from ca.issuance.issue import Issuance
from ca.issuance.pipeline import SigningPipeline
from ca.issuance.withheld import withheld_noter
from ca.lifecycle import KeyLifecycle
from ca.listener import Places
from ca.logs import configure
from ca.metrics import Metrics
from ca.process import dumpable, keep_memory_in, raise_fd_limit, settle_heap
from ca.revocation import COUNTED, Revocations
from ca.revocation.unreleased import Unreleased, revoke_unreleased
from ca.server.app import (
    REFUSALS,
    TRUST,
    build_app,
    build_plain_http_app,
    public_prefix,
    tls_context,
)
from ca.server.common import Gate, Settings
from ca.store import Store, open_store
from ca.store.errors import NoInventory, SchemaTooNew, StoreUnavailable
from ca.store.sqlite import SQLiteStore
from ca.tokens import Tokens
from hsm.errors import AuditUnavailable, HSMError, PinRefused

log = structlog.get_logger("hsmca.worker")
EXIT_PRIMARY_GONE = 70
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the primary dies (even by kill -9), so no worker of a
    dead daemon keeps the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(EXIT_PRIMARY_GONE)


async def _revoke_when_logged(queue: asyncio.Queue[Unreleased], store: Store,
                              link: AuditLink, revocations: Revocations,
                              context: Callable[[], Awaitable[ra.Context]],
                              node: str | None) -> None:
    """A row this worker committed whose outcome could not be written (the log's disk
    full) is revoked once the log takes lines again, without waiting for a restart: the
    inventory called it valid, and OCSP would have signed it good (a fault trial)."""
    while True:
        item = await queue.get()
        while True:
            try:
                revoked = await revoke_unreleased([item], store, link, revocations, context,
                                                  node)
            except (AuditUnavailable, StoreUnavailable, HSMError):
                await asyncio.sleep(UNRELEASED_RETRY_S)  # a retry pace, not synchronisation
                continue
            except Exception as exc:  # revoked meanwhile, say: the next start looks again
                log.error("cannot revoke a certificate signed but never released",
                          serial=item[1], error=str(exc) or type(exc).__name__)
                break
            if revoked:
                log.warning("revoked a certificate signed but never released (its outcome "
                            "line could not be written, or its inventory commit was given up "
                            "on); nobody holds it", serial=item[1])
            break


UNRELEASED_RETRY_S = 1.0


def _primary_gone(why: str) -> None:
    log.error("the primary process is gone; exiting, as nothing can be recorded", reason=why)
    os._exit(EXIT_PRIMARY_GONE)


async def run(config: Config, host: str, port: int, slot: int, sign_channel: socket.socket,
              audit_channel: socket.socket, control_channel: socket.socket,
              http_listen: tuple[str, int] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A reload is the primary's to do (`pkill -HUP hsmca` reaches us too): it reads the
    # config and sends the policy to every worker.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    raise_fd_limit()
    link = AuditLink(sign_channel, audit_channel, _primary_gone)
    pipeline = SigningPipeline(config.hsm_session, link)
    control = ControlClient(control_channel, on_unreadable=stop.set)
    store: Store | None = None
    runner: web.AppRunner | None = None
    plain: web.AppRunner | None = None  # [server] http-listen: CRLs and OCSP only
    revoking: asyncio.Task[None] | None = None
    try:
        await control.start()
        pipeline.start()
        # SQLite: the primary checkpoints the WAL; PostgreSQL: a pool of this process's.
        store = open_store(config.store_location, autocheckpoint=False)
        generations = Generations(config.generations_path)
        if isinstance(store, SQLiteStore):  # damage the primary's check of it found
            store.damage_found = lambda: bool(generations.gauge("inventory_damaged"))
        keys = await open_keyring(config, store, pipeline, generations)
        issuance = Issuance(pipeline, store, keys, config.public_url, config.node)
        gate: Gate
        revocations = Revocations(store, link, issuance, generations, lambda: gate.context())
        gate = Gate(store, revocations, keys, lambda: control.policy)  # the primary's
        unreleased: asyncio.Queue[Unreleased] = asyncio.Queue()
        pipeline.on_unreleased = lambda purpose, serial, seq: loop.call_soon_threadsafe(
            unreleased.put_nowait, (purpose, serial, seq)) if purpose in ISSUING else None
        pipeline.on_withheld = withheld_noter(config.withheld_path, ISSUING,
                                              unreleased.put_nowait)
        revoking = asyncio.create_task(_revoke_when_logged(
            unreleased, store, link, revocations, gate.context, config.node))
        metrics = Metrics()
        metrics.watch(pipeline)
        REFUSALS.on_refused = lambda reason: metrics.child(metrics.tls_refused, reason).inc()
        COUNTED.on_revoked = lambda kind, reason, n: metrics.child(
            metrics.revoked, kind, reason).inc(n)
        app = build_app(
            gate=gate, tokens=Tokens(store, link), issuance=issuance, revocations=revocations,
            audit=link, limit=ClusterTokenLimit(store) if config.cluster else control,
            hsm=pipeline, store=store, metrics=metrics,
            lifecycle=KeyLifecycle(issuance, store, link, generations, config.bundle_pem),
            settings=Settings(tuple(ipaddress.ip_network(n) for n in config.metrics_allow),
                              config.audit_origin, config.node,
                              own_names=(*config.policy.reserved, "localhost", "127.0.0.1",
                                         "::1"), admin_cert=config.admin_cert),
            acme=config.acme, public_path=public_prefix(config.public_url))
        runner = app_runner(app, config.request_timeout_s, shutdown_timeout=10.0)
        await runner.setup()
        TRUST.generations, TRUST.bundle = generations, config.bundle_pem
        # Read before the listener loads the file: a renewal after that is loaded again.
        TRUST.listener, TRUST.listener_gen = (config.tls_cert, config.tls_key), \
            generations.get("tls")
        # One count of connections for both ports: the descriptors kept for the HSM hold
        # whatever a client opens on either.
        places = Places(config.max_connections_per_address, on_open=metrics.connections.set)

        def refused(reason: str) -> None:
            metrics.child(metrics.connections_refused, reason).inc()
        site = tcp_site(runner, host, port, ssl_context=tls_context(
            config.tls_cert, config.tls_key, config.bundle_pem), backlog=1024, reuse_port=True,
            places=places, on_refused=refused)
        await site.start()
        if http_listen is not None:
            plain = app_runner(build_plain_http_app(app, public_prefix(config.public_url)),
                               config.request_timeout_s, shutdown_timeout=10.0)
            await plain.setup()
            await tcp_site(plain, *http_listen, ssl_context=None, backlog=1024,
                           reuse_port=True, places=places, on_refused=refused).start()
        settle_heap()
        await control.ready(os.getpid())
        log.info("worker ready", worker=slot, pid=os.getpid(), dumpable=dumpable())
        await stop.wait()
        await asyncio.gather(runner.cleanup(), *([plain.cleanup()] if plain else []))
        runner = plain = None  # stopped accepting; in-flight requests finished
        await pipeline.drain()  # a signature under way finishes and gets its outcome line
    finally:
        for r in (runner, plain):
            if r is not None:
                await r.cleanup()
        if revoking is not None:  # what it has not revoked, the next start does
            revoking.cancel()
            await asyncio.gather(revoking, return_exceptions=True)
        await pipeline.drain()
        if store is not None:
            store.close()
        pipeline.close()
        await control.close()
        link.close()


def main() -> int:
    p = argparse.ArgumentParser(description="a worker process of `hsmca serve` (started by "
                                "the primary process; not for direct use)")
    p.add_argument("--config", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--channels", required=True, help="three inherited socket fds, a,b,c")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--node", help="the node's name (cluster mode)")
    p.add_argument("--http-listen", help="HOST:PORT for the CRLs and OCSP over plain HTTP")
    args = p.parse_args()
    _die_with_parent(args.parent)
    keep_memory_in()  # before it logs in to the token
    configure()
    structlog.contextvars.bind_contextvars(worker=args.worker)
    os.environ["PGAPPNAME"] = f"hsmca {args.node or 'serve'} worker {args.worker}"
    socks = [socket.socket(fileno=int(fd)) for fd in args.channels.split(",")]
    host, _, port = args.listen.rpartition(":")
    try:
        config = load(args.config)
        if args.node:
            config = config.for_node(args.node)
        plain = None
        if args.http_listen:
            plain_host, _, plain_port = args.http_listen.rpartition(":")
            plain = (plain_host.strip("[]"), int(plain_port))
        asyncio.run(run(config, host.strip("[]"), int(port), args.worker, *socks,
                        http_listen=plain))
    except PinRefused as exc:  # the primary starts it again only for another PIN
        log.error("the worker cannot start", error=str(exc))
        return EXIT_PIN_REFUSED
    except (ConfigError, HSMError, OSError, ValueError, sqlite3.Error, StoreUnavailable,
            SchemaTooNew, NoInventory) as exc:
        # A log line like the daemon's others (worker=N bound above): as plain text it
        # was the one line of the stream a JSON log shipper could not read (an
        # operator trial), at every restart of a worker that could not start.
        log.error("the worker cannot start", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
