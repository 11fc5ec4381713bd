"""The control channel between the primary and a worker: anything that is not the
audit log.

A worker says when it listens (`Ready`) and reports each failed bootstrap-token
attempt (`TokenFailed`); the primary counts those failures for the whole daemon,
whichever worker a client's connections reach, and answers how long that client
must wait (`Limit`). A valid token never asks: it is never refused because of
someone else's failures (behind a NAT, "someone else" is everyone).

The primary pings every worker (`Ping`, every HEARTBEAT_S) and the worker's event
loop answers (`Pong`): a worker whose loop is stuck (blocked in a call, stopped) keeps
its listening socket, so the kernel goes on handing it connections that hang. The
primary kills one that has not answered for `[server] worker-timeout-s`, and starts it
again.

The policy in force is the primary's: it sends it first on every channel and again
whenever a reload changes it (`NewPolicy`), so every worker, a restarted one too,
decides by the same policy, whatever the file on disk says by then.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import structlog

from ca import ipc
from ca.daemon.ratelimit import FailureLimiter
from ca.errors import PrimaryUnavailable
from ca.policy import Policy

_LEN = struct.Struct(">I")
# A worker's exit status when the token refused the PIN (EX_CONFIG): the primary starts
# it again only once the PIN source changed.
EXIT_PIN_REFUSED = 78
HEARTBEAT_S = 2.0
PRIMARY_ANSWER_S = 5.0  # a question a worker asks the primary on a request's path


class Ready(msgspec.Struct, tag="ready", frozen=True):
    pid: int


class TokenFailed(msgspec.Struct, tag="token-failed", frozen=True):
    id: int
    client: str


class Limit(msgspec.Struct, tag="limit", frozen=True):
    id: int
    retry_after: int


class NewPolicy(msgspec.Struct, tag="policy", frozen=True):
    version: int
    policy: Policy


class PolicyTaken(msgspec.Struct, tag="policy-taken", frozen=True):
    version: int


class Ping(msgspec.Struct, tag="ping", frozen=True):
    n: int


class Pong(msgspec.Struct, tag="pong", frozen=True):
    n: int


@dataclass
class Liveness:
    """When a worker's event loop last answered a ping (time.monotonic())."""

    answered: float = field(default_factory=time.monotonic)

    def silent_for(self) -> float:
        return time.monotonic() - self.answered


ToPrimary = Ready | TokenFailed | PolicyTaken | Pong
ToWorker = Limit | NewPolicy | Ping
_to_primary: ipc.Decoder[ToPrimary] = ipc.Decoder(ToPrimary)
_to_worker: ipc.Decoder[ToWorker] = ipc.Decoder(ToWorker)
log = structlog.get_logger("hsmca.control")


class PolicyFeed:
    """The policy in force in the primary, sent to every worker's channel; `publish`
    returns once every worker has taken it."""

    def __init__(self, policy: Policy) -> None:
        self.current, self.version = policy, 0
        self._taken: dict[asyncio.StreamWriter, int] = {}  # writer -> version it holds
        self._changed = asyncio.Condition()

    async def publish(self, policy: Policy, within: float) -> int:
        """Send `policy` to every worker; how many had not taken it within `within`
        seconds (0: every process decides by it)."""
        self.current, self.version = policy, self.version + 1
        frame = ipc.encode(NewPolicy(self.version, policy))
        for writer in self._taken:
            writer.write(frame)

        def lagging() -> int:
            return sum(v < self.version for v in self._taken.values())
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: lagging() == 0), within)
            except TimeoutError:
                pass
            return lagging()

    def _join(self, writer: asyncio.StreamWriter) -> None:
        writer.write(ipc.encode(NewPolicy(self.version, self.current)))
        self._taken[writer] = -1

    async def _note(self, writer: asyncio.StreamWriter, version: int | None) -> None:
        """A worker took `version`; None: it is gone."""
        async with self._changed:
            if version is None:
                self._taken.pop(writer, None)
            elif writer in self._taken:
                self._taken[writer] = version
            self._changed.notify_all()


async def _messages(reader: asyncio.StreamReader, decoder: ipc.Decoder[object]
                    ) -> object | None:
    """The next message, or None at the end of the channel; ipc.ChannelClosed for a
    frame that is not a message of this channel (the caller says what that means)."""
    try:
        head = await reader.readexactly(4)
        (length,) = _LEN.unpack(head)
        if length > ipc.MAX_FRAME:
            return None
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return decoder.decode(body)


async def _ping(writer: asyncio.StreamWriter) -> None:
    for n in itertools.count():
        writer.write(ipc.encode(Ping(n)))
        await asyncio.sleep(HEARTBEAT_S)  # periodic, not synchronisation


async def serve_worker(sock: socket.socket, limiter: FailureLimiter,
                       on_ready: Callable[[int], None], policies: PolicyFeed,
                       liveness: Liveness) -> None:
    """The primary's side of one worker's control channel, until the worker is gone;
    `liveness` follows its answers to the pings."""
    reader, writer = await asyncio.open_connection(sock=sock)
    policies._join(writer)
    pinger = asyncio.create_task(_ping(writer))
    try:
        while True:
            try:
                msg = await _messages(reader, _to_primary)  # type: ignore[arg-type]
            except ipc.ChannelClosed as exc:  # not this channel's: the worker is not ours
                log.error("a worker's control channel sent what it cannot, and is closed",
                          error=str(exc))
                return
            if msg is None:
                return
            if isinstance(msg, Pong):
                liveness.answered = time.monotonic()
            elif isinstance(msg, Ready):
                on_ready(msg.pid)
            elif isinstance(msg, PolicyTaken):
                await policies._note(writer, msg.version)
            elif isinstance(msg, TokenFailed):
                # Whether the client was over the limit before this attempt: its first
                # max_failures failures are told why, the ones after to wait.
                wait = limiter.retry_after(msg.client)
                limiter.failed(msg.client)
                writer.write(ipc.encode(Limit(msg.id, wait)))
    finally:
        pinger.cancel()
        await policies._note(writer, None)
        writer.close()


class ControlClient:
    """A worker's side: `ready()`, `token_failed(client)`, and `policy`, the policy in
    force (from `start()` on)."""

    def __init__(self, sock: socket.socket,
                 on_unreadable: Callable[[], None] | None = None) -> None:
        self._sock = sock
        self.on_unreadable = on_unreadable  # a policy came that cannot be read: stop
        self._first_policy: asyncio.Future[Policy] | None = None
        self.policy: Policy
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, and wait for the policy in force: the primary's first message."""
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._first_policy = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read(reader))
        self.policy = await self._first_policy

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                msg = await _messages(reader, _to_worker)  # type: ignore[arg-type]
            except ipc.ChannelClosed as exc:
                # A policy this worker cannot read (the primary's config checks should
                # make this impossible): it must not go on deciding by the one before,
                # which the audit log no longer shows in force.
                problem = f"cannot read the policy the primary sent ({exc})"
                log.error("this worker stops: " + problem)
                if self._first_policy is not None and not self._first_policy.done():
                    self._first_policy.set_exception(ConnectionError(problem))
                elif self.on_unreadable is not None:
                    self.on_unreadable()
                break
            if isinstance(msg, Ping):  # answered from the event loop: it runs
                if self._writer is not None:
                    self._writer.write(ipc.encode(Pong(msg.n)))
                continue
            if isinstance(msg, NewPolicy):
                if self._first_policy is not None and not self._first_policy.done():
                    self._first_policy.set_result(msg.policy)
                elif msg.policy != self.policy:
                    self.policy = msg.policy
                    log.info("the primary reloaded the policy; this worker decides by it now")
                if self._writer is not None:
                    self._writer.write(ipc.encode(PolicyTaken(msg.version)))
                continue
            if not isinstance(msg, Limit):
                break
            fut = self._waiting.pop(msg.id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.retry_after)
        if self._first_policy is not None and not self._first_policy.done():
            self._first_policy.set_exception(ConnectionError("the primary process is gone"))
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
        try:
            # Bounded: a primary that does not answer (stopped, or stuck) held every bad
            # token's request for good (a review). Its count (sent, and counted once the
            # primary reads it) is not known then, so the request is not answered as if
            # it were: 503.
            return await asyncio.wait_for(fut, PRIMARY_ANSWER_S)
        except TimeoutError:
            self._waiting.pop(req_id, None)
            raise PrimaryUnavailable("the daemon's primary process did not answer within "
                                     f"{PRIMARY_ANSWER_S:g} s with the count of failed "
                                     "tokens from this address") from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
