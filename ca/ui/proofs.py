"""Lines of the log, each checked against the tree the auditor verified before it is
shown as verified.

The daemon serves the lines again for every page, so what the follower verified says
nothing about the bytes a page receives. A line is verified here when:

- the daemon's inclusion proof for it, in the tree of the size the auditor verified,
  leads from its leaf hash (SHA-256(0x00 || line)) to the verified root
  (`ca.audit.merkle.verify_inclusion`, RFC 9162 2.1.3.2); or
- the line after it is verified and its `prev` is this line's SHA-256
  (`ca.audit.line.chain_hash`): the verified log's hash chain vouches for it.

So a page of consecutive lines needs one proof, for its last verified line, and one
more below each line that fails (`window`). Lines at or beyond the verified size are
never marked verified: no checkpoint the auditor verified covers them yet.

Inside the verified tree there is nothing left to doubt, so a line that fails there
(its proof leads elsewhere, the chain down from a proven line breaks, a line is
missing or out of place) is the daemon contradicting the log it proved: the line
carries a `contradiction`, and the page turns the verdict red for good.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ca.audit import timeline
from ca.audit.line import chain_hash
from ca.audit.merkle import TreeHead, leaf_hash, verify_inclusion
from ca.audit.timeline import parse, time_of
from ca.client import ClientError
from ca.ui.ca_api import CA

NOT_COVERED = "not verified: no checkpoint the auditor verified covers it yet"


@dataclass(frozen=True)
class Line:
    seq: int
    raw: bytes
    obj: dict[str, Any] | None  # parsed, if it is a JSON object
    verified: bool
    why: str  # how it was verified, or why not
    contradiction: str | None = None  # inside the verified tree, yet not the verified line

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    @property
    def pending(self) -> bool:
        """Not verified only because no verified checkpoint covers it yet."""
        return not self.verified and self.why == NOT_COVERED

    def get(self, name: str) -> Any:
        return self.obj.get(name) if self.obj is not None else None


@dataclass(frozen=True)
class Proof:
    """An inclusion proof as checked: the leaf, the path, and the root it must reach."""

    seq: int
    size: int
    leaf: bytes
    path: tuple[bytes, ...]
    root: bytes
    ok: bool
    problem: str | None = None
    contradicts: bool = False  # the daemon answered, and its answer is not the verified log


async def prove(ca: CA, tree: TreeHead | None, seq: int, raw: bytes) -> Proof | None:
    """The inclusion proof of line `seq` (its bytes `raw`) in the verified tree; None if
    that tree does not cover it."""
    if tree is None or seq >= tree.size:
        return None
    leaf = leaf_hash(raw)
    try:
        path = await ca.inclusion(seq, tree.size)
    except ClientError as exc:
        return Proof(seq, tree.size, leaf, (), tree.root, False, str(exc))
    ok = verify_inclusion(leaf, seq, tree.size, path, tree.root)
    return Proof(seq, tree.size, leaf, tuple(path), tree.root, ok,
                 None if ok else "this line and its inclusion proof, as the daemon served "
                 "them, do not lead to the verified root: one of them is not the verified "
                 "log's", contradicts=not ok)


# Lines whose own proofs a page tries before it gives up on the rest: a page of a
# log rewritten throughout fails every proof, and each is a request to the daemon.
MAX_FAILED_PROOFS = 8


async def window(ca: CA, tree: TreeHead | None, start: int, raws: list[bytes]) -> list[Line]:
    """Consecutive lines from seq `start`, each checked: the highest covered line by its
    own proof and the lines below it by the hash chain down from it. Where a proof
    fails or the chain breaks, the next line down is proven on its own: one altered line
    is the one marked, not every line below it too (a web trial saw 50 red rows for one
    line changed)."""
    n = len(raws)
    objs = [parse(r) for r in raws]
    verified = [False] * n
    why = [NOT_COVERED] * n
    lie: list[str | None] = [None] * n
    covered = 0 if tree is None else max(0, min(n, tree.size - start))
    for k in range(covered):
        said = objs[k].get("seq") if objs[k] is not None else None
        if said != start + k:  # the verified log holds every seq once, in order
            lie[k] = (f"the daemon served a line saying seq {said} where line {start + k} of "
                      "the verified log belongs: a line was left out, added or moved")
            why[k] = f"not verified: {lie[k]}"
    k, failed = covered - 1, 0
    while k >= 0:
        if failed == MAX_FAILED_PROOFS:
            for j in range(k + 1):
                why[j] = (f"not checked: the proofs of {failed} lines above it failed; "
                          "open the line to check it on its own")
            break
        proof = await prove(ca, tree, start + k, raws[k])
        assert proof is not None
        if not proof.ok and not proof.contradicts:
            # The daemon did not answer (a timeout, a 5xx): asking for the lines below
            # would wait as long again for each (a review), so they are not checked.
            for j in range(k + 1):
                why[j] = f"not verified: {proof.problem}"
            break
        if not proof.ok:
            failed += 1
            why[k] = f"not verified: {proof.problem}"
            lie[k] = lie[k] or proof.problem
            k -= 1
            continue
        top = k
        verified[k] = True
        why[k] = f"inclusion proof in the verified tree of {proof.size} lines"
        k -= 1
        while k >= 0:
            after = objs[k + 1]
            if after is None or after.get("prev") != chain_hash(raws[k]):
                # The proven line after it chains to another line: this one is not the
                # verified log's (its own proof, next, says so too).
                lie[k] = lie[k] or (f"line {start + k} is not the one whose hash line "
                                    f"{start + k + 1} chains to, inside the verified tree")
                break
            verified[k] = True
            why[k] = f"hash chain from seq {start + top}, proven in the verified tree"
            k -= 1
    return [Line(start + k, raws[k], objs[k], verified[k], why[k], lie[k]) for k in range(n)]


async def proven(ca: CA, tree: TreeHead | None, seq: int, raw: bytes
                 ) -> tuple[Line, Proof | None]:
    """One line checked by its own inclusion proof, and the proof (to show it)."""
    proof = await prove(ca, tree, seq, raw)
    if proof is None:
        return Line(seq, raw, parse(raw), False, NOT_COVERED), None
    why = (f"inclusion proof in the verified tree of {proof.size} lines" if proof.ok
           else f"not verified: {proof.problem}")
    return Line(seq, raw, parse(raw), proof.ok, why,
                proof.problem if proof.contradicts else None), proof


async def line(ca: CA, tree: TreeHead | None, seq: int) -> tuple[Line, Proof | None] | None:
    """Line `seq`, fetched and checked by its own proof; None if the daemon has none."""
    found = await ca.entries(seq, 1)
    return await proven(ca, tree, seq, found[0]) if found else None


async def _find_after(ca: CA, line: Line, reach: int,
                      wanted: Callable[[dict[str, Any]], bool]) -> tuple[int, bytes] | None:
    """(seq, bytes) of the first of the `reach` lines after `line` that is `wanted`."""
    start = line.seq + 1
    while start < line.seq + 1 + reach:
        found = await ca.entries(start, 1000)
        if not found:
            return None
        for k, raw in enumerate(found):
            obj = parse(raw)
            if obj is not None and wanted(obj):
                return start + k, raw
        start += len(found)
    return None


async def find_outcome(ca: CA, intent: Line, reach: int = 4000) -> tuple[int, bytes] | None:
    """(seq, bytes) of an intent's outcome line (same op_id), searched in the `reach`
    lines after it (outcomes follow within a group commit or two)."""
    op_id = intent.get("op_id")
    if not isinstance(op_id, str):
        return None
    return await _find_after(ca, intent, reach, lambda obj: obj.get("op_id") == op_id
                             and obj.get("phase") == "outcome")


# The lines a later record.void may say changed nothing (ca/audit/voided.py)
VOIDABLE = frozenset({"cert.revoke", "ssh.revoke", "key.revoke", "key.rotate", "key.stage"})


async def find_void(ca: CA, line: Line, reach: int = 4000) -> int | None:
    """The seq of the record.void line that voids `line`, searched in the `reach` lines
    after it (a void follows its line's failed commit at once)."""
    found = await _find_after(ca, line, reach, lambda obj: obj.get("event") == "record.void"
                              and obj.get("voids") == line.seq)
    return found[0] if found is not None else None


async def find_intent(ca: CA, outcome: Line, reach: int = 4000) -> tuple[int, bytes] | None:
    """(seq, bytes) of an outcome's intent line, searched in the `reach` lines before it."""
    op_id = outcome.get("op_id")
    if not isinstance(op_id, str):
        return None
    end = outcome.seq
    while end > max(0, outcome.seq - reach):
        start = max(0, end - 1000)
        found = await ca.entries(start, end - start)
        for k in range(len(found) - 1, -1, -1):
            obj = parse(found[k])
            if obj is not None and obj.get("op_id") == op_id and obj.get("phase") == "intent":
                return start + k, found[k]
        end = start
    return None


def line_time(line: Line) -> dt.datetime | None:
    return time_of(line.obj)


async def log_end(ca: CA, tree: TreeHead | None) -> int:
    """How many lines the daemon serves now (those verified and those after)."""
    if tree is None:
        # Nothing verified yet: found by doubling, then bisection, a line at a time (a
        # review: reading from the start fetched the whole log for one page).
        lo, hi = 0, 1024
        while await ca.entries(hi, 1):
            lo, hi = hi + 1, hi * 2
        while lo < hi:
            mid = (lo + hi) // 2
            if await ca.entries(mid, 1):
                lo = mid + 1
            else:
                hi = mid
        return lo
    start = tree.size
    while True:
        got = await ca.entries(start, 1000)
        start += len(got)
        if len(got) < 1000:
            return start


async def first_after(ca: CA, end: int, moment: dt.datetime) -> int:
    """The first seq whose ts is after `moment` (end if none): ca.audit.timeline."""
    async def line(seq: int) -> bytes | None:
        got = await ca.entries(seq, 1)
        return got[0] if got else None
    return await timeline.first_after(line, end, moment)


# A revocation's line is written as its time is taken, then committed: it is found
# within seconds of the time the inventory keeps (a minute, for a slow disk's).
REVOCATION_WINDOW = dt.timedelta(seconds=60)


async def find_revocation(ca: CA, tree: TreeHead | None, serial: str, at: dt.datetime
                          ) -> tuple[int, bytes] | None:
    """(seq, bytes) of the cert.revoke line that revoked `serial` (hex) at `at`, as the
    inventory has it: the first naming it within the window around that time that no
    record.void line takes back for it (a racing request's line, voided after it lost)."""
    start = await first_after(ca, await log_end(ca, tree), at - REVOCATION_WINDOW)
    named: list[tuple[int, bytes]] = []
    voided: set[int] = set()
    async for seq, raw in _lines_from(ca, start):
        obj = parse(raw) or {}
        if obj.get("event") == "cert.revoke" and serial in (obj.get("serials") or ()):
            named.append((seq, raw))
        elif obj.get("event") == "record.void" and isinstance(obj.get("voids"), int) \
                and serial in (obj.get("serials") or [serial]):
            voided.add(obj["voids"])
        if (when := time_of(obj)) is not None and when > at + REVOCATION_WINDOW:
            break  # past the window: what was named is all there is
    return next(((seq, raw) for seq, raw in named if seq not in voided), None)


async def _lines_from(ca: CA, start: int) -> AsyncIterator[tuple[int, bytes]]:
    """(seq, bytes) of each line from `start` to the end the daemon serves."""
    while found := await ca.entries(start, 1000):
        for seq, raw in enumerate(found, start):
            yield seq, raw
        start += len(found)
