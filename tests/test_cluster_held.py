"""PostgreSQL holding one COMMIT or one read, as a lost synchronous standby or a stalled
disk holds them, at the moment that matters, made so by locks the test takes.

A re-trial lost PostgreSQL's synchronous standby under load:
- a renewal was signed, its row and outcome line committed, and then the check that no
  revocation raced it (its read of the presented certificate) was given up on. The
  client got a 503, and the new certificate stayed valid, OCSP "good", with nothing
  logged. It is now withheld and revoked;
- while an audit line's COMMIT was held, /health said "the primary process does not
  answer", with the store "ok". It now says the audit log's write waits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from tests.cluster_kit import Cluster, call, make_cluster
from tests.conftest import Daemon
from tests.helpers import ask_ocsp, enroll, issuing, request_for, whole_lines
from tests.helpers import load as load_cert

# The renewal's row waits at its COMMIT for advisory lock 4343, which the test holds
# until its own table lock is queued behind that commit: the lock is then granted the
# moment the row commits, before the renewal's check can read.
HELD_RENEWAL = """
CREATE FUNCTION held_renewal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.renewed_from IS NOT NULL THEN
    PERFORM pg_advisory_lock(4343);
    PERFORM pg_advisory_unlock(4343);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER held AFTER INSERT ON certs DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION held_renewal();
"""


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory, postgres_server: Any
         ) -> Iterator[tuple[Cluster, Daemon]]:
    """One node for both tests (each holds a different table, and drops its trigger)."""
    c = make_cluster(tmp_path_factory.mktemp("held"), postgres_server.new_database())
    try:
        yield c, c.start("w1")
    finally:
        c.stop()


def _waiting(db: Any, what: str) -> None:
    """Until a session waits for `what` (a lock, as pg_locks names it): observed, not
    guessed. Bounded, so that a change that never waits fails with what was expected."""
    deadline = time.monotonic() + 30
    while not db.execute(f"SELECT 1 FROM pg_locks WHERE NOT granted AND {what}").fetchone():
        assert time.monotonic() < deadline, f"nobody came to wait for {what}"


async def test_a_renewal_whose_revocation_check_fails_after_its_row_committed_is_revoked(
        tmp_path: Path, held: tuple[Cluster, Daemon]) -> None:
    """The renewal's row commits, and a table lock taken in the same instant keeps its
    check from reading until the store gives up on it: 503, and the certificate nobody
    received is revoked, with the audit lines that say why."""
    import psycopg
    c, node = held
    holder = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
    locker = await asyncio.to_thread(psycopg.connect, c.url)
    watcher = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
    try:
        cert, key = await asyncio.to_thread(enroll, node, tmp_path, "service", ["held.test"])
        parent = format(load_cert(cert).serial_number, "x")
        await asyncio.to_thread(holder.execute, HELD_RENEWAL)
        await asyncio.to_thread(holder.execute, "SELECT pg_advisory_lock(4343)")
        renewal = asyncio.create_task(call("POST", f"{node.url}/v1/x509/renew",
                                           node.ssl(cert, key), {}))
        # The renewal's row is at its COMMIT; a lock of the whole table queues behind it.
        await asyncio.to_thread(_waiting, watcher, "locktype = 'advisory' AND objid = 4343")
        queued = asyncio.create_task(asyncio.to_thread(
            locker.execute, "LOCK TABLE certs IN ACCESS EXCLUSIVE MODE"))
        await asyncio.to_thread(_waiting, watcher, "mode = 'AccessExclusiveLock' AND "
                                "relation = 'certs'::regclass")
        await asyncio.to_thread(holder.execute, "SELECT pg_advisory_unlock(4343)")
        await queued  # the row committed, and nothing reads the table until the rollback
        status, ctype, body = await renewal  # the check was given up on
        await asyncio.to_thread(locker.rollback)

        assert status == 503 and ctype == "application/problem+json", (status, body)
        [(child, der)] = await asyncio.to_thread(lambda: watcher.execute(
            "SELECT serial, der FROM certs WHERE renewed_from = %s", (parent,)).fetchall())
        # Noted for the next start before the 503 went, should the node stop first.
        noted = c.state / "nodes" / "w1" / "audit" / "withheld.jsonl"
        assert [json.loads(x)[1] for x in noted.read_text().splitlines()] == [child]
        said = "revoked a certificate signed but never released"
        assert await asyncio.to_thread(node.wait_stderr, lambda: any(
            said in line and child in line for line in node.stderr), 60), node.stderr[-20:]

        # What a relying party sees: the certificate nobody received is revoked.
        new = x509.load_der_x509_certificate(bytes(der))
        answer, _ = await ask_ocsp(node, request_for(new, issuing(node)))
        assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED, answer
        # And the audit log says why: withheld after its "ok" outcome, then unreleased.
        lines = [json.loads(x) for x in whole_lines(
            (c.state / "nodes" / "w1" / "audit" / "log.jsonl").read_bytes())]
        [intent] = [e for e in lines if e["event"] == "hsm.sign" and e.get("phase") ==
                    "intent" and e.get("serial") == child and e["purpose"] == "x509"]
        [withheld] = [e for e in lines if e["event"] == "sign.withheld"
                      and e["op_id"] == intent["op_id"]]
        assert withheld["released"] is False and "StoreUnavailable" in withheld["reason"]
        [why] = [e for e in lines if e["event"] == "sign.unreleased"]
        assert why["serial"] == child and why["intent_seq"] == intent["seq"], why
    finally:
        await asyncio.to_thread(locker.rollback)  # else the DROP waits for its lock
        await asyncio.to_thread(holder.execute, "DROP TRIGGER IF EXISTS held ON certs")
        for conn in (holder, locker, watcher):
            await asyncio.to_thread(conn.close)


HELD_AUDIT = """
CREATE OR REPLACE FUNCTION held_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_advisory_lock(4444);
  PERFORM pg_advisory_unlock(4444);
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER held AFTER INSERT ON audit_lines DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION held_audit();
"""


async def _health_while_an_audit_write_is_held(node: Daemon, holder: Any, watcher: Any,
                                               write: Callable[[], None]) -> None:
    """Hold every audit line's COMMIT (HELD_AUDIT), have `write()` write one, and see
    /health say the write waits on PostgreSQL: said once it has waited a second,
    whichever commit waits (the primary's own, an OCSP response's or a checkpoint's,
    left the recorder free to answer "ok": a CI run), asked until then within the
    commit's own limit (10 s)."""
    await asyncio.to_thread(holder.execute, HELD_AUDIT)
    await asyncio.to_thread(holder.execute, "SELECT pg_advisory_lock(4444)")
    try:
        write()
        await asyncio.to_thread(_waiting, watcher, "locktype = 'advisory' AND objid = 4444")
        deadline = time.monotonic() + 8
        while True:
            status, _, body = await call("GET", f"{node.url}/health", node.ssl())
            if status == 503 or time.monotonic() > deadline:
                break
    finally:
        await asyncio.to_thread(holder.execute, "SELECT pg_advisory_unlock(4444)")
    assert status == 503, body
    audit = json.loads(body)["audit"]
    assert audit.startswith("unavailable: an audit log write has waited "), audit
    assert "PostgreSQL" in audit, audit


async def test_health_names_an_audit_write_that_postgresql_holds(
        tmp_path: Path, held: tuple[Cluster, Daemon]) -> None:
    """While the audit log's COMMIT waits in PostgreSQL, /health names that wait (a
    load balancer takes the node out, and the operator knows where to look), and is
    healthy again once it ends."""
    import psycopg
    c, node = held
    holder = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
    watcher = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
    try:
        cert, key = await asyncio.to_thread(enroll, node, tmp_path, "service", ["wait.test"])
        renewal: list[asyncio.Task[Any]] = []

        def renew() -> None:
            renewal.append(asyncio.create_task(call(
                "POST", f"{node.url}/v1/x509/renew", node.ssl(cert, key), {})))
        await _health_while_an_audit_write_is_held(node, holder, watcher, renew)
        assert (await renewal[0])[0] in (201, 503)  # signed, or given up on: not hung
        await asyncio.to_thread(holder.execute, "DROP TRIGGER held ON audit_lines")
        status, _, body = await call("GET", f"{node.url}/health", node.ssl())
        assert status == 200, body
    finally:
        await asyncio.to_thread(holder.execute, "DROP TRIGGER IF EXISTS held ON audit_lines")
        for conn in (holder, watcher):
            await asyncio.to_thread(conn.close)


async def test_health_names_a_write_of_the_primarys_own_lines_that_postgresql_holds(
        tmp_path: Path, held: tuple[Cluster, Daemon]) -> None:
    """The primary's own lines (here a reload's; a checkpoint's, an OCSP response's
    alike) held at their COMMIT left the recorder free to answer /health "ok" until
    the write was given up on (a CI run's flaky test). Said within seconds, as a
    worker's held write is."""
    import os
    import signal

    import psycopg
    c, node = held
    holder = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
    watcher = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
    try:
        # a policy.reload line, the primary's own
        await _health_while_an_audit_write_is_held(
            node, holder, watcher, lambda: os.kill(node.proc.pid, signal.SIGHUP))
    finally:
        await asyncio.to_thread(holder.execute, "DROP TRIGGER IF EXISTS held ON audit_lines")
        for conn in (holder, watcher):
            await asyncio.to_thread(conn.close)


async def test_health_names_a_lock_another_session_holds_on_the_cas_tables(
        held: tuple[Cluster, Daemon]) -> None:
    """A PostgreSQL trial locked a table of the CA from psql (as `CREATE INDEX` or
    `VACUUM FULL` does): every issuance waited, and /health said "ok". It says which
    table, which lock and whose session, and is healthy again once it is released."""
    import psycopg
    c, node = held
    locker = await asyncio.to_thread(psycopg.connect, c.url)  # its transaction held open
    try:
        pid = await asyncio.to_thread(
            lambda: locker.execute("SELECT pg_backend_pid()").fetchone()[0])
        await asyncio.to_thread(locker.execute, "LOCK TABLE certs IN SHARE MODE")
        # (past the answer a /health of the test before may have left for a second)
        deadline = time.monotonic() + 10
        while (answer := await call("GET", f"{node.url}/health", node.ssl()))[0] != 503:
            assert time.monotonic() < deadline, answer
        body = answer[2]
        assert json.loads(body)["store"] == (
            f"unavailable: writes wait on a lock another session holds (certs: ShareLock of "
            f"PostgreSQL session {pid}), so nothing is signed until it is released: see "
            "pg_locks and pg_stat_activity for what it runs"), body
        await asyncio.to_thread(locker.rollback)
        # (each process looks once a second, whoever asks: a review)
        deadline = time.monotonic() + 10
        while (answer := await call("GET", f"{node.url}/health", node.ssl()))[0] != 200:
            assert time.monotonic() < deadline, answer
        assert json.loads(answer[2])["store"] == "ok", answer
        # a table an ACME finalize writes counts too (a review)
        await asyncio.to_thread(locker.execute, "LOCK TABLE acme_orders")
        deadline = time.monotonic() + 10
        while (answer := await call("GET", f"{node.url}/health", node.ssl()))[0] != 503:
            assert time.monotonic() < deadline, answer
        assert "acme_orders: AccessExclusiveLock" in json.loads(answer[2])["store"], answer
        await asyncio.to_thread(locker.rollback)
        # A lock asked for and queued behind a long read (an ALTER TABLE's) holds every
        # writer after it: its session is named too (a re-trial saw none)
        reader = await asyncio.to_thread(psycopg.connect, c.url)
        watcher = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
        try:
            await asyncio.to_thread(reader.execute, "SELECT count(*) FROM certs")
            queued = asyncio.create_task(asyncio.to_thread(locker.execute,
                                                           "LOCK TABLE certs"))
            await asyncio.to_thread(_waiting, watcher, f"pid = {pid}")
            said = (f"certs: AccessExclusiveLock asked for, and waited for, by PostgreSQL "
                    f"session {pid}")
            deadline = time.monotonic() + 10  # (past the answer kept from the last look)
            while said not in (answer := await call("GET", f"{node.url}/health",
                                                     node.ssl()))[2].decode():
                assert time.monotonic() < deadline, answer
            assert answer[0] == 503, answer
        finally:
            await asyncio.to_thread(reader.rollback)
            await queued
            await asyncio.to_thread(reader.close)
            await asyncio.to_thread(watcher.close)
    finally:
        await asyncio.to_thread(locker.rollback)
        await asyncio.to_thread(locker.close)
