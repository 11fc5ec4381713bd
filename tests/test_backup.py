"""`hsmca backup`: a copy of a running CA that starts as that CA.

An operator backs the CA up while it serves, loses the state directory, and starts
the daemon on the copy: the clients enrolled before the backup go on renewing, the
audit log goes on from where the copy ends and verifies, and what the CA did after
the backup is missing, as the command said it would be.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import Daemon, hsmca, init_ca, require, start_daemon
from tests.helpers import audit_verify, enroll, http, log_lines


async def _renewals(d: Daemon, cred: tuple[Path, Path], count: int) -> list[int]:
    """`count` renewals on the same credential, four at a time."""
    gate = asyncio.Semaphore(4)

    async def one() -> int:
        async with gate:
            status, _, _ = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*cred), body={})
            return status
    return list(await asyncio.gather(*(one() for _ in range(count))))


async def test_a_backup_taken_while_the_ca_signs_restores_to_a_ca_that_serves(
        own_daemon: Daemon, tmp_path: Path) -> None:
    d = own_daemon
    kept = enroll(d, tmp_path, "service", ["kept.internal.example"])
    busy = enroll(d, tmp_path, "service", ["busy.internal.example"])
    out = tmp_path / "backup"
    # Renewals are signed and recorded while the copy is taken.
    load = asyncio.ensure_future(_renewals(d, busy, 40))
    done = await asyncio.to_thread(hsmca, "backup", "--config", d.state / "hsmca.toml",
                                   "--out", out)
    assert set(await load) == {201}
    lost = enroll(d, tmp_path, "service", ["lost.internal.example"])  # after the backup
    assert d.stop() == 0

    said = done.stdout
    assert said.startswith(f"backed up the CA of {d.state / 'hsmca.toml'} to {out}:")
    assert "not in it:" in said and "the keys, which never leave the HSM" in said
    assert "the PIN (file:" in said and "SoftHSM: copy " in said
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "admin" / "key.pem").stat().st_mode) == 0o600
    assert not (out / "run").exists() and not (out / "audit" / "tiles").exists()
    copied = log_lines(out)
    assert 0 < len(copied) < len(log_lines(d.state))
    # The copy verifies offline as the backup says: lines after its checkpoint get none
    # later (an operator's trial was told to wait for a daemon that never signs one)
    plain = audit_verify(out, log=out / "audit" / "log.jsonl")
    if plain.returncode:
        assert "unsigned: the restored daemon's first checkpoint covers them, and " \
            "--allow-unsigned accepts them meanwhile" in said, said
        assert "--allow-unsigned" in plain.stderr, plain.stderr  # (its unsigned lines,
        # or an intent whose outcome came after the copy)
    audit_verify(out, "--allow-unsigned", log=out / "audit" / "log.jsonl", ok=True)

    # The state directory is gone; the copy takes its place.
    shutil.rmtree(d.state)
    shutil.copytree(out, d.state)
    restored = start_daemon(d.state)
    # the tiles the start built from the copy's log are as private as a fresh CA's
    assert stat.S_IMODE((d.state / "audit" / "tiles").stat().st_mode) == 0o700
    try:
        for cred in (kept, busy):
            proc = hsmca("renew", "--url", restored.url, "--ca", restored.root,
                         "--cert", cred[0], "--key", cred[1], check=False)
            if cred is busy and proc.returncode:
                # Its latest renewal may have come after the copy: then its holder
                # enrolls again, as the restore's note says.
                assert "not in this CA's inventory" in proc.stderr, proc.stderr
            else:
                assert proc.stdout.startswith("renewed: serial "), proc.stderr
        proc = hsmca("renew", "--url", restored.url, "--ca", restored.root,
                     "--cert", lost[0], "--key", lost[1], check=False)
        assert proc.returncode == 1 and "not in this CA's inventory" in proc.stderr
        # and what to do (an operator trial was told no more than that)
        assert "restored from a backup taken before the certificate was issued" in \
            proc.stderr and "hsmca token create" in proc.stderr, proc.stderr
        # The certificate issued after the backup can still be revoked: by its serial
        # the CA says it does not know it and how; given itself, the CA checks its own
        # key signed it, records it and revokes it, and its CRL says so.
        admin = ("--config", d.state / "hsmca.toml", "--url", restored.url)
        serial = format(x509.load_pem_x509_certificate(lost[0].read_bytes()).serial_number,
                        "x")
        proc = hsmca("revoke", serial, *admin, check=False)
        assert proc.returncode == 1 and "--cert-file FILE" in proc.stderr, proc.stderr
        proc = hsmca("revoke", "--cert-file", lost[0], "--reason", "keyCompromise", *admin)
        assert proc.stdout.startswith(f"revoked {serial} at "), proc.stdout
        status, _, der = await http("GET", f"{restored.url}/v1/x509/crl", restored.ssl())
        assert status == 200 and x509.load_der_x509_crl(
            der).get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
        listed = hsmca("cert", "list", "--search", serial, *admin).stdout
        # (by columns: a serial shorter than the column, 1 in 16, is padded)
        assert [line.split()[:3] for line in listed.splitlines()[1:]] == [
            [serial, "revoked", "unknown"]], listed
        # A certificate of another CA is not taken
        other = init_ca(tmp_path / "other")
        proc = hsmca("revoke", "--cert-file", other.state / "admin" / "cert.pem", *admin,
                     check=False)
        assert proc.returncode == 1 and "not signed by any issuing key this CA uses" in \
            proc.stderr, proc.stderr
    finally:
        assert restored.stop() == 0
    adopted = [x for x in log_lines(d.state) if x["event"] == "cert.adopt"]
    assert [x["serial"] for x in adopted] == [serial], adopted
    # An inventory that lacks it again (copied before that revocation committed): the
    # log holds the certificate, and the next start records and revokes it from there
    with sqlite3.connect(d.state / "hsmca.sqlite3") as db:
        for table in ("ocsp_responses", "certs"):
            db.execute(f"DELETE FROM {table} WHERE serial = ?", (serial,))
        db.execute("DELETE FROM meta WHERE k LIKE 'log_scanned:%'")  # read it all again
    again = start_daemon(d.state)
    try:
        listed = hsmca("cert", "list", "--search", serial, "--config", d.state / "hsmca.toml",
                       "--url", again.url).stdout
        assert [line.split()[:3] for line in listed.splitlines()[1:]] == [
            [serial, "revoked", "unknown"]], listed
    finally:
        assert again.stop() == 0
    lines = log_lines(d.state)
    assert lines[:len(copied)] == copied  # the log goes on where the copy ended
    audit_verify(d.state, ok=True)


def test_a_backup_never_overwrites_and_says_what_it_cannot_copy(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "earlier").write_text("a backup made before\n")
    proc = hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", out, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().endswith(f"--out {out} exists and is not an empty directory; "
                                        "name a new one (a backup never overwrites another)")
    assert (out / "earlier").read_text() == "a backup made before\n"
    # What a backup killed while it copied leaves: said so (a trial was told "exists").
    killed = tmp_path / "killed"
    (killed / ".partial-0").mkdir(parents=True)
    proc = hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", killed, check=False)
    assert proc.returncode == 1 and proc.stderr == (
        f"hsmca: error: --out {killed} holds only the unfinished copy of a backup that was "
        "stopped while it ran: remove it (it holds the admin's key: rm -r), or name a new "
        "--out\n"), proc.stderr
    assert (killed / ".partial-0").is_dir()  # not removed by this run: the operator's
    config = ca.state / "hsmca.toml"
    config.write_text(config.read_text() + '\n[store]\nurl = "postgresql://db.example/ca"\n')
    proc = hsmca("backup", "--config", config, "--out", tmp_path / "new", check=False)
    assert proc.returncode == 1 and "back that database up (pg_dump" in proc.stderr
    assert not (tmp_path / "new").exists()



def test_a_backup_that_fails_halfway_leaves_nothing_behind(tmp_path: Path) -> None:
    """A recovery trial's backup onto a full disk left its .partial directory, with the
    admin's private key in it, and the same --out was then refused as not empty. Here
    the copy fails on a file it cannot copy (a named pipe in the state directory): the
    error names it, and --out is gone, to be given again."""
    ca = init_ca(tmp_path / "ca")
    os.mkfifo(ca.state / "zz-pipe")
    out = tmp_path / "backup"
    proc = hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", out, check=False)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert f"cannot write the backup into {out}" in proc.stderr and "zz-pipe" in proc.stderr
    assert "nothing was kept" in proc.stderr and not out.exists()
    (ca.state / "zz-pipe").unlink()
    proc = hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", out)
    assert "backed up the CA" in proc.stdout
    log = out / "audit" / "log.jsonl"  # with the live log's own mode
    assert stat.S_IMODE(log.stat().st_mode) == stat.S_IMODE(
        (ca.state / "audit" / "log.jsonl").stat().st_mode)


def test_a_backup_says_so_when_it_holds_the_pin(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    inside = ca.state / "pin"
    inside.write_bytes(ca.token.pin_file.read_bytes())
    inside.chmod(0o600)
    config = ca.state / "hsmca.toml"
    text = config.read_text()
    config.write_text(text.replace(f'"file:{ca.token.pin_file}"', '"file:pin"'))
    out = hsmca("backup", "--config", config, "--out", tmp_path / "b").stdout
    assert f"its file {inside} is inside the state directory, so the copy holds it" in out
    assert (tmp_path / "b" / "pin").read_bytes() == inside.read_bytes()


def test_a_revocation_that_lands_while_the_copy_is_taken_is_in_the_copy(
        own_daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A revocation logs its line before it commits: one landing just after the
    inventory was copied would be in the copied log and not in the copied inventory,
    and a restore would serve the certificate as good. The backup takes the copy
    again. (The revocation is made at that moment by wrapping the inventory copy.)"""
    import sqlite3

    from ca import backup
    from ca.config import load
    d = own_daemon
    cert, _ = enroll(d, tmp_path, "service", ["late.internal.example"])
    serial = format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "x")
    real, copies = backup._inventory, []

    def inventory(db: Path, target: Path) -> int:
        copies.append(target)
        n = real(db, target)
        if len(copies) == 1:  # just after the first snapshot
            hsmca("revoke", "--config", d.state / "hsmca.toml", "--url", d.url,
                  "--reason", "keyCompromise", serial)
        return n
    monkeypatch.setattr(backup, "_inventory", inventory)
    out = tmp_path / "copy"
    done = backup.backup(load(d.state / "hsmca.toml"), out)
    assert len(copies) == 2 and done.out == out
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    with sqlite3.connect(out / "hsmca.sqlite3") as db:
        (revoked_at,) = db.execute("SELECT revoked_at FROM certs WHERE serial = ?",
                                   (serial,)).fetchone()
    assert revoked_at is not None


def test_a_copy_of_the_ca_does_not_serve_beside_it(tmp_path: Path) -> None:
    """An operator's trial started a backup while the CA it copies ran: a second CA on
    the same keys, with its own log, and only a reassuring line was said. Refused in
    one line, naming what to do; the CA goes on serving, and once it stops the copy
    starts."""
    ca = init_ca(tmp_path)
    live = start_daemon(ca.state)
    copy = tmp_path / "copy"
    try:
        hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", copy)
        proc = hsmca("serve", "--config", copy / "hsmca.toml", "--listen", "127.0.0.1:0",
                     check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "another hsmca serves the token" in lines[0] and \
            f"state directory {ca.state}" in lines[0] and "One CA at a time" in lines[0], \
            proc.stderr
        assert live.proc.poll() is None
    finally:
        assert live.stop() == 0
    restored = start_daemon(copy)
    assert restored.stop() == 0


def test_a_backup_restored_in_the_place_of_a_serving_ca_does_not_serve_beside_it(
        tmp_path: Path) -> None:
    """An operator's trial restored as docs/operator.md says (the directory moved aside,
    the backup put in its place) with the live CA still serving: the copy, at the very
    path the lock named, took the lock for its own and served beside it, unguarded.
    The lock names the directory itself, so the copy is refused."""
    ca = init_ca(tmp_path)
    live = start_daemon(ca.state)
    copy = tmp_path / "copy"
    try:
        hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", copy)
        ca.state.rename(tmp_path / "ca.old")
        shutil.copytree(copy, ca.state, symlinks=True)
        proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                     check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "another hsmca serves the token" in lines[0], proc.stderr
        assert live.proc.poll() is None
    finally:
        live.stop()
    restored = start_daemon(ca.state)  # the live CA stopped: the restore serves
    assert restored.stop() == 0


def test_the_token_lock_is_skipped_rather_than_trusted_when_another_user_made_it(
        tmp_path: Path) -> None:
    """/run/lock is everyone's: a lock file someone else made there (its name can be
    guessed) must not keep the CA from starting; one of the CA's own user is held."""
    from ca.token_lock import Skipped, TokenInUse, hold_token
    args = ("/usr/lib/softhsm/libsofthsm2.so", None, "ca-token", tmp_path)
    held = hold_token(*args, lock_dir=tmp_path)
    assert held is not None
    with pytest.raises(TokenInUse) as refused:
        hold_token(*args[:3], tmp_path / "copy", lock_dir=tmp_path)
    assert f"state directory {tmp_path} (inode " in str(refused.value) and \
        f"pid {os.getpid()}" in str(refused.value), refused.value
    # the same state directory: its audit log's lock says so, not this one
    assert hold_token(*args, lock_dir=tmp_path) is None
    # as a 0.3.6 daemon's lock names it (its path alone): the same, as then
    os.pwrite(held.fd, f"state directory {tmp_path}, pid 4242\n".encode().ljust(200), 0)
    os.ftruncate(held.fd, len(f"state directory {tmp_path}, pid 4242\n"))
    assert hold_token(*args, lock_dir=tmp_path) is None
    with pytest.raises(TokenInUse):
        hold_token(*args[:3], tmp_path / "copy", lock_dir=tmp_path)
    lock = held.path
    held.close()
    assert not lock.exists()  # /run/lock keeps no file per token ever served
    again = hold_token(*args, lock_dir=tmp_path)
    assert again is not None and again.path == lock
    os.close(again.fd)  # as a kill leaves it: the file stays, unlocked
    os.chown(lock, 65534, 65534)  # another user's now
    skipped = hold_token(*args, lock_dir=tmp_path)
    assert isinstance(skipped, Skipped) and skipped.why == (
        f"{lock} is another user's file (uid 65534): remove it, with the daemon stopped")
    # a lock directory the daemon may not write (the documented unit's /run/lock was
    # read-only: a new-user trial)
    skipped = hold_token(*args, lock_dir=tmp_path / "no-such")
    assert isinstance(skipped, Skipped) and "cannot be made (No such file or directory): " \
        f"let the daemon's user write {tmp_path / 'no-such'}" in skipped.why, skipped


def test_a_start_that_cannot_take_the_token_lock_says_so(tmp_path: Path) -> None:
    """The documented systemd unit left /run/lock read-only, and a restored copy served
    beside the live CA with nothing said (a new-user trial). A start without the lock
    warns that a copy would not be refused, and why."""
    import hashlib

    from ca.config import load
    from ca.token_lock import LOCK_DIR
    ca = init_ca(tmp_path)
    config = load(ca.state / "hsmca.toml")
    conf = config.softhsm_conf or os.environ.get("SOFTHSM2_CONF", "")
    ident = "\0".join([os.path.realpath(config.hsm.module), os.path.realpath(conf),
                       config.hsm.token])
    lock = LOCK_DIR / f"hsmca-token-{hashlib.sha256(ident.encode()).hexdigest()[:24]}.lock"
    lock.touch()
    try:
        os.chown(lock, 65534, 65534)  # another user's: not trusted, so not taken
        d = start_daemon(ca.state)
        assert d.stop() == 0
    finally:
        lock.unlink()
    [said] = [json.loads(line) for line in d.stderr
              if "the token's lock on this host could not be taken" in line]
    assert said["level"] == "warning" and said["why"].startswith(f"{lock} is another user's")


def test_a_restored_inventory_is_not_mended_with_the_killed_daemons_write_ahead_log(
        tmp_path: Path) -> None:
    """A restore trial put a backup's inventory where a killed daemon's had been: its
    write-ahead log stayed beside it, SQLite applied it to the copy, and the daemon
    served on a damaged inventory (rows of one client read as another's). The start
    refuses in one line that names the log to remove; removed, the copy serves whole."""
    import signal

    from tests.test_workers import worker_pids
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    try:
        kept = enroll(d, tmp_path, "service", ["kept.internal.example"])
        out = tmp_path / "backup"
        hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", out)
        for i in range(3):  # after the backup, in the WAL only
            enroll(d, tmp_path, "service", [f"later{i}.internal.example"])
    except BaseException:
        d.stop()  # (not left running by a failure before the kill below)
        raise
    # Killed as a power cut kills it: every process at once, none closing the inventory.
    pids = [d.proc.pid, *worker_pids(d)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    d.proc.wait()
    wal = ca.state / "hsmca.sqlite3-wal"
    assert wal.stat().st_size > 0
    # The restore, copied over the directory (its log too; the old tiles moved aside, as
    # the start would ask): a look at the inventory before it opens applied the log
    # as well, and the start blamed the audit log (a review).
    shutil.copytree(out, ca.state, dirs_exist_ok=True)
    shutil.move(ca.state / "audit" / "tiles", tmp_path / "old-tiles")

    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    said = proc.stderr.splitlines()[-1]
    assert proc.returncode == 1 and said.startswith("hsmca: error: ") and \
        proc.stderr.count("\n") == 1, proc.stderr  # at the outset: nothing else said
    assert f"{wal} is beside it" in said and "remove hsmca.sqlite3-wal and " \
        "hsmca.sqlite3-shm" in said and "Traceback" not in proc.stderr, proc.stderr
    # untouched by the start it refused
    assert (ca.state / "hsmca.sqlite3").read_bytes() == (out / "hsmca.sqlite3").read_bytes()
    # and by a move into PostgreSQL, refused as first (a trial's wrote its line in the
    # log, then refused on opening the inventory): here, before asking PostgreSQL
    log = (ca.state / "audit" / "log.jsonl").read_bytes()
    moved = hsmca("store", "move", "--config", ca.state / "hsmca.toml", "--yes",
                  "--store-url", "postgresql://hsmca@127.0.0.1:1/ca", check=False)
    assert moved.returncode == 1 and moved.stderr.count("\n") == 1 and \
        f"{wal} is beside it" in moved.stderr, moved.stderr
    assert (ca.state / "audit" / "log.jsonl").read_bytes() == log

    wal.unlink()
    (ca.state / "hsmca.sqlite3-shm").unlink(missing_ok=True)
    restored = start_daemon(ca.state, "--workers", "1")
    try:
        renewed = hsmca("renew", "--url", restored.url, "--ca", restored.root, "--cert",
                        kept[0], "--key", kept[1])
        assert renewed.stdout.startswith("renewed: serial "), renewed.stderr
    finally:
        assert restored.stop() == 0
    assert not any("is damaged" in line for line in restored.stderr), restored.stderr
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    audit_verify(ca.state, ok=True)


def test_a_damaged_inventory_is_not_backed_up_as_if_whole(tmp_path: Path) -> None:
    """A start-guard trial backed up an inventory whose index page was damaged: the
    command said it was done, and the copy held the damage, which a nightly job would
    have put in place of the good copies. Refused in one line, nothing kept."""
    ca = init_ca(tmp_path)
    db_path = ca.state / "hsmca.sqlite3"
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [(root,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = "
                               "'sqlite_autoindex_tokens_2'")  # read by no backup
        [(page,)] = db.execute("PRAGMA page_size")
    with open(db_path, "r+b") as fh:
        fh.seek((root - 1) * page)
        fh.write(b"\x55" * page)
    out = tmp_path / "nightly"
    proc = hsmca("backup", "--config", ca.state / "hsmca.toml", "--out", out, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"hsmca: error: the inventory {db_path} is damaged (") \
        and "so none is kept" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_cluster_nodes_share_the_token_lock_and_a_copy_cannot_take_it(tmp_path: Path) -> None:
    """A re-trial started a restored single-node backup on a cluster node's host: nodes
    took no lock, and the copy served on the same keys. Nodes share the lock (they use
    the same keys by design); a single node's cannot be taken beside them, nor theirs
    beside it. The file goes with the last holder."""
    from ca.token_lock import TokenInUse, TokenLock, hold_token
    args = ("/usr/lib/softhsm/libsofthsm2.so", None, "ca-token")
    n1 = hold_token(*args, tmp_path / "cluster", lock_dir=tmp_path, shared=True)
    n2 = hold_token(*args, tmp_path / "cluster", lock_dir=tmp_path, shared=True)
    assert isinstance(n1, TokenLock) and isinstance(n2, TokenLock)
    with pytest.raises(TokenInUse, match="another hsmca serves the token 'ca-token'"):
        hold_token(*args, tmp_path / "restored", lock_dir=tmp_path)
    n1.close()
    assert n2.path.exists()  # node 2 holds it still
    n2.close()
    assert not n2.path.exists()
    single = hold_token(*args, tmp_path / "single", lock_dir=tmp_path)
    assert isinstance(single, TokenLock)
    with pytest.raises(TokenInUse):
        hold_token(*args, tmp_path / "cluster", lock_dir=tmp_path, shared=True)
    single.close()


def test_a_read_only_lock_directory_still_refuses_a_copy_beside_the_live_ca(
        tmp_path: Path) -> None:
    """A re-trial's copy, its /run/lock read-only (as the documented unit once left it),
    served beside the live CA, though the live CA's lock file was there to read: a lock
    is taken on a file opened for reading too."""
    from ca.token_lock import TokenLock, hold_token
    locks = tmp_path / "locks"
    locks.mkdir()
    live = hold_token("/usr/lib/softhsm/libsofthsm2.so", None, "ca-token", tmp_path / "live",
                      lock_dir=locks)
    assert isinstance(live, TokenLock)
    copy = textwrap.dedent(f"""
        from pathlib import Path
        from ca.token_lock import TokenInUse, hold_token
        try:
            got = hold_token("/usr/lib/softhsm/libsofthsm2.so", None, "ca-token",
                             Path({str(tmp_path / 'copy')!r}), lock_dir=Path({str(locks)!r}))
            print("held" if got is not None and not hasattr(got, "why") else got)
        except TokenInUse as exc:
            print("refused:", exc)
    """)
    proc = subprocess.run(
        [require("unshare"), "-m", "--propagation", "private", "sh", "-c",
         f'mount --bind -o ro "{locks}" "{locks}" && exec "{sys.executable}" -c "$0"', copy],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=60)
    try:
        assert proc.returncode == 0 and proc.stdout.startswith(
            "refused: another hsmca serves the token 'ca-token'"), proc.stdout + proc.stderr
    finally:
        live.close()
