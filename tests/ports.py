"""Loopback ports for servers a test starts later (sshd, certbot's and lego's
challenge responders, a daemon restarted on its old port, PostgreSQL).

A port found by binding port 0 and closing the socket is free only until someone else
binds port 0: with the suite's files running side by side (pytest-xdist), another
worker's daemon could be handed it by the kernel before our server binds it. So
these ports come from below the kernel's ephemeral range, which bind(0) draws from,
in a block of this worker's own."""

from __future__ import annotations

import itertools
import os
import socket

BLOCK = 1000
FIRST = 10000  # blocks start here, one per worker, below the ephemeral range

_next = itertools.count()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on, from this worker's block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = FIRST + (int(worker) if worker.isdigit() else 0) * BLOCK
    if base + BLOCK > _ephemeral_low():
        raise RuntimeError(f"too many test workers for ports below {_ephemeral_low()}: "
                           "set HSMCA_TEST_JOBS lower")
    for _ in range(BLOCK):
        port = base + next(_next) % BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # something of the machine's own listens there
            return port
    raise RuntimeError(f"no free loopback port in {base}-{base + BLOCK - 1}")
