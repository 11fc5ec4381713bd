"""The inventory in PostgreSQL: `ca.store.Store` for several nodes (docs/cluster.md).

psycopg 3 with its async connection pool, on an event loop of the store's own (one
thread per process): the store's callers live on other loops (each worker's, the
primary's, a test's `asyncio.run`) and on the signing thread (`add_cert`), and a
slow or absent server must never stall the loop that serves HTTPS. Every verb is
one transaction on a pooled connection; PostgreSQL's own group commit covers
concurrent commits. An unreachable server raises StoreUnavailable (callers answer
503) and the pool reconnects by itself when it is back.

The schema is SQLite's, migration for migration (the same numbers, the same tables,
translated by `_pg`), plus what several nodes share: the nodes' audit lines and
checkpoints, change counters (revocations, keys) that every node watches with
LISTEN/NOTIFY and a poll, and a sequence of CRL numbers. Migrations run at start
under an advisory lock, so nodes starting together apply each exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql as pgsql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ca.audit.tiles import HASH_SIZE, TILE_WIDTH, Tile, partial_tiles
from ca.store.errors import (
    AuditLinesMissing,
    CAExists,
    NodeNameTaken,
    NoInventory,
    SchemaTooNew,
    StoreUnavailable,
    TooManyPending,
)
from ca.store.records import (
    KEY_COLUMNS,
    AcmeAccount,
    AcmeAuthz,
    AcmeCert,
    AcmeChallenge,
    AcmeEAB,
    AcmeOrder,
    CertPage,
    CertQuery,
    CertRecord,
    CRLRecord,
    CrossCert,
    IssuanceCount,
    IssuedCert,
    KeyRecord,
    NewCert,
    NewSSHCert,
    NewToken,
    OCSPDue,
    OCSPRecord,
    Revoked,
    SSHCertPage,
    SSHCertQuery,
    SSHSelector,
    TokenRecord,
    authz_bases,
    authz_cover,
    crl_time,
    key_row,
    latest_of,
)
from ca.store.sqlite import (
    _CERT_COLS,
    _LIVE_SSH_CHILD,
    _READ_COLS,
    _READ_FROM,
    _SORTS,
    _SSH_COLS,
    _SUPERSEDED_HOST,
    KEEP_CRLS,
    MIGRATIONS,
    Table,
    _cert,
    _cert_filter,
    _latest,
    _read_cert,
    _read_ssh,
    _ssh_filter,
    _ssh_order,
)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
log = structlog.get_logger("hsmca.store")

CHANNEL = "hsmca_changes"  # NOTIFY payload: the name of the counter that moved
MIGRATION_LOCK = 0x6873_6D63_6100_0001  # pg_advisory_lock key: "hsmca" + 1
# pg_advisory_xact_lock(AUDIT_LOCK_CLASS, hashtext(node)): the lock a node's audit groups
# take. The two-key form: its keys never meet the one-key locks (migrations, leases).
AUDIT_LOCK_CLASS = 0x6873_6D63  # "hsmc"
# pg_advisory_xact_lock(CERT_LOCK_CLASS, hashtext(serial)): held by the transaction that
# adds a certificate's row, from its first statement to its COMMIT, so that a reader can
# wait for a commit given up on that may still land (settled_cert).
CERT_LOCK_CLASS = 0x6873_6365  # "hsce"
_CERT_LOCK = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
# An account's names waiting for validation (Store.acme_pending_authzs).
_PENDING_AUTHZS = ("SELECT count(*) FROM acme_authzs WHERE account_id = %s AND status IN "
                   "('pending', 'deactivated') AND expires > %s")
CONNECT_TIMEOUT_S = 3  # a node answers 503 quickly rather than hang on a dead server
RECONNECT_TIMEOUT_S = 5.0
RETRY_S = 1.0  # once the pool could not connect, how often a call tries it again
# How long a request's point read or write (a certificate by serial or fingerprint, a
# new certificate's row) may wait for PostgreSQL's answer. A server that stops
# answering without refusing (a frozen host, a failover whose old primary vanished)
# fails nothing: its kernel still accepts, acknowledges and answers keepalives, so
# neither libpq nor the server's own timeouts end the wait, and a trial's requests hung
# for the whole outage (28 s, 71 s, minutes). Given up after this, the call is refused
# as when the server is down, and so are the next ones until one gets through. Only
# those calls (`bounded`): one row by its key never takes this long from a server that
# answers, where a revocation of thousands, a CRL's build (every revoked certificate)
# or the refresher's backlog may, and must not fail for it (a review of a first draft
# that bounded every call).
# Also bounded: what a relying party's CRL or OCSP request reads (the keys, the latest
# CRL, a response by serial): with nothing else to notice a frozen server, those hung
# for the whole freeze, where the last CRL and tryLater were promised (a cluster trial).
# The latest CRL is one row by an index, its DER a few MB for a million revocations:
# well within the bound from a server that answers.
ANSWER_TIMEOUT_S = 10.0
# Serials per statement in revoke_certs: one array parameter, well under any limit.
_REVOKE_CHUNK = 2000
POLL_S = 0.25  # the fallback poll of the change counters (NOTIFY is the fast path)


# An ISO 8601 column's Unix seconds (the inventory keeps times as text, as SQLite does).
EPOCH = "CAST(EXTRACT(EPOCH FROM CAST({} AS timestamptz)) AS BIGINT)"


def _pg(script: str) -> str:
    """A SQLite migration in PostgreSQL's dialect. Text compares byte for byte (COLLATE
    "C"), as in SQLite: timestamps and hex serials are compared and sorted as text,
    and a database created with a natural-language collation would reorder them."""
    script = re.sub(r"\bBLOB\b", "BYTEA", script)
    script = re.sub(r"\bINTEGER\b", "BIGINT", script)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', script)


# What PostgreSQL needs beyond SQLite's migration of the same number.
_EXTRA: dict[int, str] = {
    1: """
    CREATE SEQUENCE crl_numbers;
    -- Change counters: a transaction that revokes (or changes keys) moves its counter and
    -- NOTIFYs; every node's primary watches them and tells its processes (generations).
    CREATE TABLE changes (name TEXT COLLATE "C" PRIMARY KEY, n BIGINT NOT NULL);
    INSERT INTO changes (name, n) VALUES ('revocations', 0), ('ssh_revocations', 0),
        ('keys', 0);
    -- Each node's audit log, line for line: the group commit is this table's commit.
    CREATE TABLE audit_lines (
        node TEXT COLLATE "C" NOT NULL,
        seq BIGINT NOT NULL,
        line BYTEA NOT NULL,              -- the canonical JSON line, without its newline
        PRIMARY KEY (node, seq)
    );
    CREATE TABLE audit_checkpoints (
        node TEXT COLLATE "C" PRIMARY KEY,
        size BIGINT NOT NULL,
        note TEXT COLLATE "C" NOT NULL,   -- the latest signed checkpoint of the node's log
        at TEXT COLLATE "C" NOT NULL
    );
    """,
    # cross_certs are listed in insertion order (SQLite's rowid).
    6: "ALTER TABLE cross_certs ADD COLUMN ord BIGSERIAL;",
    # Each node's tiles (C2SP tlog-tiles, 32-byte hashes): full ones, and the partial
    # tile of each level above 0, as the node's FileTileStore holds them; `bundles` is
    # how many full entry bundles they cover, set in the same transaction.
    8: """
    CREATE TABLE audit_tiles (
        node TEXT COLLATE "C" NOT NULL,
        level INTEGER NOT NULL,
        idx BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (node, level, idx)
    );
    CREATE TABLE audit_tile_heads (
        node TEXT COLLATE "C" PRIMARY KEY,
        bundles BIGINT NOT NULL
    );
    """,
}
# Migrations whose SQLite text uses SQLite's own functions, written anew for PostgreSQL.
_OWN: dict[int, str] = {
    7: """
    ALTER TABLE ocsp_responses ADD COLUMN refresh_at TEXT COLLATE "C";
    UPDATE ocsp_responses SET refresh_at = CASE
        WHEN serial IN (SELECT serial FROM certs WHERE revoked_at IS NOT NULL)
             AND status = 'good' THEN ''
        ELSE to_char((next_update::timestamptz - interval '12 hours') AT TIME ZONE 'UTC',
                     'YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"') END;
    INSERT INTO ocsp_responses (serial, status, this_update, next_update, der_sha1,
                                der_sha256, refresh_at)
        SELECT serial, 'pending', '', '', '\\x'::bytea, '\\x'::bytea, '' FROM certs
        WHERE serial NOT IN (SELECT serial FROM ocsp_responses);
    CREATE INDEX ocsp_responses_refresh_at ON ocsp_responses(refresh_at);
    """,
}
PG_MIGRATIONS: tuple[str, ...] = tuple(
    _OWN.get(number, _pg(script)) + _EXTRA.get(number, "")
    for number, script in enumerate(MIGRATIONS, start=1))


def _q(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s` (for SQL shared with sqlite.py)."""
    return sql.replace("%", "%%").replace("?", "%s")


class AuditGroupAbandoned(Exception):
    """A group of audit lines whose committer gave up before it reached PostgreSQL."""


class _NoAnswer(Exception):
    """A call PostgreSQL did not answer within the store's answer timeout."""


# The tables a certificate's issuance writes (its audit lines, its row, its OCSP
# responses, the token it spends, the change counters), and how long /health waits for
# a writer's lock on them before it asks who holds it.
WRITTEN_TABLES = ("audit_lines", "audit_checkpoints", "audit_tiles", "audit_tile_heads",
                  "certs", "ssh_certs", "ssh_revoked_keys", "ocsp_responses", "crls",
                  "tokens", "acme_orders", "acme_authzs", "changes", "meta")
HELD_LOOK_MS = 300  # for each table's lock
HELD_LOOK_ALL_MS = 1000  # for them all, within /health's 2 s
HELD_SAID_S = 1.0  # one look a second per process, whatever asks /health
# Who holds, or waits for, a lock that a writer's ROW EXCLUSIVE waits behind, on those
# tables (as the search path finds them, as the CA's statements do): one asked for and
# queued (an ALTER TABLE behind a long read) holds every writer after it too (a re-trial
# saw no session named).
_HOLDERS = """
SELECT c.relname, l.mode, l.pid, l.granted FROM pg_locks l
  JOIN pg_class c ON c.oid = l.relation
 WHERE l.pid <> pg_backend_pid() AND c.oid = ANY(%s::text[]::regclass[])
   AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                  'AccessExclusiveLock')
 ORDER BY l.granted DESC, c.relname, l.pid"""


def _held_words(rows: Sequence[tuple[Any, ...]]) -> str:
    """/health's words for the locks that hold writes back."""
    who = "; ".join(f"{table}: {mode} {'of' if granted else 'asked for, and waited for, by'} "
                    f"PostgreSQL session {pid}" for table, mode, pid, granted in rows[:3]
                    ) or "a lock another session holds"
    return (f"writes wait on a lock another session holds ({who}), so nothing is signed "
            "until it is released: see pg_locks and pg_stat_activity for what it runs")


class _Undo(Exception):
    """Raised inside a transaction to roll it back and hand `value` to the caller."""

    def __init__(self, value: object) -> None:
        super().__init__("undone")
        self.value = value


def _ours(task: asyncio.Task[Any]) -> bool:
    """Whether `task` runs this module's code (a call, a probe), not the pool's."""
    code = getattr(task.get_coro(), "cr_code", None)
    # (this function's own file name, as the code objects have it: `__file__` ends in
    # .pyc where only the bytecode is installed)
    return code is not None and code.co_filename == _ours.__code__.co_filename


class PostgresStore:
    schema_version = len(PG_MIGRATIONS)

    def __init__(self, url: str, *, max_size: int = 8, existing: bool = False,
                 answer_timeout_s: float = ANSWER_TIMEOUT_S, reading: bool = False) -> None:
        """`existing`: the database must hold an inventory already (a node's start),
        else it is refused untouched; without, an empty one gets the schema (init, a
        move). `answer_timeout_s`: how long a call waits for an answer (the tests
        shorten it). `reading`: a command that only reads (`hsmca key list` while
        every node is stopped): a schema other than this code's is refused, never
        migrated, which is a node's start to do."""
        self.url = url
        self.answer_timeout_s = answer_timeout_s
        self._existing = existing or reading
        self._reading = reading
        self.migrated_from: int | None = None
        self._down: str | None = None
        # (node, epoch, token) once this process claimed a node (claim_node): its every
        # group of that node's lines checks that no other process claimed it since.
        self._claimed: tuple[str, int, str] | None = None
        # The last call waited CONNECT_TIMEOUT_S for a connection in vain; whether a
        # call is trying again, and when the next may (see _guard).
        self._unreachable = False
        self._probing: asyncio.Future[None] | None = None  # probes until it answers
        # writes_held's look, and its last answer with when it was had
        self._held_look: asyncio.Future[str | None] | None = None
        self._held_said: str | None = None
        self._held_at = float("-inf")
        self._checking: asyncio.Future[None] | None = None  # see _check_idle
        self._retry_at = 0.0  # time.monotonic(): no probe before this
        # Calls given up on, still finishing (their connections held meanwhile).
        self._abandoned: set[asyncio.Future[Any]] = set()
        self._said_pending: set[str] = set()  # serials whose commit was said to be pending
        # Why the pool's last attempt to connect failed (None once one succeeds): a
        # wait for a connection says only that it timed out, and running nodes said
        # "couldn't get a connection after 3.00 sec" for a changed password, which only
        # PostgreSQL's own log named (a cluster trial).
        self._connect_error: str | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="store-pg",
                                        daemon=True)
        self._thread.start()
        self._pool: AsyncConnectionPool[Any] | None = None
        self._watchers: list[asyncio.Task[None]] = []
        try:
            self._call(self._open(max_size))
        except BaseException:
            self.close()
            raise

    # ---- the store's own loop -------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, T], *, own: bool = False,
               bounded: bool = False) -> cf.Future[T]:
        return asyncio.run_coroutine_threadsafe(
            self._guard(coro, own, self.answer_timeout_s if bounded else None), self._loop)

    def _call(self, coro: Coroutine[Any, Any, T], bounded: bool = False) -> T:
        return self._spawn(coro, bounded=bounded).result()

    async def _run(self, coro: Coroutine[Any, Any, T], *, own: bool = False,
                   bounded: bool = False) -> T:
        return await asyncio.wrap_future(self._spawn(coro, own=own, bounded=bounded))

    async def _guard(self, coro: Coroutine[Any, Any, T], own: bool = False,
                     deadline: float | None = None) -> T:
        """`coro`'s value, or StoreUnavailable. `own`: it uses a connection of its own,
        not the pool's (a lease): it neither waits on the pool nor says whether the pool
        can connect. `deadline`: seconds to wait for it (None: as long as it takes)."""
        if not own and self._unreachable:
            # The pool could not connect within CONNECT_TIMEOUT_S, or a call got no
            # answer: this one is refused at once, not after the same wait (a node
            # answered every request 3 to 20 s late while the database was away). A
            # probe of its own, not a caller's request, finds out whether the server
            # answers again, every RETRY_S: a request made the trial, and waited the
            # whole answer timeout each time (a review: one client had 5 of 21 calls
            # at 10 s).
            self._keep_probing()
            coro.close()
            raise StoreUnavailable(f"the inventory (PostgreSQL) is unavailable: "
                                   f"{self._down}")
        try:
            value = await (coro if deadline is None else self._within(coro, deadline))
        except _NoAnswer:
            self._down = f"no answer within {deadline:.0f} s"
            if not own:  # the calls that follow are refused at once, one tries again
                self._unreachable = True
                self._retry_at = time.monotonic() + RETRY_S
                self._keep_probing()
            log.warning("PostgreSQL did not answer in time: calls are refused until it "
                        "does", within_s=deadline)
            raise StoreUnavailable(f"the inventory (PostgreSQL) is unavailable: "
                                   f"{self._down}") from None
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            # A pool full of calls given up on (each keeps its connection while psycopg
            # cancels it, up to 10 s) is the silent server again: said as such, and the
            # calls after it refused at once, not after a 3 s wait for a connection each
            # (a review measured 60 of 80 calls so).
            silent = isinstance(exc, PoolTimeout) and bool(self._abandoned) and \
                self._down is not None
            if not silent:
                self._down = _why(exc)
                if isinstance(exc, PoolTimeout) and self._connect_error is not None:
                    self._down = f"cannot connect: {self._connect_error}"
            if not own:
                self._unreachable = isinstance(exc, PoolTimeout) and (
                    silent or self._cannot_connect())
                self._retry_at = time.monotonic() + RETRY_S
                if self._unreachable:
                    self._keep_probing()
            raise StoreUnavailable(f"the inventory (PostgreSQL) is unavailable: "
                                   f"{self._down}") from None
        if not own:
            # A call of the pool's was answered. Not one on a connection of its own: a
            # lease's close succeeds without the server, and at a stop with PostgreSQL
            # frozen that let the last checkpoint wait its 10 s again.
            self._down = None
            self._unreachable = False
        return value

    def _keep_probing(self) -> None:
        """Probe every RETRY_S until the server answers, whether or not calls come: a
        process that no call reached after the database came back (a worker, /health)
        refused its first one, a minute later still, with the outage's reason (a
        cluster trial)."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while self._unreachable and not self._closed:
            await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
            if not self._unreachable or self._closed:
                return
            try:
                await self._try_again()
            except Exception as exc:  # not psycopg's: said, and tried again
                log.warning("the probe of PostgreSQL failed", error=str(exc) or repr(exc))
                self._retry_at = time.monotonic() + RETRY_S

    async def _try_again(self) -> None:
        """While refusing calls: whether the server answers again, on a connection of
        its own (the pool's may all be held by calls given up on)."""
        try:
            conn = await self.connect_own()
            try:
                await self._within(conn.execute("SELECT 1"), CONNECT_TIMEOUT_S)
            finally:
                await self._within(conn.close(), CONNECT_TIMEOUT_S)
        except (psycopg.Error, _NoAnswer, OSError) as exc:
            if isinstance(exc, psycopg.OperationalError):  # as the pool's attempts say it
                self._down = f"cannot connect: {_why(exc)}"
            self._retry_at = time.monotonic() + RETRY_S
        else:
            self._down = None
            self._unreachable = False

    async def _within(self, coro: Coroutine[Any, Any, T], deadline: float) -> T:
        """`coro`'s value, or _NoAnswer after `deadline` s. Not asyncio.wait_for, which
        waits for the cancelled call to finish: its clean-up (a rollback, psycopg's
        cancel) waits on the same silent server. It finishes on this loop alone, kept
        among the abandoned (which hold pooled connections) until it has."""
        task = asyncio.ensure_future(coro)
        try:
            done, _ = await asyncio.wait({task}, timeout=deadline)
        except BaseException:  # the caller went away: so does the call
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(self._forget)
            raise _NoAnswer
        return task.result()

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # read: its failure was the caller's StoreUnavailable

    async def connect_own(self) -> Conn:
        """A connection of its own, outside the pool (a start's migrations, a probe, a
        lease, the change watcher), within the connect timeout."""
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                     connect_timeout=CONNECT_TIMEOUT_S)

    def _cannot_connect(self) -> bool:
        """After a wait for a connection in vain: whether the pool could not make one
        (fewer connections than it may have), not merely had all of its own busy (a slow
        statement, a lock wait), when the calls that follow must wait their turn."""
        stats = self.pool.get_stats()
        return stats["pool_size"] < stats["pool_max"]

    async def _open(self, max_size: int) -> None:
        conn = await self.connect_own()
        try:
            if self._existing:
                cur = await conn.execute("SELECT to_regclass('schema_version')")
                row = await cur.fetchone()
                if row is None or row[0] is None:
                    from ca.store_move import database_name
                    raise NoInventory(f"the database {database_name(self.url)} holds no hsmca "
                                      "inventory: is it the one `hsmca init --store-url` "
                                      "made the CA in? (nothing was written to it)")
            if self._reading:
                await _same_schema(conn)
            else:
                self.migrated_from = await migrate(conn)
        finally:
            await conn.close()
        store = self

        class Remembering(psycopg.AsyncConnection):  # type: ignore[type-arg]
            @classmethod
            async def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    conn = await super().connect(*args, **kwargs)
                except psycopg.Error as exc:
                    store._connect_error = _why(exc)
                    raise
                store._connect_error = None
                return conn

        async def check(conn: Any) -> None:
            # A connection the server dropped (a restart) is found out before use, and
            # with it the others idle in the pool (_check_idle).
            try:
                await AsyncConnectionPool.check_connection(conn)
            except Exception:
                await store._check_idle()
                raise

        self._pool = AsyncConnectionPool(
            self.url, min_size=1, max_size=max_size, open=False, timeout=CONNECT_TIMEOUT_S,
            connection_class=Remembering,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S},
            check=check,
            # The pool's own attempts to reconnect back off exponentially (1, 2, 4 ...
            # 64 s): after a minute's outage a node stayed down for most of another.
            # Given up after a few seconds instead, the next request that wants a
            # connection (every second, the probe that brings /health back) tries anew.
            reconnect_timeout=RECONNECT_TIMEOUT_S)
        await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)

    async def _check_idle(self) -> None:
        """One pooled connection found dropped: the others idle in the pool are checked
        at once, the dropped ones replaced. A restart of the server drops them all, and
        the pool hands a call the next one only after a pause (none, 1 s, then 2 s) to
        the end of its wait for a connection: a worker no call reached during an outage
        kept its dead connections, and the first call after it waited 3 s and was
        refused, with the calls in the second after it, while the server answered (a
        PostgreSQL trial). One check at a time, on a task of its own: finished even if
        the call that asked is cancelled (the pool's check holds the connections it
        checks meanwhile), and waited for no longer than a connection is (a server that
        stopped answering holds it)."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._check_pool())
        await asyncio.wait({self._checking}, timeout=CONNECT_TIMEOUT_S)

    async def _check_pool(self) -> None:
        with contextlib.suppress(Exception):  # a pool that closes meanwhile
            await self.pool.check()

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        assert self._pool is not None
        return self._pool

    @property
    def healthy(self) -> bool:
        return self._down is None and self._thread.is_alive()

    @property
    def problem(self) -> str | None:
        if self._down is None and self._connect_error is not None:
            return f"cannot connect: {self._connect_error}"  # the pool's own attempts
        return self._down

    async def probe(self) -> None:
        """Ask the server (for /health): `healthy` follows the answer, so a node whose
        database came back is healthy again before any other request reaches it (a
        load balancer sends none to a node its health check marked down)."""
        await self._rows("SELECT 1")

    async def writes_held(self) -> str | None:
        """Whether another session holds a lock that stops this CA's writes (for
        /health): a DBA's `LOCK TABLE`, `VACUUM FULL` or `CREATE INDEX` on certs, say,
        held every renewal while /health said "ok" (a PostgreSQL trial). Asked as a
        writer asks, with a lock no reader or writer of the CA's conflicts with, given
        up on after a moment and rolled back: which table waits, and who holds it. One
        look at a time, its answer kept a second: /health is anyone's to ask, and each
        look holds a connection of the pool (a review)."""
        now = time.monotonic()
        if now - self._held_at < HELD_SAID_S:
            return self._held_said
        if self._held_look is None or self._held_look.done():
            self._held_look = asyncio.ensure_future(self._look_for_held())
            # read even when every /health that waited for it gave up (no "exception
            # was never retrieved" in the log: a review)
            self._held_look.add_done_callback(lambda f: f.cancelled() or f.exception())
        said = await asyncio.shield(self._held_look)
        self._held_said, self._held_at = said, time.monotonic()
        return said

    async def _look_for_held(self) -> str | None:
        async def look(db: Conn) -> str | None:  # (its answer comes in _Undo)
            await db.execute(f"SET LOCAL lock_timeout = {HELD_LOOK_MS}")
            await db.execute(f"SET LOCAL statement_timeout = {HELD_LOOK_ALL_MS}")
            try:
                async with db.transaction():
                    await db.execute(f"LOCK TABLE {', '.join(WRITTEN_TABLES)} IN ROW "
                                     "EXCLUSIVE MODE")
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                cur = await db.execute(_HOLDERS, (list(WRITTEN_TABLES),))
                raise _Undo(_held_words(await cur.fetchall())) from None
            except psycopg.errors.InsufficientPrivilege:
                pass  # a role that may write rows but not lock tables: no answer here
            raise _Undo(None)
        return await self._tx(look, bounded=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shut() -> None:
            for task in self._watchers:
                task.cancel()
            if self._probing is not None:  # nothing to wait for: the store closes
                self._probing.cancel()
            # What of ours still runs on this loop (the watchers just cancelled, calls
            # given up on, a probe, a lease's connection being closed): a moment to end,
            # not the pool's whole wait ("Task was destroyed but it is pending", a review
            # and a trial saw at close). Not the pool's own tasks, which run until it
            # closes: waited for, they made every close take the whole 2 s (each node's
            # stop, each command).
            ending: set[asyncio.Future[Any]] = {
                task for task in asyncio.all_tasks()
                if task is not asyncio.current_task() and _ours(task)} | self._abandoned \
                | set(self._watchers)
            if ending:
                _, late = await asyncio.wait(ending, timeout=2)
                # One still in psycopg's cancellation of its query, which waits 5 s for
                # the server to take the cancel and 5 s more for the query to end (with
                # PostgreSQL frozen, the change watcher's held a node's stop 10 s):
                # cancelled again, psycopg closes its connection at once. What a call
                # sent stays the server's to commit or not, as it was (the next start
                # waits for such a commit).
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late, timeout=1)
                for task in ending:  # read, so that asyncio does not say it never was
                    if task.done() and not task.cancelled():
                        task.exception()
            if self._pool is not None:
                await self._pool.close(timeout=5)
            # Whatever is left (a call given up on still waiting for psycopg's
            # cancellation, a lease's close spawned meanwhile) is cancelled and let end,
            # as asyncio.run does at its end: stopped with the loop, it was destroyed
            # pending, and said so on stderr after "stopped" now and then.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            if rest:
                await asyncio.wait(rest, timeout=1)
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=15)
            except Exception as exc:  # closing: nothing left to protect
                log.warning("closing the PostgreSQL pool failed", error=str(exc))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    async def _rows(self, sql: str, args: Sequence[Any] = (), bounded: bool = False
                    ) -> list[tuple[Any, ...]]:
        async def read() -> list[tuple[Any, ...]]:
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql, args)
                return await cur.fetchall()
        return await self._run(read(), bounded=bounded)

    async def _tx(self, fn: Callable[[Conn], Awaitable[T]], bounded: bool = False) -> T:
        """`fn(conn)` in one transaction, committed before this returns; _Undo rolls it
        back and returns its value. `bounded`: within the answer timeout."""
        async def run() -> T:
            async with self.pool.connection() as conn:
                try:
                    async with conn.transaction():
                        return await fn(conn)
                except _Undo as undo:
                    return undo.value  # type: ignore[return-value]
        return await self._run(run(), bounded=bounded)

    def _tx_future(self, fn: Callable[[Conn], Awaitable[T]], bounded: bool = False
                   ) -> cf.Future[T]:
        """`_tx` for a caller on any thread (the signing thread)."""
        async def run() -> T:
            async with self.pool.connection() as conn, conn.transaction():
                return await fn(conn)
        return self._spawn(run(), bounded=bounded)

    # ---- tokens -------------------------------------------------------------------------

    async def add_token(self, token: NewToken) -> None:
        async def insert(db: Conn) -> None:
            await db.execute(
                "INSERT INTO tokens (id, secret_sha256, role, names, principals, expires, "
                "created_at, created_by) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                (token.id, token.secret_sha256, token.role,
                 json.dumps([list(n) for n in token.names]), json.dumps(list(token.principals)),
                 token.expires, token.created_at, token.created_by))
        await self._tx(insert)

    async def token_by_secret(self, secret_sha256: str) -> TokenRecord | None:
        rows = await self._rows("SELECT id, role, names, principals, expires, used_at, "
                                "used_serial, released_at FROM tokens WHERE secret_sha256 = %s",
                                (secret_sha256,))
        if not rows:
            return None
        r = rows[0]
        return TokenRecord(r[0], r[1], tuple((k, v) for k, v in json.loads(r[2])),
                           tuple(json.loads(r[3])), r[4], r[5], r[6], r[7])

    async def consume_token(self, token_id: str, at: dt.datetime) -> bool:
        # READ COMMITTED: of concurrent UPDATEs (on any node), the second waits for the
        # first's row lock, re-reads the row and finds used_at set: exactly one wins.
        async def consume(db: Conn) -> int:
            cur = await db.execute("UPDATE tokens SET used_at = %s WHERE id = %s AND used_at "
                                   "IS NULL", (at.isoformat(), token_id))
            return cur.rowcount
        return await self._tx(consume) == 1

    async def release_token(self, token_id: str) -> None:
        async def restore(db: Conn) -> None:
            await db.execute("UPDATE tokens SET used_at = NULL WHERE id = %s AND used_serial "
                             "IS NULL", (token_id,))
        await self._tx(restore)

    async def settle_tokens(self, released: Sequence[str], spent_since: dt.datetime | None,
                            at: dt.datetime, enrolled: Sequence[str] = ()) -> tuple[int, int]:
        async def settle(db: Conn) -> tuple[int, int]:
            cur = await db.execute("UPDATE tokens SET released_at = %s WHERE released_at IS "
                                   "NULL AND used_serial = ANY(%s)",
                                   (at.isoformat(), list(released)))
            marked = cur.rowcount
            given = 0
            if spent_since is not None:
                cur = await db.execute("UPDATE tokens SET used_at = NULL WHERE used_at IS NOT "
                                       "NULL AND used_serial IS NULL AND used_at >= %s AND "
                                       "NOT (id = ANY(%s))",
                                       (spent_since.isoformat(), list(enrolled)))
                given = cur.rowcount
            return marked, given
        return await self._tx(settle)

    async def token_released(self, token_id: str, at: dt.datetime) -> None:
        async def mark(db: Conn) -> None:
            await db.execute("UPDATE tokens SET released_at = %s WHERE id = %s AND used_serial "
                             "IS NOT NULL", (at.isoformat(), token_id))
        await self._tx(mark)

    async def release_token_spent_on(self, serial: int) -> str | None:
        async def restore(db: Conn) -> str | None:
            cur = await db.execute("UPDATE tokens SET used_at = NULL, used_serial = NULL, "
                                   "released_at = NULL "
                                   "WHERE used_serial = %s RETURNING id",
                                   (format(serial, "x"),))
            row = await cur.fetchone()
            return None if row is None else str(row[0])
        return await self._tx(restore)

    # ---- X.509 certificates -------------------------------------------------------------

    def add_cert(self, cert: NewCert) -> cf.Future[None]:
        serial = format(cert.serial, "x")

        async def insert(db: Conn) -> None:
            # First, and held to the COMMIT: see settled_cert.
            await db.execute(_CERT_LOCK, (CERT_LOCK_CLASS, serial))
            await db.execute(
                "INSERT INTO certs (serial, fingerprint, role, subject, names, principals, "
                "spki_sha256, not_before, not_after, issued_at, der, issuer, renewed_from, "
                "audit_seq, audit_log) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (serial, cert.fingerprint, cert.role, cert.subject,
                 json.dumps(list(cert.names)), json.dumps(list(cert.principals)),
                 cert.spki_sha256, cert.not_before, cert.not_after, cert.issued_at, cert.der,
                 cert.issuer, cert.renewed_from, cert.audit_seq, cert.audit_log))
            # Due for its first OCSP responses at once (the refresher's index).
            await db.execute("INSERT INTO ocsp_responses (serial, status, this_update, "
                             "next_update, der_sha1, der_sha256, refresh_at) VALUES "
                             "(%s, 'pending', '', '', '', '', '')", (serial,))
            if cert.token_id is not None:
                await db.execute("UPDATE tokens SET used_serial = %s WHERE id = %s",
                                 (serial, cert.token_id))
            if cert.acme_account is not None and cert.acme_order is not None:
                await db.execute("INSERT INTO acme_certs (serial, account_id, order_id) "
                                 "VALUES (%s,%s,%s)", (serial, cert.acme_account,
                                                       cert.acme_order))
                # Still `processing`: valid once released (release_acme_order).
                await db.execute("UPDATE acme_orders SET cert_serial = %s, error = NULL "
                                 "WHERE id = %s", (serial, cert.acme_order))
        return self._tx_future(insert, bounded=True)  # a request waits on it

    async def cert(self, serial: int) -> CertRecord | None:
        rows = await self._rows(f"SELECT {_CERT_COLS} FROM certs WHERE serial = %s",
                                (format(serial, "x"),), bounded=True)
        return _cert(rows[0]) if rows else None

    async def cert_by_fingerprint(self, fingerprint: str) -> CertRecord | None:
        # With its ACME order: a certificate issued over ACME is renewed over ACME only.
        rows = await self._rows(f"SELECT {_READ_COLS} FROM {_READ_FROM} WHERE "
                                "c.fingerprint = %s", (fingerprint,), bounded=True)
        return _read_cert(rows[0]) if rows else None

    async def revoked_certs(self) -> list[tuple[int, dt.datetime, str | None, str | None]]:
        return [(int(s, 16), dt.datetime.fromisoformat(at), reason, issuer)
                for s, at, reason, issuer in await self._rows(
                    "SELECT serial, revoked_at, reason, issuer FROM certs "
                    "WHERE revoked_at IS NOT NULL")]

    # PostgreSQL allows one recursive term: each step goes back (a certificate's
    # predecessor) and forward (its successors) in one join.
    _FAMILY = (
        "WITH RECURSIVE family(serial) AS (SELECT %s::text COLLATE \"C\" UNION "
        "SELECT CASE WHEN c.serial = f.serial THEN c.renewed_from ELSE c.serial END "
        "FROM certs c JOIN family f ON (c.serial = f.serial AND c.renewed_from IS NOT NULL) "
        "OR c.renewed_from = f.serial) ")

    async def lineage(self, serial: int, now: dt.datetime) -> list[int]:
        rows = await self._rows(
            self._FAMILY + "SELECT c.serial FROM certs c JOIN family f ON c.serial = f.serial "
            "WHERE c.revoked_at IS NULL AND c.not_after > %s",
            (format(serial, "x"), now.isoformat()))
        return sorted(int(r[0], 16) for r in rows)

    async def live_certs_named(self, name: str, now: dt.datetime) -> list[int]:
        rows = await self._rows(
            "SELECT serial FROM certs WHERE revoked_at IS NULL AND role <> 'server' AND "
            "names::jsonb ? %s AND "
            f"(not_after > %s OR {_LIVE_SSH_CHILD.format(integer='NUMERIC', p='%s')})",
            (name, now.isoformat(), int(now.timestamp())))
        return sorted(int(r[0], 16) for r in rows)

    async def revoked_certs_named(self, name: str, now: dt.datetime
                                  ) -> list[tuple[int, str | None]]:
        rows = await self._rows(
            "SELECT serial, reason FROM certs WHERE revoked_at IS NOT NULL AND role <> "
            "'server' AND names::jsonb ? %s AND not_after > %s", (name, now.isoformat()))
        return sorted((int(r[0], 16), r[1]) for r in rows)

    async def live_certs_with_keys(self, spkis: Sequence[str], now: dt.datetime) -> list[int]:
        rows = await self._rows(
            "SELECT serial FROM certs WHERE revoked_at IS NULL AND spki_sha256 = ANY(%s) "
            "AND not_after > %s", (sorted(set(spkis)), now.isoformat()))
        return sorted(int(r[0], 16) for r in rows)

    async def revoke_certs(self, serials: Sequence[int], at: dt.datetime,
                           reason: str | None) -> Revoked:
        hexes = [format(s, "x") for s in serials]

        async def mark(db: Conn) -> Revoked:
            # Set statements over chunks, not three round trips per serial: a revocation
            # of thousands (`revoke --identity`, a keyCompromise sweep) took seconds.
            done: set[str] = set()
            ssh = 0
            for i in range(0, len(hexes), _REVOKE_CHUNK):
                chunk = hexes[i:i + _REVOKE_CHUNK]
                cur = await db.execute("UPDATE certs SET revoked_at = %s, reason = %s WHERE "
                                       "serial = ANY(%s) AND revoked_at IS NULL "
                                       "RETURNING serial", (at.isoformat(), reason, chunk))
                hit = [r[0] for r in await cur.fetchall()]
                if reason == "keyCompromise":  # see Store.revoke_certs; those just revoked
                    # carry the reason already, so this touches only earlier revocations
                    cur = await db.execute("UPDATE certs SET reason = %s WHERE serial = "
                                           "ANY(%s) AND revoked_at IS NOT NULL AND reason "
                                           "IS DISTINCT FROM %s RETURNING serial",
                                           (reason, chunk, reason))
                    hit += [r[0] for r in await cur.fetchall()]
                if hit:
                    done.update(hit)
                    await db.execute("UPDATE ocsp_responses SET refresh_at = '' WHERE "
                                     "serial = ANY(%s)", (hit,))
                cur = await db.execute("UPDATE ssh_certs SET revoked_at = %s WHERE "
                                       "owner_serial = ANY(%s) AND revoked_at IS NULL",
                                       (at.isoformat(), chunk))
                ssh += cur.rowcount
            if done:
                await _changed(db, "revocations")
            if ssh:
                await _changed(db, "ssh_revocations")
            return Revoked(tuple(int(h, 16) for h in dict.fromkeys(hexes) if h in done), ssh)
        return await self._tx(mark)

    # ---- reading the inventory ------------------------------------------------------------

    async def find_certs(self, query: CertQuery, now: dt.datetime,
                         soon: dt.datetime) -> CertPage:
        if query.sort not in _SORTS:
            raise ValueError(f"unknown sort {query.sort!r}")
        where, args = _cert_filter(query, now, soon, EPOCH)
        where = _q(where)
        order = " DESC" if query.descending else ""
        columns = ", ".join(f"{c}{order}" for c in _SORTS[query.sort].split(", "))
        tie = "" if query.sort == "serial" else f", length(c.serial){order}, c.serial{order}"
        total = int((await self._rows(f"SELECT COUNT(*) FROM {_READ_FROM}{where}", args))[0][0])
        rows = await self._rows(f"SELECT {_READ_COLS} FROM {_READ_FROM}{where} ORDER BY "
                                f"{columns}{tie} LIMIT %s OFFSET %s",
                                (*args, query.limit, query.offset))
        return CertPage(total, tuple(_read_cert(r) for r in rows))

    async def find_ssh_certs(self, query: SSHCertQuery, now: dt.datetime,
                             soon: dt.datetime) -> SSHCertPage:
        where, args = _ssh_filter(query, int(now.timestamp()), int(soon.timestamp()),
                                  "BIGINT")
        where = _q(where)
        order = _ssh_order(query, "BIGINT")
        total = int((await self._rows(f"SELECT COUNT(*) FROM ssh_certs{where}", args))[0][0])
        rows = await self._rows(f"SELECT {_SSH_COLS} FROM ssh_certs{where} ORDER BY {order} "
                                "LIMIT %s OFFSET %s", (*args, query.limit, query.offset))
        return SSHCertPage(total, tuple(_read_ssh(r) for r in rows))

    async def issued_cert(self, serial: int) -> IssuedCert | None:
        rows = await self._rows(f"SELECT {_READ_COLS}, c.der FROM {_READ_FROM} WHERE "
                                "c.serial = %s", (format(serial, "x"),), bounded=True)
        return IssuedCert(_read_cert(rows[0]), bytes(rows[0][-1])) if rows else None

    async def settled_cert(self, serial: int) -> IssuedCert | None:
        # A COMMIT given up on may still land: one held by a stalled disk whenever the
        # disk answers, one waiting for a synchronous standby as soon as the cancel
        # reaches it (committed locally all the same). The add's transaction holds the
        # serial's lock from before its INSERT to its COMMIT, and its client sends that
        # COMMIT only once the INSERT has run: a row that can still land is one whose
        # lock is held. Waited for here, up to a little less than the answer timeout, so
        # that the server says the wait was too long (lock_timeout), not the store's
        # deadline, which would call the server silent.
        key = format(serial, "x")
        wait_ms = max(1, int(self.answer_timeout_s * 800))

        async def read() -> tuple[bool, list[tuple[Any, ...]]]:
            async with self.pool.connection() as conn:
                try:
                    async with conn.transaction():
                        # Each statement sees what committed before it began (a server
                        # whose default is REPEATABLE READ would show the row as it was
                        # before the lock was waited for).
                        await conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        cur = await conn.execute(
                            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                            (CERT_LOCK_CLASS, key))
                        if not (await cur.fetchone() or (False,))[0]:
                            if key not in self._said_pending:  # once, not at every retry
                                self._said_pending.add(key)
                                log.warning("a commit of this certificate's inventory row "
                                            "that was given up on is still pending; "
                                            "waiting for it", serial=key)
                            await conn.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                            await conn.execute(_CERT_LOCK, (CERT_LOCK_CLASS, key))
                        cur = await conn.execute(f"SELECT {_READ_COLS}, c.der FROM "
                                                 f"{_READ_FROM} WHERE c.serial = %s", (key,))
                        return True, await cur.fetchall()
                except psycopg.errors.LockNotAvailable:
                    return False, []
        settled, rows = await self._run(read(), bounded=True)
        if settled and key in self._said_pending:
            self._said_pending.discard(key)
            log.info("the pending commit of this certificate's inventory row has ended",
                     serial=key, landed=bool(rows))
        if not settled:
            raise StoreUnavailable(
                f"a commit of certificate {key}'s inventory row that was given up on is "
                "still pending in PostgreSQL (a synchronous standby or the disk holds it): "
                "it ends when the standby answers (or synchronous_standby_names no longer "
                "waits for it) or the disk does")
        return IssuedCert(_read_cert(rows[0]), bytes(rows[0][-1])) if rows else None

    async def renewal_family(self, serial: int) -> list[CertRecord]:
        rows = await self._rows(
            self._FAMILY + f"SELECT {_READ_COLS} FROM {_READ_FROM} JOIN family f ON "
            "c.serial = f.serial ORDER BY c.issued_at, length(c.serial), c.serial",
            (format(serial, "x"),))
        return [_read_cert(r) for r in rows]

    async def issuance_counts(self, since: dt.datetime, until: dt.datetime
                              ) -> list[IssuanceCount]:
        window = (since.isoformat(), until.isoformat())
        rows = await self._rows(
            "SELECT CASE WHEN a.serial IS NULL THEN 'x509-' || c.role ELSE 'acme' END, "
            f"substr(c.issued_at, 1, 13), COUNT(*) FROM {_READ_FROM} "
            "WHERE c.issued_at >= %s AND c.issued_at < %s GROUP BY 1, 2 UNION ALL "
            "SELECT 'ssh-' || cert_type, substr(issued_at, 1, 13), COUNT(*) FROM ssh_certs "
            "WHERE issued_at >= %s AND issued_at < %s GROUP BY 1, 2 ORDER BY 2, 1",
            (*window, *window))
        return [IssuanceCount(kind, hour, int(n)) for kind, hour, n in rows]

    # ---- SSH certificates ---------------------------------------------------------------

    def add_ssh_cert(self, cert: NewSSHCert) -> cf.Future[None]:
        async def insert(db: Conn) -> None:
            await db.execute(
                "INSERT INTO ssh_certs (serial, key_id, cert_type, key_sha256, public_key, "
                "principals, valid_after, valid_before, owner_serial, issued_at, issuer) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (str(cert.serial), cert.key_id, cert.cert_type, cert.key_sha256,
                 cert.public_key, json.dumps(list(cert.principals)), str(cert.valid_after),
                 str(cert.valid_before), cert.owner_serial, cert.issued_at, cert.issuer))
        return self._tx_future(insert)

    async def count_ssh_certs(self, which: SSHSelector, revoked: bool = False) -> int:
        where, arg = _ssh_where(which)
        return int((await self._rows(f"SELECT COUNT(*) FROM ssh_certs WHERE {where} AND "
                                     f"revoked_at IS {'NOT ' if revoked else ''}NULL",
                                     (arg,)))[0][0])

    async def revoke_ssh(self, which: SSHSelector, at: dt.datetime,
                         revoke_key: str | None = None) -> int:
        where, arg = _ssh_where(which)

        async def mark(db: Conn) -> int:
            if revoke_key is not None:
                await db.execute("INSERT INTO ssh_revoked_keys (public_key, revoked_at) VALUES "
                                 "(%s, %s) ON CONFLICT DO NOTHING", (revoke_key, at.isoformat()))
            cur = await db.execute(f"UPDATE ssh_certs SET revoked_at = %s WHERE {where} "
                                   "AND revoked_at IS NULL", (at.isoformat(), arg))
            if cur.rowcount or revoke_key is not None:
                await _changed(db, "ssh_revocations")
            return cur.rowcount
        return await self._tx(mark)

    async def revoked_ssh_certs(self) -> list[tuple[str, int, str | None]]:
        return [(t, int(s), issuer) for t, s, issuer in await self._rows(
            "SELECT cert_type, serial, issuer FROM ssh_certs WHERE revoked_at IS NOT NULL")]

    async def compromised_keys(self) -> list[str]:
        return [r[0] for r in await self._rows("SELECT DISTINCT spki_sha256 FROM certs WHERE "
                                               "reason = 'keyCompromise'")]

    async def revoked_ssh_keys(self) -> list[str]:
        return [r[0] for r in await self._rows("SELECT public_key FROM ssh_revoked_keys")]

    async def node_sessions_busy(self, node: str) -> int:
        """How many sessions of the node `node`'s processes (by their application name),
        other than this one, are running a statement: at that node's start, before it
        serves, any is its previous run's, killed, whose last COMMIT may still land.
        With none, what that run left uncommitted never will be (its statements are sent
        one at a time, COMMIT last; a session whose client died aborts)."""
        rows = await self._rows(
            "SELECT application_name FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND datname = current_database() AND (state = 'active' OR state IS NULL)")
        # Matched here, as PostgreSQL keeps the names: cut to 63 bytes (a node named by
        # a long host name matched no pattern: a review). A state hidden from this role
        # (another role's session) counts as busy.
        primary, worker = (f"hsmca {node} {what}".encode()[:63] for what in
                           ("primary", "worker "))
        return sum(1 for (name,) in rows if name and (
            name.encode() == primary or name.encode().startswith(worker)))

    async def latest_ssh_revocation(self) -> dt.datetime | None:
        return latest_of((await self._rows("SELECT (SELECT MAX(revoked_at) FROM ssh_certs), "
            "(SELECT MAX(revoked_at) FROM ssh_revoked_keys)"))[0])

    # ---- pre-signed OCSP responses ------------------------------------------------------

    async def ocsp_settle(self, now: dt.datetime, issuers: Sequence[str]) -> int:
        async def settle(db: Conn) -> int:
            cur = await db.execute(
                "UPDATE ocsp_responses o SET refresh_at = NULL FROM certs c WHERE "
                "c.serial = o.serial AND o.refresh_at <= %s AND (c.not_after <= %s OR "
                "NOT (c.issuer = ANY(%s)))",
                (now.isoformat(), now.isoformat(), list(issuers)))
            return cur.rowcount
        return await self._tx(settle)

    async def ocsp_due(self, now: dt.datetime, limit: int,
                       issuers: Sequence[str]) -> list[OCSPDue]:
        rows = await self._rows(
            "SELECT c.serial, c.issuer, c.revoked_at, c.reason, c.not_after "
            "FROM ocsp_responses o JOIN certs c ON c.serial = o.serial "
            "WHERE o.refresh_at <= %s AND c.not_after > %s AND c.issuer = ANY(%s) "
            "ORDER BY o.refresh_at, c.revoked_at IS NULL LIMIT %s",
            (now.isoformat(), now.isoformat(), list(issuers), limit))
        return [OCSPDue(int(r[0], 16), r[1], r[2], r[3], r[4]) for r in rows]

    async def put_ocsp(self, responses: Sequence[OCSPRecord]) -> None:
        async def put(db: Conn) -> None:
            # A 'good' response signed before a revocation landed must not replace the
            # revoked row: the revocation set the row due, and its own signing follows.
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO ocsp_responses AS o (serial, status, this_update, next_update, "
                    "der_sha1, der_sha256, refresh_at) VALUES (%s,%s,%s,%s,%s,%s,%s) "
                    "ON CONFLICT (serial) DO UPDATE SET status = excluded.status, "
                    "this_update = excluded.this_update, next_update = excluded.next_update, "
                    "der_sha1 = excluded.der_sha1, der_sha256 = excluded.der_sha256, "
                    "refresh_at = excluded.refresh_at WHERE excluded.status = 'revoked' OR "
                    "NOT EXISTS (SELECT 1 FROM certs WHERE serial = excluded.serial AND "
                    "revoked_at IS NOT NULL)",
                    [(format(r.serial, "x"), r.status, r.this_update, r.next_update, r.der_sha1,
                      r.der_sha256, r.refresh_at) for r in responses])
        await self._tx(put)

    async def ocsp(self, serial: int) -> OCSPRecord | None:
        # As SQLite's: never a 'good' response of a certificate revoked since.
        rows = await self._rows("SELECT o.status, o.this_update, o.next_update, o.der_sha1, "
                                "o.der_sha256, o.refresh_at FROM ocsp_responses o JOIN certs c "
                                "ON c.serial = o.serial WHERE o.serial = %s AND o.status != "
                                "'pending' AND NOT (o.status = 'good' AND c.revoked_at IS NOT "
                                "NULL)", (format(serial, "x"),), bounded=True)
        if not rows:
            return None
        r = rows[0]
        return OCSPRecord(serial, r[0], r[1], r[2], bytes(r[3]), bytes(r[4]), r[5])

    # ---- CRLs -----------------------------------------------------------------------------

    async def next_crl_number(self, lead: dt.timedelta = dt.timedelta(0)
                              ) -> tuple[int, dt.datetime]:
        # A sequence: numbers only grow, whichever node asks, and none is handed out twice.
        # The time by the database's one clock, taken with the number under the lock of
        # the last time's row, so that the two are in one order (nextval alone is not: a
        # review saw a larger number with an earlier clock_timestamp()).
        async def bump(db: Conn) -> tuple[int, dt.datetime]:
            await db.execute("INSERT INTO meta (k, v) VALUES ('crl_time', '') "
                             "ON CONFLICT (k) DO NOTHING")
            last = (await (await db.execute(
                "SELECT v FROM meta WHERE k = 'crl_time' FOR UPDATE")).fetchone())[0]
            number, now = (await (await db.execute(
                "SELECT nextval('crl_numbers'), clock_timestamp()")).fetchone())
            at = crl_time(now.astimezone(dt.UTC), last or None, lead)
            await db.execute("UPDATE meta SET v = %s WHERE k = 'crl_time'", (at.isoformat(),))
            return int(number), at
        return await self._tx(bump)

    async def log_scanned(self, log: str) -> int:
        rows = await self._rows("SELECT v FROM meta WHERE k = %s", (f"log_scanned:{log}",))
        return int(rows[0][0]) if rows else 0

    async def set_log_scanned(self, log: str, end: int) -> None:
        async def keep(db: Conn) -> None:
            await db.execute("INSERT INTO meta (k, v) VALUES (%s, %s) ON CONFLICT (k) DO "
                             "UPDATE SET v = EXCLUDED.v", (f"log_scanned:{log}", str(end)))
        await self._tx(keep)

    async def put_node_policy(self, node: str, settings: str | None) -> None:
        async def keep(db: Conn) -> None:
            if settings is None:
                await db.execute("DELETE FROM meta WHERE k = %s", (f"policy:{node}",))
            else:
                await db.execute("INSERT INTO meta (k, v) VALUES (%s, %s) ON CONFLICT (k) "
                                 "DO UPDATE SET v = EXCLUDED.v", (f"policy:{node}", settings))
            # Every node compares again (its counter is made by the first node to say)
            await db.execute("INSERT INTO changes (name, n) VALUES ('policy', 0) "
                             "ON CONFLICT (name) DO NOTHING")
            await _changed(db, "policy")
        await self._tx(keep)

    async def running_node_policies(self) -> dict[str, str]:
        # Running: its primary holds the advisory lock of its name's lease (Lease), which
        # pg_locks shows as the key's two 32-bit halves; in this database (pg_locks shows
        # every database's, and another CA's node may have the same name: a review).
        rows = await self._rows(
            "SELECT substr(m.k, 8), m.v FROM meta m WHERE m.k LIKE 'policy:%%' AND EXISTS "
            "(SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND "
            "l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.objsubid = 1 AND ((l.classid::bigint << 32) | l.objid::bigint) = "
            "hashtextextended('lease:node:' || substr(m.k, 8), 0))")
        return {r[0]: r[1] for r in rows}

    async def keep_crl_numbers_above(self, number: int) -> None:
        async def keep(db: Conn) -> None:
            # nextval until past `number`, never setval: another node's nextval between a
            # look and a setval would move the sequence back. The gap is the numbers an
            # older database lacks (a restore), a few at most.
            await db.execute("SELECT nextval('crl_numbers') FROM generate_series(1, %s - "
                             "(SELECT CASE WHEN is_called THEN last_value ELSE last_value "
                             "- 1 END FROM crl_numbers))", (number,))
        await self._tx(keep)

    async def add_crl(self, crl: CRLRecord) -> None:
        async def keep(db: Conn) -> None:
            await db.execute("INSERT INTO crls (number, revoked, this_update, der, issuer) "
                             "VALUES (%s,%s,%s,%s,%s)",
                             (crl.number, crl.revoked, crl.this_update, crl.der, crl.issuer))
            await db.execute("DELETE FROM crls WHERE number < %s AND issuer IS NOT DISTINCT "
                             "FROM %s", (crl.number - KEEP_CRLS, crl.issuer))
        await self._tx(keep)

    async def latest_crl(self, issuer: str | None) -> CRLRecord | None:
        rows = await self._rows("SELECT number, revoked, this_update, der, issuer FROM crls "
                                "WHERE issuer IS NOT DISTINCT FROM %s ORDER BY number DESC "
                                "LIMIT 1", (issuer,), bounded=True)
        return CRLRecord(int(rows[0][0]), int(rows[0][1]), rows[0][2], bytes(rows[0][3]),
                         rows[0][4]) if rows else None

    # ---- the CA's keys ----------------------------------------------------------------------

    async def keys(self) -> list[KeyRecord]:
        return [KeyRecord(*r[:7], bytes(r[7]) if r[7] is not None else None, *r[8:])
                for r in await self._rows(
                    "SELECT label, kind, state, algorithm, created_at, fingerprint, uri, cert, "
                    "changed_at, ssh_public_key, revoked_at, revocation_reason FROM ca_keys "
                    "ORDER BY created_at, label", bounded=True)]

    async def add_keys(self, records: Sequence[KeyRecord]) -> None:
        async def insert(db: Conn) -> None:
            async with db.cursor() as cur:
                await cur.executemany(
                    f"INSERT INTO ca_keys ({KEY_COLUMNS}) VALUES {_KEY_VALUES} "
                    "ON CONFLICT (label) DO UPDATE SET "
                    "ssh_public_key = COALESCE(ca_keys.ssh_public_key, "
                    "EXCLUDED.ssh_public_key)",
                    [key_row(r) for r in records])
            await _changed(db, "keys")
        await self._tx(insert)

    async def stage_key(self, record: KeyRecord, active: str) -> bool:
        async def stage(db: Conn) -> bool:
            # (the active row locked: a staging or rotation of the kind on another node
            # waits, then finds it changed, as rotate_keys)
            if await _active_labels(db, record.kind) != [active] \
                    or await _has_next(db, record.kind):
                return False
            await db.execute(f"INSERT INTO ca_keys ({KEY_COLUMNS}) VALUES {_KEY_VALUES}",
                             key_row(record, "next"))
            await _changed(db, "keys")
            return True
        return await self._tx(stage)

    async def rotate_keys(self, new: Sequence[KeyRecord], cross: Sequence[CrossCert] = (),
                          replacing: Mapping[str, str] | None = None) -> list[str] | None:
        async def rotate(db: Conn) -> list[str] | None:
            for kind, label in (replacing or {}).items():
                if await _active_labels(db, kind) != [label] or await _has_next(db, kind):
                    return None
            old: list[str] = []
            for key in new:
                cur = await db.execute(
                    "UPDATE ca_keys SET state = 'previous', changed_at = %s WHERE kind = %s "
                    "AND state = 'active' RETURNING label", (key.changed_at, key.kind))
                old += [r[0] for r in await cur.fetchall()]
                await db.execute(f"INSERT INTO ca_keys ({KEY_COLUMNS}) VALUES {_KEY_VALUES}",
                                 key_row(key, "active"))
            for c in cross:
                await db.execute("INSERT INTO cross_certs (der, subject_label, issuer_label, "
                                 "made_at) VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                                 (c.der, c.subject_label, c.issuer_label, c.made_at))
            await _changed(db, "keys")
            return old
        return await self._tx(rotate)

    async def promote_key(self, label: str, kind: str, at: str,
                          replacing: str | None = None) -> list[str] | None:
        async def promote(db: Conn) -> list[str] | None:
            if replacing is not None and await _active_labels(db, kind) != [replacing]:
                return None
            cur = await db.execute("UPDATE ca_keys SET state = 'active', changed_at = %s "
                                   "WHERE label = %s AND kind = %s AND state = 'next'",
                                   (at, label, kind))
            if cur.rowcount != 1:
                return None
            cur = await db.execute("UPDATE ca_keys SET state = 'previous', changed_at = %s "
                                   "WHERE kind = %s AND state = 'active' AND label != %s "
                                   "RETURNING label", (at, kind, label))
            old = [r[0] for r in await cur.fetchall()]
            await _changed(db, "keys")
            return old
        return await self._tx(promote)

    async def set_key_state(self, label: str, state: str, at: dt.datetime,
                            expect: str) -> bool:
        async def change(db: Conn) -> int:
            cur = await db.execute("UPDATE ca_keys SET state = %s, changed_at = %s WHERE "
                                   "label = %s AND state = %s",
                                   (state, at.isoformat(), label, expect))
            if cur.rowcount:
                await _changed(db, "keys")
            return cur.rowcount
        return await self._tx(change) == 1

    async def revoke_ca_key(self, label: str, at: dt.datetime, reason: str | None) -> bool:
        async def revoke(db: Conn) -> int:
            cur = await db.execute("UPDATE ca_keys SET revoked_at = %s, revocation_reason = %s "
                                   "WHERE label = %s AND revoked_at IS NULL",
                                   (at.isoformat(), reason, label))
            if cur.rowcount:
                await _changed(db, "keys")
            return cur.rowcount
        return await self._tx(revoke) == 1

    async def name_first_issuers(self, x509_label: str, ssh: dict[str, str]) -> None:
        async def name(db: Conn) -> None:
            await db.execute("UPDATE certs SET issuer = %s WHERE issuer IS NULL", (x509_label,))
            for cert_type, label in ssh.items():
                await db.execute("UPDATE ssh_certs SET issuer = %s WHERE issuer IS NULL AND "
                                 "cert_type = %s", (label, cert_type))
            await db.execute("UPDATE crls SET issuer = %s WHERE issuer IS NULL", (x509_label,))
        await self._tx(name)

    async def cross_certs(self) -> list[CrossCert]:
        return [CrossCert(r[0], r[1], bytes(r[2]), r[3]) for r in await self._rows(
            "SELECT subject_label, issuer_label, der, made_at FROM cross_certs "
            "ORDER BY made_at, ord", bounded=True)]

    async def signed_by(self) -> dict[str | None, int]:
        counts: dict[str | None, int] = {}
        for issuer, n in await self._rows("SELECT issuer, COUNT(*) FROM certs GROUP BY issuer"):
            counts[issuer] = counts.get(issuer, 0) + int(n)
        for issuer, kind, n in await self._rows("SELECT issuer, cert_type, COUNT(*) FROM "
                                                "ssh_certs GROUP BY issuer, cert_type"):
            key = issuer if issuer is not None else f"ssh-{kind}"
            counts[key] = counts.get(key, 0) + int(n)
        return counts

    async def live_signed_by(self, issuer: str | None, now: dt.datetime
                             ) -> tuple[int, str | None]:
        [(n, until)] = await self._rows(
            "SELECT COUNT(*), MAX(not_after) FROM certs WHERE issuer IS NOT DISTINCT FROM %s "
            "AND not_after > %s AND revoked_at IS NULL", (issuer, now.isoformat()))
        # An SSH certificate's validBefore is kept as Unix seconds.
        [(m, before)] = await self._rows(
            "SELECT COUNT(*), MAX(CAST(valid_before AS BIGINT)) FROM ssh_certs s WHERE issuer "
            "IS NOT DISTINCT FROM %s AND CAST(valid_before AS BIGINT) > %s AND revoked_at IS "
            "NULL AND NOT " + _SUPERSEDED_HOST.format(integer="BIGINT", p="%s"),
            (issuer, int(now.timestamp()), int(now.timestamp())))
        return int(n) + int(m), _latest(until, before)

    async def live_renewed_by(self, issuer: str | None, now: dt.datetime) -> int:
        [(n,)] = await self._rows(
            "SELECT COUNT(*) FROM certs c WHERE issuer IS NOT DISTINCT FROM %s AND not_after "
            "> %s AND revoked_at IS NULL AND EXISTS (SELECT 1 FROM certs r WHERE "
            "r.renewed_from = c.serial AND r.revoked_at IS NULL AND r.not_after > %s)",
            (issuer, now.isoformat(), now.isoformat()))
        return int(n)

    # ---- ACME -------------------------------------------------------------------------------

    async def add_acme_eab(self, eab: AcmeEAB) -> None:
        async def insert(db: Conn) -> None:
            await db.execute("INSERT INTO acme_eab (kid, mac_key, names, expires, created_at, "
                             "created_by) VALUES (%s,%s,%s,%s,%s,%s)",
                             (eab.kid, eab.mac_key, json.dumps(list(eab.names)), eab.expires,
                              eab.created_at, eab.created_by))
        await self._tx(insert)

    async def acme_eab(self, kid: str) -> AcmeEAB | None:
        rows = await self._rows("SELECT kid, mac_key, names, expires, created_at, created_by, "
                                "used_at, account_id FROM acme_eab WHERE kid = %s", (kid,))
        if not rows:
            return None
        r = rows[0]
        return AcmeEAB(r[0], bytes(r[1]) if r[1] is not None else None,
                       tuple(json.loads(r[2])), r[3], r[4], r[5], r[6], r[7])

    async def acme_eabs(self, limit: int) -> list[AcmeEAB]:
        rows = await self._rows(
            "SELECT kid, CASE WHEN mac_key IS NULL THEN NULL ELSE ''::bytea END, names, "
            "expires, created_at, created_by, used_at, account_id FROM acme_eab "
            "ORDER BY created_at DESC, kid LIMIT %s", (limit,))
        return [AcmeEAB(r[0], bytes(r[1]) if r[1] is not None else None,
                        tuple(json.loads(r[2])), r[3], r[4], r[5], r[6], r[7]) for r in rows]

    async def withdraw_acme_eab(self, kid: str, at: dt.datetime) -> bool:
        async def withdraw(db: Conn) -> bool:
            cur = await db.execute(
                "UPDATE acme_eab SET mac_key = NULL, expires = LEAST(expires, %s) WHERE "
                "kid = %s AND used_at IS NULL AND octet_length(mac_key) > 0", (at.isoformat(), kid))
            return cur.rowcount == 1
        return await self._tx(withdraw)

    async def erase_expired_acme_eab_keys(self, at: dt.datetime) -> list[str]:
        async def erase(db: Conn) -> list[str]:
            cur = await db.execute(
                "UPDATE acme_eab SET mac_key = ''::bytea WHERE used_at IS NULL AND mac_key "
                "IS NOT NULL AND octet_length(mac_key) > 0 AND expires <= %s RETURNING kid",
                (at.isoformat(),))
            return [r[0] for r in await cur.fetchall()]
        return await self._tx(erase)

    async def acme_accounts(self, limit: int) -> list[AcmeAccount]:
        return [self._account(r) for r in await self._rows(
            f"SELECT {self._ACCOUNT_COLS} FROM acme_accounts ORDER BY created_at DESC, id "
            "LIMIT %s", (limit,))]

    async def add_acme_account(self, account: AcmeAccount, at: dt.datetime) -> bool:
        async def insert(db: Conn) -> bool:
            if account.eab_kid is not None:
                cur = await db.execute(
                    "UPDATE acme_eab SET used_at = %s, account_id = %s, mac_key = NULL "
                    "WHERE kid = %s AND used_at IS NULL AND octet_length(mac_key) > 0 "
                    "AND expires > %s",
                    (at.isoformat(), account.id, account.eab_kid, at.isoformat()))
                if cur.rowcount != 1:
                    return False
            cur = await db.execute(
                "INSERT INTO acme_accounts (id, thumbprint, jwk, status, contact, names, "
                "eab_kid, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (account.id, account.thumbprint, account.jwk, account.status,
                 json.dumps(list(account.contact)), json.dumps(list(account.names)),
                 account.eab_kid, account.created_at))
            if cur.rowcount != 1:  # another account has this key: the EAB stays unspent
                raise _Undo(False)
            return True
        return await self._tx(insert)

    _ACCOUNT_COLS = "id, thumbprint, jwk, status, contact, names, eab_kid, created_at"

    @staticmethod
    def _account(r: tuple[Any, ...]) -> AcmeAccount:
        return AcmeAccount(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])),
                           tuple(json.loads(r[5])), r[6], r[7])

    async def acme_account(self, account_id: str) -> AcmeAccount | None:
        rows = await self._rows(f"SELECT {self._ACCOUNT_COLS} FROM acme_accounts WHERE "
                                "id = %s", (account_id,))
        return self._account(rows[0]) if rows else None

    async def acme_account_by_thumbprint(self, thumbprint: str) -> AcmeAccount | None:
        rows = await self._rows(f"SELECT {self._ACCOUNT_COLS} FROM acme_accounts WHERE "
                                "thumbprint = %s", (thumbprint,))
        return self._account(rows[0]) if rows else None

    async def set_acme_contact(self, account_id: str, contact: Sequence[str]) -> None:
        async def update(db: Conn) -> None:
            await db.execute("UPDATE acme_accounts SET contact = %s WHERE id = %s",
                             (json.dumps(list(contact)), account_id))
        await self._tx(update)

    async def deactivate_acme_account(self, account_id: str) -> None:
        async def update(db: Conn) -> None:
            await db.execute("UPDATE acme_accounts SET status = 'deactivated' WHERE id = %s",
                             (account_id,))
            await db.execute("UPDATE acme_authzs SET status = 'deactivated' WHERE "
                             "account_id = %s AND status = 'pending'", (account_id,))
        await self._tx(update)

    async def change_acme_key(self, account_id: str, old_thumbprint: str, thumbprint: str,
                              jwk: str) -> bool:
        async def update(db: Conn) -> bool:
            try:
                async with db.transaction():  # a savepoint: the conflict undoes only it
                    cur = await db.execute(
                        "UPDATE acme_accounts SET thumbprint = %s, jwk = %s WHERE id = %s "
                        "AND thumbprint = %s", (thumbprint, jwk, account_id, old_thumbprint))
                    return cur.rowcount == 1
            except psycopg.errors.UniqueViolation:  # another account has that key
                return False
        return await self._tx(update)

    async def add_acme_order(self, order: AcmeOrder, authzs: Sequence[AcmeAuthz],
                             pending_cap: int | None = None) -> bool:
        async def insert(db: Conn) -> bool:
            if pending_cap is not None:
                # The account's row locked: its orders, on any node, are counted and
                # inserted one at a time (READ COMMITTED: the count, a statement after
                # the lock, sees what the order before committed).
                await db.execute("SELECT 1 FROM acme_accounts WHERE id = %s FOR UPDATE",
                                 (order.account_id,))
                cur = await db.execute(_PENDING_AUTHZS, (order.account_id, order.created_at))
                row = await cur.fetchone()
                waiting = int(row[0]) if row else 0
                if waiting + len(authzs) > pending_cap:
                    raise TooManyPending(waiting)
            if order.replaces is not None:  # an order that expired unfinished replaces nothing
                await db.execute("UPDATE acme_orders SET status = 'invalid' WHERE replaces = %s "
                                 "AND status IN ('pending', 'ready') AND expires <= %s",
                                 (order.replaces, order.created_at))
            cur = await db.execute(
                "INSERT INTO acme_orders (id, account_id, status, names, expires, created_at, "
                "replaces) VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                (order.id, order.account_id, order.status, json.dumps(list(order.names)),
                 order.expires, order.created_at, order.replaces))
            if cur.rowcount != 1:
                return False  # another live order replaces that certificate
            for i, a in enumerate(authzs):
                await db.execute("INSERT INTO acme_authzs (id, order_id, account_id, name, "
                                 "wildcard, status, expires, position) VALUES "
                                 "(%s,%s,%s,%s,%s,%s,%s,%s)",
                                 (a.id, order.id, a.account_id, a.name, int(a.wildcard),
                                  a.status, a.expires, i))
                for j, c in enumerate(a.challenges):
                    await db.execute("INSERT INTO acme_challenges (id, authz_id, type, token, "
                                     "status, position) VALUES (%s,%s,%s,%s,%s,%s)",
                                     (c.id, a.id, c.type, c.token, c.status, j))
            return True
        return await self._tx(insert)

    async def acme_order_ids(self, account_id: str, now: str, limit: int) -> list[str]:
        rows = await self._rows(
            "SELECT id FROM acme_orders WHERE account_id = %s AND status <> 'invalid' "
            "AND (status = 'valid' OR expires > %s) ORDER BY created_at DESC, id LIMIT %s",
            (account_id, now, limit))
        return [r[0] for r in rows]

    async def acme_pending_authzs(self, account_id: str, now: str) -> int:
        rows = await self._rows(_PENDING_AUTHZS, (account_id, now))
        return int(rows[0][0])

    async def acme_authorized(self, account_id: str, names: Sequence[str], now: str
                              ) -> bool:
        rows = await self._rows(
            "SELECT DISTINCT name, wildcard FROM acme_authzs WHERE account_id = %s AND "
            "status = 'valid' AND expires > %s AND name = ANY(%s)",
            (account_id, now, authz_bases(names)))
        return authz_cover(names, rows)

    async def purge_acme_orders(self, before: str, batch: int = 1000) -> int:
        async def purge(db: Conn) -> int:
            cur = await db.execute(
                "SELECT id FROM acme_orders WHERE expires < %s AND status IN ('pending', "
                "'ready', 'invalid') LIMIT %s", (before, batch))
            ids = [r[0] for r in await cur.fetchall()]
            if ids:
                await db.execute("DELETE FROM acme_challenges WHERE authz_id IN (SELECT id "
                                 "FROM acme_authzs WHERE order_id = ANY(%s))", (ids,))
                await db.execute("DELETE FROM acme_authzs WHERE order_id = ANY(%s)", (ids,))
                await db.execute("DELETE FROM acme_orders WHERE id = ANY(%s)", (ids,))
            return len(ids)
        return await self._tx(purge)

    async def acme_order(self, order_id: str) -> AcmeOrder | None:
        rows = await self._rows("SELECT id, account_id, status, names, expires, created_at, "
                                "cert_serial, error, replaces FROM acme_orders WHERE id = %s",
                                (order_id,))
        if not rows:
            return None
        r = rows[0]
        authzs = await self._rows("SELECT id FROM acme_authzs WHERE order_id = %s ORDER BY "
                                  "position", (order_id,))
        return AcmeOrder(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4], r[5],
                         tuple(a[0] for a in authzs), r[6], r[7], r[8])

    _CHALLENGE_COLS = "id, authz_id, type, token, status, validated, error, started"

    async def acme_authz(self, authz_id: str) -> AcmeAuthz | None:
        rows = await self._rows("SELECT id, order_id, account_id, name, wildcard, status, "
                                "expires FROM acme_authzs WHERE id = %s", (authz_id,))
        if not rows:
            return None
        r = rows[0]
        challenges = await self._rows(f"SELECT {self._CHALLENGE_COLS} FROM acme_challenges "
                                      "WHERE authz_id = %s ORDER BY position", (authz_id,))
        return AcmeAuthz(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6],
                         tuple(AcmeChallenge(*c) for c in challenges))

    async def acme_challenge(self, challenge_id: str) -> AcmeChallenge | None:
        rows = await self._rows(f"SELECT {self._CHALLENGE_COLS} FROM acme_challenges WHERE "
                                "id = %s", (challenge_id,))
        return AcmeChallenge(*rows[0]) if rows else None

    async def deactivate_acme_authz(self, authz_id: str) -> bool:
        async def deactivate(db: Conn) -> bool:
            cur = await db.execute("UPDATE acme_authzs SET status = 'deactivated' WHERE id = %s "
                                   "AND status IN ('pending', 'valid') RETURNING order_id",
                                   (authz_id,))
            row = await cur.fetchone()
            if row is None:
                return False
            await db.execute("UPDATE acme_orders SET status = 'invalid' WHERE id = %s AND "
                             "status IN ('pending', 'ready')", (row[0],))
            return True
        return await self._tx(deactivate)

    async def start_acme_challenge(self, challenge_id: str, at: dt.datetime,
                                   stale_before: dt.datetime) -> bool:
        async def start(db: Conn) -> bool:
            cur = await db.execute(
                "UPDATE acme_challenges SET status = 'processing', started = %s WHERE id = %s "
                "AND (status = 'pending' OR (status = 'processing' AND started < %s)) AND "
                "(SELECT status FROM acme_authzs a WHERE a.id = authz_id) = 'pending'",
                (at.isoformat(), challenge_id, stale_before.isoformat()))
            return cur.rowcount == 1
        return await self._tx(start)

    async def finish_acme_challenge(self, challenge_id: str, valid: bool, error: str | None,
                                    at: dt.datetime) -> None:
        status = "valid" if valid else "invalid"

        async def finish(db: Conn) -> None:
            cur = await db.execute("UPDATE acme_challenges SET status = %s, validated = %s, "
                                   "error = %s WHERE id = %s AND status = 'processing' "
                                   "RETURNING authz_id",
                                   (status, at.isoformat() if valid else None, error,
                                    challenge_id))
            row = await cur.fetchone()
            if row is None:
                return
            cur = await db.execute("UPDATE acme_authzs SET status = %s WHERE id = %s AND "
                                   "status = 'pending' RETURNING order_id", (status, row[0]))
            order = await cur.fetchone()
            if order is None:
                return
            if not valid:
                await db.execute("UPDATE acme_orders SET status = 'invalid', error = %s WHERE "
                                 "id = %s AND status = 'pending'", (error, order[0]))
                return
            # The order's row is locked first, so that two authorizations of one order
            # finishing on two nodes at once cannot both count the other as pending.
            await db.execute("SELECT 1 FROM acme_orders WHERE id = %s FOR UPDATE", (order[0],))
            cur = await db.execute("SELECT COUNT(*) FROM acme_authzs WHERE order_id = %s AND "
                                   "status != 'valid'", (order[0],))
            left = (await cur.fetchone() or (1,))[0]
            if left == 0:
                await db.execute("UPDATE acme_orders SET status = 'ready' WHERE id = %s AND "
                                 "status = 'pending'", (order[0],))
        await self._tx(finish)

    async def begin_acme_finalize(self, order_id: str) -> bool:
        async def begin(db: Conn) -> bool:
            cur = await db.execute("UPDATE acme_orders SET status = 'processing' WHERE id = %s "
                                   "AND status = 'ready'", (order_id,))
            return cur.rowcount == 1
        return await self._tx(begin)

    async def fail_acme_finalize(self, order_id: str, status: str, error: str | None) -> None:
        async def fail(db: Conn) -> None:
            await db.execute("UPDATE acme_orders SET status = %s, error = %s, cert_serial = "
                             "NULL WHERE id = %s AND status = 'processing'",
                             (status, error, order_id))
        await self._tx(fail)

    async def release_acme_order(self, order_id: str) -> None:
        async def release(db: Conn) -> None:
            await db.execute("UPDATE acme_orders SET status = 'valid' WHERE id = %s AND "
                             "status = 'processing' AND cert_serial IS NOT NULL", (order_id,))
        await self._tx(release)

    async def complete_acme_finalizes(self, audit_log: str | None) -> int:
        async def complete(db: Conn) -> int:
            cur = await db.execute("UPDATE acme_orders SET status = 'valid' WHERE status = "
                                   "'processing' AND cert_serial IN (SELECT serial FROM certs "
                                   "WHERE audit_log IS NOT DISTINCT FROM %s)", (audit_log,))
            return cur.rowcount
        return await self._tx(complete)

    async def reopen_acme_finalizes(self) -> int:
        async def reopen(db: Conn) -> int:
            cur = await db.execute("UPDATE acme_orders SET status = 'ready' WHERE status = "
                                   "'processing' AND cert_serial IS NULL")
            return cur.rowcount
        return await self._tx(reopen)

    async def reopen_acme_order_of(self, serial: int) -> str | None:
        async def reopen(db: Conn) -> str | None:
            cur = await db.execute("UPDATE acme_orders SET status = 'ready', cert_serial = "
                                   "NULL, error = NULL WHERE cert_serial = %s AND status IN "
                                   "('valid', 'processing') RETURNING id", (format(serial, "x"),))
            row = await cur.fetchone()
            return str(row[0]) if row else None
        return await self._tx(reopen)

    async def acme_cert(self, serial: int) -> AcmeCert | None:
        rows = await self._rows(
            "SELECT c.serial, a.account_id, a.order_id, c.der, c.issuer, c.not_before, "
            "c.not_after, c.revoked_at, c.spki_sha256 FROM acme_certs a JOIN certs c ON "
            "c.serial = a.serial WHERE a.serial = %s", (format(serial, "x"),))
        if not rows:
            return None
        r = rows[0]
        return AcmeCert(r[0], r[1], r[2], bytes(r[3]), *r[4:])

    async def acme_secret(self, name: str, make: bytes) -> bytes:
        async def keep(db: Conn) -> bytes:
            await db.execute("INSERT INTO acme_secrets (name, value) VALUES (%s, %s) "
                             "ON CONFLICT DO NOTHING", (name, make))
            cur = await db.execute("SELECT value FROM acme_secrets WHERE name = %s", (name,))
            row = await cur.fetchone()
            assert row is not None
            return bytes(row[0])
        return await self._tx(keep)

    async def redeem_acme_nonce(self, nonce_id: str, expires: dt.datetime,
                                at: dt.datetime) -> bool:
        async def redeem(db: Conn) -> bool:
            await db.execute("DELETE FROM acme_nonces WHERE id IN (SELECT id FROM acme_nonces "
                             "WHERE expires < %s LIMIT 64)", (at.isoformat(),))
            cur = await db.execute("INSERT INTO acme_nonces (id, expires) VALUES (%s, %s) "
                                   "ON CONFLICT DO NOTHING", (nonce_id, expires.isoformat()))
            return cur.rowcount == 1
        return await self._tx(redeem)

    async def acme_rate_take(self, kind: str, keys: Sequence[str], at: dt.datetime,
                             since: dt.datetime, limit: int | None) -> str | None:
        async def take(db: Conn) -> str | None:
            # Count-then-insert must not interleave with another node's: one kind at a time.
            await db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("acme_rate:" + kind,))
            await db.execute("DELETE FROM acme_rate WHERE ctid IN (SELECT ctid FROM acme_rate "
                             "WHERE kind = %s AND at < %s LIMIT 64)", (kind, since.isoformat()))
            if limit is not None:
                over = await _rate_over(db, kind, keys, since, limit)
                if over is not None:
                    return over
            async with db.cursor() as cur:
                await cur.executemany("INSERT INTO acme_rate (kind, key, at) VALUES (%s,%s,%s)",
                                      [(kind, k, at.isoformat()) for k in keys])
            return None
        return await self._tx(take)

    async def acme_rate_over(self, kind: str, keys: Sequence[str], since: dt.datetime,
                             limit: int) -> str | None:
        async def read() -> str | None:
            async with self.pool.connection() as conn:
                return await _rate_over(conn, kind, keys, since, limit)
        return await self._run(read())

    async def acme_rate_frees(self, kind: str, key: str, since: dt.datetime,
                              limit: int) -> str | None:
        rows = await self._rows("SELECT at FROM acme_rate WHERE kind = %s AND key = %s AND "
                                "at >= %s ORDER BY at DESC LIMIT 1 OFFSET %s",
                                (kind, key, since.isoformat(), limit - 1))
        return str(rows[0][0]) if rows else None

    # ---- several nodes: change counters ------------------------------------------------------

    async def change_counters(self) -> dict[str, int]:
        return {name: int(n) for name, n in await self._rows("SELECT name, n FROM changes")}

    def watch_changes(self, moved: Callable[[str], None]) -> None:
        """Call `moved(name)` (on the store's thread) whenever a change counter moves, on
        any node: at once by NOTIFY, within POLL_S by the poll if a notification is
        lost (a connection broken while the server restarts)."""
        def start() -> None:
            self._watchers.append(self._loop.create_task(self._watch(moved)))
        self._loop.call_soon_threadsafe(start)

    async def _watch(self, moved: Callable[[str], None]) -> None:
        seen: dict[str, int] | None = None
        lost = False  # the connection broke: a notification may have been missed
        while True:
            try:
                conn = await self.connect_own()
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    while True:
                        cur = await conn.execute("SELECT name, n FROM changes")
                        now = {name: int(n) for name, n in await cur.fetchall()}
                        if seen is not None:
                            for name, n in now.items():
                                if seen.get(name) != n:
                                    moved(name)
                        elif lost:
                            # Back: whatever moved meanwhile (or just before the outage,
                            # its notice lost with the connection), every process reloads.
                            for name in ("revocations", "ssh_revocations", "keys",
                                         "policy"):
                                moved(name)
                            lost = False
                        seen = now
                        self._down, self._unreachable = None, False
                        # Whatever NOTIFY says, the counters are read again right after.
                        async for _ in conn.notifies(timeout=POLL_S, stop_after=1):
                            pass
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except psycopg.Error as exc:
                self._down = _why(exc)
                # While the server is away, everything may have moved: every process
                # reloads once it is back (above). Not at every retry meanwhile: what
                # a process knows stays what it knew, and says so (a CRL it served).
                seen, lost = None, True
                await asyncio.sleep(POLL_S)  # a retry pace, not synchronisation

    # ---- several nodes: the leases of background work -----------------------------------

    def lease(self, name: str) -> Lease:
        """An advisory lock held on a connection of its own: one node at a time does the
        work `name` (refreshing OCSP); another takes it over if the holder dies."""
        return Lease(self, name)

    # ---- several nodes: the audit logs -------------------------------------------------------

    async def claim_node(self, node: str, token: str) -> bool:
        """This process writes `node`'s log from now on (it holds the node's name).
        The name is a lock that goes with its connection, so while PostgreSQL is away
        another process of the same name may take it, and the first not know yet: a
        PostgreSQL trial's twin wrote lines, and the first process's next group deleted
        them (its DELETE from its own seq on). The claim is a fencing token with an
        epoch one above the last claim's, written under the lock each group of the
        node's lines takes: a group of a process whose claim a later one replaced is
        refused (NodeNameTaken); and a claim waits for a group under way, so the
        claimant's start reads every line that group committed."""
        async def claim(db: Conn) -> int:
            await db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                             (AUDIT_LOCK_CLASS, node))
            epoch = _claim_of(await _stored_claim(db, node))[0] + 1
            await db.execute("INSERT INTO meta (k, v) VALUES (%s, %s) ON CONFLICT (k) DO "
                             "UPDATE SET v = EXCLUDED.v", (f"holder:{node}",
                                                           f"{epoch}:{token}"))
            return epoch
        epoch = await self._tx(claim)
        self._claimed = (node, epoch, token)
        return epoch == 1  # the node's first run: a new node

    async def node_claimed(self, node: str) -> bool | None:
        """Whether this process's claim of `node` stands: True; False once another
        process claimed it since (a later epoch); None if the database lost it (an
        older epoch, or none: restored from a dump taken before the claim), which is no
        other process's doing, and the lines' own check says what was lost."""
        assert self._claimed is not None and self._claimed[0] == node
        claimed = self._claimed

        async def read() -> bool | None:
            async with self.pool.connection() as conn:
                return _claim_stands(await _stored_claim(conn, node), claimed)
        return await self._run(read())

    def append_audit(self, node: str, first_seq: int, lines: Sequence[bytes],
                     abandoned: threading.Event | None = None, wait_s: float = 10.0
                     ) -> cf.Future[None]:
        """Make a group of `node`'s audit lines durable: one transaction. Rows from
        `first_seq` on are replaced, so the table always ends where the node's log does
        (a group whose commit failed, and was cut from the local file, leaves nothing
        behind even if the commit had in fact gone through).

        `abandoned` is set by a committer that stopped waiting (after `wait_s`: it cut
        the group from its file). Such a group must never land later: reaching
        PostgreSQL after the node's next group (a connection that hung, then woke), its
        DELETE would remove that group's acknowledged lines. So a group first takes the
        node's lock, then looks: a late one finds `abandoned` set and writes nothing
        (AuditGroupAbandoned); one already past the look holds the lock until it
        commits, and the next group, waiting for the lock, replaces its lines.

        A session gone quiet inside the transaction (a hung connection holding the
        lock) is ended by PostgreSQL after `wait_s`, and a wait for the lock gives up
        after twice that, so one hung connection holds a node's log up, and its
        groups' connections, for seconds, not until TCP notices."""
        quiet, waiting = (f"{max(1, round(s * 1000))}ms" for s in (wait_s, 2 * wait_s))

        async def put(db: Conn) -> None:
            await db.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, "
                             "true), set_config('lock_timeout', %s, true)", (quiet, waiting))
            await db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                             (AUDIT_LOCK_CLASS, node))
            if abandoned is not None and abandoned.is_set():
                log.warning("a group of audit lines came to PostgreSQL after its node gave "
                            "up on it; not written", node=node, first_seq=first_seq,
                            lines=len(lines))
                raise AuditGroupAbandoned(f"a group of {len(lines)} audit lines of node "
                                          f"{node!r} from seq {first_seq} came too late")
            # The group must follow a line the database holds: a node's lines reach it
            # only in order, each group after the last acknowledged one. A database that
            # lacks that line went back in time under the running node; the group would
            # leave a gap, and the commits lost with it (revocations, spent tokens, CRL
            # numbers) would stay undone. (The look sees the rows before the DELETE.)
            # And the node's claim, in the same round trip: a DELETE a refusal below
            # follows is rolled back with it.
            cur = await db.execute(
                "WITH gone AS (DELETE FROM audit_lines WHERE node = %s AND seq >= %s) "
                "SELECT %s = 0 OR EXISTS (SELECT 1 FROM audit_lines WHERE node = %s "
                "AND seq = %s), (SELECT v FROM meta WHERE k = %s)",
                (node, first_seq, first_seq, node, first_seq - 1, f"holder:{node}"))
            row = await cur.fetchone()
            # (a claim lost with a restore of the database: the line check says so)
            if self._claimed is not None and self._claimed[0] == node and _claim_stands(
                    row[1] if row else None, self._claimed) is False:
                raise NodeNameTaken(
                    f"another process took the name of node {node!r} (its lines are that "
                    "process's to write now): nothing is written or signed here")
            if not (row and row[0]):
                raise AuditLinesMissing(
                    first_seq - 1, f"PostgreSQL lacks line {first_seq - 1} of the audit log "
                    f"of node {node!r}, which it had committed: the database went back in "
                    "time (restored from an older backup, or failed over to a lagging "
                    "replica)")
            async with db.cursor() as cur:
                await cur.executemany("INSERT INTO audit_lines (node, seq, line) VALUES "
                                      "(%s, %s, %s)",
                                      [(node, first_seq + i, line)
                                       for i, line in enumerate(lines)])
        # Bounded as a request's own calls are: the committer gives up after as long
        # (COMMIT_TIMEOUT_S), and the store refusing the next groups at once spares each
        # a wait of its own (one after the other, a frozen server held requests 30 s).
        return self._tx_future(put, bounded=True)

    def put_audit_tiles(self, node: str, tiles: Sequence[Tile], bundles: int
                        ) -> cf.Future[None]:
        """Store tiles of `node`'s log and how many full entry bundles the stored tiles
        now cover, in one transaction (a snapshot never sees one without the other). A
        tile is only ever replaced by a longer one (a partial tile grows)."""
        async def put(db: Conn) -> None:
            # A copy that hangs is passed by the next (TileCopy): PostgreSQL ends it.
            await db.execute("SELECT set_config('statement_timeout', '30s', true), "
                             "set_config('idle_in_transaction_session_timeout', '30s', true)")
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO audit_tiles (node, level, idx, data) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (node, level, idx) DO UPDATE SET data = EXCLUDED.data "
                    "WHERE length(EXCLUDED.data) > length(audit_tiles.data)",
                    [(node, t.level, t.index, t.data) for t in tiles])
            await db.execute("INSERT INTO audit_tile_heads (node, bundles) VALUES (%s, %s) "
                             "ON CONFLICT (node) DO UPDATE SET bundles = GREATEST("
                             "audit_tile_heads.bundles, EXCLUDED.bundles)", (node, bundles))
        return self._tx_future(put)

    def audit_tile_head_sync(self, node: str) -> tuple[int, dict[int, bytes]]:
        """(full entry bundles `node`'s stored tiles cover, and at that size the partial
        tile of each level above 0, by level), read in one snapshot; (0, {}) if the
        node has stored none. Off any event loop: it waits for PostgreSQL, within the
        answer timeout (a request for another node's proof waited out a frozen server,
        and held a thread of the default executor meanwhile: a review)."""
        async def head() -> tuple[int, dict[int, bytes]]:
            async with self.pool.connection() as conn:
                await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
                try:
                    async with conn.transaction():
                        cur = await conn.execute("SELECT bundles FROM audit_tile_heads "
                                                 "WHERE node = %s", (node,))
                        row = await cur.fetchone()
                        bundles = int(row[0]) if row else 0
                        edges: dict[int, bytes] = {}
                        for level, index, width in partial_tiles(bundles * TILE_WIDTH):
                            cur = await conn.execute(
                                "SELECT data FROM audit_tiles WHERE node = %s AND level = %s "
                                "AND idx = %s", (node, level, index))
                            found = await cur.fetchone()
                            edges[level] = bytes(found[0])[:width * HASH_SIZE] if found \
                                else b""
                        return bundles, edges
                finally:
                    await conn.set_isolation_level(None)
        return self._call(head(), bounded=True)

    def audit_tile_sync(self, node: str, level: int, index: int) -> bytes | None:
        """A stored tile of `node`'s log, as stored (full, or the latest partial)."""
        async def read() -> bytes | None:
            async with self.pool.connection() as conn:
                cur = await conn.execute("SELECT data FROM audit_tiles WHERE node = %s AND "
                                         "level = %s AND idx = %s", (node, level, index))
                row = await cur.fetchone()
                return bytes(row[0]) if row else None
        return self._call(read(), bounded=True)  # as the head

    async def _audit_size(self, node: str) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM audit_lines "
                                     "WHERE node = %s", (node,))
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def audit_size(self, node: str) -> int:
        """How many lines of `node`'s log PostgreSQL holds."""
        return await self._run(self._audit_size(node))

    def audit_size_sync(self, node: str) -> int:
        """audit_size, for a start, off any loop."""
        return self._call(self._audit_size(node))

    def audit_lines_sync(self, node: str, start: int, limit: int,
                         bounded: bool = False) -> list[bytes]:
        """`bounded`: within the answer timeout (a request's read, not a start's)."""
        async def read() -> list[bytes]:
            async with self.pool.connection() as conn:
                cur = await conn.execute("SELECT line FROM audit_lines WHERE node = %s AND "
                                         "seq >= %s ORDER BY seq LIMIT %s", (node, start, limit))
                return [bytes(r[0]) for r in await cur.fetchall()]
        return self._call(read(), bounded=bounded)

    async def audit_lines(self, node: str, start: int, limit: int) -> list[bytes]:
        rows = await self._rows("SELECT line FROM audit_lines WHERE node = %s AND seq >= %s "
                                "ORDER BY seq LIMIT %s", (node, start, limit))
        return [bytes(r[0]) for r in rows]

    async def put_audit_checkpoint(self, node: str, size: int, note: str,
                                   at: dt.datetime) -> None:
        async def put(db: Conn) -> None:
            await db.execute("INSERT INTO audit_checkpoints (node, size, note, at) VALUES "
                             "(%s,%s,%s,%s) ON CONFLICT (node) DO UPDATE SET size = "
                             "excluded.size, note = excluded.note, at = excluded.at WHERE "
                             "audit_checkpoints.size <= excluded.size",
                             (node, size, note, at.isoformat()))
        await self._tx(put)

    async def audit_logs(self) -> list[tuple[str, int, str | None]]:
        """Every node's log: (node, lines held, its latest checkpoint)."""
        # The nodes one by one through the primary key (a loose index scan), and each
        # one's last line by it too: a GROUP BY read every line (2.8 s at 10 million).
        rows = await self._rows(
            "WITH RECURSIVE n(node) AS (SELECT MIN(node) FROM audit_lines UNION ALL "
            "SELECT (SELECT MIN(a.node) FROM audit_lines a WHERE a.node > n.node) FROM n "
            "WHERE n.node IS NOT NULL) "
            "SELECT n.node, (SELECT MAX(a.seq) + 1 FROM audit_lines a WHERE a.node = n.node), "
            "c.note FROM n LEFT JOIN audit_checkpoints c ON c.node = n.node "
            "WHERE n.node IS NOT NULL ORDER BY n.node")
        return [(r[0], int(r[1]), r[2]) for r in rows]

    async def audit_checkpoint(self, node: str) -> str | None:
        rows = await self._rows("SELECT note FROM audit_checkpoints WHERE node = %s", (node,))
        return rows[0][0] if rows else None


    def import_ca(self, tables: Iterable[Table], node: str, lines: Iterable[bytes],
                  checkpoint: tuple[int, str] | None) -> dict[str, int]:
        """A single node's CA moved in (`hsmca store move`), in one transaction: every
        inventory table row for row, the CRL numbers carried on, and its audit log as
        `node`'s lines with its latest checkpoint. Rows copied, by table (and
        `audit_lines`). Raises CAExists into a database that holds a CA already, and
        ValueError for a table this schema has no place for (nothing is written)."""
        async def put(db: Conn) -> dict[str, int]:
            # One move at a time, and none beside a node's first start (its migrations).
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur = await db.execute("SELECT EXISTS (SELECT 1 FROM ca_keys) OR "
                                   "EXISTS (SELECT 1 FROM audit_lines)")
            row = await cur.fetchone()
            if row is not None and row[0]:
                raise CAExists("the database already holds a CA (keys or audit lines): "
                               "move into an empty database")
            cur = await db.execute("SELECT table_name, column_name FROM "
                                   "information_schema.columns WHERE table_schema = "
                                   "current_schema()")
            ours: dict[str, set[str]] = {}
            for table, column in await cur.fetchall():
                ours.setdefault(table, set()).add(column)
            counts: dict[str, int] = {}
            for name, cols, rows in tables:
                if not set(cols) <= ours.get(name, set()):
                    raise ValueError(f"the SQLite inventory's table {name} ({', '.join(cols)}) "
                                     "has no match in PostgreSQL's schema: are both made by "
                                     "this hsmca?")
                copy_sql = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
                    pgsql.Identifier(name), pgsql.SQL(", ").join(map(pgsql.Identifier, cols)))
                n = 0
                async with db.cursor().copy(copy_sql) as copy:
                    for r in rows:
                        await copy.write_row(r)
                        n += 1
                counts[name] = n
            # The single node's intent lines are the init log's now.
            await db.execute("UPDATE certs SET audit_log = %s WHERE audit_seq IS NOT NULL "
                             "AND audit_log IS NULL", (node,))
            # The next CRL's number follows the last one SQLite gave (RFC 5280: CRL
            # numbers only increase).
            cur = await db.execute("SELECT v FROM meta WHERE k = 'crl_number'")
            row = await cur.fetchone()
            if row is not None:
                await db.execute("SELECT setval('crl_numbers', %s)", (int(row[0]),))
            n = 0
            async with db.cursor().copy("COPY audit_lines (node, seq, line) FROM STDIN") as copy:
                for n, line in enumerate(lines, start=1):
                    await copy.write_row((node, n - 1, line))
            counts["audit_lines"] = n
            if checkpoint is not None:
                await db.execute("INSERT INTO audit_checkpoints (node, size, note, at) VALUES "
                                 "(%s, %s, %s, %s)", (node, checkpoint[0], checkpoint[1],
                                                      dt.datetime.now(dt.UTC).isoformat()))
            return counts
        return self._call(self._tx(put))


async def _stored_claim(db: Conn, node: str) -> str | None:
    """The claim of `node`'s log as stored (`<epoch>:<token>`), or None."""
    row = await (await db.execute("SELECT v FROM meta WHERE k = %s",
                                  (f"holder:{node}",))).fetchone()
    return row[0] if row else None


def _claim_of(value: str | None) -> tuple[int, str]:
    """(epoch, token) of a node's claim as stored; (0, "") for none."""
    epoch, _, token = (value or "").partition(":")
    return (int(epoch), token) if epoch.isdigit() else (0, "")


def _claim_stands(value: str | None, mine: tuple[str, int, str]) -> bool | None:
    """True: the stored claim is this process's; False: a later one replaced it;
    None: the database lost it (older, or none)."""
    epoch, token = _claim_of(value)
    if (epoch, token) == mine[1:]:
        return True
    return False if epoch >= mine[1] else None


class Lease:
    """`await lease.try_take()` is True on the one node that holds the lease named
    `name`: a session advisory lock, held on a connection of its own for as long as
    that connection lives, so a dead node's lease goes with its connection."""

    def __init__(self, store: PostgresStore, name: str) -> None:
        self.store, self.name = store, name
        self._conn: Conn | None = None
        self._held = False
        self.lost: str | None = None  # why its holder must stop (set by its holder)
        self.token = secrets.token_hex(16)  # this holder's, for a claim (claim_node)

    async def try_take(self) -> bool | None:
        """True if held, False if another session holds it, None if PostgreSQL could not
        be asked (the lease's connection lost: a restart, a restore): not held either,
        but not known to be anyone else's."""
        async def take() -> bool:
            if self._conn is not None and not self._conn.closed and self._held:
                await self._conn.execute("SELECT 1")  # still connected: still held
                return True
            if self._conn is None or self._conn.closed:
                self._held = False
                self._conn = await self.store.connect_own()
            # A 64-bit hash of the name: with hashtext's 32 bits, two node names in
            # some tens of thousands collide, and the second node could not start.
            cur = await self._conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", ("lease:" + self.name,))
            row = await cur.fetchone()
            self._held = bool(row and row[0])
            return self._held

        try:
            return await self.store._run(take(), own=True)
        except (StoreUnavailable, psycopg.Error):  # not held: a new connection next time
            self._held = False
            conn, self._conn = self._conn, None
            if conn is not None:
                self.store._spawn(conn.close(), own=True)
            return None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not self.store._closed:
            self.store._spawn(conn.close(), own=True)


async def _changed(db: Conn, name: str) -> None:
    """Move a change counter and tell every node, both at this transaction's commit."""
    await db.execute("UPDATE changes SET n = n + 1 WHERE name = %s", (name,))
    await db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))


async def _rate_over(db: Conn, kind: str, keys: Sequence[str], since: dt.datetime,
                     limit: int) -> str | None:
    for key in keys:
        cur = await db.execute("SELECT COUNT(*) FROM (SELECT 1 FROM acme_rate WHERE kind = %s "
                               "AND key = %s AND at >= %s LIMIT %s) t",
                               (kind, key, since.isoformat(), limit))
        row = await cur.fetchone()
        if row is not None and row[0] >= limit:
            return key
    return None


def _ssh_where(which: SSHSelector) -> tuple[str, str]:
    if which.serial is not None:
        return "serial = %s", str(which.serial)
    if which.key_id is not None:
        return "key_id = %s", which.key_id
    if which.key_sha256 is not None:
        return "key_sha256 = %s", which.key_sha256
    raise ValueError("an SSH selector names a serial, a key id or a key")


# libpq's words for a mistake in the URL, not an outage, and what to check: "is
# unavailable" alone read as "wait" to a cluster trial.
_URL_MISTAKES = (
    (("password authentication failed", "no password supplied"),
     "check the user in the database URL ([store] url, or --store-url) and the password "
     "libpq reads for it (~/.pgpass, PGPASSFILE or PGPASSWORD of the user hsmca runs as)"),
    (("does not exist",), "check the database (and user) names in the database URL ([store] "
     "url, or --store-url)"),
    (("failed to resolve host", "could not translate host name"),
     "check the host in the database URL ([store] url, or --store-url)"),
)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    why = text[0] if text else type(exc).__name__
    hint = next((h for words, h in _URL_MISTAKES if any(w in why for w in words)), None)
    return f"{why}: {hint}" if hint else why


_OUR_TABLES = tuple(sorted({m.group(1) for script in PG_MIGRATIONS for m in re.finditer(
    r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", script)}))


async def _refuse_foreign_tables(conn: Conn) -> None:
    """A database without hsmca's schema that has tables of the names hsmca makes (an
    application's `certs`): the migrations would keep them as they are, fail half-way
    on their columns, and leave the database half made (a cluster trial's `store move`
    printed a traceback). Refused before anything is written."""
    cur = await conn.execute("SELECT to_regclass('schema_version')")
    row = await cur.fetchone()
    if row is not None and row[0] is not None:
        return
    cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = "
                             "current_schema() AND tablename = ANY(%s) ORDER BY tablename",
                             (list(_OUR_TABLES),))
    taken = [r[0] for r in await cur.fetchall()]
    if taken:
        raise NoInventory(f"the database {conn.info.dbname!r} already has tables hsmca would "
                          f"make, which hsmca did not make ({', '.join(taken[:5])}): give "
                          "hsmca a database of its own (nothing was written to it)")


async def _schema_version(conn: Conn) -> int | None:
    """The inventory's schema version (None: no row yet); SchemaTooNew if this code
    does not know it."""
    cur = await conn.execute("SELECT version FROM schema_version")
    row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > len(PG_MIGRATIONS):
        raise SchemaTooNew(
            f"the inventory (PostgreSQL) has schema version {version}, newer than this "
            f"hsmca knows ({len(PG_MIGRATIONS)}): upgrade hsmca on this node")
    return version if row else None


async def _same_schema(conn: Conn) -> None:
    """Refuse to read an inventory of another schema than this code's."""
    version = await _schema_version(conn) or 0
    if version < len(PG_MIGRATIONS):
        raise SchemaTooNew(f"the inventory (PostgreSQL) has schema version {version}, older "
                           f"than this hsmca reads ({len(PG_MIGRATIONS)}): start a node once "
                           "(it migrates the inventory), then look again")


async def migrate(conn: Conn) -> int | None:
    """Run the migrations the database has not had, each in one transaction, under an
    advisory lock (so that nodes starting at once apply each exactly once); refuse a
    database whose schema is newer than this code. The version migrated from, or None
    if there was nothing to do (another node's start did it, or a new database)."""
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        await _refuse_foreign_tables(conn)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        known = await _schema_version(conn)
        version = known or 0
        if known is None:
            await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        for number, script in enumerate(PG_MIGRATIONS[version:], start=version + 1):
            async with conn.transaction():
                await conn.execute(script.encode())  # several statements: no parameters
                await conn.execute("UPDATE schema_version SET version = %s", (number,))
        if 0 < version < len(PG_MIGRATIONS):
            # One line for the upgrade, as SQLite's says it; a new database is not news
            # (init printed 16 lines of it, before its warnings and summary).
            log.warning("inventory migrated", schema_from=version,
                        schema_to=len(PG_MIGRATIONS),
                        way_back="the release before refuses this database now: restore "
                                 "the dump taken before the upgrade (docs/cluster.md)")
            return version
        return None
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


_KEY_VALUES = "(" + ",".join(["%s"] * 10) + ")"  # one per KEY_COLUMNS


async def _active_labels(db: Conn, kind: str) -> list[str]:
    """The kind's active key, its row locked: a rotation of the same kind on another
    node waits for this transaction, then finds the key it would replace gone from
    `active` (read committed re-checks a locked row) and changes nothing."""
    cur = await db.execute("SELECT label FROM ca_keys WHERE kind = %s AND state = 'active' "
                           "FOR UPDATE", (kind,))
    return [r[0] for r in await cur.fetchall()]


async def _has_next(db: Conn, kind: str) -> bool:
    """Whether the kind has a staged key (read after `_active_labels` locked its active
    row: a staging committed meanwhile on another node is seen)."""
    cur = await db.execute("SELECT 1 FROM ca_keys WHERE kind = %s AND state = 'next'", (kind,))
    return await cur.fetchone() is not None
