"""Faults of a cluster, against real processes (docs/cluster.md "What each failure
means"): kill -9 of a node under load loses nothing, and PostgreSQL stopped under
load means 503 from every node and nothing signed, then recovery without a restart.

Load is counted, not timed: each phase runs until clients have received a number of
certificates, so a slow machine only makes the test longer."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509 import ocsp

from tests.cluster_kit import Cluster, call, make_cluster, signed_records
from tests.helpers import ask_ocsp, enroll, issuing, metric_samples, request_for, signed
from tests.helpers import load as load_cert


class Load:
    """Clients renewing their certificates over keep-alive connections, one per node,
    until told to stop; what each got back is kept."""

    def __init__(self, creds: dict[str, tuple[Any, Path, Path]]) -> None:
        self.creds = creds
        self.received: list[tuple[str, bytes]] = []  # (node, certificate PEM)
        self.statuses: list[tuple[str, int]] = []
        self.errors: list[tuple[str, str]] = []
        self._stop = asyncio.Event()
        self._changed = asyncio.Condition()  # notified at every answer
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for name, (node, cert, key) in self.creds.items():
            self._tasks.append(asyncio.create_task(self._client(name, node, cert, key)))

    async def _client(self, name: str, node: Any, cert: Path, key: Path) -> None:
        """Renews until stopped. A connection lost mid-request is opened again at once; a
        node that refuses connections is gone (killed), and its client ends there."""
        ctx = node.ssl(cert, key)
        while not self._stop.is_set():
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                    while not self._stop.is_set():
                        async with s.post(f"{node.url}/v1/x509/renew", json={}, ssl=ctx) as r:
                            body = await r.read()
                            async with self._changed:
                                self.statuses.append((name, r.status))
                                if r.status in (200, 201):
                                    self.received.append(
                                        (name, json.loads(body)["certificate"].encode()))
                                self._changed.notify_all()
            except aiohttp.ClientConnectorError as exc:
                self.errors.append((name, type(exc).__name__))
                return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.errors.append((name, type(exc).__name__))

    async def wait_for(self, done: Any, what: str, within: float = 120) -> None:
        """Until `done()` holds, woken by each answer (a deadline, so that a hang fails
        with what was awaited)."""
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            raise AssertionError(f"waited {within} s for {what}: {self.statuses[-10:]}, "
                                 f"errors {self.errors[-5:]}") from None

    async def until(self, count: int, *nodes: str) -> None:
        """Until `count` more certificates came back from `nodes` (any, if none named)."""
        def got() -> int:
            return sum(1 for n, _ in self.received if not nodes or n in nodes)
        target = got() + count
        await self.wait_for(lambda: got() >= target, f"{count} certificates from {nodes}")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
def two_or_three(tmp_path: Path, postgres_server: Any) -> Iterator[Cluster]:
    c = make_cluster(tmp_path, postgres_server.new_database())
    try:
        yield c
    finally:
        c.stop()


async def test_kill_9_of_a_node_under_load_loses_nothing(two_or_three: Cluster,
                                                          tmp_path: Path) -> None:
    c = two_or_three
    nodes = [c.start(name) for name in ("k1", "k2", "k3")]
    creds = {}
    for i, node in enumerate(nodes):
        cert, key = await asyncio.to_thread(enroll, node, tmp_path, "service", [f"l{i}.test"])
        creds[f"k{i + 1}"] = (node, cert, key)
    load = Load(creds)
    load.start()
    try:
        await load.until(15)
        nodes[1].proc.send_signal(signal.SIGKILL)  # the primary; its workers follow it
        await asyncio.to_thread(nodes[1].proc.wait)
        killed_at = len(load.statuses)
        # The others keep issuing, and answer no 5xx.
        await load.until(20, "k1", "k3")
    finally:
        await load.stop()
    after = [(n, s) for n, s in load.statuses[killed_at:] if n != "k2"]
    assert after and all(s in (200, 201) for _, s in after), after
    # Every certificate any client received has its intent and outcome in some node's
    # log (in PostgreSQL) and its row in the inventory (asked of node 1).
    records = await asyncio.to_thread(signed_records, c.url)
    serials = [x509.load_pem_x509_certificate(pem).serial_number for _, pem in load.received]
    assert len(set(serials)) == len(serials)
    n1 = nodes[0]
    for serial in serials:
        intent, outcome = records[format(serial, "x")]
        assert outcome is not None and outcome["result"] == "ok", intent
        status, _, body = await call("GET", f"{n1.url}/v1/inventory/certificates/"
                                     f"{serial:x}", n1.admin_ssl())
        assert status == 200, body
    # The killed node's log is still served and verifies, through a survivor.
    proc = await asyncio.to_thread(_verify, c, nodes[2], tmp_path / "state.json")
    assert proc.returncode == 0 and "log k2: OK:" in proc.stdout, proc.stdout + proc.stderr


def _verify(c: Cluster, node: Any, state: Path) -> Any:
    from tests.conftest import hsmca
    cert, key = c.admin
    return hsmca("audit", "verify", "--url", node.url, "--ca", node.root, "--client-cert",
                 cert, "--client-key", key, "--key", c.state / "audit" / "audit_key.pem",
                 "--state", state, check=False)


async def test_postgresql_stopped_means_503_and_nothing_signed_then_recovery(
        tmp_path: Path) -> None:
    from tests.pgserver import PostgresServer
    server = await asyncio.to_thread(PostgresServer)  # its own: this test stops it
    c = make_cluster(tmp_path, server.new_database())
    try:
        nodes = [c.start(name) for name in ("p1", "p2")]
        creds = {}
        for i, node in enumerate(nodes):
            cert, key = await asyncio.to_thread(enroll, node, tmp_path, "service",
                                                [f"p{i}.test"])
            creds[f"p{i + 1}"] = (node, cert, key)
        # What relying parties asked of p1 before the outage: OCSP, and the CRL.
        p1, first = nodes[0], load_cert(creds["p1"][1])
        await signed(p1, first, ocsp.OCSPCertStatus.GOOD)
        status, _, crl_before = await call("GET", f"{p1.url}/v1/x509/crl", p1.ssl(), None)
        assert status == 200
        # Under load: clients renew on both nodes while the database goes away.
        idle = {n: await _sign_calls(node) for n, (node, _, _) in creds.items()}
        load = Load(creds)
        load.start()
        try:
            await load.until(10)
            await asyncio.to_thread(server.stop)
            stopped = len(load.statuses)
            # Every client has had two answers since (the first may have been in
            # flight at the stop): from then on, each is a 503.
            await load.wait_for(lambda: all(
                sum(1 for n, _ in load.statuses[stopped:] if n == name) >= 2
                for name in creds), "two answers per client after the stop")
            settled = len(load.statuses)
            signed_before = {n: await _sign_calls(node) for n, (node, _, _) in creds.items()}
            # (The count moves with signing: each certificate received is one C_Sign.)
            for name in creds:
                got = sum(1 for n, _ in load.received if n == name)
                assert signed_before[name] - idle[name] >= got, (name, idle, signed_before)
            assert load.received
            await load.wait_for(lambda: all(
                sum(1 for n, _ in load.statuses[settled:] if n == name) >= 3
                for name in creds), "three more answers per client")
            answered = load.statuses[settled:]
        finally:
            await load.stop()
        assert answered and all(status == 503 for _, status in answered), answered
        for name, (node, cert, key) in creds.items():
            status, ctype, body = await call("POST", f"{node.url}/v1/x509/renew",
                                             node.ssl(cert, key), {})
            assert status == 503 and ctype == "application/problem+json", (name, body)
            assert json.loads(body)["status"] == 503
            status, _, body = await call("GET", f"{node.url}/health", node.ssl())
            assert status == 503 and b"unavailable" in body, body
            # why the node cannot reach it, as the connection attempt said (a changed
            # password, here a stopped server), not only that a wait timed out
            assert "cannot connect: connection failed" in json.loads(body)["store"], body
            # A revocation's client is told it was not recorded, a reader that it was not
            # answered (not "nothing can be signed")
            status, _, body = await call("POST", f"{node.url}/v1/x509/revoke",
                                         node.admin_ssl(), {"serial": "1234"})
            assert status == 503 and "so nothing was revoked" in json.loads(body)["detail"]
            status, _, body = await call("GET", f"{node.url}/v1/ssh/krl", node.ssl(), None)
            assert status == 503, body
            assert "so this cannot be answered right now" in json.loads(body)["detail"]
        # Nothing was signed while the record could not be made: the HSMs made no
        # signature. (Not the intents in a node's log file: each request still writes
        # its intent there, then cuts it when PostgreSQL refuses the group, so a read
        # of the file may see one that is never durable.)
        assert {n: await _sign_calls(node) for n, (node, _, _) in creds.items()} \
            == signed_before
        # Relying parties get the last CRL p1 served, valid until its nextUpdate as any
        # CRL is; OCSP answers its own "try later", not an HTTP error.
        status, _, crl_now = await call("GET", f"{p1.url}/v1/x509/crl", p1.ssl(), None)
        assert status == 200 and crl_now == crl_before
        resp, _ = await ask_ocsp(p1, request_for(first, issuing(p1)))
        assert resp.response_status == ocsp.OCSPResponseStatus.TRY_LATER
        await asyncio.to_thread(server.start)
        # /health says so first (a load balancer sends nothing else to a node it
        # marked down), then the node serves again, without a restart.
        for name, (node, cert, key) in creds.items():
            status, body = await _until(node, "GET", "/health", node.ssl(), None)
            assert status == 200, (name, body)
            status, body = await _until(node, "POST", "/v1/x509/renew", node.ssl(cert, key),
                                        {})
            assert status in (200, 201), (name, body)
        # What the nodes said meanwhile is their own JSON lines, no library's bare text
        # (psycopg's pool wrote two lines at each attempt to reconnect) and no
        # traceback for a database that is away (the checkpointer's, every second).
        for node in nodes:
            torn = [line for line in node.stderr if not line.startswith("{")]
            assert not torn, torn[:3]
            assert not any("Traceback" in line for line in node.stderr)
            # each error of the outage said once, not at every round of the refresher
            refresh = [json.loads(x) for x in node.stderr if '"OCSP refresh failed"' in x]
            assert len(refresh) == len({e["error"] for e in refresh}), refresh
        # The logs of both nodes, outage and all, verify.
        proc = await asyncio.to_thread(_verify, c, nodes[0], tmp_path / "state.json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "log p1: OK:" in proc.stdout and "log p2: OK:" in proc.stdout
    finally:
        c.stop()
        await asyncio.to_thread(server.close)


async def test_the_krl_built_before_postgresql_restarted_is_served_in_the_next_outage(
        tmp_path: Path) -> None:
    """A cluster trial: PostgreSQL restarted, then stopped again a few seconds later
    with no KRL fetched between: every node answered the KRL 503, where docs/cluster.md
    promises the one the worker last built (the reconnection makes every process read
    the revocations again, which threw the built one away)."""
    from tests.pgserver import PostgresServer
    server = await asyncio.to_thread(PostgresServer)  # its own: this test stops it
    c = make_cluster(tmp_path, server.new_database())
    try:
        node = c.start("r1")
        status, _, built = await call("GET", f"{node.url}/v1/ssh/krl", node.ssl(), None)
        assert status == 200
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        deadline = asyncio.get_running_loop().time() + 60
        while (await call("GET", f"{node.url}/health", node.ssl()))[0] != 200:
            assert asyncio.get_running_loop().time() < deadline, "not back"
        await asyncio.to_thread(server.stop)
        status, _, served = await call("GET", f"{node.url}/v1/ssh/krl", node.ssl(), None)
        assert status == 200 and served == built, served[:200]
    finally:
        c.stop()
        await asyncio.to_thread(server.close)


async def test_a_krl_built_before_this_node_revoked_is_not_served_in_an_outage(
        tmp_path: Path) -> None:
    """The last KRL built is served while PostgreSQL is away, but not one built before
    an SSH revocation this node committed since (a review: it was served as current,
    and the key just revoked was missing from it): that is a 503, as with no KRL."""
    from tests.pgserver import PostgresServer
    server = await asyncio.to_thread(PostgresServer)  # its own: this test stops it
    c = make_cluster(tmp_path, server.new_database())
    try:
        node = c.start("r1", workers=1)  # the one process that built the KRL revokes
        status, _, _ = await call("GET", f"{node.url}/v1/ssh/krl", node.ssl(), None)
        assert status == 200
        line = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        status, _, raw = await call("POST", f"{node.url}/v1/ssh/revoke", node.admin_ssl(),
                                    {"public_key": line})
        assert status == 200, raw
        await asyncio.to_thread(server.stop)
        status, ctype, served = await call("GET", f"{node.url}/v1/ssh/krl", node.ssl(), None)
        assert (status, ctype) == (503, "application/problem+json"), (status, served[:200])
    finally:
        c.stop()
        await asyncio.to_thread(server.close)


async def test_postgresql_that_hangs_makes_health_say_so(tmp_path: Path) -> None:
    """A database that takes connections but answers nothing (frozen, a network that
    drops packets) is as unavailable as a stopped one: /health says so within its
    own time limit, for the load balancer to take the node out, and says ok again once
    the database answers."""
    from tests.pgserver import PostgresServer
    server = await asyncio.to_thread(PostgresServer)  # its own: this test freezes it
    c = make_cluster(tmp_path, server.new_database())
    try:
        node = c.start("h1")
        status, _, body = await call("GET", f"{node.url}/health", node.ssl())
        assert status == 200, body
        try:
            await asyncio.to_thread(server.freeze)
            status, _, body = await call("GET", f"{node.url}/health", node.ssl())
            assert status == 503, body
            assert json.loads(body)["store"] == "unavailable: no answer within 2 s", body
        finally:
            await asyncio.to_thread(server.thaw)
        status, body = await _until(node, "GET", "/health", node.ssl(), None)
        assert status == 200, body
    finally:
        c.stop()
        await asyncio.to_thread(server.close)


async def _sign_calls(node: Any) -> float:
    """The C_Sign calls the node's HSM sessions have made (its /metrics, the HSM's own
    count, summed over its processes)."""
    status, _, body = await call("GET", f"{node.url}/metrics", node.ssl())
    assert status == 200, body
    return metric_samples(body.decode())[("hsmca_hsm_sign_calls_total", ())]


async def _until(node: Any, method: str, path: str, ctx: Any, body: Any
                 ) -> tuple[int, bytes]:
    """Ask until the node answers 2xx: the pool reconnects on its own once the server
    is back; the deadline only bounds a node that never recovers. Each request's round
    trip paces the asking."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        status, _, answer = await call(method, f"{node.url}{path}", ctx, body)
        if 200 <= status < 300 or loop.time() > deadline:
            return status, answer


async def test_a_node_on_a_new_disk_gets_its_log_back_from_postgresql(
        two_or_three: Cluster, tmp_path: Path) -> None:
    """PostgreSQL is the record: a node whose local files are lost starts again with
    its whole log, and a local log that disagrees with PostgreSQL stops the start."""
    import shutil
    import subprocess

    from tests.conftest import HSMCA
    c = two_or_three
    node = c.start("disk-1")
    await asyncio.to_thread(enroll, node, tmp_path, "service", ["disk.test"])
    assert node.stop() == 0
    log = c.state / "nodes" / "disk-1" / "audit" / "log.jsonl"
    before = log.read_bytes()
    shutil.rmtree(c.state / "nodes" / "disk-1")  # the disk is gone
    node = c.start("disk-1")
    assert log.read_bytes().startswith(before)  # every line back, then the new start's
    proc = await asyncio.to_thread(_verify, c, node, tmp_path / "state.json")
    assert proc.returncode == 0 and "log disk-1: OK:" in proc.stdout, proc.stdout + proc.stderr
    assert node.stop() == 0
    # A line rewritten on the node's disk: PostgreSQL's copy says otherwise.
    lines = log.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b'"event":"', b'"event":"x')
    log.write_bytes(b"".join(lines))
    proc = await asyncio.to_thread(
        subprocess.run, [*HSMCA, "serve", "--config", str(c.state / "hsmca.toml"), "--listen",
                         "127.0.0.1:0", "--node", "disk-1"], capture_output=True, text=True,
        timeout=120)
    assert proc.returncode != 0 and "differs from PostgreSQL's" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_node_whose_name_another_process_took_stops_and_writes_nothing(
        two_or_three: Cluster, tmp_path: Path) -> None:
    """A PostgreSQL trial ended a node's sessions while a copy of its state directory,
    started as the same node, was being restarted: the copy took the name and signed,
    and the first process, its name back, wrote its own lines over the copy's (lines
    of certificates the copy had released were gone). Once another process holds its
    name and has claimed its log, the node signs nothing; once that process has written
    a line, the node stops in one line; a claimant gone having written nothing (a start
    that failed) leaves the node going on. Started again once the other is gone, it goes
    on and its log verifies. (The test's own session stands for the other process.)"""
    import psycopg

    from ca.store.postgres import AUDIT_LOCK_CLASS
    from tests.conftest import hsmca
    c = two_or_three
    node = c.start("twin")
    cred = await asyncio.to_thread(enroll, node, tmp_path, "service", ["twin.test"])
    other = await asyncio.to_thread(psycopg.connect, c.url, autocommit=True)
    def take_the_name() -> int:
        """The node's sessions ended, and its name taken by the other (queued before
        the node's ended session lets go of it: the other's, first); the claim's epoch."""
        other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                      "application_name = 'hsmca twin primary'")
        other.execute("SELECT pg_advisory_lock(hashtextextended('lease:node:twin', 0))")
        [(claimed,)] = other.execute("SELECT v FROM meta WHERE k = 'holder:twin'").fetchall()
        return int(claimed.split(":")[0])
    try:
        # The name's lock alone is no claim: a session of the node's own that PostgreSQL
        # has not seen end yet holds it the same way (a review: the node stopped itself).
        # Nor is a claim older than the node's, as a database restored from a dump taken
        # before its start holds (the lines' own check says what was lost).
        epoch = await asyncio.to_thread(take_the_name)
        await asyncio.to_thread(other.execute, "UPDATE meta SET v = %s WHERE k = "
                                "'holder:twin'", (f"{epoch - 1}:an older run",))
        status, _, body = await call("POST", f"{node.url}/v1/x509/renew", node.ssl(*cred), {})
        assert status == 201, body

        def claim(epoch: int) -> int:  # the other's claim, as its start makes it
            with other.transaction():
                other.execute("SELECT pg_advisory_xact_lock(%s, hashtext('twin'))",
                              (AUDIT_LOCK_CLASS,))
                other.execute("UPDATE meta SET v = %s WHERE k = 'holder:twin'",
                              (f"{epoch}:the other",))
                return int(other.execute("SELECT count(*) FROM audit_lines WHERE node = "
                                         "'twin'").fetchone()[0])

        async def renewed() -> int:
            try:
                return (await call("POST", f"{node.url}/v1/x509/renew", node.ssl(*cred),
                                   {}))[0]
            except aiohttp.ClientError:
                return 0  # stopped already
        # A start that claims and then fails (its port in use: a fencing trial's running
        # node stopped for it, and nobody served): refused while it holds the claim...
        await asyncio.to_thread(claim, epoch + 1)
        assert await renewed() not in (200, 201)
        # ...and, that process gone having written nothing, the node claims anew.
        await asyncio.to_thread(other.execute, "SELECT pg_advisory_unlock_all()")
        assert await asyncio.to_thread(node.wait_stderr, lambda: any(
            "this node has its name back and goes on" in x for x in node.stderr), 60), \
            node.stderr[-5:]
        assert await renewed() == 201

        # A twin that claims and writes: the node stops, writing nothing more.
        lines = await asyncio.to_thread(claim, await asyncio.to_thread(take_the_name) + 1)
        await asyncio.to_thread(other.execute, "INSERT INTO audit_lines (node, seq, line) "
                                "VALUES ('twin', %s, %s)", (lines, b"the twin's line"))
        assert await renewed() not in (200, 201)  # whatever it has not noticed yet
        assert await asyncio.to_thread(node.proc.wait, 90) == 1
        assert node.stderr_ended.wait(60)
        said = node.stderr[-1]
        assert said.startswith("hsmca: error: another process took this node's name "
                               "(twin) and wrote its log") and \
            "Stop one of the two" in said, node.stderr[-5:]
        assert await asyncio.to_thread(lambda: other.execute(
            "SELECT count(*) FROM audit_lines WHERE node = 'twin'").fetchone()) == (lines + 1,)
        # While the other holds it, a start of the same name is refused.
        proc = await asyncio.to_thread(hsmca, "serve", "--config", c.state / "hsmca.toml",
                                       "--listen", "127.0.0.1:0", "--node", "twin",
                                       check=False)
        assert proc.returncode == 1 and "already running" in proc.stderr, proc.stderr
        # (the stand-in twin's line taken back: the next start takes up PostgreSQL's)
        await asyncio.to_thread(other.execute, "DELETE FROM audit_lines WHERE node = "
                                "'twin' AND seq = %s", (lines,))
    finally:
        await asyncio.to_thread(other.close)
    node = c.start("twin")
    try:
        proc = await asyncio.to_thread(_verify, c, node, tmp_path / "state.json")
        assert proc.returncode == 0 and "log twin: OK:" in proc.stdout, \
            proc.stdout + proc.stderr
    finally:
        assert node.stop() == 0


def test_a_database_that_stops_answering_is_given_up_on_not_waited_for(
        postgres_server: Any) -> None:
    """A PostgreSQL that stops answering without refusing (SIGSTOP: a frozen host, a
    failover whose old primary vanished) fails nothing: a cluster trial's requests hung
    for the whole outage, one for minutes. A call is now given up after the store's
    answer timeout, the store says it is unavailable, the calls after it are refused
    too, and it answers again once the server does."""
    import threading
    import time

    from ca.store.errors import StoreUnavailable
    from ca.store.postgres import PostgresStore
    store = PostgresStore(postgres_server.new_database(), answer_timeout_s=2.0)
    try:
        assert asyncio.run(store.issued_cert(1)) is None and store.healthy
        said: list[str] = []

        def ask() -> None:
            try:
                asyncio.run(store.issued_cert(1))
                said.append("answered")
            except StoreUnavailable as exc:
                said.append(str(exc))
        try:
            postgres_server.freeze()
            for _ in range(2):  # the call that waits, and one after it
                asker = threading.Thread(target=ask)
                asker.start()
                asker.join(timeout=60)  # a bound for a hang, not a measurement
                assert not asker.is_alive(), "the call still waits for a silent server"
            assert said[0] == "the inventory (PostgreSQL) is unavailable: no answer within 2 s"
            assert said[1].startswith("the inventory (PostgreSQL) is unavailable"), said
            assert not store.healthy
        finally:
            postgres_server.thaw()
        deadline = time.monotonic() + 60
        while True:  # back once a call gets through (one tries every second)
            try:
                assert asyncio.run(store.issued_cert(1)) is None
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not come back"
        assert store.healthy
    finally:
        store.close()


@pytest.mark.parametrize("read", ["keys", "latest_crl", "ocsp", "cross_certs"])
def test_what_a_relying_party_s_request_reads_is_given_up_on_a_silent_server(
        postgres_server: Any, read: str) -> None:
    """A cluster trial froze PostgreSQL with no load: a CRL or OCSP request hung for the
    whole freeze (60 s, then its client gave up), where docs/cluster.md promises the
    last CRL and tryLater, since nothing else had found the server silent. Each read
    such a request makes (the keys, the latest CRL, a response by serial) is given up
    after the answer timeout, as a StoreUnavailable the routes answer from."""
    import threading

    from ca.store.errors import StoreUnavailable
    from ca.store.postgres import PostgresStore
    store = PostgresStore(postgres_server.new_database(), answer_timeout_s=2.0)
    calls = {"keys": lambda: store.keys(), "latest_crl": lambda: store.latest_crl(None),
             "ocsp": lambda: store.ocsp(1), "cross_certs": lambda: store.cross_certs()}
    said: list[str] = []

    def ask() -> None:
        try:
            asyncio.run(calls[read]())
            said.append("answered")
        except StoreUnavailable as exc:
            said.append(str(exc))
    try:
        asyncio.run(calls[read]())  # answered while the server answers
        try:
            postgres_server.freeze()
            asker = threading.Thread(target=ask)
            asker.start()
            asker.join(timeout=60)  # a bound for a hang, not a measurement
            assert not asker.is_alive(), f"{read} still waits for a silent server"
        finally:
            postgres_server.thaw()
        asker.join()
        assert said == ["the inventory (PostgreSQL) is unavailable: no answer within 2 s"]
    finally:
        store.close()


def test_a_store_no_call_reached_is_back_once_postgresql_is(postgres_server: Any) -> None:
    """A cluster trial: a worker that no request reached after PostgreSQL came back
    refused its first one, a minute later still, with the outage's reason (/health
    too), because only a refused call set off the probe. The store now probes on its
    own until the server answers; the first call after that goes through."""
    from concurrent.futures import Future

    from ca.store.errors import StoreUnavailable
    from ca.store.postgres import PostgresStore
    store = PostgresStore(postgres_server.new_database(), answer_timeout_s=2.0)
    try:
        try:
            postgres_server.freeze()
            with pytest.raises(StoreUnavailable, match="no answer within 2 s"):
                asyncio.run(store.issued_cert(1))
        finally:
            postgres_server.thaw()
        # No call from here on until the store's own probe has ended: it found the
        # server answering (a bound for a hang, not a measurement).
        probe = store._probing
        assert probe is not None, "nothing probes the server while no call comes"
        ended: Future[None] = asyncio.run_coroutine_threadsafe(
            asyncio.wait({probe}), store._loop)  # type: ignore[arg-type]
        ended.result(timeout=60)
        assert store.healthy
        assert asyncio.run(store.issued_cert(1)) is None  # the first call: answered
    finally:
        store.close()


def test_the_first_call_after_postgresql_restarted_is_answered(tmp_path: Path) -> None:
    """A PostgreSQL trial: stopped, started again, then the first request to a node that
    no call had reached meanwhile waited 3 s and got a 503, and so did every request
    in the second after it. Its worker's pool still held the connections the restart
    had dropped, and handed them out one after another, with a pause before each,
    until the call's wait for a connection was over. Found dropped, they are replaced
    at once now: the first call after the restart is answered."""
    import contextlib

    from ca.store.postgres import PostgresStore
    from tests.pgserver import PostgresServer
    server = PostgresServer()  # its own: this test restarts it
    try:
        store = PostgresStore(server.new_database())
        try:
            async def hold_all() -> None:
                # Every pooled connection open, held at once (calls made together could
                # share one): idle in the pool afterwards, as a worker's are after load.
                async with contextlib.AsyncExitStack() as held:
                    for _ in range(store.pool.max_size):
                        await held.enter_async_context(store.pool.connection())
            asyncio.run_coroutine_threadsafe(hold_all(), store._loop).result(timeout=60)
            assert store.pool.get_stats()["pool_available"] == store.pool.max_size
            server.stop()
            server.start()  # no call meanwhile: the pool has not seen the restart
            assert asyncio.run(store.issued_cert(1)) is None  # answered, not refused
            assert store.healthy
            assert asyncio.run(store.issued_cert(1)) is None
        finally:
            store.close()
    finally:
        server.close()


# A COMMIT that still lands after a cancel, as one held by a stalled disk does (one
# waiting for a synchronous standby is committed locally at the cancel): a deferred
# trigger waits for an advisory lock the test holds, and waits again when cancelled.
HELD_COMMIT = """
CREATE FUNCTION held_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  LOOP
    BEGIN
      PERFORM pg_advisory_lock(4242);
      PERFORM pg_advisory_unlock(4242);
      RETURN NULL;
    EXCEPTION WHEN query_canceled THEN
      NULL;
    END;
  END LOOP;
END $$;
CREATE CONSTRAINT TRIGGER held AFTER INSERT ON certs DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION held_commit();
"""


def test_a_certificate_whose_commit_was_given_up_on_is_not_called_absent_before_it_lands(
        postgres_server: Any) -> None:
    """A certificate's inventory commit the store gave up on (its answer timeout) may
    land later: one held by a stalled disk lands when the disk answers, one waiting for a
    synchronous standby is committed locally at the cancel. The check for certificates
    signed and never released read the row once, found nothing, and let it go: the row
    then landed live and OCSP-good, and nobody held it (a review). The check now waits
    for such a commit, and is told it is still pending (to try again) rather than that
    there is no row; once it lands, the row is found."""
    import datetime as dt
    import time

    import psycopg

    from ca.store.errors import StoreUnavailable
    from ca.store.postgres import PostgresStore
    from ca.store.records import NewCert
    url = postgres_server.new_database()
    store = PostgresStore(url, answer_timeout_s=2.0)
    now = dt.datetime.now(dt.UTC)
    serial = 0x5E771ED
    holder = psycopg.connect(url, autocommit=True)
    try:
        holder.execute(HELD_COMMIT)
        holder.execute("SELECT pg_advisory_lock(4242)")
        given_up = store.add_cert(NewCert(
            serial=serial, fingerprint="f" * 64, role="service", subject="CN=late.test",
            names=("late.test",), principals=(), spki_sha256="e" * 64,
            not_before=now.isoformat(), not_after=(now + dt.timedelta(days=1)).isoformat(),
            issued_at=now.isoformat(), der=b"DER", issuer="issuing-ca", audit_seq=7))
        with pytest.raises(StoreUnavailable, match="no answer within 2 s"):
            given_up.result(timeout=60)
        deadline = time.monotonic() + 60
        while True:  # refused at once until the store's probe finds the server answering
            try:
                found = asyncio.run(store.settled_cert(serial))
            except StoreUnavailable as exc:
                said = str(exc)
                if "still pending" in said:
                    break
                assert time.monotonic() < deadline, f"the store did not come back: {exc}"
                continue
            raise AssertionError(f"read while its commit was pending: {found}")
        assert said.startswith(f"a commit of certificate {serial:x}'s inventory row that "
                               "was given up on is still pending in PostgreSQL (a "
                               "synchronous standby or the disk holds it): it ends when"), said
        assert store.healthy  # the server answers: it is not called silent for this
        holder.execute("SELECT pg_advisory_unlock(4242)")  # the late COMMIT lands
        issued = asyncio.run(store.settled_cert(serial))
        assert issued is not None and issued.record.audit_seq == 7, issued
        assert issued.record.revoked_at is None  # live, for the check to revoke
    finally:
        holder.close()
        store.close()


def test_calls_given_up_on_that_fill_the_pool_do_not_make_the_next_calls_wait(
        postgres_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call given up on keeps its pooled connection while psycopg cancels it (up to
    10 s). With the pool full of those, the calls waiting for a connection timed out as
    if the pool were merely busy: the store took calls again, and each waited 3 s for a
    connection (a review: 60 of 80 calls). They are refused at once now, named for the
    silent server, until a probe of its own finds it answering."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ca.store.errors import StoreUnavailable
    from ca.store.postgres import PostgresStore
    # As in production, a call waits longer for its answer than for a pooled connection
    # (10 s, 3 s); and the store tries again at once (not every second) once it refuses
    monkeypatch.setattr("ca.store.postgres.RETRY_S", 0.0)
    store = PostgresStore(postgres_server.new_database(), max_size=2, answer_timeout_s=4.0)
    try:
        async def hold_two() -> None:
            # Both pooled connections open before the freeze, held at once: two calls
            # made together could have shared one (the first done before the second
            # asked), which a CI run saw.
            async with store.pool.connection(), store.pool.connection():
                pass
        asyncio.run_coroutine_threadsafe(hold_two(), store._loop).result(timeout=30)
        assert store.pool.get_stats()["pool_size"] == 2

        def ask(_: int) -> str:
            try:
                asyncio.run(store.issued_cert(1))
                return "answered"
            except StoreUnavailable as exc:
                return str(exc)
        silent = "the inventory (PostgreSQL) is unavailable: no answer within 4 s"
        try:
            postgres_server.freeze()
            with ThreadPoolExecutor(4) as pool:
                # two hold the pool until given up on, two time out waiting for it
                assert list(pool.map(ask, range(4))).count(silent) >= 2
                # the pool still held by the two given up on: refused at once, for the
                # silent server (each waited for a connection, and timed out, before)
                after = [list(pool.map(ask, range(4))) for _ in range(2)]
            assert after == [[silent] * 4] * 2, after
        finally:
            postgres_server.thaw()
        deadline = time.monotonic() + 60
        while ask(0) != "answered":  # a probe of its own brings it back
            assert time.monotonic() < deadline, "the store did not come back"
        assert store.healthy
    finally:
        store.close()


async def test_requests_in_flight_when_postgresql_freezes_get_a_503_not_a_hang(
        tmp_path: Path) -> None:
    """The trial's frozen PostgreSQL held the requests in flight for its whole outage
    (28 s, 71 s), then issued certificates to clients long gone. Frozen here until every
    client has had two answers since: each is a 503 problem, none a client's timeout
    (30 s), and the node serves again once the database answers."""
    from tests.pgserver import PostgresServer
    server = await asyncio.to_thread(PostgresServer)  # its own: this test freezes it
    c = make_cluster(tmp_path, server.new_database())
    try:
        node = c.start("f1", workers=2)
        creds = {}
        for i in range(3):
            cert, key = await asyncio.to_thread(enroll, node, tmp_path, "service",
                                                [f"f{i}.test"])
            creds[f"c{i}"] = (node, cert, key)
        load = Load(creds)
        load.start()
        try:
            await load.until(6)
            try:
                await asyncio.to_thread(server.freeze)
                frozen, errors = len(load.statuses), len(load.errors)
                await load.wait_for(lambda: all(
                    sum(1 for n, _ in load.statuses[frozen:] if n == name) >= 2
                    for name in creds), "two answers per client while frozen")
                answered = load.statuses[frozen:]
                timed_out = load.errors[errors:]
            finally:
                await asyncio.to_thread(server.thaw)
            # (the first answer of each may have been signed before the freeze)
            assert [s for _, s in answered].count(503) >= len(answered) - len(creds), answered
            assert not timed_out, timed_out
            await load.until(3)  # renewals go through again
        finally:
            await load.stop()
        status, body = await _until(node, "GET", "/health", node.ssl(), None)
        assert status == 200, body
    finally:
        c.stop()
        await asyncio.to_thread(server.close)
