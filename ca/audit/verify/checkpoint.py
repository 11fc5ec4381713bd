"""Checkpoints as the verifier meets them (docs/audit-log.md, "Checkpoints").

An ``hsm.sign`` outcome with ``result`` "ok" and a ``checkpoint`` field is a
checkpoint: its signed note must verify with the pinned key (and origin), cover
only lines before its own, and have the Merkle root of the lines it covers.
Outside the log, the latest checkpoint file and the auditor's saved state vouch
for a prefix of the log too (`SignedPrefix`); whether the log still starts with
that prefix is `ca.audit.merkle.growth`, the one rule every party uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.merkle import Growth, MerkleTree, TreeHead, growth
from ca.audit.note import Checkpoint, NoteError, verify_checkpoint
from ca.audit.verify.failure import Failure, LineError, Stage, before


class PinnedKey(NamedTuple):
    """What a checkpoint must be signed with: the auditor's pinned audit key, its name
    in the signature lines, and the origin every checkpoint must carry (if given)."""

    public_key: Ed25519PublicKey
    name: str
    origin: str | None = None

    def verify(self, text: str) -> Checkpoint:
        """The checkpoint in `text`, if its note verifies; else NoteError."""
        return verify_checkpoint(text, self.name, self.public_key, self.origin)


class LoggedCheckpoint(NamedTuple):
    """A checkpoint line whose note verified; its root is checked once the tree is built."""

    seq: int  # the outcome line that carries it
    size: int
    root: bytes
    text: str


class SignedPrefix(NamedTuple):
    """A signed claim about the log's first `size` lines, from outside the log."""

    size: int
    root: bytes
    text: str  # the checkpoint note that signs it


def check_logged(text: Any, seq: int, key: PinnedKey) -> LoggedCheckpoint:
    """The checkpoint in the outcome line `seq`, if its note holds; else LineError."""
    if type(text) is not str:
        raise LineError(Stage.CHECKPOINT, "the checkpoint field must be a string (a signed note)")
    try:
        cp = key.verify(text)
    except NoteError as exc:
        raise LineError(Stage.CHECKPOINT, f"bad checkpoint: {exc}") from None
    if cp.size > seq:
        raise LineError(Stage.CHECKPOINT, f"the checkpoint covers {cp.size} lines but is "
                                          f"logged at seq {seq}: it can only cover earlier "
                                          "lines")
    return LoggedCheckpoint(seq, cp.size, cp.root, text)


def root_mismatch(seq: int, size: int) -> Failure:
    """The failure of the checkpoint at `seq` whose root is not that of its `size` lines."""
    return Failure(seq, Stage.CHECKPOINT_ROOT, (
        f"the checkpoint's root is not the Merkle root of the first {size} lines: a line it "
        "covers was altered"))


def usable(checkpoints: Iterable[LoggedCheckpoint], failure: Failure | None
           ) -> list[LoggedCheckpoint]:
    """The checkpoints whose root check comes before the first failure."""
    return [cp for cp in checkpoints if before(failure, cp.seq, Stage.CHECKPOINT_ROOT)]


def check_roots(tree: MerkleTree, checkpoints: list[LoggedCheckpoint]
                ) -> tuple[int, Failure | None]:
    """(how many verified, the first that does not) for checkpoints in log order."""
    for verified, cp in enumerate(checkpoints):
        if tree.root(cp.size) != cp.root:
            return verified, root_mismatch(cp.seq, cp.size)
    return len(checkpoints), None


def still_extends(prefix: TreeHead, tree: MerkleTree, size: int) -> bool:
    """Whether the first `size` leaves of `tree` (at least `prefix.size`) start with `prefix`."""
    now = TreeHead(size, tree.root(size))
    return growth(prefix, now, tree.consistency_proof(prefix.size, size)) in (
        Growth.SAME, Growth.EXTENDS)


def check_latest(text: str, key: PinnedKey) -> tuple[SignedPrefix | None, str | None]:
    """The latest checkpoint file: (its prefix, None), or (None, why it does not verify)."""
    try:
        cp = key.verify(text)
    except NoteError as exc:
        return None, f"the latest checkpoint does not verify: {exc}"
    return SignedPrefix(cp.size, cp.root, text), None


def closing_lines(tail: list[bytes], signed: int, checkpoints: list[LoggedCheckpoint]) -> bool:
    """Whether `tail`, the lines after the first `signed` (which the largest verified
    checkpoint covers), are the lines with which a daemon ends its log: the intent and
    outcome that signed that very checkpoint, then at most an ``hsm.logout``.

    No checkpoint can cover its own signing, and the daemon logs out of the HSM after
    its final checkpoint: a log that ends normally always ends with these lines.
    Anything else after `signed` is lines no checkpoint covers.
    """
    if len(tail) not in (2, 3):
        return False
    objs = [json.loads(line) for line in tail]  # they passed the scan: JSON objects
    intent, outcome, rest = objs[0], objs[1], objs[2:]
    return (intent.get("event") == "hsm.sign" and intent.get("phase") == "intent"
            and intent.get("purpose") == "checkpoint"
            and outcome.get("event") == "hsm.sign" and outcome.get("phase") == "outcome"
            and outcome.get("op_id") == intent.get("op_id")
            and any(cp.seq == signed + 1 and cp.size == signed for cp in checkpoints)
            and all(obj.get("event") == "hsm.logout" for obj in rest))
