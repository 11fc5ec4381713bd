"""JSON from clients, as text hsmca can store and sign: valid Unicode only.

`json.loads` turns an escaped lone UTF-16 surrogate ("\\ud800") into a str that no
encoder accepts, so it would fail later, in SQLite or a hash, as a 500. Such text is
refused where it comes in. A surrogate pair ("\\ud83d\\ude00") is one character and fine.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class NotUnicode(ValueError):
    """Text with a lone surrogate, or bytes that are not UTF-8; or (NotJSON) what
    RFC 8259 leaves out and Python's parser takes: NaN and Infinity, and a key given
    twice, whose last value would silently win (an API client's trial)."""


class NotJSON(NotUnicode):
    pass


def _constant(name: str) -> Any:
    raise NotJSON(f"holds {name}, which is not JSON (RFC 8259 has no such number)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: a number JSON has, that no double holds
        raise NotJSON(f"holds the number {text[:20]}, too large for any field")
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise NotJSON(f"has the key {key!r} twice: give each once")
            seen.add(key)
    return obj


def loads(raw: bytes | str) -> Any:
    """`json.loads`, refusing text that is not Unicode (NotUnicode, a ValueError). Bytes
    are UTF-8 (RFC 8259 8.1), decoded strictly: `json.loads` would guess UTF-16 too, and
    let an encoded surrogate through."""
    if isinstance(raw, bytes):
        data = raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NotUnicode("is not UTF-8") from None
    else:
        text, data = raw, raw.encode("utf-8", "surrogatepass")
    obj = json.loads(text, parse_constant=_constant, parse_float=_float,
                     object_pairs_hook=_pairs)
    if _SURROGATE_ESCAPE.search(data):  # rare: the check below walks the whole object
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise NotUnicode("holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                             "not a Unicode character") from None
    return obj
