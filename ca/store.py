"""The inventory: certificates, bootstrap tokens, SSH certificates (SQLite).

Kept behind this small class so that another database can back it later.

Writes go through one thread that group-commits: every write that arrived while
the previous COMMIT (an fsync, with synchronous=FULL) ran is applied in the next
transaction, each in its own SAVEPOINT so one failing write cannot undo the others.
A caller's future resolves only after the COMMIT, so a row the daemon acknowledged
survives a crash. Reads use their own connection (WAL lets them run beside the
writer). Bootstrap tokens are stored as the SHA-256 of the secret only.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hsm.completion import STOP, Batch, Coalescer, Sink, async_sink, claim, drain_queue, stop_thread

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS certs (
    serial TEXT PRIMARY KEY,          -- hex, lower case
    fingerprint TEXT NOT NULL UNIQUE, -- SHA-256 of the DER certificate
    role TEXT NOT NULL,
    subject TEXT NOT NULL,
    names TEXT NOT NULL,              -- JSON list
    principals TEXT NOT NULL,         -- JSON list
    spki_sha256 TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    revoked_at TEXT,
    reason TEXT,
    der BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    names TEXT NOT NULL,
    principals TEXT NOT NULL,
    expires TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    used_at TEXT,
    used_serial TEXT
);
CREATE TABLE IF NOT EXISTS ssh_certs (
    serial TEXT PRIMARY KEY,          -- decimal uint64
    key_id TEXT NOT NULL,
    cert_type TEXT NOT NULL,          -- user | host
    key_sha256 TEXT NOT NULL,         -- SHA-256 of the subject public key blob
    public_key TEXT NOT NULL,
    principals TEXT NOT NULL,
    valid_after TEXT NOT NULL,
    valid_before TEXT NOT NULL,
    owner_serial TEXT NOT NULL,       -- the X.509 cert that asked for it
    issued_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX IF NOT EXISTS ssh_certs_key_id ON ssh_certs(key_id);
CREATE INDEX IF NOT EXISTS ssh_certs_key ON ssh_certs(key_sha256);
CREATE TABLE IF NOT EXISTS ssh_revoked_keys (
    public_key TEXT PRIMARY KEY,
    revoked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS crls (
    number INTEGER PRIMARY KEY,       -- CRLNumber
    revoked INTEGER NOT NULL,         -- how many revocations it lists
    this_update TEXT NOT NULL,
    der BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class CertRecord:
    serial: str
    fingerprint: str
    role: str
    subject: str
    names: list[str]
    principals: list[str]
    spki_sha256: str
    not_before: str
    not_after: str
    revoked_at: str | None
    reason: str | None


_CERT_COLS = ("serial, fingerprint, role, subject, names, principals, spki_sha256, not_before, "
              "not_after, revoked_at, reason")


def _cert(r: tuple[Any, ...]) -> CertRecord:
    return CertRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6], r[7],
                      r[8], r[9], r[10])


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA synchronous=FULL")
    return db


class Store:
    def __init__(self, path: Path, autocheckpoint: bool = True) -> None:
        """`autocheckpoint=False` for the workers: the commit that fills the WAL would
        otherwise copy it into the database there and then (hundreds of milliseconds
        on a slow disk), stalling its worker's every signature behind it; the primary
        checkpoints in the background instead (`wal_checkpoint`)."""
        self.path = path
        w = _connect(path)
        w.execute("PRAGMA journal_mode=WAL")
        if not autocheckpoint:
            w.execute("PRAGMA wal_autocheckpoint=0")
        w.executescript(SCHEMA)
        self._writer_db = w
        self._reader = _connect(path)
        self._read_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self._thread = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        stop_thread(self._thread, self._queue)
        self._writer_db.close()
        self._reader.close()

    # ---- writes -------------------------------------------------------------------------

    def write_future(self, fn: Callable[[sqlite3.Connection], T]) -> cf.Future[T]:
        fut: cf.Future[T] = cf.Future()
        self._queue.put((fn, fut))
        return fut

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(db)` in the writer's next transaction; return once it is committed."""
        fut, sink = async_sink()
        self._coalescer.put(sink[0], (fn, sink))
        return await fut  # type: ignore[no-any-return]

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.write_future(fn).result()

    def _write_loop(self) -> None:
        db = self._writer_db
        while True:
            batch = drain_queue(self._queue, self._queue.get())
            stop = STOP in batch
            jobs = [j for j in batch if j is not STOP]
            if jobs:
                self._run_batch(db, jobs)
            if stop:
                return

    @staticmethod
    def _run_batch(db: sqlite3.Connection, jobs: list[Any]) -> None:
        results: list[tuple[Sink, bool, Any]] = []
        claimed: list[Sink] = []
        out = Batch()
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn, fut in jobs:
                if not claim(fut):
                    continue
                claimed.append(fut)
                db.execute("SAVEPOINT job")
                try:
                    value = fn(db)
                except BaseException as exc:
                    db.execute("ROLLBACK TO job")
                    db.execute("RELEASE job")
                    results.append((fut, False, exc))
                    continue
                db.execute("RELEASE job")
                results.append((fut, True, value))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for fut in claimed:  # the whole transaction is gone: every job failed
                out.fail(fut, exc)
            out.flush()
            return
        for fut, ok, value in results:
            if ok:
                out.ok(fut, value)
            else:
                out.fail(fut, value)
        out.flush()

    def wal_checkpoint(self) -> None:
        """Copy the WAL into the database without waiting for, or blocking, anyone
        (PASSIVE); blocking, for a thread of its own."""
        db = _connect(self.path)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    # ---- reads --------------------------------------------------------------------------

    def read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    # ---- CRLs -------------------------------------------------------------------------

    def latest_crl(self) -> tuple[int, int, str, bytes] | None:
        """(number, revocations listed, this_update, DER) of the newest CRL any process
        of the daemon signed."""
        rows = self.read("SELECT number, revoked, this_update, der FROM crls "
                         "ORDER BY number DESC LIMIT 1")
        return (int(rows[0][0]), int(rows[0][1]), rows[0][2], rows[0][3]) if rows else None

    # ---- certificates -------------------------------------------------------------------

    @staticmethod
    def insert_cert(db: sqlite3.Connection, *, serial: int, fingerprint: str, role: str,
                    subject: str, names: list[str], principals: list[str], spki_sha256: str,
                    not_before: str, not_after: str, issued_at: str, der: bytes) -> None:
        db.execute(
            "INSERT INTO certs (serial, fingerprint, role, subject, names, principals, "
            "spki_sha256, not_before, not_after, issued_at, der) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (format(serial, "x"), fingerprint, role, subject, json.dumps(names),
             json.dumps(principals), spki_sha256, not_before, not_after, issued_at, der))

    def add_cert(self, **fields: Any) -> None:
        self.write_sync(lambda db: self.insert_cert(db, **fields))

    def cert(self, serial: int) -> CertRecord | None:
        rows = self.read(f"SELECT {_CERT_COLS} FROM certs WHERE serial = ?",
                         (format(serial, "x"),))
        return _cert(rows[0]) if rows else None

    def cert_by_fingerprint(self, fingerprint: str) -> CertRecord | None:
        rows = self.read(f"SELECT {_CERT_COLS} FROM certs WHERE fingerprint = ?", (fingerprint,))
        return _cert(rows[0]) if rows else None

    def revoked(self) -> list[tuple[str, str, str | None]]:
        """(serial hex, revoked_at, reason) of every revoked certificate."""
        return [(r[0], r[1], r[2]) for r in self.read(
            "SELECT serial, revoked_at, reason FROM certs WHERE revoked_at IS NOT NULL")]
