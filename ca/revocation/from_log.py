"""What the audit log records and the inventory lacks, completed at start.

A revocation writes its `cert.revoke` (or `ssh.revoke`) line first and commits it to the inventory
after (a revocation the log does not show never happened). A stop between the two (a
kill, a power cut), or a backup whose inventory was copied between them, leaves a
revocation the log records and the inventory does not: the certificate would be
served as good, renewed and accepted. The log is the record, so before the daemon
serves (and before `store move` copies the inventory) each serial a `cert.revoke`
line names that the inventory has but does not show revoked is revoked, with the
line's reason and time (and, for keyCompromise, the lineage recorded meanwhile); and
each issuing key a `key.revoke` line names whose CA certificate the inventory does
not show revoked.

Likewise the CRL numbers: an inventory older than its log (a restored backup) would
hand out numbers its log shows signed already, and a relying party holding the
higher-numbered CRL keeps it, revocations since unseen (RFC 5280 5.2.3: the number
only grows). The next number is made larger than every one the log's `crl` intents
name.

The inventory keeps how far into each log this was done (`log_scanned`), so a start
reads only what was written since: a whole log would cost a second per gigabyte at
every start. An inventory restored from an older backup has the older mark, and so
reads from there. A mark the file does not fit (shorter, or not at a line's end: a
log replaced) is read from the start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ca.audit.scan import lines_with
from ca.revocation.adopted import from_line
from ca.store import SSHSelector, Store

_MARK = b'"event":"cert.revoke"'
_SSH_MARK = b'"event":"ssh.revoke"'
_CRL_MARK = b'"purpose":"crl"'
_ADOPT_MARK = b'"event":"cert.adopt"'
_VOID_MARK = b'"event":"record.void"'
_KEY_MARK = b'"event":"key.revoke"'


@dataclass(frozen=True)
class Logged:
    seq: int
    serials: tuple[int, ...]
    reason: str | None
    at: dt.datetime
    lineage: bool = False  # keyCompromise: the renewals recorded meanwhile go too


@dataclass(frozen=True)
class LoggedSSH:
    seq: int
    which: SSHSelector
    public_key: str | None  # the key barred (OpenSSH), on lines that name one
    at: dt.datetime


@dataclass(frozen=True)
class Scanned:
    revocations: list[Logged]
    highest_crl_number: int  # 0 if none
    end: int  # the byte after the last whole line read
    ssh_revocations: list[LoggedSSH] = field(default_factory=list)
    adoptions: list[dict[str, Any]] = field(default_factory=list)  # cert.adopt lines
    # key.revoke lines: (the revocation of an issuing key's CA certificate, label)
    key_revocations: list[tuple[Logged, str]] = field(default_factory=list)


def scan(path: Path, start: int) -> Scanned:
    """The `cert.revoke` lines and the highest CRL number of the log at `path`, from
    byte `start` (or from the beginning, if the file does not fit it)."""
    revocations: list[Logged] = []
    ssh: list[LoggedSSH] = []
    adoptions: list[dict[str, Any]] = []
    keys: list[tuple[Logged, str]] = []
    voids: dict[int, set[int] | None] = {}  # a revocation's seq: the serials it lost, or all
    highest = 0
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return Scanned([], 0, 0)
    with fh:
        size = fh.seek(0, 2)
        if not size:
            return Scanned([], 0, 0)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = data.rfind(b"\n") + 1  # a torn last line: start-up recovery cuts it
            if not 0 < start <= end or data[start - 1:start] != b"\n":
                start = 0
            for mark in (_MARK, _SSH_MARK, _CRL_MARK, _ADOPT_MARK, _VOID_MARK, _KEY_MARK):
                for line in lines_with(data, mark, start, end):
                    if mark is _VOID_MARK:
                        _void(line, voids)
                    elif mark is _KEY_MARK:
                        if (entry := _revocation(line, "serial")) is not None and \
                                isinstance(label := line.get("label"), str):
                            keys.append((entry, label))
                    elif mark is _ADOPT_MARK:
                        adoptions.append(line)
                    elif mark is _MARK:
                        if (entry := _revocation(line)) is not None:
                            revocations.append(entry)
                    elif mark is _SSH_MARK:
                        if (ssh_entry := _ssh_revocation(line)) is not None:
                            ssh.append(ssh_entry)
                    elif line.get("phase") == "intent":
                        n = line.get("crl_number")
                        if isinstance(n, int) and not isinstance(n, bool):
                            highest = max(highest, n)
    # A revocation whose commit found its certificates revoked already (another
    # request's, at once) is not replayed: the other's reason and time are the ones.
    revocations = [kept for e in sorted(revocations, key=lambda e: e.seq)
                   if (kept := _unvoided(e, voids)) is not None]
    # As for SSH revocations: one that lost its race is voided (ca/revocation, a review)
    ssh = [e for e in ssh if e.seq not in voids]
    return Scanned(revocations, highest, end, sorted(ssh, key=lambda e: e.seq), adoptions,
                   [(e, label) for e, label in keys if e.seq not in voids])


def _revocation(line: dict[str, Any], one: str | None = None) -> Logged | None:
    """A cert.revoke line (its `serials`), or with `one` a line naming one serial."""
    try:
        serials = [line[one]] if one else line.get("serials") or ()
        return Logged(int(line["seq"]), tuple(int(s, 16) for s in serials),
                      line.get("reason"), dt.datetime.fromisoformat(line["ts"]),
                      line.get("lineage") is True)
    except (ValueError, KeyError, TypeError):
        return None


def _void(line: dict[str, Any], voids: dict[int, set[int] | None]) -> None:
    seq, serials = line.get("voids"), line.get("serials")
    if line.get("voided") not in ("cert.revoke", "key.revoke", "ssh.revoke") or \
            type(seq) is not int:
        return
    try:
        voids[seq] = None if serials is None else {int(s, 16) for s in serials}
    except (ValueError, TypeError):
        return  # not a line the log wrote: `hsmca audit verify` says so


def _unvoided(entry: Logged, voids: dict[int, set[int] | None]) -> Logged | None:
    if entry.seq not in voids:
        return entry
    lost = voids[entry.seq]
    if lost is None:
        return None
    return dataclasses.replace(entry, serials=tuple(s for s in entry.serials if s not in lost))


def _ssh_revocation(line: dict[str, Any]) -> LoggedSSH | None:
    try:
        serial = line.get("serial")
        which = SSHSelector(serial=int(serial) if serial is not None else None,
                            key_id=line.get("key_id"), key_sha256=line.get("public_key_sha256"))
        if which.serial is None and which.key_id is None and which.key_sha256 is None:
            return None
        key = line.get("public_key")
        return LoggedSSH(int(line["seq"]), which, key if isinstance(key, str) else None,
                         dt.datetime.fromisoformat(line["ts"]))
    except (ValueError, KeyError, TypeError):
        return None


async def complete_from_log(path: Path, store: Store, log: str) -> list[Logged]:
    """Complete in the inventory what the log `log` (its file at `path`) records since
    the inventory's mark: revocations (of CA certificates too), the CRL counter; then
    move the mark. The
    revocation lines that had a serial to complete."""
    found = await asyncio.to_thread(scan, path, await store.log_scanned(log))
    if found.highest_crl_number:
        await store.keep_crl_numbers_above(found.highest_crl_number)
    # A certificate an admin gave to revoke (after a restore) that the inventory lacks:
    # recorded from its line first, so that the revocation after it has it to revoke.
    for line in found.adoptions:
        new = from_line(line, log or None)
        if new is not None and await store.cert(new.serial) is None:
            await asyncio.wrap_future(store.add_cert(new))
    completed = await _revoke(found.revocations, store)
    # An issuing key's CA certificate (`hsmca key revoke`): its line, then the commit.
    for entry, label in found.key_revocations:
        if await store.revoke_ca_key(label, entry.at, entry.reason):
            completed.append(entry)
    for entry in found.ssh_revocations:  # idempotent: it marks only what is unmarked
        await store.revoke_ssh(entry.which, entry.at, entry.public_key)
    await store.set_log_scanned(log, found.end)
    return completed


async def _revoke(found: list[Logged], store: Store) -> list[Logged]:
    """Revoke in the inventory what the lines name and the inventory does not show
    revoked; the lines that had any such serial."""
    if not found:
        return []
    reasons = {serial: reason for serial, _, reason, _ in await store.revoked_certs()}
    revoked = set(reasons)
    completed = []
    for entry in found:
        # A line that made a revocation's reason keyCompromise is missing too while the
        # inventory has the old reason: the key bar reads the reason.
        missing = [s for s in entry.serials if s not in revoked or (
            entry.reason == "keyCompromise" and reasons.get(s) != "keyCompromise")]
        if not missing:
            continue
        if entry.lineage:
            # A renewal recorded while the line was written found its parent unrevoked,
            # and the revocation's own second look (its sweep) never ran: walk it here.
            family = set(missing)
            for serial in missing:
                family.update(await store.lineage(serial, dt.datetime.now(dt.UTC)))
            missing = sorted(set(missing) | (family - revoked))
        done = await store.revoke_certs(missing, entry.at, entry.reason)
        revoked.update(missing)
        reasons.update({s: entry.reason for s in done.serials})
        if done.serials:  # (a serial the inventory never had is not the log's to add)
            completed.append(entry)
    return completed
