"""How a verifier reports a failure: the first failing seq, and why.

Checks run in log order and the first failure is the one reported. Several checks
can fail at the same seq (a line that is malformed and also breaks the pairing);
`Stage` orders them as the checks run on a line, so failures compare (as tuples)
in the order an auditor reading the log would meet them.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class Stage(IntEnum):
    LINE = 0  # the line itself: canonical JSON, seq, ts, event, prev, hsm.sign fields
    PAIRING = 1  # intents and outcomes
    CHECKPOINT = 2  # a checkpoint line's signed note
    CHECKPOINT_ROOT = 3  # a checkpoint's root against the lines it covers
    PREFIX = 4  # a prefix vouched for from outside the log: the state, the latest checkpoint


class Failure(NamedTuple):
    seq: int  # the line reported
    stage: Stage
    reason: str


def earliest(a: Failure | None, b: Failure | None) -> Failure | None:
    """The failure an auditor meets first (None if neither is one)."""
    if a is None or b is None:
        return a if b is None else b
    return min(a, b)


def before(found: Failure | None, seq: int, stage: Stage) -> bool:
    """Whether a check of line `seq` at `stage` comes before the failure `found`."""
    return found is None or (seq, stage) < (found.seq, found.stage)


class LineError(Exception):
    """A line fails a check; `seq` overrides the line being checked (a look-ahead may
    find that an earlier line was altered)."""

    def __init__(self, stage: Stage, reason: str, seq: int | None = None) -> None:
        super().__init__(reason)
        self.stage, self.reason, self.seq = stage, reason, seq
