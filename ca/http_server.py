"""The aiohttp runner every hsmca server uses (the daemon's workers, the web view, the
witness): a request aiohttp cannot parse is answered like any other bad input, with an
RFC 9457 problem naming what is wrong, and never with the request's own bytes.

aiohttp answers such a request itself, before any route or middleware runs, with a
text/plain body that quotes the offending bytes (a pasted Authorization header's,
say). Its one hook is `RequestHandler.handle_error`, so the runner's server makes
handlers of a subclass that answers with a problem instead.

The same handlers bound how long a client may take to send a request. aiohttp reads
a head or a body for as long as the client trickles it, and keeps a connection that
sent nothing for an hour: a few thousand such connections from anyone who can reach
the port would hold the daemon's memory and descriptors. Here a request must arrive
whole within the request timeout of its first byte (a new connection: of the end of
its TLS handshake, which has the same bound), or its client gets a 408 and the
connection closes; an idle kept-alive connection closes after `KEEPALIVE_S`.

At a stop, no request is handed to the application once the runner's cleanup has
begun: aiohttp waits only for the connections whose TLS handshake was done by then,
and a worker closes what requests use (inventory, HSM thread, audit link) as soon as
that cleanup returns. A connection whose handshake finishes later is closed
unanswered, like one still in the listen backlog.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, http_exceptions, web
from aiohttp.streams import StreamReader

from ca.config import REQUEST_TIMEOUT_S
from ca.http_body import ACCEPTED, coding_missing, unsupported_coding
from ca.listener import Listener, OnRefused, Places, listening_sockets
from ca.logs import http_server_logger
from ca.server.problems import TYPE_BASE, problem

# asyncio's TLS layer gives each connection a read buffer of SSLProtocol.max_size, 256
# KiB, filled with zeros up front: 270 KB of memory per connection, idle or not. A TLS
# record carries at most 16 KiB, and an hsmca request at most 64 KiB, read in pieces;
# 32 KiB reads cost nothing measurable, and a connection an eighth of that memory.
TLS_READ_BUFFER = 32 * 1024
asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER

KEEPALIVE_S = 75.0  # nginx's default; aiohttp's (3630 s) is for sitting behind a balancer

# What a client did wrong, by the parser's error type; the error's own text is not
# used because it quotes the request.
_WHAT = {
    http_exceptions.LineTooLong: "a request line or header line is longer than 8 KiB",
    http_exceptions.BadHttpMethod: "the request method is not valid HTTP (is this client "
                                   "speaking HTTP over TLS to the right port?)",
    http_exceptions.BadStatusLine: "the request line is not 'METHOD /path HTTP/1.1'",
    http_exceptions.InvalidURLError: "the request's path is not a valid URL path",
    http_exceptions.InvalidHeader: "a header is not valid HTTP (a malformed name, or a "
                                   "header that may appear once given twice)",
    http_exceptions.ContentLengthError: "the body does not match its Content-Length",
    http_exceptions.TransferEncodingError: "the body is not valid chunked encoding",
}


def _what(exc: BaseException | None) -> str:
    for kind, text in _WHAT.items():
        if isinstance(exc, kind):
            return text
    return "the request is not valid HTTP/1.1"


def _late_detail(timeout: float, what: str) -> str:
    return (f"the request's {what} did not arrive within {timeout:g} s of its first byte; "
            "nothing was done (send the whole request at once)")


class RequestTooSlow(web.HTTPRequestTimeout):
    """What reading a body that missed its deadline raises in the handler: a 408."""

    def __init__(self, timeout: float) -> None:
        super().__init__(text=_late_detail(timeout, "body"))


def _unfinished_head_answer(status: int, title: str, kind: str, detail: str) -> bytes:
    """A whole response, written by hand: a head that never finished has no request
    for aiohttp to answer."""
    body = json.dumps({"type": TYPE_BASE + kind, "title": title, "status": status,
                       "detail": detail}).encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, title.encode(), len(body))) + body


def _head_timeout_answer(timeout: float) -> bytes:
    return _unfinished_head_answer(408, "Request Timeout", "request-timeout",
                                   _late_detail(timeout, "head"))


# What a request's head (its request line and headers) may take in all. aiohttp bounds
# a line (8 KiB) and the lines (128), not their sum: a head of 98 lines of 8 KB each
# was read whole, and held connections took a worker from 68 to 122 MB (an HTTP trial).
# An hsmca client's head is well under 2 KiB.
MAX_HEAD = 64 << 10
_HEAD_TOO_LARGE = _unfinished_head_answer(
    431, "Request Header Fields Too Large", "request-header-fields-too-large",
    f"the request's head (its request line and headers) is longer than {MAX_HEAD >> 10} "
    "KiB in all; nothing was done")


class _ProblemRequestHandler(web.RequestHandler):
    __slots__ = ("_began", "_body", "_deadline", "_head_bytes", "_head_tail", "on_lost")

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the latest request's, while it arrives
        self._began = False  # whether the request the deadline is for sent a byte
        self._head_bytes = 0  # of a head still arriving, since the last request's
        self._head_tail = b""  # its last 3 bytes: its end may come split across reads
        self.on_lost: Callable[[], None] | None = None  # gives the listener's place back

    @property
    def _timeout(self) -> float:
        return getattr(self._manager, "request_timeout", REQUEST_TIMEOUT_S)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if getattr(self._manager, "stopping", False):
            # Accepted before the listener closed, its TLS handshake done only now: the
            # runner's cleanup, which waits for the connections it knows, has not seen
            # it, and what its requests would use (a worker's inventory, HSM thread,
            # audit link) closes once that cleanup returns. Closed unanswered, as one
            # still in the listen backlog is: nothing was done for it.
            self.force_close()
            return
        self._arm(began=False)  # a connection that never asks is closed as well

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        manager = self._manager  # aiohttp lets go of it in connection_lost
        try:
            super().connection_lost(exc)
        finally:
            if self.on_lost is not None:
                self.on_lost()
            if isinstance(manager, _ProblemServer):
                manager.received()  # a body awaited at a stop will not come

    async def _handle_request(self, request: web.BaseRequest, start_time: float | None,
                              request_handler: Any) -> tuple[web.StreamResponse, bool]:
        async def answered(req: web.BaseRequest) -> web.StreamResponse:
            try:
                return await request_handler(req)  # type: ignore[no-any-return]
            except web.HTTPExpectationFailed:
                # aiohttp meets an Expect header before any middleware runs, and refused
                # one it does not know in plain text (a security trial).
                return problem(417, "Expectation Failed", "this server meets only "
                               "'Expect: 100-continue'; send the request without the "
                               "Expect header", "expectation-failed")
        # Only a request with an Expect header can meet that refusal: the others, every
        # renewal among them, go on without the extra coroutine.
        handler = answered if hdrs.EXPECT in request.headers else request_handler
        try:
            return await super()._handle_request(request, start_time, handler)
        finally:
            # Answered, its body read or not (a 403 before it): a stop need not wait for
            # that body any more, nor linger for its rest (aiohttp reads up to 10 s of an
            # unread body before it closes), and the connection closes.
            if isinstance(self._manager, _ProblemServer):
                if self._manager.stopping:
                    self._lingering_time = 0.0
                    self.close()
                self._manager.received()

    def data_received(self, data: bytes) -> None:
        body_was_open = self._body is not None and not self._body.is_eof()
        if not body_was_open:
            # The head so far and this data up to the head's end, before the parser
            # reads it: a whole head in one read (TLS hands over all it decrypted at
            # once) was served at 70 KB, being counted only when unfinished (a review).
            # Its blank line may begin in the read before (a review: a body's bytes after
            # it were counted as head, a 431 for a body near 64 KiB).
            tail = self._head_tail if self._head_bytes else b""
            end = (tail + data).find(b"\r\n\r\n")
            if self._head_bytes + (len(data) if end < 0 else end + 4 - len(tail)) > MAX_HEAD \
                    and self.transport is not None:
                self.transport.write(_HEAD_TOO_LARGE)
                self.force_close()
                return
        count = self._request_count
        super().data_received(data)
        if self._request_count > count and self._messages:
            self._body = self._messages[-1][1]
        if self._body is not None and not self._body.is_eof():
            self._head_bytes = 0
            self._arm(began=True)  # a body still arriving
        elif self._request_count > count or body_was_open:
            self._head_bytes = 0
            self._disarm()  # this data finished a request
            if body_was_open and isinstance(self._manager, _ProblemServer) and \
                    self._manager.stopping:
                self.close()  # whole now: answered, then closed (see pre_shutdown)
                self._manager.received()
        elif data:
            self._head_tail = ((self._head_tail if self._head_bytes else b"") + data)[-3:]
            self._head_bytes += len(data)  # of a head still arriving
            self._arm(began=True)  # the first bytes of a head

    def receiving(self) -> bool:
        """Whether the request being handled still waits for its body."""
        return self._request_in_progress and self._body is not None and \
            not self._body.is_eof()

    def _arm(self, *, began: bool) -> None:
        if self._deadline is None:
            self._began = began
            self._deadline = self._loop.call_later(self._timeout, self._late)
        elif began:
            self._began = True

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if self._force_close or self.transport is None:
            return
        body = self._body
        if body is not None and not body.is_eof():
            if not self._request_in_progress:
                self.force_close()  # a body nobody reads: its answer has gone already
                return
            # The handler reading it (this one, or the next one's when it was sent
            # behind another) gets the 408 from request.read(), through the problem
            # middleware; the connection closes once the handler in progress has
            # answered, without aiohttp's lingering to read the rest.
            body.set_exception(RequestTooSlow(self._timeout))
            self._lingering_time = 0.0
            self.close()
        elif self._request_in_progress or self._messages:
            # A head begun behind a request still being handled: timed again from now,
            # so that it is closed once the connection is idle and it is still not whole.
            self._arm(began=self._began)
        else:
            if self._began:
                self.transport.write(_head_timeout_answer(self._timeout))
            self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own handling first: it logs (through http_server_logger, which
        # keeps the bytes out) and refuses when part of an answer has gone already.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            answer = problem(status, "Internal Server Error",
                             "an unexpected error occurred; the operator can find it in "
                             "the logs", "internal")
        elif isinstance(exc, http_exceptions.ContentEncodingError):
            # br or zstd, whose decoder aiohttp does not have: the client's coding, not
            # its HTTP (RFC 9110 15.5.16), as read_body answers the codings aiohttp does
            # not know at all. The request's headers are gone by now; aiohttp's text
            # names the coding.
            answer = problem(415, "Unsupported Media Type",
                             unsupported_coding(coding_missing(exc)),
                             "unsupported-media-type", headers={"Accept-Encoding": ACCEPTED})
        else:
            answer = problem(status, "Bad Request", f"{_what(exc)}; nothing was done",
                             "not-http")
        answer.force_close()
        answer.headers["Server"] = "hsmca"  # as every other answer (ca/server/app.py)
        return answer


class _ProblemServer(web.Server):
    request_timeout = REQUEST_TIMEOUT_S
    stopping = False  # the runner's cleanup has begun: no new connection is served

    def __call__(self) -> web.RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)

    _bodies: asyncio.Event | None = None  # set as each body awaited at a stop arrives

    def pre_shutdown(self) -> None:
        # Called once the listener is closed, before the connections known now are
        # closed and their requests awaited: any connection that completes its TLS
        # handshake after this is one the cleanup will not wait for.
        self.stopping = True
        self._bodies = asyncio.Event()
        for conn in self._connections:
            # A request whose body is still arriving is read to its end (aiohttp's own
            # close drops what comes after it: an SRE trial's request, whole half a
            # second after the SIGTERM, got no answer 10 s later); the connection
            # closes once it is whole (data_received), or at the request timeout.
            if not (isinstance(conn, _ProblemRequestHandler) and conn.receiving()):
                conn.close()

    def received(self) -> None:
        if self._bodies is not None:
            self._bodies.set()

    async def bodies_in(self, timeout: float | None) -> None:
        """Return once no request being handled waits for its body, or after `timeout`
        (the request timeout ends each of them before then, with a 408)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (timeout or 0.0)
        while self._bodies is not None and any(
                isinstance(c, _ProblemRequestHandler) and c.receiving()
                for c in self._connections):
            self._bodies.clear()
            try:
                await asyncio.wait_for(self._bodies.wait(), max(0.0, end - loop.time()))
            except TimeoutError:
                return


class _ProblemAppRunner(web.AppRunner):
    def __init__(self, app: web.Application, request_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.request_timeout = request_timeout

    async def shutdown(self) -> None:
        # Between closing the idle connections and aiohttp's own wait for the requests
        # under way, which stops reading the connections first: their bodies come in,
        # within the one grace period (the wait that follows gets what is left of it).
        if isinstance(self._server, _ProblemServer) and self._shutdown_timeout:
            loop = asyncio.get_running_loop()
            began = loop.time()
            await self._server.bodies_in(self._shutdown_timeout)
            self._shutdown_timeout = max(0.0, self._shutdown_timeout - (loop.time() - began))
        await super().shutdown()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The application builds a plain Server with its own request factory; only
        # the handler class it makes changes.
        server.__class__ = _ProblemServer
        server.request_timeout = self.request_timeout
        return server


def app_runner(app: web.Application, request_timeout: float = REQUEST_TIMEOUT_S,
               **kwargs: Any) -> web.AppRunner:
    """An AppRunner for `app` with hsmca's server logger, problem answers to requests
    that are not HTTP, and `request_timeout` seconds for each request to arrive whole;
    `kwargs` go to aiohttp's AppRunner."""
    return _ProblemAppRunner(app, request_timeout, access_log=None,
                             logger=http_server_logger(), keepalive_timeout=KEEPALIVE_S,
                             **kwargs)


class _BoundedTCPSite(web.TCPSite):
    """aiohttp's TCPSite, accepting through a `Listener` (ca/listener.py): connections
    within the process's descriptors and per client address, and the runner's request
    timeout on the TLS handshake too (asyncio's own bound is 60 s, and TCPSite offers no
    way to pass another)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, places: Places,
                 on_refused: OnRefused | None, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._limits = (places, on_refused)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # what TCPSite.start does first, then its server
        server = self._runner.server
        assert server is not None
        timeout = getattr(self._runner, "request_timeout", REQUEST_TIMEOUT_S)
        sockets = listening_sockets(self._host, self._port, self._backlog,
                                    reuse_port=bool(self._reuse_port))
        places, on_refused = self._limits
        self._server = Listener(sockets, server, self._ssl_context, timeout,  # type: ignore[assignment]
                                places, on_refused=on_refused)
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def listen_failure(exc: OSError, host: str, port: int) -> str:
    """Why a site could not listen, in one line: the listener's own error says "cannot
    listen on" already (said twice, an operator's trial read)."""
    said = exc.strerror or str(exc)
    return said if said.startswith("cannot listen on") else \
        f"cannot listen on {host}:{port}: {said}"


def tcp_site(runner: web.AppRunner, host: str, port: int,
             ssl_context: ssl.SSLContext | None = None, *, places: Places | None = None,
             on_refused: OnRefused | None = None, **kwargs: Any) -> web.TCPSite:
    """A TCPSite for `runner`: TLS handshakes within the request timeout as well, and
    connections within `places` (ca/listener.py: the process's descriptors, and a bound
    per client address), shared with the process's other sites that are given the
    same; `on_refused` counts those refused, by reason."""
    return _BoundedTCPSite(runner, host, port, ssl_context=ssl_context,
                           places=places if places is not None else Places(),
                           on_refused=on_refused, **kwargs)
