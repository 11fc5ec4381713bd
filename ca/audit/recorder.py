"""The primary's end of the workers' audit channels.

Worker processes do the HTTP, TLS and signing; the primary alone writes the audit
log (one writer: docs/audit-log.md). A worker sends its lines here; this thread
gathers what every worker sent while the last commit ran, writes it all in one
group commit, and answers each worker with the seq (or the typed failure) of each
line. It also answers the auditor endpoints' questions about the log (entries,
sizes, proofs, C2SP tiles and entry bundles, the latest checkpoint) for the
workers that serve them. Messages are typed (ca/audit/wire.py).

It keeps the open signatures of each worker: if a worker dies between an intent
and its outcome, the outcome is written here (`WorkerLost`, never released), so
the log still pairs every intent with an outcome.
"""

from __future__ import annotations

import os
import queue
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ca import ipc
from ca.audit import wire
from ca.audit.log import AuditLog
from ca.audit.tiles import TileDamaged
from hsm.errors import AuditUnavailable

log = structlog.get_logger("hsmca.recorder")
_requests: ipc.Decoder[wire.Request] = ipc.Decoder(wire.Request)
MAX_ENTRIES = 1000  # lines per page of /v1/audit/entries


@dataclass
class _Worker:
    """One worker process, from its attach to the loss of its last channel. Keyed by
    a number of its own, never by the slot: a restarted worker shares the slot of the
    one it replaces, whose channels may not all be drained yet."""

    slot: int
    channels: int
    open_ops: dict[str, None] = field(default_factory=dict)  # op_id -> None, in order


@dataclass
class _Channel:
    sock: socket.socket
    worker: int  # key of _Worker
    reader: ipc.FrameReader[wire.Request] = field(
        default_factory=lambda: ipc.FrameReader(_requests))


class Recorder:
    def __init__(self, audit: AuditLog, latest_checkpoint: Callable[[], str | None],
                 on_lost: Callable[[int, int], None] | None = None, *,
                 latest_cosigned: Callable[[], str | None] = lambda: None,
                 witnesses: Callable[[], str] = lambda: '{"witnesses": []}',
                 checkpoint_trouble: Callable[[], str | None] = lambda: None) -> None:
        self.audit = audit
        self._checkpoint_trouble = checkpoint_trouble
        self._latest_checkpoint = latest_checkpoint
        self._latest_cosigned = latest_cosigned
        self._witnesses = witnesses
        # Called on this thread with (worker slot, signatures closed as WorkerLost)
        # once a worker's channels are all gone.
        self._on_lost = on_lost
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers: dict[int, _Worker] = {}
        self._attached = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    # ---- called from the event loop -----------------------------------------------------

    def attach(self, worker: int, socks: list[socket.socket]) -> None:
        """Serve a (new) worker's channels."""
        self._todo.put(("attach", worker, socks))
        self._wake_w.send(b"x")

    def close(self) -> None:
        if self._thread.is_alive():
            self._todo.put(("stop",))
            self._wake_w.send(b"x")
            self._thread.join()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                appends: list[tuple[_Channel, wire.Append]] = []
                for key, _ in self._sel.select():
                    if key.data is None:
                        self._wake_r.recv(4096)
                        self._do_todo()
                        continue
                    self._read(key.data, appends)
                if appends:
                    self._commit(appends)
        except BaseException:
            # Without this thread no worker can record anything, and each would wait
            # for an answer forever: stop the whole daemon (the workers die with the
            # primary; the log is recovered at the next start).
            log.exception("the recorder failed; stopping the daemon")
            os._exit(70)
        for key in list(self._sel.get_map().values()):
            if key.data is not None:
                key.data.sock.close()

    def _do_todo(self) -> None:
        while True:
            try:
                item = self._todo.get_nowait()
            except queue.Empty:
                return
            if item[0] == "stop":
                self._stopping = True
                continue
            _, slot, socks = item
            self._attached += 1
            self._workers[self._attached] = _Worker(slot, len(socks))
            for sock in socks:
                sock.setblocking(True)
                sock.settimeout(30)  # a worker that stops reading must not stall the rest
                self._sel.register(sock, selectors.EVENT_READ,
                                   _Channel(sock, self._attached))

    def _read(self, chan: _Channel, appends: list[tuple[_Channel, wire.Append]]) -> None:
        try:
            data = chan.sock.recv(1 << 20)
            messages = chan.reader.feed(data) if data else None
        except OSError:  # ChannelClosed, or a frame that is not a message
            messages = None
        if messages is None:  # the worker closed its end (it exited), or talks nonsense
            self._drop(chan)
            return
        for msg in messages:
            if isinstance(msg, wire.Append):
                appends.append((chan, msg))
            else:
                self._reply(chan, self._answer(msg))

    def _drop(self, chan: _Channel) -> None:
        if chan.sock.fileno() < 0:
            return  # dropped already
        self._sel.unregister(chan.sock)
        chan.sock.close()
        self._channel_lost(chan.worker)

    def _answer(self, msg: wire.Request) -> wire.Reply:
        try:
            return self._answer_from_log(msg)
        except (TileDamaged, OSError) as exc:
            # The tiles changed under the running daemon (it checked them at start), or
            # the disk failed a read: say so to the asker, and keep serving the others.
            log.error("cannot answer from the audit log", error=str(exc))
            return wire.Broken(msg.id, str(exc))

    def _answer_from_log(self, msg: wire.Request) -> wire.Reply:
        audit = self.audit
        if isinstance(msg, wire.AskHealth):
            trouble = self._checkpoint_trouble()
            # A commit of the primary's own lines (a checkpoint's, an OCSP response's)
            # waiting on PostgreSQL left this thread free to answer "ok" (a CI run's
            # flaky /health test): a write waiting is said whoever's it is.
            if trouble is None and (waited := audit.write_waited()) >= wire.WRITE_WAIT_SAID_S:
                trouble = wire.write_waits(waited)
            return wire.Health(msg.id, audit.healthy and trouble is None,
                               audit.problem or trouble, audit.size, audit.damaged_seq,
                               audit.changed_on_disk)
        if isinstance(msg, wire.AskCheckpoint):
            return wire.Checkpoint(msg.id, self._latest_cosigned() if msg.cosigned
                                   else self._latest_checkpoint())
        if isinstance(msg, wire.AskWitnesses):
            return wire.WitnessReport(msg.id, self._witnesses())
        if isinstance(msg, wire.ReadLines):
            return wire.Lines(msg.id, audit.read_lines(msg.start, min(msg.limit, MAX_ENTRIES)))
        if isinstance(msg, wire.InclusionProof):
            if not 0 <= msg.index < msg.size <= audit.size:
                return wire.Refused(msg.id, f"need 0 <= index < size <= {audit.size} (the "
                                            "log's current size)")
            return wire.Proof(msg.id, audit.inclusion_proof(msg.index, msg.size))
        if isinstance(msg, wire.ConsistencyProof):
            if not 0 < msg.old <= msg.size <= audit.size:
                return wire.Refused(msg.id, f"need 0 < old <= size <= {audit.size} (the log's "
                                            "current size)")
            return wire.Proof(msg.id, audit.consistency_proof(msg.old, msg.size))
        if isinstance(msg, wire.ReadTile):
            return wire.Blob(msg.id, audit.read_tile(msg.level, msg.index, msg.width))
        if isinstance(msg, wire.ReadEntries):
            return wire.Blob(msg.id, audit.read_entries(msg.index, msg.width))
        return wire.Refused(msg.id, f"unknown recorder request {type(msg).__name__}")

    def _commit(self, appends: list[tuple[_Channel, wire.Append]]) -> None:
        """One group commit for every line the workers sent this round."""
        entries = [(line.event, line.fields) for _, msg in appends for line in msg.lines]
        futs = self.audit.append_durable(entries)
        pos = 0
        for chan, msg in appends:
            n = len(msg.lines)
            seqs: list[int | None] = []
            errors: list[wire.Failure | None] = []
            state = self._workers.get(chan.worker)
            open_ops = state.open_ops if state is not None else {}
            for (event, fields), fut in zip(entries[pos:pos + n], futs[pos:pos + n],
                                            strict=True):
                exc = fut.exception()
                seqs.append(None if exc else fut.result())
                errors.append(None if exc is None else (
                    wire.Failure("unavailable", str(exc)) if isinstance(exc, AuditUnavailable)
                    else wire.Failure("invalid", f"{type(exc).__name__}: {exc}")))
                if event == "hsm.sign":
                    op_id = fields.get("op_id")
                    if fields.get("phase") == "intent" and exc is None:
                        open_ops[op_id] = None
                    elif fields.get("phase") == "outcome":
                        # Written, or owed by the log if the disk refused it: closed.
                        open_ops.pop(op_id, None)
            pos += n
            self._reply(chan, wire.Appended(msg.id, seqs, errors))

    def _reply(self, chan: _Channel, message: wire.Reply) -> None:
        if chan.sock.fileno() < 0:
            return
        try:
            chan.sock.sendall(ipc.encode(message))
        except OSError as exc:
            # Gone, or not reading for 30 s: part of a frame may have been sent, so the
            # channel cannot be trusted again. The worker finds it closed and exits.
            log.error("dropping a worker channel that does not take answers",
                      error=str(exc))
            self._drop(chan)

    def _channel_lost(self, worker: int) -> None:
        state = self._workers.get(worker)
        if state is None:
            return
        state.channels -= 1
        if state.channels > 0:
            return
        del self._workers[worker]
        if state.open_ops:
            self._close_open(state)
        if self._on_lost is not None:
            self._on_lost(state.slot, len(state.open_ops))

    def _close_open(self, state: _Worker) -> None:
        # The worker died between intents and their outcomes. Whatever it signed was
        # never released (a result leaves only after its outcome is durable), so the
        # log says so, and verifies without a restart to excuse the open intents.
        lost = [("hsm.sign", {"phase": "outcome", "op_id": op_id, "result": "WorkerLost",
                              "released": False, "worker": state.slot})
                for op_id in state.open_ops]
        for fut in self.audit.append_durable(lost):
            if fut.exception() is not None:  # owed by the log, written once it can
                log.error("cannot record the outcomes of a lost worker yet",
                          worker=state.slot, error=str(fut.exception()))
                break
        log.warning("a worker exited with signatures under way", worker=state.slot,
                    closed=len(lost))
