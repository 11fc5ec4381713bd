"""More than one worker process: what one worker does, every other one enforces at
once, and a worker that dies costs nothing but the requests it had in flight.

Which worker a new connection reaches is the kernel's choice (SO_REUSEPORT), so
these tests open fresh connections until each worker has answered; a response's
X-Request-Id starts with a prefix of its own per process, which tells them apart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509 as cx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.conftest import HSMCA, Daemon, init_ca, set_config, start_daemon
from tests.helpers import audit_verify, enroll, health_until, http, log_lines, metric_samples

pytestmark = pytest.mark.asyncio(loop_scope="session")
MAX_CONNECTIONS = 64  # fresh connections tried before a worker counts as unreachable


def worker_pids(d: Daemon) -> list[int]:
    pids = []
    for task in Path(f"/proc/{d.proc.pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return pids


async def fresh(method: str, url: str, ctx: Any, **kw: Any) -> tuple[int, bytes, str]:
    """One request on a new connection: (status, body, answering process)."""
    async with aiohttp.ClientSession() as s, s.request(method, url, ssl=ctx, **kw) as r:
        return r.status, await r.read(), r.headers["X-Request-Id"][:8]


async def on_every_worker(workers: int, ask: Callable[[], Awaitable[tuple[int, bytes, str]]],
                          each: int = 2) -> list[tuple[int, bytes]]:
    """Ask on new connections until every worker has answered `each` times (what a
    worker does once it must keep doing): every answer, in order."""
    answers: list[tuple[int, bytes]] = []
    seen: dict[str, int] = {}
    for _ in range(MAX_CONNECTIONS):
        status, body, who = await ask()
        answers.append((status, body))
        seen[who] = seen.get(who, 0) + 1
        if len(seen) == workers and min(seen.values()) >= each:
            return answers
    raise AssertionError(f"not every one of {workers} workers answered {each} times in "
                         f"{MAX_CONNECTIONS} new connections: {seen}")


def ocsp_request(cert: cx.Certificate, issuer: cx.Certificate) -> bytes:
    return (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
            .public_bytes(serialization.Encoding.DER))


async def test_a_revocation_is_enforced_by_every_worker_at_once(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2")
    try:
        assert len(worker_pids(d)) == 2
        cert_path, key_path = enroll(d, tmp_path, "service", ["rev.internal.example"])
        ctx = d.ssl(cert_path, key_path)
        renewed = await on_every_worker(2, lambda: fresh(
            "POST", f"{d.url}/v1/x509/renew", ctx, json={}))
        assert {status for status, _ in renewed} == {201}, renewed
        cert = cx.load_pem_x509_certificate(cert_path.read_bytes())
        issuing = cx.load_pem_x509_certificate((ca.state / "x509/issuing.pem").read_bytes())

        status, body, _ = await fresh("POST", f"{d.url}/v1/x509/revoke", ctx,
                                      json={"serial": format(cert.serial_number, "x")})
        assert status == 200, body

        # The very next request, whichever worker takes it, is refused.
        refused = await on_every_worker(2, lambda: fresh(
            "POST", f"{d.url}/v1/x509/renew", ctx, json={}))
        for status, body in refused:
            assert status == 403 and json.loads(body)["type"].endswith("revoked-certificate")
        answers = await on_every_worker(2, lambda: fresh(
            "POST", f"{d.url}/v1/x509/ocsp", d.ssl(), data=ocsp_request(cert, issuing),
            headers={"Content-Type": "application/ocsp-request"}))
        for status, body in answers:
            assert status == 200
            resp = ocsp.load_der_ocsp_response(body)
            assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
        crls = await on_every_worker(2, lambda: fresh("GET", f"{d.url}/v1/x509/crl", d.ssl()))
        assert {status for status, _ in crls} == {200}, crls
        served = {body for _, body in crls}
        assert len(served) == 1, "the workers serve different CRLs"
        crl = cx.load_der_x509_crl(served.pop())
        assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        assert crl.is_signature_valid(issuing.public_key())
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_no_process_of_the_daemon_may_write_a_core_file(tmp_path: Path) -> None:
    """A logged-in software token keeps what decrypts its keys in the process's memory: a
    crash's core file may hold them. The daemon and its workers may write none, whatever
    the limit they were started with (a security review: a 77 MB core of a worker)."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2",
                     wrapper=("prlimit", "--core=unlimited:unlimited", "--"))
    try:
        pids = [d.proc.pid, *worker_pids(d)]
        assert len(pids) == 3
        for pid in pids:
            limits = Path(f"/proc/{pid}/limits").read_text()
            core = next(line for line in limits.splitlines()
                        if line.startswith("Max core file size"))
            assert core.split()[4:6] == ["0", "0"], (pid, core)
        # Not dumpable either (a core piped to a collector, another process of its user
        # reading its memory), which only the process itself can be asked: each worker
        # says so when ready (a review: the workers inherit the limit, so a worker that
        # forgot this passed). It still serves (its TLS files are read through
        # /proc/self/fd, which a process not dumpable may still read).
        ready = [json.loads(line) for line in d.stderr if '"worker ready"' in line]
        assert len(ready) == 2 and all(r["dumpable"] is False for r in ready), ready
        status, _, _ = await fresh("GET", f"{d.url}/health", d.ssl())
        assert status == 200
    finally:
        d.stop()


async def test_a_token_being_spent_is_said_so_by_a_worker_started_since(
        tmp_path: Path) -> None:
    """A review: whether a token marked spent a moment ago, without a certificate yet,
    was "being spent" (409, retry in a second) or "spent" (401, ask an admin) depended
    on whether the worker that answered had started before the mark: a worker replaced
    after a kill said 401 where its sibling said 409. The daemon's start decides."""
    from tests.helpers import bootstrap_token, csr_pem
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2")
    try:
        token = await bootstrap_token(d, "service", ["marked.internal.example"])
        with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # another request's mark
            db.execute("UPDATE tokens SET used_at = ? WHERE id = ?",
                       (dt.datetime.now(dt.UTC).isoformat(), token.split("-")[1]))
        victim = worker_pids(d)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # paced by the round trips (the dead worker's queue resets some)
            try:
                status, body, _ = await fresh("GET", f"{d.url}/health", d.ssl())
                if status == 200 and json.loads(body).get("workers") == \
                        "2 of 2 serving" and victim not in worker_pids(d):
                    break
            except aiohttp.ClientError:
                pass
            assert asyncio.get_running_loop().time() < deadline, worker_pids(d)
        answers = await on_every_worker(2, lambda: fresh(
            "POST", f"{d.url}/v1/x509/enroll", d.ssl(),
            json={"csr": csr_pem(["marked.internal.example"])},
            headers={"Authorization": f"Bearer {token}"}), each=1)
        assert {status for status, _ in answers} == {409}, answers
    finally:
        assert d.stop() == 0


async def test_a_killed_worker_is_replaced_and_loses_no_record(tmp_path: Path) -> None:
    """SIGKILL one worker under load: the others keep serving, the primary closes
    its signatures under way in the log (WorkerLost, never released), records the
    exit and starts a new worker, and everything a client received is recorded."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2")
    cert_path, key_path = enroll(d, tmp_path, "service", ["load.internal.example"])
    ctx = d.ssl(cert_path, key_path)
    victim = worker_pids(d)[0]
    received: list[dict[str, Any]] = []
    answered_by: set[str] = set()
    before_kill: set[str] = set()
    failures = {"before the kill": 0, "after": 0}
    killed = asyncio.Event()
    replaced = asyncio.Event()

    async def renew_until_replaced() -> None:
        while not replaced.is_set():
            try:  # a new connection each time: the kernel spreads them over the workers
                status, body, who = await fresh("POST", f"{d.url}/v1/x509/renew", ctx,
                                                json={})
            except (aiohttp.ClientError, ConnectionError):
                failures["after" if killed.is_set() else "before the kill"] += 1
                continue
            assert status == 201, body
            received.append(json.loads(body))
            answered_by.add(who)
            if not killed.is_set():
                before_kill.add(who)
                if len(received) >= 40 and len(before_kill) == 2:
                    os.kill(victim, signal.SIGKILL)
                    killed.set()
            elif who not in before_kill:
                replaced.set()  # a process that did not exist before the kill answered

    clients = 12
    try:
        await asyncio.wait_for(asyncio.gather(*(renew_until_replaced()
                                                for _ in range(clients))), 120)
        assert victim not in worker_pids(d) and len(worker_pids(d)) == 2
    finally:
        assert d.stop() == 0
    # Only the killed worker's connections failed, and none before: the one request each
    # client had under way when it died, and at most one more each, a connection the
    # kernel queued on the dying process's socket before it was closed (a loaded run
    # saw 13 for 12 clients).
    assert failures["before the kill"] == 0 and failures["after"] <= 2 * clients, failures
    audit_verify(ca.state, ok=True)
    lines = log_lines(ca.state)
    exits = [e for e in lines if e["event"] == "worker.exit"]
    assert [e["pid"] for e in exits] == [victim] and exits[0]["status"] == -signal.SIGKILL
    intents = {e["op_id"] for e in lines if e.get("phase") == "intent"}
    for lost in (e for e in lines if e.get("result") == "WorkerLost"):
        assert lost["op_id"] in intents and lost["released"] is False
    outcomes = {e["fingerprint"]: e for e in lines
                if e.get("phase") == "outcome" and "fingerprint" in e}
    db = sqlite3.connect(ca.state / "hsmca.sqlite3")
    for issued in received:
        c = cx.load_pem_x509_certificate(issued["certificate"].encode())
        fp = c.fingerprint(hashes.SHA256()).hex()
        assert outcomes[fp]["result"] == "ok" and outcomes[fp]["op_id"] in intents
        assert db.execute("SELECT serial FROM certs WHERE fingerprint = ?",
                          (fp,)).fetchone() == (issued["serial"],)


async def test_an_address_in_use_is_refused_in_one_line(tmp_path: Path) -> None:
    """Workers share the port with SO_REUSEPORT, which must not let the daemon join a
    port another server listens on (the kernel would split the clients)."""
    ca = init_ca(tmp_path)
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even one that shares
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        lines_before = len(log_lines(ca.state))
        proc = subprocess.run([*HSMCA, "serve", "--config", str(ca.state / "hsmca.toml"),
                               "--listen", f"127.0.0.1:{port}"], capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"hsmca: error: cannot listen on 127.0.0.1:{port}: Address already in use (another "
        "hsmca, or another server, uses it?): stop it, or listen elsewhere (--listen "
        "HOST:PORT, or [server] listen; port 0 takes a free one, which the line `listening "
        "on URL` names)"], proc.stderr
    assert len(log_lines(ca.state)) == lines_before  # refused before anything was logged


async def test_a_worker_killed_while_starting_is_said_by_its_signal(tmp_path: Path) -> None:
    """A restart on a full disk: the worker died of SIGBUS writing a memory-mapped file,
    and the daemon said only "exited with status -7 ... (its message is above)" above
    nothing (fault review)."""
    import signal

    from ca.daemon.primary import _worker_died
    said = _worker_died(0, -signal.SIGBUS, tmp_path)
    assert "SIGBUS" in said and str(tmp_path) in said and "disk full" in said
    assert "KiB free there" in said
    assert _worker_died(1, -signal.SIGKILL, tmp_path) == \
        "worker 1 was killed by SIGKILL while starting"
    assert "its message is above" in _worker_died(0, 3, tmp_path)


async def test_metric_files_live_in_memory_and_go_with_the_run(tmp_path: Path) -> None:
    """The processes' memory-mapped metric files grow as new label values appear (a
    route's first 503): on a full state disk that page killed the worker with SIGBUS,
    and /health went with it (a recovery trial). They are in /dev/shm now, one
    directory per run, removed at the stop and, after a kill, at the next start (or by
    any start, once the run's primary is gone)."""
    import shutil
    import tempfile
    ca = init_ca(tmp_path)
    pointer = ca.state / "run" / "metrics-dir"
    # A run killed whose state directory is gone (a review found 18 such directories
    # after a few test runs): swept by any start; one whose primary lives is kept.
    dead = Path(tempfile.mkdtemp(prefix="hsmca-metrics-", dir="/dev/shm"))
    alive = Path(tempfile.mkdtemp(prefix="hsmca-metrics-", dir="/dev/shm"))
    child = subprocess.Popen(["true"])  # a pid that no longer runs
    child.wait()
    (dead / "owner").write_text(f"{child.pid}\n")
    (alive / "owner").write_text(f"{os.getpid()}\n")
    try:
        d = start_daemon(ca.state)
        assert not dead.exists() and alive.exists()
    finally:
        shutil.rmtree(alive, ignore_errors=True)
        shutil.rmtree(dead, ignore_errors=True)
    try:
        # run/ is the daemon's own, whatever the umask it was started with (a fault
        # trial found it 0755 under umask 022)
        assert (ca.state / "run").stat().st_mode & 0o777 == 0o700
        status, _, _ = await http("GET", f"{d.url}/metrics", d.ssl())
        assert status == 200
        first = Path(pointer.read_text().strip())
        assert first.parent == Path("/dev/shm") and any(first.glob("*.db")), first
        assert not (ca.state / "run" / "metrics").exists()
        d.proc.kill()  # no stop: the directory stays behind until the next start
        d.proc.wait()
        assert first.exists()
    finally:
        d.stop()
    d = start_daemon(ca.state)
    try:
        second = Path(pointer.read_text().strip())
        assert second != first and second.exists() and not first.exists()
    finally:
        assert d.stop() == 0
    assert not second.exists() and not pointer.exists()


async def test_metric_files_stay_in_memory_when_the_state_disk_cannot_take_their_pointer(
        tmp_path: Path) -> None:
    """A disaster trial started the daemon on a full state disk: the file naming the
    run's directory in /dev/shm could not be written, the metrics fell back to the full
    disk, and the start died with SIGBUS ("Bus error", nothing else). The directory
    stays in memory (any later start sweeps it once its owner is gone)."""
    import shutil
    import sys
    (tmp_path / "run" / "metrics-dir").mkdir(parents=True)  # a write there fails
    proc = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                           "from ca.metrics import prepare; print(prepare(Path(sys.argv[1])))",
                           tmp_path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    chosen = Path(proc.stdout.strip())
    try:
        assert chosen.parent == Path("/dev/shm"), chosen
        assert not (tmp_path / "run" / "metrics").exists()
    finally:
        shutil.rmtree(chosen, ignore_errors=True)


async def test_a_worker_refused_its_pin_is_not_started_again_until_the_pin_changes(
        tmp_path: Path) -> None:
    """The PIN file edited wrong under a running daemon, then a worker restarted: it
    was started again every 30 s at most, offering the wrong PIN each time (about 120
    an hour, and many HSMs lock the user PIN after a few; a recovery trial). It now
    waits for the PIN file to change, and starts once it has."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2")
    pin = ca.token.pin_file
    good = pin.read_text()
    try:
        pin.write_text("00112233445566778899aabbccddeeff\n")
        os.kill(worker_pids(d)[0], signal.SIGKILL)

        def said(event: str) -> list[dict[str, Any]]:
            return [e for e in (json.loads(x) for x in d.stderr if x.startswith("{"))
                    if e.get("event") == event]
        assert d.wait_stderr(lambda: bool(said(
            "a worker cannot log in: the token refused the PIN; it is not started again "
            "until the PIN source changes")), 60), "".join(d.stderr[-20:])
        # /health is answered by the other worker; the metrics say one is missing
        status, _, text = await http("GET", f"{d.url}/metrics", d.ssl())
        assert "hsmca_workers 2.0" in text.decode()
        assert "hsmca_workers_serving 1.0" in text.decode(), text.decode()
        # and so does /health, still 200: the node serves (it said nothing of it)
        status, _, body = await http("GET", f"{d.url}/health", d.ssl())
        assert status == 200 and json.loads(body)["workers"].startswith(
            "1 of 2 serving; the daemon's log says why"), body
        # the worker's own reason is a log line like the others (it was plain text)
        [why] = said("the worker cannot start")
        assert "PIN" in why["error"] and isinstance(why["worker"], int), why
        ready = len(said("worker ready"))
        pin.write_text(good)  # put right: the worker starts with it
        assert d.wait_stderr(lambda: len(said("worker ready")) > ready, 60)
        # (the worker's line comes before the primary has counted it: /health is waited
        # for, and then /metrics says the same)
        await health_until(d, lambda h: h["code"] == 200 and h["workers"] == "2 of 2 serving")
        status, _, text = await http("GET", f"{d.url}/metrics", d.ssl())
        assert "hsmca_workers_serving 2.0" in text.decode()
        refused = [x for x in log_lines(ca.state) if x["event"] == "hsm.login"
                   and x.get("result") == "PinIncorrect"]
        assert len(refused) == 1, refused  # offered once, never again
    finally:
        pin.write_text(good)
        assert d.stop() == 0


async def test_a_refused_pin_is_offered_once_by_the_whole_daemon(tmp_path: Path) -> None:
    """A fault trial: after a PIN change, each process offered the refused PIN once, as
    many wrong tries as processes (up to 9 with 8 cores), where many HSMs lock the user
    PIN after three. Their logins take turns, and what one was refused the others do
    not offer."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2")
    pin = ca.token.pin_file
    good = pin.read_text()
    try:
        pin.write_text("00112233445566778899aabbccddeeff\n")
        for pid in worker_pids(d):  # both start again at once, with the wrong PIN
            os.kill(pid, signal.SIGKILL)

        def said(event: str) -> list[dict[str, Any]]:
            return [e for e in (json.loads(x) for x in d.stderr if x.startswith("{"))
                    if e.get("event") == event]
        refusal = ("a worker cannot log in: the token refused the PIN; it is not started "
                   "again until the PIN source changes")
        assert d.wait_stderr(lambda: len(said(refusal)) == 2, 60), "".join(d.stderr[-20:])
        assert any("refused before: not tried again" in x for x in d.stderr)  # the other
        refused = [x for x in log_lines(ca.state) if x["event"] == "hsm.login"
                   and x.get("result") == "PinIncorrect"]
        assert len(refused) == 1, refused  # one wrong try, not one per process
        ready = len(said("worker ready"))
        pin.write_text(good)
        assert d.wait_stderr(lambda: len(said("worker ready")) >= ready + 2, 60)
        # (the workers' lines come before the primary has counted them)
        await health_until(d, lambda h: h["code"] == 200 and h["workers"] == "2 of 2 serving")
    finally:
        pin.write_text(good)
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_worker_that_stops_answering_is_killed_and_replaced(tmp_path: Path) -> None:
    """A worker whose event loop is stuck keeps its listening socket: the kernel went
    on handing it connections, which hung, while /health and /metrics (answered by the
    other worker) said all was well (an operator's trial, with SIGSTOP). The primary's
    pings find it; it is killed, said, counted and started again."""
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "worker-timeout-s", 5)
    d = start_daemon(ca.state, "--workers", "2")
    try:
        stuck = worker_pids(d)[0]
        os.kill(stuck, signal.SIGSTOP)

        def said(event: str) -> list[dict[str, Any]]:
            return [e for e in (json.loads(x) for x in d.stderr if x.startswith("{"))
                    if e.get("event") == event]
        assert d.wait_stderr(lambda: bool(said(
            "a worker stopped answering: killed, and started again")), 60), \
            "".join(d.stderr[-20:])
        killed = said("a worker stopped answering: killed, and started again")[0]
        assert killed["pid"] == stuck and killed["unanswered_s"] >= 5
        assert d.wait_stderr(lambda: len(said("worker ready")) > 2, 60)
        assert stuck not in worker_pids(d) and len(worker_pids(d)) == 2
        # Every worker answers again: new connections no longer hang.
        answers = await on_every_worker(2, lambda: fresh("GET", f"{d.url}/health", d.ssl()))
        assert {status for status, _ in answers} == {200}
        status, _, metrics_text = await http("GET", f"{d.url}/metrics", d.ssl())
        assert status == 200
        assert 'hsmca_worker_restarts_total{reason="unanswered"} 1.0' in metrics_text.decode()
        assert 'hsmca_worker_restarts_total{reason="exited"} 0.0' in metrics_text.decode()
    finally:
        assert d.stop() == 0
    exits = [e for e in log_lines(ca.state) if e["event"] == "worker.exit"]
    assert [(e["pid"], e["status"]) for e in exits] == [(stuck, -signal.SIGKILL)]
    assert exits[0]["unanswered_s"] >= 5
    audit_verify(ca.state, ok=True)


async def test_a_worker_that_does_not_answer_shows_in_health_and_metrics(
        tmp_path: Path) -> None:
    """An SRE trial stopped a worker (SIGSTOP): for the 30 s before it was killed, half
    of the new connections hung while /health, answered by the other worker, said "2 of
    2 serving" and /metrics nothing; one log line said it, and none that it answered
    again. Both now say how many do not answer, and the log says when it answers."""
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "worker-timeout-s", 600)  # not killed meanwhile
    d = start_daemon(ca.state, "--workers", "2")
    stuck = worker_pids(d)[0]
    try:
        os.kill(stuck, signal.SIGSTOP)
        assert d.wait_stderr(lambda: any("a worker does not answer the primary's pings" in x
                                         for x in d.stderr), 60), "".join(d.stderr[-20:])

        async def from_the_other(path: str) -> bytes:
            for _ in range(MAX_CONNECTIONS):  # the stopped one's connections hang
                try:
                    async with asyncio.timeout(2):
                        status, body, _ = await fresh("GET", f"{d.url}{path}", d.ssl())
                except TimeoutError:
                    continue
                assert status in (200, 503), body
                return body
            raise AssertionError(f"no answer to {path}")
        health = json.loads(await from_the_other("/health"))
        assert health["status"] == "ok" and health["workers"].startswith(
            "2 of 2 serving; 1 of them not answering the primary"), health
        assert b"hsmca_workers_answering 1.0" in await from_the_other("/metrics")
    finally:
        os.kill(stuck, signal.SIGCONT)
    try:
        assert d.wait_stderr(lambda: any("a worker answers the primary's pings again" in x
                                         for x in d.stderr), 60), "".join(d.stderr[-20:])
        answers = await on_every_worker(2, lambda: fresh("GET", f"{d.url}/health", d.ssl()))
        assert all(json.loads(body)["workers"] == "2 of 2 serving" for _, body in answers)
        status, _, text = await http("GET", f"{d.url}/metrics", d.ssl())
        assert status == 200 and b"hsmca_workers_answering 2.0" in text, text
        assert stuck in worker_pids(d)  # the same worker: not killed
    finally:
        assert d.stop() == 0


async def test_a_primary_that_was_paused_does_not_kill_its_workers(tmp_path: Path) -> None:
    """A fault trial: the primary stopped (SIGSTOP; a paused VM) past worker-timeout-s
    killed both of its healthy workers at SIGCONT, since none had answered the pings it
    had not sent. It tells its own stall from theirs."""
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "worker-timeout-s", 5)
    d = start_daemon(ca.state, "--workers", "2")
    try:
        before = sorted(worker_pids(d))
        d.proc.send_signal(signal.SIGSTOP)
        try:
            # The fault's length (past worker-timeout-s and the stall bound), not a wait
            # for anything: nothing can be watched while the primary is stopped.
            threading.Event().wait(8)
        finally:
            d.proc.send_signal(signal.SIGCONT)
        assert d.wait_stderr(lambda: any("the primary process itself did not run" in x
                                         for x in d.stderr), 30), "".join(d.stderr[-20:])
        answers = await on_every_worker(2, lambda: fresh("GET", f"{d.url}/health", d.ssl()))
        assert {status for status, _ in answers} == {200}
        assert sorted(worker_pids(d)) == before, [x for x in d.stderr if "worker" in x]
        assert not any("a worker stopped answering" in x for x in d.stderr)
    finally:
        assert d.stop() == 0
    assert not [e for e in log_lines(ca.state) if e["event"] == "worker.exit"]


async def test_a_stuck_worker_does_not_hold_up_the_stop(tmp_path: Path) -> None:
    """At the stop, a worker that does not answer is killed at once, not waited for the
    30 s a unit's TimeoutStopSec used to allow in all (an operator's trial: 31.7 s)."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2")
    stuck = worker_pids(d)[0]
    os.kill(stuck, signal.SIGSTOP)
    assert d.wait_stderr(lambda: any(
        "a worker does not answer the primary's pings" in x for x in d.stderr), 60)
    assert d.stop() == 0
    assert any("a worker does not answer: killed at the stop" in x for x in d.stderr)
    assert log_lines(ca.state)[-1]["event"] == "hsm.logout"  # closed cleanly all the same
    audit_verify(ca.state, ok=True)


async def test_signatures_asked_while_the_primary_is_stopped_are_refused_at_once(
        tmp_path: Path) -> None:
    """A chaos trial stopped the primary (SIGSTOP): every signing request waited for as
    long as it was stopped, with no 503, until the workers gave up on it a minute later
    and took their requests with them. Once an append has gone unanswered for a few
    seconds, new signatures are refused at once (503, Retry-After), and all is well
    when the primary runs again."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    cert, key = enroll(d, tmp_path, "service", ["stopped.internal.example"])
    ctx = d.ssl(cert, key)
    d.proc.send_signal(signal.SIGSTOP)
    try:
        first = asyncio.create_task(http("POST", f"{d.url}/v1/x509/renew", ctx, body={}))
        deadline = asyncio.get_running_loop().time() + 40
        while True:  # each try gives up after 2 s; the one after the bound is answered
            assert asyncio.get_running_loop().time() < deadline
            try:
                status, _, body = await asyncio.wait_for(
                    http("POST", f"{d.url}/v1/x509/renew", ctx, body={}), 2)
            except TimeoutError:
                continue
            break
        assert status == 503 and "audit log is unavailable" in json.loads(body)["detail"], body
        assert not first.done()  # the one under way waits for the primary
    finally:
        d.proc.send_signal(signal.SIGCONT)
    status, _, body = await first
    assert status == 201, body
    status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
    assert status == 201, body
    assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_bad_token_while_the_primary_is_stopped_is_answered_503(
        tmp_path: Path) -> None:
    """A review: a failed bootstrap token is counted by the primary (the limit is the
    daemon's), and the worker waited for its answer without a bound: with the primary
    stopped or stuck, every bad token's request hung. It is a 503 that says why (not
    the 401 of a failure that was not counted), and a 401 once the primary runs."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    bad = {"Authorization": "Bearer nope", "Content-Type": "application/json"}
    url = f"{d.url}/v1/x509/enroll"
    d.proc.send_signal(signal.SIGSTOP)
    try:
        status, ctype, body = await asyncio.wait_for(  # a hang, not a time, fails it
            http("POST", url, d.ssl(), body={"csr": "x"}, headers=bad), 60)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert status == 503 and ctype == "application/problem+json", body
    assert "primary process did not answer" in json.loads(body)["detail"], body
    status, _, body = await http("POST", url, d.ssl(), body={"csr": "x"}, headers=bad)
    assert status == 401 and json.loads(body)["type"].endswith("bad-token"), body
    assert d.stop() == 0


async def test_the_audit_log_s_size_is_not_served_as_0_while_the_primary_is_stopped(
        tmp_path: Path) -> None:
    """An SRE trial: with the primary stopped, /metrics said hsmca_audit_lines 0, which
    reads as a log cut to nothing (and trips a "log shrank" rule). Unknown is no sample;
    hsmca_up says the audit log is away."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    d.proc.send_signal(signal.SIGSTOP)
    try:
        status, _, raw = await asyncio.wait_for(
            http("GET", f"{d.url}/metrics", d.ssl()), 60)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert status == 200
    samples = metric_samples(raw.decode())
    assert samples[("hsmca_up", (("part", "audit"),))] == 0
    assert not [k for k in samples if k[0] == "hsmca_audit_lines"], samples
    status, _, raw = await http("GET", f"{d.url}/metrics", d.ssl())
    assert metric_samples(raw.decode())[("hsmca_audit_lines", ())] > 0
    assert d.stop() == 0


async def test_a_counter_moved_after_the_stop_closed_them_is_no_error(tmp_path: Path) -> None:
    """A fencing trial ended a node's PostgreSQL sessions while it stopped: another
    node's change came in after the shared counters were closed, and each bump raised
    "Bad file descriptor" into the stop's last lines (eight tracebacks). A bump after
    the close moves nothing, and says nothing."""
    from ca.generations import Generations
    counters = Generations.create(tmp_path / "generations")
    counters.bump("revocations")
    assert counters.get("revocations") == 1
    counters.close()
    counters.bump("revocations")  # (raised OSError: [Errno 9] Bad file descriptor)
    counters.set_gauge("workers_serving", 2)
    counters.close()  # and a second close, as a stop's cleanup after a failure makes
