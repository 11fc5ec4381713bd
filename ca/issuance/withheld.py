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
from pathlib import Path

from ca.fileutil import fsync_dir

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
