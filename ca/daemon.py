"""`hsmca serve`: start-up checks, the listener, and a graceful stop.

Start-up order matters: the audit log first (recovery, lock, checkpoint check), then
the HSM (every key checked non-exportable, or no start), then `daemon.start`, then
the listener. SIGTERM stops accepting, lets in-flight requests finish, records
`daemon.stop`, signs a final checkpoint and logs out.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
import sys

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ca import __version__
from ca.audit.checkpointer import Checkpointer
from ca.audit.log import AuditLog
from ca.audit.witness import FileWitness
from ca.authority import Authority
from ca.config import KEY_LABELS, Config
from ca.fileutil import write_atomic
from ca.server.app import build_app, tls_context
from ca.server_cert import ensure_server_cert
from ca.store import Store
from hsm.signers import HSMEd25519Key, HSMKey
from hsm.worker import HSMWorker

log = structlog.get_logger("hsmca.daemon")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(config: Config, listen: str | None = None, ready: asyncio.Event | None = None,
                ) -> None:
    if config.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm_conf
    host, port = parse_listen(listen or config.listen)
    _raise_fd_limit()
    audit_key = load_pem_public_key(config.audit_key_pem.read_bytes())
    if not isinstance(audit_key, Ed25519PublicKey):
        raise ValueError(f"{config.audit_key_pem} is not an Ed25519 public key")
    audit = AuditLog.open(config.audit_log, config.checkpoint_path, audit_key)
    worker = HSMWorker(config.hsm, audit)
    store: Store | None = None
    runner: web.AppRunner | None = None
    cp_task: asyncio.Task[None] | None = None
    # Handlers first: a SIGTERM that arrives right after "listening on" must still
    # stop the daemon gracefully (daemon.stop line, final checkpoint).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        worker.start()
        keys: dict[str, HSMKey] = {}
        for purpose in KEY_LABELS:
            keys[purpose] = await worker.load_key(config.key_label(purpose))
        if not isinstance(keys["audit"], HSMEd25519Key):
            raise ValueError("the audit key must be Ed25519 (C2SP signed notes)")
        root = x509.load_pem_x509_certificate(config.root_pem.read_bytes())
        issuing = x509.load_pem_x509_certificate(config.issuing_pem.read_bytes())
        if root.public_key() != keys["root"].public_key():
            raise ValueError(f"{config.root_pem} does not belong to the root key in the HSM")
        if issuing.public_key() != keys["issuing"].public_key():
            raise ValueError(f"{config.issuing_pem} does not belong to the issuing key in the HSM")
        if keys["audit"].public_key() != audit_key:
            raise ValueError(f"{config.audit_key_pem} does not belong to the audit key in the HSM")
        await audit.append("daemon.start", version=__version__, pid=os.getpid(),
                           config_sha256=hashlib.sha256(config.path.read_bytes()).hexdigest())
        store = Store(config.db_path)
        await ensure_server_cert(config, worker, keys["issuing"], issuing, store)
        auth = Authority(config, worker, store, audit, keys, root, issuing)
        checkpointer = Checkpointer(audit, worker, keys["audit"], config.audit_origin,
                                    config.checkpoint_path,
                                    heartbeat=config.checkpoint_heartbeat_s,
                                    witnesses=[FileWitness(w, audit_key, config.audit_origin)
                                               for w in config.witnesses])
        app = build_app(auth, checkpointer)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls_context(
            config.tls_cert, config.tls_key, config.chain_pem), backlog=1024)
        # The daemon.start line gets a checkpoint before anyone can connect, so
        # /v1/audit/checkpoint always has one to serve.
        await checkpointer.checkpoint()
        await site.start()
        server = site._server
        bound = server.sockets[0].getsockname() if server and server.sockets else (host, port)
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        url = f"https://{shown}:{bound[1]}"
        # Local admin commands (`hsmca token create --config ...`) find the daemon here,
        # whatever --listen chose.
        write_atomic(config.url_file, url + "\n")
        _settle_heap()
        print(f"listening on {url}", flush=True)
        log.info("listening", url=url)
        cp_task = asyncio.create_task(checkpointer.run())
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
        await runner.cleanup()  # stop accepting; in-flight requests finish
        runner = None
        cp_task.cancel()
        await asyncio.gather(cp_task, return_exceptions=True)
        await worker.drain()  # a signature under way finishes and gets its outcome line
        await audit.append("daemon.stop", pid=os.getpid())
        await checkpointer.checkpoint()
    finally:
        config.url_file.unlink(missing_ok=True)
        if cp_task is not None and not cp_task.done():
            cp_task.cancel()
        if runner is not None:
            await runner.cleanup()
        await worker.drain()
        if store is not None:
            store.close()
        worker.close()
        audit.close()


def _settle_heap() -> None:
    """Tune the cyclic garbage collector for a long-running server.

    What exists once the daemon is ready (modules, keys, caches, the app) lives as
    long as the process. Frozen, it is no longer walked by every full collection:
    under load those took 30-70 ms each, with the lock held, stalling every request
    in flight (the benchmark's p99). Almost everything a request allocates is freed
    by reference counting, so collections can also run far less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def main(config: Config, listen: str | None) -> int:
    try:
        asyncio.run(serve(config, listen))
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return 0


def _raise_fd_limit() -> None:
    """Many idle keep-alive clients are normal for a CA: allow the hard fd limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
