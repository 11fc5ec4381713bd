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

Likewise the CRL numbers: an inventory older than its log (a restored backup) would
hand out numbers its log shows signed already, and a relying party holding the
higher-numbered CRL keeps it, revocations since unseen (RFC 5280 5.2.3: the number
only grows). The next number is made larger than every one the log's `crl` intents
name.
"""

from __future__ import annotations

import datetime as dt
import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ca.store import Store

_MARK = b'"event":"cert.revoke"'
_CRL_MARK = b'"purpose":"crl"'


@dataclass(frozen=True)
class Logged:
    seq: int
    serials: tuple[int, ...]
    reason: str | None
    at: dt.datetime
    lineage: bool = False  # keyCompromise: the renewals recorded meanwhile go too


def _lines_with(path: Path, mark: bytes) -> Iterator[dict[str, Any]]:
    """The lines of the log at `path` that hold `mark`, parsed."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        if not fh.seek(0, 2):
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(mark)
            while at >= 0:
                start = data.rfind(b"\n", 0, at) + 1
                end = data.find(b"\n", at)
                if end < 0:
                    return  # a torn last line: the log's own start-up recovery cuts it
                try:
                    line = json.loads(data[start:end])
                except ValueError:
                    line = None  # not a line the log wrote: `hsmca audit verify` says so
                if isinstance(line, dict):
                    yield line
                at = data.find(mark, end)


def logged_revocations(path: Path) -> list[Logged]:
    """Every `cert.revoke` line of the log at `path` (none if it is empty or absent)."""
    out: list[Logged] = []
    for line in _lines_with(path, _MARK):
        try:
            out.append(Logged(int(line["seq"]),
                              tuple(int(s, 16) for s in line.get("serials") or ()),
                              line.get("reason"), dt.datetime.fromisoformat(line["ts"]),
                              line.get("lineage") is True))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def highest_crl_number(path: Path) -> int:
    """The largest CRL number the log's `crl` intents name (0 if none)."""
    numbers = [line.get("crl_number") for line in _lines_with(path, _CRL_MARK)
               if line.get("phase") == "intent"]
    return max((n for n in numbers if isinstance(n, int) and not isinstance(n, bool)),
               default=0)


async def keep_crl_numbers_ahead(path: Path, store: Store) -> int:
    """Make the store's next CRL number larger than any the log names; that number."""
    import asyncio
    highest = await asyncio.to_thread(highest_crl_number, path)
    if highest:
        await store.keep_crl_numbers_above(highest)
    return highest


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
        if entry.lineage:
            # A renewal recorded while the line was written found its parent unrevoked,
            # and the revocation's own second look (its sweep) never ran: walk it here.
            family = set(missing)
            for serial in missing:
                family.update(await store.lineage(serial, dt.datetime.now(dt.UTC)))
            missing = sorted(family - revoked)
        done = await store.revoke_certs(missing, entry.at, entry.reason)
        revoked.update(missing)
        if done.serials:  # (a serial the inventory never had is not the log's to add)
            completed.append(entry)
    return completed
