"""The auditor's saved state: everything the previous verification saw.

A state records the first `size` lines verified, whether a checkpoint covers them
yet or not: their Merkle ``root``, the chain ``head`` (the hash of line size-1,
which the next line's prev must hold) and the ``frontier`` (the base64 hashes of
the tree's compact range, enough to extend the tree without the lines). With it
the largest ``checkpoint`` verified (covering at most `size` lines), which names
the audit key, and the ``open_intents`` left at `size` (op_id -> the intent's seq
and whether a daemon.start followed it) for a remote run to continue from.
The next run must find the same `size` lines with the same root, so removing,
altering or reordering any of them fails, even where no checkpoint covers them.

Both verifiers write this shape (``"version": 2``) and read it. They also read
the states of earlier versions, which knew only the checkpoint verified last:
the offline verifier's (``size``, ``root``, ``checkpoint``) and the remote
verifier's (the same plus ``frontier``, ``last_hash``, ``last_line``,
``next_seq``, ``open_intents``), and save them in the new shape.

The state is the auditor's own record, not evidence about the log: a malformed
one raises ValueError rather than failing the log.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ca.audit.cosignature import ALG_NOTE, parse_verifier_key
from ca.audit.line import GENESIS, chain_hash
from ca.audit.merkle import EMPTY_ROOT, HASH_SIZE, CompactRange, TreeHead
from ca.audit.note import NoteError, parse_checkpoint, verifier_key
from ca.audit.verify.checkpoint import PinnedKey, SignedPrefix
from ca.fileutil import write_atomic

VERSION = 2
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class AuditorState:
    """The first `size` lines verified and what continuing after them needs."""

    size: int
    root: bytes  # Merkle root of the first `size` lines
    head: str | None  # chain hash of line size-1 (GENESIS at 0); None: not recorded
    frontier: CompactRange | None  # their compact range; None: not recorded
    checkpoint: str  # the largest checkpoint verified ("" before the first)
    signed: SignedPrefix  # what `checkpoint` signs: its size is at most `size`
    open_intents: dict[str, tuple[int, bool]] = field(default_factory=dict)  # seq, restarted
    # The audit keys the log handed over to, with the seq of each hand-over (docs/keys.md).
    successors: tuple[tuple[int, str], ...] = ()
    # The keys the verified lines show made in the HSM (public key SHA-256 -> the seq of
    # its hsm.keygen outcome): a hand-over in a later run's lines is to a key made here
    # (a trial's second run called the key "made outside the HSM", its keygen verified
    # by the first).
    keygens: dict[str, int] = field(default_factory=dict)
    # The audit key hand-overs a remote run has said (key ids, hex): said once.
    hand_overs_said: tuple[str, ...] = ()

    @property
    def seen(self) -> TreeHead:
        return TreeHead(self.size, self.root)

    @property
    def continuable(self) -> bool:
        """Whether a run can go on from `size` (a first-version offline state cannot: it
        recorded neither head nor frontier, and the remote verifier starts again at 0)."""
        return self.head is not None and self.frontier is not None

    @classmethod
    def empty(cls) -> AuditorState:
        """Nothing verified yet."""
        return cls(0, EMPTY_ROOT, GENESIS, CompactRange(), "", SignedPrefix(0, EMPTY_ROOT, ""))

    @classmethod
    def parse(cls, raw: Any, key: PinnedKey) -> AuditorState:
        """Check a loaded state file against the pinned key (and the keys it handed over
        to, as the state recorded them); ValueError if malformed."""
        if not isinstance(raw, dict):
            raise ValueError("state must be a JSON object")
        key = followed(raw, key)
        state = cls._parse(raw, key)
        state.successors = _vkeys(key)
        return state

    @classmethod
    def _parse(cls, raw: dict[str, Any], key: PinnedKey) -> AuditorState:
        version = raw.get("version", 1)
        if version == 1:
            return cls._parse_first_version(raw, key)
        if version != VERSION:
            raise ValueError(f"state version {version!r} is not one this hsmca reads (1 or "
                             f"{VERSION})")
        size, head = raw.get("size"), raw.get("head")
        if type(size) is not int or size < 0:
            raise ValueError("state size must be a non-negative integer")
        root = _hash(raw.get("root"), "root")
        if type(head) is not str or not _HEX64.fullmatch(head):
            raise ValueError("state head must be 64 lowercase hex digits")
        if size == 0 and head != GENESIS:
            raise ValueError("a state of 0 lines has the head 64 zeros")
        frontier = _frontier(raw.get("frontier"), size, root)
        signed = _signed(raw.get("checkpoint"), key)
        if signed.size > size:
            raise ValueError(f"the state's checkpoint covers {signed.size} lines, more than "
                             f"the {size} it records")
        if signed.size == size and signed.root != root:
            raise ValueError("the state's root is not that of its checkpoint")
        state = cls(size, root, head, frontier, signed.text, signed)
        state.open_intents = _open_intents(raw.get("open_intents"), size)
        state.keygens = _keygens(raw.get("keygens", {}), size)
        said = raw.get("hand_overs_said", [])
        if not isinstance(said, list) or not all(
                type(k) is str and re.fullmatch(r"[0-9a-f]{8}", k) for k in said):
            raise ValueError("state hand_overs_said must be a list of key ids (8 hex digits)")
        state.hand_overs_said = tuple(said)
        return state

    @classmethod
    def _parse_first_version(cls, raw: dict[str, Any], key: PinnedKey) -> AuditorState:
        size, root_text = raw.get("size"), raw.get("root")
        if type(size) is not int or size < 0 or type(root_text) is not str:
            raise ValueError("state must have an integer size, a base64 root and a checkpoint")
        root = _hash(root_text, "root")
        signed = _signed(raw.get("checkpoint"), key)
        if (signed.size, signed.root) != (size, root):
            raise ValueError("the state's size and root are not those of its checkpoint")
        state = cls(size, root, None, None, signed.text, signed)
        if "frontier" not in raw:  # the offline verifier's: the checkpoint alone
            return state
        state.frontier = _frontier(raw.get("frontier"), size, root)
        if raw.get("next_seq") != size:
            raise ValueError("state next_seq must equal its size")
        last_hash, last_text = raw.get("last_hash"), raw.get("last_line")
        if size == 0:
            if last_hash != GENESIS or last_text is not None:
                raise ValueError("a state of 0 lines has last_hash 64 zeros and no last_line")
        elif type(last_text) is not str or chain_hash(last_text.encode("utf-8")) != last_hash:
            raise ValueError("state last_line must be the text of line size-1, which hashes "
                             "to last_hash: the state file is damaged")
        state.head = last_hash
        state.open_intents = _open_intents(raw.get("open_intents"), size)
        return state

    def to_json(self) -> dict[str, Any]:
        if self.head is None or self.frontier is None:
            raise ValueError("a state saved by this version records its head and frontier")
        return {
            "version": VERSION,
            "size": self.size,
            "root": base64.b64encode(self.root).decode("ascii"),
            "head": self.head,
            "frontier": [base64.b64encode(h).decode("ascii") for h in self.frontier.hashes],
            "checkpoint": self.checkpoint,
            "open_intents": {op: {"seq": seq, "restarted": restarted}
                             for op, (seq, restarted) in sorted(self.open_intents.items())},
            "successors": [{"seq": seq, "key": vkey} for seq, vkey in self.successors],
            "keygens": dict(sorted(self.keygens.items())),
            "hand_overs_said": list(self.hand_overs_said),
        }


def _keygens(raw: Any, size: int) -> dict[str, int]:
    if not isinstance(raw, dict) or not all(
            type(k) is str and _HEX64.fullmatch(k) and type(v) is int and 0 <= v < size
            for k, v in raw.items()):
        raise ValueError("state keygens must map public key SHA-256 hex digests to the seq "
                         "of a line verified")
    return dict(raw)


def _hash(text: Any, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True) if type(text) is str else b""
    except binascii.Error:
        raise ValueError(f"state {what} is not base64") from None
    if len(raw) != HASH_SIZE:
        raise ValueError(f"state {what} must be a base64 {HASH_SIZE}-byte hash")
    return raw


def _frontier(hashes: Any, size: int, root: bytes) -> CompactRange:
    if not isinstance(hashes, list) or not all(type(h) is str for h in hashes):
        raise ValueError("state frontier must be a list of base64 hashes")
    try:
        frontier = CompactRange.from_hashes(
            size, [base64.b64decode(h, validate=True) for h in hashes])
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"state frontier is malformed: {exc}") from None
    if frontier.root() != root:
        raise ValueError("the state's frontier does not give its root: the state file is "
                         "damaged")
    return frontier


def followed(raw: Any, key: PinnedKey) -> PinnedKey:
    """`key`, trusting the keys the log handed over to as a saved state records them
    (each was checked when the hand-over was verified; the log still holds it)."""
    items = raw.get("successors", []) if isinstance(raw, dict) else []
    if not isinstance(items, list):
        raise ValueError("state successors must be a list")
    successors = list(key.successors)
    for item in items:
        seq = item.get("seq") if isinstance(item, dict) else None
        text = item.get("key") if isinstance(item, dict) else None
        if type(seq) is not int or seq < 0 or type(text) is not str:
            raise ValueError("each state successor needs a seq and a verifier key")
        try:
            successors.append((seq, parse_verifier_key(text, ALG_NOTE).public_key))
        except ValueError as exc:
            raise ValueError(f"state successor at seq {seq}: {exc}") from None
    return key._replace(successors=tuple(successors))


def _vkeys(key: PinnedKey) -> tuple[tuple[int, str], ...]:
    return tuple((seq, verifier_key(key.name, k)) for seq, k in key.successors)


def _signed(text: Any, key: PinnedKey) -> SignedPrefix:
    if type(text) is not str:
        raise ValueError("state must have a checkpoint (a signed note)")
    try:
        cp = key.verify(text)
    except NoteError as exc:
        raise ValueError(f"the checkpoint in the state file does not verify: {exc}") from None
    return SignedPrefix(cp.size, cp.root, text)


def _open_intents(raw: Any, size: int) -> dict[str, tuple[int, bool]]:
    if not isinstance(raw, dict):
        raise ValueError("state open_intents must be an object")
    found: dict[str, tuple[int, bool]] = {}
    for op_id, info in raw.items():
        seq = info.get("seq") if isinstance(info, dict) else None
        restarted = info.get("restarted") if isinstance(info, dict) else None
        if type(seq) is not int or not 0 <= seq < size or type(restarted) is not bool:
            raise ValueError(f"state open intent {op_id!r} needs a seq below size and a "
                             "boolean restarted")
        found[op_id] = (seq, restarted)
    return found


def state_origin(raw: Any) -> str | None:
    """The origin (and key name) of the checkpoint in a loaded state file, if it has one.

    ValueError if the checkpoint is there but malformed.
    """
    text = raw.get("checkpoint") if isinstance(raw, dict) else None
    if type(text) is not str:
        return None
    try:
        return parse_checkpoint(text).origin
    except NoteError as exc:
        raise ValueError(f"the checkpoint in the state file is malformed: {exc}") from None


def load_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state saved by the previous verification, or None if there is none yet."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        state = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"state file {path} is not JSON: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"state file {path} must hold a JSON object")
    return state


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Replace the state file atomically (readers see the old or the new one, and the
    new one survives a crash once this returns)."""
    write_atomic(Path(path), json.dumps(state, sort_keys=True, indent=1) + "\n", 0o600)
