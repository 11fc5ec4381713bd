"""Incremental verification of a running daemon's audit log over its auditor API.

The offline verifier (`ca.audit.verify.verify_log`) reads the whole file. A remote
auditor pulls the lines over HTTPS instead (the auditor endpoints of
docs/audit-log.md) and, after the first run, fetches only the lines added since
those it verified last time:

1. ``GET /v1/audit/checkpoint``; its signature must verify with the pinned key.
2. Against the state saved by the previous run (`ca.audit.verify.AuditorState`,
   which `hsmca audit verify --log` writes and reads too): a checkpoint smaller
   than the one verified last time, or one of the same size as the lines verified
   with another root, is a cut or a rewrite. A larger size needs the daemon's
   consistency proof from the saved root to the new one (RFC 9162 2.1.4.2): it
   proves that the lines verified before are still the first lines of the log the
   daemon now signs, without fetching them again (`ca.audit.merkle.growth`).
3. ``GET /v1/audit/entries`` for the new lines only, [saved size, new size), and
   the offline verifier's checks on them (`ca.audit.verify.check_lines`: canonical
   JSON, seq, ts, the prev chain continuing from the saved head, intents and
   outcomes continuing from the intents left open), extending the saved Merkle
   frontier leaf by leaf: every checkpoint logged among them must have the root of
   its prefix, and all of them together the root of the new checkpoint.

Only then is the new state saved, atomically. The first run is the same with an
empty state (all lines from 0). A remote run verifies only lines a checkpoint
covers; a state saved offline may hold more (lines after the last checkpoint of
a copy of the log), and while the daemon's latest checkpoint covers fewer lines
than that, the run checks that the daemon still has them, unchanged.

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
import dataclasses
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca import client
from ca.audit.cosignature import VerifierKey
from ca.audit.line import GENESIS, chain_hash
from ca.audit.merkle import HASH_SIZE, CompactRange, Growth, TreeHead, growth, needs_proof
from ca.audit.note import Checkpoint, NoteError, key_id, parse_checkpoint, verifier_key
from ca.audit.verify import (
    AuditorState,
    Failure,
    LineCheck,
    PinnedKey,
    SignedPrefix,
    Stage,
    announced,
    check_lines,
    earliest,
    followed,
    hand_overs,
    keygens,
    load_state,
    root_mismatch,
    save_state,
    say_hand_overs,
    state_origin,
)
from ca.audit.witnessed import Witnessed, assess
from ca.config import NODE_NAME

PAGE = 1000  # the most lines /v1/audit/entries returns per request
CUT = "the log was cut or rewritten since it was verified last time"


@dataclass(frozen=True)
class RemoteResult:
    ok: bool
    lines: int  # lines verified, now or before (or examined, on failure)
    fetched: int  # lines this run fetched and checked
    checkpoints: int  # checkpoints whose signature and root were verified by this run
    bad_seq: int | None  # the first failing line; None if ok or the failure has no line
    reason: str | None
    new_state: dict[str, Any] | None  # saved by verify_remote when ok
    note: str | None = None  # what an auditor should know about an ok result
    witnessed: Witnessed | None = None  # the witnesses' cosigned checkpoint, when ok
    # The daemon's witnesses that fail to cosign (down, misconfigured), in its words:
    # the newest lines are not witnessed. A refusal fails the run instead.
    witness_trouble: tuple[str, ...] = ()


class DaemonError(Exception):
    """The daemon answered something malformed (not a verdict about a line)."""


async def verify_remote(url: str, ssl_ctx: ssl.SSLContext, public_key: Ed25519PublicKey,
                        state_path: str | os.PathLike[str], *,
                        origin: str | None = None, log: str | None = None,
                        witness_keys: list[VerifierKey] | None = None,
                        locate: bool = True) -> RemoteResult:
    """Verify the daemon at `url` from the state in `state_path` (created if missing).

    `ssl_ctx` carries an auditor or admin client certificate. The state is replaced
    only when everything verified. Raises `ca.client.ClientError` when the daemon
    cannot be asked (unreachable, 403, ...) and ValueError for a malformed state
    file (the auditor's own file, not evidence about the log). `log`: the node whose
    log to verify, on a cluster (any node serves every node's log). Then the
    witnesses' cosigned checkpoint is judged against the verified tree
    (ca.audit.witnessed, `witness_keys` the pinned ones): one the audit key signed and
    the tree does not extend fails the run. `locate`: where lines verified before were
    changed, read them again to name where (`_located`); a caller that knows the log
    failed already (the web view, every few seconds) says False.
    """
    raw = load_state(state_path)
    async with aiohttp.ClientSession(timeout=client.TIMEOUT) as session:
        api = LogClient(session, url.rstrip("/"), ssl_ctx, log)
        # The witnesses' checkpoint first: then the latest checkpoint, fetched after it,
        # is at least as new, and the tree verified covers it. Fetched after, a checkpoint
        # cosigned meanwhile was newer than the tree, and a busy CA read as unwitnessed
        # (a review: 4 runs in 40).
        try:
            cosigned: str | client.ClientError | None = await api.cosigned()
        except client.ClientError as exc:
            cosigned = exc
        try:
            result = await _run(api, public_key, raw, origin, locate)
        except DaemonError as exc:
            result = RemoteResult(False, 0, 0, 0, None, str(exc), None)
        except client.ClientError as exc:
            # The lines near a damaged one are not served (503): the daemon's verdict,
            # said as one. A run whose saved state ended among them failed with the
            # bare 503 instead (a test flaked on where the last checkpoint fell).
            if exc.status != 503:
                raise
            unanswered = RemoteResult(False, 0, 0, 0, None, str(exc), None)
            result = await _rewritten_on_disk(api, unanswered, fetched=False)
            if result is unanswered:  # the daemon names no damage: not its verdict
                raise
        if result.ok:
            result = await _rewritten_on_disk(api, result)
        if result.ok and result.new_state is not None:
            result = await _witnessed(api, result, public_key, origin, witness_keys or [],
                                      cosigned)
        if result.ok:
            result = await _witness_report(api, result, witness_keys or [])
    if result.ok and result.new_state is not None:
        save_state(state_path, result.new_state)
    return result


async def _rewritten_on_disk(api: LogClient, result: RemoteResult,
                             fetched: bool = True) -> RemoteResult:
    """`result`, failed if the daemon says a line of its log file was rewritten.

    An incremental run reads only new lines, and the tiles, whence the proofs come,
    still hold the old line's hash: a line rewritten on disk in place is served
    as the log's and passes (auditor trial). The daemon reads its lines under the
    tiles again in the background, and stops signing when one no longer matches
    (`AuditLog.check_on_disk`); an auditor's run must not say OK meanwhile. A daemon
    that says so falsely only makes the run fail."""
    found = await api.damage()
    if found is None:
        return result
    seq, said = found
    if seq is None:
        # The file cut, appended to or replaced: the daemon serves what it wrote, which
        # verifies, while its file holds something else (a web view was green beside it).
        return RemoteResult(False, result.lines, result.fetched, result.checkpoints, None, (
            f"the daemon reports its log file changed by something other than hsmca: "
            f"{said}. The lines it serves are what it wrote, and verified; an offline "
            "verification of a copy of the file (hsmca audit verify --log) names what "
            "changed"), None)
    # In the daemon's own words: a line rewritten, or lines its damaged tiles no longer
    # let it check, which is not a rewrite (a review: every kind was called one here).
    then = ("The lines this run fetched verified" if fetched else
            "It serves none of the lines near it meanwhile")
    return _failed(Failure(seq, Stage.LINE, (
        f"the daemon reports its log file damaged at line {seq}: {said}. {then}; an "
        "offline verification of a copy of the log (hsmca audit verify --log) names what "
        "changed")), result.lines, result.fetched, result.checkpoints)


async def _witnessed(api: LogClient, result: RemoteResult, public_key: Ed25519PublicKey,
                     origin: str | None, witness_keys: list[VerifierKey],
                     text: str | client.ClientError | None) -> RemoteResult:
    """`result` with what the witnesses vouch for, or failed if the audit key signed a
    cosigned checkpoint the verified tree does not extend."""
    assert result.new_state is not None
    pinned = PinnedKey(public_key, state_origin(result.new_state) or origin or "", origin)
    tree = AuditorState.parse(result.new_state, pinned).seen

    async def proof(old: int, size: int) -> list[bytes]:
        try:
            return await api.consistency(old, size)
        except DaemonError as exc:
            raise client.ClientError(str(exc)) from None

    if isinstance(text, client.ClientError):
        return dataclasses.replace(result, witnessed=Witnessed(problem=str(text)))
    seen = await assess(text, tree, followed(result.new_state, pinned), witness_keys, proof,
                        api.log)
    if (fork := seen.forked(tree)) is not None:
        return _failed(Failure((seen.size or 1) - 1, Stage.PREFIX, fork), result.lines,
                       result.fetched, result.checkpoints)
    return dataclasses.replace(result, witnessed=seen)


async def _witness_report(api: LogClient, result: RemoteResult,
                          witness_keys: list[VerifierKey]) -> RemoteResult:
    """`result`, failed if the daemon says a witness the auditor pins (`witness_keys`)
    refused its log (it saw another one: this one was cut, rewritten or put back from a
    backup since), with the witnesses that fail to cosign otherwise. The cosigned
    checkpoint alone does not show it: a log put back from a backup carries the
    cosigned checkpoint of its day, which the log extends, and an auditor's run said OK
    while every witness refused. A refusal is the witness's word relayed, not signed:
    one by a witness not pinned (or not known to sign with a pinned key) is said beside
    the OK, as a claim (a trial's fake witness made every auditor's run fail)."""
    standing = await api.witnesses()
    if isinstance(standing, str):  # another node's log, on a cluster: said, not checked
        said = f"whether this log's witnesses refused it is not checked: {standing}"
        return dataclasses.replace(result, note=f"{result.note}; {said}" if result.note
                                   else said)
    pinned = {f"{k.name}+{k.key_id.hex()}" for k in witness_keys}
    refused = [w for w in standing if w.get("state") == "refused"
               and w.get("signer") in pinned]
    if refused:
        said = "; ".join(_standing(w) for w in refused)
        return RemoteResult(False, result.lines, result.fetched, result.checkpoints, None, (
            f"{said}. A refusal means the log the daemon signs does not extend what that "
            "witness saw: it was cut, rewritten or put back from a backup since (GET "
            "/v1/audit/witnesses; docs/audit-log.md, \"When a witness refuses\")"), None)
    trouble = tuple(_standing(w) for w in standing if w.get("state") == "failing") + tuple(
        f"{_standing(w)} (a claim: not a witness you pin with --witness-key"
        + (f"; it cosigns as {str(w['signer'])[:200]}" if w.get("signer") else
           "; the key it cosigns with is not known") + ")"
        for w in standing if w.get("state") == "refused" and w.get("signer") not in pinned)
    return dataclasses.replace(result, witness_trouble=trouble) if trouble else result


def _standing(w: dict[str, Any]) -> str:
    """A witness's entry of GET /v1/audit/witnesses, said (its fields are the daemon's:
    printed as text, bounded)."""
    def field(name: str) -> str:
        return str(w.get(name))[:300]

    verb = "refused" if w.get("state") == "refused" else "did not cosign"
    last = (f"; it last cosigned the checkpoint of {field('cosigned')} lines at "
            f"{field('cosigned_at')}" if w.get("cosigned") is not None else
            "; it has not cosigned since the daemon started")
    count = w.get("failures")
    return (f"witness {field('witness')} {verb} the checkpoint of {field('checkpoint')} "
            f"lines ({field('reason')}: {field('error')}), {count if type(count) is int else '?'}"
            f" time{'' if count == 1 else 's'} since {field('since')}{last}")


async def list_logs(url: str, ssl_ctx: ssl.SSLContext) -> list[str | None]:
    """The logs the daemon serves: every node's name on a cluster, [None] for a daemon
    with one log (or one that predates `GET /v1/audit/logs`)."""
    async with aiohttp.ClientSession(timeout=client.TIMEOUT) as session:
        try:
            raw = await client.get_bytes(session, url.rstrip("/") + "/v1/audit/logs", ssl_ctx)
        except client.ClientError as exc:
            if exc.status == 404:
                return [None]
            raise
    try:
        names = [entry["name"] for entry in json.loads(raw)["logs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise client.ClientError(f"the daemon's list of logs is malformed: {exc}") from None
    if not all(n is None or isinstance(n, str) for n in names) or not names:
        raise client.ClientError("the daemon's list of logs is malformed")
    if None in names and len(names) > 1:
        raise client.ClientError("the daemon's list of logs mixes an unnamed log with named "
                                 "ones")
    for name in names:
        # A name becomes part of a state file's name (log_state_path): never a path.
        if name is not None and name != "init" and not NODE_NAME.fullmatch(name):
            raise client.ClientError(f"the daemon's list of logs names {name[:64]!r}, which "
                                     "is not a node name")
    return names


def logs_gone(state: Path, names: list[str | None]) -> str | None:
    """Why the logs listed do not continue what the saved states verified, or None.
    Every log verified before must still be listed (a node's log is served by every
    node for good, stopped or not), and a single log's state continues only as init's.
    Else a server could list a log of a new name, which is verified from nothing, and
    leave out the one that was cut (an auditor trial: a log cut from 6010 lines to 122
    was OK under the name `evil`)."""
    from ca.audit.cluster import CEREMONIES
    if state.is_file() and CEREMONIES not in names:
        return (f"{state} is the state of a single log, and the daemon now lists the logs "
                f"{', '.join(str(n) for n in names)} without {CEREMONIES!r} (which a single "
                "node's log becomes when the CA moves to PostgreSQL): the log verified last "
                "time is not served")
    head, tail = f"{state.stem}.", state.suffix
    for path in sorted(state.parent.glob(f"{head}*{tail}")):
        node = path.name[len(head):len(path.name) - len(tail)]
        if (node == CEREMONIES or NODE_NAME.fullmatch(node)) and \
                path == log_state_path(state, node) and node not in names:
            return (f"log {node} was verified before ({path}) and the daemon no longer lists "
                    "it: every node's log stays served, so it was removed or replaced")
    return None


def log_state_path(state: Path, log: str | None) -> Path:
    """Where the auditor's state for `log` is kept: `state` itself for a single node's
    one log; on a cluster one file per node's log beside it (auditor.NODE.state), so
    `hsmca audit verify --url` and `hsmca ui` continue each other's."""
    return state if log is None else state.with_name(f"{state.stem}.{log}{state.suffix}")


# ---- talking to the daemon ------------------------------------------------------------------


@dataclass
class LogClient:
    """A daemon's audit log over its API, as an auditor reads it (`hsmca audit verify
    --url`, `hsmca audit prove`): answers that do not parse raise DaemonError."""

    session: aiohttp.ClientSession
    base: str
    ctx: ssl.SSLContext
    log: str | None = None  # a cluster node's log (?log=); None: the daemon's own

    async def get(self, path: str) -> bytes:
        if self.log is not None:
            path += ("&" if "?" in path else "?") + "log=" + quote(self.log, safe="")
        return await client.get_bytes(self.session, self.base + path, self.ctx)

    async def damage(self) -> tuple[int | None, str] | None:
        """The first line of its own log file the daemon says is damaged
        (`audit_damaged_seq` in /health, answered with 200 or 503), or None for the
        line when it says the file was cut, appended to or replaced under it
        (`audit_file_changed`), with what its `audit` part says of it, if any."""
        try:
            async with self.session.get(self.base + "/health", ssl=self.ctx) as r:
                body = json.loads(await r.read())
        except (aiohttp.ClientError, ValueError):
            return None  # a daemon that cannot say: the proofs are the verdict
        if not isinstance(body, dict) or body.get("audit_damaged_log") != self.log:
            return None  # on a cluster, the answering node's own log only
        seq = body.get("audit_damaged_seq")
        if (type(seq) is not int or seq < 0) and body.get("audit_file_changed") is not True:
            return None
        said = str(body.get("audit", ""))[:1000]
        for prefix in ("unavailable: ", "cannot write the audit log: "):
            said = said.removeprefix(prefix)
        return (seq if type(seq) is int and seq >= 0 else None), said

    async def cosigned(self) -> str | None:
        """The latest checkpoint witnesses cosigned; None before any did. A node serves
        only its own log's (whatever `log` is)."""
        try:
            raw = await client.get_bytes(self.session, self.base +
                                         "/v1/audit/checkpoint.cosigned", self.ctx)
        except client.ClientError as exc:
            if exc.status == 404:
                return None
            raise
        return raw.decode("utf-8", "replace")

    async def witnesses(self) -> list[dict[str, Any]] | str:
        """Where the daemon's witnesses stand (GET /v1/audit/witnesses), for the log
        asked: [] from a daemon that predates it; on a cluster, for another node's log
        than the answering node's, why it cannot say (each node's witnesses follow its
        own log)."""
        try:
            raw = await self.get("/v1/audit/witnesses")
        except client.ClientError as exc:
            if exc.status == 404:
                return []
            raise
        try:
            doc = json.loads(raw)
            found = doc["witnesses"]
            if found is None and isinstance(doc.get("kept_by"), str):
                return str(doc.get("detail") or f"kept by node {doc['kept_by']}")[:300]
            if not isinstance(found, list) or not all(isinstance(w, dict) for w in found):
                raise TypeError("not a list of objects")
        except (ValueError, KeyError, TypeError) as exc:
            raise DaemonError(f"the daemon's /v1/audit/witnesses is not its witnesses: "
                              f"{exc}") from None
        return found

    async def checkpoint(self) -> str:
        try:
            return (await self.get("/v1/audit/checkpoint")).decode("utf-8")
        except UnicodeDecodeError:
            raise DaemonError("the daemon's checkpoint is not UTF-8 text") from None

    async def entries(self, start: int, stop: int) -> bytes:
        """Lines [start, stop) byte for byte, in pages; fewer if the daemon has fewer."""
        pages: list[bytes] = []
        seq = start
        while seq < stop:
            limit = min(PAGE, stop - seq)
            page = await self.get(f"/v1/audit/entries?start={seq}&limit={limit}")
            count = page.count(b"\n")
            if count > limit:
                raise DaemonError(f"the daemon returned {count} lines from seq {seq} when "
                                   f"asked for at most {limit}")
            pages.append(page)
            if count == 0 or not page.endswith(b"\n"):
                break  # the daemon has no more (or a torn line): the verifier says which
            seq += count
        return b"".join(pages)

    async def inclusion(self, index: int, size: int) -> list[bytes]:
        return self._hashes(await self.get(f"/v1/audit/proof/inclusion?index={index}&size="
                                           f"{size}"), f"inclusion proof of line {index} in "
                            f"{size} lines", index=index, size=size)

    async def consistency(self, old: int, size: int) -> list[bytes]:
        return self._hashes(await self.get(f"/v1/audit/proof/consistency?old={old}&size="
                                           f"{size}"), f"consistency proof from {old} to "
                            f"{size} lines", old=old, size=size)

    @staticmethod
    def _hashes(raw: bytes, what: str, **asked: int) -> list[bytes]:
        """A proof's hashes, from an answer that must be for what was `asked`."""
        try:
            body = json.loads(raw)
            if any(body[k] != v for k, v in asked.items()):
                raise ValueError("it is for " + ", ".join(f"{k}={body[k]!r}" for k in asked))
            return [base64.b64decode(h, validate=True) for h in body["proof"]]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise DaemonError(f"the daemon's {what} is malformed: {exc}") from None


# ---- the state ------------------------------------------------------------------------------


def _load(raw: dict[str, Any], public_key: Ed25519PublicKey, origin: str | None
          ) -> tuple[str, AuditorState, SignedPrefix | None]:
    """(key name, what this run continues from, the signed prefix to check again).

    A state written by the first version of the offline verifier recorded only a
    checkpoint: the run then starts from line 0 and checks that the checkpoint's
    lines still have its root.
    """
    name = state_origin(raw)  # the daemon names its key after the origin
    if name is None:
        raise ValueError("state must have a checkpoint (a signed note)")
    state = AuditorState.parse(raw, PinnedKey(public_key, name, origin))
    if not state.continuable:
        return name, AuditorState.empty(), state.signed
    return name, state, None


def _same_log(raw: dict[str, Any], served: str) -> None:
    """ValueError (the state file's, not the log's) if the state is another log's: said
    so, as the offline verifier does, not as a checkpoint that does not verify with a
    hint about rotated keys (an auditor's trial)."""
    saved = state_origin(raw)
    try:
        now = parse_checkpoint(served).origin
    except NoteError:
        return  # the run says what is wrong with the daemon's checkpoint
    if saved is not None and saved != now:
        raise ValueError(f"the state file is for the log {saved[:100]!r}, not this one "
                         f"({now[:100]!r}, as the daemon's checkpoint says): another CA's, "
                         "or another log's?")


# ---- the run --------------------------------------------------------------------------------


def _failed(failure: Failure, lines: int, fetched: int = 0, checkpoints: int = 0
            ) -> RemoteResult:
    return RemoteResult(False, lines, fetched, checkpoints, failure.seq, failure.reason, None)


async def _run(api: LogClient, public_key: Ed25519PublicKey, raw: dict[str, Any] | None,
               origin: str | None, locate: bool = True) -> RemoteResult:
    text = await api.checkpoint()
    if raw is None:
        name, old, prior = origin, AuditorState.empty(), None
    else:
        _same_log(raw, text)
        name, old, prior = _load(raw, public_key, origin)
    if name is None:  # first run, no --origin: the daemon's checkpoint names its key
        try:
            name = parse_checkpoint(text).origin
        except NoteError as exc:
            return RemoteResult(False, 0, 0, 0, None,
                                f"the daemon's latest checkpoint is malformed: {exc}", None)
    key = PinnedKey(public_key, name, name)
    if raw is not None:
        key = followed(raw, key)
    known = {key_id(name, k).hex() for k in key.trusted()}  # trusted before this run
    data: bytes | None = None
    try:
        latest = key.verify(text)
    except NoteError as exc:
        # Signed by a key the log handed over to since the last run (docs/keys.md)? The
        # hand-over is among the new lines, signed by a key trusted already.
        try:
            claimed = parse_checkpoint(text)
        except NoteError:
            claimed = None
        if claimed is not None and claimed.size > old.size:
            data = await api.entries(old.size, claimed.size)
            key = key.discover(data[:data.rfind(b"\n") + 1], old.size)
        try:
            latest = key.verify(text)
        except NoteError:
            return RemoteResult(False, old.size, 0, 0, None,
                                f"the daemon's latest checkpoint does not verify: {exc}", None)

    signed_before = prior.size if prior is not None else old.signed.size
    if latest.size < signed_before:
        return _failed(Failure(latest.size, Stage.LINE, (
            f"{CUT}: the daemon's latest checkpoint covers {latest.size} lines, the one "
            f"verified last time {signed_before}")), latest.size)
    if latest.size < old.size:
        return await _behind(api, old, latest, text)
    now = TreeHead(latest.size, latest.root)
    proof = await api.consistency(old.size, latest.size) if needs_proof(old.seen, now) else []
    verdict = growth(old.seen, now, proof)
    if verdict is Growth.FORKED and latest.size == old.size:
        return await _located(api, key, old.size, old.root, locate, Failure(
            max(old.size - 1, 0), Stage.PREFIX, (
                f"{CUT}: the daemon's latest checkpoint covers the same {old.size} lines "
                "with a different root")), old.frontier)
    if verdict is Growth.FORKED:
        return await _located(api, key, old.size, old.root, locate, Failure(
            old.size - 1, Stage.PREFIX, (
                f"{CUT}: the daemon's consistency proof from {old.size} to {latest.size} "
                f"lines does not verify against the root verified last time, so the first "
                f"{old.size} lines are no longer those verified")), old.frontier)
    if verdict is Growth.SAME:
        old.checkpoint, old.signed = text, SignedPrefix(latest.size, latest.root, text)
        return RemoteResult(True, old.size, 0, 1, None, None, old.to_json())
    if data is None:
        data = await api.entries(old.size, latest.size)
    key = key.discover(data[:data.rfind(b"\n") + 1], old.size)
    return await _check_new_lines(api, data, old, prior, latest, text, key, known)


# The most lines read again, from the first, to find where a log verified before was
# changed (the lines verified last time, no more): beyond, the run says how to find it.
LOCATE_LINES = 1_000_000


async def _located(api: LogClient, key: PinnedKey, size: int, root: bytes, locate: bool,
                   failure: Failure, saved: CompactRange | None = None) -> RemoteResult:
    """`failure` (the first `size` lines verified last time are no longer those), with
    where the change is. The state keeps the tree's root, not the lines, so those
    `size` lines are read again as served now, from the first, and checked on their
    own: the first line that fails, or the span the first checkpoint among them that no
    longer verifies shows the change in, or the lines after the last one that does.
    Before, the run named only the last line verified last time (a review). The verdict
    never depends on this reading: if it fails, the failure stands as it is."""
    if not locate or size == 0:
        return _failed(failure, size)
    if size > LOCATE_LINES:
        return _failed(failure._replace(reason=(
            f"{failure.reason}. Keep the state file: it is the evidence. To find the line "
            "changed, verify a copy of the log from before the change offline "
            "(hsmca audit verify --log)")), size)
    try:
        data = await api.entries(0, size)
    except (client.ClientError, DaemonError) as exc:
        return _failed(failure._replace(reason=(
            f"{failure.reason} (where, this run cannot tell: reading those lines again "
            f"failed: {exc})")), size)
    end = data.rfind(b"\n") + 1
    found = check_lines(data[:end], 0, GENESIS, {}, key.discover(data[:end], 0))
    where = found.failure
    if where is None and found.lines < size:
        where = Failure(found.lines, Stage.LINE, f"the daemon serves only {found.lines} of "
                        f"the {size} lines verified last time")
    frontier = CompactRange()
    roots = _grow(frontier, found, {cp.size for cp in found.checkpoints})
    vouched = 0  # lines a checkpoint among them vouches for: the change is after them
    for cp in found.checkpoints:
        if cp.size not in roots:
            continue
        if roots[cp.size] != cp.root:
            # (named by the span's first line: the checkpoint's own line is unchanged)
            span = root_mismatch(cp.seq, cp.size, vouched)
            first = vouched if 0 < vouched < cp.size else 0
            where = earliest(where, Failure(first, span.stage, span.reason))
            break
        vouched = max(vouched, cp.size)
    if where is None and found.good == size and saved is not None \
            and frontier.size == saved.size == size:
        # The state's own record of those lines (its frontier: one hash per perfect
        # subtree) bounds the change, whatever checkpoints were signed since: a CA
        # restored from a backup signs new ones over the changed lines, and the run
        # named the restored run's checkpoint as the place (an auditor's trial).
        start = 0
        for served, kept in zip(frontier.hashes, saved.hashes, strict=True):
            length = 1 << ((size - start).bit_length() - 1)
            if served != kept:
                where = Failure(start, Stage.PREFIX, (
                    f"a line from seq {start} to {start + length - 1} was altered and the "
                    "lines after it chained again to hide it (the state file's record of "
                    "the lines verified last time shows the change in that span; a "
                    "checkpoint among them signed since does not vouch for them: a CA "
                    "restored from a backup older than those lines signs new ones); "
                    "which line, a copy of the log from before the change tells"))
                break
            start += length
    if where is None and found.good == size:
        if frontier.root() == root:
            return _failed(failure._replace(reason=(
                f"{failure.reason}. Yet the {size} lines it serves now are those verified "
                "last time: its latest checkpoint commits to other lines than these (its "
                "log forked after them, or its proof is wrong)")), size)
        # (Checkpoints among them that verify vouch for their lines unless they were
        # signed again after the change, with the audit key: said, not assumed)
        before = (f": after the checkpoint of the first {vouched} lines, unless that "
                  "checkpoint was signed again after the change with the audit key"
                  if vouched else "")
        where = Failure(vouched, Stage.PREFIX, (
            f"a line from seq {vouched} to {size - 1} was altered (no checkpoint among "
            f"them shows it{before}) and the lines after it chained again to hide it; "
            "which one, a copy of the log from before the change tells"))
    if where is None:
        return _failed(failure, size)
    return _failed(Failure(where.seq, failure.stage, (
        f"{failure.reason}. Read again from its first line, the log the daemon serves now "
        f"fails at seq {where.seq}: {where.reason}")), size)


async def _behind(api: LogClient, old: AuditorState, latest: Checkpoint, text: str
                  ) -> RemoteResult:
    """The daemon's latest checkpoint covers fewer lines than were verified before.

    That happens when the state was saved by the offline verifier from a copy of the
    log whose last lines no checkpoint covered yet (the closing lines of a stopped
    daemon, or lines accepted as unsigned). No signature covers them yet, but the
    daemon must still have them: it serves them, and its consistency proof from its
    latest checkpoint to them verifies against the root saved last time.
    """
    size, seen = latest.size, old.size
    data = await api.entries(size, seen)
    served = data.count(b"\n", 0, data.rfind(b"\n") + 1)
    if served < seen - size:
        return _failed(Failure(size + served, Stage.LINE, (
            f"{CUT}: {seen} lines were verified last time, the daemon has only "
            f"{size + served}")), size + served)
    proof = await api.consistency(size, seen)
    if growth(TreeHead(size, latest.root), old.seen, proof) is not Growth.EXTENDS:
        return _failed(Failure(seen - 1, Stage.PREFIX, (
            f"{CUT}: the daemon's consistency proof from its latest checkpoint ({size} lines) "
            f"to the {seen} lines verified last time does not verify, so they are no longer "
            "those verified")), seen)
    if size > old.signed.size:
        old.checkpoint, old.signed = text, SignedPrefix(size, latest.root, text)
    return RemoteResult(True, seen, 0, 1, None, None, old.to_json(), note=(
        f"the daemon's latest checkpoint covers {size} of the {seen} lines verified; the "
        f"other {seen - size} are still there unchanged, but no checkpoint signs them yet"))


def _grow(frontier: CompactRange, found: LineCheck, wanted: set[int]) -> dict[int, bytes]:
    """`frontier` extended over the lines of `found` that passed; the root at each size
    in `wanted` it passes."""
    roots = {}
    for k in range(found.good):
        frontier.append(found.leaves[k * HASH_SIZE:(k + 1) * HASH_SIZE])
        if frontier.size in wanted:
            roots[frontier.size] = frontier.root()
    return roots


async def _check_new_lines(api: LogClient, data: bytes, old: AuditorState,
                           prior: SignedPrefix | None, latest: Checkpoint, text: str,
                           key: PinnedKey, known: set[str]) -> RemoteResult:
    """Lines [old.size, latest.size) as served (`data`), continuing from `old`."""
    start = old.size
    end = data.rfind(b"\n") + 1  # complete lines; anything after is a torn line
    open_seqs = {op: seq for op, (seq, _) in old.open_intents.items()}
    assert old.head is not None and old.frontier is not None  # `_load` saw to it
    found = check_lines(data[:end], start, old.head, open_seqs, key)
    n, failure = found.lines, found.failure

    # Extend the frontier over the lines that passed, noting the root at every size a
    # checkpoint among them (or a prefix saved by the offline verifier) vouches for.
    wanted = {cp.size for cp in found.checkpoints if cp.size > start}
    if prior is not None:
        wanted.add(prior.size)
    frontier = old.frontier.copy()
    roots = {start: old.root, **_grow(frontier, found, wanted)}

    count = 0
    vouched = old.size  # lines a run or a checkpoint verified: a change is after them
    for cp in found.checkpoints:
        proved = cp.size not in roots
        if not proved:
            ok = roots[cp.size] == cp.root
        else:  # logged late, covering fewer lines than were verified before: ask for a proof
            # (sizes above `start` are all in `roots`: a checkpoint covers only lines before
            # its own, and those passed)
            then = TreeHead(cp.size, cp.root)
            proof = await api.consistency(cp.size, start) if needs_proof(then, old.seen) else []
            ok = growth(then, old.seen, proof) in (Growth.SAME, Growth.EXTENDS)
        if not ok:
            # (the lines a previous run verified are vouched for: from there on)
            failure = earliest(failure, root_mismatch(cp.seq, cp.size, vouched, proved))
            break  # in log order: the first mismatch is the one to report
        count += 1
        vouched = max(vouched, cp.size)
    if prior is not None and prior.size in roots and roots[prior.size] != prior.root:
        failure = earliest(failure, Failure(prior.size - 1, Stage.PREFIX, (
            f"rewritten: the first {prior.size} lines no longer match the checkpoint verified "
            "last time")))

    if failure is None and n < latest.size - start:
        failure = Failure(start + n, Stage.LINE, (
            "torn line: the daemon served a line without its newline" if data[end:] else
            f"truncated: the daemon's checkpoint covers {latest.size} lines but it served only "
            f"{start + n}"))
    if failure is None and frontier.root() != latest.root:
        failure = Failure(start, Stage.PREFIX, (
            f"the lines the daemon served from seq {start} to {latest.size - 1} are not those "
            f"its latest checkpoint commits to: with them the tree of {latest.size} lines does "
            "not have its root"))
    if failure is not None:
        return _failed(failure, start + found.good, n, count)

    # A daemon.start after an open intent excuses it (a crash).
    still_open = {op: (seq, old.open_intents.get(op, (seq, False))[1] or found.last_start > seq)
                  for op, seq in found.open_intents.items()}
    head = chain_hash(data[:end - 1].rsplit(b"\n", 1)[-1]) if n else old.head
    made = {**keygens(data[:end], start), **old.keygens}  # the first keygen of a key kept
    # Said once, in the run that first meets it: every checkpoint of a hand-over
    # announces the key again (a review saw each later run call it "not made in the
    # HSM", its keygen in an earlier run). What was said is kept in the state, not
    # inferred from its checkpoint, which runs that say nothing set too (a review).
    said = known | set(old.hand_overs_said)
    found = [h for h in hand_overs(data[:end], start, key.name, made)
             if h.key_id not in said]
    latest_one = announced(text, key.name, made)
    if latest_one is not None and latest_one.key_id not in said | {h.key_id for h in found}:
        found.append(latest_one)
    new = AuditorState(latest.size, latest.root, head, frontier, text,
                       SignedPrefix(latest.size, latest.root, text), still_open,
                       tuple((seq, verifier_key(key.name, k)) for seq, k in key.successors),
                       made, (*old.hand_overs_said, *(h.key_id for h in found)))
    return RemoteResult(True, latest.size, n, count + 1, None, None, new.to_json(),
                        note=say_hand_overs(found))
