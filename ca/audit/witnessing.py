"""Pushing each new checkpoint to the witnesses, and publishing what they cosign.

Two kinds of witness, in `[audit] witnesses`: a file (`ca.audit.witness.FileWitness`)
and a URL, a C2SP tlog-witness (c2sp.org/tlog-witness), such as `hsmca witness
serve` run by an auditor. To a URL the daemon POSTs `add-checkpoint`: the size it
believes the witness holds, a consistency proof from that size (computed from the
tiles), a blank line and the checkpoint. The witness answers with its cosignature,
or 409 with the size it really holds (the daemon retries from that size, as the
transparency-dev witness client does), or refuses: 409 without a size (it holds
another tree of the same size) or 422 (the proof does not verify). A refusal means
the log the daemon signs does not extend what the witness saw: it was cut or
rewritten. It is logged as an error; nothing else can be done about it here.

What each witness answered is also counted for /metrics (`on_result`, set by
ca/metrics.py in the primary): a cosignature, or a refusal by its kind (`REASONS`),
labelled with the witness as configured, the label the log lines carry. And where each
witness stands is served to auditors (`report`, `GET /v1/audit/witnesses`): a refusal
says the log does not extend what a witness saw, and `hsmca audit verify --url` and the
web view fail on it. It was in /metrics alone, and an auditor's run said OK while every
witness refused (a log put back from a backup: the cosigned checkpoint beside it is as
old as the backup, so nothing the auditor fetched disagreed).

Signing never waits for a witness: `submit` hands the checkpoint to a task per
witness and returns. A witness still busy with an older checkpoint gets only the
latest one next. A stopping daemon gives them a few seconds (`drain`) for its
final checkpoint.

The cosignatures that verify with a configured witness key (`[audit]
witness-keys`) are added to the checkpoint's note and published beside it:
`state-dir/audit/checkpoint.cosigned` and `GET /v1/audit/checkpoint.cosigned`.

A witness that keeps failing the same way (down, or refusing every checkpoint) is
said once, then again every `REPEAT_LOG_S` with how many failures went unsaid: while
the log grows a checkpoint is signed every second, and the log must not repeat one
fact that often. /metrics counts every one. Its next cosignature says how many
checkpoints in a row it had missed (`after_failures`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import structlog

from ca.audit.cosignature import VerifierKey, valid_cosignatures
from ca.audit.note import NoteError, parse_note
from ca.audit.tiles import TileDamaged
from ca.audit.witness import FileWitness, WitnessRefused
from ca.fileutil import write_atomic

if TYPE_CHECKING:  # loaded when a witness is called: `init` and logs without one
    import aiohttp  # need no HTTP client (a fifth of every `init`)

log = structlog.get_logger("hsmca.witness")
TIMEOUT_S = 10.0
CLOCK_SKEW_S = 3600  # a cosignature dated later than this from now does not count
MAX_PROOF = 63  # C2SP: at most 63 consistency proof lines
# A witness's answer is a few cosignature lines, or a size: what is read of it at most.
# Unbounded, a witness answering 150 MB took the primary (the log's one writer) from 70
# MB to 950 MB (a witness trial); a witness is a third party.
MAX_ANSWER = 64 << 10
REPEAT_LOG_S = 600.0  # a witness failing as before is said again after this long
_RETRIES = 3  # 409s with a size in a row, before giving up on this checkpoint
# Why a witness did not cosign a checkpoint, in a word (a bounded set: /metrics counts
# each). The witness saw another log: "fork", "inconsistent", "cut". Configuration: it
# does not trust the audit key ("untrusted-key"), does not know the log's origin
# ("unknown-log"), or answered without a cosignature by a configured witness key
# ("bad-cosignature"). It could not be asked: "unreachable"; anything else: "error".
REASONS = ("fork", "inconsistent", "cut", "untrusted-key", "unknown-log", "bad-cosignature",
           "unreachable", "error")
# The reasons that say the witness saw another log than the one signed now: the log was
# cut or rewritten (or put back from a backup) since. The others say only that the
# newest lines are not witnessed.
REFUSALS = ("fork", "inconsistent", "cut")
# (witness label, "cosigned" or one of REASONS, the checkpoint's size)
OnResult = Callable[[str, str, int], None]


class WitnessError(Exception):
    """The witness could not be asked, or answered something else than a verdict; `kind`
    says which in a word (one of REASONS)."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


Prove = Callable[[int, int], Sequence[bytes]]


async def _bounded(resp: aiohttp.ClientResponse) -> bytes:
    """The answer's body, MAX_ANSWER bytes at most (WitnessError past that)."""
    from ca.http_body import read_at_most
    data = await read_at_most(resp.content, MAX_ANSWER + 1)
    if len(data) > MAX_ANSWER:
        raise WitnessError(f"the witness answered {resp.status} with more than "
                           f"{MAX_ANSWER >> 10} KiB (a cosignature is a few lines): not read")
    return data


class HTTPWitness:
    """A C2SP tlog-witness at `url` (its submission prefix)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        # The size the witness holds, as far as the daemon knows: learned from its 409s
        # and its cosignatures. 0 at start; the first answer says.
        self.old_size = 0

    def __str__(self) -> str:
        """The URL without its user and password: what log lines and /metrics show."""
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=host)) if host != parts.netloc else self.url

    async def add_checkpoint(self, session: aiohttp.ClientSession, text: str, size: int,
                             prove: Callable[[int, int], Awaitable[Sequence[bytes]]]) -> str:
        """POST the checkpoint (of `size` lines); its cosignature lines, or WitnessRefused
        / WitnessError. `prove(old, size)` is awaited for the consistency proof."""
        import aiohttp
        for _ in range(_RETRIES):
            old = self.old_size
            proof = await prove(old, size) if 0 < old < size else []
            if len(proof) > MAX_PROOF:
                raise WitnessError(f"a consistency proof of {len(proof)} hashes is longer than "
                                   f"the {MAX_PROOF} a witness takes")
            body = f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n"
                                             for h in proof) + "\n" + text
            try:
                async with session.post(f"{self.url}/add-checkpoint", data=body.encode(),
                                        allow_redirects=False) as resp:
                    answer = (await _bounded(resp)).decode(errors="replace")
                    status, ctype = resp.status, resp.content_type
            except (aiohttp.ClientError, TimeoutError) as exc:
                # An exception object is always true: its text may be empty (a timeout's is).
                why = str(exc) or (f"no answer within {TIMEOUT_S:g} s"
                                   if isinstance(exc, TimeoutError) else type(exc).__name__)
                raise WitnessError(f"cannot reach the witness: {why}", "unreachable") from None
            if status == 200:
                self.old_size = size
                return answer
            if status == 409 and ctype == "text/x.tlog.size":
                try:
                    held = int(answer.strip())
                except ValueError:
                    raise WitnessError(f"the witness answered 409 with a size that is not a "
                                       f"number: {answer[:80]!r}") from None
                if held > size:
                    raise WitnessRefused(
                        f"the witness holds a checkpoint of {held} lines, more than the {size} "
                        "of this one: the log was cut (or replaced) since it saw it", "cut")
                if held == old:  # C2SP's 409 says the size differs from `old`: not so
                    raise WitnessError(f"the witness answered 409 saying it holds {held} "
                                       f"lines, the size it was sent as its own (old {old}): "
                                       "it contradicts itself")
                self.old_size = held
                continue  # again, from the size it holds
            if status == 409:
                raise WitnessRefused(
                    f"the witness holds another checkpoint of the same {old} lines (a different "
                    "root): the log was rewritten since it saw it", "fork")
            if status == 422:
                raise WitnessRefused(
                    f"the consistency proof from the {old} lines the witness holds to {size} "
                    "does not verify: the log does not extend what the witness saw (it was "
                    "rewritten)", "inconsistent")
            if status == 403:
                raise WitnessError("the witness does not trust the audit key (give it the "
                                   "log's verifier key, GET /v1/audit/key)", "untrusted-key")
            if status == 404:  # the witness's answer to an unknown origin, or no witness
                raise WitnessError(f"{self}/add-checkpoint answered 404: the witness does "
                                   "not know this log's origin (give it the log: `hsmca "
                                   "witness serve --log ORIGIN=KEY`), or the URL's path is not "
                                   "where it serves (`hsmca witness serve` serves at its root)",
                                   "unknown-log")
            raise WitnessError(f"the witness answered {status}: {answer.strip()[:200]}")
        raise WitnessError(f"the witness answered 409 (its size changed) {_RETRIES} times "
                           "in a row")


def _signers(text: str, answer: str) -> list[str]:
    """The `name+keyid` of each signature line a witness added to the note `text`, to
    set beside the configured keys when none of them verifies."""
    try:
        own = len(parse_note(text).signatures)
        return [f"{s.name}+{s.key_id.hex()}" for s in parse_note(text + answer).signatures[own:]]
    except NoteError:
        return ["(not signature lines)"]


@dataclass
class _Failing:
    """A witness's failures since it last cosigned."""
    reason: str  # the last one's (REASONS)
    said_at: float  # when one was last logged (time.monotonic)
    unsaid: int = 0  # failures since, not logged
    total: int = 0


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).isoformat()


@dataclass
class _Standing:
    """Where a witness stands, as `GET /v1/audit/witnesses` serves it: this run's
    answers, and from earlier runs its key and a refusal that stands (`kept`)."""
    witness: str
    cosigned: int | None = None  # the size of the last checkpoint it cosigned
    cosigned_at: float | None = None  # when (time.time())
    reason: str | None = None  # why its last answer was no cosignature (REASONS)
    error: str | None = None  # in the daemon's words, as its log line says it
    checkpoint: int | None = None  # the size of the checkpoint it did not cosign
    since: float | None = None  # the first failure since it last cosigned
    failures: int = 0  # since it last cosigned
    # The witness key (name+key id) it cosigned with, as far as the daemon has seen
    # (kept across runs beside checkpoint.cosigned): an auditor's tool fails on the
    # refusal of a witness it pins, and takes any other's as a claim (a trial's fake
    # witness, unpinned, made every auditor's run fail with an unchecked size).
    signer: str | None = None

    def answer(self, result: str, size: int, error: str | None) -> None:
        now = time.time()
        if result == "cosigned":
            self.cosigned, self.cosigned_at = size, now
            self.reason = self.error = self.checkpoint = self.since = None
            self.failures = 0
            return
        if self.since is None:
            self.since = now
        self.failures += 1
        if self.reason in REFUSALS and result not in REFUSALS:
            # A refusal stands until the witness cosigns again: one stopped by its
            # operator to look into it must not turn it into "failing" (a review).
            return
        self.reason, self.error, self.checkpoint = result, error, size

    def kept(self) -> dict[str, Any]:
        """What outlives the run: its key, and a refusal standing (a restart, as after
        putting a backup back, must not make it "failing", or unknown, a review found)."""
        refused = self.reason in REFUSALS
        return {"signer": self.signer, "refused": {
            "reason": self.reason, "error": self.error, "checkpoint": self.checkpoint,
            "since": self.since} if refused else None}

    def restore(self, kept: Any) -> None:
        if not isinstance(kept, dict):
            return
        if isinstance(signer := kept.get("signer"), str):
            self.signer = signer
        refused = kept.get("refused")
        if isinstance(refused, dict) and refused.get("reason") in REFUSALS:
            self.reason = str(refused["reason"])
            self.error = str(refused.get("error") or "")[:2000]
            checkpoint, since = refused.get("checkpoint"), refused.get("since")
            self.checkpoint = checkpoint if type(checkpoint) is int else None
            self.since = float(since) if isinstance(since, int | float) else None
            self.failures = 1

    def doc(self) -> dict[str, Any]:
        state = ("not-asked" if self.reason is None and self.cosigned is None else
                 "cosigning" if self.reason is None else
                 "refused" if self.reason in REFUSALS else "failing")
        return {"witness": self.witness, "state": state, "signer": self.signer,
                "cosigned": self.cosigned,
                "cosigned_at": _utc(self.cosigned_at) if self.cosigned_at else None,
                "reason": self.reason, "error": self.error, "checkpoint": self.checkpoint,
                "since": _utc(self.since) if self.since else None,
                "failures": self.failures}


class Witnessing:
    """The daemon's witnesses: `submit` each new checkpoint, read `cosigned`."""

    def __init__(self, witnesses: Sequence[FileWitness | HTTPWitness],
                 keys: Sequence[VerifierKey], prove: Prove, cosigned_path: Path) -> None:
        self.witnesses = list(witnesses)
        self.keys = list(keys)
        self._prove = prove  # AuditLog.consistency_proof: reads tiles, so off the loop
        self.cosigned_path = cosigned_path
        self.cosigned: str | None = (cosigned_path.read_text("utf-8")
                                     if cosigned_path.exists() else None)
        self._latest: dict[int, tuple[str, int]] = {}  # witness -> checkpoint still to push
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._published: tuple[int, str] | None = None  # (size, note) with cosignatures
        self._cosigs: dict[tuple[str, bytes], str] = {}  # (witness, key id) -> cosignature
        self._writing = asyncio.Lock()  # one write of the cosigned file at a time, the latest
        self.on_result: OnResult | None = None  # each witness's answer, for /metrics
        self._failing: dict[int, _Failing] = {}  # witness -> how it has been failing
        self._standing = [_Standing(str(w)) for w in self.witnesses]
        self._kept_path = cosigned_path.with_name("witnesses.json")
        self._kept = self._kept_read()
        for witness, standing in zip(self.witnesses, self._standing, strict=True):
            standing.restore(self._kept.get(str(witness)))
        # Where they stand, as JSON: replaced whole on the event loop, read by the
        # recorder's thread (GET /v1/audit/witnesses).
        self.report = ""
        self._report()

    def __bool__(self) -> bool:
        return bool(self.witnesses)

    def submit(self, text: str, size: int) -> None:
        """Push `text` to every witness in the background (from the event loop)."""
        for i in range(len(self.witnesses)):
            self._latest[i] = (text, size)
            task = self._tasks.get(i)
            if task is None or task.done():
                self._tasks[i] = asyncio.create_task(self._run(i))

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until every witness has been offered the latest."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                log.warning("witnesses still busy at stop", witnesses=[
                    str(self.witnesses[i]) for i, t in self._tasks.items() if t in pending])

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _run(self, i: int) -> None:
        witness = self.witnesses[i]
        while i in self._latest:
            text, size = self._latest.pop(i)
            try:
                if isinstance(witness, FileWitness):
                    # File I/O under a lock, maybe on a share: off the event loop.
                    await asyncio.to_thread(witness.push, text, self._prove)
                    self._result(i, "cosigned", size)  # held: a file's cosignature
                    if (failing := self._failing.pop(i, None)) is not None:
                        log.info("witness holds the checkpoint again", witness=str(witness),
                                 size=size, after_failures=failing.total)
                    await self._keep()
                    continue
                answer = await witness.add_checkpoint(self._http(), text, size, self._proof)
                await self._cosigned(i, text, size, answer)
            except WitnessRefused as exc:
                self._fail(i, exc.kind, size, log.error, "witness refused the checkpoint",
                           reason=exc.reason)
            except (WitnessError, TileDamaged, OSError, ValueError) as exc:
                self._fail(i, exc.kind if isinstance(exc, WitnessError) else "error", size,
                           log.warning, "witness not updated", error=str(exc))
            await self._keep()

    def _fail(self, i: int, kind: str, size: int, emit: Callable[..., Any], event: str,
              **fields: Any) -> None:
        """Witness `i` did not cosign: counted, and said unless it is said already."""
        witness = self.witnesses[i]
        self._result(i, kind, size, str(fields.get("error") or fields.get("reason") or event))
        # Said again when its wording changes, not only its kind: three failures of kind
        # "error" in turn (a 500, then two kinds of bad 409) were said as the first alone,
        # for ten minutes (a witness trial). Numbers aside: sizes move at every checkpoint.
        # Its own words, before what it quotes of the witness (an error page's request
        # id would make every failure new: a review)
        said = str(fields.get("error") or fields.get("reason") or "").split(": ", 1)[0]
        wording = re.sub(r"\d+", "#", said)
        if (unsaid := self._failed(i, f"{kind}: {wording}")) is not None:
            emit(event, witness=str(witness), size=size, **fields, **unsaid)

    def _failed(self, i: int, reason: str) -> dict[str, int] | None:
        """None when this failure is like the last one said, less than REPEAT_LOG_S ago
        (it is counted); else the fields to log with it: how many went unsaid."""
        now = time.monotonic()
        failing = self._failing.get(i)
        if failing is None or failing.reason != reason:
            total = failing.total if failing else 0
            self._failing[i] = _Failing(reason, now, total=total + 1)
            # Another reason is news; how many of the last one went unsaid is said with it.
            return {"unsaid": failing.unsaid} if failing and failing.unsaid else {}
        failing.total += 1
        if now - failing.said_at < REPEAT_LOG_S:
            failing.unsaid += 1
            return None
        unsaid, failing.said_at, failing.unsaid = failing.unsaid, now, 0
        return {"unsaid": unsaid} if unsaid else {}

    def _result(self, i: int, result: str, size: int, error: str | None = None) -> None:
        """Counted and reported before it is logged: a log line's reader finds it in
        /metrics and GET /v1/audit/witnesses."""
        if self.on_result is not None:
            self.on_result(str(self.witnesses[i]), result, size)
        self._standing[i].answer(result, size, error)
        self._report()

    def _report(self) -> None:
        self.report = json.dumps({"witnesses": [s.doc() for s in self._standing]})

    def _kept_read(self) -> dict[str, Any]:
        """What earlier runs kept of each witness (witnesses.json beside
        checkpoint.cosigned): its key, a refusal standing."""
        try:
            kept = json.loads(self._kept_path.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        return kept if isinstance(kept, dict) else {}

    async def _keep(self) -> None:
        """Write what outlives the run, when it changed (its key seen, a refusal that
        starts or ends: seldom, not at every cosignature)."""
        kept = {str(w): s.kept() for w, s in zip(self.witnesses, self._standing, strict=True)}
        if kept == self._kept:
            return
        self._kept = kept
        try:
            await asyncio.to_thread(write_atomic, self._kept_path,
                                    json.dumps(kept, indent=1) + "\n")
        except OSError as exc:  # kept in memory: said, not fatal
            log.warning("cannot keep where the witnesses stand", path=str(self._kept_path),
                        error=str(exc))

    async def _signer_seen(self, i: int, signer: str) -> None:
        if self._standing[i].signer != signer:
            self._standing[i].signer = signer
            self._report()

    async def _proof(self, old: int, size: int) -> Sequence[bytes]:
        return await asyncio.to_thread(self._prove, old, size)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        return self._session

    async def _cosigned(self, i: int, text: str, size: int, answer: str) -> None:
        """Keep the cosignatures of the newest checkpoint witness `i` cosigned."""
        witness = self.witnesses[i]
        lines = valid_cosignatures(text + answer, self.keys,
                                   not_after=int(time.time()) + CLOCK_SKEW_S)
        if not lines:
            self._fail(i, "bad-cosignature", size, log.error, "the witness answered without "
                       "a cosignature by a configured witness key, dated no later than now",
                       signed_as=_signers(text, answer),
                       configured=[f"{k.name}+{k.key_id.hex()}" for k in self.keys])
            return
        self._result(i, "cosigned", size)
        own = len(parse_note(text).signatures)
        first = parse_note(text + lines[0]).signatures[own]
        await self._signer_seen(i, f"{first.name}+{first.key_id.hex()}")
        failing = self._failing.pop(i, None)
        log.info("witness cosigned the checkpoint", witness=str(witness), size=size,
                 **({"after_failures": failing.total} if failing else {}))
        if self._published is None or self._published[1] != text:
            if self._published is not None and self._published[0] > size:
                return  # a newer checkpoint is published already
            self._published, self._cosigs = (size, text), {}
        for line in lines:  # one per witness key: a second answer replaces the first
            _, name, blob = line.split(" ", 2)
            self._cosigs[name, base64.b64decode(blob)[:4]] = line
        self.cosigned = text + "".join(self._cosigs.values())
        async with self._writing:
            await asyncio.to_thread(write_atomic, self.cosigned_path, self.cosigned)
