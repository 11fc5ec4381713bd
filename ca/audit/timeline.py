"""Finding a line by its time, in a log read over the API a line at a time.

The lines' times never go backwards (one writer per log), so a time is a place in the
log: the web view finds a revocation's line by the time the inventory keeps, and `hsmca
audit prove` an SSH certificate's intent by its issue time. What a daemon serves is
read as untrusted: a line that is not an object, or whose `ts` is not an ISO 8601 time
with its zone, has no time."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from typing import Any


def parse(raw: bytes) -> dict[str, Any] | None:
    """A line as an object, or None if it is not one."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def time_of(obj: dict[str, Any] | None) -> dt.datetime | None:
    """When a parsed line says it was written, if it says so readably (with its zone:
    a time without one cannot be compared with the others)."""
    ts = obj.get("ts") if obj is not None else None
    if not isinstance(ts, str):
        return None
    try:
        when = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


async def first_after(line: Callable[[int], Awaitable[bytes | None]], end: int,
                      moment: dt.datetime) -> int:
    """The first seq below `end` whose line's time is after `moment` (`end` if none), by
    bisection; `line(seq)` reads one line (None past the end). A line without a time
    counts as after: the search then looks earlier, and never skips the one sought."""
    lo, hi = 0, end
    while lo < hi:
        mid = (lo + hi) // 2
        raw = await line(mid)
        ts = time_of(parse(raw)) if raw is not None else None
        if ts is not None and ts <= moment:
            lo = mid + 1
        else:
            hi = mid
    return lo
