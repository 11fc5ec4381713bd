"""The audit log as a worker process sees it: a link to the primary's recorder.

It is the worker's audit sink (ca/issuance/pipeline.py) and its HSM's operation
log (hsm/oplog.py). The signing thread's intents and outcomes go over a channel of
their own, synchronously (`append_durable`: send, wait for the seqs), so a group of
signatures costs two round trips and no thread hand-off. Everything else (`record`,
`append`, the auditor endpoints' questions) goes through a link thread on a second
channel, which sends whatever was asked while its last round trip ran in one write.
Messages are typed (ca/audit/wire.py).

If the primary goes away, nothing can be recorded any more, so nothing may be
signed: the worker process exits at once (`on_lost`).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from ca import ipc
from ca.audit import wire
from ca.handoff import (
    STOP,
    Batch,
    Coalescer,
    Settled,
    Sink,
    async_sink,
    claim,
    drain_queue,
    stop_thread,
)
from ca.logs import logging_thread
from hsm.errors import AuditUnavailable

ANSWER_TIMEOUT_S = 60.0
R = TypeVar("R")
_replies: ipc.Decoder[wire.Reply] = ipc.Decoder(wire.Reply)


class RecorderRefused(ValueError):
    """The recorder refused a question (e.g. a proof for a size the log has not got)."""


class AuditUnreadable(AuditUnavailable):
    """The recorder could not answer a question from the log (a tile damaged since the
    start, a disk read that failed): the reason names what, and says nothing of
    signing, which may go on."""


class AuditLink:
    def __init__(self, sign_channel: socket.socket, channel: socket.socket,
                 on_lost: Callable[[str], None]) -> None:
        # The recorder answers in milliseconds; one that has not in a minute is stuck,
        # and waiting longer would only hang every signature of this worker.
        for sock in (sign_channel, channel):
            sock.settimeout(ANSWER_TIMEOUT_S)
        self._sign = sign_channel
        self._sign_lock = threading.Lock()
        self._asked_at: float | None = None  # monotonic time of the unanswered append
        self._round_at: float | None = None  # and of the link thread's unanswered round
        self._chan = channel
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._durable = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self.problem: str | None = None  # why the link to the primary was lost, if it was
        self._thread = logging_thread(self._link, "audit-link")
        self._thread.start()

    # ---- the audit sink ---------------------------------------------------------------

    def stuck_for(self) -> float:
        """Seconds the append under way has waited for the recorder (0: none waits). It
        answers in milliseconds; one that has not in seconds is stopped or stuck, and
        new signatures are refused at once meanwhile rather than queued behind it."""
        asked = self._asked_at
        return 0.0 if asked is None else time.monotonic() - asked

    def waited(self) -> float:
        """Seconds the oldest write under way has waited for the recorder
        (0: none waits). The recorder answers nothing while a group commit waits for its
        disk or PostgreSQL, so /health says that, not that the primary is gone."""
        started = [t for t in (self._asked_at, self._round_at) if t is not None]
        return time.monotonic() - min(started) if started else 0.0

    def durable_size(self) -> int:
        """The recorder hands out a seq only once its line is durable, and lines are
        appended in seq order: everything below the highest seq seen is durable."""
        return self._durable

    def append_durable(self, entries: Sequence[tuple[str, Mapping[str, Any]]]
                       ) -> list[Settled[int]]:
        try:
            frame = ipc.encode(wire.Append(0, [wire.Line(e, dict(f)) for e, f in entries]))
        except (TypeError, ValueError, OverflowError) as exc:  # a caller's bug: not plain data
            return [_failed(exc) for _ in entries]
        with self._sign_lock:
            self._asked_at = time.monotonic()
            try:
                ipc.send_frame(self._sign, frame)
                reply = _replies.recv(self._sign)
                if not isinstance(reply, wire.Appended) or len(reply.seqs) != len(entries):
                    raise ipc.ChannelClosed(f"an answer that does not fit: {type(reply)}")
            except ipc.ChannelClosed as exc:  # gone, stuck, or garbled
                self._lost(str(exc))
                gone = AuditUnavailable("the audit log's writer (the primary process) is gone")
                return [_failed(gone) for _ in entries]
            finally:
                self._asked_at = None
        return [self._settled(seq, err) for seq, err in zip(reply.seqs, reply.errors,
                                                            strict=True)]

    def record(self, event: str, fields: Mapping[str, Any]) -> cf.Future[int]:
        fut: cf.Future[int] = cf.Future()
        self._queue.put((_append_of(event, fields), fut))
        return fut

    async def append(self, event: str, **fields: Any) -> int:
        return await self._ask(_append_of(event, fields), int)

    # ---- questions for the recorder ------------------------------------------------------

    async def read(self, start: int, limit: int) -> bytes:
        return (await self._ask(wire.ReadLines(0, start, limit), wire.Lines)).data

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return (await self._ask(wire.InclusionProof(0, index, size), wire.Proof)).hashes

    async def consistency_proof(self, old: int, size: int) -> list[bytes]:
        return (await self._ask(wire.ConsistencyProof(0, old, size), wire.Proof)).hashes

    async def tile(self, level: int, index: int, width: int) -> bytes | None:
        return (await self._ask(wire.ReadTile(0, level, index, width), wire.Blob)).data

    async def entries(self, index: int, width: int) -> bytes | None:
        return (await self._ask(wire.ReadEntries(0, index, width), wire.Blob)).data

    async def checkpoint(self, cosigned: bool = False) -> str | None:
        return (await self._ask(wire.AskCheckpoint(0, cosigned), wire.Checkpoint)).text

    async def witnesses(self) -> str:
        """Where each witness stands, as JSON (ca.audit.witnessing `report`)."""
        return (await self._ask(wire.AskWitnesses(0), wire.WitnessReport)).text

    async def health(self) -> wire.Health:
        return await self._ask(wire.AskHealth(0), wire.Health)

    async def _ask(self, message: Any, kind: type[R]) -> R:
        fut, sink = async_sink()
        self._coalescer.put(sink[0], (message, sink))
        reply = await fut
        if isinstance(reply, wire.Refused):
            raise RecorderRefused(reply.reason)
        if isinstance(reply, wire.Broken):
            raise AuditUnreadable(reply.reason)
        if not isinstance(reply, kind):
            raise AuditUnavailable(f"the recorder answered {type(reply).__name__}")
        return reply

    def close(self) -> None:
        stop_thread(self._thread, self._queue)
        for sock in (self._sign, self._chan):
            sock.close()

    # ---- the link thread ----------------------------------------------------------------

    def _seen(self, seq: int) -> None:
        if seq >= self._durable:
            self._durable = seq + 1

    def _settled(self, seq: int | None, error: wire.Failure | None) -> Settled[int]:
        if error is None and seq is not None:
            self._seen(seq)
            return Settled.of(seq)
        return Settled.failed(_error(error))

    def _link(self) -> None:
        while True:
            items = drain_queue(self._queue, self._queue.get())
            stop = any(item is STOP for item in items)
            jobs: dict[int, Sink] = {}
            out = bytearray()
            results = Batch()
            for item in items:
                if item is STOP:
                    continue
                message, sink = item
                if not claim(sink):
                    continue
                req_id = next(self._ids)
                try:
                    out += ipc.encode(msg_with_id(message, req_id))
                except (TypeError, ValueError, OverflowError) as exc:  # a caller's bug
                    results.fail(sink, exc)  # not plain data: refused alone
                    continue
                jobs[req_id] = sink
            # (a round of questions alone waits as long, but is not a write that waits)
            self._round_at = time.monotonic() if any(
                isinstance(item, tuple) and isinstance(item[0], wire.Append)
                for item in items) else None
            try:
                if out:
                    self._chan.sendall(out)
                while jobs:
                    reply = _replies.recv(self._chan)
                    sink = jobs.pop(reply.id)
                    if not isinstance(reply, wire.Appended):
                        results.ok(sink, reply)
                        continue
                    settled = self._settled(reply.seqs[0], reply.errors[0])
                    if settled.exception() is None:
                        results.ok(sink, settled.result())
                    else:
                        results.fail(sink, settled.exception())  # type: ignore[arg-type]
            except (OSError, KeyError, IndexError) as exc:  # gone, or garbled
                for sink in jobs.values():
                    results.fail(sink, AuditUnavailable("the audit log's writer (the primary "
                                                        "process) is gone"))
                results.flush()
                self._lost(str(exc))
                return
            self._round_at = None
            results.flush()
            if stop:
                return

    def _lost(self, why: str) -> None:
        self.problem = f"lost the primary process: {why}"
        self._on_lost(self.problem)


def _append_of(event: str, fields: Mapping[str, Any]) -> wire.Append:
    return wire.Append(0, [wire.Line(event, dict(fields))])


def msg_with_id(message: Any, req_id: int) -> Any:
    """The message with its request id (they are frozen structs)."""
    return msgspec.structs.replace(message, id=req_id)


def _failed(exc: BaseException) -> Settled[int]:
    return Settled.failed(exc)


def _error(failure: wire.Failure | None) -> Exception:
    if failure is None:
        return AuditUnavailable("the recorder gave no seq")
    if failure.kind == "unavailable":
        return AuditUnavailable(failure.detail)
    return ValueError(failure.detail)
