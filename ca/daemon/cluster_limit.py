"""Failed bootstrap-token attempts counted for the whole cluster (cluster mode).

On one node the primary counts them in memory (ca/daemon/ratelimit.py) for all its
workers; with several nodes behind a load balancer a guesser would get that budget
once per node, so the attempts are counted in PostgreSQL instead, with the store's
rate-event verbs (the ones ACME's limits use), and every node sees every attempt."""

from __future__ import annotations

import datetime as dt

from ca.daemon.ratelimit import FailureLimiter, client_key
from ca.store import Store

KIND = "token-failure"


class ClusterTokenLimit:
    def __init__(self, store: Store, limiter: FailureLimiter | None = None) -> None:
        self.store = store
        default = limiter or FailureLimiter()
        self.max_failures, self.window_s = default.max_failures, default.window_s

    async def token_failed(self, client: str) -> int:
        """Count a failed attempt from `client`; seconds it must wait (0: tell it why)."""
        client = client_key(client)  # an IPv6 client by its /64, as on one node
        now = dt.datetime.now(dt.UTC)
        since = now - dt.timedelta(seconds=self.window_s)
        # Whether the client was over the limit before this attempt, as on one node.
        over = await self.store.acme_rate_over(KIND, [client], since, self.max_failures)
        await self.store.acme_rate_take(KIND, [client], now, since, None)
        return int(self.window_s) if over is not None else 0
