"""The offline audit verifier: valid logs pass, and any tampering is caught and named
at the first line whose bytes or position changed.

Logs are written here the way docs/audit-log.md says the daemon writes them (canonical
JSON lines, hash chain, intent/outcome pairs, signed checkpoints in outcome lines),
with a software Ed25519 key standing in for the HSM's audit key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ca.audit.verify.scan as scan_module
from ca.audit.line import GENESIS, canonical
from ca.audit.merkle import CompactRange, leaf_hash
from ca.audit.note import sign_checkpoint
from ca.audit.verify import VerifyResult, load_state, save_state, verify_log
from tests.helpers import rechain

ORIGIN = "hsmca.example/audit"
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"test audit key").digest())
PUB = KEY.public_key()
T0 = datetime(2026, 1, 5, 23, 59, 59, 990000, tzinfo=UTC)  # crosses midnight, "-0" in dates


def digest_hex(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class LogBuilder:
    """Writes a log the way the daemon does, one canonical chained line at a time."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self._prev = GENESIS
        self._tree = CompactRange()
        self._ops = 0

    @property
    def size(self) -> int:
        return len(self.lines)

    def add(self, event: str, **fields: Any) -> int:
        seq = len(self.lines)
        # A group commit gives several lines the same ts: every third pair shares one.
        ts = (T0 + timedelta(microseconds=(seq // 2) * 1013)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = canonical({**fields, "seq": seq, "ts": ts, "event": event, "prev": self._prev})
        self.lines.append(line)
        self._prev = digest_hex(line)
        self._tree.append(leaf_hash(line))
        return seq

    def new_op(self) -> str:
        self._ops += 1
        return f"op-{self._ops}"

    def intent(self, op_id: str, purpose: str = "x509", **fields: Any) -> int:
        return self.add("hsm.sign", phase="intent", op_id=op_id, purpose=purpose,
                        key="pkcs11:token=ca;object=issuing;type=private", mechanism="ECDSA",
                        actor="local", request_id=f"req-{op_id}", **fields)

    def outcome(self, op_id: str, result: str = "ok", **fields: Any) -> int:
        return self.add("hsm.sign", phase="outcome", op_id=op_id, result=result,
                        digest="ab" * 32, signature_digest="cd" * 32, **fields)

    def note(self, key: Ed25519PrivateKey = KEY, origin: str = ORIGIN) -> str:
        """A checkpoint of every line so far (what state-dir/audit/checkpoint holds)."""
        return sign_checkpoint(origin, self.size, self._tree.root(), ORIGIN,
                               key.public_key(), key.sign)

    def checkpoint(self, key: Ed25519PrivateKey = KEY, origin: str = ORIGIN) -> int:
        """Sign and log a checkpoint as the daemon does; returns the outcome's seq."""
        op = self.new_op()
        note = self.note(key, origin)
        size, root = self.size, base64.b64encode(self._tree.root()).decode()
        self.add("hsm.sign", phase="intent", op_id=op, purpose="checkpoint",
                 key="pkcs11:token=ca;object=audit;type=private", mechanism="CKM_EDDSA",
                 actor="local", request_id=None, size=size, root=root)
        body = note[:note.index("\n\n") + 1]  # what the audit key signs
        return self.add("hsm.sign", phase="outcome", op_id=op, result="ok",
                        digest=hashlib.sha256(body.encode()).hexdigest(),
                        signature_digest="cd" * 32, checkpoint=note)

    def latest(self) -> str:
        """Sign and log a checkpoint of every line so far as the daemon does, and return
        it: what state-dir/audit/checkpoint holds (written once its signing is logged)."""
        self.checkpoint()
        return json.loads(self.lines[-1])["checkpoint"]

    def data(self) -> bytes:
        return b"".join(line + b"\n" for line in self.lines)


def join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def rewrite(line: bytes, **changes: Any) -> bytes:
    return canonical({**json.loads(line), **changes})


def check(data: bytes, **kw: Any) -> VerifyResult:
    """verify_log, in one process and in forked workers: both must say the same."""
    result = verify_log(data, PUB, ORIGIN, origin=ORIGIN, workers=1, **kw)
    with small_chunks():
        forked = verify_log(data, PUB, ORIGIN, origin=ORIGIN, workers=3, **kw)
    assert (forked.ok, forked.bad_seq, forked.reason, forked.lines, forked.new_state) == (
        result.ok, result.bad_seq, result.reason, result.lines, result.new_state)
    return result


@contextmanager
def small_chunks() -> Iterator[None]:
    """Let tiny logs use the forked workers: chunks of 4 lines, no minimum size."""
    saved = scan_module._ALIGN, scan_module._MIN_BYTES
    scan_module._ALIGN, scan_module._MIN_BYTES = 2, 0
    try:
        yield
    finally:
        scan_module._ALIGN, scan_module._MIN_BYTES = saved


def simple_log() -> LogBuilder:
    b = LogBuilder()
    b.add("daemon.start", version="0.1.0", config_sha256="00" * 32)
    b.add("hsm.login", slot=0)
    for _ in range(3):
        op = b.new_op()
        b.intent(op, serial="01ab", names=["svc.example"])
        b.outcome(op, fingerprint="ef" * 32)
    b.checkpoint()
    op = b.new_op()
    b.intent(op, serial="02cd")
    b.outcome(op)
    return b


# ---- random valid logs ----------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=8)


@st.composite
def valid_logs(draw: st.DrawFn) -> LogBuilder:
    """A log with interleaved operations, failures, crashes and checkpoints."""
    b = LogBuilder()
    b.add("daemon.start", version="0.1.0")
    open_ops: list[str] = []
    steps = draw(st.lists(st.sampled_from(
        ["intent", "outcome", "outcome", "event", "checkpoint", "crash"]), min_size=3,
        max_size=25))
    for step in steps:
        if step == "intent":
            op = b.new_op()
            b.intent(op, note=draw(st.text(max_size=10)))
            open_ops.append(op)
        elif step == "outcome" and open_ops:
            op = open_ops.pop(draw(st.integers(0, len(open_ops) - 1)))
            b.outcome(op, result=draw(st.sampled_from(["ok", "ok", "CKR_DEVICE_ERROR"])))
        elif step == "event":
            b.add(draw(st.sampled_from(["hsm.open", "cert.revoke", "token.create"])),
                  detail=draw(json_values))
        elif step == "checkpoint":
            b.checkpoint()
        elif step == "crash":
            b.add("daemon.start", version="0.1.0")
            open_ops.clear()  # interrupted operations: excused by the restart
    for op in open_ops:
        b.outcome(op)
    return b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_logs())
def test_random_valid_logs_verify(log: LogBuilder) -> None:
    latest = log.latest()
    checkpoints = sum(b'"checkpoint":"' in line for line in log.lines)
    result = check(log.data(), latest_checkpoint=latest)
    assert result.ok, result.reason
    assert (result.lines, result.bad_seq, result.reason) == (log.size, None, None)
    assert result.checkpoints == checkpoints + 1
    assert result.new_state is not None and result.new_state["size"] == log.size


# ---- random tampering -----------------------------------------------------------------------

MUTATIONS = ["corrupt", "rewrite", "delete", "insert-copy", "insert-garbage", "swap"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_logs(), st.sampled_from(MUTATIONS), st.data())
def test_tampering_is_caught_at_the_first_changed_line(log: LogBuilder, kind: str,
                                                       data: st.DataObject) -> None:
    """Apply one edit and check the verifier names the first line that changed.

    "Changed" means its bytes differ, or the line at that position is not the one
    that was there. The auditor holds the latest checkpoint file, which covers the
    whole log, so even the last line is protected.
    """
    lines, n = list(log.lines), log.size
    latest = log.note()
    if kind == "corrupt":
        # Not canonical or not JSON any more: the line itself fails.
        k = data.draw(st.integers(0, n - 1))
        how = data.draw(st.sampled_from(["space", "cut", "garbage", "reorder"]))
        if how == "space":
            lines[k] = lines[k].replace(b"{", b"{ ", 1)
        elif how == "cut":
            lines[k] = lines[k][:-1]
        elif how == "garbage":
            lines[k] = b"x" + data.draw(st.binary(max_size=20)).replace(b"\n", b"")
        else:
            obj = json.loads(lines[k])
            lines[k] = json.dumps(dict(reversed(obj.items())), separators=(",", ":"),
                                  ensure_ascii=False).encode()
        expected = k
    elif kind == "rewrite":
        # Still a perfect line on its own: only the next line's prev (or, for the last
        # line, the checkpoint) shows the change. For the second-to-last line the
        # verifier cannot tell it from an edit of the last line's prev, and reports
        # the last line.
        k = data.draw(st.integers(0, n - 1))
        lines[k] = rewrite(lines[k], tampered=True)
        expected = n - 1 if k == n - 2 else k
    elif kind == "delete":
        k = data.draw(st.integers(0, n - 1))
        del lines[k]
        expected = k  # the next line moved up into k (or the log ends at k: truncated)
    elif kind == "insert-copy":
        k = data.draw(st.integers(0, n))
        j = data.draw(st.integers(0, n - 1))
        lines.insert(k, lines[j])
        expected = k + 1 if j == k else k  # a copy of line k in front of itself is line k
    elif kind == "insert-garbage":
        k = data.draw(st.integers(0, n))
        lines.insert(k, canonical({"seq": k, "event": "forged"}))
        expected = k
    else:
        assume(n >= 2)
        k = data.draw(st.integers(0, n - 2))
        m = data.draw(st.integers(k + 1, n - 1))
        lines[k], lines[m] = lines[m], lines[k]
        expected = k
    assume(lines != log.lines)
    result = check(join(lines), latest_checkpoint=latest)
    assert not result.ok
    assert result.bad_seq == expected, (kind, result.reason)
    assert result.reason


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_logs(), st.data())
def test_a_rewrite_with_a_repaired_chain_is_caught_by_the_next_checkpoint(
        log: LogBuilder, data: st.DataObject) -> None:
    checkpoint_lines = [i for i, line in enumerate(log.lines) if b'"checkpoint":"' in line]
    assume(checkpoint_lines)
    c = data.draw(st.sampled_from(checkpoint_lines))
    size = json.loads(log.lines[c - 1])["size"]  # the intent logs what the note covers
    assume(size > 0)
    k = data.draw(st.integers(0, size - 1))
    lines = rechain([*log.lines[:k], rewrite(log.lines[k], tampered=True),
                     *log.lines[k + 1:]], k + 1)
    result = check(join(lines))
    # Every checkpoint that covers line k now fails; the first of them is reported.
    first = min(i for i in checkpoint_lines
                if json.loads(log.lines[i - 1])["size"] > k)
    assert (result.ok, result.bad_seq) == (False, first)
    assert "Merkle root" in (result.reason or "")


# ---- canonical form, exactly ----------------------------------------------------------------

NON_CANONICAL = {
    "space after a colon": lambda s: s.replace('"event":', '"event": '),
    "space before a comma": lambda s: s.replace('"n":0,', '"n":0 ,'),
    "space in a list": lambda s: s.replace('[1,"two"', '[1, "two"'),
    "tab outside strings": lambda s: s.replace('"event":', '"event":\t'),
    "leading space": lambda s: " " + s,
    "trailing space": lambda s: s + " ",
    "carriage return": lambda s: s + "\r",
    "unsorted keys": lambda s: '{"seq":0,' + s[1:].replace(',"seq":0', ""),
    "duplicate key": lambda s: s.replace('{"', '{"event":"x","', 1),
    "duplicate key, last kept": lambda s: s.replace('"n":0,', '"n":0,"n":0,'),
    "negative zero": lambda s: s.replace('"n":0', '"n":-0'),
    "exponent": lambda s: s.replace('"n":0', '"n":0e0'),
    "float with a trailing zero": lambda s: s.replace('"pi":1.5', '"pi":1.50'),
    "escaped non-ASCII": lambda s: s.replace("\u00e9", "\\u00e9"),
    "escaped slash": lambda s: s.replace("a/b", "a\\/b"),
    "uppercase hex escape": lambda s: s.replace("\\u001f", "\\u001F"),
    "long escape for newline": lambda s: s.replace("\\n", "\\u000a"),
    "NaN": lambda s: s.replace('"n":0', '"n":NaN'),
    "Infinity": lambda s: s.replace('"n":0', '"n":Infinity'),
    "nested unsorted keys": lambda s: s.replace('{"a":1,"b":2}', '{"b":2,"a":1}'),
    "lone surrogate escape": lambda s: s.replace("\u00e9", "\\ud800"),
}


def tricky_line() -> str:
    obj = {"seq": 0, "ts": "2026-01-05T00:00:00.000001Z", "event": "audit.test",
           "prev": GENESIS, "n": 0, "text": "caf\u00e9 a/b \x1f\n \"q\" x-0, {", "pi": 1.5,
           "nested": {"a": 1, "b": 2}, "list": [1, "two", [3], None, True]}
    return canonical(obj).decode()


def test_a_line_with_every_kind_of_value_is_accepted() -> None:
    result = check(tricky_line().encode() + b"\n")
    assert result.ok, result.reason


@pytest.mark.parametrize("case", sorted(NON_CANONICAL))
def test_non_canonical_lines_are_refused(case: str) -> None:
    good = tricky_line()
    bad = NON_CANONICAL[case](good)
    assert bad != good
    result = check(bad.encode("utf-8") + b"\n")
    assert (result.ok, result.bad_seq) == (False, 0)
    assert "canonical" in (result.reason or "") or "JSON" in (result.reason or "")


def oracle_accepts(text: str) -> bool:
    """What docs/audit-log.md says: a JSON object whose canonical serialisation is the text."""
    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict) or json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                               ensure_ascii=False) != text:
        return False  # (a lone surrogate escape parses, but its canonical form is no UTF-8)
    ts, event = obj.get("ts"), obj.get("event")
    try:
        datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return (type(obj.get("seq")) is int and obj["seq"] == 0 and len(ts) == 27
            and isinstance(event, str) and event != "" and obj.get("prev") == GENESIS)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=5).map(lambda k: "x" + k), json_values, max_size=4),
       st.booleans(), st.booleans(), st.sampled_from([(",", ":"), (", ", ":"), (",", ": ")]),
       st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(" \t\r\\\"{}[],:-0e.")),
                max_size=2))
def test_lines_are_accepted_exactly_when_canonical(extra: dict[str, Any], sort: bool,
                                                   ascii_only: bool,
                                                   separators: tuple[str, str],
                                                   insertions: list[tuple[int, str]]) -> None:
    obj = {"seq": 0, "ts": "2026-01-05T00:00:00.000001Z", "event": "audit.test",
           "prev": GENESIS, **extra}
    text = json.dumps(obj, sort_keys=sort, separators=separators, ensure_ascii=ascii_only)
    for position, char in insertions:
        position %= len(text) + 1
        text = text[:position] + char + text[position:]
    assume("\n" not in text)
    data = text.encode("utf-8", "surrogatepass") + b"\n"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assume(False)  # a raw lone surrogate cannot be in a UTF-8 file at all
    result = verify_log(data, PUB, ORIGIN)
    assert result.ok == oracle_accepts(text), (text, result.reason)


# ---- required fields ------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "reason"), [
    ({"seq": True}, "seq must be an integer"),
    ({"seq": 5}, "seq is 5, expected 2"),
    ({"ts": "2026-02-30T00:00:00.000000Z"}, "ts must be"),
    ({"ts": "2026-01-05T00:00:00Z"}, "ts must be"),
    ({"ts": "2026-01-05T00:00:00.000000+00:00"}, "ts must be"),
    ({"ts": "2026-01-05T24:00:00.000000Z"}, "ts must be"),
    ({"ts": "\u0662026-01-05T00:00:00.000000Z"}, "ts must be"),
    ({"event": ""}, "event must be"),
    ({"event": 7}, "event must be"),
    ({"prev": "AB" * 32}, "prev must be 64 lowercase hex"),
    ({"phase": "maybe"}, "phase must be"),
    ({"op_id": ""}, "op_id"),
])
def test_bad_required_fields_are_refused_at_their_line(changes: dict[str, Any],
                                                       reason: str) -> None:
    b = simple_log()
    lines = list(b.lines)
    lines[2] = rewrite(lines[2], **changes)  # an intent line
    result = check(join(lines))
    assert (result.ok, result.bad_seq) == (False, 2)
    assert reason in (result.reason or "")


def test_missing_required_fields_are_refused() -> None:
    b = simple_log()
    for field in ("seq", "ts", "event", "prev"):
        obj = json.loads(b.lines[1])
        del obj[field]
        result = check(join([b.lines[0], canonical(obj), *b.lines[2:]]))
        assert (result.ok, result.bad_seq) == (False, 1), field


def test_an_empty_ts_is_refused_on_the_first_line_too() -> None:
    # The ts check is skipped for a line with the same ts as the line before; the
    # first line (of the log, or of a worker's chunk) has no line before it.
    b = simple_log()
    for k in (0, 4):
        lines = rechain([*b.lines[:k], rewrite(b.lines[k], ts=""), *b.lines[k + 1:]], k + 1)
        result = check(join(lines))
        assert (result.ok, result.bad_seq) == (False, k)
        assert "ts must be" in (result.reason or "")


def test_first_line_must_have_the_genesis_prev() -> None:
    b = simple_log()
    lines = rechain([rewrite(b.lines[0], prev="11" * 32), *b.lines[1:]], 1)
    result = check(join(lines))
    assert (result.ok, result.bad_seq) == (False, 0)
    assert "64 zeros" in (result.reason or "")


def test_invalid_utf8_is_refused() -> None:
    b = simple_log()
    lines = list(b.lines)
    lines[2] = lines[2].replace(b'"local"', b'"loc\xffl"')
    result = check(join(lines))
    assert (result.ok, result.bad_seq) == (False, 2)
    assert "UTF-8" in (result.reason or "")


# ---- intents and outcomes -------------------------------------------------------------------


def test_an_open_intent_followed_by_daemon_start_is_accepted() -> None:
    b = simple_log()
    b.intent("interrupted")
    b.add("daemon.start", version="0.1.0")  # the process crashed mid-operation
    b.add("hsm.login", slot=0)
    result = check(b.data())
    assert result.ok, result.reason


def test_an_open_intent_without_a_restart_is_refused_at_the_intent() -> None:
    b = simple_log()
    seq = b.intent("never-finished")
    b.add("hsm.login", slot=0)
    result = check(b.data())
    assert (result.ok, result.bad_seq) == (False, seq)
    assert "intent without an outcome" in (result.reason or "")


def test_an_intent_left_open_after_the_last_restart_is_refused() -> None:
    b = simple_log()
    b.intent("before-crash")
    b.add("daemon.start", version="0.1.0")
    seq = b.intent("after-crash")
    result = check(b.data())
    assert (result.ok, result.bad_seq) == (False, seq)


def test_an_interrupted_operation_may_still_get_its_outcome() -> None:
    b = simple_log()
    b.intent("slow")
    b.add("daemon.start", version="0.1.0")
    b.outcome("slow", result="CKR_SESSION_HANDLE_INVALID")
    assert check(b.data()).ok


@pytest.mark.parametrize(("build", "reason"), [
    (lambda b: (b.intent("a"), b.outcome("a"), b.intent("a"))[-1], "duplicate intent"),
    (lambda b: (b.intent("a"), b.intent("a"))[-1], "duplicate intent"),
    (lambda b: (b.intent("a"), b.outcome("a"), b.outcome("a"))[-1], "second outcome"),
    (lambda b: b.outcome("nobody"), "outcome without an earlier intent"),
])
def test_pairing_errors_are_reported_where_they_happen(build: Any, reason: str) -> None:
    b = simple_log()
    seq = build(b)
    b.add("hsm.login", slot=0)
    result = check(b.data())
    assert (result.ok, result.bad_seq) == (False, seq)
    assert reason in (result.reason or "")


def test_an_outcome_without_result_is_refused() -> None:
    b = simple_log()
    b.intent("a")
    seq = b.add("hsm.sign", phase="outcome", op_id="a")
    result = check(b.data())
    assert (result.ok, result.bad_seq) == (False, seq)
    assert "result" in (result.reason or "")


# ---- checkpoints ----------------------------------------------------------------------------


def test_checkpoints_in_the_log_are_verified() -> None:
    b = simple_log()
    b.checkpoint()
    result = check(b.data())
    assert result.ok and result.checkpoints == 2
    # The last checkpoint covers every line but its own two: they close the log.
    assert (result.signed, result.closing, result.unsigned) == (b.size - 2, 2, 0)
    assert json.loads(b.lines[-2])["size"] == b.size - 2
    assert result.new_state is not None and result.new_state["size"] == b.size


@pytest.mark.parametrize(("make", "reason"), [
    (lambda b: b.checkpoint(key=Ed25519PrivateKey.generate()), "no signature by"),
    (lambda b: b.checkpoint(origin="other.example/log"), "origin"),
])
def test_a_checkpoint_by_another_key_or_log_is_refused(make: Any, reason: str) -> None:
    b = simple_log()
    seq = make(b)
    result = check(b.data())
    assert (result.ok, result.bad_seq) == (False, seq)
    assert reason in (result.reason or "")


def test_a_checkpoint_cannot_cover_its_own_line() -> None:
    b = simple_log()
    op = b.new_op()
    b.intent(op, purpose="checkpoint")
    future = sign_checkpoint(ORIGIN, b.size + 5, b"\x00" * 32, ORIGIN, PUB, KEY.sign)
    seq = b.outcome(op, checkpoint=future)
    result = check(b.data())
    assert (result.ok, result.bad_seq) == (False, seq)
    assert "earlier lines" in (result.reason or "")


def test_a_failed_signing_is_not_a_checkpoint() -> None:
    b = simple_log()
    op = b.new_op()
    b.intent(op, purpose="checkpoint")
    b.outcome(op, result="CKR_DEVICE_ERROR", checkpoint="not a note")
    assert check(b.data()).ok


def test_a_malformed_checkpoint_note_is_refused() -> None:
    b = simple_log()
    op = b.new_op()
    b.intent(op, purpose="checkpoint")
    seq = b.outcome(op, checkpoint="not a note")
    result = check(b.data())
    assert (result.ok, result.bad_seq) == (False, seq)
    assert "bad checkpoint" in (result.reason or "")


# ---- the latest checkpoint file and the saved state -----------------------------------------


def test_torn_final_line_is_refused() -> None:
    b = simple_log()
    data = b.data() + b.lines[1][:17]
    result = check(data)
    assert (result.ok, result.bad_seq, result.lines) == (False, b.size, b.size)
    assert "torn line" in (result.reason or "")
    result = check(b.data()[:-1])  # the final newline itself missing
    assert (result.ok, result.bad_seq) == (False, b.size - 1)


def test_latest_checkpoint_longer_than_the_log_means_truncation() -> None:
    b = simple_log()
    latest = b.note()
    result = check(join(b.lines[:-2]), latest_checkpoint=latest)
    assert (result.ok, result.bad_seq) == (False, b.size - 2)
    assert "log is shorter than the checkpoint (truncated)" in (result.reason or "")


def test_latest_checkpoint_whose_signing_is_not_in_the_log_means_a_cut() -> None:
    """The daemon writes its checkpoint file once the checkpoint's signing is logged
    (auditor trial: a log without those lines verified OK, and the daemon refused it)."""
    b = simple_log()
    latest = b.latest()
    assert check(b.data(), latest_checkpoint=latest).ok
    result = check(join(b.lines[:-2]), latest_checkpoint=latest)  # its signing cut
    assert (result.ok, result.bad_seq) == (False, b.size - 2)
    assert (result.reason or "").startswith(f"cut: the latest checkpoint covers {b.size - 2} "
                                            "lines, and the lines that signed it")
    # Its outcome alone cut: the cut is said, not the intent it left open (an auditor
    # trial was told to accept that with --allow-unsigned, which then said the cut)
    result = check(join(b.lines[:-1]), latest_checkpoint=latest)
    assert (result.ok, result.bad_seq) == (False, b.size - 1), result.reason
    assert (result.reason or "").startswith("cut: the latest checkpoint"), result.reason


def test_latest_checkpoint_that_does_not_verify_fails_without_a_seq() -> None:
    b = simple_log()
    forged = b.note(key=Ed25519PrivateKey.generate())
    result = check(b.data(), latest_checkpoint=forged)
    assert (result.ok, result.bad_seq) == (False, None)
    assert "latest checkpoint does not verify" in (result.reason or "")


def test_state_catches_truncation_and_rewrites(tmp_path: Path) -> None:
    b = simple_log()
    latest = b.latest()
    first = check(b.data(), latest_checkpoint=latest)
    assert first.ok and first.new_state is not None
    path = tmp_path / "audit-state.json"
    assert load_state(path) is None
    save_state(path, first.new_state)
    assert os.listdir(tmp_path) == ["audit-state.json"]  # no temp file left behind
    state = load_state(path)
    assert state == first.new_state and state["size"] == b.size

    # The log grew; no checkpoint covers the new lines yet: they are unsigned, and the state
    # records them all the same, so that cutting the log back to the checkpoint verified
    # last time is caught next time.
    b.intent("later")
    b.outcome("later")
    # Grew, but no checkpoint covers the new lines yet: they are unsigned, and the state
    # records them all the same, so that cutting the log back to the checkpoint verified
    # last time is caught next time.
    unsigned = check(b.data(), state=state)
    assert unsigned.ok and (unsigned.signed, unsigned.closing, unsigned.unsigned) == (
        state["size"] - 2, 0, 4)  # the checkpoint's own signing is no longer the end
    assert unsigned.new_state is not None and unsigned.new_state["size"] == b.size
    assert unsigned.new_state["checkpoint"] == state["checkpoint"]
    cut = check(join(b.lines[:state["size"]]), state=unsigned.new_state)
    assert (cut.ok, cut.bad_seq) == (False, state["size"])
    assert f"truncated: the log had {b.size} lines" in (cut.reason or "")
    # Then a checkpoint over them: fine, and the state moves forward with it.
    latest = b.latest()
    grown = check(b.data(), state=state, latest_checkpoint=latest)
    assert grown.ok and grown.new_state is not None and grown.new_state["size"] == b.size

    # Cut back below what was verified: truncation, at the new end of the log.
    short = state["size"] - 3
    result = check(join(b.lines[:short]), state=state)
    assert (result.ok, result.bad_seq) == (False, short)
    assert f"truncated: the log had {state['size']} lines" in (result.reason or "")

    # A line verified last time rewritten after the log's own last checkpoint, chain
    # repaired: only the state can tell.
    k = state["size"] - 2
    assert json.loads(b.lines[9])["checkpoint"] and k > 9
    lines = rechain([*b.lines[:k], rewrite(b.lines[k], tampered=True), *b.lines[k + 1:]], k + 1)
    result = check(join(lines), state=state)
    assert (result.ok, result.bad_seq) == (False, state["size"] - 1)
    assert "rewritten" in (result.reason or "")
    # Covered by a checkpoint in the log as well: that one, earlier, is reported.
    lines = rechain([*b.lines[:4], rewrite(b.lines[4], tampered=True), *b.lines[5:]], 5)
    result = check(join(lines), state=state)
    assert (result.ok, result.bad_seq) == (False, 9)


def test_a_broken_state_file_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    b = simple_log()
    latest = b.latest()
    state = check(b.data(), latest_checkpoint=latest).new_state
    assert state is not None
    with pytest.raises(ValueError):
        # Fewer lines than the checkpoint it verified (which the last two lines signed).
        verify_log(b.data(), PUB, ORIGIN, state={**state, "size": state["size"] - 3})
    with pytest.raises(ValueError):
        verify_log(b.data(), PUB, ORIGIN, state={"size": "3"})
    (tmp_path / "s.json").write_text("[1]")
    with pytest.raises(ValueError):
        load_state(tmp_path / "s.json")


def stopped_log() -> LogBuilder:
    """A log as a daemon leaves it when it stops: daemon.stop, a final checkpoint over
    everything up to it, then the HSM logout."""
    b = simple_log()
    b.add("daemon.stop", pid=42)
    b.checkpoint()
    b.add("hsm.logout", token="ca", pid=42, result="ok")
    return b


def test_a_log_that_ends_as_a_daemon_closes_it_has_no_unsigned_line() -> None:
    b = stopped_log()
    result = check(b.data())
    assert result.ok, result.reason
    assert (result.signed, result.closing, result.unsigned) == (b.size - 3, 3, 0)
    b.lines.pop()  # a daemon that checkpoints while running has not logged out
    assert (check(b.data()).closing, check(b.data()).unsigned) == (2, 0)


def test_lines_after_the_last_checkpoint_are_unsigned_unless_they_close_the_log() -> None:
    def unsigned(build: Any) -> tuple[int, int, int]:
        b = simple_log()
        b.add("daemon.stop", pid=42)
        build(b)
        result = check(b.data())
        assert result.ok, result.reason
        assert result.signed + result.closing + result.unsigned == b.size
        return result.signed, result.closing, result.unsigned

    size = simple_log().size + 1  # with the daemon.stop line
    covered = json.loads(simple_log().lines[8])["size"]  # simple_log's own checkpoint
    # The final checkpoint's signing failed: nothing signs the lines after `covered`.
    failed = "CKR_DEVICE_ERROR"
    assert unsigned(lambda b: (b.intent("cp", purpose="checkpoint"),
                               b.outcome("cp", result=failed), b.add("hsm.logout"))) == (
        covered, 0, size + 3 - covered)
    # Something other than a logout after the final checkpoint.
    assert unsigned(lambda b: (b.checkpoint(), b.add("cert.revoke", serial="01"))) == (
        size, 0, 3)
    # Two logouts: a daemon logs out once.
    assert unsigned(lambda b: (b.checkpoint(), b.add("hsm.logout"), b.add("hsm.logout"))) == (
        size, 0, 4)
    # An issuance between the checkpoint's intent and its outcome.
    def interleaved(b: LogBuilder) -> None:
        note = b.note()
        b.intent("cp", purpose="checkpoint")
        b.intent("x")
        b.outcome("x")
        b.outcome("cp", checkpoint=note)
    assert unsigned(interleaved) == (size, 0, 4)


def test_the_state_records_every_line_seen_and_catches_a_cut_tail() -> None:
    """The bug: the state held only the last checkpoint, so the lines after it (which a
    log always has) could be removed unnoticed."""
    b = stopped_log()
    first = check(b.data())
    assert first.ok and first.new_state is not None
    state = first.new_state
    assert (state["version"], state["size"]) == (2, b.size)
    assert state["head"] == digest_hex(b.lines[-1])
    assert base64.b64decode(state["root"]) == b._tree.root()
    for cut in (1, 2, 3):  # the logout, then the final checkpoint's outcome and intent
        result = check(join(b.lines[:-cut]), state=state)
        assert (result.ok, result.bad_seq) == (False, b.size - cut), cut
        assert f"truncated: the log had {b.size} lines" in (result.reason or "")
    # The last line altered (nothing after it vouches for it), or the outcome altered and
    # the logout re-chained after it.
    altered = [*b.lines[:-1], rewrite(b.lines[-1], result="CKR_GENERAL_ERROR")]
    rechained = rechain([*b.lines[:-2], rewrite(b.lines[-2], released=False), b.lines[-1]],
                        b.size - 1)
    for lines in (altered, rechained):
        result = check(join(lines), state=state)
        assert (result.ok, result.bad_seq) == (False, b.size - 1)
        assert f"rewritten: the first {b.size} lines no longer match those verified last " \
               "time" in (result.reason or "")
    # Reordered: the outcome and the logout swapped.
    swapped = [*b.lines[:-2], b.lines[-1], b.lines[-2]]
    result = check(join(swapped), state=state)
    assert (result.ok, result.bad_seq) == (False, b.size - 2)
    # Grown as a restarted daemon grows it: fine, and the state moves on.
    b.add("daemon.start", version="0.1.0")
    b.checkpoint()
    grown = check(b.data(), state=state)
    assert grown.ok and grown.new_state is not None and grown.new_state["size"] == b.size


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_logs(), st.sampled_from(["cut", "delete", "rewrite", "rechain", "swap"]),
       st.data())
def test_any_change_to_a_line_seen_before_is_caught_signed_or_not(
        log: LogBuilder, kind: str, data: st.DataObject) -> None:
    """With the state of a run that saw the whole log (checkpointed or not), removing,
    altering or reordering any line is caught, and named at that line or after it."""
    state = check(log.data()).new_state
    assume(state is not None)  # a log without any checkpoint saves no state
    assert state is not None and state["size"] == log.size
    lines, n = list(log.lines), log.size
    k = data.draw(st.integers(0, n - 1))
    if kind == "cut":
        lines = lines[:k]
    elif kind == "delete":
        del lines[k]
    elif kind == "rewrite":
        lines[k] = rewrite(lines[k], tampered=True)
    elif kind == "rechain":
        lines = rechain([*lines[:k], rewrite(lines[k], tampered=True), *lines[k + 1:]], k + 1)
    else:
        assume(k < n - 1)
        m = data.draw(st.integers(k + 1, n - 1))
        lines[k], lines[m] = lines[m], lines[k]
    assume(lines != log.lines)
    result = check(join(lines), state=state)
    assert not result.ok
    assert result.bad_seq is not None and k <= result.bad_seq <= n - 1, (kind, k, result)


def test_states_of_the_first_version_are_read_and_saved_anew(tmp_path: Path) -> None:
    b = stopped_log()
    cp = b.lines[-2]  # the final checkpoint's outcome
    note = json.loads(cp)["checkpoint"]
    signed = b.size - 3
    tree = CompactRange()
    for line in b.lines[:signed]:
        tree.append(leaf_hash(line))
    root = base64.b64encode(tree.root()).decode()
    offline = {"size": signed, "root": root, "checkpoint": note}
    remote = {**offline, "frontier": [base64.b64encode(h).decode() for h in tree.hashes],
              "last_hash": digest_hex(b.lines[signed - 1]),
              "last_line": b.lines[signed - 1].decode(), "next_seq": signed,
              "open_intents": {}}
    for old in (offline, remote):
        result = check(b.data(), state=old)
        assert result.ok, result.reason
        assert result.new_state is not None
        assert (result.new_state["version"], result.new_state["size"]) == (2, b.size)
        # The first version's checks still hold: the log must still have its lines.
        cut = check(join(b.lines[:signed - 1]), state=old)
        assert (cut.ok, cut.bad_seq) == (False, signed - 1)
    with pytest.raises(ValueError, match="last_line"):
        verify_log(b.data(), PUB, ORIGIN, state={**remote, "last_line": "{}"})
    with pytest.raises(ValueError, match="version"):
        verify_log(b.data(), PUB, ORIGIN, state={**offline, "version": 3})


def test_a_damaged_state_of_the_new_version_is_an_error() -> None:
    b = stopped_log()
    state = check(b.data()).new_state
    assert state is not None
    other_root = base64.b64encode(b"\x07" * 32).decode()
    for damage, why in [({"head": "AB" * 32}, "head"), ({"root": other_root}, "frontier"),
                        ({"frontier": state["frontier"][1:]}, "frontier"),
                        ({"size": 3}, "frontier"), ({"checkpoint": "x"}, "checkpoint"),
                        ({"open_intents": {"op": {"seq": b.size}}}, "open intent")]:
        with pytest.raises(ValueError, match=why):
            verify_log(b.data(), PUB, ORIGIN, state={**state, **damage})


def test_an_empty_log_is_valid_and_a_missing_one_after_a_checkpoint_is_not() -> None:
    assert check(b"").ok
    b = simple_log()
    result = check(b"", latest_checkpoint=b.note())
    assert (result.ok, result.bad_seq) == (False, 0)


def test_big_log_in_parallel_workers_agrees_with_one_process() -> None:
    # Enough lines for several real 4096-line chunks, with damage in the second chunk.
    b = LogBuilder()
    b.add("daemon.start", version="0.1.0")
    while b.size < 3 * 4096:
        op = b.new_op()
        b.intent(op, serial=op)
        b.outcome(op)
        if b.size % 1000 < 2:
            b.checkpoint()
    data = b.data()
    saved = scan_module._MIN_BYTES
    scan_module._MIN_BYTES = 0
    try:
        good = verify_log(data, PUB, ORIGIN, workers=2)
        assert good.ok and good.lines == b.size
        assert good == verify_log(data, PUB, ORIGIN, workers=1)
        k = 4096 + 17
        lines = [*b.lines[:k], rewrite(b.lines[k], tampered=1), *b.lines[k + 1:]]
        bad = verify_log(join(lines), PUB, ORIGIN, workers=3)
        assert (bad.ok, bad.bad_seq) == (False, k)
        assert bad == verify_log(join(lines), PUB, ORIGIN, workers=1)
    finally:
        scan_module._MIN_BYTES = saved


# ---- the bulk path and its fallback -----------------------------------------------------------
#
# verify_log checks blocks of lines with bulk operations (msgspec, columns of fields) and
# checks a block line by line only when the bulk checks do not all pass. Each line below
# sits inside an otherwise valid block, so the bulk path sees it first; the result must
# be exactly what the line-by-line checks alone say.


@contextmanager
def line_by_line() -> Iterator[None]:
    """Every block checked by the line-by-line code only: the reference."""
    saved = scan_module._scan_block
    scan_module._scan_block = lambda *args, **kwargs: None
    try:
        yield
    finally:
        scan_module._scan_block = saved


def block_log(lines: int = 40) -> LogBuilder:
    b = LogBuilder()
    b.add("daemon.start", version="0.1.0")
    while b.size < lines:
        op = b.new_op()
        b.intent(op, serial=op, names=["svc.example"])
        b.outcome(op, fingerprint="ef" * 32)
    return b


def check_both_ways(data: bytes, **kw: Any) -> VerifyResult:
    """The bulk path (in one process and in forked workers) and the line-by-line
    reference give the same result, field for field."""
    result = check(data, **kw)
    with line_by_line():
        reference = verify_log(data, PUB, ORIGIN, origin=ORIGIN, workers=1, **kw)
    assert result == reference
    return result


@contextmanager
def blocks_of(size: int) -> Iterator[None]:
    """Bulk blocks of about `size` bytes: a few lines each in a small log, so that a
    damaged block sits between blocks that pass in bulk."""
    saved = scan_module._BLOCK_BYTES
    scan_module._BLOCK_BYTES = size
    try:
        yield
    finally:
        scan_module._BLOCK_BYTES = saved


def test_a_valid_block_takes_the_bulk_path() -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a valid plain block was checked line by line")

    saved = scan_module._scan_lines
    scan_module._scan_lines = refuse
    try:
        b = block_log()
        b.checkpoint()
        result = verify_log(b.data(), PUB, ORIGIN, origin=ORIGIN, workers=1)
    finally:
        scan_module._scan_lines = saved
    assert result.ok and result.checkpoints == 1, result.reason


# (line content, whether the line is still valid, what the reason says when not)
IN_A_BLOCK: dict[str, tuple[Any, bool, str]] = {
    "float": ({"pi": 1.5}, True, ""),
    "big int": ({"n": 2**70, "m": -(2**80)}, True, ""),
    "escape": ({"text": "a\nb \"q\" \\ \u0001"}, True, ""),
    "non-ASCII": ({"text": "caf\u00e9 \u2028 \U0001f600 \x7f"}, True, ""),
    "nested object": ({"detail": {"a": [1, {"b": None}], "c": True}}, True, ""),
    "nested lists": ({"deep": [[[[[[[[1]]]]]]]]}, True, ""),
    "seq true": ({"seq": True}, False, "seq must be an integer"),
    "seq float": ({"seq": 7.0}, False, "seq must be an integer"),
    "ts empty": ({"ts": ""}, False, "ts must be"),
    "event missing": ({"event": None}, False, "event must be"),
    "op_id int": ({"op_id": 5}, False, "op_id"),
    "phase list": ({"phase": ["intent"]}, False, "phase must be"),
}


@pytest.mark.parametrize("case", sorted(IN_A_BLOCK))
def test_unusual_lines_inside_a_block(case: str) -> None:
    fields, valid, reason = IN_A_BLOCK[case]
    b = block_log()
    k = 17  # an intent line, in the middle of the block
    lines = rechain([*b.lines[:k], rewrite(b.lines[k], **fields), *b.lines[k + 1:]], k + 1)
    result = check_both_ways(join(lines))
    if valid:
        assert result.ok, result.reason
    else:
        assert (result.ok, result.bad_seq) == (False, k)
        assert reason in (result.reason or "")


# Byte-level damage (keeps the chain valid from the next line on, so only line k fails).
RAW_IN_A_BLOCK: dict[str, tuple[Any, str]] = {
    "raw control character": (lambda s: s.replace(b'"local"', b'"lo\x01al"'), "JSON"),
    "raw tab in a string": (lambda s: s.replace(b'"local"', b'"lo\tal"'), "JSON"),
    "invalid UTF-8": (lambda s: s.replace(b'"local"', b'"lo\xffal"'), "UTF-8 at byte"),
    "overlong UTF-8": (lambda s: s.replace(b'"local"', b'"lo\xc0\xafal"'), "UTF-8 at byte"),
    "encoded surrogate": (lambda s: s.replace(b'"local"', b'"lo\xed\xa0\x80al"'),
                          "UTF-8 at byte"),
    "duplicate key": (lambda s: s.replace(b'{"', b'{"actor":"x","', 1), "canonical"),
    "duplicate key, same value": (lambda s: s.replace(b'"actor":"local",',
                                                      b'"actor":"local","actor":"local",'),
                                  "canonical"),
    "unsorted keys": (lambda s: s.replace(b'"actor":"local",', b"", 1)[:-1]
                      + b',"actor":"local"}', "canonical"),
    "NaN": (lambda s: s[:-1] + b',"zz":NaN}', "JSON"),
    "Infinity": (lambda s: s[:-1] + b',"zz":-Infinity}', "JSON"),
    "negative zero": (lambda s: s[:-1] + b',"zz":-0}', "canonical"),
    "negative zero in a list": (lambda s: s[:-1] + b',"zz":[1,-0]}', "canonical"),
    "exponent": (lambda s: s[:-1] + b',"zz":1e2}', "canonical"),
    "space": (lambda s: s.replace(b'"actor":', b'"actor": '), "canonical"),
    "trailing space": (lambda s: s + b" ", "canonical"),
    "trailing garbage": (lambda s: s + b"x", "JSON"),
    "second object": (lambda s: s + b"{}", "JSON"),
    "top-level array": (lambda s: b"[" + s + b"]", "JSON object"),
    "byte order mark": (lambda s: b"\xef\xbb\xbf" + s, "JSON"),
    "int too long for Python": (lambda s: s[:-1] + b',"zz":' + b"7" * 5000 + b"}", "JSON"),
}


@pytest.mark.parametrize("case", sorted(RAW_IN_A_BLOCK))
def test_damaged_lines_inside_a_block(case: str) -> None:
    damage, reason = RAW_IN_A_BLOCK[case]
    b = block_log()
    k = 17  # an intent line, with "actor":"local", in the middle of the block
    lines = list(b.lines)
    lines[k] = damage(lines[k])
    assert lines[k] != b.lines[k]
    lines = rechain(lines, k + 1)
    result = check_both_ways(join(lines))
    assert (result.ok, result.bad_seq) == (False, k), result.reason
    assert reason in (result.reason or "")


def test_chain_and_pairing_failures_inside_a_block_agree() -> None:
    b = block_log(60)
    for k in (1, 16, 17, 59):
        lines = list(b.lines)
        lines[k] = rewrite(lines[k], tampered=True)  # breaks the chain at k + 1
        check_both_ways(join(lines))
    b.outcome("op-3")  # a second outcome
    check_both_ways(b.data())


def test_deep_nesting_is_judged_as_the_stdlib_judges_it() -> None:
    # Lines long enough to nest near the recursion limit go line by line.
    b = block_log()
    k = 17
    for depth in (50, 400, 2000):
        lines = list(b.lines)
        lines[k] = lines[k][:-1] + b',"zz":' + b"[" * depth + b"]" * depth + b"}"
        lines = rechain(lines, k + 1)
        result = check_both_ways(join(lines))
        assert result.ok == (depth < 1000), (depth, result.reason)


def test_a_lying_seq_at_a_worker_boundary_changes_nothing() -> None:
    # Workers start where the seq of a line says; a log whose seqs lie there is
    # scanned again in one process, with the same verdict.
    b = block_log(3 * 4096)
    lines = [*b.lines[:100], *b.lines[101:]]  # every later seq is one too high
    saved = scan_module._MIN_BYTES
    scan_module._MIN_BYTES = 0
    try:
        forked = verify_log(join(lines), PUB, ORIGIN, workers=2)
        single = verify_log(join(lines), PUB, ORIGIN, workers=1)
    finally:
        scan_module._MIN_BYTES = saved
    assert forked == single
    assert (forked.ok, forked.bad_seq) == (False, 100)


def test_a_seq_past_int64_at_a_worker_boundary_is_reported_not_raised() -> None:
    # A worker's first line comes from a seq; one claiming 2**63 or more made the worker
    # fail on its array("q") of hsm.sign seqs, so forked verification raised instead of
    # reporting the line whose seq is wrong, as one process does.
    b = block_log()
    lines = [rewrite(line, seq=k + 2**63) if k >= 5 else line for k, line in enumerate(b.lines)]
    result = check(join(rechain(lines, 5)))
    assert (result.ok, result.bad_seq) == (False, 5)
    assert "seq is" in (result.reason or "")


def test_findings_too_big_for_shared_memory_go_through_the_pipe() -> None:
    b = block_log(3 * 4096)
    latest = b.latest()
    saved = scan_module._MIN_BYTES, scan_module._SHARED_PER_BYTE
    scan_module._MIN_BYTES, scan_module._SHARED_PER_BYTE = 0, 0
    try:
        forked = verify_log(b.data(), PUB, ORIGIN, workers=2, latest_checkpoint=latest)
    finally:
        scan_module._MIN_BYTES, scan_module._SHARED_PER_BYTE = saved
    assert forked.ok and forked.lines == b.size and forked.checkpoints == 2


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_logs(), st.sampled_from([1, 600, 4000, 1 << 19]), st.data())
def test_bulk_and_line_by_line_agree_on_random_valid_and_damaged_logs(
        log: LogBuilder, block_bytes: int, data: st.DataObject) -> None:
    """The fast path and the reference path: same verdict, same first failing seq and
    reason, same checkpoints and state, on valid logs and on randomly damaged ones."""
    latest = log.latest()
    lines = list(log.lines)
    damages = data.draw(st.integers(0, 3))
    for _ in range(damages):
        k = data.draw(st.integers(0, len(lines) - 1))
        line = lines[k]
        at = data.draw(st.integers(0, len(line)))
        cut = data.draw(st.integers(0, 3))
        insert = data.draw(st.sampled_from(
            [b"", b" ", b"\t", b"\\", b'"', b"-0", b"-", b"0", b"1.5", b"e5", b",", b":",
             b"{", b"}", b"[", b"]", b"\x00", b"\x7f", b"\xc3\xa9", b"\xff", b"\xed\xa0\x80",
             b'"seq":1,', b'"x":1,', b"true", b"null", b"NaN"]))
        lines[k] = line[:at] + insert + line[at + cut:]
        if data.draw(st.booleans()):
            lines = rechain(lines, k + 1)
    with blocks_of(block_bytes):
        result = check_both_ways(join(lines), latest_checkpoint=latest)
    if not damages:
        assert result.ok, result.reason


# ---- lines that continue a verified prefix (the remote verifier's check) ------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_logs(), st.data())
def test_check_lines_continues_a_prefix_as_verify_log_reads_the_whole(
        log: LogBuilder, data: st.DataObject) -> None:
    """check_lines on lines [k, n) after a verified prefix [0, k): the same verdict,
    failing seq and reason as verify_log on the whole log, and the same leaves."""
    from ca.audit.verify import PinnedKey, check_lines
    from ca.audit.verify.pairing import Signings, pair

    lines = list(log.lines)
    k = data.draw(st.integers(0, len(lines)))
    if data.draw(st.booleans()) and k < len(lines):  # damage a line after the prefix
        j = data.draw(st.integers(k, len(lines) - 1))
        lines[j] = rewrite(lines[j], **data.draw(st.sampled_from(
            [{"seq": 0}, {"prev": "ab" * 32}, {"phase": "maybe"}, {"tampered": True}])))
    # What the prefix leaves open, as the remote verifier's state carries it.
    open_intents: dict[str, int] = {}
    signings = Signings()
    for seq, line in enumerate(lines[:k]):
        obj = json.loads(line)
        if obj["event"] == "hsm.sign":
            signings.seqs.append(seq)
            signings.intent.append(obj["phase"] == "intent")
            signings.ops.append(obj["op_id"])
    assert pair([signings], None, open_intents) is None
    prev = digest_hex(lines[k - 1]) if k else GENESIS

    found = check_lines(join(lines[k:]), k, prev, open_intents, PinnedKey(PUB, ORIGIN, ORIGIN))
    whole = verify_log(join(lines), PUB, ORIGIN, origin=ORIGIN, workers=1)
    assert found.lines == len(lines) - k
    assert found.leaves == b"".join(leaf_hash(line) for line in lines[k:k + found.good])
    if found.failure is not None:
        assert (whole.ok, whole.bad_seq, whole.reason) == (
            False, found.failure.seq, found.failure.reason)
    else:  # the roots and the intents left open at the end are the caller's to judge
        assert whole.ok or any(why in (whole.reason or "") for why in (
            "Merkle root", "intent without an outcome")), whole.reason


def test_check_lines_blames_the_new_line_when_it_does_not_follow_the_verified_one() -> None:
    # The line before `start` was verified before and is pinned by its hash: a first new
    # line whose prev differs is the one that changed, even though the line after it
    # still vouches for it (which, inside one log, blames the line before).
    from ca.audit.verify import PinnedKey, Stage, check_lines

    b = simple_log()
    k = 4  # after the first intent and outcome: nothing open
    found = check_lines(join(b.lines[k:]), k, "ab" * 32, {}, PinnedKey(PUB, ORIGIN, ORIGIN))
    assert found.failure == (k, Stage.LINE, f"prev does not match the SHA-256 of line {k - 1} "
                                            "as verified last time")
    assert (found.good, found.leaves) == (0, b"")


def test_a_line_altered_and_rechained_is_placed_between_two_checkpoints() -> None:
    """Without the original, the verifier cannot name the altered line, but it names
    the span: after the lines an earlier checkpoint vouches for, before the first
    checkpoint that fails."""
    b = simple_log()  # its checkpoint (intent at seq 8) covers lines 0-7
    first = json.loads(b.lines[8])["size"]
    for _ in range(2):
        op = b.new_op()
        b.intent(op, serial="03ef")
        b.outcome(op)
    b.checkpoint()
    size = json.loads(b.lines[-2])["size"]
    lines = list(b.lines)
    lines[11] = rewrite(lines[11], serial="ffff")
    result = check(join(rechain(lines, 11)))
    assert not result.ok and result.bad_seq == len(lines) - 1, result
    assert f"a line from seq {first} to {size - 1} was altered (the {first} lines before " \
        "it were vouched for by an earlier checkpoint or run) and the lines after it " \
        "chained again to hide it; which one, a copy of the log from before the change " \
        "tells" in (result.reason or ""), result.reason


def test_a_line_altered_and_rechained_before_any_checkpoint_held_names_the_span() -> None:
    """With no earlier checkpoint that verifies, the span starts at seq 0: an auditor's
    trial read "a line it covers was altered, one of them", a sentence cut short."""
    b = simple_log()  # its checkpoint (intent at seq 8) covers lines 0-7
    size = json.loads(b.lines[8])["size"]
    lines = list(b.lines)
    lines[3] = rewrite(lines[3], serial="ffff")
    result = check(join(rechain(lines, 3)))
    assert not result.ok, result
    assert f"a line from seq 0 to {size - 1} was altered and the lines after it chained " \
        "again to hide it; which one, a copy of the log or an auditor's --state saved " \
        "before tells" in (result.reason or ""), result.reason


def test_open_intents_are_excused_only_where_a_copy_can_end() -> None:
    """--allow-unsigned (open_allowed) accepts a signature under way when a running
    daemon's log was copied: an intent after every checkpoint but the last. An intent
    left open long before, that later checkpoints cover, is a signature never recorded
    as done, and still fails (a review found the first version excused it too)."""
    b = LogBuilder()
    b.add("daemon.start", version="0.1.0")
    early = b.new_op()
    b.intent(early)
    for _ in range(3):
        op = b.new_op()
        b.intent(op)
        b.outcome(op)
        b.checkpoint()
    late = b.new_op()
    b.intent(late)  # under way when the copy was taken
    b.checkpoint()  # the checkpointer signed meanwhile
    strict = verify_log(b.data(), KEY.public_key(), ORIGIN, ORIGIN)
    assert not strict.ok and strict.bad_seq == 1, strict.reason
    allowed = verify_log(b.data(), KEY.public_key(), ORIGIN, ORIGIN, open_allowed=True)
    assert not allowed.ok and allowed.bad_seq == 1, allowed.reason
    assert "intent without an outcome" in (allowed.reason or "")

    c = LogBuilder()
    c.add("daemon.start", version="0.1.0")
    c.checkpoint()
    late = c.new_op()
    c.intent(late)
    c.checkpoint()
    allowed = verify_log(c.data(), KEY.public_key(), ORIGIN, ORIGIN, open_allowed=True)
    assert allowed.ok and allowed.open_at_end == 1, allowed.reason
