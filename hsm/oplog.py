"""What the HSM layer needs of the operation log it reports to.

Every signature needs an intent line that is durable *before* the PKCS#11 call
(the audit log's rules are in docs/audit-log.md). Whoever signs writes that line
first and passes its seq; the HSM asks the log whether that line is durable and
refuses to sign otherwise. The audit log, and a worker process's link to it,
implement this protocol.
"""

from __future__ import annotations

from typing import Protocol


class OpLog(Protocol):
    def durable_size(self) -> int:
        """How many lines, from seq 0, are known to be durable: every seq below it is
        on disk. Callable from any thread."""
        ...
