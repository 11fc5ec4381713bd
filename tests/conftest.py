"""Shared fixtures: a real SoftHSM per test session, a CA made by the real CLI.

SoftHSM reads SOFTHSM2_CONF when the library is initialised, so the private config
is put in the environment by the first fixture of the session, before any test loads
the module; child processes (the CLI, the daemon) inherit it. Importing this file
makes nothing: `pytest --collect-only` leaves no directory behind. Nothing here
skips: if SoftHSM, openssl or OpenSSH is missing, the fixtures fail with a message
that says what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli_w

from hsm import softhsm

_SESSION_DIR: Path | None = None  # set by the `session_dir` fixture, first of the session
HSMCA = [sys.executable, "-m", "ca.cli"]


def require(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}")
                                  else None)
    if path is None:
        pytest.fail(f"{tool} is not installed; run scripts/setup --test (apt-get install it)")
    return path


@dataclass(frozen=True)
class Token:
    label: str
    pin_file: Path
    module: str


_counter = iter(range(1, 10**6))
# Every token made, so that those a test made (its function-scoped fixtures' too) are
# removed once it has ended: SoftHSM reads every token in its directory whenever a
# process initialises it, so each daemon, worker and CLI run paid for every token the
# session had made before it (measured: 0.15 s per start with 200 tokens of a CA's
# keys, 0.01 s with one).
_made: dict[Path, Path] = {}  # token directory: its PIN file


@pytest.fixture(autouse=True)
def _remove_tokens_made_by_the_test() -> Iterator[None]:
    """Set up after the session's and modules' fixtures (pytest sets up wider scopes
    first), so their tokens are kept; torn down last, after the fixtures that stop the
    daemons. (A wider fixture first asked for with `request.getfixturevalue` inside a
    test would count as the test's and lose its token: none is, and a conftest hook
    cannot tell, since pytest calls it only for this directory's fixtures.)"""
    kept = set(_made)
    yield
    for directory in set(_made) - kept:
        shutil.rmtree(directory, ignore_errors=True)
        _made.pop(directory).unlink(missing_ok=True)


def new_softhsm_token(prefix: str = "t") -> Token:
    """A fresh, empty token with its own PIN file."""
    assert _SESSION_DIR is not None, "SoftHSM tokens are made inside tests, not at import"
    label = f"{prefix}{next(_counter)}"
    pin = _SESSION_DIR / f"{label}.pin"
    tokens = _SESSION_DIR / "softhsm" / "tokens"
    before = set(tokens.iterdir())
    softhsm.init_token(Path(os.environ["SOFTHSM2_CONF"]), label, pin)
    # (this worker's directory: nobody else makes a token in it meanwhile)
    _made.update((made, pin) for made in set(tokens.iterdir()) - before)
    return Token(label, pin, softhsm.module_path())


def hsmca(*args: str | Path, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*HSMCA, *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"hsmca {args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def set_config(state: Path, section: str, key: str, value: object) -> None:
    """Change one setting of STATE/hsmca.toml, as an operator would with an editor
    (the comments go: tests read values, not prose)."""
    from ca.config import SCHEMA
    assert key in SCHEMA[section], f"{section}.{key} is not a setting hsmca reads"
    path = state / "hsmca.toml"
    doc = tomllib.loads(path.read_text())
    doc[section][key] = value
    path.write_text(tomli_w.dumps(doc))


@dataclass(frozen=True)
class InitialisedCA:
    state: Path
    token: Token
    stdout: str


def init_ca(tmp: Path, key_type: str = "ec-p256", dns_name: str = "localhost",
            private_hsm: bool = False, name: str | None = None) -> InitialisedCA:
    """`hsmca init` on a fresh token. With private_hsm, the token lives in a SoftHSM
    token directory of its own (for tests that take the token away)."""
    env = None
    if private_hsm:
        conf = softhsm.write_config(tmp / "softhsm")
        env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        label = "private"
        pin = tmp / "private.pin"
        softhsm.init_token(conf, label, pin)
        token = Token(label, pin, softhsm.module_path())
    else:
        token = new_softhsm_token()
    state = tmp / "ca"
    proc = hsmca("init", "--state-dir", state, "--module", token.module, "--token", token.label,
                 "--pin-file", token.pin_file, "--key-type", key_type, "--dns-name", dns_name,
                 *(["--name", name] if name else []), env=env)
    return InitialisedCA(state, token, proc.stdout)


@pytest.fixture(scope="session", autouse=True)
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's SoftHSM token directory and PIN files, named in SOFTHSM2_CONF
    before any test runs; removed at the end."""
    global _SESSION_DIR
    directory = tmp_path_factory.mktemp("hsmca-tests")
    os.environ["SOFTHSM2_CONF"] = str(softhsm.write_config(directory / "softhsm"))
    _SESSION_DIR = directory
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> InitialisedCA:
    """One CA (P-256) made by `hsmca init`, shared by tests that only read it."""
    softhsm.module_path()  # fail loudly, naming the package, if SoftHSM is missing
    return init_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The test process's one signing thread (its HSM thread), logged in to the token
    of a CA of its own: the tests that use it add keys to that token, and the shared
    `ca` stays as `hsmca init` made it.

    One per process, on purpose: two threads inside SoftHSM crash it (docs/security.md),
    so every in-process PKCS#11 call of the suite goes through this thread. Its audit
    log is a scratch log, not the CA's.
    """
    from ca.audit.log import AuditLog
    from ca.issuance.pipeline import SigningPipeline
    from hsm.session import HSMConfig

    ca = init_ca(tmp_path_factory.mktemp("worker-ca"))
    log = AuditLog.open(tmp_path_factory.mktemp("worker-audit") / "log.jsonl")
    w = SigningPipeline(HSMConfig(ca.token.module, ca.token.label, f"file:{ca.token.pin_file}"),
                        log)
    w.start()
    yield w
    w.close()
    log.close()


@dataclass
class Daemon:
    """A real `hsmca serve` on 127.0.0.1 with an ephemeral port."""

    url: str
    proc: subprocess.Popen[str]
    state: Path
    stderr: list[str]
    # Notified by the reader of the daemon's stderr at every line (and at its end).
    stderr_changed: threading.Condition = field(default_factory=threading.Condition)
    # Set by that reader once stderr is closed: every process's last line is in.
    stderr_ended: threading.Event = field(default_factory=threading.Event)

    def wait_stderr(self, done: Callable[[], bool], within: float = 60.0) -> bool:
        """Whether `done()` came to hold within `within` seconds, woken by each line."""
        with self.stderr_changed:
            return self.stderr_changed.wait_for(done, within)

    @property
    def root(self) -> Path:
        return self.state / "x509" / "root.pem"

    def ssl(self, cert: Path | None = None, key: Path | None = None) -> object:
        from ca.client import ssl_context
        return ssl_context(self.root, cert, key)

    def admin_ssl(self) -> object:
        return self.ssl(self.state / "admin" / "cert.pem", self.state / "admin" / "key.pem")

    def stop(self) -> int:
        """SIGTERM, and the exit status once every line it wrote to stderr is read (a
        line logged during the stop was missed by a test reading right after)."""
        if self.proc.poll() is None:
            self.proc.send_signal(15)
            try:
                # The daemon's own stop limits (30 s a worker, 30 s the recorder, ...)
                # add up past a minute on a loaded CI machine.
                self.proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                print("the daemon did not stop within 150 s; its last lines:",
                      *self.stderr[-40:], sep="\n", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.stderr_ended.wait(60)
        return self.proc.returncode


def start_daemon(state: Path, *extra: str, env: dict[str, str] | None = None,
                 wrapper: tuple[str, ...] = ()) -> Daemon:
    """`hsmca serve` on the CA in `state`; `wrapper` runs it (`prlimit ...`)."""
    proc = subprocess.Popen([*wrapper, *HSMCA, "serve", "--config", str(state / "hsmca.toml"),
                             "--listen", "127.0.0.1:0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    changed = threading.Condition()
    ended = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with changed:
                stderr.append(line)
                changed.notify_all()
        ended.set()
        with changed:
            changed.notify_all()

    threading.Thread(target=drain, daemon=True).start()
    # A watchdog instead of a sleep: if the daemon neither prints nor exits, kill it.
    timer = threading.Timer(60, proc.kill)
    timer.start()
    assert proc.stdout is not None
    first = proc.stdout.readline()
    timer.cancel()
    if not first.startswith("listening on https://"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"daemon did not start: {first!r}\n{''.join(stderr)}")
    threading.Thread(target=lambda: proc.stdout.read() if proc.stdout else None,
                     daemon=True).start()
    # Its log is read by another thread: what it said while it started is there once
    # its "listening" line is, which it logs right after the stdout line (at level info:
    # a config that logs warnings only has no such line to wait for).
    if _log_level(state, extra) == "info":
        with changed:
            changed.wait_for(lambda: ended.is_set() or any(
                '"event": "listening"' in line for line in stderr), 60)
    return Daemon(first.split()[-1], proc, state, stderr, changed, ended)


def _log_level(state: Path, extra: tuple[str, ...]) -> str:
    config = Path(extra[extra.index("--config") + 1]) if "--config" in extra else \
        state / "hsmca.toml"
    try:
        return str(tomllib.loads(config.read_text()).get("server", {}).get("log-level",
                                                                           "info"))
    except (OSError, tomllib.TOMLDecodeError):
        return "info"


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A CA of its own (separate token) served for the end-to-end tests."""
    ca = init_ca(tmp_path_factory.mktemp("served"))
    d = start_daemon(ca.state)
    yield d
    d.stop()


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A CA of the test's own, served: for tests that change what a CA holds
    (revocations, keys), which the tests sharing the session's `daemon` must not see."""
    ca = init_ca(tmp_path / "own")
    d = start_daemon(ca.state)
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A real PostgreSQL server for the session (tests/pgserver.py), started on first
    use; each test that needs a database makes a fresh one on it."""
    from tests.pgserver import PostgresServer
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """Each implementation of the Store, empty: the store tests run against both."""
    if request.param == "sqlite":
        from ca.store.sqlite import SQLiteStore
        s: object = SQLiteStore(tmp_path / "inventory.sqlite3")
    else:
        from ca.store.postgres import PostgresStore
        s = PostgresStore(request.getfixturevalue("postgres_server").new_database())
    yield s
    s.close()  # type: ignore[attr-defined]


# The files whose tests take longest, first: with --dist loadfile each worker takes the
# next file in collection order as it finishes one, and a long file taken last left the
# other worker idle at the end of the run (the suite neared its 15 minutes). Roughly
# longest first (as a CI run measured them); the rest keep their order.
LONG_FILES = ("test_reliability.py", "test_cluster.py", "test_rotation.py", "test_workers.py",
              "test_client_cli.py", "test_cluster_faults.py", "test_client_ssh.py",
              "test_audit_remote.py", "test_acme_protocol.py", "test_operator_logs.py",
              "test_audit_log.py", "test_client_renew.py", "test_witness.py",
              "test_logged_revocations.py", "test_revocation_race.py", "test_revocation.py",
              "test_verify.py", "test_ui_browser.py", "test_store_move.py",
              "test_acme_clients.py", "test_file_modes.py", "test_init.py", "test_backup.py",
              "test_x509_e2e.py", "test_ssh_e2e.py", "test_bad_input.py",
              "test_cluster_held.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not (getattr(config.option, "numprocesses", None)
            or os.environ.get("PYTEST_XDIST_WORKER")):
        # One process (`pytest -x`, a mutation check): the files in their own order, the
        # quick ones early, so that a broken promise fails in minutes, not after every
        # long file (the acceptance check's mutant ran past its 14 minutes).
        return
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable
