"""The per-line scan: every check that a line can pass or fail on its own, in bulk.

`scan` checks a run of complete lines: their format (`ca.audit.verify.format`),
the hash chain, the hsm.sign fields (collected for `ca.audit.verify.pairing`) and
each checkpoint's signed note (`ca.audit.verify.checkpoint`; the roots are checked
once the whole tree is built). It also hashes the Merkle leaves and builds the
lower levels of the tree over them.

Lines are checked a block of about a thousand at a time (`_scan_block`), with a
few bulk operations per block rather than Python steps per line: `parse_block`
proves a whole block canonical; seq, ts, event and prev are checked a column at a
time (ts and event once per distinct value, the chain as one list comparison);
hsm.sign lines are picked out with itertools.compress. Any block the bulk checks
do not pass is checked again line by line (`_scan_lines`), which alone reports
failures, so a failure's seq and reason do not depend on the bulk path: the
tests hold the two equal on random valid and damaged logs.

Each line is hashed twice (chain hash and leaf hash are SHA-256 of different
inputs, so one cannot be derived from the other). Large logs are split between
forked worker processes (`scan_all`), each of which scans its chunk, builds that
chunk's Merkle levels and pairs the intents and outcomes it can, and sends its
findings back through shared memory; the parent only joins the chunks.

`check_lines` is the same scan for lines that continue a prefix verified before
(the remote verifier's new lines).
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import compress
from operator import not_
from typing import Any

from ca.audit.line import CHECKPOINT_FIELD, GENESIS, chain_hash, chain_hashes
from ca.audit.merkle import HASH_SIZE, MerkleTree, build_levels, leaf_hash, leaf_hashes
from ca.audit.verify.checkpoint import LoggedCheckpoint, PinnedKey, check_logged, usable
from ca.audit.verify.failure import Failure, LineError, Stage, earliest
from ca.audit.verify.format import (
    EVENT,
    OP_ID,
    PHASE,
    PREV,
    RESULT,
    SEQ,
    TS,
    TS_FIELD,
    NotFast,
    fast_parse,
    field_error,
    parse_block,
    prev_error,
    slow_parse,
    valid_day,
)
from ca.audit.verify.pairing import Signings, pair, pair_locally

_MIN_BYTES = 8 << 20  # per worker: below this, forking costs more than it saves
_ALIGN = 10  # worker chunks start on multiples of 1024 lines
# Shared memory reserved for a worker's findings, per byte of its chunk: they take
# under 64 bytes of Merkle levels and 9 bytes per line, plus at most each line's
# op_id and checkpoint note, so under 2 bytes per byte of a valid line. The pages
# are only taken when written.
_SHARED_PER_BYTE = 2
_BLOCK_BYTES = 1 << 19  # checked in bulk at a time: ~1000 lines, few Python steps each


@dataclass
class Chunk:
    """What scanning a run of lines found, for the merge in `verify_log`."""

    lines: int = 0  # complete lines in the chunk
    failure: Failure | None = None
    levels: list[bytes] = field(default_factory=list)  # Merkle levels over the chunk's leaves
    signings: Signings = field(default_factory=Signings)  # its hsm.sign lines
    checkpoints: list[LoggedCheckpoint] = field(default_factory=list)
    last_start: int = -1  # seq of the last daemon.start line


def scan(data: bytes, first: int, lo: int, hi: int, prevhex: str, key: PinnedKey,
         height: int | None) -> Chunk:
    """The per-line checks of the complete lines in ``data[lo:hi]``, the first of
    which is line `first` and comes after a line whose hash is `prevhex`.

    Also builds Merkle levels 0..`height` over the chunk's leaves, which line up
    with the whole tree's because chunks start on multiples of 2**height.

    Lines go in blocks of about `_BLOCK_BYTES`, each split on its own (so a worker
    never holds more than a block of lines, and reuses their memory: fewer page
    faults). The line after a block goes with it as context, for the look-ahead of
    `prev_error`.
    """
    chunk = Chunk()
    leaves: list[bytes] = []
    days: set[str] = set()  # the calendar days whose ts were checked
    seq, start = first, lo
    while start < hi:
        nl = data.find(b"\n", start + _BLOCK_BYTES - 1, hi)
        stop = nl + 1 if nl >= 0 else hi
        after = data.find(b"\n", stop)  # the end of the next line, if complete
        lines = data[start:after + 1 if after >= 0 else stop].split(b"\n")
        lines.pop()  # the empty piece after the final "\n"
        count = len(lines) - (after >= 0)
        found = _scan_block(chunk, lines, seq, count, prevhex, days, key)
        if found is None:
            found = _scan_lines(chunk, lines, seq, count, prevhex, key)
        block_leaves, prevhex = found
        leaves.append(block_leaves)
        seq, start = seq + count, stop
        if chunk.failure is not None:
            seq += data.count(b"\n", start, hi)  # the lines not scanned still count
            break
    chunk.lines = seq - first
    chunk.levels = build_levels(b"".join(leaves), height)
    if chunk.failure is None:
        pair_locally(chunk.signings)
    return chunk


def _scan_block(chunk: Chunk, lines: list[bytes], first: int, n: int, prevhex: str,
                days: set[str], key: PinnedKey) -> tuple[bytes, str] | None:
    """Check lines[:n] (line `first` on) in bulk: (their leaf hashes, the last line's hash).

    None if any check does not pass, and then `chunk` is untouched: each check here
    is one of `_scan_lines`'s, made for a column of values at once, so a block passes
    here exactly when it passes there.
    """
    block = lines[:n]
    objs = parse_block(block)
    if objs is None:
        return None
    try:  # one map per field: each is a single C-level loop
        seqs = list(map(SEQ, objs))
        stamps = list(map(TS_FIELD, objs))
        events = list(map(EVENT, objs))
        prevs = list(map(PREV, objs))
        distinct_ts = set(stamps)
        distinct_events = set(events)
    except (KeyError, TypeError):  # a field missing, or an unhashable ts or event
        return None
    # bool is an int subclass and True == 1: the type check is what refuses "seq":true.
    if seqs != list(range(first, first + n)) or set(map(type, seqs)) != {int}:
        return None
    for event in distinct_events:
        if type(event) is not str or not event:
            return None
    for ts in distinct_ts:
        if type(ts) is not str or not TS.fullmatch(ts):
            return None
        if ts[:10] not in days:
            if not valid_day(ts):
                return None
            days.add(ts[:10])
    hexes = chain_hashes(block)
    if prevs[0] != prevhex or prevs[1:] != hexes[:-1]:
        return None
    leaves = leaf_hashes(block)

    sign_seqs: Iterable[int] = ()
    intents: list[bool] = []
    ops: list[Any] = []
    checkpoints: list[LoggedCheckpoint] = []
    if "hsm.sign" in distinct_events:
        if len(distinct_events) == 1:  # as in most blocks
            signs, sign_seqs = objs, range(first, first + n)
        else:
            is_sign = [event == "hsm.sign" for event in events]
            signs = list(compress(objs, is_sign))
            sign_seqs = list(compress(range(first, first + n), is_sign))
        try:
            ops = list(map(OP_ID, signs))
            phases = list(map(PHASE, signs))
        except KeyError:
            return None
        if set(map(type, ops)) != {str} or "" in ops:
            return None
        intents = [phase == "intent" for phase in phases]
        outcome_count = phases.count("outcome")
        if intents.count(True) + outcome_count != len(phases):
            return None
        if outcome_count:
            is_outcome = list(map(not_, intents))
            outcomes = list(compress(signs, is_outcome))
            try:
                results = list(map(RESULT, outcomes))
            except KeyError:
                return None
            if set(map(type, results)) != {str} or "" in results:
                return None
            has_checkpoint = [CHECKPOINT_FIELD in obj for obj in outcomes]
            if True in has_checkpoint:
                outcome_seqs = compress(sign_seqs, is_outcome)
                for seq, obj in compress(zip(outcome_seqs, outcomes, strict=True),
                                         has_checkpoint):
                    if obj["result"] == "ok":
                        try:
                            checkpoints.append(check_logged(obj[CHECKPOINT_FIELD], seq, key))
                        except LineError:
                            return None
    # Every check passed: record what the merge needs.
    signings = chunk.signings
    signings.seqs.extend(sign_seqs)
    signings.intent.extend(intents)
    signings.ops.extend(ops)
    chunk.checkpoints.extend(checkpoints)
    if "daemon.start" in distinct_events:
        chunk.last_start = first + n - 1 - events[::-1].index("daemon.start")
    return leaves, hexes[-1]


def _scan_lines(chunk: Chunk, lines: list[bytes], first: int, n: int, prevhex: str,
                key: PinnedKey) -> tuple[bytes, str]:
    """Check lines[:n] (line `first` on) one by one: (leaf hashes, hash of the last line
    checked). The reference for `_scan_block`.

    Sets ``chunk.failure`` at the first line that fails, with the reason.
    """
    ts_match = TS.fullmatch
    signings = chunk.signings
    seqs, intents, ops = signings.seqs, signings.intent, signings.ops
    leaves = bytearray()
    day = ""
    last_ts: Any = object()  # equal to no ts: a first line's ts ("", None, ...) is checked
    i = first
    obj: dict[str, Any] = {}
    try:
        for j in range(n):
            i = first + j
            line = lines[j]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LineError(Stage.LINE, f"not valid UTF-8 at byte {exc.start}") from None
            try:
                obj = fast_parse(line, text)
            except NotFast:
                obj = slow_parse(text)
            seq = obj.get("seq")
            ts = obj.get("ts")
            event = obj.get("event")
            if seq != i or type(seq) is not int or type(event) is not str or not event:
                raise field_error(obj, i)
            if ts != last_ts:  # a group commit gives its lines one ts: check it once
                if type(ts) is not str or not ts_match(ts):
                    raise field_error(obj, i)
                if ts[:10] != day:  # calendar check, once per day of log
                    if not valid_day(ts):
                        raise field_error(obj, i)
                    day = ts[:10]
                last_ts = ts
            if obj.get("prev") != prevhex:
                raise prev_error(obj, lines, j, i)
            prevhex = chain_hash(line)
            leaves += leaf_hash(line)
            if event == "hsm.sign":
                op_id = obj.get("op_id")
                if type(op_id) is not str or not op_id:
                    raise LineError(Stage.LINE, f"hsm.sign needs a non-empty string op_id, not "
                                                f"{op_id!r}")
                phase = obj.get("phase")
                if phase == "intent":
                    intents.append(1)
                elif phase == "outcome":
                    result = obj.get("result")
                    if type(result) is not str or not result:
                        raise LineError(Stage.LINE, f"an hsm.sign outcome needs a string "
                                                    f"result, not {result!r}")
                    intents.append(0)
                    if result == "ok" and CHECKPOINT_FIELD in obj:
                        chunk.checkpoints.append(check_logged(obj[CHECKPOINT_FIELD], i, key))
                else:
                    raise LineError(Stage.LINE, f"hsm.sign phase must be 'intent' or "
                                                f"'outcome', not {phase!r}")
                seqs.append(i)
                ops.append(op_id)
            elif event == "daemon.start":
                chunk.last_start = i
    except LineError as exc:
        chunk.failure = Failure(i if exc.seq is None else exc.seq, exc.stage, exc.reason)
        if exc.stage == Stage.CHECKPOINT:  # the line's pairing runs before its checkpoint check
            seqs.append(i)
            ops.append(obj["op_id"])
    return bytes(leaves), prevhex


def scan_range(data: bytes, first: int, lo: int, hi: int, key: PinnedKey,
               height: int | None) -> Chunk:
    """Scan the complete lines in ``data[lo:hi]``, the first of which is line `first`.

    Reads only its own range (plus a line of context either side), so a forked
    worker never touches the parent's objects and copy-on-write copies nothing.
    """
    if first:  # the line before `lo` is line first - 1
        start = data.rfind(b"\n", 0, lo - 1) + 1
        prevhex = chain_hash(data[start:lo - 1])
    else:
        prevhex = GENESIS
    return scan(data, first, lo, hi, prevhex, key, height)


def _cuts(data: bytes, end: int, workers: int) -> list[tuple[int, int]]:
    """(first line, byte offset) where each worker's chunk starts: near equal byte
    shares, moved forward to a line number that is a multiple of 2**_ALIGN.

    The number of the line at a share's boundary is taken from its seq rather than
    by counting the newlines before it (tens of MB, the longest step before the
    workers start). `scan_all` checks it against the lines the chunks before it
    turn out to have.
    """
    cuts = [(0, 0)]
    for k in range(1, workers):
        line, offset = cuts[-1]
        pos = max(end * k // workers, offset)
        start = data.rfind(b"\n", offset, pos) + 1 or offset  # of the line holding pos
        claimed = _seq_at(data, start, end)
        # A seq claiming more lines than there are bytes before it lies, and one past
        # 2**63 would make a worker fail (its seqs go in array("q")) instead of report.
        line = claimed if claimed is not None and line < claimed <= line + start - offset else (
            line + data.count(b"\n", offset, start))
        offset = start
        target = -(-(line + 1) >> _ALIGN) << _ALIGN
        while line < target:
            nl = data.find(b"\n", offset, end)
            if nl < 0:
                return cuts  # not enough lines left for another chunk
            line, offset = line + 1, nl + 1
        if offset >= end:
            break
        cuts.append((line, offset))
    return cuts


def _seq_at(data: bytes, start: int, end: int) -> int | None:
    """The seq field of the line at `start`, if it has one."""
    nl = data.find(b"\n", start, end)
    try:
        obj = json.loads(data[start:nl]) if nl >= 0 else None
    except (ValueError, RecursionError):
        return None
    seq = obj.get("seq") if type(obj) is dict else None
    return seq if type(seq) is int else None


def scan_all(data: bytes, end: int, workers: int, key: PinnedKey) -> list[Chunk]:
    """Scan the complete lines, ``data[:end]``, in `workers` processes."""
    if workers > 1 and hasattr(os, "fork"):
        cuts = _cuts(data, end, min(workers, max(1, end // max(_MIN_BYTES, 1))))
    else:
        cuts = [(0, 0)]
    if len(cuts) == 1:
        return [scan_range(data, 0, 0, end, key, None)]
    ranges = [(line, offset, next_offset) for (line, offset), (_, next_offset)
              in zip(cuts, [*cuts[1:], (0, end)], strict=True)]
    children: list[tuple[int, int, mmap.mmap]] = []
    chunks: list[Chunk] = []
    try:
        for first, lo, hi in ranges[1:]:
            # The child reads `data` through fork (copy-on-write, read-only), sends back
            # only its findings and exits; it never returns into the caller's code. The
            # findings (MBs of Merkle levels) go through shared memory, which spares
            # copying them through a pipe; the pipe says how long they are, or carries
            # them if they do not fit (they always should: see `_SHARED_PER_BYTE`).
            read_fd, write_fd = os.pipe()
            shared = mmap.mmap(-1, _SHARED_PER_BYTE * (hi - lo) + (1 << 16))
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, reported through the pipe
                os.close(read_fd)
                code = 0
                try:
                    chunk = scan_range(data, first, lo, hi, key, _ALIGN)
                    try:
                        pickle.dump(chunk, shared)
                        message = b"M%d" % shared.tell()
                    except ValueError:  # out of room
                        message = b"P" + pickle.dumps(chunk)
                except BaseException as exc:
                    message = b"P" + pickle.dumps(RuntimeError(f"verifier worker failed: {exc!r}"))
                    code = 1
                try:
                    with os.fdopen(write_fd, "wb") as pipe:
                        pipe.write(message)
                finally:
                    os._exit(code)
            os.close(write_fd)
            children.append((pid, read_fd, shared))
        first, lo, hi = ranges[0]
        chunks.append(scan_range(data, first, lo, hi, key, _ALIGN))
        for _pid, read_fd, shared in children:
            with os.fdopen(read_fd, "rb", closefd=False) as pipe:
                message = pipe.read()
            if message[:1] == b"M":
                view = memoryview(shared)
                try:
                    found = pickle.loads(view[:int(message[1:])])
                finally:
                    view.release()
            else:
                found = pickle.loads(message[1:])
            if isinstance(found, BaseException):
                raise found
            chunks.append(found)
        line = 0
        for (first, _lo, _hi), chunk in zip(ranges, chunks, strict=True):
            if first != line:  # `_cuts` went by a seq that lies: no valid log gets here
                return [scan_range(data, 0, 0, end, key, None)]
            line += chunk.lines
        return chunks
    finally:
        for pid, read_fd, shared in children:
            os.close(read_fd)
            os.waitpid(pid, 0)
            shared.close()


def tree(chunks: list[Chunk]) -> MerkleTree:
    """The tree over every leaf the scan hashed, joining the chunks' levels."""
    used: list[Chunk] = []
    for chunk in chunks:  # chunks after the first failing one hashed lines that don't count
        used.append(chunk)
        if chunk.failure is not None:
            break
    height = min(len(c.levels) for c in used)
    return MerkleTree.from_levels([b"".join(c.levels[k] for c in used) for k in range(height)])


# ---- lines that continue a verified prefix --------------------------------------------------


@dataclass(frozen=True)
class LineCheck:
    """What `check_lines` found in lines [start, start + lines)."""

    lines: int  # complete lines given
    good: int  # the lines [start, start + good) passed every check of their own
    failure: Failure | None  # the first failing line, if one fails
    leaves: bytes  # the leaf hashes of the good lines, concatenated
    checkpoints: list[LoggedCheckpoint]  # those whose root check comes before the failure
    open_intents: dict[str, int]  # op_id -> seq: the intents open after the good lines
    last_start: int  # seq of the last daemon.start line among them, -1 if none


def check_lines(data: bytes, start: int, prevhex: str, open_intents: Mapping[str, int],
                key: PinnedKey) -> LineCheck:
    """Check the complete lines in `data`, which continue a verified prefix: the first
    is line `start`, after a line whose hash is `prevhex`, and `open_intents` are the
    intents left open by the prefix.

    The same checks as `verify_log` makes of each line, and the pairing of intents
    and outcomes, continued; a checkpoint's root needs the whole tree, so the
    caller checks it. A first line whose prev is not `prevhex` fails itself: the
    line before it was verified before.
    """
    end = data.rfind(b"\n") + 1
    chunk = scan(data, start, 0, end, prevhex, key, 0)
    failure = chunk.failure
    if failure is not None and failure.seq < start:
        # The look-ahead blamed the line before (the next line vouches for the first),
        # but that line is the verified one: the new one is what changed.
        failure = Failure(start, Stage.LINE, f"prev does not match the SHA-256 of line "
                                             f"{start - 1} as verified last time")
    opened = dict(open_intents)
    failure = earliest(failure, pair([chunk.signings], failure, opened))
    good = failure.seq - start if failure is not None else chunk.lines
    return LineCheck(chunk.lines, good, failure, chunk.levels[0][:good * HASH_SIZE],
                     usable(chunk.checkpoints, failure), opened, chunk.last_start)
