"""Revocations the audit log records and the inventory lacks, applied at start.

A revocation writes its `cert.revoke` line first and commits it to the inventory
after (a revocation the log does not show never happened). A stop between the two (a
kill, a power cut), or a backup whose inventory was copied between them, leaves a
revocation the log records and the inventory does not: the certificate would be
served as good, renewed and accepted. The log is the record, so at start the daemon
completes what it says: each serial a `cert.revoke` line names that the inventory
has but does not show revoked is revoked, with the line's reason and time.

(SSH certificates issued on the strength of those go with them, as in any revocation.
The log is scanned whole, for the one byte string every such line holds: about a
second per gigabyte.)
"""

from __future__ import annotations

import datetime as dt
import json
import mmap
from dataclasses import dataclass
from pathlib import Path

from ca.store import Store

_MARK = b'"event":"cert.revoke"'


@dataclass(frozen=True)
class Logged:
    seq: int
    serials: tuple[int, ...]
    reason: str | None
    at: dt.datetime


def logged_revocations(path: Path) -> list[Logged]:
    """Every `cert.revoke` line of the log at `path` (none if it is empty or absent)."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return []
    out: list[Logged] = []
    with fh:
        if not fh.seek(0, 2):
            return []
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(_MARK)
            while at >= 0:
                start = data.rfind(b"\n", 0, at) + 1
                end = data.find(b"\n", at)
                if end < 0:
                    break  # a torn last line: the log's own start-up recovery cuts it
                try:
                    line = json.loads(data[start:end])
                    out.append(Logged(int(line["seq"]),
                                      tuple(int(s, 16) for s in line.get("serials") or ()),
                                      line.get("reason"), dt.datetime.fromisoformat(line["ts"])))
                except (ValueError, KeyError, TypeError):
                    pass  # not a line the log wrote: `hsmca audit verify` says so
                at = data.find(_MARK, end)
    return out


async def apply_logged_revocations(path: Path, store: Store) -> list[Logged]:
    """Revoke in the inventory what the log's `cert.revoke` lines name and the
    inventory does not show revoked; the lines that had any such serial."""
    import asyncio
    found = await asyncio.to_thread(logged_revocations, path)
    if not found:
        return []
    revoked = {serial for serial, *_ in await store.revoked_certs()}
    completed = []
    for entry in found:
        missing = [s for s in entry.serials if s not in revoked]
        if not missing:
            continue
        done = await store.revoke_certs(missing, entry.at, entry.reason)
        revoked.update(missing)
        if done.serials:  # (a serial the inventory never had is not the log's to add)
            completed.append(entry)
    return completed
