"""The offline verifier: a whole log file, as an auditor holds a copy of it.

See `ca.audit.verify` for what is checked. `verify_log` scans every line
(`ca.audit.verify.scan`, in forked workers for a large log), pairs intents and
outcomes (`ca.audit.verify.pairing`), checks every checkpoint's root and the
prefixes the latest checkpoint file and the saved state vouch for
(`ca.audit.verify.checkpoint`), then what only the end of the log can tell:
truncation, a torn final line, an intent left open with no crash to excuse it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.line import GENESIS, chain_hash
from ca.audit.merkle import MerkleTree, TreeHead
from ca.audit.note import NoteError, parse_checkpoint, verifier_key
from ca.audit.verify.checkpoint import (
    CLOSING_MAX,
    PinnedKey,
    SignedPrefix,
    check_latest,
    check_roots,
    closing_lines,
    hand_overs,
    keygens,
    say_hand_overs,
    still_extends,
    usable,
)
from ca.audit.verify.failure import Failure, Stage, earliest
from ca.audit.verify.pairing import pair, unexcused
from ca.audit.verify.scan import scan_all, tree
from ca.audit.verify.state import AuditorState, followed


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int  # complete (newline-terminated) lines in the log
    bad_seq: int | None  # the first failing line; None if ok or the failure has no line
    reason: str | None
    checkpoints: int  # checkpoints whose signature and root were verified
    new_state: dict[str, Any] | None  # to save with save_state when ok (None: nothing to save)
    # When ok, lines = signed + closing + unsigned: the first `signed` lines are covered
    # by a verified checkpoint; then either `closing` lines, the final checkpoint's own
    # signing and the HSM logout after it, which no checkpoint can cover; or `unsigned`
    # lines that no checkpoint covers (yet: a log copied from a running or crashed
    # daemon), which anyone who can write the log could have changed.
    signed: int = 0
    closing: int = 0
    unsigned: int = 0
    # With `open_allowed`: intents left without an outcome and without a daemon.start
    # after them (signatures under way when the copy was taken, or cut by a crash).
    open_at_end: int = 0
    note: str | None = None  # the audit key's hand-overs, and where each key was made


def verify_log(data: bytes, public_key: Ed25519PublicKey, key_name: str,
               origin: str | None = None, latest_checkpoint: str | None = None,
               state: dict[str, Any] | None = None, *,
               workers: int | None = None, open_allowed: bool = False,
               cosigned_checkpoint: str | None = None) -> VerifyResult:
    """Verify a whole audit log, given as the file's bytes exactly as stored.

    `key_name` is the audit key's name in the checkpoint signature lines and
    `origin`, when given, the origin line every checkpoint must carry.
    `latest_checkpoint` is the latest checkpoint file's text, and `state` the state
    saved by the previous run (`load_state`), if the auditor has them.
    `cosigned_checkpoint`, another checkpoint (the one the witnesses cosigned, when the
    latest file is newer), vouches for its prefix too, and the log must reach its size:
    with the cosigned file alone, a log cut back to its size passed (an auditor trial).
    `open_allowed` accepts intents still open at the end of the log with no daemon.start
    after them, as a copy of a running or crashed daemon's log has (`open_at_end`).

    Logs of more than a few MB are scanned by `workers` processes forked from this
    one (POSIX). By default that is one per CPU when the caller runs a single
    thread (the CLI) and none otherwise, because forking a multi-threaded process
    (the daemon) can deadlock the child. A malformed `state` raises ValueError: it
    is the auditor's own file, not evidence about the log.
    """
    if workers is None:
        workers = (os.cpu_count() or 1) if threading.active_count() == 1 else 1
    key = PinnedKey(public_key, key_name, origin)
    if state is not None:
        key = followed(state, key)
    # The hand-overs of the audit key the log records, followed in log order (a bad
    # one is not followed, and the scan names it).
    key = key.discover(data)
    prior = AuditorState.parse(state, key) if state is not None else None
    was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived dicts; nothing here makes reference cycles
    try:
        result = _verify(data, key, latest_checkpoint, prior, workers, open_allowed,
                         cosigned_checkpoint)
        if result.ok:
            result = dataclasses.replace(result, note=say_hand_overs(
                hand_overs(data[:data.rfind(b"\n") + 1], 0, key_name)))
        return result
    finally:
        if was_enabled:
            gc.enable()


def _verify(data: bytes, key: PinnedKey, latest_text: str | None,
            prior: AuditorState | None, workers: int, open_allowed: bool,
            cosigned_text: str | None = None) -> VerifyResult:
    end = data.rfind(b"\n") + 1
    tail = data[end:]  # empty unless the final line is torn
    chunks = scan_all(data, end, workers, key)
    n = sum(c.lines for c in chunks)

    # The per-line scan's first failure is the first failing chunk's; pairing runs on the
    # lines before it and may find an earlier one.
    failure = next((c.failure for c in chunks if c.failure is not None), None)
    open_intents: dict[str, int] = {}
    failure = earliest(failure, pair([c.signings for c in chunks], failure, open_intents))
    good = failure.seq if failure else n  # lines [0, good) passed every per-line check

    latest, latest_error = (None, None) if latest_text is None else check_latest(latest_text, key)
    claimed = _claimed_size(latest_text) if latest is None else None

    # Merkle roots: the log's own checkpoints, then the prefixes vouched for from outside
    # the log (when it is long enough to hold them): every line the previous run saw,
    # the checkpoint it verified, and the latest checkpoint.
    checkpoints = usable((cp for c in chunks for cp in c.checkpoints), failure)
    vouched: list[tuple[TreeHead, str]] = []
    if prior is not None:
        vouched.append((prior.seen, "those verified last time"))
        if prior.signed.size < prior.size:
            vouched.append((TreeHead(prior.signed.size, prior.signed.root),
                            "the checkpoint verified last time"))
    if latest is not None:
        vouched.append((TreeHead(latest.size, latest.root), "the latest checkpoint"))
    cosigned, cosigned_error = (None, None) if cosigned_text is None else \
        check_latest(cosigned_text, key)
    if cosigned is not None:
        vouched.append((TreeHead(cosigned.size, cosigned.root), "the cosigned checkpoint"))
    latest_error = latest_error or (cosigned_error and f"the cosigned checkpoint: "
                                                       f"{cosigned_error}")
    merkle = tree(chunks) if checkpoints or vouched else MerkleTree()
    verified, wrong_root = check_roots(merkle, checkpoints)
    failure = earliest(failure, wrong_root)
    for prefix, what in vouched:
        if 0 < prefix.size <= good and not still_extends(prefix, merkle, good):
            failure = earliest(failure, Failure(prefix.size - 1, Stage.PREFIX, (
                f"rewritten: the first {prefix.size} lines no longer match {what} (a line "
                f"at or before seq {prefix.size - 1} was changed, removed or inserted; "
                "the log's own checkpoints narrow it down when they do not match; a CA "
                "restored from a backup older than those lines forks its log so, after "
                "the backup's last line)")))
    verified += latest is not None

    last_start = max(c.last_start for c in chunks)
    if failure is None and cosigned is not None and cosigned.size > n:
        failure = Failure(n, Stage.LINE, f"log is shorter than the checkpoint (truncated): "
                                         f"the cosigned checkpoint covers {cosigned.size} "
                                         f"lines, the log has {n}")
    if failure is None:
        failure = _end_of_log(n, tail, prior, latest, claimed, latest_error)
    if failure is None and latest is not None:
        # before the open intents: the cut explains them (an auditor trial was told to
        # accept them with --allow-unsigned, and was then told of the cut)
        failure = _signing_cut(n, latest)
    if failure is None:
        failure = unexcused(_not_in_flight(open_intents, checkpoints, latest, prior)
                            if open_allowed else open_intents, last_start)
    if failure is not None:
        return VerifyResult(False, n, failure.seq, failure.reason, verified, None)
    if latest_error is not None:  # the log is fine, but the checkpoint file is not
        return VerifyResult(False, n, None, latest_error, verified, None)

    candidates = [p for p in (prior.signed if prior else None, latest) if p is not None]
    candidates += [SignedPrefix(cp.size, cp.root, cp.text) for cp in checkpoints]
    best = max(candidates, key=lambda p: p.size, default=None)
    signed = best.size if best is not None else 0
    # At most a pair per audit key signing the last checkpoint, and the logout.
    after = _last_lines(data, end, n - signed) if n - signed <= CLOSING_MAX else []
    closing = len(after) if closing_lines(after, signed, checkpoints) else 0
    new_state = None
    if best is not None:  # everything verified, so that the next run misses no line of it
        head = chain_hash(_last_lines(data, end, 1)[0]) if n else GENESIS
        # Every intent still open has a daemon.start after it (`_end_of_log` saw to it).
        still_open = {op: (seq, seq < last_start) for op, seq in open_intents.items()}
        new_state = AuditorState(n, merkle.root(n), head, merkle.compact_range(n), best.text,
                                 best, still_open, _successors(key),
                                 keygens(data[:end], 0),
                                 prior.hand_overs_said if prior else ()).to_json()
    return VerifyResult(True, n, None, None, verified, new_state, signed, closing,
                        n - signed - closing,
                        sum(seq > last_start for seq in open_intents.values()))  # excused


def _successors(key: PinnedKey) -> tuple[tuple[int, str], ...]:
    return tuple((seq, verifier_key(key.name, k)) for seq, k in key.successors)


def _not_in_flight(open_intents: dict[str, int], checkpoints: list[Any],
                   latest: SignedPrefix | None, prior: AuditorState | None) -> dict[str, int]:
    """The open intents a copy of a running (or crashed) daemon's log cannot explain:
    those an earlier checkpoint than the last covers. A signature under way when the
    copy was taken began after every checkpoint but the last (which the checkpointer,
    once a second, may have signed while it ran)."""
    sizes = sorted({cp.size for cp in checkpoints} | {p.size for p in (
        latest, prior.signed if prior else None) if p is not None})
    before = sizes[-2] if len(sizes) >= 2 else 0
    return {op: seq for op, seq in open_intents.items() if seq < before}


def _claimed_size(text: str | None) -> int | None:
    """The size a checkpoint file claims, its signature unchecked: for the diagnosis
    of a log cut before the audit key that signed it was handed over."""
    try:
        return parse_checkpoint(text).size if text is not None else None
    except NoteError:
        return None


def _end_of_log(n: int, tail: bytes, prior: AuditorState | None, latest: SignedPrefix | None,
                claimed: int | None, latest_error: str | None) -> Failure | None:
    """Checks that need the whole log, once every complete line has passed.

    A missing tail explains open intents, so truncation and a torn line come first (and
    a cut through the latest checkpoint's own signing, `_signing_cut`).
    """
    if prior is not None and prior.size > n:
        return Failure(n, Stage.LINE, f"truncated: the log had {prior.size} lines at the last "
                                      f"verification, now it has {n}")
    if latest is not None and latest.size > n:
        return Failure(n, Stage.LINE, f"log is shorter than the checkpoint (truncated): the "
                                      f"latest checkpoint covers {latest.size} lines, the log "
                                      f"has {n}")
    if claimed is not None and claimed > n:
        return Failure(n, Stage.LINE, f"log is shorter than the checkpoint (truncated?): the "
                                      f"latest checkpoint claims {claimed} lines, the log has "
                                      f"{n}; its signature could not be checked either "
                                      f"({latest_error}), since a log cut short may end before "
                                      "the audit key that signed it was handed over")
    if tail:
        return Failure(n, Stage.LINE, "torn line: the final line has no newline (an "
                                      "interrupted write)")
    return None


def _signing_cut(n: int, latest: SignedPrefix) -> Failure | None:
    """A log must go on past the latest checkpoint file's size by that checkpoint's own
    signing: the daemon writes the file (and hands it to witnesses) only once that is in
    the log, the intent durable before the HSM signed and the outcome carrying the note
    (so a log that records the checkpoint has those lines). A log that ends before was
    cut after the checkpoint's lines, which no signature covers: the daemon refuses to
    start on it, and the verifier said OK (auditor trial, H2). (Those lines replaced by
    others are unsigned lines, which fail as such.)"""
    if n >= latest.size + 2:
        return None
    return Failure(n, Stage.LINE, (
        f"cut: the latest checkpoint covers {latest.size} lines, and the lines that signed it "
        f"(an intent, durable before the HSM signed, then the outcome that carries the "
        f"checkpoint) should follow them, but the log ends at {n} lines: its end was cut (or "
        "this copy of the log was taken before the checkpoint file: copy the checkpoint file "
        "first)"))


def _last_lines(data: bytes, end: int, k: int) -> list[bytes]:
    """The last `k` of the complete lines in ``data[:end]``, without their newlines."""
    lines: list[bytes] = []
    stop = end - 1
    for _ in range(k):
        start = data.rfind(b"\n", 0, stop) + 1
        lines.append(data[start:stop])
        stop = start - 1
    return lines[::-1]
