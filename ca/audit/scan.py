"""Finding the few lines of an audit log that name something, without parsing the
rest: a byte search over the mapped file (a whole log, read once, at start)."""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def lines_with(data: mmap.mmap, mark: bytes, start: int, end: int
               ) -> Iterator[dict[str, Any]]:
    """The whole lines between `start` and `end` that hold `mark`, parsed."""
    at = data.find(mark, start, end)
    while at >= 0:
        first = max(data.rfind(b"\n", start, at) + 1, start)
        last = data.find(b"\n", at, end)
        if last < 0:
            return
        try:
            line = json.loads(data[first:last])
        except ValueError:
            line = None  # not a line the log wrote: `hsmca audit verify` says so
        if isinstance(line, dict):
            yield line
        at = data.find(mark, last, end)


RECORDING = ("key.rotate", "key.stage", "key.ceremony")
# Lines that act on a key the inventory held: a change recorded for it committed.
TAKEN_UP = ("key.retire", "key.destroy", "key.revoke", "hsm.destroy")


def made_unrecorded(path: Path, label: str) -> int | None:
    """The seq of the `hsm.keygen` line of the log at `path` that made the key `label`,
    if no line records that key (`key.rotate`, `key.stage`, the root's `key.ceremony`),
    or each that did is voided: a rotation that stopped between the two. Else None.
    Labels carry a time and random letters: few lines name one."""
    made, standing, _ = _key_lines(path, label)
    return made if made is not None and not standing else None


def rotation_never_committed(path: Path, label: str) -> dict[str, Any] | None:
    """The standing `key.rotate` or `key.stage` line of the key `label`, which the log
    at `path` made, when nothing ever signed with that key: for a key the inventory
    lacks, a rotation stopped between its line and its commit (a kill), whose line
    stands for a change that never happened. Else None."""
    made, standing, used = _key_lines(path, label)
    if made is None or used or len(standing) != 1 \
            or standing[0].get("event") not in ("key.rotate", "key.stage") \
            or standing[0].get("label") != label:
        return None
    return standing[0]


def promotions_never_committed(path: Path, label: str) -> list[dict[str, Any]]:
    """The standing `key.rotate` lines that put the staged key `label` in use: for a key
    the inventory still holds as staged, a promotion stopped between its line and its
    commit (a kill), whose line stands for a change that never happened (a review)."""
    _, standing, used = _key_lines(path, label)
    if used or any(line.get("previous") == label or line.get("active") == label
                   for line in standing):
        # It signed, or a later rotation replaced it or staging named it active: the
        # promotion committed (an inventory restored from before it holds the key as
        # staged: a review)
        return []
    return [line for line in standing if line.get("event") == "key.rotate"
            and line.get("label") == label and line.get("staged") is True]


def _key_lines(path: Path, label: str) -> tuple[int | None, list[dict[str, Any]], bool]:
    """The seq of the hsm.keygen line that made `label`, the lines recording it that
    stand (not voided), and whether it was taken up: an hsm.sign intent used it, or a
    line retired, destroyed or revoked it (a staged key signs nothing: a review saw
    one voided after its retire and destroy, its token restored from a backup)."""
    made: int | None = None
    recording: list[dict[str, Any]] = []
    used = False
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = data.rfind(b"\n") + 1
            for line in lines_with(data, json.dumps(label).encode(), 0, end):
                if line.get("event") == "hsm.keygen" and line.get("label") == label:
                    seq = line.get("seq")
                    made = made if made is not None or not isinstance(seq, int) else seq
                elif line.get("event") in RECORDING:
                    recording.append(line)
                elif line.get("event") in TAKEN_UP and line.get("label") == label:
                    used = True
            # (an intent names its key by URI: ...;object=LABEL;type=private)
            used = used or any(line.get("event") == "hsm.sign" for line in lines_with(
                data, f"object={label};".encode(), 0, end))
            if recording:  # a line whose commit failed is voided (ca/lifecycle.py)
                voided = {line.get("voids") for line in lines_with(
                    data, b'"event":"record.void"', 0, end)
                    if line.get("voided") in ("key.rotate", "key.stage")}
                recording = [r for r in recording if r.get("seq") not in voided]
    except (OSError, ValueError):  # (an empty file cannot be mapped)
        return None, [], False
    return made, recording, used
