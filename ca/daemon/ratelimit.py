"""Per-client limit on failed bootstrap-token attempts (guessing tokens is futile,
but nobody should get to try at line rate)."""

from __future__ import annotations

import ipaddress
import time


def client_key(address: str) -> str:
    """Whom a limit counts: an IPv4 address, or an IPv6 client's /64 (one host is
    given a whole /64, so counting addresses there bounded nothing: a security trial);
    an IPv4-mapped address as the IPv4 address it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class FailureLimiter:
    def __init__(self, max_failures: int = 20, window_s: float = 60.0,
                 max_clients: int = 10_000) -> None:
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._seen: dict[str, tuple[float, int]] = {}  # in the order their windows began

    def retry_after(self, client: str) -> int:
        """Seconds the client (an address, counted as `client_key` says) must wait, or 0
        if it may try."""
        start, count = self._seen.get(client_key(client), (0.0, 0))
        left = start + self.window_s - time.monotonic()
        if left <= 0 or count < self.max_failures:
            return 0
        return max(1, int(left + 0.999))

    def failed(self, client: str) -> None:
        client = client_key(client)
        now = time.monotonic()
        start, count = self._seen.get(client, (now, 0))
        if now - start > self.window_s:
            start, count = now, 0
            self._seen.pop(client, None)  # its new window goes to the end of the order
        if len(self._seen) >= self.max_clients and client not in self._seen:
            # Bounded memory: the windows that ended go first, then the oldest. Clearing
            # them all let a flood of addresses free every client being held back.
            for old in [c for c, (s, _) in self._seen.items() if now - s > self.window_s]:
                del self._seen[old]
            while len(self._seen) >= self.max_clients:
                del self._seen[next(iter(self._seen))]
        self._seen[client] = (start, count + 1)
