"""A node's audit log in cluster mode: its lines made durable in PostgreSQL.

The local file stays the node's working copy (tiles, proofs and recovery work on it
as on a single node), but a group of lines is acknowledged only once PostgreSQL
has committed it too: the group commit is a transaction commit, so no record lives
only on one node's disk. At start the two are brought level before the log is
opened: lines PostgreSQL lacks (a crash between the file's fdatasync and the
commit: never acknowledged) are sent up, and lines the file lacks (a node rebuilt
on a new disk) are written back from PostgreSQL, which is the record; except a group
the node cut from its file because its commit failed, which PostgreSQL committed all
the same: that one is replaced by the outcomes it owes (see mirror).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ca.audit.line import ENVELOPE, GENESIS, chain_hash, line_bytes
from ca.audit.log import TILES_DIR, AuditLogError, Mirror, utc_now
from ca.audit.note import NoteError, parse_checkpoint
from ca.fileutil import write_atomic
from ca.store.errors import AuditLinesMissing, NodeNameTaken, StoreUnavailable

if TYPE_CHECKING:  # psycopg is loaded only where a cluster runs
    from ca.store.postgres import PostgresStore

log = structlog.get_logger("hsmca.audit")
# The log of the offline ceremonies (`hsmca init`, the root's rotation): kept in the
# state directory's audit/log.jsonl, and in PostgreSQL under this name. No node may
# take it (`--node init` is refused).
CEREMONIES = "init"


def log_origin(origin: str | None, log: str) -> str | None:
    """The origin a cluster's log `log` signs its checkpoints with, for a CA whose
    `[audit] origin` is `origin` (an auditor's --origin): the ceremonies' log the CA's
    own, a node's with its name after it (Config.for_node). A cluster trial's --origin
    was not checked at all, and a wrong one said OK."""
    if origin is None:
        return None
    return origin if log == CEREMONIES else f"{origin}/{log}"
COMMIT_TIMEOUT_S = 10.0
CUTS_KEPT = 256  # cut groups at one seq a marker remembers (an outage retries every second)
_PAGE = 5000


def mirror(store: PostgresStore, node: str, path: Path,
           refuse: Callable[[], str | None] = lambda: None) -> Mirror:
    """The group commit of `node`'s log in file `path`. `refuse()`: why this process may
    not write `node`'s log now (its name was taken by another process while the
    database was away), or None.

    A group that fails is cut from the file, but PostgreSQL may have committed it all
    the same (a commit given up on after COMMIT_TIMEOUT_S that went through later, or a
    connection lost after the COMMIT was sent). The node's next group replaces it
    there; should the node stop before that, the group would come back into its file
    at the next start (sync_local_log) as if it had been acknowledged, its outcomes
    not saying that their results were never released. So the group is remembered on
    disk first, and the next start replaces it with what the next group would have
    begun with: its outcomes, marked never released."""
    def commit(first_seq: int, lines: list[bytes]) -> None:
        why = refuse()
        if why is not None:
            raise NotCommitted(errno.EPERM, why)
        try:
            commit_group(store, node, first_seq, lines)
        except NotCommitted as exc:
            if isinstance(exc, DatabaseWentBack):
                _remember_went_back(path, node, exc.missing)
            _remember_cut(path, node, first_seq, lines)
            raise
    return commit


def _cut_marker(path: Path) -> Path:
    return path.with_name(path.name + ".uncommitted")


def _went_back_marker(path: Path) -> Path:
    return path.with_name(path.name + ".database-went-back")


def _remember_went_back(path: Path, node: str, missing: int) -> None:
    """Write, durably and once, that PostgreSQL lacked line `missing` of `node`'s log
    while the node ran: the next start refuses until the database holds it again (a
    restore to the latest point), or the operator moves the log aside."""
    marker = _went_back_marker(path)
    if marker.exists():
        return
    record = {"node": node, "missing_seq": missing, "found_at": utc_now()}
    try:
        write_atomic(marker, json.dumps(record).encode() + b"\n", 0o640)
    except OSError as exc:  # nothing is signed all the same; only the restart is open
        log.error("cannot remember that PostgreSQL went back in time", file=str(marker),
                  error=exc.strerror or str(exc))
    log.error("PostgreSQL lacks a line of this node's audit log that it had committed: "
              "the database went back in time; nothing is signed until the node is "
              "stopped and the database put right (docs/cluster.md, 'Restoring "
              "PostgreSQL')", node=node, missing_seq=missing)


def _refuse_a_store_found_behind(path: Path, node: str, held: int) -> None:
    """A node that found, while it ran, PostgreSQL lacking a line it had committed
    (see mirror) refuses to start until the database holds that line again: sending
    its lines up again as after a crash would not bring back what the lost commits
    did, even when its checkpoint does not cover them (_refuse_a_store_gone_back)."""
    marker = _went_back_marker(path)
    try:
        missing = json.loads(marker.read_bytes())["missing_seq"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):
        missing = None  # torn by a crash: the database went back all the same
    if isinstance(missing, int) and held > missing:
        marker.unlink()  # restored to a later point since: it holds the line again
        log.info("PostgreSQL holds the audit line it lacked again", node=node,
                 missing_seq=missing)
        return
    raise AuditLogError(
        f"node {node!r} found, while it ran, that PostgreSQL lacked line {missing} of its "
        f"audit log, which it had committed (it holds {held} lines): the database went "
        "back in time (restored from an older backup, or failed over to a lagging "
        f"replica). Refusing to start; see docs/cluster.md, 'Restoring PostgreSQL' "
        f"({marker} records it)")


def _digest(lines: list[bytes]) -> str:
    return hashlib.sha256(b"".join(line + b"\n" for line in lines)).hexdigest()


def _remember_cut(path: Path, node: str, first_seq: int, lines: list[bytes]) -> None:
    """Write, durably, which group of `node`'s lines the file is about to lose, beside
    the groups cut before it at the same seq: each may yet land in PostgreSQL (a COMMIT
    held by a lost synchronous standby lands at the cancel, and the next group, waiting
    for the node's lock, then commits too), and the marker of the last one alone did
    not match a first group that landed, whose outcomes the next start then restored as
    released (a trial). A group cut at a later seq means one went through before it:
    the earlier ones are replaced in PostgreSQL, and forgotten here."""
    marker = _cut_marker(path)
    record = {"node": node, "first_seq": first_seq, "lines": len(lines),
              "sha256": _digest(lines)}
    kept = [r for r in _cut_records(marker)
            if r.get("node") == node and r.get("first_seq") == first_seq]
    if len(kept) >= CUTS_KEPT:  # the first (the one most likely to land) and the latest
        kept = [kept[0], *kept[len(kept) - CUTS_KEPT + 2:]]
    try:
        write_atomic(marker, json.dumps([*kept, record]).encode() + b"\n", 0o640)
    except OSError as exc:  # the group still fails closed; only the restart case is open
        log.error("cannot remember the audit group PostgreSQL did not commit",
                  file=str(marker), error=exc.strerror or str(exc))


def _cut_records(marker: Path) -> list[dict[str, Any]]:
    """The cut groups a marker remembers (one object, as an older release wrote it, or
    a list); none if there is no marker, or a crash tore it."""
    try:
        value = json.loads(marker.read_bytes())
    except (FileNotFoundError, ValueError):
        return []
    return [r for r in (value if isinstance(value, list) else [value]) if isinstance(r, dict)]


def _committed_after_cut(path: Path, store: PostgresStore, node: str, have: int,
                         held: int) -> list[dict[str, Any]] | None:
    """PostgreSQL's lines past the file's `have`, parsed, if they are exactly one of the
    groups this node cut from its file because their commit failed (see mirror); else
    None (none cut, or a later group went through: the marker is stale)."""
    cut = {r.get("sha256") for r in _cut_records(_cut_marker(path)) if r.get("node") == node
           and r.get("first_seq") == have and r.get("lines") == held - have}
    if not cut:
        return None
    lines = store.audit_lines_sync(node, have, held - have)
    if _digest(lines) not in cut:
        return None
    return [json.loads(line) for line in lines]


def _owed_lines(last: bytes | None, first_seq: int, cut: list[dict[str, Any]]) -> list[bytes]:
    """The hsm.sign outcomes of a cut group as the lines the log owes for them, from
    `first_seq` on, chained to `last`: the same outcome, said never released
    (AuditLog._fail_batch owes the same)."""
    prev = chain_hash(last) if last is not None else GENESIS
    ts = utc_now()
    out: list[bytes] = []
    for line in cut:
        if line.get("event") != "hsm.sign" or line.get("phase") != "outcome":
            continue  # an intent never signed, or any other line of the failed group
        fields = {k: v for k, v in line.items() if k not in ENVELOPE}
        raw = line_bytes("hsm.sign", {**fields, "released": False}, first_seq + len(out), ts,
                         prev)
        out.append(raw)
        prev = chain_hash(raw)
    return out


class NotCommitted(OSError):
    """PostgreSQL did not make a group of lines durable: the log fails the group closed
    (an OSError, as a disk's refusal is), and says why in one line."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class DatabaseWentBack(NotCommitted):
    """PostgreSQL lacks line `missing`, which it had committed, just before the group."""

    def __init__(self, missing: int, why: str) -> None:
        super().__init__(errno.EIO, why)
        self.missing = missing


def commit_group(store: PostgresStore, node: str, first_seq: int, lines: list[bytes]) -> None:
    """Commit a group of `node`'s lines in PostgreSQL, or raise NotCommitted. A group
    not committed in time is abandoned before the caller hears of it (and cuts it from
    its file), so it can never land after the group that replaces it
    (PostgresStore.append_audit)."""
    abandoned = threading.Event()
    try:
        store.append_audit(node, first_seq, lines, abandoned, COMMIT_TIMEOUT_S
                           ).result(timeout=COMMIT_TIMEOUT_S)
    except StoreUnavailable as exc:
        abandoned.set()  # the store gave up on it (its answer timeout): as the wait below
        raise NotCommitted(errno.EIO, str(exc)) from None
    except NodeNameTaken as exc:  # the node's other process stops this one (primary.py)
        raise NotCommitted(errno.EPERM, str(exc)) from None
    except AuditLinesMissing as exc:
        # Nothing more can be signed until an operator looks: every group would find the
        # same hole. The start refuses such a database too (sync_local_log).
        raise DatabaseWentBack(exc.missing, f"{exc}; nothing is signed until this node "
                               "is stopped and the database put right: see "
                               "docs/cluster.md, 'Restoring PostgreSQL'") from None
    except TimeoutError:
        abandoned.set()
        raise NotCommitted(errno.ETIMEDOUT, "PostgreSQL did not commit the audit lines "
                           f"within {COMMIT_TIMEOUT_S:.0f} s") from None
    except Exception as exc:  # any refusal: the lines are not durable there
        why = " ".join(str(exc).split())  # psycopg puts DETAIL on a line of its own
        raise NotCommitted(errno.EIO, f"PostgreSQL refused the audit lines: {why}") from None


def publisher(store: PostgresStore, node: str) -> Callable[[int, str], Awaitable[None]]:
    """Publish each checkpoint of `node`'s log where every node serves it from."""
    async def publish(size: int, text: str) -> None:
        try:
            await store.put_audit_checkpoint(node, size, text, dt.datetime.now(dt.UTC))
        except StoreUnavailable as exc:  # the next checkpoint publishes again
            log.warning("cannot publish the checkpoint to PostgreSQL", error=str(exc))
    return publish


def complete_lines(path: Path) -> tuple[int, bytes | None, int]:
    """(lines in the file, its last complete line, bytes up to its end), reading from
    the end only: start-up must not read the whole log."""
    if not path.exists():
        return 0, None, 0
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        end = size
        block = b""
        while end > 0:
            lo = max(0, end - 65536)
            fh.seek(lo)
            block = fh.read(end - lo) + block
            cut = block.rfind(b"\n")
            if cut < 0:
                end = lo
                continue
            # The last complete line ends at `cut`; find where it starts.
            start = block.rfind(b"\n", 0, cut)
            while start < 0 and lo > 0:
                lo2 = max(0, lo - 65536)
                fh.seek(lo2)
                block = fh.read(lo - lo2) + block
                cut += lo - lo2
                lo = lo2
                start = block.rfind(b"\n", 0, cut)
            line = block[start + 1:cut]
            try:
                seq = json.loads(line)["seq"]
            except (ValueError, KeyError, TypeError, RecursionError):
                return -1, None, 0  # a torn or strange tail: the log's own recovery decides
            return int(seq) + 1, line, lo + cut + 1
    return 0, None, 0


def _refuse_a_store_gone_back(checkpoint: Path, node: str, held: int, have: int) -> None:
    """A crash between the file and the commit leaves PostgreSQL short of the lines no
    checkpoint covers yet: the node's checkpoint file is written only once the lines it
    signs, and its own intent and outcome, are committed there. PostgreSQL short of
    those lost commits it had made: it was restored from an older backup, or failed
    over to a replica that lagged. Sending the node's lines up again would not bring
    back what those commits did to the inventory (revocations, spent tokens, CRL
    numbers), and the CA would serve as if they had not happened."""
    try:
        signed = parse_checkpoint(checkpoint.read_text("utf-8")).size
    except (OSError, UnicodeError, NoteError):
        return  # none (a new disk), or unreadable: the log's own checks judge it
    if held >= min(signed + 2, have):
        return
    raise AuditLogError(
        f"PostgreSQL holds {held} lines of node {node!r}'s audit log, but the node's "
        f"checkpoint {checkpoint} signed {signed}, and a checkpoint is written only once "
        "its lines are committed there: the database went back in time (restored from "
        "an older backup, or failed over to a lagging replica). What the "
        f"{have - held} lines of the node's file ({have}) that it lacks did (revocations, "
        "spent tokens, CRL numbers) it no longer knows. Refusing to start; see "
        "docs/cluster.md, 'Restoring PostgreSQL'")


def _refuse_another_nodes_log(checkpoint: Path, node: str, origin: str) -> None:
    """A node started on a directory copied from another node (or with the wrong
    --node) was told the database went back in time, or that a line was rewritten: a
    trial went looking for a restore or tampering. The checkpoint names whose log it is."""
    try:
        found = parse_checkpoint(checkpoint.read_text("utf-8")).origin
    except (OSError, UnicodeError, NoteError):
        return  # none (a new disk), or unreadable: the log's own checks judge it
    base = origin.removesuffix(f"/{node}")
    if found == base:  # STATE_DIR/audit: the ceremonies' log (`init`, a moved CA's log)
        whose = "the CA's init log (the ceremonies' log, STATE_DIR/audit)"
    elif found != origin and found.startswith(base + "/"):
        whose = f"the audit log of node {found.removeprefix(base + '/')!r}"
    else:
        return  # its own, or another CA's (the log's own checks refuse that)
    raise AuditLogError(
        f"{checkpoint.parent} holds {whose}, not node {node!r}'s (its checkpoint's origin "
        f"is {found}): it was copied (or renamed) from there. Give this node a directory "
        f"of its own, with {checkpoint.parent} moved aside (its log comes back from "
        "PostgreSQL); nothing was written")


def sync_local_log(path: Path, checkpoint: Path, store: PostgresStore, node: str,
                   origin: str | None = None) -> None:
    """Bring the node's file and PostgreSQL level (see the module's docstring);
    `origin`, the node's checkpoint origin, to refuse another node's log."""
    if origin is not None:
        _refuse_another_nodes_log(checkpoint, node, origin)
    held = store.audit_size_sync(node)
    have, last, end = complete_lines(path)
    if have < 0:
        return
    _refuse_a_store_found_behind(path, node, held)
    _refuse_a_store_gone_back(checkpoint, node, held, have)
    lines: list[bytes] | None = None
    if have > held:  # the whole file is read only in this rare case (a crash)
        with open(path, "rb") as fh:
            lines = fh.read(end).split(b"\n")[:-1]
        if len(lines) != have:
            return  # seqs that do not count lines: the log's own checks refuse it
    # Where both have lines, the last line both hold must be the same line.
    common = min(have, held)
    if common:
        ours = last if lines is None else lines[common - 1]
        if store.audit_lines_sync(node, common - 1, 1) != [ours]:
            raise AuditLogError(
                f"the audit log {path} of node {node!r} has a line at seq {common - 1} that "
                "differs from PostgreSQL's: one of them was rewritten. Refusing to start; "
                "run `hsmca audit verify` on both")
    if lines is not None:
        # Complete lines on disk that never reached PostgreSQL: a crash between the two.
        commit_group(store, node, held, lines[held:])
        log.warning("sent audit lines PostgreSQL lacked (a crash between the file and "
                    "the commit)", node=node, first_seq=held, lines=have - held)
        return
    cut = _committed_after_cut(path, store, node, have, held) if have < held else None
    if cut is not None:
        # Never acknowledged to anyone: replaced in PostgreSQL, in one transaction, by
        # the lines the node's next group would have begun with, each outcome again
        # marked never released (its intents were never signed); they come into the
        # file below, as any line the file lacks. A crash in between leaves PostgreSQL
        # with lines the marker does not describe: the next start restores them.
        owed = _owed_lines(last, have, cut)
        store.append_audit(node, have, owed).result()
        log.warning("replaced audit lines PostgreSQL committed after this node had cut "
                    "them from its file; their outcomes are written again, as never "
                    "released", node=node, first_seq=have, lines=held - have,
                    outcomes=len(owed))
        held = have + len(owed)
    _cut_marker(path).unlink(missing_ok=True)
    if have == held:
        return
    if have == 0:
        # A node on a new disk: its log comes back from PostgreSQL; tiles and the
        # checkpoint are rebuilt from it (the checkpoint is checked against the log).
        shutil.rmtree(path.parent / TILES_DIR, ignore_errors=True)
        checkpoint.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        if have > 0:
            os.ftruncate(fd, end)
        seq = have
        while seq < held:
            page = store.audit_lines_sync(node, seq, _PAGE)
            if not page:
                break
            os.write(fd, b"".join(line + b"\n" for line in page))
            seq += len(page)
        os.fsync(fd)
    finally:
        os.close(fd)
    log.warning("restored audit lines of this node from PostgreSQL", node=node,
                from_seq=have, lines=held - have)
