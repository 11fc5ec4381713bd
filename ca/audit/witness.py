"""A file witness: holds the latest checkpoint it was shown, and only moves forward.

The daemon pushes every new checkpoint to its witnesses (a config list of paths or
URLs; a file is the first kind). A witness accepts a checkpoint only if it is
signed by the pinned audit key and extends the one it holds: a larger tree with a
consistency proof (RFC 9162 2.1.4.2) from the held (size, root), or the same tree.
A root attacker on the CA host can make the daemon sign checkpoints over a
rewritten log (the key is in the HSM, but the daemon will use it); a witness that
lives elsewhere (another host, a mounted share) refuses them, and the refusal
keeps the last honest checkpoint as evidence.

The first checkpoint is trusted on first use. A held file that cannot be read or
verified refuses everything: overwriting it would throw that evidence away. The
pinned key follows a rotation of the audit key as an auditor's verify does: a
checkpoint signed by a trusted key that names a new one, signed by that one too,
makes it trusted (docs/keys.md).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.merkle import Growth, TreeHead, growth, needs_proof
from ca.audit.note import Checkpoint, NoteError
from ca.audit.verify.checkpoint import PinnedKey
from ca.fileutil import write_atomic


class WitnessRefused(Exception):
    """The witness kept the checkpoint it holds; `reason` says why the new one is refused,
    `kind` in a word (`ca.audit.witnessing.REASONS`, what /metrics counts): "fork" (the
    same size, another root), "inconsistent" (the new tree does not extend the held
    one), "cut" (fewer lines than held), "untrusted-key", or "error"."""

    def __init__(self, reason: str, kind: str = "error") -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class FileWitness:
    def __init__(self, path: str | os.PathLike[str], public_key: Ed25519PublicKey,
                 key_name: str) -> None:
        self.path = Path(path)
        # The key name is also the origin: the daemon names its key after it.
        self._pinned = PinnedKey(public_key, key_name, key_name)
        self._shown = 0  # checkpoints held since start: the "seq" a followed key is trusted from

    def __str__(self) -> str:
        return str(self.path)

    def held(self) -> Checkpoint | None:
        """The checkpoint held now (verified), None before the first; WitnessRefused if
        the file is damaged."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise WitnessRefused(f"the held checkpoint {self.path} cannot be read ({exc}); "
                                 "refusing every checkpoint until an operator looks") from None
        try:
            return self._pinned.verify(text)
        except NoteError as exc:
            raise WitnessRefused(f"the held checkpoint {self.path} does not verify ({exc}); "
                                 "refusing every checkpoint until an operator looks") from None

    def push(self, checkpoint_text: str,
             prove: Callable[[int, int], Sequence[bytes]]) -> None:
        """Hold `checkpoint_text` if it extends the held checkpoint, else raise WitnessRefused.

        `prove(held size, new size)` gives the consistency proof between them (e.g. the
        daemon's `AuditLog.consistency_proof`); it is asked under the lock, so that it
        matches what is held, and only when a proof is needed.
        """
        try:
            new = self._pinned.verify(checkpoint_text)
        except NoteError as exc:
            raise WitnessRefused(f"the checkpoint does not verify: {exc}",
                                 "untrusted-key") from None
        with self._locked():  # two pushers must not both extend the same held checkpoint
            held = self.held()
            if held is not None:
                old, now = TreeHead(held.size, held.root), TreeHead(new.size, new.root)
                verdict = growth(old, now, prove(held.size, new.size)
                                 if needs_proof(old, now) else [])
                if verdict is Growth.SHRANK:
                    raise WitnessRefused(f"the checkpoint covers {new.size} lines, fewer than "
                                         f"the {held.size} of the one held: the log was cut",
                                         "cut")
                if verdict is Growth.FORKED and new.size == held.size:
                    raise WitnessRefused(
                        f"the checkpoint covers the same {new.size} lines as the one held "
                        "with a different root: the log was rewritten", "fork")
                if verdict is Growth.FORKED:
                    raise WitnessRefused(
                        f"the consistency proof from {held.size} to {new.size} lines does "
                        "not verify: the new tree does not extend the one held (the log "
                        "was rewritten)", "inconsistent")
                if verdict is Growth.SAME and new.signatures == held.signatures:
                    return  # the very note held already: nothing to write
            write_atomic(self.path, checkpoint_text)
            # Held: a key it hands over to signs the next ones (it verified above).
            self._shown += 1
            self._pinned = self._pinned.follow(checkpoint_text, self._shown)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
