"""Change counters shared by the daemon's processes, in a small memory-mapped file.

A worker that revokes a certificate moves the `revocations` counter after the
inventory has committed it; every process compares the counter with the one its
revocation state was loaded at, on each request, and reloads from the inventory
when it moved. Reading it costs a fraction of a microsecond, where asking SQLite
cost tens on every mutual-TLS request.

A process that dies between its commit and the move would leave the others
behind, so the primary moves every counter whenever a worker exits. The file is
made anew at each start of the daemon: a fresh process loads everything anyway.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

# `ssh_revoked_here` moves with `ssh_revocations` at this node's own SSH revocations
# only, not when another node's change or the database's return moves the latter: a KRL
# built since the last of them holds every revocation this node has committed.
SLOTS = {"revocations": 0, "ssh_revocations": 1, "keys": 2, "tls": 3, "ssh_revoked_here": 4}
# What a worker moves after its commits; the primary moves them all when one exits (it
# may have died in between). `tls` is the primary's alone. Not `ssh_revoked_here`: moved
# at every worker's exit, it made the whole node answer the KRL 503 for the rest of a
# database outage (a review); a worker killed between an SSH revocation's commit and
# its move is the narrower loss.
WORKERS_MOVE = ("revocations", "ssh_revocations", "keys")
# Values the primary sets for the workers to read, not counters that `bump` moves.
GAUGES = {"workers_serving": 16, "workers_wanted": 17, "inventory_damaged": 18,
          "workers_silent": 19}
T = TypeVar("T")
_U64 = struct.Struct("<Q")
SIZE = 4096


class Generations:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._map = mmap.mmap(self._fd, SIZE)
        # Closed at the daemon's stop, while another node's change may still come in:
        # a bump then moved nothing but raised "Bad file descriptor" into the stop's
        # last lines, eight tracebacks at a time (a fencing trial).
        self._closed = False

    @classmethod
    def create(cls, path: Path) -> Generations:
        """A zeroed file (the primary, at start, before any worker exists)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # Blocks allocated now: a full disk is an error here (ENOSPC), not a SIGBUS
            # at the first write through the map.
            os.posix_fallocate(fd, 0, SIZE)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        finally:
            os.close(fd)
        return cls(path)

    def get(self, name: str) -> int:
        return int(_U64.unpack_from(self._map, SLOTS[name] * 8)[0])

    def bump(self, *names: str) -> None:
        """Move counters (all that workers move if none is named), under a lock: two
        processes moving one at once must both count."""
        if self._closed:
            return  # the daemon stops: nobody reads them any more
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for name in names or WORKERS_MOVE:
                offset = SLOTS[name] * 8
                _U64.pack_into(self._map, offset, _U64.unpack_from(self._map, offset)[0] + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def set_gauge(self, name: str, value: int) -> None:
        if not self._closed:
            _U64.pack_into(self._map, GAUGES[name] * 8, value)  # one writer: the primary

    def gauge(self, name: str) -> int:
        return int(_U64.unpack_from(self._map, GAUGES[name] * 8)[0])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._map.close()
        os.close(self._fd)


class OnChange(Generic[T]):
    """A value built from the inventory and rebuilt only when a shared counter has
    moved since (in whichever process moved it): what a process keeps of revocations.

    The counter is read before the value is built, so a change committed in between
    is in the value and also makes the next `get` build again: never stale, at worst
    built once too often."""

    def __init__(self, generations: Generations, name: str,
                 build: Callable[[], Awaitable[T]]) -> None:
        self._generations, self._name, self._build = generations, name, build
        self._gen = -1  # counters start at 0: the first get builds
        self._value: Any = None

    def known(self) -> T | None:
        """The value, if it was built at the counter as it is now (no change since it
        was read); None if it may be stale, or was never built. No I/O."""
        if self._gen == -1 or self._gen != self._generations.get(self._name):
            return None
        return self._value  # type: ignore[no-any-return]

    def last(self) -> T | None:
        """The value last built, whatever the counter says since; None if never built."""
        return None if self._gen == -1 else self._value  # type: ignore[no-any-return]

    async def get(self) -> tuple[int, T]:
        """(the counter, the value built at it)."""
        gen = self._generations.get(self._name)
        if gen != self._gen:
            value = await self._build()
            self._value, self._gen = value, gen
        return gen, self._value
