"""Set-up every long-running process of the daemon does (primary and workers)."""

from __future__ import annotations

import ctypes
import gc
import resource

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
DAEMON_STARTED = "HSMCA_DAEMON_STARTED"  # the primary's start, in its workers' environment


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


def keep_memory_in() -> None:
    """No core file and no reading of this process's memory by other processes of its
    user (ptrace, /proc/PID/mem): a software token (SoftHSM) logged in keeps what
    decrypts its keys in the process's memory (a security review: a 77 MB core of a
    worker, written under `ulimit -c unlimited`). The core limit is inherited by the
    workers; PR_SET_DUMPABLE is not kept across exec, so each process calls this. Also
    what stops a core piped to a collector (systemd-coredump, apport), which may not
    look at the limit."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def dumpable() -> bool:
    """Whether this process may be dumped or read by its user's others (said in the
    workers' "worker ready" line, which a test checks: a review's mutation of a
    worker's keep_memory_in() passed a test that only looked at the core limit)."""
    return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
