"""One worker process of `hsmca serve`: HTTPS, policy, signing.

The primary process starts it with two inherited channels to its recorder (see
ca/audit/link.py). The worker opens its own HSM session (its own C_Initialize:
SPEC section 5 scales with processes, never threads), checks every key it will use
cannot be exported, opens the inventory, and listens on the daemon's address with
SO_REUSEPORT beside the other workers, so the kernel spreads connections over them.

It records nothing itself: every audit line goes to the primary. If the primary
goes away, the worker exits at once, since nothing it signed could be recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sqlite3
import sys

import structlog
from aiohttp import web
from cryptography import x509

from ca.audit.link import AuditLink
from ca.authority import Authority
from ca.config import KEY_LABELS, Config, ConfigError, load
from ca.generations import Generations
from ca.logs import configure
from ca.process import raise_fd_limit, settle_heap
from ca.server.app import build_app, tls_context
from ca.store import Store
from hsm.errors import HSMError
from hsm.signers import HSMKey
from hsm.worker import HSMWorker

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


def _primary_gone(why: str) -> None:
    log.error("the primary process is gone; exiting, as nothing can be recorded", reason=why)
    os._exit(EXIT_PRIMARY_GONE)


async def run(config: Config, host: str, port: int, worker: int, sign_channel: socket.socket,
              channel: socket.socket) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    raise_fd_limit()
    link = AuditLink(sign_channel, channel, _primary_gone)
    hsm = HSMWorker(config.hsm, link)
    store: Store | None = None
    runner: web.AppRunner | None = None
    try:
        hsm.start()
        keys: dict[str, HSMKey] = {}
        for purpose in KEY_LABELS:
            keys[purpose] = await hsm.load_key(config.key_label(purpose))
        root = x509.load_pem_x509_certificate(config.root_pem.read_bytes())
        issuing = x509.load_pem_x509_certificate(config.issuing_pem.read_bytes())
        if issuing.public_key() != keys["issuing"].public_key():  # the token was swapped
            raise ValueError(f"{config.issuing_pem} does not belong to the issuing key in "
                             "the HSM")
        store = Store(config.db_path, autocheckpoint=False)  # the primary checkpoints
        auth = Authority(config, hsm, store, link, keys, root, issuing,
                         Generations(config.generations_path))
        runner = web.AppRunner(build_app(auth), access_log=None, shutdown_timeout=10.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls_context(
            config.tls_cert, config.tls_key, config.chain_pem), backlog=1024, reuse_port=True)
        await site.start()
        settle_heap()
        await link.ask("ready", pid=os.getpid())
        log.info("worker ready", worker=worker, pid=os.getpid())
        await stop.wait()
        await runner.cleanup()  # stop accepting; in-flight requests finish
        runner = None
        await hsm.drain()  # a signature under way finishes and gets its outcome line
    finally:
        if runner is not None:
            await runner.cleanup()
        await hsm.drain()
        if store is not None:
            store.close()
        hsm.close()
        link.close()


def main() -> int:
    p = argparse.ArgumentParser(description="a worker process of `hsmca serve` (started by "
                                "the primary process; not for direct use)")
    p.add_argument("--config", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--channels", required=True, help="two inherited socket fds, a,b")
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args()
    _die_with_parent(args.parent)
    configure()
    structlog.contextvars.bind_contextvars(worker=args.worker)
    fds = [int(fd) for fd in args.channels.split(",")]
    socks = [socket.socket(fileno=fd) for fd in fds]
    host, _, port = args.listen.rpartition(":")
    try:
        config = load(args.config)
        asyncio.run(run(config, host.strip("[]"), int(port), args.worker, *socks))
    except (ConfigError, HSMError, OSError, ValueError, sqlite3.Error) as exc:
        print(f"hsmca: worker {args.worker}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
