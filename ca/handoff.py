"""Handing work to a thread and results back to callers, one wake-up per batch.

A worker thread (HSM, audit writer, inventory writer) finishes many jobs per
round. Resolving each asyncio caller with its own `call_soon_threadsafe` costs a
self-pipe write and an event-loop iteration per job; a `Batch` collects the
round's results and settles all of one loop's futures in a single call. Callers
on other threads get a `concurrent.futures.Future`, which is thread-safe as is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

# Put on a worker thread's queue behind its last job: the thread ends after that job.
STOP = object()

T = TypeVar("T")


class Settled(Generic[T]):
    """The result of work done on the caller's own thread: read like a settled
    concurrent.futures.Future (`result()`, `exception()`), without the lock and the
    condition each of those makes. The audit log's synchronous appends return one per
    line, a few per certificate."""

    __slots__ = ("_error", "_value")

    def __init__(self) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None

    @classmethod
    def of(cls, value: T) -> Settled[T]:
        s: Settled[T] = cls()
        s.settle(True, value)
        return s

    @classmethod
    def failed(cls, error: BaseException) -> Settled[T]:
        s: Settled[T] = cls()
        s.settle(False, error)
        return s

    def settle(self, ok: bool, value: Any) -> None:
        """`value` is the result if `ok`, else the exception `result()` raises."""
        if ok:
            self._value = value
        else:
            self._error = value

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        return self._error


Dropped = Callable[[], None] | None

# Where a result goes: a thread-safe future, one settled on the caller's thread, or an
# asyncio future with its loop.
Sink = cf.Future[Any] | Settled[Any] | tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]


def async_sink() -> tuple[asyncio.Future[Any], Sink]:
    """An asyncio future on the running loop and the sink that settles it."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    return fut, (loop, fut)


def claim(sink: Sink) -> bool:
    """False if the caller gave up (cancelled) before the job ran."""
    if isinstance(sink, tuple):
        return not sink[1].done()
    if isinstance(sink, Settled):
        return True
    return sink.set_running_or_notify_cancel()


def _settle(items: list[tuple[asyncio.Future[Any], bool, Any, Dropped]]) -> None:
    for fut, ok, value, dropped in items:
        if fut.done():  # cancelled while the worker ran
            if ok and dropped is not None:
                dropped()
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class Batch:
    def __init__(self) -> None:
        self._loops: dict[asyncio.AbstractEventLoop, list[Any]] = {}

    def ok(self, sink: Sink, value: Any, dropped: Dropped = None) -> None:
        """`dropped`: called (on the caller's thread) instead, if the caller gave up
        after the job ran: a result nobody will receive (a signed certificate)."""
        self._add(sink, True, value, dropped)

    def fail(self, sink: Sink, exc: BaseException) -> None:
        self._add(sink, False, exc, None)

    def _add(self, sink: Sink, ok: bool, value: Any, dropped: Dropped) -> None:
        if isinstance(sink, Settled):
            sink.settle(ok, value)
            return
        if isinstance(sink, cf.Future):
            if sink.cancelled():  # nobody is waiting (and no loop: `dropped` runs here)
                if ok and dropped is not None:
                    dropped()
                return
            if ok:
                sink.set_result(value)
            else:
                sink.set_exception(value)
            return
        loop, fut = sink
        self._loops.setdefault(loop, []).append((fut, ok, value, dropped))

    def flush(self) -> None:
        loops, self._loops = self._loops, {}
        for loop, items in loops.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more


class Coalescer:
    """Jobs submitted on an event loop during one iteration reach a worker's queue as
    one list.

    On a VM a thread wake-up costs tens of microseconds of CPU, more than the work of
    many jobs; under load the handlers that resume in one iteration then cost the
    worker one wake-up between them, not one each. The list goes out at the end of the
    iteration (`call_soon`), so a lone job waits for nothing but the loop.
    """

    def __init__(self, q: queue.SimpleQueue[Any]) -> None:
        self._q = q
        self._pending: dict[asyncio.AbstractEventLoop, list[Any]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, item: Any) -> None:
        pending = self._pending.get(loop)
        if pending is None:
            self._pending[loop] = [item]
            loop.call_soon(self._flush, loop)
        else:
            pending.append(item)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._q.put(self._pending.pop(loop))


def drain_queue(q: queue.SimpleQueue[Any], first: Any) -> list[Any]:
    """`first` and everything queued behind it, lists from a Coalescer flattened."""
    items = list(first) if isinstance(first, list) else [first]
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return items
        if isinstance(item, list):
            items.extend(item)
        else:
            items.append(item)


def stop_thread(thread: threading.Thread, q: queue.SimpleQueue[Any]) -> None:
    """End a worker thread that reads `q`: the jobs queued before still run."""
    if thread.is_alive():
        q.put(STOP)
        thread.join()
