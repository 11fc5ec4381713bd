"""Certificates withheld after their "ok" outcome, noted durably for the next start.

A certificate is withheld when a check after its signing failed (a renewal's check that
no revocation raced it, given up on by PostgreSQL): its client gets a 503. Its
`sign.withheld` line may not be writable then (the same outage), and a line the log
owes lives in memory only, so a stop before the log was back lost it, and the
certificate stayed valid with nobody holding it (a review). So it is noted here first,
beside the audit log; the next start revokes what this file names
(ca/daemon/primary.py), then removes it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from pathlib import Path

import structlog

from ca.fileutil import fsync_dir

log = structlog.get_logger("hsmca.issue")

# (purpose as the intent writes it, the serial as the intent writes it, the intent's seq)
Withheld = tuple[str, str, int]


def note_withheld(path: Path, item: Withheld) -> None:
    """Noted before the client hears. One short line per write, appended: the workers'
    writes do not interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        new = os.fstat(fd).st_size == 0
        os.write(fd, (json.dumps(list(item)) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def read_withheld(path: Path) -> list[Withheld]:
    """What `note_withheld` noted (a torn last line is left out: its 503 never went)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    items: list[Withheld] = []
    for line in text.splitlines():
        try:
            purpose, serial, seq = json.loads(line)
        except (ValueError, TypeError):
            continue
        if isinstance(purpose, str) and isinstance(serial, str) and isinstance(seq, int):
            items.append((purpose, serial, seq))
    return items


def withheld_noter(path: Path, issuing: Collection[str],
                   then: Callable[[Withheld], None] | None = None
                   ) -> Callable[[str, str, int], bool]:
    """The signing pipeline's `on_withheld`: a certificate (of a purpose in `issuing`)
    noted at `path`, on the caller's loop (rare, and one small fsync), then handed to
    `then` (a worker's revocation queue; the primary has none, and its next start
    revokes it)."""
    def note(purpose: str, serial: str, seq: int) -> bool:
        if purpose not in issuing:
            return False
        try:
            note_withheld(path, (purpose, serial, seq))
        except OSError as exc:
            log.error("cannot note a certificate withheld for the next start: revoke it by "
                      "hand if a stop comes before it is revoked", purpose=purpose,
                      serial=serial, error=str(exc))
        if then is not None:
            then((purpose, serial, seq))
        return True
    return note
