"""A throwaway PostgreSQL server from Debian's `postgresql` package, for the tests:
initdb into a temporary directory (as the `postgres` user when run as root, since
initdb refuses root), trust authentication, listening on 127.0.0.1 on a free port and
on a unix socket in that directory only. Never skipped: without the package the
tests that need it fail, saying what to install."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.ports import free_port

_dbs = itertools.count(1)


def bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("PostgreSQL is not installed; run scripts/setup --test (apt-get install "
                    "postgresql)")
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self) -> None:
        self.bin = bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="hsmca-pg-"))
        self.as_pg: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_pg = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.dir / "data"
        self._role = False
        self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync")
        for tries_left in reversed(range(5)):
            try:
                self.start()
                break
            except AssertionError:
                # The port, free when looked at, taken before the server bound it (a
                # suite run beside another on one machine: 58 errors of one CI run,
                # "could not create any TCP/IP sockets"): another port, a few times.
                log = (self.dir / "server.log").read_text(errors="replace")
                if not tries_left or "could not create any TCP/IP sockets" not in log:
                    raise
                self.port = free_port()

    def _run(self, *args: object) -> str:
        proc = subprocess.run([*self.as_pg, *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode:
            raise AssertionError(f"{args[0]} failed: {proc.stderr or proc.stdout}")
        return proc.stdout

    def start(self) -> None:
        """Start (or start again, on the same port and data) and wait until it answers."""
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories="
                f"{self.dir} -c max_connections=300 -c fsync=off")
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.dir / "server.log", "-o",
                  opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60",
                  "stop")

    def _postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def _backends(self) -> list[int]:
        return [int(pid) for pid in subprocess.run(
            ["pgrep", "-P", str(self._postmaster())], capture_output=True, text=True,
            timeout=60).stdout.split()]

    def freeze(self) -> None:
        """Stop the server answering without refusing anything (SIGSTOP): as a frozen
        host, or a failover whose old primary vanished, does. thaw() ends it; call it
        in a `finally` that covers this call too. The postmaster first: it starts no
        backend after that, so every one is listed."""
        self._signal([self._postmaster()], signal.SIGSTOP)
        self._signal(self._backends(), signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal([self._postmaster(), *self._backends()], signal.SIGCONT)

    @staticmethod
    def _signal(pids: list[int], sig: signal.Signals) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # a backend that ended meanwhile
                pass

    def psql(self, sql: str, db: str = "postgres") -> str:
        proc = subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p",
                               str(self.port), "-U", "postgres", "-d", db, "-v",
                               "ON_ERROR_STOP=1", "-Atqc", sql], capture_output=True,
                              text=True, timeout=60)
        if proc.returncode:
            raise AssertionError(f"psql {sql!r}: {proc.stderr}")
        return proc.stdout.strip()

    def new_database(self) -> str:
        """A fresh, empty database owned by an ordinary role; its URL."""
        name = f"t{next(_dbs)}"
        if not self._role:
            self.psql("CREATE ROLE hsmca LOGIN")
            self._role = True
        self.psql(f"CREATE DATABASE {name} OWNER hsmca")
        return f"postgresql://hsmca@127.0.0.1:{self.port}/{name}"

    def dump(self, db: str, to: Path) -> None:
        """`pg_dump -Fc` of database `db`: what docs/cluster.md says to back up with."""
        self._client("pg_dump", "-Fc", "-f", to, db)

    def restore(self, db: str, dump: Path) -> None:
        """Database `db` dropped, made again and restored from `dump` (pg_restore)."""
        self.psql(f"DROP DATABASE {db} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {db} OWNER hsmca")
        self._client("pg_restore", "-d", db, dump)

    def _client(self, tool: str, *args: object) -> None:
        proc = subprocess.run([str(self.bin / tool), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", "hsmca", *map(str, args)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode:
            raise AssertionError(f"{tool} failed: {proc.stderr}")

    def close(self) -> None:
        try:
            self.stop()
        except AssertionError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
