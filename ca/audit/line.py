"""What one line of the audit log is: the rules the writer and every reader share.

docs/audit-log.md is the specification. A line is a JSON object in canonical form
(`canonical`), terminated by a newline that is not part of it. Its `prev` field
holds the chain hash (`chain_hash`) of the line before it, or `GENESIS` on line 0.
Its Merkle leaf hash is `ca.audit.merkle.leaf_hash` of the same bytes. Nothing
re-serialises a line that is already written: hashes are always of the stored
bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

GENESIS = "0" * 64  # the prev of line 0
CHECKPOINT_FIELD = "checkpoint"  # the signed note in a checkpoint's hsm.sign outcome line

# The one canonical encoder: keys sorted by code point, no insignificant white space,
# non-ASCII characters as UTF-8, and NaN or Infinity refused (they are not JSON).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


def canonical_text(obj: Mapping[str, Any]) -> str:
    """The canonical form of `obj` as text; ValueError or TypeError if it has none."""
    return _ENCODER.encode(obj)


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The bytes of the line that holds `obj` (without its newline)."""
    return _ENCODER.encode(obj).encode("utf-8")


# The fields the log adds to every line's own.
ENVELOPE = frozenset({"seq", "ts", "event", "prev"})


def line_bytes(event: str, fields: Mapping[str, Any], seq: int, ts: str, prev: str) -> bytes:
    """The line of `event` with `fields`, as the log writes it at `seq` after the line
    whose chain hash is `prev`; ValueError or TypeError if the fields have no
    canonical form."""
    return canonical({**fields, "seq": seq, "ts": ts, "event": event, "prev": prev})


def chain_hash(line: bytes) -> str:
    """What the next line's `prev` holds: the hex SHA-256 of `line` (no newline)."""
    return hashlib.sha256(line).hexdigest()


def chain_hashes(lines: Iterable[bytes]) -> list[str]:
    """`chain_hash` of each line, for a block at a time."""
    sha256 = hashlib.sha256
    return [sha256(line).hexdigest() for line in lines]
