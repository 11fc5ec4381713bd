"""`hsmca backup`: a consistent copy of a single node's CA, taken while it runs or not.

What the copy holds, in the order it is taken, and why that order:

1. the inventory, through SQLite's online backup (a snapshot of one moment, whatever
   the daemon commits meanwhile);
2. the latest checkpoint (and its cosigned form), then the audit log up to its last
   whole line. The log only grows, and a certificate's outcome line is durable before
   its inventory row commits, so the copied log holds every line the copied
   inventory names, and extends the copied checkpoint;
3. everything else in the state directory the CA needs to start: the config, the
   certificates, the admin and TLS credentials, the audit public key. Left out:
   what the daemon rebuilds (`run/`, `serve.url`, the audit log's tiles).

A revocation writes its audit line before it commits, and a key rotation changes the
inventory and the files apart: when either lands while the copy is taken (the copied
log says so, or a file changed), the copy is taken again, so that a restore neither
undoes a revocation its own log records nor holds an audit key its inventory does
not know. (A revocation whose line was written before the copy began and whose commit
landed after the inventory was copied escapes that look; the daemon completes every
revocation its log records when it starts on the copy: ca/revocation/from_log.py.)

The copy is then checked: every line of its log chains to the one before, the copied
checkpoint, signed by the copied audit key, covers its first lines, and that key is
one the copied inventory knows. A copy that does not check out is reported, not kept
quietly.

Not in it: the keys, which never leave the HSM (back the token up by the HSM's own
means), and the PIN, wherever `pin-source` keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from ca.audit.line import GENESIS, chain_hash
from ca.audit.log import last_newline
from ca.audit.merkle import CompactRange, leaf_hash
from ca.audit.note import Checkpoint, NoteError, verify_checkpoint
from ca.config import Config
from ca.fileutil import EndedEarly, copy_new, fsync_dir

TRIES = 5
# Audit events after which the inventory and the files may disagree for a moment.
_CHANGING = re.compile(rb'"event":"(cert\.revoke|ssh\.revoke|key\.[a-z]+|hsm\.keygen|'
                       rb'hsm\.destroy)"')
# Rebuilt by the daemon, or copied below in their own order.
_REBUILT = ("run", "serve.url", "audit/tiles")


class BackupError(Exception):
    """Why no usable backup was made: one line for the operator."""


@dataclass(frozen=True)
class Backup:
    out: Path
    certificates: int
    lines: int  # whole lines of the copied audit log
    signed: int  # of them, covered by the copied checkpoint's signature
    files: int  # the other files copied


def backup(config: Config, out: Path) -> Backup:
    if config.cluster:
        raise BackupError("this CA keeps its inventory and every node's audit log in "
                          "PostgreSQL: back that database up (pg_dump, or your PostgreSQL's "
                          "own backups) and each node's state directory; `hsmca backup` "
                          "copies a single node's SQLite CA")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if out.is_dir() and all(p.name.startswith(".partial-") for p in out.iterdir()):
            # A backup killed while it copied (kill -9, a power cut: its own clean-up
            # never ran) left only its unfinished copy (a trial was told only "exists").
            raise BackupError(f"--out {out} holds only the unfinished copy of a backup that "
                              "was stopped while it ran: remove it (it holds the admin's "
                              "key: rm -r), or name a new --out")
        raise BackupError(f"--out {out} exists and is not an empty directory; name a new one "
                          "(a backup never overwrites another)")
    state = config.state_dir
    if out.resolve().is_relative_to(state.resolve()):
        raise BackupError(f"--out {out} is inside the state directory {state}: put backups "
                          "elsewhere (each would copy the ones before it)")
    if not config.db_path.is_file():
        raise BackupError(f"{config.db_path} is missing: is {config.path} the config of a "
                          "CA that has started once?")
    made = not out.exists()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    work = out
    try:
        for attempt in range(TRIES):
            work = out / f".partial-{attempt}"
            taken = _take(config, work)
            if taken is not None:
                break
            shutil.rmtree(work)
        else:
            raise BackupError(f"the CA's keys, files or revocations changed during each of "
                              f"{TRIES} attempts to copy it; try again when no rotation or "
                              "revocation is under way")
    except BaseException as exc:
        # A copy that failed halfway holds the admin's key: it goes, and the same --out
        # can be given again (a recovery trial found both left behind on a full disk).
        shutil.rmtree(work, ignore_errors=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            where = f" (copying {exc.filename})" if exc.filename else ""
            raise BackupError(f"cannot write the backup into {out}: "
                              f"{exc.strerror or exc}{where}; nothing was kept") from None
        raise
    for entry in work.iterdir():
        entry.rename(out / entry.name)
    work.rmdir()
    fsync_dir(out)
    return Backup(out, *taken)


def _take(config: Config, work: Path) -> tuple[int, int, int, int] | None:
    """One attempt at a copy into `work`: (certificates, lines, signed, files), or None
    when the CA changed in a way the copy may have caught half of."""
    state = config.state_dir
    work.mkdir(mode=0o700)
    skip = {config.db_path, config.audit_log, config.checkpoint_path,
            config.cosigned_checkpoint_path, *(state / p for p in _REBUILT)}
    files_before = _marks(state, skip, config.db_path.name)
    log_before = config.audit_log.stat().st_size
    certificates = _inventory(config.db_path, work / config.db_path.name)
    audit = work / config.audit_log.relative_to(state).parent
    audit.mkdir(parents=True, exist_ok=True)
    for checkpoint in (config.checkpoint_path, config.cosigned_checkpoint_path):
        if checkpoint.exists():
            shutil.copy2(checkpoint, audit / checkpoint.name)
    log = audit / config.audit_log.name
    _log(config.audit_log, log)
    files = _the_rest(state, work, skip, config.db_path.name)
    # A revocation writes its line before its commit, and a key rotation changes the
    # inventory and the files apart: either one under way while the inventory was
    # copied may be half in the copy (a restore would undo the revocation, or not
    # start), so the copy is taken again.
    if _marks(state, skip, config.db_path.name) != files_before or _changed(log, log_before):
        return None
    lines, signed = _verify(config, work, log)
    return certificates, lines, signed, files


def _marks(state: Path, skip: set[Path], db_name: str) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file `_the_rest` copies."""
    marks = {}
    for path in _files(state, skip, db_name):
        st = path.lstat()
        marks[str(path)] = (st.st_size, st.st_mtime_ns)
    return marks


def _changed(log: Path, since: int) -> bool:
    """Whether the copied log's lines from byte `since` on revoke or change a key."""
    with log.open("rb") as fh:
        fh.seek(since)
        return any(_CHANGING.search(line) for line in fh)


def _damaged(db: Path, why: str) -> BackupError:
    why = " ".join(why.split())  # (SQLite's report runs over lines: the error is one)
    return BackupError(f"the inventory {db} is damaged ({why}): a copy of it would be too, "
                       "so none is kept. Keep the backups you have, stop hsmca and restore "
                       "the newest (docs/operator.md, \"Backup and restore\")")


def _inventory(db: Path, target: Path) -> int:
    source = sqlite3.connect(db, timeout=30)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # one consistent snapshot, page by page
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            # Every page of the copy read: SQLite copies a damaged page as it is, and a
            # start-guard trial's nightly backup of a damaged inventory said it was done,
            # which would have replaced the good copies with damaged ones.
            found = [str(r[0]) for r in copy.execute("PRAGMA quick_check(5)")]
            if found != ["ok"]:
                raise _damaged(db, "; ".join(found))
            return int(copy.execute("SELECT count(*) FROM certs").fetchone()[0])
        finally:
            copy.close()
    except BackupError:
        target.unlink(missing_ok=True)
        raise
    except sqlite3.Error as exc:
        target.unlink(missing_ok=True)
        if getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            raise _damaged(db, str(exc)) from None
        raise BackupError(f"cannot copy the inventory {db}: {exc}") from None
    finally:
        source.close()


def _log(log: Path, target: Path) -> None:
    """Copy the log's whole lines as they are now (a line being appended right now is
    left for the next backup)."""
    with log.open("rb") as src:
        st = os.fstat(src.fileno())
        end = last_newline(src.fileno(), st.st_size) + 1
        try:  # in the log's own mode (0640)
            copy_new(src.fileno(), end, target, stat.S_IMODE(st.st_mode))
        except EndedEarly:
            raise BackupError(f"{log} became shorter while it was copied: was it cut or "
                              "replaced?") from None


def _files(state: Path, skip: set[Path], db_name: str) -> Iterator[Path]:
    for root, dirs, names in os.walk(state):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if here / d not in skip)
        for name in sorted(names):
            path = here / name
            # The inventory's journal files belong to the live database, not the copy.
            if path not in skip and not (here == state and name.startswith(db_name + "-")):
                yield path


def _the_rest(state: Path, out: Path, skip: set[Path], db_name: str) -> int:
    copied = 0
    for path in _files(state, skip, db_name):
        target = out / path.relative_to(state)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target, follow_symlinks=False)
        if not target.is_symlink():
            with target.open("rb") as fh:
                os.fsync(fh.fileno())
        copied += 1
    for directory in sorted({p for p in out.rglob("*") if p.is_dir()}):
        shutil.copystat(state / directory.relative_to(out), directory)
        fsync_dir(directory)
    return copied


def _verify(config: Config, out: Path, log: Path) -> tuple[int, int]:
    """Check the copy as the daemon started on it would, and more: every line chains to
    the one before it (the whole log, not only the tail start reads), and the copied
    checkpoint, signed by the copied audit key, covers the copy's first lines.
    Auditors pin the key the log began with; after a rotation that is not the key in
    the state directory, so this checks the copy, not the CA's whole history."""
    key_pem = out / config.audit_key_pem.relative_to(config.state_dir)
    try:
        key = load_pem_public_key(key_pem.read_bytes())
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read the copied audit public key {key_pem}: {exc}") from None
    # What the daemon's start checks first: the key is one the copied inventory knows.
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with contextlib.closing(sqlite3.connect(out / config.db_path.name)) as db:
        known = {row[0] for row in db.execute(
            "SELECT fingerprint FROM ca_keys WHERE kind = 'audit' AND state != 'destroyed'")}
    if known and hashlib.sha256(spki).hexdigest() not in known:
        raise BackupError(f"the copied audit key {key_pem} is not one the copied inventory "
                          "knows: was the audit key rotated during the backup? try again")
    checkpoint = log.parent / config.checkpoint_path.name
    signed: Checkpoint | None = None
    if checkpoint.exists():
        try:
            text = checkpoint.read_text("utf-8")
            signed = verify_checkpoint(text, text.split("\n", 1)[0], key)  # type: ignore[arg-type]
        except (OSError, UnicodeDecodeError, NoteError) as exc:
            raise BackupError(f"the copied checkpoint does not verify with {key_pem}: {exc}; "
                              f"run `hsmca audit verify` on {config.audit_log}") from None
    tree, prev, lines, root = CompactRange(), GENESIS, 0, None
    with log.open("rb") as fh:
        for raw in fh:
            line = raw[:-1]
            try:
                said = json.loads(line).get("prev")
            except (ValueError, AttributeError):
                said = None
            if said != prev:
                raise BackupError(f"line seq {lines} of the copied audit log does not chain "
                                  f"to the line before it; the copy is in {out}: run `hsmca "
                                  f"audit verify` on {config.audit_log}")
            prev = chain_hash(line)
            tree.append(leaf_hash(line))
            lines += 1
            if signed is not None and lines == signed.size:
                root = tree.root()
    if signed is not None and (signed.size > lines or (signed.size and root != signed.root)):
        raise BackupError(f"the copied audit log ({lines} lines) does not hold what the "
                          f"copied checkpoint signed ({signed.size} lines); the copy is in "
                          f"{out}: run `hsmca audit verify` on {config.audit_log}")
    return lines, signed.size if signed is not None else 0
