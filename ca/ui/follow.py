"""The verdict every page shows: the daemon's audit log followed with the auditor's
saved state by `ca.audit.remote.verify_remote` (what `hsmca audit verify --url` runs),
and the witnesses' cosignatures on a checkpoint consistent with what it verified.

On a cluster every node keeps a log of its own and any node serves them all: `Logs`
follows each with a state file of its own, as `hsmca audit verify --url` does (never
"the log of whichever node answers", which a load balancer changes from one request
to the next), and a page about one log also says how the others stand.

A run is started by a page that finds the verdict older than a few seconds (and once
at start-up); concurrent pages wait for the same run. A failure is kept for the life
of the process: a log that was once seen rewritten stays red here even if it is put
back, and the saved state, which a failed run never changes, makes every later run
(and every later `hsmca ui` or `hsmca audit verify` with it) fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.audit.cluster import log_origin
from ca.audit.cosignature import VerifierKey
from ca.audit.merkle import TreeHead
from ca.audit.note import Checkpoint, parse_checkpoint
from ca.audit.remote import list_logs, log_state_path, logs_gone, verify_remote
from ca.audit.verify import AuditorState, PinnedKey, followed, load_state, state_origin
from ca.audit.witnessed import Witnessed
from ca.client import ClientError
from ca.ui.ca_api import CA

log = structlog.get_logger("hsmca.ui")


@dataclass(frozen=True)
class Verdict:
    status: str  # "ok" | "failed" | "unknown" (nothing verified yet, or cannot say)
    tree: TreeHead | None  # the lines the auditor verified (now or before): proofs go here
    checkpoint: Checkpoint | None  # the largest checkpoint verified
    checkpoint_text: str
    checked_at: dt.datetime
    bad_seq: int | None = None
    reason: str | None = None
    problem: str | None = None  # why the daemon could not be asked (not a verdict)
    note: str | None = None
    fetched: int = 0
    witnessed: Witnessed = field(default_factory=Witnessed)
    under_way: bool = False  # a run is still going (this is the previous verdict)
    log: str | None = None  # the node whose log (cluster); None: a single node's one log
    others: tuple[Verdict, ...] = ()  # the other logs' verdicts (cluster)
    # The audit keys of the verified log: the pinned one and those it handed over to.
    key: PinnedKey | None = None
    witnesses_pinned: int = 0  # witness keys given (--witness-key)
    # The daemon's witnesses that fail to cosign (down, misconfigured), in its words:
    # amber, the newest lines are not witnessed. A refusal is a failed verdict.
    witness_trouble: tuple[str, ...] = ()
    # False: this run could not ask the daemon, so the verdict is an earlier run's, as of
    # its checked_at. Not green: a web trial's banner stayed green, its "checked" time
    # moving on, while the daemon was down.
    answered: bool = True

    @property
    def unwitnessed(self) -> bool:
        """Verified, but no witness the auditor pinned has cosigned a checkpoint of it:
        amber, not green (an auditor trial read "0 witnesses" in green as all well)."""
        return self.status == "ok" and self.tree is not None and self.tree.size > 0 and (
            bool(self.witness_trouble)
            or (self.witnesses_pinned > 0 and self.witnessed.count == 0))

    @property
    def overall(self) -> str:
        """The page's colour: red if any log failed, not only the one shown."""
        if any(v.status == "failed" for v in (self, *self.others)):
            return "failed"
        if self.status == "ok" and not self.answered:
            return "stale"
        return "unwitnessed" if self.unwitnessed else self.status

    @property
    def banner(self) -> str:
        failed = "".join(f"; {o.own_banner}" for o in self.others if o.status == "failed")
        return self.own_banner + failed

    @property
    def own_banner(self) -> str:
        prefix = f"log {self.log}: " if self.log is not None else ""
        if self.status == "failed":
            where = f" at seq {self.bad_seq}" if self.bad_seq is not None else ""
            return f"{prefix}FAILED{where}: {self.reason}"
        if self.status == "ok" and self.tree is not None and not self.answered:
            size = self.checkpoint.size if self.checkpoint else 0
            then = (f"verified then up to seq {self.tree.size - 1}, checkpoint {size}"
                    if self.tree.size else "the log had no line then")
            return (f"{prefix}NOT CHECKED since {self.checked_at:%Y-%m-%d %H:%M:%S} UTC: the "
                    f"daemon could not be asked ({then})")
        if self.status == "ok" and self.tree is not None and self.tree.size == 0:
            return f"{prefix}verified: the log has no line yet"
        if self.status == "ok" and self.tree is not None:
            k = self.witnessed.count
            size = self.checkpoint.size if self.checkpoint else 0
            witnesses = f"{k} witness{'' if k == 1 else 'es'}"
            if k and self.witnessed.size != size:
                # Cosigned an older checkpoint: say which, and since when (an auditor trial:
                # "checkpoint 150018, 1 witness" read as if the witness had seen 150018,
                # while every witness had been down for minutes).
                newest = self.witnessed.newest
                since = f", {ago(newest)}" if newest is not None else ""
                witnesses = f"witnessed up to {self.witnessed.size} by {witnesses}{since}"
            if self.witness_trouble:
                witnesses += "; NOT WITNESSED lately: " + "; ".join(self.witness_trouble)
            elif self.unwitnessed:
                witnesses = (f"NOT WITNESSED: no cosignature by the {self.witnesses_pinned} "
                             f"pinned witness{'' if self.witnesses_pinned == 1 else 'es'}"
                             + (f" ({self.witnessed.problem})" if self.witnessed.problem
                                else ""))
            return (f"{prefix}verified up to seq {self.tree.size - 1}, checkpoint {size}, "
                    f"{witnesses}")
        return (f"{prefix}not verified yet: "
                f"{self.problem or 'the first verification is under way'}")

    @property
    def detail(self) -> str:
        """A second line: how fresh the verdict is and what else to know."""
        parts = [f"checked {self.checked_at.strftime('%Y-%m-%d %H:%M:%S')} UTC"]
        if self.others:
            parts.append("other logs: " + ", ".join(
                f"{o.log} {_short(o)}" for o in self.others))
        if self.status == "ok" and self.answered and (self.fetched or not self.problem):
            # (With a problem, this verdict is an earlier run's: whether there are new
            # lines is not known; "no new lines" beside "could not be asked" contradicted,
            # and so did an earlier run's "3 new lines fetched", a web view trial.)
            parts.append(f"{self.fetched} new lines fetched and checked"
                         if self.fetched else "no new lines")
        if self.problem and self.status != "unknown":
            parts.append(f"the daemon could not be asked again: {self.problem}")
        if self.note:
            parts.append(self.note)
        if self.under_way:
            parts.append("a newer verification is under way")
        return "; ".join(parts)


def _short(v: Verdict) -> str:
    if v.status == "failed":
        return "FAILED" + (f" at seq {v.bad_seq}" if v.bad_seq is not None else "")
    if v.status == "ok" and v.tree is not None:
        return f"verified up to seq {v.tree.size - 1}" if v.tree.size else "verified (empty)"
    return "not verified yet"


def seconds_since(when: object) -> int | None:
    """Seconds from `when` (a datetime, or an ISO time as log lines have it) to now,
    negative for a time to come; None if it is not a time."""
    if isinstance(when, dt.datetime):
        moment = when
    else:
        try:
            moment = dt.datetime.fromisoformat(str(when).replace("Z", "+00:00"))
        except ValueError:
            return None
    return int((dt.datetime.now(dt.UTC) - moment).total_seconds())


def ago(when: str | dt.datetime | None) -> str:
    """How long ago `when` was, in words."""
    seconds = seconds_since(when) if when is not None else None
    if seconds is None:
        return "-"
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            text = f"{seconds // size} {unit}"
            break
    else:
        text = f"{seconds} s"
    return f"in {text}" if future else f"{text} ago"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class Follower:
    """One log followed with one state file: `log` names a cluster node's log (`ca`
    reads it), None a single node's one log."""

    def __init__(self, ca: CA, key: Ed25519PublicKey, state: Path, origin: str | None,
                 witness_keys: list[VerifierKey], fresh_s: float = 5.0,
                 log: str | None = None) -> None:
        self.ca, self.key, self.state, self.origin = ca, key, state, origin
        self.witness_keys = witness_keys
        self.fresh_s, self.log = fresh_s, log
        self.latest = Verdict("unknown", None, None, "", _now(), log=log)
        self._at = float("-inf")  # monotonic time of the latest run's end
        self._run_task: asyncio.Task[Verdict] | None = None

    def start(self) -> None:
        """The first run, at once, so the first page does not wait for all of it."""
        self._spawn()

    def _spawn(self) -> asyncio.Task[Verdict]:
        if self._run_task is None or self._run_task.done():
            self._run_task = asyncio.create_task(self._run())
        return self._run_task

    async def verdict(self, wait_s: float = 20.0, fresh: bool = False) -> Verdict:
        """The verdict, refreshed if older than `fresh_s` (or at once, `fresh`); if a run
        takes longer than `wait_s` (a long log's first run), the previous one, marked as
        such."""
        if not fresh and time.monotonic() - self._at < self.fresh_s and \
                self._run_task is not None and self._run_task.done():
            return self.latest
        task = self._spawn()
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            return replace(self.latest, under_way=True)

    def caught(self, seq: int, reason: str) -> None:
        """A page found the daemon serving line `seq` against the verified log: a
        failure, as if the verification had found it (and as sticky)."""
        if self.latest.status == "failed":
            return
        log.error("audit log verification FAILED", seq=seq, reason=reason)
        self.latest = replace(self.latest, status="failed", bad_seq=seq, reason=reason,
                              checked_at=_now())

    async def close(self) -> None:
        if self._run_task is not None and not self._run_task.done():
            self._run_task.cancel()
            try:
                await self._run_task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> Verdict:
        try:
            verdict = await self._verify()
        except Exception as exc:  # a bug must show on the page, never as green
            log.exception("verification crashed")
            verdict = replace(self.latest, status="failed" if self.latest.status == "failed"
                              else "unknown", problem=f"the verification crashed: {exc!r}",
                              checked_at=_now())
        if self.latest.status == "failed" and not verdict.answered:
            # Sticky, and nothing checked now: the daemon could not be asked, said as
            # such, as of the last check, not "a later check passed" as of now (a
            # re-trial)
            verdict = replace(self.latest, problem=verdict.problem, answered=False,
                              note="this failure stands")
        elif self.latest.status == "failed" and verdict.status != "failed":
            # Sticky: see the module's docstring.
            verdict = replace(self.latest, checked_at=verdict.checked_at, problem=None,
                              answered=True,
                              note="a later check passed, but this failure stands")
        elif self.latest.status == "failed":
            # The first failure, with where it is, stands (later runs do not locate it)
            verdict = replace(self.latest, checked_at=verdict.checked_at, problem=None,
                              answered=True)
        elif verdict.status == "failed" and self.latest.status != "failed":
            log.error("audit log verification FAILED", seq=verdict.bad_seq,
                      reason=verdict.reason)
        verdict = replace(verdict, witnesses_pinned=len(self.witness_keys))
        self.latest, self._at = verdict, time.monotonic()
        return verdict

    def _saved(self) -> tuple[TreeHead | None, Checkpoint | None, str, PinnedKey | None]:
        """The verified tree and checkpoint from the state file, and the audit keys of
        the verified log: the pinned one (the key the log began with) and every key it
        handed over to, as the state records them (docs/keys.md)."""
        raw = load_state(self.state)
        name = (state_origin(raw) if raw is not None else None) or self.origin
        if name is None:
            return None, None, "", None
        pinned = PinnedKey(self.key, name, self.origin)
        if raw is None:
            return None, None, "", pinned
        st = AuditorState.parse(raw, pinned)
        cp = parse_checkpoint(st.checkpoint) if st.checkpoint else None
        return st.seen, cp, st.checkpoint, followed(raw, pinned)

    async def _verify(self) -> Verdict:
        now = _now()
        try:
            # (It fails a log whose audit key signed a cosigned checkpoint the verified
            # tree does not extend: an auditor trial saw the view green beside one.)
            # Where a failure is, is read once: the failure stands (sticky, below), and
            # reading up to a million lines again every few seconds is the CA's load.
            result = await verify_remote(self.ca.url, self.ca.ctx, self.key, self.state,
                                         origin=self.origin, log=self.log,
                                         witness_keys=self.witness_keys,
                                         locate=self.latest.status != "failed")
        except ClientError as exc:
            tree, cp, text, key = self._saved()
            keep = self.latest
            # As of the last run that asked it: nothing was checked now.
            return replace(keep, problem=str(exc), answered=False,
                           checked_at=keep.checked_at if keep.status == "ok" else now,
                           tree=keep.tree or tree, checkpoint=keep.checkpoint or cp,
                           checkpoint_text=keep.checkpoint_text or text,
                           key=keep.key or key)
        except ValueError as exc:  # the auditor's own state file
            return Verdict("unknown", None, None, "", now, log=self.log,
                           problem=f"the state file {self.state} cannot be used: {exc}")
        tree, cp, text, key = self._saved()
        if not result.ok:
            return Verdict("failed", tree, cp, text, now, result.bad_seq, result.reason,
                           fetched=result.fetched, log=self.log, key=key)
        return Verdict("ok", tree, cp, text, now, note=result.note, fetched=result.fetched,
                       witnessed=result.witnessed or Witnessed(), log=self.log, key=key,
                       witness_trouble=result.witness_trouble)


class Logs:
    """Every log the daemon serves, each followed by a Follower of its own: one unnamed
    log on a single node; on a cluster, one per node, each with its own state file
    beside `state` (`log_state_path`). The list is asked again at most every
    `fresh_s` (a node that joins is followed from then on)."""

    def __init__(self, ca: CA, key: Ed25519PublicKey, state: Path, origin: str | None,
                 witness_keys: list[VerifierKey], fresh_s: float = 5.0) -> None:
        self.ca, self.key, self.state, self.origin = ca, key, state, origin
        self.witness_keys, self.fresh_s = witness_keys, fresh_s
        self.names: list[str | None] = []  # none known yet
        self.problem: str | None = None  # why the list could not be asked
        self.gone: str | None = None  # a log verified before that the list leaves out
        self._followers: dict[str | None, Follower] = {}
        self._listed_at = float("-inf")
        self._listing: asyncio.Task[list[str | None]] | None = None
        self._starting: asyncio.Task[None] | None = None

    def start(self) -> None:
        """The first runs, at once, so the first page does not wait for all of them."""
        self._starting = asyncio.create_task(self._start())

    async def _start(self) -> None:
        for name in await self.list():
            self.follower(name).start()

    async def list(self) -> list[str | None]:
        """The logs the daemon serves (the last known when it cannot be asked now: then
        `problem` says why)."""
        if time.monotonic() - self._listed_at >= self.fresh_s:
            if self._listing is None or self._listing.done():
                self._listing = asyncio.create_task(self._list())
            await asyncio.shield(self._listing)
        return self.names

    async def _list(self) -> list[str | None]:
        try:
            names = await list_logs(self.ca.url, self.ca.ctx)
        except ClientError as exc:
            self.problem = str(exc)
        else:
            self.names, self.problem = names, None
            if names != [None]:
                self.gone = self.gone or logs_gone(self.state, names)  # it stays failed
        self._listed_at = time.monotonic()
        return self.names

    @property
    def cluster(self) -> bool:
        """Whether the daemon serves the logs of several nodes (False until it said)."""
        return bool(self.names) and self.names != [None]

    def follower(self, name: str | None) -> Follower:
        if name not in self._followers:
            # A node's log is pinned to its own checkpoints' origin: --origin's with the
            # node's name after it (ORIGIN/NODE), the ceremonies' --origin's own.
            self._followers[name] = Follower(
                self.ca.for_log(name), self.key, log_state_path(self.state, name),
                self.origin if name is None else log_origin(self.origin, name),
                self.witness_keys, self.fresh_s, name)
        return self._followers[name]

    async def verdict(self, name: str | None, fresh: bool = False) -> Verdict:
        """`name`'s verdict, with every other log's beside it; `fresh`: `name`'s from a
        run begun now, not one of the last `fresh_s`."""
        names = await self.list()
        if not names:
            return Verdict("unknown", None, None, "", _now(), problem=self.problem)
        if self.gone is not None:
            return Verdict("failed", None, None, "", _now(), reason=self.gone, log=name)
        wanted = [name, *(n for n in names if n != name)]
        mine, *others = await asyncio.gather(*(self.follower(n).verdict(fresh=fresh and n == name)
                                               for n in wanted))
        return replace(mine, others=tuple(others))

    async def close(self) -> None:
        for task in (self._starting, self._listing):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for follower in self._followers.values():
            await follower.close()
