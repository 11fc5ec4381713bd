"""The append-only operation log: one writer, canonical JSON lines, group commit.

docs/audit-log.md fixes the format; ca/audit/line.py holds its rules. This module
owns the file: it holds an exclusive lock, recovers a torn tail at open, refuses a
log that no longer matches its tiles or its last checkpoint, and appends through
one writer thread that covers every line that arrived during the previous
fdatasync with the next one (group commit). A caller's future resolves only once
its line is durable; if the disk refuses, the batch is cut back off the file and
every caller gets AuditUnavailable (fail closed).

The Merkle tree over the lines is kept as C2SP tiles beside the log
(ca/audit/tiles.py, `state-dir/audit/tiles/`), extended with each group commit, so
that opening the log reads only what the tiles do not cover (under 256 lines after
a clean stop) and memory does not grow with the log. Proofs, tiles and entry
bundles are served from them. What opening checks, and what a damaged or missing
tile directory means, is `AuditLog.open`'s docstring.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.line import CHECKPOINT_FIELD, GENESIS, chain_hash, line_bytes
from ca.audit.merkle import HASH_SIZE, Growth, TreeHead, growth, leaf_hash, leaf_hashes
from ca.audit.note import Checkpoint, NoteError, parse_checkpoint, verify_checkpoint
from ca.audit.scan import lines_with
from ca.audit.tiles import (
    MAX_ENTRY_BYTES,
    TILE_WIDTH,
    FileTileStore,
    Tile,
    TileDamaged,
    TiledTree,
    TileStore,
    entry_bundle,
    stored_tiles,
)
from ca.fileutil import copy_new, fsync_dir
from ca.handoff import (
    STOP,
    Batch,
    Coalescer,
    Settled,
    Sink,
    async_sink,
    claim,
    drain_queue,
    stop_thread,
)
from hsm.errors import AuditUnavailable

log = structlog.get_logger("hsmca.audit")
TILES_DIR = "tiles"  # beside the log
# A failed batch that took this long was given up on (a mirror's database that stopped
# answering), not refused (a full disk refuses at once): see AuditLog._refusing.
SLOW_FAILURE_S = 1.0
_READ_BLOCK = 4 << 20  # bytes read at a time when a whole log is read (building tiles)


# Makes a group of lines (first seq, lines without their newlines) durable elsewhere too,
# or raises OSError: then the group is cut off the file and fails like a disk error.
Mirror = Callable[[int, list[bytes]], None]
# The audit key a start checks the last checkpoint with: the active one, or it first and
# then the previous one still in use (ca.audit.checkpointer.published_keys); None:
# not checked.
AuditKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey] | None



# A restore done under a running daemon is the likeliest cause: its files are the CA's
# only once the daemon is stopped (an operator's trial read "restore it" just after one).
_RESTORING = (" (if a backup is being restored: stop this daemon first, a restore is made "
              "with it stopped)")


class _NotTheLog(OSError):
    """The open file is no longer the log at its path, as hsmca wrote it."""


class LinesRewritten(TileDamaged):
    """Lines asked for that no longer hash to their leaves: not served. The recorder
    answers it as it does a damaged tile (503, saying why)."""


def _said(exc: OSError) -> str:
    """A write error's words, and for a full disk what to do (a full-disk trial read
    only "No space left on device")."""
    said = str(exc.strerror or exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        said += " (free space on that disk: signing resumes by itself once it can write)"
    return said


class AuditLogError(Exception):
    """The log cannot be opened safely; the message tells the operator what to look at."""


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Open with `AuditLog.open(path)`; append with `record()` or `await append()`."""

    def __init__(self, path: Path, fd: int, store: TileStore, tree: TiledTree,
                 size_bytes: int, prev: str, edge_offsets: list[int],
                 pending_ends: list[int], mirror: Mirror | None = None) -> None:
        self.path = path
        # Cluster mode: where each group commit is also made durable (PostgreSQL), after
        # the file's fdatasync and before any caller hears of it (docs/cluster.md).
        self._mirror = mirror
        self._fd = fd
        self._size_bytes = size_bytes
        self._next_seq = tree.size
        self._prev = prev
        # The Merkle tree: its right-hand edge in memory, the rest in `store` (tiles).
        self._tree = tree
        self._store = store
        # Where the lines of the bundle at the right-hand edge start (fewer than 256),
        # and where the full bundles the store does not hold yet end: with the
        # store's bundle index, where any line starts, without an offset per line.
        self._edge_offsets = edge_offsets
        self._pending_ends = pending_ends
        self._stored_bundles = store.committed()
        # Guards the tree, the offsets and the sizes for readers on other threads.
        self._tree_lock = threading.Lock()
        # Held for each commit: by the writer thread, or by a worker thread appending
        # its own lines (append_durable), so the chain has one order whoever writes.
        self._write_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self._problem: str | None = None
        # The file is no longer what hsmca wrote (cut, appended to, replaced, moved,
        # deleted), in _check_file's words, while _problem stands: /health says it apart
        # for auditors' tools, which fail on it (a web view stayed green beside it).
        self._changed: str | None = None
        self._writing_since: float | None = None  # time.monotonic() of the commit under way
        self._failed: str | None = None  # why the last batch failed, until one goes through
        # The last batch failed slowly (the mirror's database stopped answering, and its
        # commit was given up after seconds): until one goes through, only the retry
        # (a log.resume line, every second) tries; the others are refused at once. Each
        # tried again and waited its own timeout, behind the write lock: a trial's
        # clients waited 20 to 50 s for their 503, and a stop half a minute.
        self._refusing = False
        # Bundles under the tiles whose lines no longer hash to their leaves, or cannot
        # be checked, and what was found, by the recorder's reads and by check_on_disk's
        # thread alike, each cleared on its own when put back. Nothing is written while
        # any is.
        self._damage: dict[int, _Finding] = {}
        self._damage_lock = threading.Lock()
        self._tiles_said: set[int] = set()  # bundles whose damaged tile was said
        self._saved: Path | None = None  # where the lines of a deleted log file were saved
        self._save_again_at = 0.0  # time.monotonic(): a failed save is tried again then
        self._poisoned = False
        # Outcome lines whose batch failed: the HSM did sign (the result was never
        # released), so the line is owed and goes first once the disk takes writes
        # again; otherwise its intent would stay open with no crash to excuse it.
        self._owed: list[tuple[str, Mapping[str, Any], Sink]] = []
        self.batches = 0
        self.last_commit_s = 0.0
        # Called from the writer thread after each durable batch: (seconds, lines).
        self.on_commit: Callable[[float, int], None] | None = None
        # Called under the write lock once the tile store holds new tiles: (the tiles,
        # how many full bundles the store covers now). Cluster mode copies them.
        self.on_tiles: Callable[[Sequence[Tile], int], None] | None = None
        self.last_run = LastRun("unknown", 0)  # set by `open`, from the last lines
        self._read_from = 0  # where the lines last_run was read from begin (bytes)
        self._thread = threading.Thread(target=self._writer, name="audit-writer", daemon=True)
        self._thread.start()

    # ---- opening and recovery -----------------------------------------------------------

    @classmethod
    def open(cls, path: Path, checkpoint_path: Path | None = None,
             audit_key: AuditKeys = None, *,
             tiles: Path | None = None, mirror: Mirror | None = None) -> AuditLog:
        """Lock the log, cut a torn tail (recorded as log.recover), check it against its
        tiles and its last checkpoint (the signature too, given the audit key), and
        start the writer.

        Opening reads only the lines after the last full bundle of 256 (those the
        tiles do not hold), and the last full bundle again. It refuses to open
        (AuditLogError, saying what to look at):

        * a log shorter than its tiles, or whose last full bundle no longer has the
          leaf hashes of its tile: the log was cut, replaced or rewritten;
        * a damaged tile directory (a tile or the bundle index missing, short or
          unreadable): tiles are never repaired silently, since a log rewritten
          behind the daemon's back looks the same to them. If the log verifies
          (`hsmca audit verify`), moving the directory aside rebuilds it;
        * a log that does not extend its last checkpoint (computed from the tiles).

        A missing tile directory (the first start of a version with tiles, or one
        moved aside) is built from the whole log, once: then the whole log is read
        and checked against the checkpoint, as every start did before tiles.
        Lines before the last full bundle are not read at start: the daemon reads
        them again once it serves (`check_on_disk`). A rewrite of log and tiles
        together is for the auditors' verification (`hsmca audit verify`, the
        witnesses) to find.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        _lock(fd, path)
        try:
            return cls._recover(path, fd, Path(tiles) if tiles else path.parent / TILES_DIR,
                                checkpoint_path, audit_key, mirror)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _recover(cls, path: Path, fd: int, tiles: Path, checkpoint_path: Path | None,
                 audit_key: AuditKeys, mirror: Mirror | None) -> AuditLog:
        built = not tiles.exists()
        if built:
            _build_tiles(path, fd, tiles)
        try:
            store = FileTileStore(tiles)
        except TileDamaged as exc:
            raise _damaged(tiles, str(exc)) from None
        try:
            return cls._resume(path, fd, store, tiles, checkpoint_path, audit_key, mirror,
                               read_tiles=not built)
        except TileDamaged as exc:
            store.close()
            raise _damaged(tiles, str(exc)) from None
        except BaseException:
            store.close()
            raise

    @classmethod
    def _resume(cls, path: Path, fd: int, store: FileTileStore, tiles: Path,
                checkpoint_path: Path | None, audit_key: AuditKeys,
                mirror: Mirror | None, read_tiles: bool = True) -> AuditLog:
        """`read_tiles`: False when the tiles were just built from the whole log."""
        bundles = store.committed()
        covered = bundles * TILE_WIDTH  # lines the tiles hold
        base = store.bundle_end(bundles - 1) if bundles else 0  # bytes they cover
        file_size = os.fstat(fd).st_size
        if file_size < base:
            raise AuditLogError(
                f"the audit log {path} has {file_size} bytes but its tiles ({tiles}) cover "
                f"its first {covered} lines, {base} bytes: the log was truncated or replaced "
                "(tampering or loss; or a backup was copied over the state directory, whose "
                "old tiles then stay: move them aside, and the start builds them from the "
                "log). Refusing to start; restore the log and run `hsmca audit verify`")
        # The last full bundle again, to check the log against the tiles where they
        # meet, then everything after it.
        start = store.bundle_end(bundles - 2) if bundles >= 2 else 0
        data = os.pread(fd, file_size - start, start)
        if bundles:
            last = data[:base - start].split(b"\n")
            if last.pop() != b"" or len(last) != TILE_WIDTH or (
                    leaf_hashes(last) != store.read_tile(0, bundles - 1)):
                raise AuditLogError(
                    f"lines {covered - TILE_WIDTH} to {covered - 1} of the audit log {path} no "
                    f"longer match its tiles ({tiles}): the log was rewritten, or the tiles "
                    "damaged. Refusing to start; run `hsmca audit verify` on the log: if it "
                    "passes, the tiles are at fault (built from another log, say, by a start "
                    "that then refused it): move them aside and start again, which builds "
                    "them from the log")
            before = last[-1]
        else:
            before = None
        tail = data[base - start:]
        lines = tail.split(b"\n")
        torn = lines.pop()  # bytes after the last "\n": empty unless the last line is torn
        if lines and not torn:
            try:
                obj = json.loads(lines[-1])
                if not isinstance(obj, dict):
                    raise ValueError
            except (ValueError, RecursionError):  # RecursionError: [[[[... nested deep
                torn = lines.pop() + b"\n"  # a complete-looking line that is not JSON
        n = covered + len(lines)
        _check_chain(path, before, lines, covered)
        final = lines[-1] if lines else before
        if final is not None:
            seq = json.loads(final).get("seq")
            if seq != n - 1:
                raise AuditLogError(f"the audit log {path} has {n} lines but its last line says "
                                    f"seq {seq}: lines are missing or duplicated; "
                                    "run `hsmca audit verify` and investigate")
        tree = TiledTree(store)
        edge: list[int] = []
        ends: list[int] = []
        pos = base
        for line, leaf in zip(lines, _leaves(lines), strict=True):
            tree.append(leaf)
            edge.append(pos)
            pos += len(line) + 1
            if len(edge) == TILE_WIDTH:  # a bundle written before a crash, not yet tiled
                ends.append(pos)
                edge = []
        if checkpoint_path is not None:
            cp = cls._check_against_checkpoint(path, checkpoint_path, tree, fd, pos, audit_key,
                                               tiles if read_tiles else None)
            if cp is not None and 0 < cp.size <= n:
                # The lines from the one the checkpoint ends with (seq cp.size - 1) on:
                # those read above, and before them, if it is older, from the file.
                window = (last if bundles else []) + lines
                first = covered - TILE_WIDTH if bundles else 0
                if cp.size - 1 < first:
                    bundle = (cp.size - 1) // TILE_WIDTH
                    at = store.bundle_end(bundle - 1) if bundle else 0
                    window = os.pread(fd, start - at, at).split(b"\n")[:-1] + window
                    first = bundle * TILE_WIDTH
                _check_after_clean_stop(path, window[cp.size - 1 - first:], cp.size)
        prev = chain_hash(final) if final is not None else GENESIS
        audit = cls(path, fd, store, tree, pos, prev, edge, ends, mirror)
        audit.last_run = _last_run((last if bundles else []) + lines)
        audit._read_from = start
        if torn:
            os.ftruncate(fd, pos)
            os.fsync(fd)
            seq = audit.record("log.recover", {"cut_bytes": len(torn),
                                               "cut_sha256": hashlib.sha256(torn).hexdigest(),
                                               "reason": "torn final line"}).result()
            # An operator reads stderr, not the log: a repair at start must be seen.
            log.warning("cut a torn final line off the audit log (a crash mid-write); "
                        "the repair is recorded in the log", log=str(path),
                        cut_bytes=len(torn), recorded_at_seq=seq)
        elif ends:
            with audit._write_lock:
                audit._store_tiles()
        return audit

    @staticmethod
    def _check_against_checkpoint(path: Path, checkpoint_path: Path, tree: TiledTree,
                                  fd: int, size_bytes: int, audit_key: AuditKeys,
                                  tiles: Path | None) -> Checkpoint | None:
        """The log must still hold what the last checkpoint signed. That is the
        checkpoint file, or, if it is gone, the last checkpoint recorded in the log
        itself (deleting one file must not switch the check off). The checkpoint.
        `tiles`: the directory `tree` was read from, None if built from the log now."""
        n = tree.size
        in_file = checkpoint_path.exists()
        if in_file:
            where = str(checkpoint_path)
            try:
                text = checkpoint_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise AuditLogError(f"the last checkpoint {where} cannot be read ({exc}); "
                                    "refusing to start: an operator must look") from None
        else:
            found = _last_logged_checkpoint(fd, size_bytes)
            if found is None:
                return  # a log that never had a checkpoint (a fresh or pre-init state)
            text, seq = found
            where = f"the checkpoint recorded at seq {seq} (the checkpoint file is missing)"
        try:
            cp = _checkpoint_of(text, audit_key)
        except NoteError as exc:
            raise AuditLogError(f"{where} is not a valid checkpoint of this CA ({exc}); "
                                "refusing to start: an operator must look") from None
        old, now = TreeHead(cp.size, cp.root), TreeHead(n, tree.root())
        verdict = growth(old, now, tree.consistency_proof(cp.size) if cp.size <= n else [])
        if verdict is Growth.SHRANK:
            raise AuditLogError(
                f"the audit log {path} has {n} complete lines but {where} covers "
                f"{cp.size}: the log was truncated or replaced (tampering or loss). Refusing to "
                "start; restore the log and run `hsmca audit verify`")
        if verdict is Growth.FORKED:
            # Read from the tiles (the start reads only the lines they do not hold), the
            # tree may be wrong where the log is not: a damaged tile was blamed on the log,
            # which verified (an auditor trial).
            raise AuditLogError(
                f"the first {cp.size} lines of the audit log {path} no longer match {where}: "
                "the log was rewritten. Refusing to start; run `hsmca audit verify`"
                if tiles is None else
                f"the first {cp.size} lines of the audit log {path}, as its tiles ({tiles}) "
                f"hold them, no longer match {where}: the log was rewritten, or the tiles "
                "damaged. Refusing to start; run `hsmca audit verify` on the log: if it "
                "passes, the tiles are at fault: move them aside and start again (hsmca "
                "builds them anew from the log, and checks that against the checkpoint)")
        if in_file and n < cp.size + 2:
            # The file is written once the checkpoint's signing is in the log: its intent
            # (seq cp.size, durable before C_Sign) and its outcome, which carries the note.
            raise AuditLogError(
                f"the audit log {path} ends at {n} lines, but the lines that signed its last "
                f"checkpoint ({where}, over {cp.size} lines) came after those, before the "
                "file was written: the end of the log was cut (tampering or loss). Refusing "
                "to start; restore the log and run `hsmca audit verify`")
        if in_file and (found := _last_logged_checkpoint(fd, size_bytes)) is not None:
            # One the log records may be newer than the file (a crash between the two
            # writes, or an older file put in its place): the newer says where the log
            # stood last, and what may follow it (`_check_after_clean_stop`).
            try:
                logged = _checkpoint_of(found[0], audit_key)
            except NoteError:
                logged = None  # the scan at verification names it; the file's stands
            if logged is not None and logged.size > cp.size:
                return logged
        return cp

    # ---- appending ----------------------------------------------------------------------

    def record(self, event: str, fields: Mapping[str, Any]) -> cf.Future[int]:
        """Queue a line; the future resolves to its seq once it is on disk (OpLog)."""
        fut: cf.Future[int] = cf.Future()
        self._queue.put((event, fields, fut))
        return fut

    def record_async(self, event: str, fields: Mapping[str, Any]) -> asyncio.Future[int]:
        """`record` for the event loop thread: settled with its whole group commit."""
        fut, sink = async_sink()
        self._coalescer.put(sink[0], (event, fields, sink))
        return fut

    def append_durable(self, entries: Sequence[tuple[str, Mapping[str, Any]]]
                       ) -> list[Settled[int]]:
        """Append lines from a worker thread, on that thread, and return once they are
        durable (one write and one fdatasync for all of them; OpLog).

        The HSM thread writes its intents and outcomes this way: handing them to the
        writer thread and waiting would cost two thread wake-ups per group. Each
        returned result is already settled: its seq, or why that line failed.
        """
        futs: list[Settled[int]] = [Settled() for _ in entries]
        items = [(event, fields, fut) for (event, fields), fut in zip(entries, futs,
                                                                       strict=True)]
        if self._refused(items):  # (not behind the write lock, which a retry may hold)
            return futs
        with self._write_lock:
            self._commit(items)
        return futs

    async def append(self, event: str, **fields: Any) -> int:
        return await self.record_async(event, fields)

    def _writer(self) -> None:
        while True:
            # Everything that arrived while the last fdatasync ran.
            batch = drain_queue(self._queue, self._queue.get())
            stop = any(item is STOP for item in batch)
            items = [item for item in batch if item is not STOP]
            if items:
                with self._write_lock:
                    self._commit(items)
            if stop:
                return

    def _refused(self, items: list[tuple[str, Mapping[str, Any], Sink]]) -> bool:
        """Refuse `items` at once, as a failed batch is (its outcomes owed), while the
        log is refusing and they are not the retry."""
        if not self._refusing or any(event == "log.resume" for event, _, _ in items):
            return False
        results = Batch()
        self._owe_and_fail(items, AuditUnavailable(self._problem or "the audit log cannot "
                                                   "be written"), results)
        results.flush()
        return True

    def _commit(self, items: list[tuple[str, Mapping[str, Any], Sink]]) -> None:
        if self._refused(items):
            return
        seq, prev = self._next_seq, self._prev
        chunks: list[bytes] = []
        leaves: list[bytes] = []
        done: list[tuple[Sink, int, str, Mapping[str, Any]]] = []
        ts = utc_now()
        results = Batch()
        owed, self._owed = self._owed, []
        # Whatever batch is the first to go through after a failed one begins with
        # log.resume, saying why writes failed, so the outage shows in the log (the
        # daemon's own retry asks for one every second, but a checkpoint or a request
        # may come first). A retry's own line becomes that line; one that comes once the
        # log is well again is answered by the line already written. (While only the
        # tiles cannot be stored, a retry's line is written: its commit retries them.)
        retries: list[tuple[str, Mapping[str, Any], Sink]] = []
        if self._failed is not None or self._problem is None:
            retries = [item for item in items if item[0] == "log.resume"]
            if retries:
                items = [item for item in items if item[0] != "log.resume"]
        if self._failed is not None:
            owed.insert(0, ("log.resume", {"after": self._failed},
                            retries.pop(0)[2] if retries else cf.Future()))
        for _, _, fut in retries:
            if claim(fut):
                results.ok(fut, self._next_seq - 1)
        for event, fields, fut in owed + items:
            # Even when the caller has given up (cancelled), the line is written: a
            # record is never dropped, and an intent always gets its outcome.
            claim(fut)
            try:
                line = line_bytes(event, fields, seq, ts, prev)
            except (TypeError, ValueError) as exc:
                results.fail(fut, exc)  # a caller's bug must not poison the others' lines
                continue
            if len(line) > MAX_ENTRY_BYTES:  # a C2SP entry bundle gives it a uint16 length
                results.fail(fut, ValueError(f"an audit line of {len(line)} bytes is longer "
                                             f"than the {MAX_ENTRY_BYTES} a line may have"))
                continue
            chunks.append(line + b"\n")
            leaves.append(leaf_hash(line))
            done.append((fut, seq, event, fields))
            prev = chain_hash(line)
            seq += 1
        if not done:
            results.flush()
            return
        blob = b"".join(chunks)
        start = time.perf_counter()
        self._writing_since = time.monotonic()
        try:
            if self._poisoned:
                raise OSError(errno.EIO, "the log tail is in an unknown state")
            # Tiles an earlier batch could not store go first: the tiles never fall
            # more than one batch behind the log, so a start never reads more.
            self._store_tiles()
            self._check_file()
            written = os.write(self._fd, blob)
            while written < len(blob):  # the next write says why the disk took less
                written += os.write(self._fd, blob[written:])
            os.fdatasync(self._fd)
            if self._mirror is not None:
                self._mirror(self._next_seq, [c[:-1] for c in chunks])
        except OSError as exc:
            self._fail_batch(done, exc, results)
            self._refusing = time.perf_counter() - start >= SLOW_FAILURE_S
            return
        finally:
            self._writing_since = None
        self._refusing = False
        self.last_commit_s = time.perf_counter() - start
        pos = self._size_bytes
        with self._tree_lock:
            for leaf, chunk in zip(leaves, chunks, strict=True):
                self._tree.append(leaf)
                self._edge_offsets.append(pos)
                pos += len(chunk)
                if len(self._edge_offsets) == TILE_WIDTH:  # this line ends a bundle
                    self._pending_ends.append(pos)
                    self._edge_offsets = []
            self._size_bytes = pos
            self._next_seq, self._prev = seq, prev
        self._problem = self._failed = self._changed = None
        self.batches += 1
        if self.on_commit is not None:
            self.on_commit(self.last_commit_s, len(done))
        for fut, s, _, _ in done:
            results.ok(fut, s)
        results.flush()
        # After the callers have their answers: the lines are durable, and the tiles
        # can be built again from them. Every 256 lines this stores a tile or two.
        try:
            self._store_tiles()
        except OSError as exc:  # the next batch tries again first, and fails closed
            self._problem = f"cannot write the audit log's tiles: {_said(exc)}"

    def _store_tiles(self) -> None:
        """Store the tiles and bundle ends the tree has and the store has not (under
        the write lock: nothing appends meanwhile)."""
        with self._tree_lock:
            tiles = self._tree.pending()
            ends = list(self._pending_ends)
        if not tiles and not ends:
            return
        self._store.commit(tiles, ends)
        with self._tree_lock:
            self._tree.stored(tiles)
            del self._pending_ends[:len(ends)]
            self._stored_bundles += len(ends)
        if self.on_tiles is not None:
            try:
                self.on_tiles(tiles, self._store.committed())
            except Exception:  # a copy of derived data: never the log's failure
                log.exception("the audit log's tiles could not be handed on")

    def stored_tiles(self, since: int, page: int = 256) -> Iterator[tuple[list[Tile], int]]:
        """tiles.stored_tiles of this log's store, its partial tiles read under the
        write lock (they change with each bundle)."""
        return stored_tiles(self._store, since, page, self._write_lock)

    def _check_file(self) -> None:
        """Refuse to write to a file that is no longer the log: moved or deleted (lines
        written to it would vanish with the file), replaced, or cut or written to by
        something else (lines after it would not chain). Nothing is signed while so;
        once the log is back as it was, writing goes on."""
        if (damage := self._damage_said()) is not None:
            raise _NotTheLog(errno.EBADMSG, damage)
        mine = os.fstat(self._fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            named = None
        if mine.st_nlink == 0:
            # Deleted, or replaced by a copy (`cp log new && mv new log`): the lines since
            # the copy are only in the file this process holds open, which goes at the
            # stop. Saved beside it once, so that "put it back" can be done (a fault
            # trial lost 65 certificates' lines that way).
            saved = self._save_deleted()
            why = (f"was deleted or replaced while hsmca ran; its lines are saved in {saved}: "
                   "stop hsmca and put that file back as the log" if saved is not None else
                   "was deleted or replaced while hsmca ran, and its lines could not be "
                   "saved (see the log); do not stop hsmca before they are: "
                   f"as root, cp /proc/{os.getpid()}/fd/{self._fd} to a safe place (hsmca "
                   "is not dumpable: its own user cannot)")
        elif named is None:
            why = f"was moved or deleted while hsmca ran; put it back{_RESTORING}"
        elif (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
            why = f"was replaced by another file while hsmca ran; put the log back{_RESTORING}"
        elif mine.st_size != self._size_bytes:
            why = (f"was cut or written to by something other than hsmca (it has "
                   f"{mine.st_size} bytes, hsmca wrote {self._size_bytes}); restore it"
                   f"{_RESTORING}")
        else:
            return
        raise _NotTheLog(errno.ESTALE, f"{self.path} {why}")

    def _save_deleted(self) -> Path | None:
        """Copy the open file's lines (what hsmca wrote) beside the log's name, once;
        the copy's path, or None if it could not be made."""
        if self._saved is not None:
            return self._saved
        if time.monotonic() < self._save_again_at:
            return None  # it failed a moment ago (a full disk): not at every write
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.saved-{stamp}")
        try:
            for _ in range(8):
                try:
                    # All or nothing: no half copy left to be put back as the log.
                    # The log's own mode: put back as the log, it stays what auditors'
                    # group reads (0600 left it unreadable to them; an operator trial).
                    copy_new(self._fd, self._size_bytes, target, 0o640)
                    break
                except FileExistsError:
                    # Taken (names made in advance kept every save failing, a review):
                    # another, that nobody could have guessed.
                    target = self.path.with_name(f"{self.path.name}.saved-{stamp}-"
                                                 f"{secrets.token_hex(4)}")
            else:
                raise FileExistsError(errno.EEXIST, "every name tried exists")
            fsync_dir(target.parent)
        except OSError as exc:
            self._save_again_at = time.monotonic() + 10.0
            log.error("the audit log file was deleted under hsmca, and its lines could not "
                      "be saved", target=str(target), error=exc.strerror or str(exc))
            return None
        log.error("the audit log file was deleted or replaced under hsmca: its lines are "
                  "saved; stop hsmca and put them back as the log", saved=str(target),
                  bytes=self._size_bytes)
        self._saved = target
        return target

    def watch_file(self) -> None:
        """Between writes: find out at once (not at the next write, which may be a
        heartbeat away) that the file is no longer the log (moved, deleted, replaced,
        written to): nothing is signed, and /health says why, until it is put back."""
        if self._problem is not None:
            return
        with self._write_lock:
            try:
                self._check_file()
            except _NotTheLog as exc:
                self._problem = self._failed = f"cannot write the audit log: {exc.strerror}"
                self._note_changed(exc)

    # ---- the lines under the tiles, read again ----------------------------------------

    CHECK_BUNDLES = 16  # full bundles hashed per call: about 1 MB read, a few ms

    def check_on_disk(self, bundle: int) -> int:
        """Hash the lines of up to CHECK_BUNDLES full bundles from `bundle` again and
        compare them with the leaf hashes of their tiles; the bundle to go on from (0
        once the last full one was checked).

        A start reads only the lines of the last full bundle; one rewritten on disk
        before it, in place and at the same length, was served as the log's, and an
        auditor's incremental run, which reads only new lines, stayed OK (auditor
        trial). The daemon reads them all again in the background (ca/daemon/primary.py).
        A line that no longer matches is tampering or a failing disk, as a log cut
        under its last checkpoint is at start: nothing is signed (`_check_file`), and
        /health says which line (`damaged_seq`), until it is put back; meanwhile only
        the damaged bundles are checked again, at each call, each cleared on its own.
        """
        with self._damage_lock:
            damaged = sorted(self._damage)
        if damaged:
            for b in damaged:
                if self._judge_again(b) is None:
                    with self._damage_lock:
                        gone = self._damage.pop(b, None)
                    if gone is not None:
                        log.warning("the damaged audit lines check out again", seq=gone.seq)
                        self._owe_resume(f"cannot write the audit log: {gone.text(self.path)}")
            return bundle
        with self._tree_lock:
            full = self._tree.size // TILE_WIDTH
        if bundle < full:
            end = min(bundle + self.CHECK_BUNDLES, full)
            for k, lines in enumerate(self._bundle_lines(bundle, end - bundle)):
                if (found := self._judge(bundle + k, lines)) is not None:
                    self._found(found)
                    return bundle
            if end < full:
                return end
        # The pass is through: the lines after the last full bundle too, against the
        # leaf hashes the tree holds in memory
        if (found := self._judge_again(full)) is not None:
            self._found(found)
        return 0

    def _judge_again(self, bundle: int) -> _Finding | None:
        """Bundle `bundle` as it is on disk now, full or the edge."""
        with self._tree_lock:
            size = self._tree.size
            if bundle == size // TILE_WIDTH:  # the edge
                lo, hi = self._bundle_start(bundle), self._size_bytes
                count = size - bundle * TILE_WIDTH
        if bundle < size // TILE_WIDTH:
            return self._judge(bundle, self._bundle_lines(bundle, 1)[0])
        if bundle > size // TILE_WIDTH or not count:
            return None
        return self._judge_edge(bundle, 0, os.pread(self._fd, hi - lo, lo).split(b"\n")[:count])

    def _judge_edge(self, bundle: int, first: int, lines: list[bytes]) -> _Finding | None:
        """Lines of the edge bundle `bundle` from its line `first`, against the leaf
        hashes the tree holds in memory for them: a line rewritten in place among the
        newest (after the last full bundle) was served as the log's until the next
        start, and an auditor's incremental run said OK (an auditor trial)."""
        with self._tree_lock:
            known = self._tree.read_tile(0, bundle, first + len(lines))
        if known is None:
            return None  # (more lines asked than the tree holds: not served)
        hashes, known = leaf_hashes(lines), known[first * HASH_SIZE:]
        if hashes == known:
            return None
        return _Finding(bundle * TILE_WIDTH + first + _first_other(hashes, known), "line")

    def _owe_resume(self, why: str) -> None:
        """The next batch begins with a `log.resume` line saying `why` signing stopped,
        as after a failed write: damage put back before any write was refused left no
        trace in the log (a web view trial's line, rewritten and put back within a
        second; only the daemon's stderr said it). The daemon's retry writes it at once
        (`resume_owed`)."""
        with self._write_lock:
            if self._failed is None:
                self._failed = why

    @property
    def resume_owed(self) -> str | None:
        """Why a `log.resume` line is owed (`_owe_resume`, or a failed write's), if one
        is."""
        return self._failed

    def _found(self, found: _Finding) -> None:
        """`found` stops signing, and /health says so, until it is put back."""
        bundle = found.seq // TILE_WIDTH
        with self._damage_lock:
            if bundle in self._damage:
                return
            self._damage[bundle] = found
        if found.kind == "unchecked":
            log.error("audit log lines cannot be checked, their tiles are damaged: nothing "
                      "is signed until they can be", seq=found.seq, log=str(self.path),
                      error=found.why)
        else:
            log.error("an audit log line was rewritten on disk: nothing is signed until it "
                      "is put back", seq=found.seq, log=str(self.path),
                      **({"last_seq": found.seq + TILE_WIDTH - 1}
                         if found.kind == "bundle" else {}))

    def _check_served(self, first: int, lines: list[bytes]) -> None:
        """Lines about to be served (from seq `first`, without newlines), against the
        leaf hashes of their full bundles' tiles: a line rewritten on disk was served
        as the log's until the hourly pass came to it, and an auditor's incremental run
        said OK meanwhile (an auditor trial). One SHA-256 a line; a mismatch is the
        damage `check_on_disk` finds, at once (the auditor's run then fails on it), and
        the lines are not served (LinesRewritten: 503, as for a damaged tile), then or
        later: they were served all the same once the damage was known (a trial)."""
        with self._tree_lock:
            full = self._tree.size // TILE_WIDTH
        seq, stop = first, first + len(lines)
        while seq < stop:
            bundle, k = divmod(seq, TILE_WIDTH)
            if bundle >= full:  # the edge: against the leaf hashes held in memory
                if (found := self._judge_edge(bundle, k, lines[seq - first:])) is not None:
                    self._found(found)
                    raise LinesRewritten(found.text(self.path))
                return
            take = min(TILE_WIDTH - k, stop - seq)
            served = lines[seq - first:seq - first + take]
            if take < TILE_WIDTH:  # judged whole, should its tile be damaged: these lines
                whole = self._bundle_lines(bundle, 1)[0]  # in it, as they are served
                served = whole[:k] + served + whole[k + take:]
            if (found := self._judge(bundle, served)) is not None:
                self._found(found)
                raise LinesRewritten(found.text(self.path))
            seq += take

    def _bundle_lines(self, first: int, count: int) -> list[list[bytes]]:
        """The lines of full bundles [first, first + count), as they are on disk now."""
        with self._tree_lock:
            lo, hi = self._bundle_start(first), self._bundle_start(first + count)
        # Full bundles never change once written: read outside the lock.
        lines = os.pread(self._fd, hi - lo, lo).split(b"\n")
        return [lines[k * TILE_WIDTH:(k + 1) * TILE_WIDTH] for k in range(count)]

    def _judge(self, bundle: int, lines: list[bytes]) -> _Finding | None:
        """Full bundle `bundle`'s `lines` against the leaf hashes its tile holds: what is
        wrong with them, or None. When that tile is damaged, against the entry the tile
        above holds for the bundle: a rewritten line hid behind one flipped bit in its
        tile (an auditor trial). Lines that agree with it are the log's: the damaged
        tile is said in the daemon's log, once, and a proof that needs it names it.
        When the tile above cannot be read whole either, the lines cannot be judged,
        and are not taken for intact: one flipped bit there hid them (a review)."""
        hashes = leaf_hashes(lines)
        try:
            with self._tree_lock:
                tile = self._tree.checked_leaves(bundle)
        except TileDamaged as damage:
            try:
                with self._tree_lock:
                    agree = self._tree.leaves_agree(bundle, hashes)
            except TileDamaged as above:
                return _Finding(bundle * TILE_WIDTH, "unchecked", str(above))
            if not agree:
                return _Finding(bundle * TILE_WIDTH, "bundle")
            if bundle not in self._tiles_said:
                self._tiles_said.add(bundle)
                log.error("an audit log tile is damaged; the lines under it are intact",
                          error=str(damage), first_seq=bundle * TILE_WIDTH)
            return None
        if hashes == tile:
            return None
        return _Finding(bundle * TILE_WIDTH + _first_other(hashes, tile), "line")

    def _first_damage(self) -> _Finding | None:
        """The damage found first in the log (lowest seq), until it is put back."""
        with self._damage_lock:
            return min(self._damage.values(), default=None)

    @property
    def damaged_seq(self) -> int | None:
        """The first line `check_on_disk` (or a read) found damaged, until it is put
        back."""
        first = self._first_damage()
        return first.seq if first is not None else None

    def _damage_said(self) -> str | None:
        """What /health and a refused write say of the first damage found, or None."""
        first = self._first_damage()
        return first.text(self.path) if first is not None else None

    def _fail_batch(self, done: list[tuple[Sink, int, str, Mapping[str, Any]]], exc: OSError,
                    results: Batch) -> None:
        # The file named where the error is the system's (EPERM of an immutable file,
        # EROFS, ENOSPC: an auditor trial's /health named no file); a _NotTheLog's says it.
        reason = ("cannot write the audit log: " if isinstance(exc, _NotTheLog) else
                  f"cannot write the audit log {self.path}: ") + _said(exc)
        try:  # cut whatever part of the batch reached the file, so the chain stays whole
            if isinstance(exc, _NotTheLog):
                pass  # nothing was written, and the file is not the log's to cut
            elif os.fstat(self._fd).st_size != self._size_bytes:
                os.ftruncate(self._fd, self._size_bytes)
                os.fsync(self._fd)
            # Else nothing reached the file (a read-only or immutable file refuses the
            # write whole), and there is nothing to cut: the next write may just work.
            self._problem = reason
            self._note_changed(exc)
        except OSError as exc2:
            # The file may now end in a partial line; only a restart (with torn-tail
            # recovery) can make it safe again, so refuse everything until then.
            self._poisoned = True
            self._problem = (f"{reason}; cutting the failed batch off failed too "
                             f"({exc2.strerror}): restart hsmca to recover the log")
        self._failed = self._problem
        self._owe_and_fail([(event, fields, fut) for fut, _, event, fields in done],
                           AuditUnavailable(self._problem), results)
        results.flush()

    def _note_changed(self, exc: OSError) -> None:
        # (EBADMSG is a line found rewritten: damaged_seq says that one.) Any other
        # failure clears it: the file put back, then a full disk, is no change by
        # something else (a review).
        self._changed = exc.strerror if isinstance(exc, _NotTheLog) and \
            exc.errno == errno.ESTALE else None

    @property
    def changed_on_disk(self) -> str | None:
        """Why the file is not what hsmca wrote (cut, appended to, replaced, moved or
        deleted under it), while nothing is written for that reason; else None."""
        return self._changed if self._problem is not None else None

    def _owe_and_fail(self, items: list[tuple[str, Mapping[str, Any], Sink]],
                      error: AuditUnavailable, results: Batch) -> None:
        for event, fields, fut in items:
            if event == "hsm.sign" and fields.get("phase") == "outcome":
                owed: cf.Future[int] = cf.Future()
                self._owed.append((event, {**fields, "released": False}, owed))
            elif event == "sign.withheld":  # what it says of an "ok" outcome is owed too
                self._owed.append((event, fields, cf.Future()))
            results.fail(fut, error)

    # ---- state --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of durable lines."""
        return self._next_seq

    def durable_size(self) -> int:
        """The operation log's promise to the HSM (hsm/oplog.py): lines below are on disk."""
        return self._next_seq

    def root(self) -> tuple[int, bytes]:
        """(size, RFC 6962 root) of the durable lines, consistent with each other."""
        with self._tree_lock:
            return self._tree.size, self._tree.root()

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        with self._tree_lock:
            return self._tree.inclusion_proof(index, size)

    def consistency_proof(self, old: int, size: int) -> list[bytes]:
        with self._tree_lock:
            return self._tree.consistency_proof(old, size)

    def read_tile(self, level: int, index: int, width: int) -> bytes | None:
        """C2SP tile `level`/`index`, `width` hashes of it; None if the log has not got them."""
        with self._tree_lock:
            return self._tree.read_tile(level, index, width)

    def read_entries(self, index: int, width: int) -> bytes | None:
        """C2SP entry bundle `index`, its first `width` entries (the durable lines, without
        their newlines, each after its uint16 length); None if the log has not got them."""
        with self._tree_lock:
            size = self._tree.size
            first = index * TILE_WIDTH
            if not 1 <= width <= min(TILE_WIDTH, size - first):
                return None
            lo, hi = self._line_offset(first), self._line_offset(first + width)
            # The lines below the durable size never change: read outside the lock.
        lines = os.pread(self._fd, hi - lo, lo).split(b"\n")[:width]
        self._check_served(first, lines)
        return entry_bundle(lines)

    def read_lines(self, start: int, limit: int) -> bytes:
        """Durable lines [start, start+limit), byte for byte, each with its newline."""
        with self._tree_lock:
            end = min(self._tree.size, start + limit)
            if start >= end:
                return b""
            lo, hi = self._line_offset(start), self._line_offset(end)
        data = os.pread(self._fd, hi - lo, lo)
        self._check_served(start, data.split(b"\n")[:end - start])
        return data

    def _line_offset(self, n: int) -> int:
        """Where line n starts (n up to the size), under the tree lock: a look-up in the
        bundle index, and for a line inside a full bundle a read of that bundle."""
        size = self._tree.size
        if n == size:
            return self._size_bytes
        bundle, k = divmod(n, TILE_WIDTH)
        if bundle == size // TILE_WIDTH:
            return self._edge_offsets[k]
        start = self._bundle_start(bundle)
        if k == 0:
            return start
        data = os.pread(self._fd, self._bundle_start(bundle + 1) - start, start)
        at = -1
        for _ in range(k):
            at = data.index(b"\n", at + 1)
        return start + at + 1

    def _bundle_start(self, bundle: int) -> int:
        if bundle == 0:
            return 0
        if bundle - 1 < self._stored_bundles:
            return self._store.bundle_end(bundle - 1)
        return self._pending_ends[bundle - 1 - self._stored_bundles]

    @property
    def healthy(self) -> bool:
        return self.problem is None and self._thread.is_alive()

    def write_waited(self) -> float:
        """Seconds the group commit under way has waited for its disk (or PostgreSQL,
        in a cluster); 0 while none is under way."""
        since = self._writing_since
        return time.monotonic() - since if since is not None else 0.0

    @property
    def problem(self) -> str | None:
        if self._problem is None and (damage := self._damage_said()) is not None:
            # Found between writes: the next write fails with the same words.
            return f"cannot write the audit log: {damage}"
        return self._problem

    def earlier_runs(self) -> tuple[str | None, frozenset[str]]:
        """When the first run since the last clean stop began, and the bootstrap tokens
        the runs since asked signatures with, where those runs began before the lines
        `last_run` was read from: (None, nothing) otherwise. A crash trial's kill after
        8,000 lines left a token spent on nothing that the start, finding no start among
        the last lines, gave back to nobody; a token any of those runs signed for is not
        given back (a review: one released, its row lost, would enroll twice). Reads back
        through the log: at a start, after a kill."""
        if self.last_run.to_stop or self._read_from == 0:
            return None, frozenset()
        return _earlier_runs(self._fd, self._read_from)

    def close(self) -> None:
        stop_thread(self._thread, self._queue)
        with self._write_lock:
            try:
                self._store_tiles()
            except OSError:
                pass  # the next start builds them from the log again
        self._store.close()
        try:
            os.close(self._fd)  # releases the flock
        except OSError:
            pass


def _lock(fd: int, path: Path, busy: Exception | None = None) -> None:
    """The log's exclusive lock, or `busy` (by default AuditLogError naming who may
    hold it) if another process has it (fd closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise busy or AuditLogError(
                f"the audit log {path} is locked by another process ({_who_runs(path)})"
            ) from None
        raise


def _who_runs(path: Path) -> str:
    """The daemon a locked log is likely held by: its serve.url (beside the log's
    directory, a node's too), which a second `serve` did not name (an operator trial)."""
    try:
        url = (path.parent.parent / "serve.url").read_text().strip()
    except OSError:
        url = ""
    return (f"an hsmca serve runs on this state directory, at {url}" if url else
            "is another hsmca running on this state directory?")


@contextmanager
def held(path: Path, busy: Exception | None = None) -> Iterator[None]:
    """The log's lock (the one `AuditLog.open` takes) for the block, or `busy`
    (AuditLogError) if a running daemon holds it: for a command that needs the log."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    _lock(fd, path, busy)
    try:
        yield
    finally:
        os.close(fd)  # and the lock with it


def ensure_unlocked(path: Path, busy: Exception | None = None) -> None:
    """AuditLogError (or `busy`) now if a running daemon holds the log `path` (before a
    command asks its operator anything)."""
    if path.exists():
        with held(path, busy):
            pass


def _checkpoint_of(text: str, audit_key: AuditKeys) -> Checkpoint:
    """The checkpoint `text`, its signature verified when the audit key is known: by
    any of them, when several are (the active key first, then the previous one: on a
    cluster, a node stopped during the audit key's rotation ends its log with a
    checkpoint of the previous key alone, and hands over at its next start)."""
    if audit_key is None:
        return parse_checkpoint(text)
    keys = [audit_key] if isinstance(audit_key, Ed25519PublicKey) else list(audit_key)
    origin = text.split("\n", 1)[0]
    errors: list[ValueError] = []
    for key in keys:
        try:
            return verify_checkpoint(text, origin, key)
        except ValueError as exc:
            errors.append(exc)
    raise errors[0]  # the active key's error, when none verifies


# What may follow a clean stop, unsigned: the stop's own closing lines (its final
# checkpoint's signing, the HSM logout), then what a start writes before its first
# checkpoint (the HSM session, a repair of the log, `daemon.start`, the CA's own
# signatures: its TLS certificate, CRLs, OCSP responses, that checkpoint), and what a
# ceremony run with the daemon stopped writes (`hsmca key rotate-root`, `hsmca store
# move`), should it be cut short before its checkpoint. The CA's own signatures are
# intents of the actor "local" and their outcomes.
_AFTER_STOP = frozenset({"hsm.open", "hsm.login", "hsm.error", "hsm.reconnect", "hsm.logout",
                         "log.recover", "log.resume", "daemon.start", "daemon.stop",
                         "key.ceremony", "hsm.keygen", "store.move"})


@dataclass(frozen=True)
class LastRun:
    """How the log's last daemon run ended, as its last lines tell: `stopped` (its
    `daemon.stop` is there), `killed` (its `daemon.start` is, and no stop after it; or an
    HSM login after the last start or stop was never logged out of), or
    `unknown` (neither is among the lines read at start); `open_signatures`, how many of
    the `hsm.sign` intents read after its start (or in all the lines read) have no
    outcome: signatures under way when it ended, never released; `unreleased`, the
    certificates that were signed and never released, as (purpose, serial as the intent
    writes it, the intent's seq), from every run since the last clean stop among the
    lines read: an intent without an outcome, or whose outcome says `released: false`
    (or a `sign.withheld` line), and those of the run that stop ended. The inventory may
    hold such a certificate: its row commits while the outcome is written. `released`,
    the X.509 certificates (serials as the intents write them) those runs did release,
    `enrolled`, the bootstrap tokens (ids) those certificates were asked with, and
    `since`, when the first of those runs started (None: no start among the lines read):
    a start settles the bootstrap tokens a kill left spent (ca/daemon/primary.py)."""

    ended: str
    open_signatures: int
    unreleased: tuple[tuple[str, str, int], ...] = ()
    released: tuple[str, ...] = ()
    enrolled: tuple[str, ...] = ()
    since: str | None = None
    to_stop: bool = False  # the lines read reach back to the last clean stop


# The purposes whose signature makes a certificate of the inventory (an OCSP response's
# intent names the certificate it is about, which was released long before).
ISSUING = frozenset({"x509", "tls", "ssh-user", "ssh-host"})


def _issuing(intent: dict[str, Any]) -> tuple[str, str, int] | None:
    """(purpose, serial, seq) of an intent whose signature makes a certificate."""
    purpose, serial, seq = intent.get("purpose"), intent.get("serial"), intent.get("seq")
    if purpose in ISSUING and isinstance(serial, str) and isinstance(seq, int):
        return purpose, serial, seq
    return None


def _last_run(lines: list[bytes]) -> LastRun:
    # Read backwards: an outcome (and a sign.withheld line) comes before its intent. The
    # last run's ending and open signatures are counted up to its daemon.start; what was
    # never released, from every run up to the last clean stop: a start that failed (or
    # was killed) before it revoked them must not lose them for the next.
    released: set[object] = set()  # op_ids of outcomes that do not say released: false
    withheld: set[object] = set()  # op_ids an outcome or a sign.withheld line says were not
    ended: str | None = None  # the last run's: killed once its daemon.start is read
    open_signatures = 0
    named: list[tuple[str, str, int]] = []
    given: list[str] = []  # X.509 serials released
    tokens: list[str] = []  # the bootstrap tokens they were asked with
    since: str | None = None
    # Whether the last HSM session seen reading back (before any start or stop) was
    # never logged out of: a start killed before its daemon.start (during its
    # migrations, say) ends so, and reads as killed too (an upgrade trial's did not).
    session: bool | None = None
    # Reading the run that ended with the last clean stop: of it, only what it withheld
    # (its revocation check, in a worker, may have been cut short by the stop, and a
    # commit given up on may have landed since: PostgreSQL); the check finds nothing to
    # do for the others, which are revoked, or whose rows never landed.
    clean = False
    for line in reversed(lines):
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        event = obj.get("event") if isinstance(obj, dict) else None
        if session is None and event in ("hsm.logout", "hsm.login"):
            # (a login refused, or a start that never got one, leaves nothing open)
            session = event == "hsm.login" and obj.get("result") == "ok"
        if clean:
            if event in ("daemon.start", "daemon.stop"):
                break
            if event == "sign.withheld" or (event == "hsm.sign" and obj.get("phase") ==
                                            "outcome" and obj.get("released") is False):
                withheld.add(obj.get("op_id"))
            elif (event == "hsm.sign" and obj.get("phase") == "intent"
                  and obj.get("op_id") in withheld and (item := _issuing(obj))):
                named.append(item)
            continue
        if event == "daemon.stop":
            ended = ended or ("killed" if session else "stopped")
            clean = True
            continue
        if event == "daemon.start":
            ended = ended or "killed"
            since = obj.get("ts") if isinstance(obj.get("ts"), str) else since
        elif event == "sign.withheld":
            withheld.add(obj.get("op_id"))
        elif event == "hsm.sign" and obj.get("phase") == "outcome":
            (withheld if obj.get("released") is False else released).add(obj.get("op_id"))
        elif event == "hsm.sign" and obj.get("phase") == "intent":
            op = obj.get("op_id")
            if op not in released and op not in withheld and ended is None:
                open_signatures += 1
            if (op not in released or op in withheld) and (item := _issuing(obj)):
                named.append(item)
            elif op in released and obj.get("purpose") == "x509" \
                    and isinstance(obj.get("serial"), str):
                given.append(obj["serial"])
                actor = obj.get("actor")
                if isinstance(actor, str) and actor.startswith("bootstrap-token:"):
                    tokens.append(actor.removeprefix("bootstrap-token:"))
    return LastRun(ended or ("killed" if session else "unknown"), open_signatures,
                   tuple(reversed(named)),
                   tuple(reversed(given)), tuple(tokens), since, clean)


_START_OR_STOP = b'"event":"daemon.st'
_BY_TOKEN = b'"actor":"bootstrap-token:'


def _earlier_runs(fd: int, end: int) -> tuple[str | None, frozenset[str]]:
    """Of the runs since the last `daemon.stop` in the log's first `end` bytes: when the
    first began (its `daemon.start`'s `ts`), and the bootstrap tokens their signatures
    were asked with. Read back from `end` (a whole line always ends at a bundle's end);
    a string value cannot hold these bytes: its quotes are escaped."""
    first, first_at = None, end
    with mmap.mmap(fd, end, access=mmap.ACCESS_READ) as data:
        at = end
        while (found := data.rfind(_START_OR_STOP, 0, at)) >= 0:
            at = data.rfind(b"\n", 0, found) + 1
            try:
                obj = json.loads(data[at:data.find(b"\n", found)])
            except (ValueError, RecursionError):
                continue
            if not isinstance(obj, dict):
                continue
            if obj.get("event") == "daemon.stop":
                break
            if obj.get("event") == "daemon.start" and isinstance(obj.get("ts"), str):
                first, first_at = obj["ts"], at
        tokens = frozenset(
            line["actor"].removeprefix("bootstrap-token:")
            for line in lines_with(data, _BY_TOKEN, first_at, end)
            if line.get("event") == "hsm.sign" and isinstance(line.get("actor"), str))
    return first, tokens


def _check_after_clean_stop(path: Path, lines: list[bytes], signed: int) -> None:
    """Nothing of consequence may follow a clean stop without a checkpoint over it.

    `lines` are the log's lines from seq `signed - 1` on, `signed` the size of its last
    checkpoint. When that checkpoint ends with `daemon.stop`, the daemon stopped
    cleanly: its signature vouches for that line. Every line after it is unsigned, and
    the next start's checkpoint would sign them, so that a line appended to a stopped
    log by anyone who can write the file (a forged `cert.revoke`, an issuance) would
    pass every later verification (auditor trial). Such lines are refused; the lines a
    stopping daemon, a start or a ceremony cut short write are not. (Lines of those
    kinds can be forged too: they claim no certificate, revocation, token or key
    change.)"""
    try:
        objs = [json.loads(line) for line in lines]
    except (ValueError, RecursionError):
        return  # a torn last line: cut and recorded by the caller
    # The last daemon.stop: the one the checkpoint ends with, or one after it whose
    # final checkpoint is gone (cut, or its signing interrupted). Only what a stopping
    # daemon, a start or a ceremony writes may follow a stop.
    stops = [i for i, obj in enumerate(objs)
             if isinstance(obj, dict) and obj.get("event") == "daemon.stop"]
    if not stops:
        return
    local: set[object] = set()  # op_ids of the CA's own signatures
    for seq, obj in enumerate(objs[stops[-1] + 1:], start=signed + stops[-1]):
        event = obj.get("event") if isinstance(obj, dict) else None
        if event == "hsm.sign":
            if obj.get("phase") == "intent" and obj.get("actor") == "local":
                local.add(obj.get("op_id"))
                continue
            if obj.get("phase") == "outcome" and obj.get("op_id") in local:
                continue
        elif event in _AFTER_STOP:
            continue
        what = f"{str(event)[:40]!r}" + (f" by {str(obj.get('actor'))[:60]!r}"
                                          if event == "hsm.sign" else "")
        stop = signed - 1 + stops[-1]
        raise AuditLogError(
            f"the audit log {path} stopped at seq {stop} (daemon.stop), but seq {seq} after "
            f"it is {what}, which neither a stopping daemon, a start nor a ceremony writes "
            "before its checkpoint: lines were appended to the stopped log. Refusing to "
            "start, since the next checkpoint would sign them. Keep the log as evidence, "
            f"run `hsmca audit verify` on it, and compare seq {stop} on with your backups "
            "and the auditors' saved state")


def _check_chain(path: Path, before: bytes | None, lines: list[bytes], first: int) -> None:
    """The lines start reads past the tiles (`first` is the seq of the first) chain to
    the line before them and to each other; else start-up would sign checkpoints over
    a log that can never verify again."""
    prev = chain_hash(before) if before is not None else GENESIS
    for i, line in enumerate(lines):
        try:
            said = json.loads(line).get("prev")
        except (ValueError, AttributeError, RecursionError):
            said = None
        if said != prev:
            raise AuditLogError(
                f"the audit log {path} was rewritten: the prev recorded in line seq "
                f"{first + i} is not the SHA-256 of the line before it (that line was "
                "altered, or a line removed or inserted). Refusing to start; run `hsmca "
                "audit verify` on the log")
        prev = chain_hash(line)


def _leaves(lines: list[bytes]) -> list[bytes]:
    blob = leaf_hashes(lines)
    return [blob[i:i + 32] for i in range(0, len(blob), 32)]


def _first_other(hashes: bytes, leaves: bytes) -> int:
    """The index of the first leaf hash in `hashes` that `leaves` does not hold."""
    count = len(hashes) // HASH_SIZE
    return next((i for i in range(count) if hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE]
                 != leaves[i * HASH_SIZE:(i + 1) * HASH_SIZE]), count)


class _Finding(NamedTuple):
    """What a check of a full bundle's lines found."""

    seq: int  # the line rewritten; for "bundle" and "unchecked", the bundle's first
    kind: str  # "line"; "bundle": a line of it, its tile damaged; "unchecked": no tile
    why: str = ""  # for "unchecked": which tile is damaged

    def text(self, path: Path) -> str:
        """What /health and a refused read or write say of it."""
        last = self.seq + TILE_WIDTH - 1
        if self.kind == "unchecked":
            return (f"lines {self.seq} to {last} of the audit log {path} cannot be checked: "
                    f"the tiles that hold their hashes are damaged ({self.why}). Nothing is "
                    "signed until they can be: stop hsmca, run `hsmca audit verify` on the "
                    "log; if it passes, move its tile directory (audit/tiles) aside and "
                    "start again (hsmca builds it anew from the log, and checks that "
                    "against the last checkpoint)")
        what = f"a line from {self.seq} to {last}" if self.kind == "bundle" else \
            f"line {self.seq}"
        tile = (f", and its tile (audit/tiles, 0/{self.seq // TILE_WIDTH}) is damaged too, "
                "so the tile cannot tell which line (`hsmca audit verify` on the log names "
                "it)" if self.kind == "bundle" else "")
        return (f"{what} of the audit log {path} no longer hashes to its leaf in the log's "
                "Merkle tree (audit/tiles): it was rewritten on disk after it was written "
                f"(tampering, or a failing disk){tile}. Nothing is signed until it is put "
                "back: stop hsmca, restore that line from a backup of the log (a line never "
                "changes once written), check the log with `hsmca audit verify` and start "
                "again")


def _damaged(tiles: Path, what: str) -> AuditLogError:
    return AuditLogError(
        f"the audit log's tile directory {tiles} is damaged: {what}. Refusing to start: "
        "tiles are never repaired silently. If `hsmca audit verify` passes on the log, move "
        f"{tiles} aside and start again; hsmca builds it again from the whole log and checks "
        "that against the last checkpoint")


def _build_tiles(path: Path, fd: int, tiles: Path) -> None:
    """Make the tile directory from the whole log, reading it a block at a time.

    The last complete line is left to the normal start (it may be the torn line
    that start cuts), and so is everything after the last full bundle. Written into
    a directory of its own and renamed into place once whole, so a crash here only
    means building again.
    """
    size = os.fstat(fd).st_size
    work = tiles.with_name(tiles.name + ".new")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700, parents=True)  # as a fresh CA's (docs/operator.md)
    if size:
        log.warning("building the audit log's tiles from the whole log (after a restore: "
                    "a backup holds none; or the first start with tiles; or the tile "
                    "directory was moved aside)", log=str(path), bytes=size,
                    tiles=str(tiles))
    store = FileTileStore(work, create=True, sync=False)
    try:
        tree = TiledTree(store)
        # Up to the start of the last complete line, as said above.
        end = last_newline(fd, last_newline(fd, size)) + 1
        ends: list[int] = []
        pos, carry = 0, b""
        while pos < end:
            block = carry + os.pread(fd, min(_READ_BLOCK, end - pos), pos)
            pos += len(block) - len(carry)
            lines = block.split(b"\n")
            carry = lines.pop()
            offset = pos - len(block)
            for line, leaf in zip(lines, _leaves(lines), strict=True):
                tree.append(leaf)
                offset += len(line) + 1
                if tree.size % TILE_WIDTH == 0:
                    ends.append(offset)
            pending = tree.pending()
            store.commit(pending, ends)
            tree.stored(pending)
            ends = []
    finally:
        store.close()
    os.sync()  # one flush for every file written above
    os.rename(work, tiles)
    fsync_dir(tiles.parent)


def last_newline(fd: int, before: int) -> int:
    """The offset of the last "\\n" before `before`, or -1."""
    hi = before
    while hi > 0:
        lo = max(0, hi - 65536)
        at = os.pread(fd, hi - lo, lo).rfind(b"\n")
        if at >= 0:
            return lo + at
        hi = lo
    return -1


def _last_logged_checkpoint(fd: int, size: int) -> tuple[str, int] | None:
    """The last checkpoint recorded in the log (its note and seq), read backwards a
    block at a time: it is within a minute's lines of the end on a running log."""
    marker = f'"{CHECKPOINT_FIELD}":"'.encode()
    hi = size
    while hi > 0:
        lo = max(0, hi - (1 << 20))
        block = os.pread(fd, hi - lo, lo)
        if lo:  # only whole lines: the first one may have started before the block
            cut = block.index(b"\n") + 1 if b"\n" in block else len(block)
            block, lo = block[cut:], lo + cut
        for line in reversed(block.split(b"\n")):
            if marker not in line:
                continue
            obj = json.loads(line)
            if obj.get("phase") == "outcome" and isinstance(obj.get(CHECKPOINT_FIELD), str):
                return obj[CHECKPOINT_FIELD], obj.get("seq")
        if lo == hi:  # a line longer than a block: lines are at most 64 KiB
            break
        hi = lo
    return None
