"""Cheap unique identifiers for log correlation (op ids, request ids).

They must be unique, not secret: a random per-process prefix plus a counter costs a
few hundred nanoseconds, where uuid4 costs a getrandom() system call per id.
"""

from __future__ import annotations

import itertools
import os
import threading


class IdSource:
    def __init__(self, prefix_bytes: int = 8) -> None:
        self._prefix = os.urandom(prefix_bytes).hex()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            n = next(self._counter)
        return f"{self._prefix}{n:08x}"
