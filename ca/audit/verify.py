"""Offline auditor's verification of the audit log (SPEC section 6).

The input is the log file's bytes exactly as stored. Nothing is re-serialised: a
line's hash is SHA-256 of its bytes without the newline, and the same bytes are
the Merkle leaves. Checks run in log order and stop at the first failure, which
is reported with its seq (line index) and a reason:

1. every line ends with "\\n" (else: torn line), is UTF-8 JSON, an object, and in
   canonical form (``json.dumps(obj, sort_keys=True, separators=(",", ":"),
   ensure_ascii=False)``); NaN and Infinity are not JSON and are refused;
2. ``seq`` equals the line index, ``ts`` is RFC 3339 UTC with microseconds and Z,
   ``event`` is a non-empty string, ``prev`` is the SHA-256 hex of the previous
   line (64 zeros for line 0);
3. ``hsm.sign`` lines pair up: ``phase`` "intent" or "outcome", a non-empty
   string ``op_id``; an intent's op_id is new, an outcome (which carries a
   string ``result``) closes exactly one open intent. An intent still open at
   the end is refused unless a ``daemon.start`` line follows it (a crash);
4. an ``hsm.sign`` outcome with ``result`` "ok" and a ``checkpoint`` field is a
   checkpoint: its signature must verify with the pinned key, its origin match
   (when given), its size be at most its own seq, and its root equal the Merkle
   root of that many first lines.

Then, optionally, the latest checkpoint file (it may be newer than the log's last
checkpoint line) and the state saved by the previous run: the log must still be
at least as long as both and its prefix must still have their roots.

When a line's ``prev`` does not match, the verifier looks one line ahead: if the
next line's ``prev`` matches this line, this line is intact and the one before it
was altered, so that one is reported. Only for the last two lines can it not tell
which of them changed; it then reports the later one.

Speed: lines are checked a block of about a thousand at a time (`_scan_block`),
with a few bulk operations per block rather than Python steps per line: msgspec
decodes each line and re-encodes the block with sorted keys in one call, which
proves canonical form when it gives back the same bytes (`_parse_block`); seq,
ts, event and prev are checked a column at a time (ts and event once per
distinct value, the chain as one list comparison); hsm.sign lines are picked out
with itertools.compress. Any block the bulk checks do not pass is checked again
line by line (`_scan_lines`, also the reference in the tests), which alone
reports failures, so a failure's seq and reason do not depend on the bulk path.
Each line is hashed twice (chain hash and leaf hash are SHA-256 of different
inputs, so one cannot be derived from the other) and the Merkle levels are built
in bulk. Large logs are split between forked worker processes (see `verify_log`),
each of which scans its chunk, builds that chunk's Merkle levels and pairs the
intents and outcomes it can (`_pair_chunk`), and sends its findings back through
shared memory; the parent only joins the chunks.
"""

from __future__ import annotations

import base64
import binascii
import gc
import hashlib
import json
import mmap
import os
import pickle
import re
import sys
import tempfile
import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from itertools import compress, repeat
from json.decoder import JSONDecoder
from operator import itemgetter, lt, not_
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.merkle import MerkleTree, build_levels
from ca.audit.note import NoteError, verify_checkpoint

GENESIS = "0" * 64
CHECKPOINT_FIELD = "checkpoint"
_MIN_BYTES = 8 << 20  # per worker: below this, forking costs more than it saves
_ALIGN = 10  # worker chunks start on multiples of 1024 lines
# Shared memory reserved for a worker's findings, per byte of its chunk: they take
# under 64 bytes of Merkle levels and 9 bytes per line, plus at most each line's
# op_id and checkpoint note, so under 2 bytes per byte of a valid line. The pages
# are only taken when written.
_SHARED_PER_BYTE = 2
_BLOCK_BYTES = 1 << 19  # checked in bulk at a time: ~1000 lines, few Python steps each

# Stages order failures that share a seq, in the order the checks run on a line.
_LINE, _PAIRING, _CHECKPOINT, _CHECKPOINT_ROOT, _PREFIX = range(5)
_Failure = tuple[int, int, str]  # (seq, stage, reason): tuples sort as the log reads


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int  # complete (newline-terminated) lines in the log
    bad_seq: int | None  # the first failing line; None if ok or the failure has no line
    reason: str | None
    checkpoints: int  # checkpoints whose signature and root were verified
    new_state: dict[str, Any] | None  # to save with save_state when ok (None: nothing to save)


# ---- canonical JSON, fast and exact ---------------------------------------------------------


class _NotFast(Exception):
    """The fast path cannot prove this line canonical; the slow path decides."""


def _refuse_float(text: str) -> Any:
    raise _NotFast  # float text has many spellings: let json.dumps judge it


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_FAST_SCAN = JSONDecoder(parse_float=_refuse_float, parse_constant=_refuse_constant).scan_once
_SLOW_DECODER = JSONDecoder(parse_constant=_refuse_constant)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)

# Deleting every byte but these leaves exactly b"{" for a line with one object, no
# backslash and no JSON whitespace: the common case, found with one C call.
_NOT_SPECIAL = bytes(b for b in range(256) if b not in b"\\ \t\r{")
# Maps every JSON structural byte to "," and every JSON whitespace byte to " ".
_SKELETON = bytes.maketrans(b"{}[]:\t\r", b",,,,,  ")
# The integer -0 (json.dumps writes 0): "-0" then what may follow a number.
_NEGATIVE_ZERO = re.compile(rb"-0[,\]}]")
# msgspec parses a line about twice as fast as the stdlib (see `_parse_block`).
_MSGSPEC_DECODE = msgspec.json.Decoder(float_hook=_refuse_float).decode
_MSGSPEC_ENCODE = msgspec.json.Encoder(order="sorted").encode
_SEQ, _TS_FIELD, _EVENT, _PREV = map(itemgetter, ("seq", "ts", "event", "prev"))
_OP_ID, _PHASE, _RESULT = map(itemgetter, ("op_id", "phase", "result"))
_LEAF_PREFIX = hashlib.sha256(b"\x00")  # RFC 6962 leaf hashes start with a 0x00 byte


def _fast_parse(line: bytes, text: str) -> dict[str, Any]:
    """Parse a line that is canonical by construction, or raise _NotFast.

    Accepts only lines where the parse itself proves canonical form, so that
    almost no line has to be re-serialised:

    * no backslash: every '"' delimits a string, strings hold no escapes, and the
      strict parser refuses raw control characters, so each string's text is its
      canonical encoding;
    * no JSON whitespace next to a structural character: whitespace outside
      strings always touches one (two values are never adjacent in JSON), and
      the scan must consume the whole line, so there is none;
    * no "-0" followed by what may follow a number, and no float (refused by the
      parser hook): every other JSON integer is already in Python's repr form;
    * exactly one "{": a flat object, so only top-level keys need ordering;
    * as many '":' as keys parsed: no duplicate key; and keys in sorted order.

    False alarms (a string containing "-0," or "{", say) only send a line to the
    slow path, which re-serialises it.
    """
    special = line.translate(None, _NOT_SPECIAL)
    if special != b"{":
        if b"\\" in special or special.count(b"{") != 1:
            raise _NotFast
        skeleton = line.translate(_SKELETON)  # spaces in strings are fine, next to "," not
        if b", " in skeleton or b" ," in skeleton:
            raise _NotFast
    if _NEGATIVE_ZERO.search(line):
        raise _NotFast
    try:
        obj, end = _FAST_SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError):
        raise _NotFast from None
    if end != len(text) or type(obj) is not dict or line.count(b'":') != len(obj):
        raise _NotFast
    keys = tuple(obj)
    if keys not in _SORTED_KEY_SETS:
        if list(keys) != sorted(keys):
            raise _NotFast
        if len(_SORTED_KEY_SETS) < 4096:  # a log has a handful of line shapes
            _SORTED_KEY_SETS.add(keys)
    return obj


_SORTED_KEY_SETS: set[tuple[str, ...]] = set()


def _slow_parse(text: str) -> dict[str, Any]:
    """Parse and re-serialise: the definition of canonical form. Raises _LineError."""
    try:
        obj = _SLOW_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise _LineError(_LINE, f"not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise _LineError(_LINE, f"a line must be a JSON object, not {type(obj).__name__}")
    try:
        canonical = _ENCODER.encode(obj)
    except (ValueError, RecursionError) as exc:  # pragma: no cover - parse would have failed
        raise _LineError(_LINE, f"not canonical JSON: {exc}") from None
    if canonical != text:
        raise _LineError(_LINE, "not in canonical form (json.dumps with sort_keys=True, "
                                "separators=(',', ':'), ensure_ascii=False)")
    return obj


# ---- field checks ---------------------------------------------------------------------------

_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                 r"\.[0-9]{6}Z")  # [0-9], not \d: \d also matches non-ASCII digits
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TS_EXAMPLE = "2026-11-23T17:28:05.123456Z"


class _LineError(Exception):
    def __init__(self, stage: int, reason: str, seq: int | None = None) -> None:
        super().__init__(reason)
        self.stage, self.reason, self.seq = stage, reason, seq


def _valid_day(ts: str) -> bool:
    try:
        date(int(ts[0:4]), int(ts[5:7]), int(ts[8:10]))
    except ValueError:
        return False
    return True


def _field_error(obj: dict[str, Any], seq: int) -> _LineError:
    """Say precisely which of seq, ts, event is wrong (called only when one is)."""
    value = obj.get("seq")
    if "seq" not in obj:
        return _LineError(_LINE, "missing field seq")
    if type(value) is not int:
        return _LineError(_LINE, f"seq must be an integer, not {value!r}")
    if value != seq:
        return _LineError(_LINE, f"seq is {value}, expected {seq}: a line is missing, "
                                 "duplicated or out of order here")
    ts = obj.get("ts")
    if type(ts) is not str or not _TS.fullmatch(ts) or not _valid_day(ts):
        return _LineError(_LINE, f"ts must be an RFC 3339 UTC time with microseconds and Z "
                                 f"(e.g. {_TS_EXAMPLE}), not {ts!r}")
    event = obj.get("event")
    if type(event) is not str or not event:
        return _LineError(_LINE, f"event must be a non-empty string, not {event!r}")
    return _LineError(_LINE, "malformed required fields")  # pragma: no cover - unreachable


def _prev_error(obj: dict[str, Any], lines: list[bytes], j: int, seq: int) -> _LineError:
    prev = obj.get("prev")
    if type(prev) is not str or not _HEX64.fullmatch(prev):
        return _LineError(_LINE, f"prev must be 64 lowercase hex digits, not {prev!r}")
    if seq == 0:
        return _LineError(_LINE, "prev of line 0 must be 64 zeros")
    return _chain_error(lines, j, seq)


def _chain_error(lines: list[bytes], j: int, seq: int) -> _LineError:
    """Line `seq` (``lines[j]``) has a wrong prev: blame the line that most likely changed."""
    if j + 1 < len(lines):
        try:
            following = json.loads(lines[j + 1])
        except (ValueError, RecursionError):
            following = None
        if (isinstance(following, dict)
                and following.get("prev") == hashlib.sha256(lines[j]).hexdigest()):
            # The next line still vouches for this one, so this one is intact and the
            # line before it no longer has the bytes this one vouched for.
            return _LineError(_LINE, f"line {seq - 1} was altered: its SHA-256 no longer "
                                     f"matches the prev recorded in line {seq}", seq - 1)
    return _LineError(_LINE, f"prev does not match the SHA-256 of line {seq - 1} "
                             f"(line {seq - 1} or line {seq} was altered)")


# ---- the per-line scan ----------------------------------------------------------------------


@dataclass
class _Chunk:
    """What scanning lines [start, stop) found, for the merge in `verify_log`.

    Kept in flat arrays rather than tuples: a forked worker pickles this back, and
    pickling a tuple per line costs more than scanning it.
    """

    lines: int = 0  # complete lines in the chunk
    failure: _Failure | None = None
    levels: list[bytes] = field(default_factory=list)  # Merkle levels over the chunk's leaves
    sign_seqs: array[int] = field(default_factory=lambda: array("q"))  # hsm.sign lines
    sign_intent: bytearray = field(default_factory=bytearray)  # 1: intent, 0: outcome
    sign_ops: list[str] = field(default_factory=list)  # their op_ids
    checkpoints: list[tuple[int, int, bytes, str]] = field(default_factory=list)
    last_start: int = -1  # seq of the last daemon.start line
    # Set by `_pair_chunk` when the chunk's own intents and outcomes pair up: the intents
    # still open at its end, and the outcomes whose intents are in earlier chunks.
    still_open: dict[str, int] | None = None
    foreign: list[tuple[int, str]] = field(default_factory=list)
    intents: dict[str, int] | None = None  # op_id -> seq of its intents; never pickled

    def __getstate__(self) -> dict[str, Any]:
        # Only the process that scanned the chunk keeps `intents` (the parent, its own
        # chunk): the merge rebuilds the others' faster than pickle would.
        return {**self.__dict__, "intents": None}


def _scan(data: bytes, first: int, lo: int, hi: int, prevhex: str,
          public_key: Ed25519PublicKey, key_name: str, origin: str | None,
          height: int | None) -> _Chunk:
    """The per-line checks (1, 2, the local part of 3, and 4 except the root) of the
    complete lines in ``data[lo:hi]``, the first of which is line `first` and comes
    after a line whose hash is `prevhex`.

    Also builds Merkle levels 0..`height` over the chunk's leaves, which line up
    with the whole tree's because chunks start on multiples of 2**height.

    Lines go in blocks of about `_BLOCK_BYTES`, each split on its own (so a worker
    never holds more than a block of lines, and reuses their memory: fewer page
    faults). `_scan_block` proves a whole block valid with a few bulk operations; a
    block it cannot prove valid (one that fails, or an unusual one) is checked again
    line by line by `_scan_lines`, which alone says where and why a line fails. The
    line after a block goes with it as context, for `_chain_error`'s look-ahead.
    """
    chunk = _Chunk()
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
        found = _scan_block(chunk, lines, seq, 0, count, prevhex, days, public_key,
                            key_name, origin)
        if found is None:
            found = _scan_lines(chunk, lines, seq, 0, count, prevhex, public_key,
                                key_name, origin)
        block_leaves, prevhex = found
        leaves.append(block_leaves)
        seq, start = seq + count, stop
        if chunk.failure is not None:
            seq += data.count(b"\n", start, hi)  # the lines not scanned still count
            break
    chunk.lines = seq - first
    chunk.levels = build_levels(b"".join(leaves), height)
    if chunk.failure is None:
        _pair_chunk(chunk)
    return chunk


def _parse_block(block: list[bytes]) -> list[dict[str, Any]] | None:
    """Every line of a block parsed and proved canonical, or None if one is not.

    The common case: msgspec decodes each line and encodes the result again with
    sorted keys, and that reproduces the line byte for byte. For a line without a
    backslash (checked for the whole block with one search) that proves it
    canonical: such a line holds no escapes, so neither does its re-encoding, which
    is then what json.dumps writes too (code-point key order, "," and ":", raw UTF-8
    strings, integers in decimal); and floats, whose spellings differ between the
    two, are refused by the decoder's hook. msgspec refuses what the strict stdlib
    parser refuses (NaN, Infinity, raw control characters, invalid UTF-8, integers
    longer than sys.get_int_max_str_digits()), and a duplicate key, whitespace or
    "-0" make the re-encoding differ. Lines long enough to nest near the recursion
    limit are left to the stdlib, whose limit is the one that counts.

    The block is re-encoded as one list, in one call: its encoding equals the lines
    joined by "," in "[...]" exactly when each line equals its object's encoding,
    because each line decoded alone to one complete value, so the commas between
    values (outside strings and brackets) are the ones put between the lines, on
    both sides.

    Otherwise each line is parsed as `_scan_lines` parses it; None if one of them
    is not canonical JSON.
    """
    joined = b",".join(block)
    if b"\\" not in joined and max(map(len, block)) <= _max_fast_line():
        try:
            objs = list(map(_MSGSPEC_DECODE, block))
            if (set(map(type, objs)) == {dict}
                    and _MSGSPEC_ENCODE(objs) == b"[" + joined + b"]"):
                return objs
        except (ValueError, RecursionError, msgspec.EncodeError, _NotFast):
            pass  # msgspec.DecodeError and UnicodeDecodeError are ValueErrors
    objs = []
    for line in block:
        try:
            text = line.decode("utf-8")
            try:
                obj = _fast_parse(line, text)
            except _NotFast:
                obj = _slow_parse(text)
        except (UnicodeDecodeError, _LineError):
            return None
        objs.append(obj)
    return objs


def _max_fast_line() -> int:
    """The longest line msgspec may parse: 2 bytes per level of nesting, and so many
    levels that the stdlib, a few frames deeper, would still be far from its limit."""
    depth = 0
    frame: Any = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return 2 * (sys.getrecursionlimit() - depth - 100)


def _scan_block(chunk: _Chunk, lines: list[bytes], base: int, start: int, stop: int,
                prevhex: str, days: set[str], public_key: Ed25519PublicKey, key_name: str,
                origin: str | None) -> tuple[bytes, str] | None:
    """Check lines [start, stop) in bulk: (their leaf hashes, the last line's hash).

    None if any check does not pass, and then `chunk` is untouched: each check here
    is one of `_scan_lines`'s, made for a column of values at once, so a block passes
    here exactly when it passes there.
    """
    block = lines[start:stop]
    n = len(block)
    first = base + start
    objs = _parse_block(block)
    if objs is None:
        return None
    try:  # one map per field: cheaper than zip(*map(itemgetter(...)))
        seqs = list(map(_SEQ, objs))
        stamps = list(map(_TS_FIELD, objs))
        events = list(map(_EVENT, objs))
        prevs = list(map(_PREV, objs))
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
        if type(ts) is not str or not _TS.fullmatch(ts):
            return None
        if ts[:10] not in days:
            if not _valid_day(ts):
                return None
            days.add(ts[:10])
    sha256 = hashlib.sha256
    # List comprehensions, not map(methodcaller(...)): faster on CPython 3.11.
    hexes = [sha256(line).hexdigest() for line in block]
    if prevs[0] != prevhex or prevs[1:] != hexes[:-1]:
        return None
    # Copying a hash of the 0x00 prefix beats concatenating each line to it.
    new_leaf = _LEAF_PREFIX.copy
    leaves_list = []
    append = leaves_list.append
    for line in block:
        leaf = new_leaf()
        leaf.update(line)
        append(leaf.digest())
    leaves = b"".join(leaves_list)

    sign_seqs: Iterable[int] = ()
    intents: list[bool] = []
    ops: list[Any] = []
    checkpoints: list[tuple[int, int, bytes, str]] = []
    if "hsm.sign" in distinct_events:
        if len(distinct_events) == 1:  # as in most blocks
            signs, sign_seqs = objs, range(first, first + n)
        else:
            is_sign = [event == "hsm.sign" for event in events]
            signs = list(compress(objs, is_sign))
            sign_seqs = list(compress(range(first, first + n), is_sign))
        try:
            ops = list(map(_OP_ID, signs))
            phases = list(map(_PHASE, signs))
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
                results = list(map(_RESULT, outcomes))
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
                            checkpoints.append(_checkpoint(obj[CHECKPOINT_FIELD], seq,
                                                           public_key, key_name, origin))
                        except _LineError:
                            return None
    # Every check passed: record what the merge needs.
    chunk.sign_seqs.extend(sign_seqs)
    chunk.sign_intent.extend(intents)
    chunk.sign_ops.extend(ops)
    chunk.checkpoints.extend(checkpoints)
    if "daemon.start" in distinct_events:
        chunk.last_start = first + n - 1 - events[::-1].index("daemon.start")
    return leaves, hexes[-1]


def _scan_lines(chunk: _Chunk, lines: list[bytes], base: int, lo: int, hi: int, prevhex: str,
                public_key: Ed25519PublicKey, key_name: str,
                origin: str | None) -> tuple[bytes, str]:
    """Check lines [lo, hi) one by one: (leaf hashes, hash of the last line checked).

    Sets ``chunk.failure`` at the first line that fails, with the reason.
    """
    sha256 = hashlib.sha256
    ts_match = _TS.fullmatch
    fast_parse = _fast_parse
    seqs, intents, ops = chunk.sign_seqs, chunk.sign_intent, chunk.sign_ops
    leaves = bytearray()
    day = ""
    last_ts: Any = object()  # equal to no ts: a first line's ts ("", None, ...) is checked
    i = j = base + lo
    try:
        for j in range(lo, hi):
            i = base + j
            line = lines[j]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _LineError(_LINE, f"not valid UTF-8 at byte {exc.start}") from None
            try:
                obj = fast_parse(line, text)
            except _NotFast:
                obj = _slow_parse(text)
            seq = obj.get("seq")
            ts = obj.get("ts")
            event = obj.get("event")
            if seq != i or type(seq) is not int or type(event) is not str or not event:
                raise _field_error(obj, i)
            if ts != last_ts:  # a group commit gives its lines one ts: check it once
                if type(ts) is not str or not ts_match(ts):
                    raise _field_error(obj, i)
                if ts[:10] != day:  # calendar check, once per day of log
                    if not _valid_day(ts):
                        raise _field_error(obj, i)
                    day = ts[:10]
                last_ts = ts
            if obj.get("prev") != prevhex:
                raise _prev_error(obj, lines, j, i)
            prevhex = sha256(line).hexdigest()
            leaves += sha256(b"\x00" + line).digest()
            if event == "hsm.sign":
                op_id = obj.get("op_id")
                if type(op_id) is not str or not op_id:
                    raise _LineError(_LINE, f"hsm.sign needs a non-empty string op_id, not "
                                            f"{op_id!r}")
                phase = obj.get("phase")
                if phase == "intent":
                    intents.append(1)
                elif phase == "outcome":
                    result = obj.get("result")
                    if type(result) is not str or not result:
                        raise _LineError(_LINE, f"an hsm.sign outcome needs a string result, "
                                                f"not {result!r}")
                    intents.append(0)
                    if result == "ok" and CHECKPOINT_FIELD in obj:
                        chunk.checkpoints.append(_checkpoint(obj[CHECKPOINT_FIELD], i,
                                                             public_key, key_name, origin))
                else:
                    raise _LineError(_LINE, f"hsm.sign phase must be 'intent' or 'outcome', "
                                            f"not {phase!r}")
                seqs.append(i)
                ops.append(op_id)
            elif event == "daemon.start":
                chunk.last_start = i
    except _LineError as exc:
        chunk.failure = (i if exc.seq is None else exc.seq, exc.stage, exc.reason)
        if exc.stage == _CHECKPOINT:  # the line's pairing runs before its checkpoint check
            seqs.append(i)
            ops.append(obj["op_id"])
    return bytes(leaves), prevhex


def _checkpoint(text: Any, seq: int, public_key: Ed25519PublicKey, key_name: str,
                origin: str | None) -> tuple[int, int, bytes, str]:
    if type(text) is not str:
        raise _LineError(_CHECKPOINT, "the checkpoint field must be a string (a signed note)")
    try:
        cp = verify_checkpoint(text, key_name, public_key, origin)
    except NoteError as exc:
        raise _LineError(_CHECKPOINT, f"bad checkpoint: {exc}") from None
    if cp.size > seq:
        raise _LineError(_CHECKPOINT, f"the checkpoint covers {cp.size} lines but is logged "
                                      f"at seq {seq}: it can only cover earlier lines")
    return (seq, cp.size, cp.root, text)


def _scan_range(data: bytes, first: int, lo: int, hi: int, public_key: Ed25519PublicKey,
                key_name: str, origin: str | None, height: int | None) -> _Chunk:
    """Scan the complete lines in ``data[lo:hi]``, the first of which is line `first`.

    Reads only its own range (plus a line of context either side), so a forked
    worker never touches the parent's objects and copy-on-write copies nothing.
    """
    if first:  # the line before `lo` is line first - 1
        before = data.rfind(b"\n", 0, lo - 1) + 1
        prevhex = hashlib.sha256(data[before:lo - 1]).hexdigest()
    else:
        prevhex = GENESIS
    return _scan(data, first, lo, hi, prevhex, public_key, key_name, origin, height)


def _cuts(data: bytes, end: int, workers: int) -> list[tuple[int, int]]:
    """(first line, byte offset) where each worker's chunk starts: near equal byte
    shares, moved forward to a line number that is a multiple of 2**_ALIGN.

    The number of the line at a share's boundary is taken from its seq rather than
    by counting the newlines before it (tens of MB, the longest step before the
    workers start). `_scan_all` checks it against the lines the chunks before it
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


def _scan_all(data: bytes, end: int, workers: int, public_key: Ed25519PublicKey,
              key_name: str, origin: str | None) -> list[_Chunk]:
    """Scan the complete lines, ``data[:end]``, in `workers` processes."""
    if workers > 1 and hasattr(os, "fork"):
        cuts = _cuts(data, end, min(workers, max(1, end // max(_MIN_BYTES, 1))))
    else:
        cuts = [(0, 0)]
    if len(cuts) == 1:
        return [_scan_range(data, 0, 0, end, public_key, key_name, origin, None)]
    ranges = [(line, offset, next_offset) for (line, offset), (_, next_offset)
              in zip(cuts, [*cuts[1:], (0, end)], strict=True)]
    children: list[tuple[int, int, mmap.mmap]] = []
    chunks: list[_Chunk] = []
    try:
        for first, lo, hi in ranges[1:]:
            # The child reads `data` through fork (copy-on-write, read-only), sends back
            # only its findings and exits; it never returns into the caller's code. The
            # findings (MBs of Merkle levels) go through shared memory, several times
            # faster than a pipe; the pipe says how long they are, or carries them if
            # they do not fit (they always should: see `_SHARED_PER_BYTE`).
            read_fd, write_fd = os.pipe()
            shared = mmap.mmap(-1, _SHARED_PER_BYTE * (hi - lo) + (1 << 16))
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child, reported through the pipe
                os.close(read_fd)
                code = 0
                try:
                    chunk = _scan_range(data, first, lo, hi, public_key, key_name, origin,
                                        _ALIGN)
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
        chunks.append(_scan_range(data, first, lo, hi, public_key, key_name, origin, _ALIGN))
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
                return [_scan_range(data, 0, 0, end, public_key, key_name, origin, None)]
            line += chunk.lines
        return chunks
    finally:
        for pid, read_fd, shared in children:
            os.close(read_fd)
            os.waitpid(pid, 0)
            shared.close()


# ---- putting it together --------------------------------------------------------------------


def verify_log(data: bytes, public_key: Ed25519PublicKey, key_name: str,
               origin: str | None = None, latest_checkpoint: str | None = None,
               state: dict[str, Any] | None = None, *,
               workers: int | None = None) -> VerifyResult:
    """Verify a whole audit log; see the module docstring for what is checked.

    `key_name` is the audit key's name in the checkpoint signature lines and
    `origin`, when given, the origin line every checkpoint must carry.

    Logs of more than a few MB are scanned by `workers` processes forked from this
    one (POSIX). By default that is one per CPU when the caller runs a single
    thread (the CLI) and none otherwise, because forking a multi-threaded process
    (the daemon) can deadlock the child. A malformed `state` raises ValueError: it
    is the auditor's own file, not evidence about the log.
    """
    if workers is None:
        workers = (os.cpu_count() or 1) if threading.active_count() == 1 else 1
    prior = _check_state(state, public_key, key_name, origin) if state is not None else None
    was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived dicts; nothing here makes reference cycles
    try:
        return _verify(data, public_key, key_name, origin, latest_checkpoint, prior, workers)
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class _Prefix:
    """A signed claim about the log's first `size` lines: the state or a checkpoint file."""

    size: int
    root: bytes
    text: str


def _earliest(a: _Failure | None, b: _Failure | None) -> _Failure | None:
    if a is None or b is None:
        return a if b is None else b
    return min(a, b)


def _verify(data: bytes, public_key: Ed25519PublicKey, key_name: str, origin: str | None,
            latest_text: str | None, prior: _Prefix | None, workers: int) -> VerifyResult:
    end = data.rfind(b"\n") + 1
    tail = data[end:]  # empty unless the final line is torn
    chunks = _scan_all(data, end, workers, public_key, key_name, origin)
    n = sum(c.lines for c in chunks)

    # The per-line scan's first failure is the first failing chunk's; pairing runs on the
    # lines before it and may find an earlier one.
    failure = next((c.failure for c in chunks if c.failure is not None), None)
    open_intents: dict[str, int] = {}
    failure = _earliest(failure, _pair(chunks, failure, open_intents))
    good = failure[0] if failure else n  # lines [0, good) passed every per-line check

    latest: _Prefix | None = None
    latest_error: str | None = None
    if latest_text is not None:
        try:
            cp = verify_checkpoint(latest_text, key_name, public_key, origin)
            latest = _Prefix(cp.size, cp.root, latest_text)
        except NoteError as exc:
            latest_error = f"the latest checkpoint does not verify: {exc}"

    # Merkle roots: the log's own checkpoints, then the prefixes the state and the
    # latest checkpoint vouch for (when the log is long enough to hold them).
    checkpoints = [cp for c in chunks for cp in c.checkpoints
                   if failure is None or (cp[0], _CHECKPOINT) < failure[:2]]
    prefixes = [p for p in (prior, latest) if p is not None and 0 < p.size <= good]
    tree = _tree(chunks) if checkpoints or prefixes else MerkleTree()
    verified = 0
    for seq, size, root, _text in checkpoints:
        if tree.root(size) != root:
            failure = _earliest(failure, (seq, _CHECKPOINT_ROOT, (
                f"the checkpoint's root is not the Merkle root of the first {size} lines: "
                "a line it covers was altered")))
            break  # in log order: the first mismatch is the one to report
        verified += 1
    for prefix in prefixes:
        if tree.root(prefix.size) != prefix.root:
            what = "the checkpoint verified last time" if prefix is prior else (
                "the latest checkpoint")
            failure = _earliest(failure, (prefix.size - 1, _PREFIX, (
                f"rewritten: the first {prefix.size} lines no longer match {what}")))
    verified += latest is not None

    if failure is None:
        failure = _end_of_log(n, tail, prior, latest, open_intents, chunks)
    if failure is not None:
        return VerifyResult(False, n, failure[0], failure[2], verified, None)
    if latest_error is not None:  # the log is fine, but the checkpoint file is not
        return VerifyResult(False, n, None, latest_error, verified, None)

    candidates = [p for p in (prior, latest) if p is not None]
    candidates += [_Prefix(size, root, text) for _seq, size, root, text in checkpoints]
    best = max(candidates, key=lambda p: p.size, default=None)
    new_state = None if best is None else {
        "size": best.size, "root": base64.b64encode(best.root).decode("ascii"),
        "checkpoint": best.text}
    return VerifyResult(True, n, None, None, verified, new_state)


def _pair(chunks: list[_Chunk], failure: _Failure | None,
          open_intents: dict[str, int]) -> _Failure | None:
    """Pair intents and outcomes in log order, up to the scan's first failure."""
    if failure is None and _pair_in_bulk(chunks, open_intents):
        return None
    closed: set[str] = set()
    for chunk in chunks:
        for seq, is_intent, op_id in zip(chunk.sign_seqs, chunk.sign_intent, chunk.sign_ops,
                                         strict=True):
            if failure is not None and (seq, _PAIRING) >= failure[:2]:
                return None
            if is_intent:
                if op_id in open_intents or op_id in closed:
                    return (seq, _PAIRING, f"duplicate intent: op_id {op_id!r} was used before")
                open_intents[op_id] = seq
            elif op_id in open_intents:
                del open_intents[op_id]
                closed.add(op_id)
            elif op_id in closed:
                return (seq, _PAIRING, f"second outcome for op_id {op_id!r}")
            else:
                return (seq, _PAIRING, f"outcome without an earlier intent (op_id {op_id!r})")
    return None


def _pair_chunk(chunk: _Chunk) -> None:
    """The part of pairing that needs only this chunk, done where it was scanned.

    The chunk's intents and outcomes pair up among themselves when no two intents
    and no two outcomes share an op_id and each outcome whose intent is in the chunk
    comes after it; the other outcomes ("foreign") are left for `_pair_in_bulk`.
    """
    ops, seqs, is_intent = chunk.sign_ops, chunk.sign_seqs, bytes(chunk.sign_intent)
    is_outcome = is_intent.translate(_FLIP)
    intent_ops = list(compress(ops, is_intent))
    intents = dict(zip(intent_ops, compress(seqs, is_intent), strict=True))
    outcome_ops = list(compress(ops, is_outcome))
    closed = set(outcome_ops)
    if len(intents) != len(intent_ops) or len(closed) != len(outcome_ops):
        return
    outcome_seqs = list(compress(seqs, is_outcome))
    # -1: the intent is in an earlier chunk
    intent_seqs = list(map(intents.get, outcome_ops, repeat(-1)))
    if not all(map(lt, intent_seqs, outcome_seqs)):
        return
    if -1 in intent_seqs:  # usually one or two, for the pairs a chunk boundary splits
        chunk.foreign = [(seq, op) for seq, op, at in zip(outcome_seqs, outcome_ops,
                                                          intent_seqs, strict=True) if at < 0]
    chunk.still_open = {}
    if len(intents) > len(outcome_ops) - len(chunk.foreign):  # some intents stay open
        # In log order (their seqs are), as `_pair` would leave them: usually a few.
        still_open = sorted(intents.keys() - closed, key=intents.__getitem__)
        chunk.still_open = {op: intents[op] for op in still_open}
    chunk.intents = intents


def _pair_in_bulk(chunks: list[_Chunk], open_intents: dict[str, int]) -> bool:
    """`_pair` for when every intent and outcome pairs up, from what `_pair_chunk` found,
    with no step per line. False, and `open_intents` untouched, if one does not:
    `_pair` then finds which, in log order.

    Given that each chunk pairs up on its own, the whole log does when no intent
    reuses the op_id of an intent in an earlier chunk (or one open before), and each
    foreign outcome closes an intent that is still open when it comes.
    """
    opened = dict(open_intents)
    # The op_ids of the intents so far: those open before, then each chunk's.
    earlier: list[Any] = [open_intents.keys()] if open_intents else []
    for k, chunk in enumerate(chunks):
        if chunk.still_open is None:
            return False
        if chunk.intents is not None:  # the parent's own chunk keeps its dict
            intents: Any = chunk.intents.keys()
        else:
            intents = compress(chunk.sign_ops, chunk.sign_intent)
            if len(earlier) > 1 or k + 1 < len(chunks):  # to be read more than once
                intents = set(intents)
        for ops in earlier:
            if not ops.isdisjoint(intents):
                return False
        for _seq, op in chunk.foreign:
            if opened.pop(op, None) is None:
                return False
        opened.update(chunk.still_open)
        earlier.append(intents)
    open_intents.clear()
    open_intents.update(opened)
    return True


_FLIP = bytes.maketrans(b"\x00\x01", b"\x01\x00")


def _tree(chunks: list[_Chunk]) -> MerkleTree:
    """The tree over every leaf the scan hashed, joining the chunks' levels."""
    used: list[_Chunk] = []
    for chunk in chunks:  # chunks after the first failing one hashed lines that don't count
        used.append(chunk)
        if chunk.failure is not None:
            break
    height = min(len(c.levels) for c in used)
    return MerkleTree.from_levels([b"".join(c.levels[k] for c in used) for k in range(height)])


def _end_of_log(n: int, tail: bytes, prior: _Prefix | None, latest: _Prefix | None,
                open_intents: dict[str, int], chunks: list[_Chunk]) -> _Failure | None:
    """Checks that need the whole log, once every complete line has passed.

    A missing tail explains open intents, so truncation and a torn line come first.
    """
    if prior is not None and prior.size > n:
        return (n, _LINE, f"truncated: the log had {prior.size} lines at the last "
                          f"verification, now it has {n}")
    if latest is not None and latest.size > n:
        return (n, _LINE, f"log is shorter than the checkpoint (truncated): the latest "
                          f"checkpoint covers {latest.size} lines, the log has {n}")
    if tail:
        return (n, _LINE, "torn line: the final line has no newline (an interrupted write)")
    last_start = max(c.last_start for c in chunks)
    unexcused = [seq for seq in open_intents.values() if seq > last_start]
    if unexcused:
        return (min(unexcused), _PAIRING, "intent without an outcome, and no daemon.start "
                                          "after it (so no crash interrupted it)")
    return None


# ---- state ----------------------------------------------------------------------------------


def _check_state(state: dict[str, Any], public_key: Ed25519PublicKey, key_name: str,
                 origin: str | None) -> _Prefix:
    if not isinstance(state, dict):
        raise ValueError("state must be a JSON object")
    size, root_text, text = state.get("size"), state.get("root"), state.get("checkpoint")
    if type(size) is not int or size < 0 or type(root_text) is not str or type(text) is not str:
        raise ValueError("state must have an integer size, a base64 root and a checkpoint")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        raise ValueError("state root is not base64") from None
    try:
        cp = verify_checkpoint(text, key_name, public_key, origin)
    except NoteError as exc:
        raise ValueError(f"the checkpoint in the state file does not verify: {exc}") from None
    if (cp.size, cp.root) != (size, root):
        raise ValueError("the state's size and root are not those of its checkpoint")
    return _Prefix(size, root, text)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state saved by the previous verification, or None if there is none yet."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        state = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"state file {path} is not JSON: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"state file {path} must hold a JSON object")
    return state


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Replace the state file atomically: temp file, fsync, rename, fsync the directory."""
    target = Path(path)
    directory = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, sort_keys=True, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
