"""structlog set-up: JSON lines on stderr, or a readable console when stderr is a TTY.

Nothing secret is ever passed to a logger; PINs are not even held after login.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import structlog


class _HTTPServerErrors(logging.Handler):
    """Where aiohttp's server logs what it could not handle: a request that does not
    parse (a header line over 8 KiB, not HTTP at all) becomes one JSON line naming the
    error's type and the peer, never the error's text, which quotes the request's bytes
    (an Authorization header's, say). Anything else keeps its traceback."""

    def __init__(self) -> None:
        super().__init__()
        from ca.server.throttle import Throttle
        # Anyone can send them by the thousand: at most 10 lines of a kind per 10 s, the
        # rest counted (a soak trial saw one line per request).
        self.throttle = Throttle(burst=10, on_quiet=self._unlogged)

    @staticmethod
    def _unlogged(error: object, count: int) -> None:
        structlog.get_logger("hsmca.http").warning(
            "requests that are not valid HTTP, not logged one by one", error=error,
            unlogged=count)

    def emit(self, record: logging.LogRecord) -> None:
        from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
        from aiohttp.web_protocol import RequestPayloadError
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError) and \
                isinstance(exc.__cause__, HttpProcessingError):
            # A body that does not decode as its Content-Encoding says, met again by
            # aiohttp after the 400 was sent: the client's mistake, not the server's (an
            # upgrade trial saw an error and a traceback per request, from anyone).
            exc = exc.__cause__
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        log = structlog.get_logger("hsmca.http")
        if isinstance(exc, HttpProcessingError):
            unlogged = self.throttle.allow(type(exc).__name__)
            if unlogged is not None:
                # A coding named whose decoder is missing is answered 415 (http_server),
                # and logged so, not as HTTP that is not valid (a re-trial)
                from ca.http_body import coding_missing
                coding = isinstance(exc, ContentEncodingError) and bool(coding_missing(exc))
                log.warning("refused a request body in a coding this server does not "
                            "decode" if coding else "refused a request that is not valid "
                            "HTTP", peer=str(peer), error=type(exc).__name__,
                            status=415 if coding else exc.code,
                            **({"unlogged_before": unlogged} if unlogged else {}))
        else:
            log.error("HTTP server error", peer=str(peer), message=record.getMessage(),
                      exc_info=record.exc_info)


def http_server_logger() -> logging.Logger:
    """The logger to give aiohttp's server (`AppRunner(logger=...)`)."""
    logger = logging.getLogger("hsmca.http.server")
    if not logger.handlers:
        logger.addHandler(_HTTPServerErrors())
        logger.setLevel(logging.WARNING)  # aiohttp's debug-level noise stays out
        logger.propagate = False
    return logger


class _Libraries(logging.Handler):
    """What libraries log through the standard `logging` (psycopg's pool, say) as the
    daemon's own JSON lines: Python's last-resort handler would write their bare text,
    over several lines, between them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # structlog knows the standard levels only: a library's own (35, say)
            # is written at the standard level below it
            level = max(lvl for lvl in (logging.DEBUG, logging.INFO, logging.WARNING,
                                        logging.ERROR, logging.CRITICAL)
                        if lvl <= max(record.levelno, logging.DEBUG))
            structlog.get_logger(record.name).log(
                level, record.getMessage(), logger=record.name,
                exc_info=record.exc_info or False)
        except Exception as exc:  # a record that does not format: never the library's
            # problem, nor a traceback in the middle of the JSON lines
            structlog.get_logger(record.name).warning(
                "a library's log record did not format", logger=record.name,
                record=str(record.msg)[:200], error=type(exc).__name__)


def _warning_line(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """A Python warning (a library's, or cryptography's about a CSR's over-long CN that
    any ACME client can send) as one JSON line, not two lines of bare text; Python
    still shows each at most once per place."""
    structlog.get_logger("py.warnings").warning(
        str(message)[:300], category=category.__name__, at=f"{filename}:{lineno}")


def logging_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """A daemon thread whose log lines carry what the creating code bound (a worker's
    `worker=N`): structlog's context variables do not cross into threads, and an SRE
    trial could not tell which process's HSM session a line was about."""
    return threading.Thread(target=contextvars.copy_context().run, args=(target,),
                            name=name, daemon=True)


class Recurring:
    """A failure that a periodic task meets at every round (a full disk, the HSM away):
    each error said once when first met, again every `repeat_s` while it lasts (with how
    many rounds failed meanwhile), and the end said once. Said at every round, it was
    one line a second per certificate, on the disk that was full (an operator's
    trial); an outage whose error alternates (the token away, then back without its
    PIN) says each error once."""

    def __init__(self, log: Any, event: str, ended: str, repeat_s: float = 600.0, *,
                 then: str | None = None, level: str = "warning") -> None:
        """`then`: the event for another error of the same outage (default `event`)."""
        self.log, self.event, self.ended, self.repeat_s = log, event, ended, repeat_s
        self.then, self.level = then or event, level
        self._said: dict[str, float] = {}  # this outage's errors: when each was said
        self._unsaid = 0

    def failed(self, error: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._said.get(error, float("-inf")) < self.repeat_s:
            self._unsaid += 1
            return
        more = {"failed_since_last_said": self._unsaid} if self._unsaid else {}
        event = self.then if self._said else self.event
        getattr(self.log, self.level)(event, error=error, **fields, **more)
        self._said[error], self._unsaid = now, 0

    def ok(self) -> None:
        if self._said:
            self.log.info(self.ended, after=sorted(self._said))
            self._said.clear()
            self._unsaid = 0


class _LogStream:
    """stderr for the log lines, that outlives its reader: a daemon whose stderr went to
    a pipe whose reader exited (`| head`, a log shipper restarted) died at its next line
    of a BrokenPipeError, with no daemon.stop and no final checkpoint (a cluster
    trial). Once stderr cannot be written, its lines are dropped (fd 2 then points at
    /dev/null, for the interpreter's own last words too): the audit log, not stderr,
    is the record."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            return self._failed(exc, text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._failed(exc, "")

    def _failed(self, exc: OSError, text: str) -> int:
        """The reader gone (EPIPE; EIO: its terminal closed) is for good; any other
        failure (a full disk, a pipe full for a moment) drops this line alone (a review:
        one ENOSPC sent every later line to /dev/null, the disk's own warnings too)."""
        if isinstance(exc, BrokenPipeError) or exc.errno == errno.EIO:
            return self._lost(text)
        return len(text)

    def _lost(self, text: str) -> int:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(null)
        self._stream = open(os.devnull, "w")  # noqa: SIM115 (for as long as the process)
        return len(text)


# `[server] log-level`, as the daemon's primary gives it to its workers.
LEVEL_ENV = "HSMCA_LOG_LEVEL"
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: int | None = None) -> None:
    """Log to stderr at `level`; by default at the level the environment names (a
    daemon's workers: the primary's `[server] log-level`), else info."""
    if level is None:
        level = LEVELS.get(os.environ.get(LEVEL_ENV, ""), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty()
        else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line, newline included: the worker processes share stderr,
        # and print() writes the newline apart, so two workers' lines could merge
        # into one that no JSON reader takes (a pipe keeps a write of up to 4 KiB whole).
        logger_factory=structlog.WriteLoggerFactory(
            _LogStream(sys.stderr)),  # type: ignore[arg-type]  # (write and flush: enough)
        cache_logger_on_first_use=True)
    warnings.showwarning = _warning_line
    root = logging.getLogger()
    if not any(isinstance(h, _Libraries) for h in root.handlers):
        root.addHandler(_Libraries())
    root.setLevel(logging.WARNING)
    # The pool says it at every attempt to reconnect; the daemon's own lines (/health,
    # the refused requests, the checkpoints) say once that the database is away.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


def keep_trying(tasks: set[asyncio.Task[None]], log: Any, what: str,
                attempt: Callable[[], Awaitable[object]], every_s: float,
                retry_on: tuple[type[BaseException], ...]) -> None:
    """Run `attempt` in the background every `every_s` until it goes through: a write
    owed to the inventory while it is away (a revocation the audit log records, an ACME
    order whose certificate was released). Each failure of `retry_on` is said as
    Recurring says them; the success once. `tasks` holds the task meanwhile."""
    async def run() -> None:
        said = Recurring(log, f"{what}: not yet; trying again", f"{what}: done")
        while True:
            await asyncio.sleep(every_s)
            try:
                await attempt()
            except retry_on as exc:
                said.failed(str(exc) or type(exc).__name__)
                continue
            log.warning(f"{what}: done, once the inventory took it")
            return
    tasks.add(task := asyncio.create_task(run()))
    task.add_done_callback(tasks.discard)
