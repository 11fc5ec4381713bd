"""Set-up every long-running process of the daemon does (primary and workers)."""

from __future__ import annotations

import gc
import resource


def settle_heap() -> None:
    """Tune the cyclic garbage collector for a long-running server.

    What exists once the process is ready (modules, keys, caches, the app) lives as
    long as the process. Frozen, it is no longer walked by every full collection:
    under load those took 30-70 ms each, with the lock held, stalling every request
    in flight (the benchmark's p99). Almost everything a request allocates is freed
    by reference counting, so collections can also run far less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def raise_fd_limit() -> None:
    """Many idle keep-alive clients are normal for a CA: allow the hard fd limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
