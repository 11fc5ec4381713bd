"""The auditor's saved state: what the previous verification vouched for.

The offline verifier saves ``size``, ``root`` and ``checkpoint``: the largest
checkpoint it verified. The remote verifier (ca/audit/remote.py) saves the same
fields plus what continuing from there needs: ``frontier`` (the base64 hashes of
the tree's compact range), ``last_hash`` and ``last_line`` (line size-1),
``next_seq`` and ``open_intents`` (op_id -> the intent's seq and whether a
daemon.start followed it). Each verifier reads the other's file.

The state is the auditor's own record, not evidence about the log: a malformed
one raises ValueError rather than failing the log.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ca.audit.line import GENESIS, chain_hash
from ca.audit.merkle import CompactRange
from ca.audit.note import NoteError, parse_checkpoint
from ca.audit.verify.checkpoint import PinnedKey, SignedPrefix
from ca.fileutil import write_atomic

_SHAPE = "state must have an integer size, a base64 root and a checkpoint"


@dataclass
class AuditorState:
    """The first `size` lines verified, the checkpoint that signs them, and (when saved
    by the remote verifier) what continuing after them needs."""

    size: int
    root: bytes
    checkpoint: str
    frontier: CompactRange | None = None  # None: saved by the offline verifier
    last_line: bytes | None = None  # line size-1; None at size 0 or without a frontier
    open_intents: dict[str, tuple[int, bool]] = field(default_factory=dict)  # seq, restarted

    @property
    def prefix(self) -> SignedPrefix:
        return SignedPrefix(self.size, self.root, self.checkpoint)

    @property
    def last_hash(self) -> str:
        return chain_hash(self.last_line) if self.last_line is not None else GENESIS

    @classmethod
    def parse(cls, raw: Any, key: PinnedKey) -> AuditorState:
        """Check a loaded state file against the pinned key; ValueError if malformed."""
        if not isinstance(raw, dict):
            raise ValueError("state must be a JSON object")
        size, root_text, text = raw.get("size"), raw.get("root"), raw.get("checkpoint")
        if type(size) is not int or size < 0 or type(root_text) is not str or (
                type(text) is not str):
            raise ValueError(_SHAPE)
        try:
            root = base64.b64decode(root_text, validate=True)
        except binascii.Error:
            raise ValueError("state root is not base64") from None
        try:
            cp = key.verify(text)
        except NoteError as exc:
            raise ValueError(f"the checkpoint in the state file does not verify: {exc}"
                             ) from None
        if (cp.size, cp.root) != (size, root):
            raise ValueError("the state's size and root are not those of its checkpoint")
        state = cls(size, root, text)
        if "frontier" in raw:
            state._parse_continuation(raw)
        return state

    def _parse_continuation(self, raw: dict[str, Any]) -> None:
        frontier_b64, last_hash = raw.get("frontier"), raw.get("last_hash")
        last_text, open_raw = raw.get("last_line"), raw.get("open_intents")
        if not isinstance(frontier_b64, list) or not all(type(h) is str for h in frontier_b64):
            raise ValueError("state frontier must be a list of base64 hashes")
        try:
            frontier = CompactRange.from_hashes(
                self.size, [base64.b64decode(h, validate=True) for h in frontier_b64])
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"state frontier is malformed: {exc}") from None
        if frontier.root() != self.root:
            raise ValueError("the state's frontier does not give its root: the state file is "
                             "damaged")
        if raw.get("next_seq") != self.size:
            raise ValueError("state next_seq must equal its size")
        if self.size == 0:
            if last_hash != GENESIS or last_text is not None:
                raise ValueError("a state of 0 lines has last_hash 64 zeros and no last_line")
        else:
            if type(last_text) is not str:
                raise ValueError("state last_line must be the text of line size-1")
            self.last_line = last_text.encode("utf-8")
            if chain_hash(self.last_line) != last_hash:
                raise ValueError("state last_line does not hash to last_hash: the state file "
                                 "is damaged")
        if not isinstance(open_raw, dict):
            raise ValueError("state open_intents must be an object")
        for op_id, info in open_raw.items():
            seq = info.get("seq") if isinstance(info, dict) else None
            restarted = info.get("restarted") if isinstance(info, dict) else None
            if type(seq) is not int or not 0 <= seq < self.size or type(restarted) is not bool:
                raise ValueError(f"state open intent {op_id!r} needs a seq below size and a "
                                 "boolean restarted")
            self.open_intents[op_id] = (seq, restarted)
        self.frontier = frontier

    def to_json(self) -> dict[str, Any]:
        saved: dict[str, Any] = {
            "size": self.size, "root": base64.b64encode(self.root).decode("ascii"),
            "checkpoint": self.checkpoint}
        if self.frontier is None:
            return saved
        return {
            **saved,
            "frontier": [base64.b64encode(h).decode("ascii") for h in self.frontier.hashes],
            "last_hash": self.last_hash,
            "last_line": self.last_line.decode("utf-8") if self.last_line is not None else None,
            "next_seq": self.size,
            "open_intents": {op: {"seq": seq, "restarted": restarted}
                             for op, (seq, restarted) in sorted(self.open_intents.items())},
        }


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
