"""The messages between a worker process and the primary's audit recorder.

Typed (msgspec tagged structs, msgpack on the wire: no pickle, so a worker can send
the primary nothing but plain data), and framed by ca/ipc.py. A worker sends
`Request`s and gets one `Reply` per request, with the same `id`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Line(msgspec.Struct, array_like=True, frozen=True):
    event: str
    fields: dict[str, Any]


class Failure(msgspec.Struct, frozen=True):
    """Why one line was not written: the log is `unavailable` (fail closed), or the
    line is `invalid` (a caller's bug, refused alone)."""

    kind: Literal["unavailable", "invalid"]
    detail: str


# ---- worker -> recorder -------------------------------------------------------------------

class Append(msgspec.Struct, tag="append", frozen=True):
    id: int
    lines: list[Line]


class ReadLines(msgspec.Struct, tag="read", frozen=True):
    id: int
    start: int
    limit: int


class InclusionProof(msgspec.Struct, tag="inclusion", frozen=True):
    id: int
    index: int
    size: int


class ConsistencyProof(msgspec.Struct, tag="consistency", frozen=True):
    id: int
    old: int
    size: int


class ReadTile(msgspec.Struct, tag="tile", frozen=True):
    """C2SP tile `level`/`index`, its first `width` hashes (256: the full tile)."""

    id: int
    level: int
    index: int
    width: int


class ReadEntries(msgspec.Struct, tag="entries", frozen=True):
    """C2SP entry bundle `index`, its first `width` entries."""

    id: int
    index: int
    width: int


class AskHealth(msgspec.Struct, tag="health", frozen=True):
    id: int


class AskCheckpoint(msgspec.Struct, tag="checkpoint", frozen=True):
    """The latest checkpoint; with `cosigned`, the latest one witnesses cosigned (the
    log's note with their cosignature lines), which may be older."""

    id: int
    cosigned: bool = False


class AskWitnesses(msgspec.Struct, tag="witnesses", frozen=True):
    """Where each witness stands (JSON, ca.audit.witnessing `report`)."""

    id: int


Request = (Append | ReadLines | InclusionProof | ConsistencyProof | ReadTile | ReadEntries
           | AskHealth | AskCheckpoint | AskWitnesses)


# ---- recorder -> worker -------------------------------------------------------------------

class Appended(msgspec.Struct, tag="appended", frozen=True):
    id: int
    seqs: list[int | None]
    errors: list[Failure | None]


class Lines(msgspec.Struct, tag="lines", frozen=True):
    id: int
    data: bytes


class Proof(msgspec.Struct, tag="proof", frozen=True):
    id: int
    hashes: list[bytes]


class Blob(msgspec.Struct, tag="blob", frozen=True):
    """A tile or an entry bundle; None if the log has not got it (yet)."""

    id: int
    data: bytes | None


class Health(msgspec.Struct, tag="health-state", frozen=True):
    id: int
    healthy: bool
    problem: str | None
    size: int
    damaged_seq: int | None = None  # a line rewritten on disk (AuditLog.check_on_disk)
    changed: str | None = None  # the file cut, appended to or replaced (changed_on_disk)


class Checkpoint(msgspec.Struct, tag="checkpoint-text", frozen=True):
    id: int
    text: str | None


class WitnessReport(msgspec.Struct, tag="witness-report", frozen=True):
    id: int
    text: str


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """The recorder will not answer (e.g. a proof for a size the log has not got)."""

    id: int
    reason: str


class Broken(msgspec.Struct, tag="broken", frozen=True):
    """The recorder cannot answer: what it would read from is damaged (a tile)."""

    id: int
    reason: str


Reply = (Appended | Lines | Proof | Blob | Health | Checkpoint | WitnessReport | Refused
         | Broken)


WRITE_WAIT_SAID_S = 1.0  # a write waiting longer is said by /health


def write_waits(waited: float) -> str:
    """/health's words for a write of the log that has waited `waited` seconds."""
    return (f"an audit log write has waited {waited:.0f} s: the log's disk, or PostgreSQL "
            "in a cluster, does not finish it, or the primary process itself is stuck "
            "(signing waits, and fails once the write is given up on)")
