"""The format of one line, checked exactly and fast (docs/audit-log.md, "Lines").

A line is valid when it is UTF-8, a JSON object in canonical form (what
`ca.audit.line.canonical` writes: ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=False)``, NaN and Infinity refused), and its
``seq``, ``ts``, ``event`` and ``prev`` are well formed.

`slow_parse` is the definition: parse, re-serialise with the one canonical
encoder, compare. `fast_parse` and `parse_block` prove most lines canonical
without re-serialising them, and leave every line they cannot prove to
`slow_parse`, so that all three accept exactly the same lines. The error builders
say which field is wrong and, for a broken chain, which line most likely changed.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import date
from json.decoder import JSONDecoder
from operator import itemgetter
from typing import Any

import msgspec

from ca.audit.line import canonical_text, chain_hash
from ca.audit.verify.failure import LineError, Stage

# ---- canonical JSON, fast and exact ---------------------------------------------------------


class NotFast(Exception):
    """The fast path cannot prove this line canonical; the slow path decides."""


def _refuse_float(text: str) -> Any:
    raise NotFast  # float text has many spellings: let the canonical encoder judge it


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_FAST_SCAN = JSONDecoder(parse_float=_refuse_float, parse_constant=_refuse_constant).scan_once
_SLOW_DECODER = JSONDecoder(parse_constant=_refuse_constant)

# Deleting every byte but these leaves exactly b"{" for a line with one object, no
# backslash and no JSON whitespace: the common case, found with one C call.
_NOT_SPECIAL = bytes(b for b in range(256) if b not in b"\\ \t\r{")
# Maps every JSON structural byte to "," and every JSON whitespace byte to " ".
_SKELETON = bytes.maketrans(b"{}[]:\t\r", b",,,,,  ")
# The integer -0 (json.dumps writes 0): "-0" then what may follow a number.
_NEGATIVE_ZERO = re.compile(rb"-0[,\]}]")
_MSGSPEC_DECODE = msgspec.json.Decoder(float_hook=_refuse_float).decode
_MSGSPEC_ENCODE = msgspec.json.Encoder(order="sorted").encode
_SORTED_KEY_SETS: set[tuple[str, ...]] = set()

# Column getters for the bulk checks, one field of every line of a block at a time.
SEQ, TS_FIELD, EVENT, PREV = map(itemgetter, ("seq", "ts", "event", "prev"))
OP_ID, PHASE, RESULT = map(itemgetter, ("op_id", "phase", "result"))


def fast_parse(line: bytes, text: str) -> dict[str, Any]:
    """Parse a line that is canonical by construction, or raise NotFast.

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
            raise NotFast
        skeleton = line.translate(_SKELETON)  # spaces in strings are fine, next to "," not
        if b", " in skeleton or b" ," in skeleton:
            raise NotFast
    if _NEGATIVE_ZERO.search(line):
        raise NotFast
    try:
        obj, end = _FAST_SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError):
        raise NotFast from None
    if end != len(text) or type(obj) is not dict or line.count(b'":') != len(obj):
        raise NotFast
    keys = tuple(obj)
    if keys not in _SORTED_KEY_SETS:
        if list(keys) != sorted(keys):
            raise NotFast
        if len(_SORTED_KEY_SETS) < 4096:  # a log has a handful of line shapes
            _SORTED_KEY_SETS.add(keys)
    return obj


def slow_parse(text: str) -> dict[str, Any]:
    """Parse and re-serialise: the definition of canonical form. Raises LineError."""
    try:
        obj = _SLOW_DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise LineError(Stage.LINE, f"not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise LineError(Stage.LINE, f"a line must be a JSON object, not {type(obj).__name__}")
    try:
        canonical = canonical_text(obj)
    except (ValueError, RecursionError) as exc:  # e.g. 1e400, which parses as infinity
        raise LineError(Stage.LINE, f"not canonical JSON: {exc}") from None
    if canonical != text:
        raise LineError(Stage.LINE, "not in canonical form (json.dumps with sort_keys=True, "
                                    "separators=(',', ':'), ensure_ascii=False)")
    return obj


def parse_block(block: list[bytes]) -> list[dict[str, Any]] | None:
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

    Otherwise each line is parsed as the line-by-line scan parses it; None if one of
    them is not canonical JSON.
    """
    joined = b",".join(block)
    if b"\\" not in joined and max(map(len, block)) <= _max_fast_line():
        try:
            objs = list(map(_MSGSPEC_DECODE, block))
            if (set(map(type, objs)) == {dict}
                    and _MSGSPEC_ENCODE(objs) == b"[" + joined + b"]"):
                return objs
        except (ValueError, RecursionError, msgspec.EncodeError, NotFast):
            pass  # msgspec.DecodeError and UnicodeDecodeError are ValueErrors
    objs = []
    for line in block:
        try:
            text = line.decode("utf-8")
            try:
                obj = fast_parse(line, text)
            except NotFast:
                obj = slow_parse(text)
        except (UnicodeDecodeError, LineError):
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


# ---- field checks ---------------------------------------------------------------------------

TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                r"\.[0-9]{6}Z")  # [0-9], not \d: \d also matches non-ASCII digits
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TS_EXAMPLE = "2026-11-23T17:28:05.123456Z"


def valid_day(ts: str) -> bool:
    """Whether a ts that matches `TS` names a day the calendar has."""
    try:
        date(int(ts[0:4]), int(ts[5:7]), int(ts[8:10]))
    except ValueError:
        return False
    return True


def field_error(obj: dict[str, Any], seq: int) -> LineError:
    """Say precisely which of seq, ts, event is wrong (called only when one is)."""
    value = obj.get("seq")
    if "seq" not in obj:
        return LineError(Stage.LINE, "missing field seq")
    if type(value) is not int:
        return LineError(Stage.LINE, f"seq must be an integer, not {value!r}")
    if value != seq:
        return LineError(Stage.LINE, f"seq is {value}, expected {seq}: a line is missing, "
                                     "duplicated or out of order here")
    ts = obj.get("ts")
    if type(ts) is not str or not TS.fullmatch(ts) or not valid_day(ts):
        return LineError(Stage.LINE, f"ts must be an RFC 3339 UTC time with microseconds "
                                     f"and Z (e.g. {_TS_EXAMPLE}), not {ts!r}")
    event = obj.get("event")
    if type(event) is not str or not event:
        return LineError(Stage.LINE, f"event must be a non-empty string, not {event!r}")
    return LineError(Stage.LINE, "malformed required fields")  # pragma: no cover - unreachable


def prev_error(obj: dict[str, Any], lines: list[bytes], j: int, seq: int) -> LineError:
    """Line `seq` (``lines[j]``, `obj` parsed) has a prev other than the one expected."""
    prev = obj.get("prev")
    if type(prev) is not str or not _HEX64.fullmatch(prev):
        return LineError(Stage.LINE, f"prev must be 64 lowercase hex digits, not {prev!r}")
    if seq == 0:
        return LineError(Stage.LINE, "prev of seq 0 must be 64 zeros")
    return _chain_error(lines, j, seq)


def _chain_error(lines: list[bytes], j: int, seq: int) -> LineError:
    """Line `seq` (``lines[j]``) has a wrong prev: blame the line that most likely changed."""
    if j + 1 < len(lines):
        try:
            following = json.loads(lines[j + 1])
        except (ValueError, RecursionError):
            following = None
        if isinstance(following, dict) and following.get("prev") == chain_hash(lines[j]):
            # The next line still vouches for this one, so this one is intact and the
            # line before it no longer has the bytes this one vouched for.
            return LineError(Stage.LINE, f"seq {seq - 1} was altered: its SHA-256 no longer "
                                         f"matches the prev recorded in seq {seq}", seq - 1)
    return LineError(Stage.LINE, f"prev does not match the SHA-256 of seq {seq - 1} "
                                 f"(seq {seq - 1} or seq {seq} was altered)")
