"""The audit log as a worker process sees it: a link to the primary's recorder.

It satisfies the HSM layer's OpLog. The HSM thread's intents and outcomes go over a
channel of their own, synchronously (`append_durable`: send, wait for the seqs), so
a group of signatures costs two round trips and no thread hand-off. Everything
else (`record`, `record_async`, the auditor endpoints' questions) goes through a
link thread on a second channel, which sends whatever was asked while its last
round trip ran in one write.

If the primary goes away, nothing can be recorded any more, so nothing may be
signed: the worker process exits at once (`on_lost`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import queue
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ca import ipc
from hsm.completion import STOP, Batch, Coalescer, Sink, async_sink, claim, drain_queue, stop_thread
from hsm.errors import AuditUnavailable

ANSWER_TIMEOUT_S = 60.0


class RecorderRefused(ValueError):
    """The recorder refused a question (e.g. a proof for a size the log has not got)."""


class AuditLink:
    def __init__(self, sign_channel: socket.socket, channel: socket.socket,
                 on_lost: Callable[[str], None]) -> None:
        # The recorder answers in milliseconds; one that has not in a minute is stuck,
        # and waiting longer would only hang every signature of this worker.
        for sock in (sign_channel, channel):
            sock.settimeout(ANSWER_TIMEOUT_S)
        self._sign = sign_channel
        self._sign_lock = threading.Lock()
        self._chan = channel
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self.problem: str | None = None  # why the link to the primary was lost, if it was
        self._thread = threading.Thread(target=self._link, name="audit-link", daemon=True)
        self._thread.start()

    # ---- OpLog --------------------------------------------------------------------------

    def append_durable(self, entries: Sequence[tuple[str, Mapping[str, Any]]]
                       ) -> list[cf.Future[int]]:
        try:
            frame = ipc.encode({"op": "append", "id": 0, "entries": list(entries)})
        except (TypeError, ValueError, OverflowError) as exc:  # a caller's bug: not plain data
            return [self._failed(exc) for _ in entries]
        with self._sign_lock:
            try:
                ipc.send_frame(self._sign, frame)
                reply = ipc.recv(self._sign)
                return [self._settled(seq, err) for seq, err in zip(
                    reply["seqs"], reply["errors"], strict=True)]
            except (ipc.ChannelClosed, ValueError, KeyError, TypeError) as exc:  # gone, stuck,
                self._lost(str(exc))                                           # or garbled
                gone = AuditUnavailable("the audit log's writer (the primary process) is gone")
                return [self._failed(gone) for _ in entries]

    def record(self, event: str, fields: Mapping[str, Any]) -> cf.Future[int]:
        fut: cf.Future[int] = cf.Future()
        self._queue.put(({"op": "append", "entries": [(event, fields)]}, fut))
        return fut

    def record_async(self, event: str, fields: Mapping[str, Any]) -> asyncio.Future[int]:
        fut, sink = async_sink()
        self._coalescer.put(sink[0], ({"op": "append", "entries": [(event, fields)]}, sink))
        return fut

    async def append(self, event: str, **fields: Any) -> int:
        return await self.record_async(event, fields)

    # ---- questions for the recorder ------------------------------------------------------

    async def ask(self, op: str, **args: Any) -> dict[str, Any]:
        """One question to the recorder (read, inclusion, consistency, checkpoint,
        health); RecorderRefused if it says no."""
        fut, sink = async_sink()
        self._coalescer.put(sink[0], ({"op": op, **args}, sink))
        reply: dict[str, Any] = await fut
        if reply.get("refused"):
            raise RecorderRefused(reply["refused"])
        return reply

    def close(self) -> None:
        stop_thread(self._thread, self._queue)
        for sock in (self._sign, self._chan):
            sock.close()

    # ---- the link thread ----------------------------------------------------------------

    @staticmethod
    def _failed(exc: BaseException) -> cf.Future[int]:
        fut: cf.Future[int] = cf.Future()
        fut.set_exception(exc)
        return fut

    def _settled(self, seq: int | None, error: str | None) -> cf.Future[int]:
        fut: cf.Future[int] = cf.Future()
        if error is None and seq is not None:
            fut.set_result(seq)
        else:
            fut.set_exception(_error(error or "unavailable:no seq"))
        return fut

    def _link(self) -> None:
        while True:
            items = drain_queue(self._queue, self._queue.get())
            stop = any(item is STOP for item in items)
            jobs: dict[int, tuple[dict[str, Any], Sink]] = {}
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
                    out += ipc.encode({**message, "id": req_id})
                except (TypeError, ValueError, OverflowError) as exc:  # a caller's bug
                    results.fail(sink, exc)  # not plain data: refused alone
                    continue
                jobs[req_id] = (message, sink)
            try:
                if out:
                    self._chan.sendall(out)
                while jobs:
                    reply = ipc.recv(self._chan)
                    message, sink = jobs.pop(reply.get("id"))
                    if message["op"] != "append":
                        results.ok(sink, reply)
                        continue
                    err = reply["errors"][0]
                    if err is None:
                        results.ok(sink, reply["seqs"][0])
                    else:
                        results.fail(sink, _error(err))
            except (OSError, ValueError, KeyError, TypeError) as exc:  # gone, or garbled
                for _, sink in jobs.values():
                    results.fail(sink, AuditUnavailable("the audit log's writer (the primary "
                                                        "process) is gone"))
                results.flush()
                self._lost(str(exc))
                return
            results.flush()
            if stop:
                return

    def _lost(self, why: str) -> None:
        self.problem = f"lost the primary process: {why}"
        self._on_lost(self.problem)


def _error(text: str) -> Exception:
    kind, _, detail = text.partition(":")
    if kind == "unavailable":
        return AuditUnavailable(detail)
    return ValueError(detail)
