"""`hsmca serve`: the primary process. Start-up checks, the workers, a graceful stop.

The primary writes the audit log (it alone: docs/audit-log.md), signs its
checkpoints, counts failed bootstrap-token attempts for the whole daemon, and
supervises the worker processes that serve HTTPS (ca/daemon/worker.py), each with
its own HSM session (scale with processes, never threads: docs/security.md).

Start-up order matters: the audit log first (recovery, lock, checkpoint check), then
the HSM (every key checked non-exportable, or no start), then `daemon.start`, the
daemon's TLS certificate, a checkpoint, and only then the workers; the URL is
printed once every worker is listening. A worker that dies is restarted (its
signatures under way are closed in the log as `WorkerLost`, never released).
SIGTERM stops the workers (in-flight requests finish), records `daemon.stop`, signs
a final checkpoint and logs out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    load_pem_public_key,
)

from ca import __version__, metrics, ra
from ca.audit.checkpointer import Checkpointer, keys_to_open_with, publish_key
from ca.audit.cluster_tiles import TileCopy
from ca.audit.cluster_tiles import catch_up as catch_up_tiles
from ca.audit.cosignature import ALG_COSIGNATURE, parse_verifier_key
from ca.audit.log import ISSUING, AuditKeys, AuditLog
from ca.audit.recorder import Recorder
from ca.audit.scan import (
    made_unrecorded,
    promotions_never_committed,
    rotation_never_committed,
)
from ca.audit.voided import void
from ca.audit.witness import FileWitness
from ca.audit.witnessing import HTTPWitness, Witnessing
from ca.cluster_policy import PolicyWatch
from ca.config import Config, split_listen, worker_count
from ca.daemon import control
from ca.daemon.keys import Keyring, open_keyring, seed
from ca.daemon.ratelimit import FailureLimiter
from ca.daemon.reload import reload_policy, say_policy_gaps
from ca.errors import CLIError
from ca.fileutil import write_atomic
from ca.generations import SLOTS, Generations
from ca.issuance.issue import Issuance, decision_context
from ca.issuance.pipeline import SigningPipeline
from ca.issuance.profiles import utcnow
from ca.issuance.withheld import withheld_noter
from ca.lifecycle import write_bundle, write_chain_files
from ca.logs import Recurring
from ca.own_certs import OwnCerts
from ca.policy import Reason, Refused
from ca.process import DAEMON_STARTED, keep_memory_in, raise_fd_limit, settle_heap
from ca.revocation.from_log import complete_from_log
from ca.revocation.ocsp import OCSPRefresher, OCSPSigner
from ca.server_cert import ensure_server_cert, listener_cert, listener_files, one_missing
from ca.store import Store, clustered, open_store, refuse_another_files_wal
from ca.store.errors import StoreUnavailable
from ca.store.sqlite import SQLiteStore, damaged_error
from ca.subject import spki_sha256
from ca.token_lock import Skipped, TokenLock, hold_token
from hsm.errors import AuditUnavailable, HSMError
from hsm.session import KeyInfo, describe_source

if TYPE_CHECKING:
    from ca.store.postgres import Lease, PostgresStore

log = structlog.get_logger("hsmca.daemon")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# Pings unanswered this long: said, and at the stop the worker is killed, not waited for.
STUCK_AFTER_S = 3 * control.HEARTBEAT_S
WITNESS_DRAIN_S = 10.0
MAX_RESTART_DELAY_S = 30.0


class StartError(CLIError):
    """The daemon cannot start; the message says why (a worker's own message is on
    stderr above it)."""


class PinStartError(StartError):
    """A worker could not log in: the token refused the PIN."""


def _bound(sock: socket.socket) -> str:
    """HOST:PORT a reserved socket is bound to (an IPv6 host in brackets), as workers
    listen on it and URLs name it."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(text: str) -> tuple[str, int]:
    try:
        host, port = split_listen(text)
    except ValueError as exc:
        raise ValueError(f"--listen {exc}") from None
    return host or "127.0.0.1", port


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket to the address, so that port 0
    becomes a real port the workers can all bind to; it receives no connections.

    SO_REUSEPORT would also let this daemon share a port that another server of the
    same user listens on, and the kernel would split the clients between them: so the
    address is first bound without it, which fails if anyone listens there."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if port != 0:
        probe = socket.socket(family, kind, proto)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            raise StartError(f"cannot listen on {host}:{port}: {exc.strerror} (another hsmca, "
                             "or another server, uses it?): stop it, or listen elsewhere "
                             "(--listen HOST:PORT, or [server] listen; port 0 takes a free "
                             "one, which the line `listening on URL` names)") from None
        finally:
            probe.close()
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class WorkerPool:
    """Starts the worker processes, restarts one that dies, stops them all."""

    def __init__(self, config: Config, address: str, count: int, audit: AuditLog,
                 checkpointer: Checkpointer, generations: Generations,
                 policies: control.PolicyFeed,
                 on_restart: Callable[[str], None] = lambda _reason: None,
                 on_workers: Callable[[int, int], None] = lambda _serving, _silent: None,
                 http_address: str | None = None) -> None:
        self.http_address = http_address  # [server] http-listen, its port bound
        self.config, self.address, self.count, self.audit = config, address, count, audit
        self.generations, self.policies = generations, policies
        self.on_restart = on_restart  # counts restarts by reason (the primary's metrics)
        # How many workers run, and how many of them do not answer its pings (a stopped
        # or stuck worker holds its share of the connections until it is killed, and
        # nothing but one log line said so: an SRE trial): the primary's metrics and
        # /health's `workers`.
        self.on_workers = on_workers
        self._silent: set[int] = set()  # the slots of those that do not answer
        witnesses = checkpointer.witnesses
        self.recorder = Recorder(audit, lambda: checkpointer.latest, self._lost,
                                 latest_cosigned=lambda: witnesses.cosigned if witnesses else None,
                                 witnesses=lambda: witnesses.report if witnesses is not None
                                 else '{"witnesses": []}',
                                 checkpoint_trouble=checkpointer.trouble)
        # Failed bootstrap-token attempts, counted for the whole daemon.
        self.limiter = FailureLimiter()
        self._control: list[asyncio.Task[None]] = []
        self._attached = 0  # workers whose channels the recorder still serves
        self._all_detached = asyncio.Event()
        self._all_detached.set()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._alive: dict[int, control.Liveness] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._stall_said = 0.0  # when this process's own stall was last logged

    def _lost(self, _slot: int, _closed: int) -> None:  # on the recorder's thread
        self._loop.call_soon_threadsafe(self._detached)

    def _detached(self) -> None:
        self._attached -= 1
        if self._attached == 0:
            self._all_detached.set()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.returncode is None]

    async def start(self) -> None:
        """Start every worker and wait until each listens, or raise StartError."""
        started = await asyncio.gather(*(self._start_one(i) for i in range(self.count)),
                                       return_exceptions=True)
        for result in started:
            if isinstance(result, BaseException):
                raise result
        for slot, (proc, exited, alive) in enumerate(started):  # type: ignore[misc]
            self._supervisors.append(asyncio.create_task(
                self._supervise(slot, proc, exited, alive)))
        self._say_workers()

    async def _start_one(self, slot: int) -> tuple[asyncio.subprocess.Process,
                                                   asyncio.Future[int], control.Liveness]:
        """A new worker in `slot`, listening, and how its answers to pings go;
        StartError (its process gone) if not."""
        # Two audit channels (signing, the rest) for the recorder, one control channel.
        ours, theirs = zip(*(socket.socketpair() for _ in range(3)), strict=True)
        ready = asyncio.Event()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ca.daemon.worker", "--config", str(self.config.path),
                "--listen", self.address, "--worker", str(slot), "--parent", str(os.getpid()),
                *(["--node", self.config.node] if self.config.node else []),
                *(["--http-listen", self.http_address] if self.http_address else []),
                "--channels", ",".join(str(s.fileno()) for s in theirs),
                pass_fds=[s.fileno() for s in theirs], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL)  # stdout's first line is the primary's URL
        except OSError as exc:
            for s in ours:
                s.close()
            raise StartError(f"cannot start worker {slot}: {exc.strerror or exc}") from None
        finally:
            for s in theirs:
                s.close()
        self._procs[slot] = proc
        self._attached += 1
        self._all_detached.clear()
        self.recorder.attach(slot, list(ours[:2]))  # closed by the recorder once it exits
        alive = self._alive[slot] = control.Liveness()
        self._control.append(asyncio.create_task(control.serve_worker(
            ours[2], self.limiter, lambda _pid: ready.set(), self.policies, alive)))
        exited = asyncio.ensure_future(proc.wait())
        waiting = asyncio.ensure_future(ready.wait())
        done, _ = await asyncio.wait({exited, waiting}, timeout=START_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if waiting in done:
            alive.answered = time.monotonic()  # counted from now: a start may be slow
            return proc, exited, alive
        if exited not in done:
            proc.kill()
            await exited
            raise StartError(f"worker {slot} did not start within {START_TIMEOUT_S:.0f} s")
        if proc.returncode == control.EXIT_PIN_REFUSED:
            raise PinStartError(f"worker {slot} could not log in: the token refused the PIN "
                                "(its message is above)")
        raise StartError(_worker_died(slot, proc.returncode, self.config.local_dir))

    async def _supervise(self, slot: int, proc: asyncio.subprocess.Process,
                         exited: asyncio.Future[int], alive: control.Liveness) -> None:
        """Restart the worker of `slot` whenever it exits, or once it stops answering
        pings (killed first: its socket would go on taking connections that hang), with
        a back-off that grows while it keeps failing (a crash loop must not spin) and
        resets once a worker has run a good while."""
        delay = 0.5
        started = time.monotonic()
        while True:
            silent = await self._until_gone(slot, proc, exited, alive)
            code = await exited
            if self._stopping:
                return
            self._say_workers()  # this one has exited
            why = {"unanswered_s": round(silent)} if silent is not None else {}
            if silent is not None:
                log.error("a worker stopped answering: killed, and started again",
                          worker=slot, pid=proc.pid, unanswered_s=round(silent))
            else:
                log.error("a worker exited; restarting it", worker=slot, pid=proc.pid,
                          status=code)
            self.on_restart("unanswered" if silent is not None else "exited")
            metrics.process_exited(proc.pid)
            # It may have died between committing a revocation and telling the others.
            self.generations.bump()
            try:
                await self.audit.append("worker.exit", worker=slot, pid=proc.pid, status=code,
                                        **why)
            except Exception as exc:  # the log is down: the restart is still right
                log.error("cannot record the worker's exit", error=str(exc))
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2,
                                                                    MAX_RESTART_DELAY_S)
            while True:
                await asyncio.sleep(delay)  # a back-off, not synchronisation
                if self._stopping:
                    return
                pin_before = _pin_mark(self.config.hsm.pin_source)  # what the worker reads
                try:
                    proc, exited, alive = await self._start_one(slot)
                    self._say_workers()
                    break
                except PinStartError as exc:
                    # Offered again and again, a wrong PIN locks many HSMs' user PIN:
                    # the worker waits for another PIN (the file edited), or a restart.
                    log.error("a worker cannot log in: the token refused the PIN; it is not "
                              "started again until the PIN source changes", worker=slot,
                              error=str(exc),
                              pin_source=describe_source(self.config.hsm.pin_source))
                    await _pin_changed(self.config.hsm.pin_source, pin_before,
                                       lambda: self._stopping)
                    delay = 0.5
                    continue
                except StartError as exc:
                    log.error("a worker failed to restart; retrying", worker=slot,
                              error=str(exc), retry_in_s=min(delay * 2, MAX_RESTART_DELAY_S))
                    delay = min(delay * 2, MAX_RESTART_DELAY_S)
            started = time.monotonic()

    def _say_workers(self) -> None:
        self.on_workers(len(self.pids), len(self._silent))

    def _answering(self, slot: int, answers: bool) -> None:
        if answers != (slot not in self._silent):
            (self._silent.discard if answers else self._silent.add)(slot)
            self._say_workers()

    async def _until_gone(self, slot: int, proc: asyncio.subprocess.Process,
                          exited: asyncio.Future[int], alive: control.Liveness
                          ) -> float | None:
        """Return once the worker exits (None), or kill it once it has not answered a
        ping for `[server] worker-timeout-s` (how long it had not: its exit follows)."""
        try:
            return await self._watch(slot, proc, exited, alive)
        finally:
            self._answering(slot, True)  # gone: counted among the serving no more

    async def _watch(self, slot: int, proc: asyncio.subprocess.Process,
                     exited: asyncio.Future[int], alive: control.Liveness) -> float | None:
        warned, warned_at = False, 0.0
        # From the worker's last answer (its ready, for a new one): a primary stopped
        # before this loop first ran (between its start's "listening on" and its first
        # round) is stalled as much as one stopped later (a parallel test run).
        last = alive.answered
        while not exited.done():
            now = time.monotonic()
            if now - last > STUCK_AFTER_S:
                # This process itself did not run (stopped, its VM paused, swapped out):
                # no ping went, no answer was read, so the worker's silence is ours. It
                # gets a fresh window; all of them were killed at SIGCONT before (a fault
                # trial).
                alive.answered = max(alive.answered, now)
                if now - self._stall_said > STUCK_AFTER_S:
                    self._stall_said = now
                    log.warning("the primary process itself did not run for a while (stopped "
                                "or paused); its workers get time to answer again",
                                stalled_s=round(now - last))
            last = now
            silent = alive.silent_for()
            if silent >= self.config.worker_timeout_s and not self._stopping:
                proc.kill()  # SIGKILL: a stopped or stuck process cannot refuse it
                return silent
            # /health and the metrics first, then the line: what the line says shows
            # there by the time anyone reads it (a flake hunt: a read right after the
            # line found the count before it).
            was, warned = warned, silent > STUCK_AFTER_S
            self._answering(slot, not warned)
            if warned and not was:
                log.warning("a worker does not answer the primary's pings", worker=slot,
                            pid=proc.pid, unanswered_s=round(silent),
                            killed_after_s=self.config.worker_timeout_s)
                warned_at = now - silent
            elif was and not warned:
                log.warning("a worker answers the primary's pings again", worker=slot,
                            pid=proc.pid, unanswered_s=round(now - warned_at))
            await asyncio.wait({exited}, timeout=control.HEARTBEAT_S)
        return None

    async def stop(self) -> None:
        """SIGTERM every worker (each finishes its requests), then wait for them."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        for slot, proc in self._procs.items():
            if proc.returncode is None:
                silent = self._alive[slot].silent_for()
                if silent > STUCK_AFTER_S:
                    # Stuck: it would not act on SIGTERM, and the stop would wait for it
                    # past a unit's TimeoutStopSec, before daemon.stop is written.
                    log.error("a worker does not answer: killed at the stop", worker=slot,
                              pid=proc.pid, unanswered_s=round(silent))
                    proc.kill()
                else:
                    proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            metrics.process_exited(proc.pid)
        # The recorder has handled every worker's last lines and closed the
        # signatures of one that had to be killed, before daemon.stop is written.
        try:
            await asyncio.wait_for(self._all_detached.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("the recorder did not see every worker go")
        for task in self._control:
            task.cancel()
        await asyncio.gather(*self._control, return_exceptions=True)

    def close(self) -> None:
        self.recorder.close()


async def serve(config: Config, listen: str | None = None, workers: int | None = None) -> None:
    if config.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = config.softhsm_conf
    host, port = parse_listen(listen or config.listen)
    count = worker_count(config.workers if workers is None else workers)
    raise_fd_limit()
    audit_key = load_pem_public_key(config.audit_key_pem.read_bytes())
    if not isinstance(audit_key, Ed25519PublicKey):
        raise ValueError(f"{config.audit_key_pem} is not an Ed25519 public key")
    if not config.cluster and config.move_marker.exists():
        # The move may have committed: a daemon on SQLite now would leave PostgreSQL
        # behind, and the next move would find it holding "another" CA.
        into = config.move_marker.read_text(errors="replace").strip()
        raise StartError(f"`hsmca store move` into {into} was cut short: run it again to "
                         f"finish (it also moves again if nothing was committed); to stay "
                         f"on SQLite instead, delete {config.move_marker}")
    if not config.cluster and not config.db_path.exists() and config.moved_db_path.exists():
        # SQLite would start an empty inventory, and the CA forget what it revoked.
        raise StartError(f"this CA was moved into PostgreSQL (`hsmca store move`), but "
                         f"{config.path} has no [store] url: run `hsmca store move --config "
                         f"{config.path}` again to finish the move")
    # Before anything is opened, so that the pre-flight beside the running daemon finds
    # them (an upgrade trial's passed it, and failed the start after the stop).
    one_missing(config)
    listener_files(config)
    if not config.cluster:
        refuse_another_files_wal(config.db_path)
    if not os.path.exists(config.hsm.module):
        raise HSMError(f"PKCS#11 module not found: {config.hsm.module}")  # (as HSM opens)
    # Cluster mode: the store first, since the audit log is made durable in it too.
    store: Store | None = open_store(config.store_location) if config.cluster else None
    name_held: Lease | None = None
    token_held: TokenLock | None = None

    def let_go() -> None:  # a start that fails: no pool task or lock outlives it
        if name_held is not None:
            name_held.close()
        if store is not None:
            store.close()
        if token_held is not None:
            token_held.close()
    try:
        if store is not None:
            await _check_it_is_this_cas(config, store, audit_key)
        name_held = await _hold_node_name(config, store)
        # Before the log is opened (which may rebuild its tiles): no copy of this CA
        # serves beside it on this host (a second serve of this state directory is
        # told so by the log's lock).
        held = hold_token(config.hsm.module, config.softhsm_conf, config.hsm.token,
                          config.state_dir, shared=config.cluster)
        if isinstance(held, Skipped):
            log.warning("the token's lock on this host could not be taken, so whether "
                        "another hsmca serves this token here (a copy of this CA, a "
                        "restored backup: or this process is one) cannot be told, and "
                        "neither is refused (docs/operator.md, 'One CA at a time')",
                        why=held.why)
        token_held = held if isinstance(held, TokenLock) else None
        # A node stopped during the audit key's rotation: see _open_audit.
        audit = _open_audit(config, audit_key if store is None else
                            await keys_to_open_with(config.audit_key_pem, store),
                            store, name_held)
        _say_how_the_last_run_ended(config, audit)
        say_policy_gaps(config, config.policy)
    except BaseException:
        let_go()
        raise
    try:
        # After the log's lock: a second `serve` on this state directory must not
        # wipe the running daemon's metric files. Before prometheus_client's import.
        metrics.prepare(config.local_dir)
        from ca.metrics import AuditMetrics
        audit_metrics = AuditMetrics()
        audit_metrics.watch(audit)
        # Before anything is logged: a port in use must fail the start at once.
        placeholder = reserve_port(host, port)
        plain_placeholder = None
        if config.http_listen is not None:
            try:
                plain_placeholder = reserve_port(*parse_listen(config.http_listen))
            except BaseException:
                placeholder.close()
                raise
    except BaseException:
        audit.close()
        let_go()
        raise
    pipeline = SigningPipeline(config.hsm_session, audit)
    # Its own certificates withheld (the admin credential's): the next start revokes them.
    pipeline.on_withheld = withheld_noter(config.withheld_path, ISSUING)
    generations = Generations.create(config.generations_path)
    witnessing = Witnessing(
        [*(FileWitness(w, audit_key, config.audit_origin) for w in config.witnesses),
         *(HTTPWitness(url) for url in config.witness_urls)],
        [parse_verifier_key(k, ALG_COSIGNATURE) for k in config.witness_keys],
        audit.consistency_proof, config.cosigned_checkpoint_path)
    audit_metrics.watch_witnesses(witnessing)
    pool: WorkerPool | None = None
    background: list[asyncio.Task[None]] = []  # checkpoints of the log and the inventory
    # Handlers first: a SIGTERM that arrives right after "listening on" must still
    # stop the daemon gracefully (daemon.stop line, final checkpoint).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP puts a changed [policy] in force in every process (ca/daemon/reload.py).
    policies = control.PolicyFeed(config.policy)
    reloads: set[asyncio.Task[Any]] = set()  # held until done

    policy_watch: PolicyWatch | None = None  # cluster mode, once the store is open

    async def reload_and_compare() -> None:
        await reload_policy(config, policies, audit)
        await _compare_policy(policy_watch, policies)  # changed or not: said again

    def reload() -> None:
        task = loop.create_task(reload_and_compare())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def not_now() -> None:  # before daemon.start, or stopping: nothing to put in force
        log.warning("SIGHUP while the daemon starts or stops: nothing reloaded")
    loop.add_signal_handler(signal.SIGHUP, not_now)  # the default would end the process
    try:
        pipeline.start()
        # Its signatures (checkpoints, OCSP responses, its TLS certificate: two thirds of
        # the HSM's work) count in the HSM's metrics as the workers' do: they counted
        # only in hsmca_hsm_sign_calls_total (an operator's trial), and its reconnects
        # nowhere. Once its session is open: watched before, its hsmca_hsm_up stayed 0,
        # the lowest of all processes' (a docs trial).
        from ca.metrics import Metrics
        own_metrics = Metrics()
        own_metrics.watch(pipeline)
        from ca.revocation import COUNTED  # its own revocations (at start, unreleased)
        COUNTED.on_revoked = lambda kind, reason, n: own_metrics.child(
            own_metrics.revoked, kind, reason).inc(n)
        if store is None:
            store = open_store(config.store_location)
        await seed(config, store, pipeline)
        # One node: no finalize is under way before its start, so an order still
        # `processing` without a certificate was cut short by a kill before it issued;
        # its client finalizes again. (Several nodes: another may be finalizing it.)
        # One with a certificate is settled once the unreleased are revoked, below.
        if not clustered(store) and (reopened := await store.reopen_acme_finalizes()):
            log.warning("ACME orders cut short while finalizing are ready again",
                        orders=reopened)
        # Revocations the log records and the inventory lacks (a stop between the line
        # and the commit, or a backup copied between them) are completed before serving.
        if completed := await complete_from_log(config.audit_log, store, config.node or ""):
            log.warning("completed revocations the audit log records and the inventory "
                        "lacked (a stop between the two, or an inventory copied between "
                        "them)", lines=[e.seq for e in completed][:20],
                        serials=sorted({format(s, "x") for e in completed
                                        for s in e.serials})[:20])
        keys = await open_keyring(config, store, pipeline, generations)
        await _name_unknown_keys(store, pipeline, config.audit_log, audit, config.node)
        await write_bundle(config.bundle_pem, store)  # what the workers' TLS layer trusts
        # This host's copies of the public files follow the inventory: a key rotated
        # through another node, or while this host was away.
        await asyncio.to_thread(write_chain_files, config.root_pem.parent, keys.issuers)
        listener_cert(config, [i.cert for i in (await keys.refresh()).x509.values()])
        migrated = {} if store.migrated_from is None else {"schema_from": store.migrated_from}
        await audit.append("daemon.start", version=__version__, schema=store.schema_version,
                           **migrated, pid=os.getpid(), workers=count,
                           config_sha256=hashlib.sha256(config.path.read_bytes()).hexdigest())
        if isinstance(store, SQLiteStore):
            background.append(asyncio.create_task(_checkpoint_inventory(store)))
            background.append(asyncio.create_task(_check_inventory(store, generations)))
        if clustered(store):
            # A revocation or key change committed by any node reaches this node's
            # processes: NOTIFY at once, a poll if a notification is lost.
            if config.node is not None:
                policy_watch = PolicyWatch(store, config.node)
            store.watch_changes(_on_change(config, store, generations, keys, policy_watch))
            await _compare_policy(policy_watch, policies)
        issuance = Issuance(pipeline, store, keys, None, config.node)
        await ensure_server_cert(config, issuance)
        await _revoke_live_certs_of_compromised_keys(issuance, store, audit, generations,
                                                     policies)
        await _revoke_unreleased(issuance, store, audit, generations, policies, config.node,
                                 config.withheld_path)
        # An order left `processing` with a certificate of this node's log: one never
        # released was reopened just now, with its revocation; the others were released
        # before the stop, whose order was not said valid yet: valid now. (Before the
        # revocations, a review found, an unreleased one turned valid for a moment.)
        await store.complete_acme_finalizes(config.node)
        await _settle_tokens(store, audit)
        # OCSP responses are signed ahead of time, by this process, off every request's
        # path: new certificates within a second, every live one before nextUpdate.
        background.append(asyncio.create_task(_refresh_ocsp(
            issuance, store, policies, audit_metrics.ocsp_current.set_to_current_time)))
        background.append(asyncio.create_task(_refresh_crls(
            issuance, store, audit, generations, policies,
            lambda issuer, at: audit_metrics.crl_next_update.labels(issuer).set(at))))
        background.append(asyncio.create_task(_resume_log(audit)))
        background.append(asyncio.create_task(_erase_expired_eab_keys(store)))
        background.append(asyncio.create_task(_purge_acme_orders(store)))
        from ca.revocation import Revocations
        own_certs = OwnCerts(config, issuance, store, generations, audit_metrics, policies,
                             Revocations(store, audit, issuance, generations,
                                         _context_now(issuance, policies)))
        background.append(asyncio.create_task(own_certs.run()))
        if clustered(store):
            assert name_held is not None
            background.append(asyncio.create_task(_keep_node_name(
                name_held, store, stop.set, lambda: audit.size)))

        async def audit_keys() -> list[KeyInfo]:
            issuers = await keys.refresh()  # a rotation in a worker shows here
            return [issuers.audit, *issuers.audit_previous]

        checkpointer = Checkpointer(audit, pipeline, audit_keys, config.audit_origin,
                                    config.checkpoint_path,
                                    heartbeat=config.checkpoint_heartbeat_s,
                                    witnesses=witnessing,
                                    on_handover=publish_key(config.audit_key_pem),
                                    on_checkpoint=_publisher(config, store))
        # The daemon.start line gets a checkpoint before anyone can connect, so
        # /v1/audit/checkpoint always has one to serve.
        await checkpointer.checkpoint()
        address = _bound(placeholder)
        plain_address = _bound(plain_placeholder) if plain_placeholder is not None else None
        audit_metrics.workers.set(count)
        def workers(serving: int, silent: int) -> None:
            """The metrics, and /health's `workers` in each worker. /health reads the
            silent ones' count itself, not serving less answering: one word, not two
            written one after the other (a review saw "1 not answering" between)."""
            audit_metrics.workers_serving.set(serving)
            audit_metrics.workers_answering.set(serving - silent)
            generations.set_gauge("workers_silent", silent)
            generations.set_gauge("workers_serving", serving)
        generations.set_gauge("workers_wanted", count)
        pool = WorkerPool(config, address, count, audit, checkpointer,
                          generations, policies,
                          lambda reason: audit_metrics.worker_restarts.labels(reason).inc(),
                          workers, plain_address)
        await pool.start()
        placeholder.close()  # the workers hold the port now
        if plain_placeholder is not None:
            plain_placeholder.close()
            log.info("serving the CRLs and OCSP over plain HTTP too ([server] http-listen)",
                     http_url=f"http://{plain_address}")
        url = f"https://{address}"
        # Local admin commands (`hsmca token create --config ...`) find the daemon here,
        # whatever --listen chose.
        write_atomic(config.url_file, url + "\n")
        settle_heap()
        _say_little_room(config)
        print(f"listening on {url}", flush=True)
        # Which keys sign, by label, as `hsmca key list` names them: a key trial's starts
        # said nothing of it, while hsmca.toml's [keys] named keys long destroyed.
        issuers = await keys.refresh()
        log.info("listening", url=url, workers=count, pids=pool.pids, keys={
            "root": issuers.root_key.label, "issuing": issuers.current_x509,
            "ssh-user": issuers.current_ssh["user"], "ssh-host": issuers.current_ssh["host"],
            "audit": issuers.audit.label})
        background.append(asyncio.create_task(checkpointer.run()))
        # Once serving: a line found rewritten stops signing, as a log moved under
        # the daemon does, whatever the log's size (not a start that fails or not
        # depending on how far the check got).
        background.append(asyncio.create_task(_check_log_on_disk(audit)))
        def reload_all() -> None:  # the policy, and the daemon's own certificates
            reload()
            task = loop.create_task(own_certs.check())
            reloads.add(task)
            task.add_done_callback(reloads.discard)
        loop.add_signal_handler(signal.SIGHUP, reload_all)  # daemon.start is in the log
        await stop.wait()
        loop.add_signal_handler(signal.SIGHUP, not_now)
        # A reload under way is recorded before the last checkpoints, never after them.
        await asyncio.gather(*reloads, return_exceptions=True)
        log.info("stopping: the workers finish their requests")
        await pool.stop()  # stop accepting; in-flight requests finish
        await _cancel(background)
        await pipeline.drain()
        if name_held is not None and name_held.lost is not None:
            raise CLIError(name_held.lost)  # its log is another process's to write now
        log.info("stopping: the last checkpoints")
        # Everything served is signed over before the stop is recorded, so that an
        # auditor can tell a log cut back into the serving from one that merely lost
        # the stop's own lines: a checkpoint cannot cover its own signing.
        try:
            await checkpointer.checkpoint()
            await audit.append("daemon.stop", pid=os.getpid())
        except (AuditUnavailable, OSError) as exc:
            # Said so, not only the write's error (a full-disk trial read "cannot write
            # the audit log ...", exit 1, and wondered what the stop had left).
            raise CLIError(f"stopped, but the stop could not be recorded: {exc}. The next "
                           "start says the last run did not stop cleanly, and settles what "
                           "was under way") from None
        # Only a stop the log records removes the URL file: the next start tells a run
        # that ended otherwise by it (a stop that could not write its line left nothing
        # to say so; a fault trial).
        config.url_file.unlink(missing_ok=True)
        await checkpointer.checkpoint()
        await witnessing.drain(WITNESS_DRAIN_S)  # the final checkpoint, if they answer soon
        log.info("stopped")
    finally:
        placeholder.close()
        if plain_placeholder is not None:
            plain_placeholder.close()
        await _cancel(background)
        if pool is not None:
            await pool.stop()
            pool.close()
        metrics.release(config.local_dir)  # the workers are gone: their files are not read
        await pipeline.drain()
        await witnessing.close()
        pipeline.close()
        generations.close()
        audit.close()
        copy = audit.on_tiles
        if isinstance(copy, TileCopy) and not await asyncio.to_thread(copy.flush, TILE_COPY_S):
            # The next start copies what PostgreSQL lacks (ca/audit/cluster_tiles.py).
            log.warning("stopping before the audit log's last tiles reached PostgreSQL")
        if policy_watch is not None:
            try:  # (bounded: a database that stopped answering must not hold the stop)
                await asyncio.wait_for(policy_watch.withdraw(), WITHDRAW_S)
            except (StoreUnavailable, TimeoutError) as exc:  # its next start records it
                log.warning("cannot withdraw this node's [policy] from the comparison",
                            error=str(exc) or "no answer in time")
        if name_held is not None:
            name_held.close()
        if store is not None:
            store.close()
        if token_held is not None:  # the last: nothing of this run signs after it
            token_held.close()


# Below this, the start says so: about a day of a busy CA's audit lines and inventory
# rows (a full-disk trial's start with 64 KiB free said nothing, and signed for minutes).
LITTLE_ROOM = 256 << 20


def _say_little_room(config: Config) -> None:
    for where in dict.fromkeys((config.state_dir, config.audit_log.parent)):
        try:
            st = os.statvfs(where)
        except OSError:
            continue
        free = st.f_bavail * st.f_frsize
        if free < LITTLE_ROOM:
            log.warning("little room is left on the disk of the state directory: once it is "
                        "full nothing can be signed until room is made (the audit log and "
                        "the inventory grow with every certificate)", path=str(where),
                        free_mib=free >> 20)


INVENTORY_CHECKPOINT_S = 1.0
ACME_ORDER_KEPT = dt.timedelta(days=1)  # after an unvalidated order expired
ACME_PURGE_S = 3600.0
ACME_PURGE_BATCH = 200  # orders a transaction
ACME_PURGE_PACE_S = 0.05
INVENTORY_CHECK_S = 24 * 3600.0  # quick_check reads every page: 280 MB took 0.2 s cached, 6 s cold
TILE_COPY_S = 10.0  # how long a stop waits for the last tiles' copy to PostgreSQL
WITHDRAW_S = 3.0  # and for this node's [policy] record to be withdrawn


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _on_change(config: Config, store: PostgresStore, generations: Generations,
               keys: Keyring, policy_watch: PolicyWatch | None) -> Callable[[str], None]:
    """What a change another node committed means here (called on the store's thread):
    a revocation, this node's processes reload; a key change, the trust bundle of this
    host (another host's node rotated) is rewritten from the inventory first, and the
    public files of the keys in use after it; a node's [policy] recorded, the nodes'
    are compared again."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    failing = False  # said once per outage: the store marks keys moved at every retry

    async def keys_moved() -> None:
        nonlocal failing
        try:
            await write_bundle(config.bundle_pem, store)
        except Exception as exc:  # the processes reload anyway; the bundle next time
            if not failing:
                # (also after a reconnection: a key change may have come meanwhile)
                log.warning("cannot rewrite the trust bundle from the inventory; the next "
                            "key change or reconnection tries again", error=str(exc))
            failing = True
        else:
            if failing:  # said as the failure was (a cluster trial saw no end to it)
                log.info("the trust bundle is rewritten from the inventory again")
            failing = False
        generations.bump("keys")
        try:
            await asyncio.to_thread(write_chain_files, config.root_pem.parent,
                                    await keys.refresh())
        except Exception as exc:  # the next change, or the next start, writes them
            if not failing:
                log.warning("cannot rewrite the public key files after a key change",
                            error=str(exc))

    async def policy_recorded() -> None:
        assert policy_watch is not None
        try:
            await policy_watch.recheck()
        except StoreUnavailable:  # the next node's reload or start compares again
            pass

    def on_loop(name: str) -> None:
        if name == "policy":
            if policy_watch is None:
                return
            task = loop.create_task(policy_recorded())
        elif name == "keys":
            task = loop.create_task(keys_moved())
        else:
            if name in SLOTS:  # (a counter a newer release added means nothing here)
                generations.bump(name)
            return
        pending.add(task)
        task.add_done_callback(pending.discard)

    return lambda name: loop.call_soon_threadsafe(on_loop, name)


async def _settled(store: Store, node: str | None) -> bool:
    """Whether what this node's previous run recorded and did not commit never will be:
    always on one node (its process is gone); on several, when no session of its
    previous run is still running a statement (a cluster trial: a rotation killed on a
    node before its commit stood in that node's log for good)."""
    if not clustered(store) or node is None:
        return not clustered(store)
    from ca.store.postgres import PostgresStore
    try:
        return isinstance(store, PostgresStore) and await store.node_sessions_busy(node) == 0
    except StoreUnavailable:
        return False


async def _name_unknown_keys(store: Store, pipeline: SigningPipeline,
                             log_path: Path, audit: AuditLog, node: str | None) -> None:
    """A private key in the token that the inventory does not know is named at start:
    a rotation that died between its hsm.keygen line and its inventory row leaves one
    (hsmca never uses it, nor can it retire or destroy it), and so would a key put there
    by something else. A rotation or promotion this node's earlier run recorded and
    never committed is voided here, once it cannot commit any more (`_settled`): its
    line said a key was put in use that never was (a review, a cluster trial)."""
    records = await store.keys()
    known = {r.label for r in records if r.state != "destroyed"}
    recorded = {r.label for r in records}
    private = await pipeline.call(lambda hsm: hsm.key_labels())
    public = await pipeline.call(lambda hsm: hsm.key_labels(public=True))
    # (a destroyed key's public half, a destroy cut short between the two, is not one)
    for label in sorted(set(public) - set(private) - {r.label for r in records}):
        # A kill during a rotation's C_GenerateKeyPair (a crash trial): SoftHSM had
        # stored the public half alone. Nothing can sign with it; said, not removed.
        log.warning("the token holds a public key with no private key, which this CA's "
                    "inventory does not know: a key generation cut short (a rotation "
                    "killed while it made its key), or another application's public key. "
                    "hsmca never uses it; remove it with the HSM's own tools (pkcs11-tool "
                    "--delete-object --type pubkey --label LABEL) once you are sure whose "
                    "it is", label=label)
    settled = await _settled(store, node)
    for record in records:
        if record.state != "next" or not settled:
            continue
        for promoted in await asyncio.to_thread(promotions_never_committed, log_path,
                                                record.label):
            await void(audit, promoted["seq"], "key.rotate", "the promotion stopped before "
                       "the inventory took it (completed at the next start)",
                       promoted.get("request_id"))
            log.warning("a promotion of a staged key stopped between its audit line and its "
                        "inventory commit: its line is voided, and the key is still staged "
                        "(published, signing nothing); `hsmca key rotate` puts it in use",
                        label=record.label, line=promoted["seq"])
    for label in private:
        if label in known:
            continue
        rotated = _ROTATED_LABEL.fullmatch(label) is not None
        # Only this log's lines (this node's rotations), when they can no longer commit
        # (`_settled`); nor a key the inventory has a row for, in any state (a destroyed
        # one whose token was restored from a backup: a review)
        line = None
        if rotated and label not in recorded:
            line = await asyncio.to_thread(rotation_never_committed, log_path, label)
        if line is not None and not settled:
            log.warning("a rotation on this node stopped between its audit line and its "
                        "inventory commit, and a session of this node's earlier run still "
                        "runs a statement in PostgreSQL, so whether it commits cannot be "
                        "told yet: a start after it ends settles the line", label=label,
                        line=line["seq"])
        elif line is not None:
            await void(audit, line["seq"], line["event"], "the rotation stopped before the "
                       "inventory took its key (completed at the next start)",
                       line.get("request_id"))
            log.warning("a rotation stopped between its audit line and its inventory "
                        "commit: its line is voided, and the key it made is recorded "
                        "nowhere and never used; remove it with the HSM's own tools "
                        "(docs/keys.md), and rotate again if you still mean to",
                        label=label, line=line["seq"])
        elif rotated and (seq := await asyncio.to_thread(made_unrecorded, log_path, label)):
            # This log made it and never recorded the rotation: not an older backup's
            # (a full-disk trial was told to think of restoring one).
            log.warning("the token holds a key that a rotation made and stopped before it "
                        "recorded, or that lost to another rotation at once (its hsm.keygen "
                        "line, and no key.rotate line naming it that stands): hsmca never "
                        "uses it; remove it with the HSM's own tools (docs/keys.md)",
                        label=label, keygen_seq=seq)
        elif rotated and clustered(store):
            # Another node's, most likely: this node reads its own log alone (a cluster
            # trial's every start told of backups for keys that lost races elsewhere)
            log.warning("the token holds a key that an hsmca rotation made and the "
                        "inventory does not know, and this node's log does not say why: a "
                        "rotation on another node that lost to another at once or stopped "
                        "before it recorded (that node names it at its start), or an "
                        "inventory restored from a backup older than that rotation; "
                        "`hsmca audit show --node NODE` finds its hsm.keygen line, and hsmca "
                        "never uses the key", label=label)
        elif rotated:
            # Labelled as a rotation labels its keys: a rotation cut short, or an
            # inventory older than the key (a restore from a backup taken before a
            # rotation: the key may be the CA's current root or issuing key).
            log.warning("the token holds a key that an hsmca rotation made and this CA's "
                        "inventory does not know: a rotation cut short after its hsm.keygen "
                        "line, or an inventory restored from a backup older than that "
                        "rotation (then this key may be the CA's current one, and "
                        "certificates in use chain to it: restore the newest backup, and "
                        "never destroy the key before you know which)", label=label)
        else:
            log.warning("the token holds a private key this CA does not know (another "
                        "application's key, or one of hsmca's cut short); hsmca never "
                        "uses it, and it can be removed with the HSM's own tools once you "
                        "are sure whose it is", label=label)


# How `hsmca key rotate` and the root's rotation label new keys: KIND-YYYYMMDDhhmmss-xxxx.
_ROTATED_LABEL = re.compile(r"(root-ca|issuing-ca|ssh-user-ca|ssh-host-ca|audit)-"
                            r"\d{14}-[0-9a-f]{4}")


def _check_against_inventory(config: Config, lines: int) -> None:
    """A log shorter than the lines the inventory's certificates name was cut or
    replaced, even when its tiles and checkpoint went with it (the start's own checks
    compare the log with those): refuse to start on it, as on a log shorter than its
    checkpoint, and before opening it builds anything from it. (On a cluster,
    PostgreSQL is the record, and the file is made level with it first.) `lines`: the
    log's count, or below 0 when its tail cannot say (opening it will)."""
    from ca.store.sqlite import latest_audit_seq
    evidence = latest_audit_seq(config.db_path) if lines >= 0 else None
    if evidence is not None and evidence[0] >= lines:
        raise StartError(
            f"the audit log {config.audit_log} has {lines} lines, but the inventory "
            f"({config.db_path}) {evidence[1]}: the log was cut or replaced (tampering "
            "or loss). Refusing to start; restore the log and run `hsmca audit verify`")


def _pin_mark(source: str) -> tuple[int, int, int] | None:
    """What tells that the PIN source changed: the file's inode, size and time (an
    environment variable never changes under a running daemon)."""
    if not source.startswith("file:"):
        return None
    try:
        st = os.stat(source[5:])
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


async def _pin_changed(source: str, before: tuple[int, int, int] | None,
                       stopping: Callable[[], bool]) -> None:
    """Return once the PIN source is no longer as it was when the refused worker read
    it (`before`), or the daemon is stopping."""
    while not stopping():
        now = _pin_mark(source)
        if now is not None and now != before:
            return
        await asyncio.sleep(PIN_POLL_S)  # a poll of the file, not synchronisation


PIN_POLL_S = 2.0


def _worker_died(slot: int, status: int | None, local_dir: Path) -> str:
    """Why a worker that exited while starting did, as far as its status tells."""
    if status is None or status >= 0:
        return f"worker {slot} exited with status {status} while starting (its message is above)"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    if -status == signal.SIGBUS:  # a page of a memory-mapped file the disk had no room for
        free = shutil.disk_usage(local_dir).free if local_dir.exists() else None
        room = f" ({free // 1024} KiB free there)" if free is not None else ""
        return (f"worker {slot} was killed by SIGBUS while starting: it could not write a "
                f"memory-mapped file under {local_dir}; is that disk full{room}?")
    return f"worker {slot} was killed by {name} while starting"


async def _check_it_is_this_cas(config: Config, store: Store,
                                audit_key: Ed25519PublicKey) -> None:
    """Cluster mode, before this node writes a line to the database: it must hold this
    CA. A URL naming an empty database would otherwise get this node's log (and look
    taken to `init`); one naming another CA's got three lines of this node's HSM
    session as a log no checkpoint ever signed, on which every auditor of that CA then
    failed (a cluster trial). The state directory's audit key is one of the CA's audit
    keys in any state: it is replaced at each rotation, and they are never removed."""
    from ca.store_move import database_name
    keys = await store.keys()
    where = database_name(config.store_location)
    if not keys:
        raise StartError(f"the database {where} holds no CA (no keys): is [store] url in "
                         f"{config.path} the database `hsmca init --store-url` made the CA "
                         "in?")
    if spki_sha256(audit_key) not in {k.fingerprint for k in keys if k.kind == "audit"}:
        roots = [k for k in keys if k.kind == "root" and k.cert is not None]
        theirs = ""
        if roots:
            name = x509.load_der_x509_certificate(roots[0].cert).subject.rfc4514_string()
            theirs = f" (its root is {name!r})"
        raise StartError(f"the database {where} holds another CA{theirs}: this state "
                         f"directory's audit key ({config.audit_key_pem}) is none of its "
                         f"keys. Is [store] url in {config.path} this CA's database? "
                         "(nothing was written to it)")


async def _hold_node_name(config: Config, store: Store | None) -> Lease | None:
    """Cluster mode: the node's name, held in PostgreSQL for the life of this process
    (an advisory lock that goes with its connection). Two nodes of one name would
    write one log from two places; the second is refused before it writes a line."""
    if not clustered(store):
        return None
    lease = store.lease(f"node:{config.node}")
    if not await lease.try_take():
        lease.close()
        raise StartError(f"node {config.node!r} is already running (another `hsmca serve "
                         f"--node {config.node}` holds its name in PostgreSQL): give each "
                         "node its own name (an upgrade's pre-flight stops here: its "
                         "config was read and accepted, docs/operator.md)")
    # Before its log is read (the claim waits for a group of another process under way)
    assert config.node is not None  # (cluster mode: a node always has its name)
    if await store.claim_node(config.node, lease.token) and config.node_from_host:
        # A name is for good (its log is listed, followed and verified from then on):
        # a cluster trial's `serve` without --node made a node of the host's name for
        # good, and said nothing.
        log.warning("a new node, named after this host as no --node was given: its name "
                    "and its log are for good (docs/cluster.md); if that is not what you "
                    "meant, stop it now and start it with --node NAME", node=config.node)
    return lease


def _say_how_the_last_run_ended(config: Config, audit: AuditLog) -> None:
    """A start after a kill (or a host that went down) must not read like any other:
    the operator learns it from stderr, with how many signatures were then under way.
    The log says it by a `daemon.start` without its `daemon.stop`; a run longer than
    the lines read at start, by the URL file only a recorded stop removes."""
    run = audit.last_run
    if run.ended == "killed" or (run.ended == "unknown" and config.url_file.exists()):
        log.warning("the last run did not stop cleanly (killed, the host went down, its "
                    "start failed, or its stop could not be written to the audit log; or "
                    "this state directory is a backup taken while the daemon ran, where "
                    "that is expected): the signatures it had under way were never "
                    "released, and their intent lines stay without an outcome; `hsmca "
                    "audit verify` accepts that before a start", log=str(config.audit_log),
                    signatures_under_way=run.open_signatures)


def _refuse_a_changed_origin(config: Config) -> None:
    """A log keeps its checkpoint origin for good: a config trial changed `[audit]
    origin`, the start signed checkpoints of the new one into the log, and the log
    failed verification from then on, whichever origin the auditor gave, even once the
    setting was put back."""
    from ca.audit.note import NoteError, parse_checkpoint
    try:
        found = parse_checkpoint(config.checkpoint_path.read_text("utf-8")).origin
    except (OSError, UnicodeError, NoteError):
        return  # none yet, or unreadable: the log's own checks judge it
    if found == config.audit_origin:
        return
    suffix = f"/{config.node}" if config.node else ""
    if suffix and not found.endswith(suffix):
        return  # another node's or the ceremonies' log: sync_local_log says so
    raise StartError(
        f"[audit] origin in {config.path} is {config.audit_origin.removesuffix(suffix)!r}, "
        f"but this audit log's checkpoints are signed as {found.removesuffix(suffix)!r} "
        f"({config.checkpoint_path}): a log keeps its origin for good (auditors and "
        "witnesses know it by it, and a checkpoint of another origin in it fails its "
        f"verification). Set origin back to {found.removesuffix(suffix)!r}; the log is "
        "untouched")


def _open_audit(config: Config, audit_key: AuditKeys, store: Store | None,
                name: Lease | None = None) -> AuditLog:
    """The node's audit log; in cluster mode level with PostgreSQL first, and each
    group commit made durable there too (ca/audit/cluster.py). In cluster mode
    `audit_key` holds the previous audit key too while one is in use: another node's
    hand-over made the new key the state directory's, and this node's log, stopped
    during the rotation, ends with a checkpoint of the previous key alone."""
    if not clustered(store):
        from ca.audit.cluster import complete_lines
        _refuse_a_changed_origin(config)
        counted = complete_lines(config.audit_log)[0]
        _check_against_inventory(config, counted)  # before opening builds anything
        audit = AuditLog.open(config.audit_log, config.checkpoint_path, audit_key)
        if counted < 0:  # a torn tail could not be counted: once opening has cut it
            try:
                _check_against_inventory(config, audit.size)
            except BaseException:
                audit.close()
                raise
        return audit
    from ca.audit import cluster
    assert config.node is not None
    cluster.sync_local_log(config.audit_log, config.checkpoint_path, store, config.node,
                           config.audit_origin)
    _refuse_a_changed_origin(config)
    audit = AuditLog.open(config.audit_log, config.checkpoint_path, audit_key,
                          mirror=cluster.mirror(store, config.node, config.audit_log,
                                                (lambda: name.lost) if name else lambda: None))
    try:
        catch_up_tiles(audit, store, config.node)
    except BaseException:
        audit.close()
        raise
    audit.on_tiles = TileCopy(store, config.node)
    return audit


def _publisher(config: Config, store: Store | None
               ) -> Callable[[int, str], Awaitable[None]] | None:
    """Cluster mode: each checkpoint goes to PostgreSQL, whence every node serves it.
    One node: its size is noted in the inventory, for a start on a log cut back."""
    if isinstance(store, SQLiteStore):
        sqlite_store = store

        async def note(size: int, _text: str) -> None:
            try:
                await sqlite_store.note_audit_size(size)
            except StoreUnavailable:  # the next checkpoint notes it again
                pass
        return note
    if not clustered(store) or config.node is None:
        return None
    from ca.audit import cluster
    return cluster.publisher(store, config.node)


LOG_RETRY_S = 1.0


NAME_CHECK_S = 1.0
CLAIM_CHECK_ROUNDS = 10  # the claim asked every tenth round while the name is held


async def _keep_node_name(name: Lease, store: PostgresStore, stop: Callable[[], None],
                          lines: Callable[[], int]) -> None:
    """The node's name lock goes with its connection, so a restart of PostgreSQL drops
    it: take it again once the database is back. Another process may take it
    meanwhile, and claim the node's log (PostgresStore.claim_node): this one's groups
    are refused from then on. Once that process has written a line of the log, it is
    the node: this one stops (`lines()`: the lines this process's log holds). It used
    to go on once it had its name back: a PostgreSQL trial's twin (a copy of the state
    directory started as the same node) wrote lines meanwhile, and the first process
    wrote its own over them, deleting lines whose certificates had been released.

    A claim whose process wrote nothing is no reason to stop: a start that claimed and
    then failed (its port in use, its PIN refused: a fencing trial's running node
    stopped for it, and nobody served), or a root rotation's ceremony, which claims
    every node while it runs. Once the name is this process's again it claims anew
    and goes on."""
    node = name.name.removeprefix("node:")
    unsure, rounds = False, 0
    while True:
        await asyncio.sleep(NAME_CHECK_S)  # a check pace, not synchronisation
        rounds += 1
        held = await name.try_take()
        if held is None:  # its connection lost, as a restart of PostgreSQL ends it
            unsure = True
            continue
        if held and not unsure and rounds % CLAIM_CHECK_ROUNDS:
            continue
        unsure = not held
        # Not held (another session has it: maybe one of this process's own that
        # PostgreSQL has not seen end yet), held again after an outage, or now and then
        # (a group refused for a later claim): the claim and the log say what happened.
        try:
            claimed = await store.node_claimed(node)
            if claimed is not False:
                continue
            theirs = await store.audit_size(node)
            if theirs <= lines():  # claimed, and nothing written by the claimant
                if held:
                    await store.claim_node(node, name.token)
                    log.warning("another process claimed this node's log and wrote "
                                "nothing (a start that failed, or a root rotation's "
                                "ceremony); this node has its name back and goes on",
                                node=node)
                continue  # (not held: that process may still start; its first line says)
        except StoreUnavailable:
            continue  # asked again in a second
        name.lost = (
            f"another process took this node's name ({node}) and wrote its log (a second "
            f"`hsmca serve --node {node}`, or a copy of this state directory started as "
            "this node, while this one's sessions were gone): it is the node now, and "
            "this process stopped, writing and signing nothing more. Stop one of the two; "
            "to go on with this one, start it again once the other has stopped: it takes "
            "up the node's log as the other left it")
        log.error("another process holds this node's name: stopping", node=node)
        stop()
        return


async def _compare_policy(watch: PolicyWatch | None, policies: control.PolicyFeed) -> None:
    """Cluster mode: record the [policy] in force and say whether the other running
    nodes have the same (ca/cluster_policy.py)."""
    if watch is None:
        return
    try:
        await watch.publish(policies.current)
    except StoreUnavailable as exc:  # said at the next start or reload
        log.warning("cannot compare this node's [policy] with the other nodes'",
                    error=str(exc))


async def _resume_log(audit: AuditLog) -> None:
    """While the log cannot be written or committed (a full or read-only disk,
    PostgreSQL away), try again every second with a `log.resume` line, so the daemon
    is healthy again (and the outcome lines owed from failed writes are written) as
    soon as it can be, not only when the next request or heartbeat happens to write:
    a load balancer that took the node out on /health would otherwise send it none."""
    # Each error once while the outage lasts (every 10 minutes again), and its end once:
    # said at each change of text, a PostgreSQL outage whose libpq error alternated
    # between two wordings was logged at every other retry (a cluster trial).
    said = Recurring(log, "the audit log cannot be written: nothing is signed until it can",
                     "the audit log can be written again", level="error")
    while True:
        await asyncio.sleep(LOG_RETRY_S)  # a retry pace, not synchronisation
        await asyncio.to_thread(audit.watch_file)  # moved or replaced while idle
        problem = audit.problem
        if problem is None:
            said.ok()
            # damage put back before a write was refused: the line owed says it (not
            # `after: null`, should another batch write the owed line first: a review)
            if (problem := audit.resume_owed) is None:
                continue
        else:
            said.failed(problem)
        try:
            await audit.append("log.resume", after=problem)
        except Exception as exc:  # still away: the next try in a second
            log.debug("the audit log still cannot be committed", error=str(exc))


LOG_CHECK_PACE_S = 0.02  # between steps of a pass: a few ms of hashing each
LOG_CHECK_EVERY_S = 3600.0  # between passes


async def _check_log_on_disk(audit: AuditLog) -> None:
    """Read the log's lines under its tiles again, a step of a few bundles at a time,
    from the start and then hourly (`AuditLog.check_on_disk`): a start reads only the
    last bundle, and a line rewritten before it would otherwise be found only by an
    auditor's full run. While a rewritten line stops signing, its bundle is read
    again every second, so that signing resumes as soon as the line is put back."""
    bundle = 0
    loop = asyncio.get_running_loop()
    failing = False
    while True:
        try:
            bundle = await asyncio.to_thread(audit.check_on_disk, bundle)
        except Exception as exc:  # a read the disk failed, a tile index cut short: said
            # once, and tried again; it ended this task for good, unsaid, and damage found
            # before was never seen put back (a review)
            if not failing:
                log.error("the audit log's lines cannot be read again to check them; "
                          "trying again every second", error=f"{type(exc).__name__}: {exc}",
                          from_bundle=bundle)
            failing = True
            await asyncio.sleep(LOG_RETRY_S)  # a retry pace, not synchronisation
            continue
        if failing:
            failing = False
            log.warning("the audit log's lines are checked again")
        if audit.damaged_seq is not None:
            await asyncio.sleep(LOG_RETRY_S)  # a retry pace, not synchronisation
            continue
        # Between passes, a look every second: a line found rewritten as it was served
        # (AuditLog._check_served) is read again at the retry pace, not in an hour.
        until = loop.time() + (LOG_CHECK_PACE_S if bundle else LOG_CHECK_EVERY_S)
        while audit.damaged_seq is None and (left := until - loop.time()) > 0:
            await asyncio.sleep(min(left, LOG_RETRY_S))  # periodic work, not sync


OCSP_LEASE_S = 1.0
CRL_REFRESH_S = 300.0


def _context_now(issuance: Issuance, policies: control.PolicyFeed
                 ) -> Callable[[], Awaitable[ra.Context]]:
    """The registration authority's context as of each call: the policy in force, the
    keys the inventory holds."""
    async def context() -> ra.Context:
        return decision_context(policies.current, await issuance.keys.refresh())
    return context


async def _revoke_live_certs_of_compromised_keys(
        issuance: Issuance, store: Store, audit: AuditLog, generations: Generations,
        policies: control.PolicyFeed) -> None:
    """Before serving: a certificate still live whose key was revoked for keyCompromise
    is revoked too, as a keyCompromise revocation now does at once. Before, only its
    lineage went, and the first release recorded none: after an upgrade, an earlier
    certificate of a compromised key answered OCSP good and renewed (an upgrade
    trial)."""
    from ca.revocation import Revocations
    left = await store.live_certs_with_keys(await store.compromised_keys(), utcnow())
    if not left:
        return
    revocations = Revocations(store, audit, issuance, generations,
                              _context_now(issuance, policies))
    context = await _context_now(issuance, policies)()
    revoked: list[int] = []
    for serial in left:
        if serial in revoked:  # taken with an earlier one's reach
            continue
        order = ra.order(context, ra.Local(), ra.RevokeRequest(serial, "keyCompromise"))
        try:
            revoked += (await revocations.revoke(order, None)).serials
        except Refused as exc:
            if exc.reason is not Reason.ALREADY_REVOKED:  # revoked meanwhile (another node)
                raise
    log.warning("revoked live certificates of keys revoked for keyCompromise (left live "
                "by an older release, which revoked only their lineage)",
                serials=[format(s, "x") for s in sorted(revoked)][:20], count=len(revoked))


async def _settle_tokens(store: Store, audit: AuditLog) -> None:
    """After a kill, once the unreleased are revoked (their tokens given back): a token
    whose certificate the last runs released is recorded as released, so a retry with
    the same key gets that certificate, and (one node: no enrollment is under way
    elsewhere) a token spent on nothing is given back. A chaos trial: of 76 enrollments
    a kill left unanswered, 15 retries were told the token was spent."""
    run = audit.last_run
    since, asked = None, run.enrolled
    if not clustered(store):
        first, earlier = await asyncio.to_thread(audit.earlier_runs)
        asked = (*asked, *earlier)
        try:
            since = dt.datetime.fromisoformat((first or run.since or "").replace("Z", "+00:00"))
        except ValueError:
            since = None
    if not run.released and since is None:
        return
    marked, given = await store.settle_tokens(run.released, since, dt.datetime.now(dt.UTC),
                                              asked)
    if marked or given:
        log.warning("bootstrap tokens a kill left spent are settled: a retry with the same "
                    "key gets its certificate, or enrolls", released=marked, given_back=given)


async def _revoke_unreleased(issuance: Issuance, store: Store, audit: AuditLog,
                             generations: Generations, policies: control.PolicyFeed,
                             node: str | None, withheld_path: Path) -> None:
    """Before serving: what the runs since the last clean stop signed and never released
    and the inventory holds is revoked (ca/revocation/unreleased.py), and what a run
    withheld after its "ok" outcome (ca/issuance/withheld.py), whose file then goes."""
    from ca.issuance.withheld import read_withheld
    from ca.revocation import Revocations
    from ca.revocation.unreleased import revoke_unreleased
    withheld = await asyncio.to_thread(read_withheld, withheld_path)
    items = list(dict.fromkeys([*audit.last_run.unreleased, *withheld]))
    if items:
        context = _context_now(issuance, policies)
        revoked = await revoke_unreleased(
            items, store, audit, Revocations(store, audit, issuance, generations, context),
            context, node)
        if revoked:
            log.warning("revoked certificates signed but never released (their outcome "
                        "lines were never written, or say released: false, or they were "
                        "withheld); nobody holds them", serials=revoked)
    if withheld:  # each revoked, or not the inventory's to revoke: done with
        withheld_path.unlink(missing_ok=True)


async def _refresh_crls(issuance: Issuance, store: Store, audit: AuditLog,
                        generations: Generations, policies: control.PolicyFeed,
                        next_update: Callable[[str, float], None]) -> None:
    """Every CRL that still signs (each issuing CA's, the root's) re-signed by the CA
    itself before half its validity has passed, so a relying party's GET is served from
    the inventory without a signature (SPEC 7: re-signed before nextUpdate, whether
    anyone asks or not). A revocation re-signs at once, as before; only a GET that
    finds its CRL stale all the same (this task behind, or a re-signing that failed
    while the HSM was away) re-signs it, or serves the last one while it is valid."""
    from ca.revocation import Revocations
    revocations = Revocations(store, audit, issuance, generations,
                              _context_now(issuance, policies))
    watched: set[str] = set()
    while True:
        issuers = await issuance.keys.refresh()
        signing = issuers.crl_labels()
        for gone in watched - set(signing):  # retired: its series says so, not a date
            next_update(gone, float("nan"))
        watched = set(signing)
        for label in signing:
            try:
                await revocations.refresh_crl(None, label, only_if_stale=True)
            except Exception as exc:  # the HSM or the log away: the next round, or a GET
                log.warning("cannot re-sign a CRL now", issuer=label,
                            error=str(exc) or type(exc).__name__)
            try:  # what relying parties hold until (hsmca_crl_next_update_...)
                if (kept := await store.latest_crl(label)) is not None:
                    next_update(label, x509.load_der_x509_crl(kept.der)
                                .next_update_utc.timestamp())
            except Exception:  # a metric must never end the re-signing (a review)
                pass  # (the inventory away: said above and by /health)
        await asyncio.sleep(CRL_REFRESH_S)  # periodic work, not synchronisation


async def _every(interval_s: float, failing: Recurring,
                 round_: Callable[[], Awaitable[None]]) -> None:
    """`round_` at start and then every `interval_s`, for good: a round that fails (the
    database away) is said through `failing` and tried at the next."""
    while True:
        try:
            await round_()
        except Exception as exc:
            failing.failed(str(exc) or type(exc).__name__)
        else:
            failing.ok()
        await asyncio.sleep(interval_s)  # periodic work, not synchronisation


async def _purge_acme_orders(store: Store) -> None:
    """Orders that never became valid are deleted a day after they expired, with their
    authorizations and challenges (hourly, in batches): kept for good, an account's
    unvalidated orders grew the inventory without bound (a security trial). Valid orders
    stay with the certificates that name them."""
    async def purge() -> None:
        before = (utcnow() - ACME_ORDER_KEPT).isoformat()
        deleted = 0
        # Small batches with a pause: the first round after an upgrade may find weeks of
        # orders, and one long transaction held SQLite's write lock against every
        # worker's commits (a review).
        while (n := await store.purge_acme_orders(before, ACME_PURGE_BATCH)) > 0:
            deleted += n
            await asyncio.sleep(ACME_PURGE_PACE_S)  # pacing, not synchronisation
        if deleted:
            log.info("expired acme orders deleted", orders=deleted)
    await _every(ACME_PURGE_S, Recurring(log, "cannot delete expired ACME orders now",
                                         "expired ACME orders can be deleted again"), purge)


async def _erase_expired_eab_keys(store: Store) -> None:
    """An ACME EAB key that expired unbound can bind nothing: its MAC key is erased, as
    a used or withdrawn one's is, at start and then every CRL_REFRESH_S (docs/security.md:
    kept only while it can bind an account). Its state still reads expired."""
    async def erase() -> None:
        if erased := await store.erase_expired_acme_eab_keys(utcnow()):
            log.info("acme eab keys expired unbound: their MAC keys are erased", kids=erased)
    await _every(CRL_REFRESH_S, Recurring(log, "cannot erase expired EAB keys now",
                                          "expired EAB keys can be erased again"), erase)


async def _refresh_ocsp(issuance: Issuance, store: Store, policies: control.PolicyFeed,
                        on_current: Callable[[], None]) -> None:
    """Pre-sign OCSP responses, as the registration authority orders them. In cluster
    mode one node at a time does it: the one holding the lease (an advisory lock that
    dies with its holder's connection)."""
    refresher = OCSPRefresher(OCSPSigner(issuance, _context_now(issuance, policies)),
                              on_current=on_current)
    if not clustered(store):
        await refresher.run()
        return
    lease = store.lease("ocsp-refresh")
    try:
        while True:
            if await lease.try_take():
                # Said, so that an operator can tell which node signs them (and that one
                # took over when another went away).
                log.info("this node pre-signs the OCSP responses now (it holds the lease)")
                task = asyncio.create_task(refresher.run())
                stopping = False
                try:
                    while await lease.try_take():
                        await asyncio.sleep(OCSP_LEASE_S)  # periodic check, not sync
                except asyncio.CancelledError:
                    stopping = True  # (the node stops: nothing lost, nothing to say)
                    raise
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    if not stopping:
                        log.info("this node no longer pre-signs the OCSP responses (the "
                                 "lease is lost: the database away, or another node "
                                 "holds it)")
            await asyncio.sleep(OCSP_LEASE_S)  # another node holds it: ask again later
    finally:
        lease.close()


async def _checkpoint_inventory(store: SQLiteStore) -> None:
    """The workers leave the inventory's WAL to the primary (see Store): copy it into
    the database every second, in a thread, never in a worker's commit."""
    failing = Recurring(log, "inventory checkpoint failed; retrying every second",
                        "inventory checkpoints work again")
    while True:
        await asyncio.sleep(INVENTORY_CHECKPOINT_S)  # periodic work, not synchronisation
        try:
            await asyncio.to_thread(store.wal_checkpoint)
        except (sqlite3.Error, StoreUnavailable) as exc:  # the latter: the file replaced
            failing.failed(str(exc))
        else:
            failing.ok()


async def _check_inventory(store: SQLiteStore, generations: Generations) -> None:
    """Every page of the inventory read once at start and then daily (SQLite's
    quick_check, in a thread): a damaged page is said in the log and by every worker's
    /health (503) at once, not when a request first reads it, which may be a revocation
    check. The daemon goes on serving what it can read, and signs nothing more, whose
    record would go into the damaged file; the way back is a restore."""
    async def check() -> None:
        damage = await asyncio.to_thread(store.find_damage)
        if damage is not None and not generations.gauge("inventory_damaged"):
            store.note_damage(damage)  # the primary's own signatures (OCSP, CRLs) stop
            generations.set_gauge("inventory_damaged", 1)  # and the workers' (their stores)
            log.error(str(damaged_error(store.path, damage)))
    await _every(INVENTORY_CHECK_S, Recurring(log, "cannot check the inventory now",
                                              "the inventory is checked"), check)


def main(config: Config, listen: str | None, workers: int | None = None) -> int:
    keep_memory_in()  # before the token is logged in to (ca/process.py says why)
    # pg_stat_activity names the node and the process (the workers name themselves).
    os.environ["PGAPPNAME"] = f"hsmca {config.node or 'serve'} primary"
    # The daemon's start, for its workers (they inherit it): a bootstrap token marked
    # spent before it is a kill's left-over, not one being spent (x509_routes; a review
    # found a worker restarted after the mark saying otherwise than its sibling).
    os.environ[DAEMON_STARTED] = dt.datetime.now(dt.UTC).isoformat()
    try:
        asyncio.run(serve(config, listen, workers))
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return 0
