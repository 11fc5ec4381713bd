"""What must hold when the process, the HSM, the disk or the clients misbehave
(docs/security.md): no lost record, no signature without one, no falling over."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509 as cx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ocsp

from tests.conftest import Daemon, init_ca, require, start_daemon
from tests.helpers import (
    ask_ocsp,
    audit_verify,
    bootstrap_token,
    csr_pem,
    enroll,
    health_until,
    http,
    issuing,
    log_lines,
    metric_samples,
    request_for,
    signed,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
LOAD_NAME = "load.internal.example"


def assert_served_log_verifies(d: Daemon, auditor_state: Path) -> None:
    """What an auditor sees of a running daemon: its durable lines verify, and still
    extend what the same auditor verified before (nothing cut or rewritten)."""
    admin = (d.state / "admin/cert.pem", d.state / "admin/key.pem")
    audit_verify(d.state, "--state", auditor_state, served=(d, admin), ok=True)


async def test_kill9_under_issuance_load_loses_nothing(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
    received: list[dict[str, Any]] = []
    refused: list[tuple[int, bytes]] = []  # any answer but 201: there must be none
    rng = random.Random(7)
    rounds = 5
    clients = 32
    goal = [0]
    for _ in range(rounds):
        ctx = d.ssl(cert, key)
        target = rng.randint(20, 150)
        enough = asyncio.Event()
        killed = asyncio.Event()
        ended: list[bool] = []  # per client: did its run end after the kill?

        async def renew_forever(s: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext = ctx,
                                enough: asyncio.Event = enough, killed: asyncio.Event = killed,
                                ended: list[bool] = ended) -> None:
            while True:
                try:
                    async with s.post(f"{url}/v1/x509/renew", json={}, ssl=ctx) as r:
                        body = await r.read()
                        if r.status != 201:
                            refused.append((r.status, body[:300]))
                            continue
                        received.append(json.loads(body))
                        if len(received) >= goal[0]:
                            enough.set()
                except (TimeoutError, aiohttp.ClientError, ConnectionError):
                    ended.append(killed.is_set())
                    return  # the daemon is gone: this client's run is over

        goal[0] = target + len(received)
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(renew_forever(s, d.url)) for _ in range(clients)]
            await asyncio.wait_for(enough.wait(), 120)
            d.proc.send_signal(signal.SIGKILL)  # mid-load, requests in flight
            killed.set()
            d.proc.wait()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert not refused, refused
        # Each client failed once, on the kill: none lost its connection before it.
        assert ended == [True] * clients, ended
        d = start_daemon(ca.state)  # restart: torn-tail recovery, checkpoint check
        assert_served_log_verifies(d, tmp_path / "auditor.state")
        # The operator is told that the last run was killed, and how many signatures
        # it left without an outcome (those of the killed run, as the log has them).
        said = [json.loads(x) for x in d.stderr if "did not stop cleanly" in x]
        lines = log_lines(ca.state)
        starts = [i for i, e in enumerate(lines) if e["event"] == "daemon.start"]
        killed_run = lines[starts[-2]:starts[-1]]
        done = {e["op_id"] for e in killed_run if e.get("phase") == "outcome"}
        left = sum(1 for e in killed_run if e.get("phase") == "intent"
                   and e["event"] == "hsm.sign" and e["op_id"] not in done)
        assert [x["signatures_under_way"] for x in said] == [left], d.stderr
    assert d.stop() == 0
    assert len(received) >= rounds * 20
    audit_verify(ca.state, ok=True)

    lines = log_lines(ca.state)
    outcomes = {e["fingerprint"]: e for e in lines
                if e.get("phase") == "outcome" and "fingerprint" in e}
    intents = {e["op_id"] for e in lines if e.get("phase") == "intent"}
    db = sqlite3.connect(ca.state / "hsmca.sqlite3")
    issuing = cx.load_pem_x509_certificate((ca.state / "x509/issuing.pem").read_bytes())
    for issued in received:
        c = cx.load_pem_x509_certificate(issued["certificate"].encode())
        c.verify_directly_issued_by(issuing)  # no answer carries a signature that fails
        fp = c.fingerprint(hashes.SHA256()).hex()
        assert fp in outcomes, f"certificate {issued['serial']} has no outcome line"
        assert outcomes[fp]["result"] == "ok" and outcomes[fp]["op_id"] in intents
        row = db.execute("SELECT serial, revoked_at FROM certs WHERE fingerprint = ?",
                         (fp,)).fetchone()
        assert row is not None and row[0] == issued["serial"], \
            f"certificate {issued['serial']} not in inventory"
        # What a client received is never taken for unreleased at a start (a review found
        # the first draft revoked every certificate whose OCSP signing a kill cut short)
        assert row[1] is None, f"certificate {issued['serial']}, received, was revoked"
    # What no client received and the inventory holds (its row committed while its
    # outcome was written, then the kill) is revoked at the start after
    done = {e["op_id"] for e in lines if e.get("phase") == "outcome"
            and e.get("released") is not False}
    for e in lines:
        if e.get("purpose") == "x509" and e.get("phase") == "intent" and e["op_id"] not in done:
            row = db.execute("SELECT revoked_at, reason FROM certs WHERE serial = ?",
                             (e["serial"],)).fetchone()
            assert row is None or (row[0] is not None and row[1] == "cessationOfOperation"), \
                (e["serial"], row)
    assert len({r["serial"] for r in received}) == len(received), "a serial was issued twice"
    serials = [e["serial"] for e in lines if e.get("phase") == "intent"
               and e.get("purpose") == "x509"]
    assert len(serials) == len(set(serials)), "a serial was signed twice"
    assert sum(1 for e in lines if e["event"] == "daemon.start") == rounds + 1


async def health_becomes(d: Daemon, want: int, within: float, retry: str = "1") -> bytes:
    """GET /health until it answers `want` (the daemon notices on its own schedule: a
    reconnect's back-off, a checkpoint's interval), failing after `within` seconds. A
    503 says when to look again (`retry` seconds), as every 503 of the API does."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        async with aiohttp.ClientSession() as s, s.get(f"{d.url}/health", ssl=d.ssl()) as r:
            status, body, headers = r.status, await r.read(), r.headers
        if status == want:
            assert status != 503 or headers.get("Retry-After") == retry, dict(headers)
            return body
        assert asyncio.get_running_loop().time() < deadline, (status, body)


async def health_until_text(d: Daemon, text: str, within: float = 30) -> bytes:
    """GET /health until its body holds `text` (a reconnect's back-off sets when)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        _, _, body = await http("GET", f"{d.url}/health", d.ssl())
        if text.encode() in body:
            return body
        assert asyncio.get_running_loop().time() < deadline, body


async def test_hsm_token_taken_away_then_back(tmp_path: Path) -> None:
    ca = init_ca(tmp_path, private_hsm=True)
    # One worker: each worker has its own session and recovers on its own, and this
    # test follows one session through the outage (which worker a new connection
    # reaches is the kernel's choice).
    d = start_daemon(ca.state, "--workers", "1")
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        gone = cx.load_pem_x509_certificate(
            enroll(d, tmp_path, "service", ["gone." + LOAD_NAME])[0].read_bytes())
        await signed(d, gone, ocsp.OCSPCertStatus.GOOD)
        status, _, before = await http("GET", f"{d.url}/v1/x509/crl", d.ssl())
        assert status == 200
        tokens = tmp_path / "softhsm" / "tokens"
        away = tmp_path / "tokens.away"
        tokens.rename(away)
        status, _, body = await http("GET", f"{d.url}/health", d.ssl())
        assert status == 503 and json.loads(body)["hsm"].startswith("unavailable")
        # Once the session is opened again: why no token is found, the directory named
        # (an SRE trial's unreadable one read as a token that is not there)
        said = json.loads(await health_until_text(d, "its token directory"))["hsm"]
        assert f"its token directory {tokens.resolve()}" in said and "does not exist" in said, \
            said
        status, ctype, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 503 and ctype == "application/problem+json", body
        assert "HSM" in json.loads(body)["detail"]
        # A revocation needs no signature to stand: it is recorded and committed, and
        # the client hears so (not "retry", which would then be refused as a conflict).
        # OCSP stops saying good at once; the revoked response follows the HSM back.
        status, _, body = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                     body={"serial": format(gone.serial_number, "x")})
        answer = json.loads(body)
        assert status == 200 and answer["published"] is False, body
        assert "not re-signed yet" in answer["warnings"][0]
        resp, _ = await ask_ocsp(d, request_for(gone, issuing(d)))
        assert resp.response_status == ocsp.OCSPResponseStatus.TRY_LATER
        # The CRL cannot be re-signed with it, but the last one stands until its
        # nextUpdate: relying parties still get a valid CRL, not a 503.
        status, ctype, crl = await http("GET", f"{d.url}/v1/x509/crl", d.ssl())
        assert (status, ctype, crl) == (200, "application/pkix-crl", before), crl[:200]

        def primary_said(event: str) -> bool:  # (a worker's lines name the worker)
            return any(e.get("event", "").startswith(event) and "worker" not in e
                       for e in (json.loads(x) for x in d.stderr if x.startswith("{")))
        # The primary's refresher has tried the revoked response, and failed, before the
        # token comes back (it may not have come round to it yet under load)
        assert d.wait_stderr(lambda: primary_said("OCSP responses not signed"), 30)
        away.rename(tokens)
        # The session comes back without a restart: at the next reconnect attempt its
        # back-off allows (it grew while the token was away; a probe waits up to 1 s).
        await health_becomes(d, 200, within=30)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
        await signed(d, gone, ocsp.OCSPCertStatus.REVOKED)
        status, _, crl = await http("GET", f"{d.url}/v1/x509/crl", d.ssl())
        listed = cx.load_der_x509_crl(crl).get_revoked_certificate_by_serial_number(
            gone.serial_number)
        assert status == 200 and listed is not None
        # and its next round says the responses are signed again
        assert d.wait_stderr(lambda: primary_said("OCSP responses are signed again"), 30)
    finally:
        assert d.stop() == 0
    events = [e["event"] for e in log_lines(ca.state)]
    assert "hsm.error" in events and "hsm.reconnect" in events
    reconnects = [e for e in log_lines(ca.state) if e["event"] == "hsm.reconnect"]
    assert reconnects[-1]["result"] == "ok"
    audit_verify(ca.state, ok=True)
    # The revoked certificate's responses failed at every round while the token was
    # away: said once per error by each process that tried (the worker at the
    # revocation, the primary's refresher), not once a second (an operator's trial).
    unsigned = [x for x in d.stderr if "OCSP responses not signed" in x]
    reasons = {json.loads(x)["error"] for x in unsigned}
    assert 1 <= len(unsigned) <= 2 * len(reasons), unsigned
    assert any("OCSP responses are signed again" in x for x in d.stderr)


async def test_a_token_directory_that_cannot_be_looked_at_leaves_the_signing_thread_alive(
        tmp_path: Path) -> None:
    """A review: SoftHSM's token directory under a directory the daemon's user cannot
    search made the diagnosis of a failed reconnect raise (Path.is_dir's PermissionError),
    which ended the worker's signing thread: /health said GeneralError for good and every
    signature waited forever, even once the directory could be read again. Root searches
    any directory, so the config names a path the kernel refuses to everyone: a name
    longer than NAME_MAX (ENAMETOOLONG), which is_dir raised as well."""
    ca = init_ca(tmp_path, private_hsm=True)
    d = start_daemon(ca.state, "--workers", "1")  # one session to follow
    try:
        ctx = d.ssl(*enroll(d, tmp_path, "service", [LOAD_NAME]))
        conf = tmp_path / "softhsm" / "softhsm2.conf"
        tokens = tmp_path / "softhsm" / "tokens"
        good = conf.read_text()
        tokens.rename(tmp_path / "tokens.away")
        conf.write_text(good.replace(str(tokens.resolve()),
                                     str(tmp_path / ("x" * 300) / "tokens")))
        status, _, body = await http("GET", f"{d.url}/health", d.ssl())
        assert status == 503 and json.loads(body)["hsm"].startswith("unavailable"), body
        # A reconnect has been tried with that config (the worker's audit line says so)
        deadline = asyncio.get_running_loop().time() + 30
        while not any(e["event"] == "hsm.reconnect" and e["result"] != "ok"
                      for e in log_lines(ca.state)):
            assert asyncio.get_running_loop().time() < deadline
            await http("GET", f"{d.url}/health", d.ssl())
        conf.write_text(good)
        (tmp_path / "tokens.away").rename(tokens)
        await health_becomes(d, 200, within=30)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
    finally:
        assert d.stop() == 0
    assert not any("Exception in thread" in x for x in d.stderr)
    audit_verify(ca.state, ok=True)


async def test_key_objects_taken_from_the_token_then_back_mean_503_then_recovery(
        tmp_path: Path) -> None:
    """A chaos trial moved the token's key object files away and back: every signature
    answered 500 with KeyNotFound, /health said the HSM was fine, the refresher wrote an
    intent and an outcome a second, and nothing signed again until a restart. A key the
    process used that the token no longer holds is the HSM unavailable: 503, /health
    says so, and the session comes back with the files."""
    ca = init_ca(tmp_path, private_hsm=True)
    d = start_daemon(ca.state, "--workers", "1")
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
        (token_dir,) = [p for p in (tmp_path / "softhsm" / "tokens").iterdir() if p.is_dir()]
        away = tmp_path / "objects.away"
        away.mkdir()
        objects = [p for p in token_dir.glob("*.object") if p.name != "token.object"]
        assert objects
        for p in objects:
            p.rename(away / p.name)
        status, ctype, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 503 and ctype == "application/problem+json", body
        assert "HSM" in json.loads(body)["detail"], body
        health = json.loads(await health_becomes(d, 503, within=30))
        assert health["hsm"].startswith("unavailable"), health
        lines_then = len(list(log_lines(ca.state)))
        for _ in range(20):  # refused at once, and none of them writes an intent
            status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
            assert status == 503, body
        intents = [e for e in list(log_lines(ca.state))[lines_then:]
                   if e.get("event") == "hsm.sign" and e.get("purpose") == "x509"]
        assert not intents, intents
        # Reconnects while the files are away do not count as the session back (an SRE
        # trial: "works again", then broken at the next signature, every 5 s)
        deadline = asyncio.get_running_loop().time() + 60
        while len(tries := [e for e in list(log_lines(ca.state))[lines_then:]
                            if e.get("event") == "hsm.reconnect"]) < 3:
            assert asyncio.get_running_loop().time() < deadline, tries
            await http("GET", f"{d.url}/health", d.ssl())  # a look that tries again
        assert not any("the HSM session works again" in x for x in d.stderr)
        status, _, body = await http("GET", f"{d.url}/health", d.ssl())
        assert "the token no longer holds the key" in json.loads(body)["hsm"], body
        for p in objects:
            (away / p.name).rename(p)
        await health_becomes(d, 200, within=30)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
        # and its end is said, once it has held
        assert d.wait_stderr(lambda: any("the HSM session works again" in x
                                         for x in d.stderr)), "".join(d.stderr[-10:])
    finally:
        assert d.stop() == 0
    assert not any('"status": 500' in x or "unhandled error" in x for x in d.stderr)
    audit_verify(ca.state, ok=True)


async def test_a_pin_that_cannot_be_read_at_a_reconnect_is_said_not_an_older_error(
        tmp_path: Path) -> None:
    """The token away, then back while the PIN file is missing: /health and the
    operator's log said the error the session broke with (ObjectHandleInvalid) and
    nothing of the PIN, which only the audit log named (an operator's trial)."""
    ca = init_ca(tmp_path, private_hsm=True)
    d = start_daemon(ca.state, "--workers", "1")
    pin = ca.token.pin_file
    hidden = pin.with_name("pin.away")
    tokens = tmp_path / "softhsm" / "tokens"
    away = tmp_path / "tokens.away"
    try:
        tokens.rename(away)
        await health_becomes(d, 503, within=30)
        pin.rename(hidden)
        away.rename(tokens)
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # the next reconnect its back-off allows finds the PIN missing
            status, _, body = await http("GET", f"{d.url}/health", d.ssl())
            if "cannot read the PIN file" in json.loads(body)["hsm"]:
                break
            assert asyncio.get_running_loop().time() < deadline, (status, body)
        assert status == 503 and str(pin) in json.loads(body)["hsm"], body
        assert d.wait_stderr(lambda: any(
            "the HSM session cannot be re-opened" in x and "cannot read the PIN file" in x
            for x in d.stderr), 30), "".join(d.stderr[-20:])
        hidden.rename(pin)
        await health_becomes(d, 200, within=30)
        assert d.wait_stderr(lambda: any("the HSM session works again" in x
                                         for x in d.stderr), 30)
    finally:
        if hidden.exists():
            hidden.rename(pin)
        if away.exists():
            away.rename(tokens)
        assert d.stop() == 0
    said = "".join(d.stderr)
    assert said.count("the HSM session is not usable") == 1, said  # once per outage
    # and by which process's session (an SRE trial: each process has its own, and the
    # lines from the signing thread named none).
    assert [json.loads(x).get("worker") for x in d.stderr
            if "the HSM session is not usable" in x] == [0], said
    assert pin.read_text().strip() not in said
    audit_verify(ca.state, ok=True)


async def signing_metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What /metrics says of signing: the HSM's own count of C_Sign calls, signatures
    that verified, and issued objects under every result label."""
    status, _, raw = await http("GET", f"{d.url}/metrics", d.ssl())
    assert status == 200, raw
    found = {k: v for k, v in metric_samples(raw.decode()).items()
             if k[0] in ("hsmca_hsm_sign_calls_total", "hsmca_hsm_signatures_total",
                         "hsmca_issued_total")}
    assert ("hsmca_hsm_sign_calls_total", ()) in found, found
    return found


def intent_count(state: Path) -> int:
    return sum(1 for e in log_lines(state) if e.get("phase") == "intent")


def x509_signings(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
                  ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The signings of X.509 certificates among `signing_metrics`, whatever their
    result."""
    return {k: v for k, v in metrics.items()
            if k[0] == "hsmca_issued_total" and ("kind", "x509") in k[1]}


def cert_rows(state: Path) -> int:
    with sqlite3.connect(state / "hsmca.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM certs").fetchone()[0])


async def assert_nothing_signed(d: Daemon, ctx: Any, why: str) -> None:
    """While the audit log cannot be written: three renewals refused with 503, /health
    naming `why`, nothing signed, nothing recorded as signed, nothing in the inventory."""
    before = await signing_metrics(d)
    intents, rows = intent_count(d.state), cert_rows(d.state)
    for _ in range(3):
        status, ctype, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 503 and ctype == "application/problem+json", body
        assert "audit log" in json.loads(body)["detail"]
    status, _, body = await http("GET", f"{d.url}/health", d.ssl())
    audit = json.loads(body)["audit"]
    assert status == 503 and audit.startswith("unavailable") and why in audit, body
    # Not one C_Sign (the HSM's own count), nor any issued object, whatever its result.
    assert await signing_metrics(d) == before
    assert (intent_count(d.state), cert_rows(d.state)) == (intents, rows)


async def assert_served_again(d: Daemon, ctx: Any) -> None:
    """Once the log can be written: healthy within seconds without any request that
    writes (a load balancer sends none to a node its health check took out: the
    daemon retries the log itself, every second), then served; no restart."""
    deadline = asyncio.get_running_loop().time() + 10
    while (status := (await http("GET", f"{d.url}/health", d.ssl()))[0]) != 200:
        assert asyncio.get_running_loop().time() < deadline, status
    status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
    assert status == 201, body


async def test_audit_log_that_cannot_grow_means_503_and_nothing_signed(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        size = (ca.state / "audit/log.jsonl").stat().st_size
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
        # The file named (an auditor trial's immutable log: /health named none).
        await assert_nothing_signed(
            d, ctx, f"cannot write the audit log {ca.state / 'audit/log.jsonl'}: File too large")
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        await assert_served_again(d, ctx)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def renew_whose_outcome_cannot_be_written(d: Daemon, ctx: Any) -> None:
    """A renewal (answered 503) whose intent line fits on the log's disk and whose outcome
    does not (`sign_whose_outcome_cannot_be_written`)."""
    async def renew() -> tuple[int, bytes]:
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        return status, body
    await sign_whose_outcome_cannot_be_written(d, renew)


async def sign_whose_outcome_cannot_be_written(
        d: Daemon, ask: Callable[[], Awaitable[tuple[int, bytes]]]) -> None:
    """`ask` (a certificate request) answered 503 because its intent line fits on the
    log's disk and its outcome does not: its primary may grow the log by one intent line
    (RLIMIT_FSIZE), learnt from a request like it, with that one's OCSP responses signed
    first, so that nothing else grows the log meanwhile."""
    path = d.state / "audit/log.jsonl"
    status, body = await ask()
    assert status == 201, body
    first = cx.load_pem_x509_certificate(json.loads(body)["certificate"].encode())
    deadline = asyncio.get_running_loop().time() + 30
    while (await ask_ocsp(d, request_for(first, issuing(d))))[0].response_status != \
            ocsp.OCSPResponseStatus.SUCCESSFUL:
        assert asyncio.get_running_loop().time() < deadline
    # and the checkpoint of those lines signed (its own two lines need none), or its
    # lines could take the room left below for the next intent
    checkpoint = d.state / "audit/checkpoint"
    while int(checkpoint.read_text().splitlines()[1]) + 2 != len(
            path.read_bytes().splitlines()):
        assert asyncio.get_running_loop().time() < deadline
        await http("GET", f"{d.url}/health", d.ssl())  # paced by a round trip
    [intent] = [line for line in path.read_bytes().splitlines()
                if b'"phase":"intent"' in line and b'"purpose":"x509"' in line][-1:]
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE,
                     (path.stat().st_size + len(intent) + 60, resource.RLIM_INFINITY))
    status, body = await ask()
    assert status == 503, body


async def test_a_certificate_whose_outcome_never_reached_the_log_is_revoked_at_the_start(
        tmp_path: Path) -> None:
    """A fault trial: the inventory's row commits while the outcome line is written, so
    a log that fills (or a kill) between the two left a signed certificate that no
    client got, without its outcome, that the inventory called valid and OCSP good after
    the restart. The start revokes it, after a `sign.unreleased` line saying why."""
    ca = init_ca(tmp_path)
    path = ca.state / "audit/log.jsonl"
    d = start_daemon(ca.state)
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        await renew_whose_outcome_cannot_be_written(d, d.ssl(cert, key))
        last = json.loads(path.read_bytes().splitlines()[-1])
        assert (last["event"], last["phase"], last["purpose"]) == ("hsm.sign", "intent",
                                                                   "x509")
        serial = last["serial"]
        status, _, body = await http("GET", f"{d.url}/v1/inventory/certificates/{serial}",
                                     d.admin_ssl())
        assert status == 200 and json.loads(body)["status"] == "valid", body  # the fault
    finally:
        d.stop()  # it cannot write its stop line either
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any("never released" in x and serial in x
                                         for x in d.stderr)), "".join(d.stderr)
        # and the start says the last run's stop did not make it into the log
        assert any("did not stop cleanly" in x for x in d.stderr), "".join(d.stderr)
        status, _, body = await http("GET", f"{d.url}/v1/inventory/certificates/{serial}",
                                     d.admin_ssl())
        record = json.loads(body)
        assert (record["status"], record["reason"]) == ("revoked", "cessationOfOperation")
        lines = log_lines(ca.state)
        [why] = [x for x in lines if x["event"] == "sign.unreleased"]
        assert why["serial"] == serial
        assert any(x["event"] == "cert.revoke" and x["seq"] > why["seq"] for x in lines)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_certificate_noted_as_withheld_is_revoked_by_the_next_start(
        tmp_path: Path) -> None:
    """A certificate withheld after its "ok" outcome (a renewal's revocation check that
    PostgreSQL gave up on: tests/test_cluster_held.py) is noted in audit/withheld.jsonl
    before its client hears, because its `sign.withheld` line may not be writable in
    that outage, and a review lost it at a stop. The next start revokes what the file
    names, only the row its intent made, and removes the file."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        cert, _ = enroll(d, tmp_path, "service", [LOAD_NAME])
        kept, _ = enroll(d, tmp_path, "service", [LOAD_NAME])
    finally:
        assert d.stop() == 0
    serials = [format(cx.load_pem_x509_certificate(p.read_bytes()).serial_number, "x")
               for p in (cert, kept)]
    [intent] = [x for x in log_lines(ca.state) if x["event"] == "hsm.sign"
                and x.get("phase") == "intent" and x.get("serial") == serials[0]
                and x["purpose"] == "x509"]
    noted = ca.state / "audit" / "withheld.jsonl"
    # The first as the daemon notes it; the second named with another intent's seq,
    # which is not its row's (left alone), then a torn line.
    noted.write_text(json.dumps([intent["purpose"], serials[0], intent["seq"]]) + "\n"
                     + json.dumps(["x509", serials[1], intent["seq"]]) + "\n[\"x509\", ")
    d = start_daemon(ca.state)
    try:
        assert d.wait_stderr(lambda: any("never released" in x and serials[0] in x
                                         for x in d.stderr)), "".join(d.stderr)
        states = []
        for serial in serials:
            status, _, body = await http(
                "GET", f"{d.url}/v1/inventory/certificates/{serial}", d.admin_ssl())
            assert status == 200, body
            states.append((json.loads(body)["status"], json.loads(body)["reason"]))
        assert states == [("revoked", "cessationOfOperation"), ("valid", None)], states
        assert not noted.exists()
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_damaged_inventory_is_refused_at_start_in_one_line(tmp_path: Path) -> None:
    """A fault trial: an inventory with a damaged page started without a word, answered
    500s, and its next start died with a traceback. The start names the file and the
    way back, in one line."""
    from tests.conftest import hsmca
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        enroll(d, tmp_path, "service", [LOAD_NAME])
    finally:
        assert d.stop() == 0
    db_path = ca.state / "hsmca.sqlite3"
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [(root,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'certs'")
        [(page,)] = db.execute("PRAGMA page_size")
    with open(db_path, "r+b") as fh:  # the certificates' first page, overwritten
        fh.seek((root - 1) * page)
        fh.write(b"\x55" * page)
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"hsmca: error: the inventory {db_path} is damaged ("), \
        proc.stderr
    assert "restore it from a backup" in proc.stderr and "Traceback" not in proc.stderr


async def test_a_stop_the_log_cannot_record_says_so_and_the_next_start_settles_it(
        tmp_path: Path) -> None:
    """A full-disk trial: SIGTERM with the log's disk full exited 1 with "cannot write the
    audit log ...: No space left on device", not saying what the stop had left. It says
    the stop was not recorded, and that the next start settles it; which it does. (A
    file size limit on the primary stands for the full disk.)"""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    size = (ca.state / "audit/log.jsonl").stat().st_size
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    assert d.stop() == 1
    last = d.stderr[-1]
    assert last.startswith("hsmca: error: stopped, but the stop could not be recorded: ") \
        and "The next start says the last run did not stop cleanly" in last, d.stderr[-5:]
    d = start_daemon(ca.state, "--workers", "1")
    try:
        assert d.wait_stderr(lambda: any("did not stop cleanly" in x for x in d.stderr))
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_an_inventory_that_cannot_be_opened_is_refused_at_start_in_one_line(
        tmp_path: Path) -> None:
    """A full-disk trial: a start on a full state disk died with a traceback (SQLite's
    "disk I/O error" opening the inventory). Here its write-ahead log cannot be made
    (a directory holds its name): one line that names the file."""
    from tests.conftest import hsmca
    ca = init_ca(tmp_path)
    db_path = ca.state / "hsmca.sqlite3"
    for name in ("hsmca.sqlite3-wal", "hsmca.sqlite3-shm"):
        (ca.state / name).unlink(missing_ok=True)
    (ca.state / "hsmca.sqlite3-wal").mkdir()
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"hsmca: error: cannot open the inventory {db_path}: "), \
        proc.stderr


async def test_a_damage_found_while_serving_is_not_answered_retry_later(
        tmp_path: Path) -> None:
    """A chaos trial: damage the start does not read was answered "the inventory is
    unavailable ...; retry later", which never helps, and "nothing can be signed" to a
    request for a token. The answer says the inventory is damaged and what is needed,
    and the check of every page after the start says so before any request."""
    ca = init_ca(tmp_path)
    db_path = ca.state / "hsmca.sqlite3"
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # The index of tokens' secrets: written by a new token, read by no start.
        [(root,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = "
                               "'sqlite_autoindex_tokens_2'")
        [(page,)] = db.execute("PRAGMA page_size")
    with open(db_path, "r+b") as fh:  # its first page, overwritten
        fh.seek((root - 1) * page)
        fh.write(b"\x55" * page)
    d = start_daemon(ca.state)
    try:
        # Said before any request reads the page (an operator trial: only the first
        # request to read it found it): the start's check of every page, in the log and
        # by /health, which a load balancer follows.
        health = json.loads(await health_becomes(d, 503, within=30, retry="300"))
        assert "the inventory is damaged" in health["store"] and "restore it from a " \
            "backup" in health["store"], health
        assert d.wait_stderr(lambda: any(f"the inventory {db_path} is damaged (" in x
                                         for x in d.stderr)), "".join(d.stderr)
        # Nor is anything signed whose record would go into the damaged file, though the
        # certificates' own pages are whole (a restore trial: six issued on a damaged
        # inventory, their rows then garbled).
        def leaves() -> int:
            return sum(1 for x in log_lines(ca.state) if x.get("purpose") == "x509")
        signed = leaves()
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", d.admin_ssl(),
                                     body={})
        problem = json.loads(body)
        assert status == 503 and "damaged, so nothing can be signed right now" in \
            problem["detail"] and "restore it from a backup" in problem["detail"], body
        assert leaves() == signed
        status, _, body = await http("POST", f"{d.url}/v1/tokens", d.admin_ssl(),
                                     body={"role": "service", "names": [LOAD_NAME]})
        problem = json.loads(body)
        assert status == 503 and "damaged, so no token can be made right now" in \
            problem["detail"] and "retry later" not in problem["detail"], body
        health = json.loads(await health_becomes(d, 503, within=30, retry="300"))
        assert "is damaged" in health["store"], health
    finally:
        d.stop()


async def test_a_missing_inventory_is_refused_at_start_not_made_anew(tmp_path: Path) -> None:
    """A chaos trial moved the inventory away: the start made a new, empty one without a
    word, forgot every revocation (the CRL went from 95 entries to none) and refused
    every client, the admin's too. The start refuses in one line, and makes nothing."""
    from tests.conftest import hsmca
    ca = init_ca(tmp_path)
    db_path = ca.state / "hsmca.sqlite3"
    db_path.rename(tmp_path / "elsewhere.sqlite3")
    proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen", "127.0.0.1:0",
                 check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"hsmca: error: the inventory {db_path} does not exist "), \
        proc.stderr
    assert "restore the newest backup" in proc.stderr and not db_path.exists()
    (tmp_path / "elsewhere.sqlite3").rename(db_path)  # put back, it starts
    d = start_daemon(ca.state)
    assert d.stop() == 0


async def test_an_inventory_deleted_or_emptied_is_never_served_as_a_new_one(
        tmp_path: Path) -> None:
    """A disaster trial deleted the inventory under the running daemon: /health said
    ok, renewals went on into the deleted file, a background checkpoint made a new,
    empty one at the path, and the next start took it for the inventory, forgetting
    every certificate and revocation (a keyCompromise revocation left the CRL). Now
    nothing is signed while the file is gone, /health says why, nothing is made at the
    path, and once the file is back it is served again. A start refuses an inventory
    emptied to 0 bytes, or one holding neither key nor certificate."""
    from tests.test_workers import worker_pids
    ca = init_ca(tmp_path)
    db_path = ca.state / "hsmca.sqlite3"
    aside = tmp_path / "aside"
    aside.mkdir()
    d = start_daemon(ca.state)
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        # Its OCSP responses signed first, which the refresher does within seconds.
        await signed(d, cx.load_pem_x509_certificate(cert.read_bytes()),
                     ocsp.OCSPCertStatus.GOOD)

        def issued() -> list[dict[str, Any]]:  # what was signed but checkpoints
            return [e for e in log_lines(ca.state) if e["event"] == "hsm.sign"
                    and e.get("phase") == "intent" and e.get("purpose") != "checkpoint"]
        before = issued()
        moved = [p for p in ca.state.glob("hsmca.sqlite3*")]
        for path in moved:
            path.rename(aside / path.name)
        try:
            for _ in range(2):
                status, ctype, body = await http("POST", f"{d.url}/v1/x509/renew", ctx,
                                                 body={})
                assert status == 503 and ctype == "application/problem+json", body
            status, _, body = await http("GET", f"{d.url}/health", d.ssl())
            assert status == 503 and f"the inventory {db_path} was deleted while the " \
                "daemon ran: no certificate or OCSP response is signed" in \
                json.loads(body)["store"], body
            assert issued() == before  # not one signature but the log's own checkpoints
            # A worker started meanwhile does not make one either: it cannot start.
            lines = len(d.stderr)
            os.kill(worker_pids(d)[0], signal.SIGKILL)
            assert d.wait_stderr(lambda: any("a worker failed to restart" in x or
                                             "worker ready" in x for x in d.stderr[lines:]),
                                 within=60), d.stderr[lines:]
            assert not any("worker ready" in x for x in d.stderr[lines:]), d.stderr[lines:]
            assert not db_path.exists()  # nothing new made where it was
        finally:
            for path in moved:
                (aside / path.name).rename(path)
        await assert_served_again(d, ctx)
    finally:
        assert d.stop() == 0
    from tests.conftest import hsmca
    kept = db_path.read_bytes()

    def refused() -> str:
        proc = hsmca("serve", "--config", ca.state / "hsmca.toml", "--listen",
                     "127.0.0.1:0", check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        return proc.stderr
    db_path.write_bytes(b"")
    assert refused().startswith(f"hsmca: error: the inventory {db_path} is empty (0 bytes")
    db_path.unlink()
    sqlite3.connect(db_path).execute("PRAGMA journal_mode=WAL").close()  # a new database
    db_path.chmod(0o600)
    said = refused()
    assert said.startswith(f"hsmca: error: the inventory {db_path} holds no key and no "
                           "certificate"), said
    assert "Restore the newest backup" in said
    for path in ca.state.glob("hsmca.sqlite3*"):
        path.unlink()
    db_path.write_bytes(kept)
    # A copy put at the path under the running daemon (a restore done before its stop,
    # with cp) is another file: not written into (a review: the primary's checkpoint of
    # the live WAL every second destroyed it), and said.
    d = start_daemon(ca.state)
    try:
        copy = tmp_path / "restored.sqlite3"
        copy.write_bytes(kept)
        copy.chmod(0o600)
        copy.replace(db_path)
        assert d.wait_stderr(lambda: any("inventory checkpoint failed" in line
                                         and "replaced by another file" in line
                                         for line in d.stderr), within=30), d.stderr[-5:]
        assert db_path.read_bytes() == kept
    finally:
        d.stop()


async def test_audit_log_made_read_only_means_503_until_writable(tmp_path: Path) -> None:
    """The log file made unmodifiable under the running daemon (chattr +i: root
    ignores file modes, not this): nothing is signed, /health says why, and once the
    file is writable again the next request is served, without a restart."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    log_file = ca.state / "audit/log.jsonl"
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        chattr = require("chattr")
        proc = subprocess.run([chattr, "+i", log_file], capture_output=True, text=True)
        assert proc.returncode == 0, ("this test needs a filesystem with the immutable "
                                      f"attribute (ext4, xfs) for {tmp_path}: {proc.stderr}")
        try:
            await assert_nothing_signed(d, ctx, "Operation not permitted")
        finally:
            subprocess.run([chattr, "-i", log_file], check=True)
        await assert_served_again(d, ctx)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_audit_log_moved_or_cut_under_the_daemon_means_503_until_it_is_back(
        tmp_path: Path) -> None:
    """The log file moved away (or deleted) under the running daemon: lines written to
    the open file would vanish with it, so nothing is signed and /health says so. The
    same for a log cut short: lines after the cut would not chain. Once the file is
    back as hsmca wrote it, the next request is served, without a restart."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    log_file = ca.state / "audit/log.jsonl"
    aside = log_file.with_name("moved-away.jsonl")
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        log_file.rename(aside)
        try:
            before = await signing_metrics(d)
            for _ in range(2):
                status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
                assert status == 503 and "audit log" in json.loads(body)["detail"]
            status, _, body = await http("GET", f"{d.url}/health", d.ssl())
            assert status == 503 and "was moved or deleted while hsmca ran; put it back" in (
                json.loads(body)["audit"]), body
            assert await signing_metrics(d) == before
        finally:
            aside.rename(log_file)
        await assert_served_again(d, ctx)
        whole = log_file.read_bytes()
        with open(log_file, "r+b") as fh:
            fh.truncate(whole.rindex(b"\n", 0, len(whole) - 1) + 1)  # the last line cut off
        try:
            await assert_nothing_signed(d, ctx, "was cut or written to by something other")
        finally:
            with open(log_file, "r+b") as fh:
                fh.write(whole)
        await assert_served_again(d, ctx)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)
    # Each outage is said once, with why, in the first line written after it.
    resumed = [e["after"] for e in log_lines(ca.state) if e["event"] == "log.resume"]
    assert len(resumed) == 2, resumed
    assert "was moved or deleted" in resumed[0] and "was cut" in resumed[1], resumed


async def test_a_certificate_whose_outcome_could_not_be_written_is_revoked_once_it_can(
        tmp_path: Path) -> None:
    """A fault trial (and a review): with the log's disk full, a row committed while its
    outcome could not be written; once the disk had room the owed outcome was written
    (released: false), but the row stayed valid and OCSP moved it to good. The worker
    revokes it as soon as the log takes lines again, without a restart."""
    ca = init_ca(tmp_path)
    path = ca.state / "audit/log.jsonl"
    d = start_daemon(ca.state, "--workers", "1")
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        try:
            await renew_whose_outcome_cannot_be_written(d, d.ssl(cert, key))
            serial = json.loads(path.read_bytes().splitlines()[-1])["serial"]
        finally:
            resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            status, _, body = await http(
                "GET", f"{d.url}/v1/inventory/certificates/{serial}", d.admin_ssl())
            assert status == 200, body
            record = json.loads(body)
            if record["status"] == "revoked":
                break
            assert asyncio.get_running_loop().time() < deadline, record
        assert record["reason"] == "cessationOfOperation"
        assert d.wait_stderr(lambda: any("signed but never released" in x and serial in x
                                         for x in d.stderr))
    finally:
        assert d.stop() == 0
    lines = log_lines(ca.state)
    [owed] = [x for x in lines if x.get("phase") == "outcome" and x.get("released") is False]
    [why] = [x for x in lines if x["event"] == "sign.unreleased"]
    assert why["serial"] == serial and why["seq"] > owed["seq"]
    audit_verify(ca.state, ok=True)


async def enroll_by_token(d: Daemon, token: str, csr: str) -> tuple[int, Any, bytes]:
    """POST /v1/x509/enroll with a bootstrap token: (status, headers, body)."""
    return await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(), body={"csr": csr},
                      headers={"Authorization": f"Bearer {token}"})


async def test_tokens_a_kill_left_spent_are_settled_at_the_next_start(tmp_path: Path) -> None:
    """A chaos trial killed the daemon under enrollments: 15 of 76 retries with the same
    key were told the token was spent, some with nothing issued (the kill came after
    the token was spent, before a certificate was recorded), some with the certificate
    released (after its outcome line, before the token said so). Here the two windows
    are left as such a kill leaves them; the next start settles both: one retry gets its
    certificate again, the other enrolls."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    spent_on_nothing, released = [await bootstrap_token(d, "service", [LOAD_NAME])
                                  for _ in range(2)]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = csr_pem([LOAD_NAME], key)
    status, _, body = await enroll_by_token(d, released, csr)
    assert status == 201, body
    issued = json.loads(body)["certificate"]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # the windows a kill leaves
        db.execute("UPDATE tokens SET released_at = NULL WHERE used_serial IS NOT NULL")
        db.execute("UPDATE tokens SET used_at = ? WHERE used_at IS NULL",
                   (dt.datetime.now(dt.UTC).isoformat(),))
    d = start_daemon(ca.state, "--workers", "1")
    try:
        assert d.wait_stderr(lambda: any("tokens a kill left spent are settled" in x
                                         for x in d.stderr)), "".join(d.stderr)
        settled = json.loads(next(x for x in d.stderr if "left spent are settled" in x))
        assert (settled["released"], settled["given_back"]) == (1, 1), settled
        status, _, body = await enroll_by_token(d, released, csr)
        assert status == 200 and json.loads(body)["certificate"] == issued, body
        status, _, body = await enroll_by_token(d, spent_on_nothing, csr_pem([LOAD_NAME]))
        assert status == 201, body
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_token_a_kill_left_spent_after_a_long_run_is_given_back(
        tmp_path: Path) -> None:
    """A crash trial: a kill after a run of 8,000 lines left a token spent on nothing,
    and the retry with it was told it was spent. The start read the log's last few
    hundred lines for the killed run's start, found none, and gave nothing back. It
    looks back through the log to the run's start; and (a review) gives back no token
    that a signature of those runs was asked with, which the last lines alone did not
    show: one whose certificate was released, its inventory row's token link lost (an
    inventory restored from a backup taken mid-enrollment), enrolled twice."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    spent_on_nothing = await bootstrap_token(d, "service", [LOAD_NAME])
    enrolled = await bootstrap_token(d, "service", [LOAD_NAME])
    status, _, body = await enroll_by_token(d, enrolled, csr_pem([LOAD_NAME]))
    assert status == 201, body
    for _ in range(30):  # more than two tiles' width of lines after the start
        await asyncio.gather(*(bootstrap_token(d, "service", [LOAD_NAME]) for _ in range(20)))
    lines = log_lines(ca.state)
    start = max(x["seq"] for x in lines if x["event"] == "daemon.start")
    assert len(lines) - start > 2 * 256, (len(lines), start)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:  # as a kill leaves it
        db.execute("UPDATE tokens SET used_at = ? WHERE id = ?",
                   (dt.datetime.now(dt.UTC).isoformat(), spent_on_nothing.split("-")[1]))
        db.execute("UPDATE tokens SET used_serial = NULL, released_at = NULL WHERE id = ?",
                   (enrolled.split("-")[1],))
    d = start_daemon(ca.state, "--workers", "1")
    try:
        assert d.wait_stderr(lambda: any("tokens a kill left spent are settled" in x
                                         for x in d.stderr)), "".join(d.stderr)
        status, _, body = await enroll_by_token(d, spent_on_nothing, csr_pem([LOAD_NAME]))
        assert status == 201, body
        status, _, body = await enroll_by_token(d, enrolled, csr_pem([LOAD_NAME]))
        assert status == 401 and b"token-spent" in body, body
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_token_whose_certificate_was_never_released_enrolls_again(
        tmp_path: Path) -> None:
    """A left-over finding: an enrollment answered 503 because its outcome could not be
    written (the log's disk full) had its certificate revoked once the log was back, and
    left its bootstrap token spent: the service's retry was told the token was used, and
    it had to ask an admin for another. The token enrolls again."""
    ca = init_ca(tmp_path)
    path = ca.state / "audit/log.jsonl"
    d = start_daemon(ca.state, "--workers", "1")
    # Both made first: a token's line would take the log's last room.
    tokens = [await bootstrap_token(d, "service", [LOAD_NAME]) for _ in range(2)]
    token = tokens[-1]
    key = ec.generate_private_key(ec.SECP256R1())  # the key of the one never released

    async def enroll_with_a_new_token() -> tuple[int, bytes]:
        return await enroll_with(tokens.pop(0), key if not tokens else None)

    async def enroll_with(secret: str, with_key: Any = None) -> tuple[int, bytes]:
        status, _, body = await enroll_by_token(d, secret, csr_pem([LOAD_NAME], with_key))
        return status, body
    try:
        try:
            await sign_whose_outcome_cannot_be_written(d, enroll_with_a_new_token)
            serial = json.loads(path.read_bytes().splitlines()[-1])["serial"]
            # Its row names the token, but a retry of its key is not answered with it: it
            # was never released (a review's retry got it, then it was revoked).
            status, body = await enroll_with(token, key)
            assert status == 401 and json.loads(body)["type"].endswith("token-spent"), body
        finally:
            resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        # The token given back, then the certificate revoked: that line is the last step.
        assert d.wait_stderr(lambda: any("bootstrap token usable again" in x and serial in x
                                         for x in d.stderr)), "".join(d.stderr)
        assert d.wait_stderr(lambda: any("signed but never released" in x and serial in x
                                         for x in d.stderr)), "".join(d.stderr)
        status, _, body = await http("GET", f"{d.url}/v1/inventory/certificates/{serial}",
                                     d.admin_ssl())
        assert json.loads(body)["status"] == "revoked", body
        status, body = await enroll_with(token)  # the service's retry
        assert status == 201, body
        again = cx.load_pem_x509_certificate(json.loads(body)["certificate"].encode())
        assert format(again.serial_number, "x") != serial.lower().lstrip("0")
        status, body = await enroll_with(token)  # and it is spent on that one
        assert status == 401 and "already been used" in json.loads(body)["detail"], body
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_log_replaced_by_a_copy_under_the_daemon_has_its_lines_saved(
        tmp_path: Path) -> None:
    """A fault trial: `cp log.jsonl new && mv new log.jsonl` under the running daemon
    left the lines written since the copy only in the deleted file the daemon held
    open; it asked to "put it back", which nobody could, and lost them at the stop.
    It saves them beside the log, says where, and they put back make a log that starts
    and verifies. Names made in advance for the next minutes (a review: each save failed
    on one) neither stop it nor are followed."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    log_file = ca.state / "audit/log.jsonl"
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        now = time.time()
        for second in range(120):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + second))
            log_file.with_name(f"log.jsonl.saved-{stamp}").symlink_to(tmp_path / "taken")
        copy = log_file.with_name("copy.jsonl")
        copy.write_bytes(log_file.read_bytes())
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body  # lines the copy lacks
        held = log_file.read_bytes()
        copy.rename(log_file)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 503, body
        status, _, body = await http("GET", f"{d.url}/health", d.ssl())
        said = json.loads(body)["audit"]
        assert status == 503 and "its lines are saved in " in said, body
        [saved] = [p for p in log_file.parent.glob("log.jsonl.saved-*") if not p.is_symlink()]
        assert str(saved) in said and saved.stat().st_mode & 0o777 == 0o640  # the log's
        assert not (tmp_path / "taken").exists()
        assert saved.read_bytes().startswith(held)
    finally:
        d.stop()  # it cannot write its stop line to the deleted file
    saved.rename(log_file)
    d = start_daemon(ca.state)
    try:
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_checkpoints_that_keep_failing_show_in_health(tmp_path: Path) -> None:
    """A daemon that signs but cannot checkpoint grows a log no auditor can trust yet:
    /health said ok all along (the fault review saw it for minutes). Here the checkpoint
    cannot be replaced: its path is taken by a directory."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    checkpoint = ca.state / "audit" / "checkpoint"
    saved = checkpoint.read_bytes()
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        log_file = ca.state / "audit" / "log.jsonl"
        mark = len(log_file.read_text().splitlines())
        checkpoint.unlink()
        (checkpoint / "in-the-way").mkdir(parents=True)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(cert, key),
                                     body={})
        assert status == 201, body  # issuance goes on: the lines are durable
        body = await health_becomes(d, 503, within=60)
        assert json.loads(body)["audit"].startswith("unavailable: no checkpoint signed for")
        # It names the file (not a temporary one, new at every try), and what it signed
        # is kept: only the writing is tried again, every second. Signing anew each time
        # added an HSM signature and two audit lines a second (an operator trial).
        assert f"cannot write {checkpoint}: Is a directory" in json.loads(body)["audit"], body

        def signed_while_failing() -> int:
            lines = (json.loads(x) for x in log_file.read_text().splitlines()[mark:])
            return sum(1 for x in lines if x.get("event") == "hsm.sign"
                       and x.get("purpose") == "checkpoint")
        while int(json.loads(body)["audit"].split(" for ")[1].split(" s")[0]) < 8:
            body = await health_becomes(d, 503, within=60)  # eight tries and more
        assert signed_while_failing() <= 2, signed_while_failing()
        (checkpoint / "in-the-way").rmdir()
        checkpoint.rmdir()
        await health_becomes(d, 200, within=60)
        assert checkpoint.read_bytes() != saved  # signed again, over the lines since
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_full_inventory_disk_is_unhealthy_until_it_has_room_again(
        tmp_path: Path) -> None:
    """An SRE trial: the state directory's disk full (the audit log on a disk of its
    own, as in production), every renewal was 503, yet /health said ok, hsmca_up said
    the store was up and nothing was logged as a warning: a small write (/health's own
    probe) still fit, and said the inventory was well again, and every other request
    signed a certificate to throw away. The disk's state holds until it has room."""
    ca = init_ca(tmp_path)
    mount, umount = require("mount"), require("umount")
    keep, audit = tmp_path / "state-copy", tmp_path / "audit-disk"
    shutil.copytree(ca.state, keep, symlinks=True)
    proc = subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           ca.state], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # a small file system of its own
    filler = ca.state / "filler"
    d = None
    try:
        shutil.copytree(keep, ca.state, symlinks=True, dirs_exist_ok=True)
        shutil.move(ca.state / "audit", audit)  # the audit log on another disk
        (ca.state / "audit").symlink_to(audit)
        d = start_daemon(ca.state, "--workers", "1")
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        st = os.statvfs(ca.state)
        with open(filler, "wb") as fh:  # all but 40 KiB
            fh.write(b"\0" * (st.f_bavail * st.f_frsize - (40 << 10)))
        refused = 0
        for _ in range(60):  # until a row does not fit
            status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
            if status == 503:
                refused += 1
                break
            assert status == 201, body
        assert refused, "60 renewals fitted in 40 KiB"
        # A little room again, where a small write fits (the probe's, a nonce's) and a
        # disk still all but full: not well again, it would fill at the next moment.
        os.truncate(filler, filler.stat().st_size - (200 << 10))
        before = x509_signings(await signing_metrics(d))
        for _ in range(3):  # each /health probes the inventory with a write of its own
            status, _, body = await http("GET", f"{d.url}/health", d.ssl())
            assert status == 503 and "is full" in json.loads(body)["store"], body
            status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
            assert status == 503 and "inventory" in json.loads(body)["detail"], body
        assert x509_signings(await signing_metrics(d)) == before  # nothing signed for naught
        assert d.wait_stderr(lambda: any("the inventory's disk is full" in x
                                         for x in d.stderr)), "".join(d.stderr[-10:])
        filler.unlink()
        await health_becomes(d, 200, within=30)
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
    finally:
        if d is not None:
            assert d.stop() == 0
        subprocess.run([umount, "-l", ca.state], check=True)
    # The state as it was on the small disk is gone with it; the log is whole.
    audit_verify(keep, ok=True, log=audit / "log.jsonl")


async def test_an_inventory_that_cannot_be_written_means_503_and_no_more_signing(
        tmp_path: Path) -> None:
    """The inventory's file refuses writes under the running daemon (its WAL made
    immutable, as a full disk would): the renewal whose row cannot be written is
    answered 503, not 500; /health says why; the next requests are refused before any
    signature, and once the file takes writes again the node serves, no restart."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")  # one worker: one inventory writer
    wal = ca.state / "hsmca.sqlite3-wal"
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        assert wal.exists()
        chattr = require("chattr")
        proc = subprocess.run([chattr, "+i", wal], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        try:
            status, ctype, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
            assert status == 503 and ctype == "application/problem+json", body
            assert "inventory" in json.loads(body)["detail"]
            before = x509_signings(await signing_metrics(d))
            assert before, "the enrollment and the renewal above are counted"
            for _ in range(2):
                status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
                assert status == 503 and "inventory" in json.loads(body)["detail"], body
            # Refused before the HSM. (The log works: its checkpoints, C_Sign calls of
            # their own, go on, so only the certificates' signings are compared.)
            assert x509_signings(await signing_metrics(d)) == before
            status, _, body = await http("GET", f"{d.url}/health", d.ssl())
            store = json.loads(body)["store"]
            assert status == 503 and store.startswith("unavailable: cannot write the "
                                                      "inventory"), body
            # and what a monitoring system alerts on says it too
            _, _, raw = await http("GET", f"{d.url}/metrics", d.ssl())
            up = metric_samples(raw.decode())
            assert up[("hsmca_up", (("part", "store"),))] == 0
            assert up[("hsmca_up", (("part", "audit"),))] == 1
        finally:
            subprocess.run([chattr, "-i", wal], check=True)
        status, _, body = await http("GET", f"{d.url}/health", d.ssl())
        assert status == 200, body
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)
    # The one certificate signed whose row could not be written is said, in the log, to
    # have never left the daemon.
    lines = [json.loads(raw) for raw in (ca.state / "audit/log.jsonl").read_bytes().split(
        b"\n")[:-1]]
    [withheld] = [e for e in lines if e["event"] == "sign.withheld"]
    assert withheld["released"] is False and "inventory" in withheld["reason"], withheld
    [intent] = [e for e in lines if e.get("phase") == "intent"
                and e["op_id"] == withheld["op_id"]]
    [outcome] = [e for e in lines if e.get("phase") == "outcome"
                 and e["op_id"] == withheld["op_id"]]
    assert intent["purpose"] == "x509" and outcome["result"] == "ok"
    # Its row lands after the clean stop, as a COMMIT given up on may on PostgreSQL (a
    # synchronous standby, a stalled disk; SQLite's is made so here): the next start
    # revokes it. It looked only at the runs a kill ended (a review).
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(certs)")]
        late = {"serial": intent["serial"], "fingerprint": "f" * 64,
                "audit_seq": intent["seq"], "audit_log": None, "revoked_at": None,
                "reason": None}
        row = dict(zip(cols, db.execute("SELECT * FROM certs WHERE audit_seq IS NOT NULL "
                                        "ORDER BY rowid DESC LIMIT 1").fetchone(),
                       strict=True))
        db.execute(f"INSERT INTO certs ({', '.join(cols)}) VALUES "
                   f"({', '.join('?' * len(cols))})", [late.get(c, row[c]) for c in cols])
    again = start_daemon(ca.state, "--workers", "1")
    try:
        assert any("signed but never released" in x and intent["serial"] in x
                   for x in again.stderr), "".join(again.stderr)
        status, _, body = await http(
            "GET", f"{again.url}/v1/inventory/certificates/{intent['serial']}",
            again.admin_ssl())
        assert status == 200 and json.loads(body)["status"] == "revoked", body
    finally:
        assert again.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_an_inventory_locked_past_its_busy_timeout_means_503_not_a_hang(
        tmp_path: Path) -> None:
    """Someone holds the inventory's write lock (a VACUUM, a write in the sqlite3 shell)
    longer than SQLite waits for it: the renewal whose row cannot be written is answered
    503, not left hanging with its worker's signing stalled behind it, and once the lock
    is let go the worker serves again."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    try:
        cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
        ctx = d.ssl(cert, key)
        holder = sqlite3.connect(ca.state / "hsmca.sqlite3", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the write lock, held
            status, _, body = await asyncio.wait_for(
                http("POST", f"{d.url}/v1/x509/renew", ctx, body={}), 60)
            assert status == 503 and "inventory" in json.loads(body)["detail"], body
            status, _, body = await http("GET", f"{d.url}/health", d.ssl())
            assert "another process holds its write lock" in json.loads(body)["store"], body
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await assert_served_again(d, ctx)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_revocation_the_inventory_cannot_take_yet_stands_and_is_committed_later(
        tmp_path: Path) -> None:
    """A chaos trial held the inventory's write lock: a revocation answered "503 nothing
    was revoked", while its audit line stood and the next start revoked it all the
    same, at the recorded time. The answer now says what happened (recorded, committed
    once the inventory takes it), and the daemon commits it as soon as it can."""
    from tests.conftest import hsmca
    from tests.test_revocation import ssh_user_cert
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "1")
    try:
        victim_files = enroll(d, tmp_path, "service", ["locked." + LOAD_NAME])
        victim = cx.load_pem_x509_certificate(victim_files[0].read_bytes())
        user = enroll(d, tmp_path, "user", ["locked@example.com"], ["locked"])
        ssh_cert = ssh_user_cert(d, tmp_path, user, "id_locked")
        ssh_serial = subprocess.run([require("ssh-keygen"), "-L", "-f", ssh_cert],
                                    capture_output=True, text=True, check=True).stdout
        ssh_serial = ssh_serial.split("Serial: ", 1)[1].split()[0]
        serial = format(victim.serial_number, "x")
        admin = ("--config", ca.state / "hsmca.toml", "--url", d.url)
        holder = sqlite3.connect(ca.state / "hsmca.sqlite3", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the write lock, held
            proc = await asyncio.to_thread(hsmca, "revoke", serial, *admin)
            assert f"revoked {serial} at " in proc.stdout, proc.stdout
            assert "the revocation is recorded in the audit log and stands" in proc.stderr
            assert "Do not send it again" in proc.stderr
            proc = await asyncio.to_thread(hsmca, "ssh", "revoke", "--serial", ssh_serial,
                                           *admin)
            assert "revoked 1 SSH certificate(s)" in proc.stdout, proc.stdout
            assert "the KRL lists it once the inventory takes it" in proc.stderr
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # A renewal with it before the late commit (a review kept one): refused, or, if
        # it got in first, revoked with it once the commit lands.
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew",
                                     d.ssl(*victim_files), body={})
        assert status in (201, 403), body
        late = cx.load_pem_x509_certificate(json.loads(body)["certificate"].encode()) \
            if status == 201 else None
        deadline = asyncio.get_running_loop().time() + 60
        while late is not None:
            resp = (await ask_ocsp(d, request_for(late, issuing(d))))[0]
            if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and \
                    resp.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                break
            assert asyncio.get_running_loop().time() < deadline
        while True:  # committed once the lock is gone, then its response re-signed
            resp = (await ask_ocsp(d, request_for(victim, issuing(d))))[0]
            if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and \
                    resp.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                break
            assert asyncio.get_running_loop().time() < deadline
        from tests.test_revocation import krl_says
        while (said := await asyncio.to_thread(krl_says, d, tmp_path, ssh_cert)) != "REVOKED":
            assert said == "ok" and asyncio.get_running_loop().time() < deadline, said
    finally:
        assert d.stop() == 0
    lines = [e for e in log_lines(ca.state) if e.get("event") == "cert.revoke"]
    # the admin's, once, not again at the commit (a renewal that got in before it is
    # revoked in a line of its own: `follows`, or `swept`)
    assert len([e for e in lines if not e.get("swept") and "follows" not in e]) == 1, lines
    assert not any("completed revocations the audit log records" in x for x in d.stderr)
    audit_verify(ca.state, ok=True)


async def test_slow_and_idle_connections_do_not_block_others(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    host, port = daemon.url.removeprefix("https://").rsplit(":", 1)
    idle: list[socket.socket] = []
    slow: list[asyncio.StreamWriter] = []
    try:
        for _ in range(500):  # connections that never even say hello
            s = socket.create_connection((host, int(port)))
            idle.append(s)
        ctx = ssl.create_default_context(cafile=str(daemon.root))
        for _ in range(500):  # TLS up, keep-alive, silent
            _, w = await asyncio.open_connection(host, int(port), ssl=ctx)
            slow.append(w)
        for _ in range(50):  # slowloris: TLS up, then half a request, then silence
            _, w = await asyncio.open_connection(host, int(port), ssl=ctx)
            w.write(b"POST /v1/x509/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            await w.drain()
            slow.append(w)
        # With 1,050 connections held open, others are still served, whichever
        # worker they reach.
        for _ in range(8):
            status, _, body = await asyncio.wait_for(
                http("GET", f"{daemon.url}/v1/whoami", daemon.admin_ssl()), 30)
            assert status == 200 and json.loads(body)["role"] == "admin"
    finally:
        for s in idle:
            s.close()
        for w in slow:
            w.close()


async def test_bad_token_attempts_are_rate_limited(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        statuses = []
        for i in range(25):
            status, ctype, _ = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                          body={"csr": "x"},
                                          headers={"Authorization": f"Bearer forged-{i}"})
            assert ctype == "application/problem+json"
            statuses.append(status)
        assert statuses == [401] * 20 + [429] * 5
        # The limit is the client's (whichever worker its connections reach), not
        # everyone's: another address is still heard, and told its token is bad.
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=conn) as s, s.post(
                f"{d.url}/v1/x509/enroll", json={"csr": "x"}, ssl=d.ssl(),
                headers={"Authorization": "Bearer forged-other"}) as r:
            assert r.status == 401 and json.loads(await r.read())["type"].endswith("bad-token")
        # And a valid token is never refused for others' failures, not even from the
        # address that failed (behind a NAT, that is everyone).
        cert, _key = enroll(d, tmp_path, "service", ["valid.internal.example"])
        assert cx.load_pem_x509_certificate(cert.read_bytes()).subject.rfc4514_string() == (
            "CN=valid.internal.example")
    finally:
        assert d.stop() == 0


async def test_tls_below_1_2_refused(daemon: Daemon) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(daemon.root)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1  # deprecated: that is the point
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    host, port = daemon.url.removeprefix("https://").rsplit(":", 1)

    def handshake(c: ssl.SSLContext) -> str | None:
        with c.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                           server_hostname=host) as s:
            return s.version()

    with pytest.raises(ssl.SSLError) as refused:
        await asyncio.to_thread(handshake, ctx)
    # The hello went out and the server ended the handshake (a client that could not
    # even offer TLS 1.1 would say NO_PROTOCOLS_AVAILABLE instead).
    assert refused.value.reason in ("UNEXPECTED_EOF_WHILE_READING",
                                    "TLSV1_ALERT_PROTOCOL_VERSION"), refused.value
    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                          (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        ok = ssl.create_default_context(cafile=str(daemon.root))
        ok.maximum_version = version
        assert await asyncio.to_thread(handshake, ok) == name
    modern = ssl.create_default_context(cafile=str(daemon.root))
    assert await asyncio.to_thread(handshake, modern) == "TLSv1.3"  # preferred


async def test_sigterm_under_load_stops_cleanly_and_the_log_verifies(tmp_path: Path) -> None:
    """In-flight signatures (and a checkpoint) finish and get their outcome lines."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    cert, key = enroll(d, tmp_path, "service", [LOAD_NAME])
    ctx = d.ssl(cert, key)
    received: list[bytes] = []
    refused: list[tuple[int, bytes]] = []  # any answer but 201: there must be none
    ended: list[bool] = []  # per client: did its run end after the SIGTERM?
    started = asyncio.Event()
    stopping = asyncio.Event()

    async def renew_forever(s: aiohttp.ClientSession) -> None:
        while True:
            try:
                async with s.post(f"{d.url}/v1/x509/renew", json={}, ssl=ctx) as r:
                    body = await r.read()
                    if r.status != 201:
                        refused.append((r.status, body[:300]))
                        continue
                    received.append(body)
                    if len(received) >= 50:
                        started.set()
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                ended.append(stopping.is_set())
                return

    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(renew_forever(s)) for _ in range(32)]
        await asyncio.wait_for(started.wait(), 120)
        d.proc.send_signal(signal.SIGTERM)
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert d.proc.wait(timeout=60) == 0
    # Requests under way at the SIGTERM were answered, never refused; a client's run
    # ended only once the daemon stopped taking connections.
    # (With the daemon's error lines, should one be refused: a 500 names only its
    # request id, and the traceback is in the daemon's log.)
    assert not refused, (refused, [line for line in d.stderr
                                   if '"error"' in line or "Traceback" in line][:10])
    assert ended == [True] * 32, ended
    fingerprints = {e.get("fingerprint") for e in log_lines(ca.state)
                    if e.get("phase") == "outcome" and e.get("result") == "ok"}
    for body in received:  # everything a client got is recorded as signed
        c = cx.load_pem_x509_certificate(json.loads(body)["certificate"].encode())
        assert c.fingerprint(hashes.SHA256()).hex() in fingerprints
    lines = log_lines(ca.state)
    assert [e["event"] for e in lines][-4:] == ["daemon.stop", "hsm.sign", "hsm.sign",
                                               "hsm.logout"]
    audit_verify(ca.state, ok=True)  # no intent left open, though nothing restarted


_SWAP_PUBLIC_SCRIPT = '''
import sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

module, token_label, pin_file, label = sys.argv[1:]
token = pkcs11.lib(module).get_token(token_label=token_label)
with token.open(rw=True, user_pin=open(pin_file).read().strip()) as session:
    [public] = session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                    Attribute.LABEL: label})
    public.destroy()
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.X962, PublicFormat.UncompressedPoint)
    session.create_object({
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC,
        Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: label.encode(),
        Attribute.VERIFY: True,
        Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1"),
        Attribute.EC_POINT: bytes([0x04, len(point)]) + point})
'''


async def test_a_signature_the_hsm_gets_wrong_is_never_released(tmp_path: Path) -> None:
    """A faulty HSM, as the real daemon meets it: the token's public object for the SSH
    user CA is not the public half of its private key (swapped in the token before
    the daemon starts; nothing checks that key against a file), so every SSH user
    signature it makes fails the HSM layer's check. The client gets a 500 and no
    certificate, the audit log says SignatureCheckFailed, the inventory has nothing,
    the HSM's C_Sign count moved and no signature counted; X.509 still works."""
    ca = init_ca(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _SWAP_PUBLIC_SCRIPT, ca.token.module,
                           ca.token.label, ca.token.pin_file, "ssh-user-ca"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    d = start_daemon(ca.state)
    try:
        cert, key = enroll(d, tmp_path, "user", ["eve@example.com"], ["eve"])
        ctx = d.ssl(cert, key)
        before = await signing_metrics(d)
        user_key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        status, ctype, body = await http("POST", f"{d.url}/v1/ssh/user", ctx,
                                         body={"public_key": user_key})
        assert (status, ctype) == (500, "application/problem+json"), body
        assert json.loads(body)["type"].endswith("/internal") and b"ssh-" not in body
        after = await signing_metrics(d)
        # The control: the daemon's other keys still sign, and what they sign verifies.
        status, _, body = await http("POST", f"{d.url}/v1/x509/renew", ctx, body={})
        assert status == 201, body
        issuing = cx.load_pem_x509_certificate((ca.state / "x509/issuing.pem").read_bytes())
        cx.load_pem_x509_certificate(json.loads(body)["certificate"].encode()
                                     ).verify_directly_issued_by(issuing)
    finally:
        assert d.stop() == 0
    # (Not the daemon's whole signature count: the primary's OCSP responses and
    # checkpoints move it whenever they are due, which made this flaky under load.)
    calls = ("hsmca_hsm_sign_calls_total", ())
    ok = ("hsmca_issued_total", (("kind", "ssh-user"), ("result", "ok")))
    assert after[calls] - before[calls] >= 1 and after.get(ok, 0) == before.get(ok, 0), (
        before, after)
    failed = ("hsmca_issued_total", (("kind", "ssh-user"), ("result", "SignatureCheckFailed")))
    assert after.get(failed, 0) - before.get(failed, 0) == 1, after
    lines = log_lines(ca.state)
    [intent] = [e for e in lines if e.get("phase") == "intent" and e.get("purpose") == "ssh-user"]
    [outcome] = [e for e in lines if e.get("phase") == "outcome"
                 and e["op_id"] == intent["op_id"]]
    assert outcome["result"] == "SignatureCheckFailed"
    assert "digest" not in outcome and "signature_digest" not in outcome
    with sqlite3.connect(ca.state / "hsmca.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM ssh_certs").fetchone() == (0,)
    audit_verify(ca.state, ok=True)  # a failed signature is a closed one


async def test_an_audit_log_moved_while_idle_is_said_without_waiting_for_a_write(
        tmp_path: Path) -> None:
    """A recovery trial moved the log aside while nothing was being signed: /health
    said ok until a request failed, and the daemon's log said nothing at all. The file
    is watched between writes now: /health and the log say so within a second or two,
    and say it again when it is back."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    log_file = ca.state / "audit/log.jsonl"
    aside = log_file.with_name("moved-away.jsonl")

    def said(event: str) -> list[dict[str, Any]]:
        return [e for e in (json.loads(x) for x in d.stderr if x.startswith("{"))
                if e.get("event") == event]
    try:
        await health_until(d, lambda s: s["code"] == 200)
        log_file.rename(aside)
        try:
            state = await health_until(d, lambda s: s["code"] == 503)
            assert "was moved or deleted while hsmca ran; put it back" in state["audit"]
            assert d.wait_stderr(lambda: bool(said(
                "the audit log cannot be written: nothing is signed until it can")), 10)
        finally:
            aside.rename(log_file)
        await health_until(d, lambda s: s["code"] == 200)
        assert d.wait_stderr(lambda: bool(said("the audit log can be written again")), 10)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)
