"""Small file helpers: atomic replacement, private files, explicit modes."""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ca.errors import CLIError


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace `path` so that readers see the old or the new content, never a mix,
    and the new content survives a crash once this returns."""
    write_atomic_together([(path, data, mode)])


@functools.cache
def _said_plainly(kind: type[OSError]) -> type[OSError]:
    """`kind` whose text is its `said` alone, without "[Errno N]": still caught as
    `kind`, with its errno (a full disk is told apart by it) and its strerror (which
    callers put after their own words)."""
    return type(kind.__name__, (kind,), {
        "__str__": lambda self: getattr(self, "said", "") or OSError.__str__(self)})


def _failed(path: Path, doing: str, exc: OSError) -> OSError:
    """The error said by the file's own name, not by the temporary file beside it (an
    operator's trial read `[Errno 2] No such file or directory:
    '/x/.server.pem._mccd0ta'`)."""
    why = exc.strerror or str(exc)
    if isinstance(exc, FileNotFoundError) and not path.parent.is_dir():
        why = f"its directory {path.parent} does not exist"
    failed = _said_plainly(type(exc))(exc.errno or 0, why, str(path))
    failed.said = f"cannot {doing} {path}: {why}"  # type: ignore[attr-defined]
    return failed


def write_atomic_together(files: Sequence[tuple[Path, bytes | str, int]]) -> None:
    """Replace several files (`path, data, mode`) that belong together, a key and its
    certificate: every new content is written and flushed beside its file before any
    file is replaced, so a failed write (a full disk) leaves all of them old, never a
    new key beside the old certificate. Only a crash or a failed rename (a directory
    in a file's place) between the renames can part them."""
    written: list[tuple[str, Path]] = []  # the temporary files not yet renamed
    try:
        for path, data, mode in files:
            path = Path(path)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            except OSError as exc:
                raise _failed(path, "write", exc) from None
            written.append((tmp, path))
            with open(fd, "wb") as fh:  # (closes fd)
                os.fchmod(fh.fileno(), mode)
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        directories = {path.parent for _, path in written}
        while written:
            tmp, path = written[0]
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _failed(path, "replace", exc) from None
            written.pop(0)
    except BaseException:  # no temporary file left behind (a key's holds its bytes)
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise
    for directory in directories:
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) survive a crash."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_new(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Create `path` with `mode`; refuse to overwrite (a CA never clobbers its state)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class EndedEarly(OSError):
    """The file copied from was shorter than the length asked for."""


def copy_new(src: int, length: int, path: Path | str, mode: int = 0o600,
             dir_fd: int | None = None) -> None:
    """Create `path` (in the directory `dir_fd`, if given) with `mode` holding the first
    `length` bytes of the open file `src` (its offset left as it is), flushed; refuse to
    overwrite. EndedEarly if `src` holds fewer; a failed copy leaves no part of `path`
    behind (whoever finds it would take it whole)."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                  dir_fd=dir_fd)
    try:
        try:
            done = 0
            while done < length:
                sent = os.sendfile(out, src, done, length - done)
                if sent == 0:
                    raise EndedEarly(f"{path}: the file copied from ended after {done} "
                                     f"of {length} bytes")
                done += sent
            os.fchmod(out, mode)  # whatever the umask took off
            os.fsync(out)
        finally:
            os.close(out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=dir_fd)
        raise


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _check_owner(path: Path, st: os.stat_result) -> None:
    """Refuse a file the daemon trusts that someone else owns: its owner can change its
    mode, or replace it, whatever the mode says now (as OpenSSH's StrictModes; a review
    swapped a config in a state directory left to another user)."""
    if st.st_uid not in (0, os.geteuid()):
        me, owner = _user(os.geteuid()), _user(st.st_uid)
        if os.geteuid() == 0:  # (a check run as root, of a daemon that runs as `owner`?)
            # Running as the owner first: a docs trial ran the root ceremony as root,
            # and `chown root` on the PIN file would have kept the daemon from its PIN.
            fix = (f"run hsmca as {owner}, the daemon's user (runuser -u {owner} -- hsmca "
                   f"...), or, if the daemon runs as root, give it to root (chown root "
                   f"{path})")
        else:
            fix = f"run chown {me} {path}, or chown root and keep it readable by {me}"
        trusted = me if os.geteuid() == 0 else f"{me} or root"
        raise CLIError(f"{path} is owned by {owner}, not by {trusted}: its owner can "
                       f"change it whatever its mode; {fix}")


def check_private(paths: Iterable[Path]) -> None:
    """Refuse a PIN or private key file that group or others may read or write.

    Whoever can read the PIN can sign with every CA key while the token is attached,
    and a readable TLS or admin key is a stolen identity, so the daemon does not start
    on one; existing files only (a missing file is reported by whoever opens it)."""
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CLIError(f"{path} has mode {mode:04o}: a PIN or private key file must not "
                           f"be readable or writable by group or others; run chmod 600 {path}")
        _check_owner(path, st)


def check_not_writable(paths: Iterable[Path]) -> None:
    """Refuse a file or directory the daemon trusts that group or others may write.

    Whoever can write the config names the PKCS#11 module the daemon loads and then
    hands the PIN to; whoever can write the state directory, the audit log or the
    inventory can change what the CA records or replace its files: as bad as a readable
    PIN. Its owner must be the daemon's user or root. Existing paths only; a symlink is
    judged by what it names."""
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        _check_not_writable(path, st)


def _check_not_writable(path: Path, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        what = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        raise CLIError(f"{path} has mode {mode:04o}: a {what} the daemon trusts must not "
                       f"be writable by group or others; run chmod go-w {path}")
    _check_owner(path, st)


def read_trusted(path: Path) -> bytes:
    """`path`'s bytes, judged as check_not_writable judges it, on the very file read:
    a check by name, then a read by name, takes whatever was swapped in between (a
    review: a reload could put in force a policy other than the one it logged)."""
    with open(path, "rb") as fh:
        _check_not_writable(path, os.fstat(fh.fileno()))
        return fh.read()


def apply_modes(root: Path, modes: dict[str, int], *, default_file: int = 0o600,
                default_dir: int = 0o700) -> None:
    """Give every file and directory under `root` (and `root`, as "."), the mode named
    for its relative path in `modes`, or the private default: the result does not
    depend on the umask of whoever ran the command, and anything unforeseen stays
    private rather than public."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        os.chmod(here, modes.get(rel_dir, default_dir))
        for name in filenames:
            path = here / name
            if path.is_symlink():
                continue
            os.chmod(path, modes.get(path.relative_to(root).as_posix(), default_file))
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
