"""The control channel between the primary and a worker: anything that is not the
audit log.

A worker says when it listens (`Ready`) and reports each failed bootstrap-token
attempt (`TokenFailed`); the primary counts those failures for the whole daemon,
whichever worker a client's connections reach, and answers how long that client
must wait (`Limit`). A valid token never asks: it is never refused because of
someone else's failures (behind a NAT, "someone else" is everyone).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from collections.abc import Callable

import msgspec

from ca import ipc
from ca.daemon.ratelimit import FailureLimiter

_LEN = struct.Struct(">I")


class Ready(msgspec.Struct, tag="ready", frozen=True):
    pid: int


class TokenFailed(msgspec.Struct, tag="token-failed", frozen=True):
    id: int
    client: str


class Limit(msgspec.Struct, tag="limit", frozen=True):
    id: int
    retry_after: int


ToPrimary = Ready | TokenFailed
_to_primary: ipc.Decoder[ToPrimary] = ipc.Decoder(ToPrimary)
_to_worker: ipc.Decoder[Limit] = ipc.Decoder(Limit)


async def _messages(reader: asyncio.StreamReader, decoder: ipc.Decoder[object]
                    ) -> object | None:
    """The next message, or None at the end of the channel."""
    try:
        head = await reader.readexactly(4)
        (length,) = _LEN.unpack(head)
        if length > ipc.MAX_FRAME:
            return None
        return decoder.decode(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def serve_worker(sock: socket.socket, limiter: FailureLimiter,
                       on_ready: Callable[[int], None]) -> None:
    """The primary's side of one worker's control channel, until the worker is gone."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        while True:
            msg = await _messages(reader, _to_primary)  # type: ignore[arg-type]
            if msg is None:
                return
            if isinstance(msg, Ready):
                on_ready(msg.pid)
            elif isinstance(msg, TokenFailed):
                # Whether the client was over the limit before this attempt: its first
                # max_failures failures are told why, the ones after to wait.
                wait = limiter.retry_after(msg.client)
                limiter.failed(msg.client)
                writer.write(ipc.encode(Limit(msg.id, wait)))
    finally:
        writer.close()


class ControlClient:
    """A worker's side: `ready()`, `token_failed(client)`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            msg = await _messages(reader, _to_worker)  # type: ignore[arg-type]
            if not isinstance(msg, Limit):
                break
            fut = self._waiting.pop(msg.id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.retry_after)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the primary process is gone"))

    async def ready(self, pid: int) -> None:
        assert self._writer is not None
        self._writer.write(ipc.encode(Ready(pid)))
        await self._writer.drain()

    async def token_failed(self, client: str) -> int:
        """Count a failed token attempt from `client`; seconds it had to wait already
        (0: tell it why its token failed)."""
        assert self._writer is not None
        req_id = next(self._ids)
        fut = self._waiting[req_id] = asyncio.get_running_loop().create_future()
        self._writer.write(ipc.encode(TokenFailed(req_id, client)))
        return await fut

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
