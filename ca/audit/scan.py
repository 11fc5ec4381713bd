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


def made_unrecorded(path: Path, label: str) -> int | None:
    """The seq of the `hsm.keygen` line of the log at `path` that made the key `label`,
    if no line records that key (`key.rotate`, `key.stage`, the root's `key.ceremony`),
    or each that did is voided: a rotation that stopped between the two. Else None.
    Labels carry a time and random letters: few lines name one."""
    made, recording = None, set()
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = data.rfind(b"\n") + 1
            for line in lines_with(data, json.dumps(label).encode(), 0, end):
                if line.get("event") == "hsm.keygen" and line.get("label") == label:
                    made = made if made is not None else line.get("seq")
                elif line.get("event") in ("key.rotate", "key.stage", "key.ceremony"):
                    recording.add(line.get("seq"))
            if recording:  # a line whose commit failed is voided (ca/lifecycle.py)
                recording -= {line.get("voids") for line in lines_with(
                    data, b'"event":"record.void"', 0, end)
                    if line.get("voided") in ("key.rotate", "key.stage")}
    except (OSError, ValueError):  # (an empty file cannot be mapped)
        return None
    return made if isinstance(made, int) and not recording else None
