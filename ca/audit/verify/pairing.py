"""Intents and outcomes (docs/audit-log.md, "Pairing").

Every ``hsm.sign`` outcome closes exactly one earlier intent with its op_id, no
op_id is used by two intents, and an intent may stay open only if a
``daemon.start`` line follows it (the process died during the operation).

The scan records each run of lines' hsm.sign lines as `Signings` and pairs what
it can where it scanned them (`pair_locally`, in the forked worker); `pair` then
joins the runs in log order, in bulk when everything pairs up and line by line
otherwise, which alone says where and why a line fails.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import lt
from typing import Any

from ca.audit.verify.failure import Failure, Stage, before

_FLIP = bytes.maketrans(b"\x00\x01", b"\x01\x00")


@dataclass
class Signings:
    """The hsm.sign lines of a run of lines, in log order.

    Kept in flat arrays rather than a tuple per line: a forked worker pickles this
    back, and pickling a tuple per line costs more than scanning the line.
    """

    seqs: array[int] = field(default_factory=lambda: array("q"))
    intent: bytearray = field(default_factory=bytearray)  # 1: intent, 0: outcome
    ops: list[str] = field(default_factory=list)  # their op_ids
    # Set by `pair_locally` when the run's own intents and outcomes pair up: the intents
    # still open at its end, and the outcomes whose intents are in earlier runs.
    still_open: dict[str, int] | None = None
    foreign: list[tuple[int, str]] = field(default_factory=list)
    intents: dict[str, int] | None = None  # op_id -> seq of the run's intents; never pickled

    def __getstate__(self) -> dict[str, Any]:
        # Only the process that scanned the run keeps `intents` (the parent, its own
        # chunk): `pair` rebuilds the others' in less time than pickle would take.
        return {**self.__dict__, "intents": None}


def pair(runs: list[Signings], failure: Failure | None,
         open_intents: dict[str, int]) -> Failure | None:
    """Pair intents and outcomes in log order, up to the scan's first `failure`.

    `open_intents` (op_id -> seq) holds the intents open before the first run, and
    on return those still open after the last line paired.
    """
    if failure is None and _pair_in_bulk(runs, open_intents):
        return None
    closed: set[str] = set()
    for run in runs:
        for seq, is_intent, op_id in zip(run.seqs, run.intent, run.ops, strict=True):
            if not before(failure, seq, Stage.PAIRING):
                return None
            if is_intent:
                if op_id in open_intents or op_id in closed:
                    return Failure(seq, Stage.PAIRING,
                                   f"duplicate intent: op_id {op_id!r} was used before")
                open_intents[op_id] = seq
            elif op_id in open_intents:
                del open_intents[op_id]
                closed.add(op_id)
            elif op_id in closed:
                return Failure(seq, Stage.PAIRING, f"second outcome for op_id {op_id!r}")
            else:
                return Failure(seq, Stage.PAIRING,
                               f"outcome without an earlier intent (op_id {op_id!r})")
    return None


def pair_locally(run: Signings) -> None:
    """The part of pairing that needs only this run, done where it was scanned.

    The run's intents and outcomes pair up among themselves when no two intents
    and no two outcomes share an op_id and each outcome whose intent is in the run
    comes after it; the other outcomes ("foreign") are left for `_pair_in_bulk`.
    """
    ops, seqs, is_intent = run.ops, run.seqs, bytes(run.intent)
    is_outcome = is_intent.translate(_FLIP)
    intent_ops = list(compress(ops, is_intent))
    intents = dict(zip(intent_ops, compress(seqs, is_intent), strict=True))
    outcome_ops = list(compress(ops, is_outcome))
    closed = set(outcome_ops)
    if len(intents) != len(intent_ops) or len(closed) != len(outcome_ops):
        return
    outcome_seqs = list(compress(seqs, is_outcome))
    # -1: the intent is in an earlier run
    intent_seqs = list(map(intents.get, outcome_ops, repeat(-1)))
    if not all(map(lt, intent_seqs, outcome_seqs)):
        return
    if -1 in intent_seqs:  # usually one or two, for the pairs a chunk boundary splits
        run.foreign = [(seq, op) for seq, op, at in zip(outcome_seqs, outcome_ops,
                                                        intent_seqs, strict=True) if at < 0]
    run.still_open = {}
    if len(intents) > len(outcome_ops) - len(run.foreign):  # some intents stay open
        # In log order (their seqs are), as `pair` would leave them: usually a few.
        still_open = sorted(intents.keys() - closed, key=intents.__getitem__)
        run.still_open = {op: intents[op] for op in still_open}
    run.intents = intents


def _pair_in_bulk(runs: list[Signings], open_intents: dict[str, int]) -> bool:
    """`pair` for when every intent and outcome pairs up, from what `pair_locally`
    found, with no step per line. False, and `open_intents` untouched, if one does
    not: `pair` then finds which, in log order.

    Given that each run pairs up on its own, the whole log does when no intent
    reuses the op_id of an intent in an earlier run (or one open before), and each
    foreign outcome closes an intent that is still open when it comes.
    """
    opened = dict(open_intents)
    # The op_ids of the intents so far: those open before, then each run's.
    earlier: list[Any] = [open_intents.keys()] if open_intents else []
    for k, run in enumerate(runs):
        if run.still_open is None:
            return False
        if run.intents is not None:  # the parent's own chunk keeps its dict
            intents: Any = run.intents.keys()
        else:
            intents = compress(run.ops, run.intent)
            if len(earlier) > 1 or k + 1 < len(runs):  # to be read more than once
                intents = set(intents)
        for ops in earlier:
            if not ops.isdisjoint(intents):
                return False
        for _seq, op in run.foreign:
            if opened.pop(op, None) is None:
                return False
        opened.update(run.still_open)
        earlier.append(intents)
    open_intents.clear()
    open_intents.update(opened)
    return True


def unexcused(open_intents: dict[str, int], last_start: int) -> Failure | None:
    """The first intent still open at the end of the log with no daemon.start after it
    (`last_start` is the seq of the last one, -1 if none)."""
    seqs = [seq for seq in open_intents.values() if seq > last_start]
    if not seqs:
        return None
    return Failure(min(seqs), Stage.PAIRING, "intent without an outcome, and no daemon.start "
                                             "after it (so no crash interrupted it that the log "
                                             "shows; a copy of a running or crashed daemon's "
                                             "log ends so: --allow-unsigned accepts that)")
