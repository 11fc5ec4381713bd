"""Incremental verification of a running daemon's audit log over its auditor API.

The offline verifier (`ca.audit.verify`) reads the whole file. A remote auditor
pulls the lines over HTTPS instead (SPEC section 7) and, after the first run,
fetches only the lines added since the checkpoint it verified last time:

1. ``GET /v1/audit/checkpoint``; its signature must verify with the pinned key.
2. Against the state saved by the previous run: a smaller size, or the same size
   with another root, is a cut or a rewrite. A larger size needs the daemon's
   consistency proof from the saved root to the new one (RFC 9162 2.1.4.2): it
   proves that the lines verified before are still the first lines of the log the
   daemon now signs, without fetching them again.
3. ``GET /v1/audit/entries`` for the new lines only, [saved size, new size), and
   the offline verifier's per-line checks on them (`_scan`: canonical JSON, seq,
   ts, the prev chain continuing from the last verified line; `_pair`: intents and
   outcomes continuing from the intents left open), extending the saved Merkle
   frontier leaf by leaf: every checkpoint logged among them must have the root of
   its prefix, and all of them together the root of the new checkpoint.

Only then is the new state saved, atomically. The first run is the same with an
empty state (all lines from 0). The state holds the offline state's fields
(``size``, ``root``, ``checkpoint``: `hsmca audit verify --log` accepts it too) plus
``frontier`` (base64 CompactRange hashes), ``last_hash`` and ``last_line`` (the
line at size-1, so the chain check of the next line runs unchanged), ``next_seq``
and ``open_intents`` (op_id -> intent seq and whether a daemon.start followed).

Two deliberate differences from `verify_log`:

* an intent still open at the checkpoint is carried to the next run, not refused:
  on a live log a checkpoint routinely falls between an intent and its outcome;
* op_ids closed before the saved size are not kept (the state would grow with
  every signature), so an op_id reused across runs is caught only when its
  outcome arrives with no open intent, not when the reused intent is logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca import client
from ca.audit.merkle import EMPTY_ROOT, HASH_SIZE, CompactRange, verify_consistency
from ca.audit.note import Checkpoint, NoteError, parse_checkpoint, verify_checkpoint
from ca.audit.verify import (
    _CHECKPOINT_ROOT,
    _LINE,
    _PREFIX,
    GENESIS,
    _check_state,
    _earliest,
    _Failure,
    _pair,
    _Prefix,
    _scan_range,
    load_state,
    save_state,
)

PAGE = 1000  # the most lines /v1/audit/entries returns per request
CUT = "the log was cut or rewritten after the checkpoint verified last time"


@dataclass(frozen=True)
class RemoteResult:
    ok: bool
    lines: int  # lines covered by the checkpoint now verified (or examined, on failure)
    fetched: int  # lines this run fetched and checked
    checkpoints: int  # checkpoints whose signature and root were verified by this run
    bad_seq: int | None  # the first failing line; None if ok or the failure has no line
    reason: str | None
    new_state: dict[str, Any] | None  # saved by verify_remote when ok


class _DaemonError(Exception):
    """The daemon answered something malformed (not a verdict about a line)."""


@dataclass
class _Verified:
    """What the saved state vouches for: the first `size` lines, and what continuing needs."""

    size: int = 0
    root: bytes = EMPTY_ROOT
    checkpoint: str = ""
    frontier: CompactRange = field(default_factory=CompactRange)
    last_line: bytes | None = None  # line size-1: context for the chain check; None at 0
    open_intents: dict[str, tuple[int, bool]] = field(default_factory=dict)


async def verify_remote(url: str, ssl_ctx: ssl.SSLContext, public_key: Ed25519PublicKey,
                        state_path: str | os.PathLike[str], *,
                        origin: str | None = None) -> RemoteResult:
    """Verify the daemon at `url` from the state in `state_path` (created if missing).

    `ssl_ctx` carries an auditor or admin client certificate. The state is replaced
    only when everything verified. Raises `ca.client.ClientError` when the daemon
    cannot be asked (unreachable, 403, ...) and ValueError for a malformed state
    file (the auditor's own file, not evidence about the log).
    """
    raw = load_state(state_path)
    async with aiohttp.ClientSession(timeout=client.TIMEOUT) as session:
        api = _API(session, url.rstrip("/"), ssl_ctx)
        try:
            result = await _run(api, public_key, raw, origin)
        except _DaemonError as exc:
            result = RemoteResult(False, 0, 0, 0, None, str(exc), None)
    if result.ok and result.new_state is not None:
        save_state(state_path, result.new_state)
    return result


# ---- talking to the daemon ------------------------------------------------------------------


@dataclass
class _API:
    session: aiohttp.ClientSession
    base: str
    ctx: ssl.SSLContext

    async def get(self, path: str) -> bytes:
        return await client.get_bytes(self.session, self.base + path, self.ctx)

    async def checkpoint(self) -> str:
        try:
            return (await self.get("/v1/audit/checkpoint")).decode("utf-8")
        except UnicodeDecodeError:
            raise _DaemonError("the daemon's checkpoint is not UTF-8 text") from None

    async def entries(self, start: int, stop: int) -> bytes:
        """Lines [start, stop) byte for byte, in pages; fewer if the daemon has fewer."""
        pages: list[bytes] = []
        seq = start
        while seq < stop:
            limit = min(PAGE, stop - seq)
            page = await self.get(f"/v1/audit/entries?start={seq}&limit={limit}")
            count = page.count(b"\n")
            if count > limit:
                raise _DaemonError(f"the daemon returned {count} lines from seq {seq} when "
                                   f"asked for at most {limit}")
            pages.append(page)
            if count == 0 or not page.endswith(b"\n"):
                break  # the daemon has no more (or a torn line): the verifier says which
            seq += count
        return b"".join(pages)

    async def consistency(self, old: int, size: int) -> list[bytes]:
        raw = await self.get(f"/v1/audit/proof/consistency?old={old}&size={size}")
        try:
            body = json.loads(raw)
            if body["old"] != old or body["size"] != size:
                raise ValueError(f"it is for old={body['old']!r}, size={body['size']!r}")
            proof = [base64.b64decode(h, validate=True) for h in body["proof"]]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise _DaemonError(f"the daemon's consistency proof from {old} to {size} lines is "
                               f"malformed: {exc}") from None
        return proof


# ---- the state ------------------------------------------------------------------------------


def _load(raw: dict[str, Any], public_key: Ed25519PublicKey, origin: str | None
          ) -> tuple[str, _Verified | None, _Prefix]:
    """(key name, what an incremental run continues from, the signed prefix).

    The middle item is None for a state written by the offline verifier (no
    frontier): the run then starts from line 0 and checks the old prefix's root.
    """
    text = raw.get("checkpoint")
    if type(text) is not str:
        raise ValueError("state must have an integer size, a base64 root and a checkpoint")
    try:
        name = parse_checkpoint(text).origin  # the daemon names its key after the origin
    except NoteError as exc:
        raise ValueError(f"the checkpoint in the state file is malformed: {exc}") from None
    prefix = _check_state(raw, public_key, name, origin)
    if "frontier" not in raw:
        return name, None, prefix
    frontier_b64, last_hash = raw.get("frontier"), raw.get("last_hash")
    last_text, open_raw = raw.get("last_line"), raw.get("open_intents")
    if not isinstance(frontier_b64, list) or not all(type(h) is str for h in frontier_b64):
        raise ValueError("state frontier must be a list of base64 hashes")
    try:
        frontier = CompactRange.from_hashes(
            prefix.size, [base64.b64decode(h, validate=True) for h in frontier_b64])
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"state frontier is malformed: {exc}") from None
    if frontier.root() != prefix.root:
        raise ValueError("the state's frontier does not give its root: the state file is "
                         "damaged")
    if raw.get("next_seq") != prefix.size:
        raise ValueError("state next_seq must equal its size")
    last_line = None
    if prefix.size == 0:
        if last_hash != GENESIS or last_text is not None:
            raise ValueError("a state of 0 lines has last_hash 64 zeros and no last_line")
    else:
        if type(last_text) is not str:
            raise ValueError("state last_line must be the text of line size-1")
        last_line = last_text.encode("utf-8")
        if hashlib.sha256(last_line).hexdigest() != last_hash:
            raise ValueError("state last_line does not hash to last_hash: the state file is "
                             "damaged")
    if not isinstance(open_raw, dict):
        raise ValueError("state open_intents must be an object")
    open_intents: dict[str, tuple[int, bool]] = {}
    for op_id, info in open_raw.items():
        seq = info.get("seq") if isinstance(info, dict) else None
        restarted = info.get("restarted") if isinstance(info, dict) else None
        if type(seq) is not int or not 0 <= seq < prefix.size or type(restarted) is not bool:
            raise ValueError(f"state open intent {op_id!r} needs a seq below size and a "
                             "boolean restarted")
        open_intents[op_id] = (seq, restarted)
    return name, _Verified(prefix.size, prefix.root, prefix.text, frontier, last_line,
                           open_intents), prefix


def _state(v: _Verified) -> dict[str, Any]:
    last_hash = hashlib.sha256(v.last_line).hexdigest() if v.last_line is not None else GENESIS
    return {
        "size": v.size, "root": base64.b64encode(v.root).decode("ascii"),
        "checkpoint": v.checkpoint,
        "frontier": [base64.b64encode(h).decode("ascii") for h in v.frontier.hashes],
        "last_hash": last_hash,
        "last_line": v.last_line.decode("utf-8") if v.last_line is not None else None,
        "next_seq": v.size,
        "open_intents": {op: {"seq": seq, "restarted": restarted}
                         for op, (seq, restarted) in sorted(v.open_intents.items())},
    }


# ---- the run --------------------------------------------------------------------------------


def _failed(failure: _Failure, lines: int, fetched: int = 0, checkpoints: int = 0
            ) -> RemoteResult:
    return RemoteResult(False, lines, fetched, checkpoints, failure[0], failure[2], None)


async def _run(api: _API, public_key: Ed25519PublicKey, raw: dict[str, Any] | None,
               origin: str | None) -> RemoteResult:
    if raw is None:
        name, old, prior = origin, _Verified(), None
    else:
        name, loaded, prefix = _load(raw, public_key, origin)
        old, prior = (loaded, None) if loaded is not None else (_Verified(), prefix)
    text = await api.checkpoint()
    if name is None:  # first run, no --origin: the daemon's checkpoint names its key
        try:
            name = parse_checkpoint(text).origin
        except NoteError as exc:
            return RemoteResult(False, 0, 0, 0, None,
                                f"the daemon's latest checkpoint is malformed: {exc}", None)
    try:
        latest = verify_checkpoint(text, name, public_key, name)
    except NoteError as exc:
        return RemoteResult(False, old.size, 0, 0, None,
                            f"the daemon's latest checkpoint does not verify: {exc}", None)

    verified = prior if prior is not None else old
    if latest.size < verified.size:
        return _failed((latest.size, _LINE, f"{CUT}: the daemon's latest checkpoint covers "
                        f"{latest.size} lines, the one verified last time {verified.size}"),
                       latest.size)
    if latest.size == old.size:
        if latest.root != old.root:
            return _failed((max(old.size - 1, 0), _PREFIX, f"{CUT}: the daemon's latest checkpoint "
                            f"covers the same {old.size} lines with a different root"), old.size)
        old.checkpoint = text
        return RemoteResult(True, old.size, 0, 1, None, None, _state(old))
    if old.size > 0:
        proof = await api.consistency(old.size, latest.size)
        if not verify_consistency(old.size, latest.size, old.root, latest.root, proof):
            return _failed((old.size - 1, _PREFIX, (
                f"{CUT}: the daemon's consistency proof from {old.size} to {latest.size} lines "
                f"does not verify against the root verified last time, so the first "
                f"{old.size} lines are no longer those verified")), old.size)
    data = await api.entries(old.size, latest.size)
    return await _check_new_lines(api, data, old, prior, latest, text, public_key, name)


async def _check_new_lines(api: _API, data: bytes, old: _Verified, prior: _Prefix | None,
                           latest: Checkpoint, text: str, public_key: Ed25519PublicKey,
                           name: str) -> RemoteResult:
    """Lines [old.size, latest.size) as served (`data`), continuing from `old`."""
    start = old.size
    end = data.rfind(b"\n") + 1  # complete lines; anything after is a torn line
    n = data.count(b"\n", 0, end)
    # The last verified line goes in front as context, so that `_scan` checks the
    # first new line's prev against it exactly as it checks every other line's.
    context = old.last_line + b"\n" if old.last_line is not None else b""
    blob = context + data[:end]
    chunk = _scan_range(blob, start, len(context), len(blob), public_key, name, name, 0)
    failure = chunk.failure
    if failure is not None and failure[0] < start:
        # `_scan` blamed the context line (the next line vouches for the first new one),
        # but the saved hash and the consistency proof pin that line: the new one is bad.
        failure = (start, _LINE, f"prev does not match the SHA-256 of line {start - 1} as "
                                 "verified last time")
    open_seqs = {op: seq for op, (seq, _) in old.open_intents.items()}
    failure = _earliest(failure, _pair([chunk], failure, open_seqs))
    good = failure[0] if failure is not None else start + n  # lines [start, good) passed

    # Extend the frontier over the lines that passed, noting the root at every size a
    # checkpoint among them (or a prefix saved by the offline verifier) vouches for.
    checkpoints = [cp for cp in chunk.checkpoints
                   if failure is None or (cp[0], _CHECKPOINT_ROOT) < failure[:2]]
    wanted = {size for _seq, size, _root, _text in checkpoints if size > start}
    if prior is not None:
        wanted.add(prior.size)
    frontier = old.frontier.copy()
    roots = {start: old.root}
    leaves = chunk.levels[0]
    for k in range(good - start):
        frontier.append(leaves[k * HASH_SIZE:(k + 1) * HASH_SIZE])
        if frontier.size in wanted:
            roots[frontier.size] = frontier.root()

    count = 0
    for seq, size, root, _text in checkpoints:
        if size in roots:
            ok = roots[size] == root
        else:  # logged late, covering fewer lines than were verified before: ask for a proof
            # (sizes above `start` are all in `roots`: a checkpoint covers only lines before
            # its own, and those passed)
            proof = await api.consistency(size, start) if size else []
            ok = verify_consistency(size, start, root, old.root, proof)
        if not ok:
            failure = _earliest(failure, (seq, _CHECKPOINT_ROOT, (
                f"the checkpoint's root is not the Merkle root of the first {size} lines: "
                "a line it covers was altered")))
            break  # in log order: the first mismatch is the one to report
        count += 1
    if prior is not None and prior.size in roots and roots[prior.size] != prior.root:
        failure = _earliest(failure, (prior.size - 1, _PREFIX, (
            f"rewritten: the first {prior.size} lines no longer match the checkpoint verified "
            "last time")))

    if failure is None and n < latest.size - start:
        failure = (start + n, _LINE, (
            "torn line: the daemon served a line without its newline" if data[end:] else
            f"truncated: the daemon's checkpoint covers {latest.size} lines but it served only "
            f"{start + n}"))
    if failure is None and frontier.root() != latest.root:
        failure = (start, _PREFIX, (
            f"the lines the daemon served from seq {start} to {latest.size - 1} are not those "
            f"its latest checkpoint commits to: with them the tree of {latest.size} lines does "
            "not have its root"))
    if failure is not None:
        return _failed(failure, good, n, count)

    last_start = chunk.last_start  # a daemon.start after an open intent excuses it (a crash)
    still_open = {op: (seq, old.open_intents.get(op, (seq, False))[1] or last_start > seq)
                  for op, seq in open_seqs.items()}
    last_line = data[:end - 1].rsplit(b"\n", 1)[-1] if n else old.last_line
    new = _Verified(latest.size, latest.root, text, frontier, last_line, still_open)
    return RemoteResult(True, latest.size, n, count + 1, None, None, _state(new))
