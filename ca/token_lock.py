"""One CA at a time on a token: a lock on this host, held while `hsmca serve` runs.

A copy of the CA (a restored backup, a state directory copied for a rehearsal) names
the same module, token and PIN as the live CA. Started beside it, it is a second CA
on the same keys: what it issues chains to the same root, and is in neither the live
inventory nor the live log. docs/operator.md says so ("One CA at a time"), but an
operator's trial started a backup beside the live CA, and only a reassuring line came
of it. The token, as the daemon reaches it, is locked for as long as it serves.

The lock names the module, the SoftHSM configuration (which says where the token's
files are: a rehearsal on a copy of the token directory uses its own) and the token
label. It guards this host only: a second host reaching the same network HSM is the
operator's to prevent. Nodes of a cluster share their keys by design: they share the
lock (flock's shared mode), which a single node's copy of the CA cannot take beside
them. A lock file this process may only read (a read-only /run/lock) is locked all the
same. Where no lock file can be made, or the one there is another user's, the
guard is skipped: it must never keep the CA itself from starting. It is skipped out
loud (`Skipped`, which the daemon logs as a warning): the documented systemd unit once
left /run/lock read-only, and a new-user trial's restored copy then served beside the
live CA with nothing said.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ca.errors import CLIError

LOCK_DIR = Path("/run/lock")


class TokenInUse(CLIError):
    """Another `hsmca serve` on this host holds the same token."""


@dataclass(frozen=True)
class Skipped:
    """No lock was taken, so a copy of the CA started on this host is not refused:
    why, in words for the daemon's warning."""

    why: str


@dataclass(frozen=True)
class TokenLock:
    """The lock `hold_token` took: its file, the descriptor that holds it, whether it
    is shared (a cluster node's), and whether this process could write the file."""

    path: Path
    fd: int
    shared: bool = False
    writable: bool = True

    def close(self) -> None:
        """Remove the lock file, then let go of it (/run/lock keeps no file per token
        ever served: a test run made hundreds). One who opened it meanwhile finds it
        no longer at its path once it has the lock, and makes a new one. A shared lock's
        file goes only when no other holder is left (the lock taken whole, at once)."""
        last = self.writable
        if last and self.shared:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                last = False  # another node holds it still
        if last:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)


def hold_token(module: str, softhsm_conf: str | None, token: str, state_dir: Path,
               lock_dir: Path = LOCK_DIR, shared: bool = False) -> TokenLock | Skipped | None:
    """Lock the token for this process (held while it serves); Skipped where no lock
    can be taken, None where this CA's own state directory holds it (its audit log's
    lock says so); TokenInUse if another process holds it. `shared`: a cluster node's,
    which the other nodes on this host share (they use the same keys by design), and
    which a single node's copy of the CA cannot take beside them (a re-trial started a
    restored single-node backup on a node's host)."""
    conf = softhsm_conf or os.environ.get("SOFTHSM2_CONF", "")
    ident = "\0".join([os.path.realpath(module), os.path.realpath(conf) if conf else "",
                       token])
    path = lock_dir / f"hsmca-token-{hashlib.sha256(ident.encode()).hexdigest()[:24]}.lock"
    for _ in range(3):  # the file removed under us by the holder's close: again
        got = _locked(path, module, token, state_dir, shared)
        if got is None or isinstance(got, Skipped):
            return got
        fd, writable = got
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            if writable:
                said = f"{_this_ca(state_dir)}, pid {os.getpid()}\n".encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, said, 0)
            return TokenLock(path, fd, shared, writable)
        os.close(fd)
    return Skipped(f"{path} was removed again and again as it was locked")


def _this_ca(state_dir: Path) -> str:
    """How the lock file names the CA holding it: its state directory's path and inode."""
    try:
        st = os.stat(state_dir)
    except OSError:
        return f"state directory {state_dir}"
    return f"state directory {state_dir} (inode {st.st_dev}:{st.st_ino})"


LOCK_TRIES = 25  # 20 ms apart: a stopping holder's close() holds the lock for a moment
LOCK_PAUSE_S = 0.02


def _lock(fd: int, mode: int) -> None:
    """flock(`mode`), tried again for half a second while it is busy: the last node of
    a cluster to stop takes the lock whole for a moment to remove its file, and a node
    starting then was refused, or ran unguarded (a review). BlockingIOError if it stays
    busy: a holder that serves."""
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == LOCK_TRIES - 1:
                raise
            time.sleep(LOCK_PAUSE_S)  # a retry pace: flock has no timeout of its own


def _locked(path: Path, module: str, token: str, state_dir: Path, shared: bool
            ) -> tuple[int, bool] | Skipped | None:
    """The lock file, open and locked, and whether it could be opened for writing;
    Skipped where it cannot be (best effort); None where this state directory's daemon
    holds it."""
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:  # no /run/lock here, or one this user may not write
        try:
            # One the live CA made, read only (a read-only /run/lock): a lock all the
            # same, and held by the live CA, a refusal (a re-trial's copy served, told
            # only that it was not guarded)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            writable = False
        except OSError:
            return Skipped(f"{path} cannot be made ({exc.strerror or exc}): let the "
                           f"daemon's user write {path.parent} (with systemd, "
                           f"ReadWritePaths={path.parent})")
    owner = os.fstat(fd).st_uid  # (the file's, whatever becomes of its path: a review)
    if owner != os.geteuid():
        # Made by another user (/run/lock is everyone's): trusted, it would let anyone
        # who can guess its name keep the CA from starting. Only the guard is lost.
        os.close(fd)
        return Skipped(f"{path} is another user's file (uid {owner}): remove it, with the "
                       "daemon stopped")
    try:
        _lock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        try:  # held shared: by cluster nodes, the file naming the last one to start
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            holder = f"nodes of a cluster; the last to start: {holder}"
        except OSError:
            pass
        os.close(fd)
        if not shared and (holder.startswith(f"{_this_ca(state_dir)}, ") or re.fullmatch(
                rf"state directory {re.escape(str(state_dir))}, pid \d+", holder)):
            # This CA itself: its audit log's lock says so, as ever (not on a cluster,
            # where each node has a log of its own: a review). The very directory, not
            # its path: a backup restored in the place of the live CA's directory (moved
            # aside while that CA served on) took this for itself, and served unguarded
            # beside it (an operator's trial). A 0.3.6 daemon's lock names the path alone:
            # its audit log's lock decides, as it did then.
            return None
        raise TokenInUse(
            f"another hsmca serves the token {token!r} of {module} on this host ({holder}): "
            "a second CA on the same keys would issue certificates that neither its log "
            "nor its inventory holds. A copy of the CA (a restored backup) must not serve "
            "beside the CA it copies; to rehearse a restore, give the copy a copy of the "
            "token directory through its own [hsm] softhsm-conf (docs/operator.md, 'One "
            "CA at a time')") from None
    except OSError as exc:
        os.close(fd)
        return Skipped(f"{path} cannot be locked ({exc.strerror or exc})")
    return fd, writable
