"""The aiohttp runner every hsmca server uses (the daemon's workers, the web view, the
witness): a request aiohttp cannot parse is answered like any other bad input, with an
RFC 9457 problem naming what is wrong, and never with the request's own bytes.

aiohttp answers such a request itself, before any route or middleware runs, with a
text/plain body that quotes the offending bytes (a pasted Authorization header's,
say). Its one hook is `RequestHandler.handle_error`, so the runner's server makes
handlers of a subclass that answers with a problem instead.
"""

from __future__ import annotations

from typing import Any

from aiohttp import http_exceptions, web

from ca.logs import http_server_logger
from ca.server.problems import problem

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


class _ProblemRequestHandler(web.RequestHandler):
    __slots__ = ()

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
        else:
            answer = problem(status, "Bad Request", f"{_what(exc)}; nothing was done",
                             "not-http")
        answer.force_close()
        return answer


class _ProblemServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class _ProblemAppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The application builds a plain Server with its own request factory; only
        # the handler class it makes changes.
        server.__class__ = _ProblemServer
        return server


def app_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An AppRunner for `app` with hsmca's server logger and problem answers to
    requests that are not HTTP; `kwargs` go to aiohttp's AppRunner."""
    return _ProblemAppRunner(app, access_log=None, logger=http_server_logger(), **kwargs)
