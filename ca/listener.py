"""Accepting connections within bounds, which asyncio's own server does not keep.

asyncio's server accepts until the process runs out of file descriptors. Then it logs
an error with a traceback for each connection still waiting (up to the backlog, 1024
here), and again a second later. A client holding a few hundred thousand idle
connections made it write 8,000 such lines a second. It also held the descriptors the
rest of the process needs: SoftHSM opens the key's object file at every signature.

Here each process holds at most `capacity()` connections at once: its descriptor limit
less `FD_RESERVE` for what else it opens. It also holds at most `per_address` from
one client address, so that one client cannot take every place. Those are the
process's `Places`, shared by all its listeners (the HTTPS port and the plain-HTTP
one): counted apart, the two together took the reserve, and a client filling both
broke the HSM session (a review). A connection over
either bound is closed at once, with a reset, so its client learns now and not at its
timeout. It is counted (`on_refused`, for /metrics) and logged at most once per
reason per 10 s.

`Listener` is the part of `asyncio.Server` that aiohttp's sites use. Each accepted
socket is handed to `loop.connect_accepted_socket` with the TLS context and the
handshake's time bound. Its place is given back when the connection's protocol loses it
(`on_lost`), or when the handshake fails.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import resource
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import structlog

from ca.config import PER_ADDRESS
from ca.server.throttle import Throttle

# The client's address, in the context of everything its connection runs (its
# transport's callbacks copy the context of the task that made it): the TLS layer's
# refusal lines name it (an SRE trial had an alert and no client to go to).
PEER: contextvars.ContextVar[str | None] = contextvars.ContextVar("peer", default=None)

log = structlog.get_logger("hsmca.http")

FD_RESERVE = 128  # descriptors kept for the HSM, the inventory, the log, metrics files
ACCEPT_BATCH = 64  # accepts per readiness event: a burst is taken without starving the loop
PAUSE_S = 0.25  # accepting waits this long when the process is out of descriptors
_OUT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# (reason) -> counted: "per-address", "capacity" or "no-descriptors"
OnRefused = Callable[[str], None]
OnOpen = Callable[[int], None]  # how many connections the process holds now
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def capacity() -> int:
    """How many connections this process may hold: its descriptor limit, less the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft - FD_RESERVE)


def listening_sockets(host: str | None, port: int, backlog: int,
                      reuse_port: bool = False) -> list[socket.socket]:
    """Non-blocking sockets listening on every address `host` names (all of them for
    None), as `loop.create_server` makes them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
                (i[0], i[1], i[2], i[3], i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address[0]}:{address[1]}: "
                              f"{exc.strerror.lower() if exc.strerror else exc}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Places:
    """The connections one process holds, whichever of its listeners took them: at most
    `capacity` in all, and `per_address` (0: no bound) from one client address."""

    def __init__(self, per_address: int = PER_ADDRESS, on_open: OnOpen | None = None) -> None:
        self.capacity = capacity()
        self.per_address = per_address
        self.on_open = on_open
        self.open = 0
        self._by_address: dict[str, int] = {}

    def refusal(self, address: str) -> str | None:
        """Why a connection from `address` may not be held now, or None."""
        if self.open >= self.capacity:
            return "capacity"
        if self.per_address and self._by_address.get(address, 0) >= self.per_address:
            return "per-address"
        return None

    def take(self, address: str) -> None:
        self.open += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        if self.on_open is not None:
            self.on_open(self.open)

    def give_back(self, address: str) -> None:
        self.open -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]
        if self.on_open is not None:
            self.on_open(self.open)


class Listener:
    """Serves `protocol_factory`'s protocols (an aiohttp web.Server) on `sockets`, within
    `places` (the process's, shared with its other listeners)."""

    def __init__(self, sockets: list[socket.socket], protocol_factory: Callable[[], Any],
                 ssl_context: ssl.SSLContext | None, handshake_timeout: float | None,
                 places: Places, on_refused: OnRefused | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._sockets = sockets
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout if ssl_context is not None else None
        self.places = places
        self.on_refused = on_refused
        self._handshakes: set[asyncio.Task[None]] = set()
        self._paused: asyncio.TimerHandle | None = None
        self._throttle = Throttle(burst=1, on_quiet=self._unlogged)
        self._resume()  # accepting

    # ---- what aiohttp's sites use of asyncio.Server ---------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def is_serving(self) -> bool:
        return bool(self._sockets)

    def close(self) -> None:
        """Stop accepting; connections already held are the web server's to close."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        else:
            for sock in self._sockets:
                self._loop.remove_reader(sock.fileno())
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        # Handshakes under way end on their own: done, the server closes the connection
        # unanswered (ca/http_server.py, stopping); else at their timeout, or when the
        # loop ends. Cancelled here, one just done would lose its socket to two owners.

    async def wait_closed(self) -> None:
        return None

    # ---- accepting -------------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF:
                    raise
                self._refused("no-descriptors", None, os_error=exc.strerror or str(exc))
                self._pause()
                return
            address = str(peer[0]) if isinstance(peer, tuple) else ""
            if (reason := self.places.refusal(address)) is not None:
                self._refuse(conn, reason, address)
            else:
                self._admit(conn, address)

    def _pause(self) -> None:
        """Out of descriptors: stop accepting for a moment, or every waiting connection
        fails again at once (what asyncio's server logs, each with a traceback)."""
        if self._paused is not None:
            return
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
        self._paused = self._loop.call_later(PAUSE_S, self._resume)

    def _resume(self) -> None:
        """Accept again (or for the first time)."""
        self._paused = None
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _refuse(self, conn: socket.socket, reason: str, address: str) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass  # gone already
        conn.close()
        self._refused(reason, address)

    def _refused(self, reason: str, address: str | None, os_error: str | None = None) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)
        if (unlogged := self._throttle.allow(reason)) is None:
            return
        detail = {"per-address": f"{self.places.per_address} connections from this "
                                 "address already ([server] max-connections-per-address, "
                                 "per worker)",
                  "capacity": f"{self.places.capacity} connections already, on all its "
                              "ports: this process's file descriptor limit less "
                              f"{FD_RESERVE} kept for the HSM, the inventory and the log "
                              "(raise LimitNOFILE to hold more)",
                  "no-descriptors": f"the process is out of file descriptors ({os_error}); "
                                    f"accepting again in {PAUSE_S:g} s"}[reason]
        log.warning("refused a connection", reason=reason, why=detail,
                    **({"client": address} if address else {}),
                    refused_since_last_line=unlogged + 1)

    @staticmethod
    def _unlogged(reason: object, count: int) -> None:
        log.warning("refused connections not logged one by one", reason=reason,
                    refused_since_last_line=count)

    def _admit(self, conn: socket.socket, address: str) -> None:
        conn.setblocking(False)
        self.places.take(address)
        held = True

        def release() -> None:
            nonlocal held
            if not held:
                return
            held = False
            self.places.give_back(address)

        def protocol() -> Any:
            made = self._factory()
            made.on_lost = release
            return made

        context = contextvars.copy_context()
        context.run(PEER.set, address)
        task = self._loop.create_task(self._connect(conn, protocol, release), context=context)
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _connect(self, conn: socket.socket, protocol: Callable[[], Any],
                       release: Callable[[], None]) -> None:
        try:  # the transport owns `conn` from here: it closes it, whatever happens
            await self._loop.connect_accepted_socket(
                protocol, conn, ssl=self._ssl,
                # (asyncio refuses a handshake timeout without TLS: [server] http-listen)
                **({"ssl_handshake_timeout": self._handshake_timeout} if self._ssl else {}))
        except OSError as exc:
            # A failed or timed-out handshake (a refused client certificate is logged by
            # the TLS layer, ca/server/app.py), or a client gone: its transport closed it.
            release()
            # The exception's traceback holds asyncio's frames, which hold the connection
            # (with its 256 KiB read buffer) and the exception again: a cycle only the
            # garbage collector frees (CPython gh-109534, mended in 3.12 but not in
            # Debian's 3.11). Under this daemon's collector thresholds (ca/process.py) a
            # port scan or plain HTTP to this port left hundreds of them, 45-280 MB per
            # worker. Cut here, the connection is freed when it closes.
            exc.__traceback__ = None
        except BaseException:  # cancelled as the loop ends: asyncio closes the transport
            release()
            raise
