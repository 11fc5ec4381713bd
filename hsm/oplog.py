"""The operation log the HSM layer reports to.

The HSM worker cannot be built without one: every PKCS#11 operation (open, login,
keygen, sign, errors, reconnects) is recorded. For a signature the worker writes an
intent line and waits until it is durable *before* the PKCS#11 call, then an outcome
line after it (SPEC section 6). The audit log implements this protocol;
tests use a recording double.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol


class OpLog(Protocol):
    def record(self, event: str, fields: Mapping[str, Any]) -> Future[int]:
        """Append one line; callable from any thread, never blocks on the disk.

        The future resolves to the line's seq once it is durable, or fails with
        `hsm.errors.AuditUnavailable` if the log cannot be written. Lines from one
        thread are written in the order that thread recorded them.
        """
        ...

    def record_async(self, event: str, fields: Mapping[str, Any]) -> asyncio.Future[int]:
        """The same, for the event loop thread: an asyncio future settled with the
        other results of its group commit in one wake-up."""
        ...

    def append_durable(self, entries: Sequence[tuple[str, Mapping[str, Any]]]
                       ) -> list[Future[int]]:
        """Append (event, fields) lines on the calling thread and return once they are
        durable, in one group commit. The HSM thread writes the intents and outcomes
        of its signatures this way. Each future is already settled: the line's seq,
        or AuditUnavailable (or the caller's bug, e.g. a field that is not JSON)."""
        ...
