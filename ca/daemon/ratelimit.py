"""Per-client limit on failed bootstrap-token attempts (guessing tokens is futile,
but nobody should get to try at line rate)."""

from __future__ import annotations

import time


class FailureLimiter:
    def __init__(self, max_failures: int = 20, window_s: float = 60.0,
                 max_clients: int = 10_000) -> None:
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._seen: dict[str, tuple[float, int]] = {}

    def retry_after(self, client: str) -> int:
        """Seconds the client must wait, or 0 if it may try."""
        start, count = self._seen.get(client, (0.0, 0))
        left = start + self.window_s - time.monotonic()
        if left <= 0 or count < self.max_failures:
            return 0
        return max(1, int(left + 0.999))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        start, count = self._seen.get(client, (now, 0))
        if now - start > self.window_s:
            start, count = now, 0
        if len(self._seen) >= self.max_clients and client not in self._seen:
            self._seen.clear()  # bounded memory; a flood of addresses resets everyone
        self._seen[client] = (start, count + 1)
