"""The append-only operation log: one writer, canonical JSON lines, group commit.

docs/audit-log.md fixes the format; ca/audit/line.py holds its rules. This module
owns the file: it holds an exclusive lock, recovers a torn tail at open, refuses a
log that no longer matches its last checkpoint, and appends through one writer
thread that covers every line that arrived during the previous fdatasync with the
next one (group commit). A caller's future resolves only once its line is durable;
if the disk refuses, the batch is cut back off the file and every caller gets
AuditUnavailable (fail closed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import errno
import fcntl
import hashlib
import json
import os
import queue
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.line import CHECKPOINT_FIELD, GENESIS, canonical, chain_hash
from ca.audit.merkle import Growth, MerkleTree, TreeHead, growth, leaf_hash, leaf_hashes
from ca.audit.note import NoteError, parse_checkpoint, verify_checkpoint
from ca.handoff import STOP, Batch, Coalescer, Sink, async_sink, claim, drain_queue, stop_thread
from hsm.errors import AuditUnavailable


class AuditLogError(Exception):
    """The log cannot be opened safely; the message tells the operator what to look at."""


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Open with `AuditLog.open(path)`; append with `record()` or `await append()`."""

    def __init__(self, path: Path, fd: int, size_bytes: int, next_seq: int, prev: str,
                 tree: MerkleTree, offsets: array[int]) -> None:
        self.path = path
        self._fd = fd
        self._size_bytes = size_bytes
        self._next_seq = next_seq
        self._prev = prev
        # Every leaf hash and complete subtree (proofs in O(log n)) and every line's
        # start offset (paging entries without scanning): 40 bytes a line.
        self._tree = tree
        self._offsets = offsets
        self._tree_lock = threading.Lock()
        # Held for each commit: by the writer thread, or by a worker thread appending
        # its own lines (append_durable), so the chain has one order whoever writes.
        self._write_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._coalescer = Coalescer(self._queue)
        self._problem: str | None = None
        self._poisoned = False
        # Outcome lines whose batch failed: the HSM did sign (the result was never
        # released), so the line is owed and goes first once the disk takes writes
        # again; otherwise its intent would stay open with no crash to excuse it.
        self._owed: list[tuple[str, Mapping[str, Any], Sink]] = []
        self.batches = 0
        self.last_commit_s = 0.0
        # Called from the writer thread after each durable batch: (seconds, lines).
        self.on_commit: Callable[[float, int], None] | None = None
        self._thread = threading.Thread(target=self._writer, name="audit-writer", daemon=True)
        self._thread.start()

    # ---- opening and recovery -----------------------------------------------------------

    @classmethod
    def open(cls, path: Path, checkpoint_path: Path | None = None,
             audit_key: Ed25519PublicKey | None = None) -> AuditLog:
        """Lock the log, cut a torn tail (recorded as log.recover), check it still
        extends the last checkpoint (its signature too, given the audit key), and
        start the writer."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AuditLogError(f"the audit log {path} is locked by another process "
                                    "(is another hsmca running on this state directory?)"
                                    ) from None
            raise
        try:
            return cls._recover(path, fd, checkpoint_path, audit_key)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _recover(cls, path: Path, fd: int, checkpoint_path: Path | None,
                 audit_key: Ed25519PublicKey | None) -> AuditLog:
        data = _read_all(fd)
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last "\n": empty unless the last line is torn
        torn: bytes = tail
        if lines and not tail:
            try:
                last = json.loads(lines[-1])
                if not isinstance(last, dict):
                    raise ValueError
            except ValueError:
                torn = lines.pop() + b"\n"  # a complete-looking line that is not JSON
        offsets = array("Q")
        pos = 0
        for line in lines:
            offsets.append(pos)
            pos += len(line) + 1
        tree = MerkleTree.from_leaf_hashes(leaf_hashes(lines))
        good_bytes = len(data) - len(torn)
        n = len(lines)
        if n:
            last = json.loads(lines[-1])
            if last.get("seq") != n - 1:
                raise AuditLogError(f"the audit log {path} has {n} lines but its last line says "
                                    f"seq {last.get('seq')}: lines are missing or duplicated; "
                                    "run `hsmca audit verify` and investigate")
        if checkpoint_path is not None:
            cls._check_against_checkpoint(path, checkpoint_path, tree, lines, audit_key)
        prev = chain_hash(lines[-1]) if lines else GENESIS
        log = cls(path, fd, good_bytes, n, prev, tree, offsets)
        if torn:
            os.ftruncate(fd, good_bytes)
            os.fsync(fd)
            log.record("log.recover", {"cut_bytes": len(torn),
                                       "cut_sha256": hashlib.sha256(torn).hexdigest(),
                                       "reason": "torn final line"}).result()
        return log

    @staticmethod
    def _check_against_checkpoint(path: Path, checkpoint_path: Path, tree: MerkleTree,
                                  lines: list[bytes], audit_key: Ed25519PublicKey | None
                                  ) -> None:
        """The log must still hold what the last checkpoint signed. That is the
        checkpoint file, or, if it is gone, the last checkpoint recorded in the log
        itself (deleting one file must not switch the check off)."""
        n = len(lines)
        if checkpoint_path.exists():
            where = str(checkpoint_path)
            try:
                text = checkpoint_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise AuditLogError(f"the last checkpoint {where} cannot be read ({exc}); "
                                    "refusing to start: an operator must look") from None
        else:
            found = _last_logged_checkpoint(lines)
            if found is None:
                return  # a log that never had a checkpoint (a fresh or pre-init state)
            text, seq = found
            where = f"the checkpoint recorded at seq {seq} (the checkpoint file is missing)"
        try:
            if audit_key is not None:
                cp = verify_checkpoint(text, text.split("\n", 1)[0], audit_key)
            else:
                cp = parse_checkpoint(text)
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
            raise AuditLogError(
                f"the first {cp.size} lines of the audit log {path} no longer match {where}: "
                "the log was rewritten. Refusing to start; run `hsmca audit verify`")

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
                       ) -> list[cf.Future[int]]:
        """Append lines from a worker thread, on that thread, and return once they are
        durable (one write and one fdatasync for all of them; OpLog).

        The HSM thread writes its intents and outcomes this way: handing them to the
        writer thread and waiting would cost two thread wake-ups per group. Each
        returned future is already settled: its seq, or why that line failed.
        """
        futs: list[cf.Future[int]] = [cf.Future() for _ in entries]
        items = [(event, fields, fut) for (event, fields), fut in zip(entries, futs,
                                                                       strict=True)]
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

    def _commit(self, items: list[tuple[str, Mapping[str, Any], Sink]]) -> None:
        seq, prev = self._next_seq, self._prev
        chunks: list[bytes] = []
        leaves: list[bytes] = []
        done: list[tuple[Sink, int, str, Mapping[str, Any]]] = []
        ts = utc_now()
        results = Batch()
        owed, self._owed = self._owed, []
        for event, fields, fut in owed + items:
            # Even when the caller has given up (cancelled), the line is written: a
            # record is never dropped, and an intent always gets its outcome.
            claim(fut)
            try:
                line = canonical({**fields, "seq": seq, "ts": ts, "event": event, "prev": prev})
            except (TypeError, ValueError) as exc:
                results.fail(fut, exc)  # a caller's bug must not poison the others' lines
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
        try:
            if self._poisoned:
                raise OSError(errno.EIO, "the log tail is in an unknown state")
            written = os.write(self._fd, blob)
            if written != len(blob):
                raise OSError(errno.ENOSPC, "short write")
            os.fdatasync(self._fd)
        except OSError as exc:
            self._fail_batch(done, exc, results)
            return
        self.last_commit_s = time.perf_counter() - start
        pos = self._size_bytes
        with self._tree_lock:
            for leaf, chunk in zip(leaves, chunks, strict=True):
                self._tree.append(leaf)
                self._offsets.append(pos)
                pos += len(chunk)
            self._size_bytes = pos
        self._next_seq, self._prev = seq, prev
        self._problem = None
        self.batches += 1
        if self.on_commit is not None:
            self.on_commit(self.last_commit_s, len(done))
        for fut, s, _, _ in done:
            results.ok(fut, s)
        results.flush()

    def _fail_batch(self, done: list[tuple[Sink, int, str, Mapping[str, Any]]], exc: OSError,
                    results: Batch) -> None:
        reason = f"cannot write the audit log: {exc.strerror or exc}"
        try:  # cut whatever part of the batch reached the file, so the chain stays whole
            if os.fstat(self._fd).st_size != self._size_bytes:
                os.ftruncate(self._fd, self._size_bytes)
                os.fsync(self._fd)
            # Else nothing reached the file (a read-only or immutable file refuses the
            # write whole), and there is nothing to cut: the next write may just work.
            self._problem = reason
        except OSError as exc2:
            # The file may now end in a partial line; only a restart (with torn-tail
            # recovery) can make it safe again, so refuse everything until then.
            self._poisoned = True
            self._problem = (f"{reason}; cutting the failed batch off failed too "
                             f"({exc2.strerror}): restart hsmca to recover the log")
        error = AuditUnavailable(self._problem)
        for fut, _, event, fields in done:
            if event == "hsm.sign" and fields.get("phase") == "outcome":
                owed: cf.Future[int] = cf.Future()
                self._owed.append((event, {**fields, "released": False}, owed))
            results.fail(fut, error)
        results.flush()

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

    def read_lines(self, start: int, limit: int) -> bytes:
        """Durable lines [start, start+limit), byte for byte, each with its newline."""
        with self._tree_lock:
            end = min(self._tree.size, start + limit)
            if start >= end:
                return b""
            lo = self._offsets[start]
            hi = self._offsets[end] if end < len(self._offsets) else self._size_bytes
        return os.pread(self._fd, hi - lo, lo)

    @property
    def healthy(self) -> bool:
        return self._problem is None and self._thread.is_alive()

    @property
    def problem(self) -> str | None:
        return self._problem

    def close(self) -> None:
        stop_thread(self._thread, self._queue)
        try:
            os.close(self._fd)  # releases the flock
        except OSError:
            pass


def _last_logged_checkpoint(lines: list[bytes]) -> tuple[str, int] | None:
    marker = f'"{CHECKPOINT_FIELD}":"'.encode()
    for seq in range(len(lines) - 1, -1, -1):
        if marker not in lines[seq]:
            continue
        obj = json.loads(lines[seq])
        if obj.get("phase") == "outcome" and isinstance(obj.get(CHECKPOINT_FIELD), str):
            return obj[CHECKPOINT_FIELD], seq
    return None


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
