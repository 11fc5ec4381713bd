"""The operation log the HSM layer reports to.

The HSM worker cannot be built without one: every PKCS#11 operation (open, login,
keygen, sign, errors, reconnects) goes through `record`. For a signature the worker
writes an intent line and waits until it is durable *before* the PKCS#11 call, then
an outcome line after it (SPEC section 6). The audit log implements this protocol;
tests use a recording double.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
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
