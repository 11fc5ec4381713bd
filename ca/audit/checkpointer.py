"""Signs C2SP checkpoints of the audit log with the audit key in the HSM.

At most once a second while the log grows, and every `heartbeat` seconds anyway so
that silence is visible. A checkpoint is itself an HSM operation, so it is logged
(intent with size and root, outcome carrying the signed note) and covered by the
next one.

While the audit key rotates (docs/keys.md), every checkpoint is signed by the keys
still in use, the previous ones first and the active one last (one intent and
outcome each; the last outcome carries the note), and names the active key in an
extension line: a verifier pinned to a previous key learns from it to trust the new
one. Once the previous key is retired, checkpoints carry the new key's signature
alone. The latest note is kept in `state-dir/audit/checkpoint` and handed to
the configured witnesses (ca/audit/witnessing.py), which refuse a checkpoint that
does not extend theirs; signing never waits for them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from ca.audit.log import AuditLog
from ca.audit.note import NEXT_KEY, checkpoint_body, signed_note, verifier_key
from ca.audit.witnessing import Witnessing
from ca.fileutil import write_atomic
from ca.store.errors import StoreUnavailable
from hsm.errors import AuditUnavailable, HSMError
from hsm.session import KeyInfo

if TYPE_CHECKING:
    from ca.issuance.pipeline import SigningPipeline
    from ca.store import Store

log = structlog.get_logger("hsmca.checkpoint")


def _fixed(given: KeyInfo | Sequence[KeyInfo]) -> Keys:
    fixed = [given] if isinstance(given, KeyInfo) else list(given)

    async def keys() -> list[KeyInfo]:
        return fixed
    return keys


def publish_key(path: Path) -> Callable[[KeyInfo], None]:
    """An `on_handover` that makes `path`, the state directory's audit key, the key in
    force: what the next start checks the last checkpoint with, and what a new auditor
    pins (docs/keys.md). The key it replaces is kept beside it (`followed_keys`): on a
    cluster, the log of a node stopped during the rotation, on the same state
    directory, still ends with a checkpoint of that key alone."""
    def handed_over(key: KeyInfo) -> None:
        new = key.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        old = path.read_bytes() if path.exists() else b""
        if old and old != new:
            kept = followed_keys(path)
            before = kept.read_bytes() if kept.exists() else b""
            if old not in before:  # first, so that a crash between loses no key
                write_atomic(kept, before + old, 0o644)
        write_atomic(path, new, 0o644)
    return handed_over


def followed_keys(path: Path) -> Path:
    """Where the audit keys `path` held before its current one are kept, oldest first."""
    return path.with_name(path.stem + "s-followed.pem")


async def keys_to_open_with(path: Path, store: Store) -> list[Ed25519PublicKey]:
    """Cluster mode: what a start checks its log's last checkpoint with, `path` (the
    state directory's audit key) and the keys it followed that the inventory lists as
    still signing checkpoints (active or previous)."""
    return published_keys(path, {k.fingerprint for k in await store.keys()
                                 if k.kind == "audit" and k.state in ("active", "previous")})


def published_keys(path: Path, in_use: Collection[str] = ()) -> list[Ed25519PublicKey]:
    """The state directory's audit key (`path`), then those it followed whose SHA-256
    SPKI fingerprint is in `in_use`, newest first: what a start checks its log's last
    checkpoint with (ca.audit.log.AuditKeys). `in_use`: the inventory's audit keys
    still active or previous. A retired key signs no checkpoint any more, so none that
    a start must accept: it is not one, whatever the file holds."""
    current = load_pem_public_key(path.read_bytes())
    if not isinstance(current, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    keys = [current]
    kept = followed_keys(path)
    if in_use and kept.exists():
        ends = b"-----END PUBLIC KEY-----"
        for blob in reversed(kept.read_bytes().split(ends)[:-1]):
            try:
                key = load_pem_public_key(blob.strip() + b"\n" + ends + b"\n")
            except ValueError:
                continue
            spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            if isinstance(key, Ed25519PublicKey) and hashlib.sha256(spki).hexdigest() in in_use:
                keys.append(key)
    return keys


Keys = Callable[[], Awaitable[list[KeyInfo]]]
# Checkpoints failing for this long make /health say so.
CHECKPOINT_GRACE_S = 5.0


class _Unwritable(OSError):
    """The checkpoint file could not be written (the rest of a round's OSErrors are the
    recorder's or the log's, and said in their own words)."""


@dataclass(frozen=True)
class _Signed:
    """A checkpoint signed for the log's first `size` lines."""

    text: str
    size: int
    active: KeyInfo
    previous: tuple[KeyInfo, ...]


class Checkpointer:
    def __init__(self, audit: AuditLog, hsm: SigningPipeline,
                 keys: KeyInfo | Sequence[KeyInfo] | Keys,
                 origin: str, path: Path, *, min_interval: float = 1.0,
                 heartbeat: float = 60.0, witnesses: Witnessing | None = None,
                 on_handover: Callable[[KeyInfo], None] | None = None,
                 on_checkpoint: Callable[[int, str], Awaitable[None]] | None = None) -> None:
        """`keys`: the audit key, or the keys in use (the active one first), or what
        gives the keys in use now; `on_handover` is called with the active key after
        each checkpoint that named it (`publish_key`)."""
        self.audit, self.hsm, self.origin, self.path = audit, hsm, origin, path
        self._keys: Keys = keys if callable(keys) else _fixed(keys)
        self._on_handover = on_handover
        # Cluster mode: the checkpoint is published where every node serves it from.
        self._on_checkpoint = on_checkpoint
        self.witnesses = witnesses
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self._covered = -1  # log size at which nothing new needs a checkpoint
        self._last = 0.0
        self._failing: tuple[float, str] | None = None  # (since, last error)
        self._said_errors: set[str] = set()  # the errors of this outage said already
        self._signers: tuple[str, ...] = ()  # the labels of the keys of the last checkpoint
        self._unwritten: _Signed | None = None  # signed, its file not written yet
        self.latest: str | None = path.read_text("utf-8") if path.exists() else None

    async def checkpoint(self, actor: str = "local") -> str:
        active, *previous = await self._keys()
        size, root = self.audit.root()
        handover = (f"{NEXT_KEY}{verifier_key(self.origin, active.public_key)}",) \
            if previous else ()
        body = checkpoint_body(self.origin, size, root, handover)
        details = {"size": size, "root": base64.b64encode(root).decode()}
        signatures: list[tuple[str, Any, bytes]] = []
        for key in previous:  # each audited like any signature; the note comes last
            sig = await self.hsm.sign(key.label, lambda k: k.sign(body.encode()),
                                      purpose="checkpoint", actor=actor, hash_name=None,
                                      details={**details, "co_signer": True})
            signatures.append((self.origin, key.public_key, sig))

        def note(k: Any) -> str:
            return signed_note(body, [*signatures,
                                      (self.origin, active.public_key, k.sign(body.encode()))])

        text = await self.hsm.sign(active.label, note, purpose="checkpoint", actor=actor,
                                   hash_name=None, details=details,
                                   describe=lambda n: {"checkpoint": n})
        self._unwritten = _Signed(text, size, active, tuple(previous))
        await self._publish()
        return text

    async def _publish(self) -> None:
        """Write the signed checkpoint and hand it on. One that cannot be written is
        kept, and only its writing is tried again: signing anew every second cost an HSM
        signature and two audit lines a second while a directory was unwritable (an
        operator trial); the next one is signed once this one is out."""
        signed = self._unwritten
        assert signed is not None
        # Two fsyncs: off the event loop, which has requests in flight.
        try:
            await asyncio.to_thread(write_atomic, self.path, signed.text)
        except OSError as exc:
            raise _Unwritable(exc.errno, exc.strerror) from None
        self.latest = signed.text
        if self._on_checkpoint is not None:
            await self._on_checkpoint(signed.size, signed.text)
        self._unwritten = None
        if self.witnesses:
            self.witnesses.submit(signed.text, signed.size)
        # Its own intent and outcome lines need no new checkpoint.
        self._covered = signed.size + 2 * (1 + len(signed.previous))
        self._last = time.monotonic()
        self._signers = (signed.active.label, *(k.label for k in signed.previous))
        if signed.previous and self._on_handover is not None:
            self._on_handover(signed.active)

    async def run(self) -> None:
        """Background task: checkpoint when the log grew, or when the heartbeat is due."""
        while True:
            await asyncio.sleep(self.min_interval)
            due = time.monotonic() - self._last >= self.heartbeat
            try:
                if self._unwritten is not None:
                    await self._publish()  # signed already: only written again
                elif self.audit.size > self._covered or due or await self._keys_moved():
                    await self.checkpoint()
                else:
                    continue  # nothing to sign: a failure, if any, still stands
            except (AuditUnavailable, HSMError, StoreUnavailable, OSError) as exc:
                # (OSError: the checkpoint file itself cannot be written, a full disk:
                # one line naming it, not a traceback; a chaos trial)
                # Tried again every second: said once, and again when the reason
                # changes (a database away for minutes is not hundreds of lines). The
                # file's name, not the temporary one's, which changes at every try.
                why = (f"cannot write {self.path}: {exc.strerror}"
                       if isinstance(exc, _Unwritable) else str(exc)) or type(exc).__name__
                if self._failed(why):
                    log.warning("checkpoint failed; trying again every second", error=why)
            except Exception as exc:  # anything else: said, and tried again
                # A task that died here would leave the log without checkpoints
                # until a restart, silently (the inventory read the audit keys come
                # from, busy or away for a moment, was enough).
                if self._failed(str(exc) or type(exc).__name__):
                    log.exception("checkpoint failed; trying again every second")
            else:  # a checkpoint was signed (`continue` skips this)
                if self._failing is not None:
                    log.info("checkpoints are signed again", failed_for_s=round(
                        time.monotonic() - self._failing[0], 1))
                self._failing = None

    async def _keys_moved(self) -> bool:
        """Whether the audit keys in use are not the ones that signed the last checkpoint.
        `key.rotate` is written before the new key is committed, so the checkpoint its
        line brings may come too early to hand over; without this the hand-over (and any
        `key retire` of the old key, which waits for it) waited for the heartbeat."""
        if not self._signers:
            return False
        return tuple(k.label for k in await self._keys()) != self._signers

    def _failed(self, error: str) -> bool:
        """Note a failure; whether it is news (the first, or a reason not said yet in
        this outage: PostgreSQL's error alternated between two wordings, and each retry
        was said again, a cluster trial)."""
        since = self._failing[0] if self._failing else time.monotonic()
        if self._failing is None:
            self._said_errors = set()
        news = error not in self._said_errors
        self._said_errors.add(error)
        self._failing = (since, error)
        return news

    def trouble(self) -> str | None:
        """Why no checkpoint has been signed for a while, or None: /health says so, since
        lines no checkpoint covers are lines no auditor can trust yet (a moment's
        failure, the HSM busy or away, is not trouble yet)."""
        failing = self._failing
        if failing is None:
            return None
        since, error = failing
        seconds = time.monotonic() - since
        if seconds < CHECKPOINT_GRACE_S:
            return None
        return f"no checkpoint signed for {seconds:.0f} s: {error}"
