"""Signs C2SP checkpoints of the audit log with the audit key in the HSM.

At most once a second while the log grows, and every `heartbeat` seconds anyway so
that silence is visible. A checkpoint is itself an HSM operation, so it is logged
(intent with size and root, outcome carrying the signed note) and covered by the
next one. The latest note is kept in `state-dir/audit/checkpoint` and handed to
the configured witnesses (ca/audit/witnessing.py), which refuse a checkpoint that
does not extend theirs; signing never waits for them.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ca.audit.log import AuditLog
from ca.audit.note import sign_checkpoint
from ca.audit.witnessing import Witnessing
from ca.fileutil import write_atomic
from hsm.errors import AuditUnavailable, HSMError
from hsm.session import KeyInfo

if TYPE_CHECKING:
    from ca.issuance.pipeline import SigningPipeline

log = structlog.get_logger("hsmca.checkpoint")


class Checkpointer:
    def __init__(self, audit: AuditLog, hsm: SigningPipeline, key: KeyInfo, origin: str,
                 path: Path, *, min_interval: float = 1.0, heartbeat: float = 60.0,
                 witnesses: Witnessing | None = None) -> None:
        self.audit, self.hsm, self.key, self.origin, self.path = audit, hsm, key, origin, path
        self.witnesses = witnesses
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self._covered = -1  # log size at which nothing new needs a checkpoint
        self._last = 0.0
        self.latest: str | None = path.read_text("utf-8") if path.exists() else None

    async def checkpoint(self, actor: str = "local") -> str:
        size, root = self.audit.root()
        key = self.key
        text = await self.hsm.sign(
            key.label,
            lambda k: sign_checkpoint(self.origin, size, root, self.origin, k.public_key(),
                                      k.sign),
            purpose="checkpoint", actor=actor, hash_name=None,
            details={"size": size, "root": base64.b64encode(root).decode()},
            describe=lambda note: {"checkpoint": note})
        # Two fsyncs: off the event loop, which has requests in flight.
        await asyncio.to_thread(write_atomic, self.path, text)
        self.latest = text
        if self.witnesses:
            self.witnesses.submit(text, size)
        self._covered = size + 2  # its own intent and outcome lines need no new checkpoint
        self._last = time.monotonic()
        return text

    async def run(self) -> None:
        """Background task: checkpoint when the log grew, or when the heartbeat is due."""
        while True:
            await asyncio.sleep(self.min_interval)
            due = time.monotonic() - self._last >= self.heartbeat
            if self.audit.size > self._covered or due:
                try:
                    await self.checkpoint()
                except (AuditUnavailable, HSMError) as exc:
                    log.warning("checkpoint failed", error=str(exc))
