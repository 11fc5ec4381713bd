"""Log lines that anyone can cause, let through at a bounded rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Throttle:
    """At most `burst` log lines per key (a refusal's reason or status) per interval;
    the rest are counted. How many went unlogged is said by the next line let through,
    or, when none comes (the flood stopped), by `on_quiet` once the interval is over.
    Anyone can send thousands of bad requests or handshakes a second: the log must not
    become their echo (the metrics count every one)."""

    interval_s = 10.0

    def __init__(self, burst: int,
                 on_quiet: Callable[[object, int], None] | None = None) -> None:
        self.burst = burst
        self.on_quiet = on_quiet
        self._window: dict[object, tuple[float, int, int]] = {}  # key: (start, logged, quiet)

    def allow(self, key: object) -> int | None:
        """None: do not log this one; else how many before it went unlogged."""
        now = time.monotonic()
        start, logged, quiet = self._window.get(key, (float("-inf"), 0, 0))
        unlogged = 0
        if now - start >= self.interval_s:
            start, logged, quiet, unlogged = now, 0, 0, quiet
        if logged < self.burst:
            self._window[key] = (start, logged + 1, quiet)
            return unlogged
        self._window[key] = (start, logged, quiet + 1)
        if quiet == 0 and self.on_quiet is not None:
            # The first one left out in this window: say at its end how many were,
            # whether or not another refusal comes to carry it.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # no loop to wait on: the next line let through says it
            else:
                loop.call_later(start + self.interval_s - now, self._flush, key, start)
        return None

    def _flush(self, key: object, start: float) -> None:
        window = self._window.get(key)
        if window is None or window[0] != start or not window[2]:
            return  # a later window began, and its first line said it
        self._window[key] = (start, window[1], 0)
        assert self.on_quiet is not None
        self.on_quiet(key, window[2])
