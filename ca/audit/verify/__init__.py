"""The auditor's verification of the audit log (docs/audit-log.md, "Verifying").

The input is the log's bytes exactly as stored. Nothing is re-serialised: a line's
hash is SHA-256 of its bytes without the newline, and the same bytes are the Merkle
leaves. Checks run in log order and stop at the first failure, which is reported
with its seq (line index) and a reason:

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
checkpoint line) and the state saved by the previous run, which records every
line that run verified, whether a checkpoint covered it or not: the log must still
be at least as long as both and its prefix must still have their roots.

Last, the lines after the largest verified checkpoint: the closing lines with
which a daemon ends its log (that checkpoint's own intent and outcome, then at most
an ``hsm.logout``), or lines that nothing signs yet (`VerifyResult.unsigned`),
which the CLI refuses unless told to accept them.

When a line's ``prev`` does not match, the verifier looks one line ahead: if the
next line's ``prev`` matches this line, this line is intact and the one before it
was altered, so that one is reported. Only for the last two lines can it not tell
which of them changed; it then reports the later one.

The modules: `format` (one line's format), `scan` (the per-line checks in bulk and
in forked workers), `pairing` (intents and outcomes), `checkpoint` (checkpoint
lines and the prefixes vouched for from outside the log), `state` (the auditor's
saved state), `offline` (a whole log file). What is imported from here is the
public API; ca/audit/remote.py uses it to check lines it fetches a page at a time.
"""

from ca.audit.verify.checkpoint import (
    HandOver,
    LoggedCheckpoint,
    PinnedKey,
    SignedPrefix,
    announced,
    hand_overs,
    keygens,
    root_mismatch,
    say_hand_overs,
)
from ca.audit.verify.failure import Failure, Stage, earliest
from ca.audit.verify.offline import VerifyResult, verify_log
from ca.audit.verify.scan import LineCheck, check_lines
from ca.audit.verify.state import (
    AuditorState,
    followed,
    load_state,
    save_state,
    state_origin,
)

__all__ = [
    "AuditorState",
    "Failure",
    "HandOver",
    "LineCheck",
    "LoggedCheckpoint",
    "PinnedKey",
    "SignedPrefix",
    "Stage",
    "VerifyResult",
    "announced",
    "check_lines",
    "earliest",
    "followed",
    "hand_overs",
    "keygens",
    "load_state",
    "root_mismatch",
    "save_state",
    "say_hand_overs",
    "state_origin",
    "verify_log",
]
