"""What the operator reads: one line per issuance, why a token or a TLS handshake was
refused (without the secret), and the metric that counts refused handshakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca.logs import Recurring
from tests.conftest import Daemon, init_ca, start_daemon
from tests.helpers import (
    audit_verify,
    bootstrap_token,
    cert_serial,
    csr_pem,
    enroll,
    http,
    log_lines,
    other_ca,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ca = init_ca(tmp_path_factory.mktemp("oplogs"))
    d = start_daemon(ca.state)
    yield d
    assert d.stop() == 0


def events(d: Daemon, name: str) -> list[dict[str, Any]]:
    out = []
    for line in list(d.stderr):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("event") == name:
            out.append(obj)
    return out


async def said(d: Daemon, name: str, match: Any, within: float = 10.0) -> list[dict[str, Any]]:
    """The daemon's log lines `name` that `match`, once one has arrived (or none, after
    `within` seconds): the stderr reader wakes the wait at every line."""
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        found[:] = [e for e in events(d, name) if match(e)]
        return bool(found)

    await asyncio.to_thread(d.wait_stderr, arrived, within)
    return found


def refused_handshake(d: Daemon, cert: Path, key: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(d.root))
    ctx.load_cert_chain(cert, key)
    try:
        urllib.request.urlopen(f"{d.url}/v1/whoami", context=ctx, timeout=30).read()
    except (urllib.error.URLError, ConnectionError, ssl.SSLError) as exc:
        return type(exc).__name__
    return "accepted"


def audit_line(d: Daemon, seq: int) -> bytes:
    return (d.state / "audit/log.jsonl").read_bytes().splitlines()[seq]


async def test_each_issuance_is_one_line_with_the_audit_seq(served: Daemon,
                                                            tmp_path: Path) -> None:
    cert, _ = enroll(served, tmp_path, "service", ["logged.internal.example"])
    [line] = await said(served, "issued",
                        lambda e: e.get("names") == ["logged.internal.example"])
    assert line["kind"] == "x509" and line["role"] == "service"
    assert line["serial"] == cert_serial(cert)
    assert line["actor"].startswith("bootstrap-token:") and isinstance(line["audit_seq"], int)
    # The intent's seq, as the inventory and the web view give it: the line that names
    # the serial and the request (the outcome's, given before, names neither: an SRE
    # trial grepped the log for it and found only an op_id).
    intent = json.loads(audit_line(served, line["audit_seq"]))
    assert (intent["phase"], intent["serial"], intent["request_id"]) == (
        "intent", line["serial"], line["request_id"]), intent
    status, _, raw = await http("GET", f"{served.url}/v1/inventory/certificates/"
                                f"{line['serial']}", served.admin_ssl())
    assert status == 200 and json.loads(raw)["audit_seq"] == line["audit_seq"], raw
    # A revocation's line gives its cert.revoke line's seq too (it gave none).
    status, _, raw = await http("POST", f"{served.url}/v1/x509/revoke", served.admin_ssl(),
                                body={"serial": line["serial"]})
    assert status == 200, raw
    [revoked] = await said(served, "revoked", lambda e: e.get("serials") == [line["serial"]])
    assert json.loads(audit_line(served, revoked["audit_seq"]))["event"] == "cert.revoke"


async def test_a_refused_token_says_why_and_never_shows_the_secret(served: Daemon) -> None:
    token = await bootstrap_token(served, "service", ["once.internal.example"])
    for _ in range(2):  # the second use is refused as used
        await http("POST", f"{served.url}/v1/x509/enroll", served.ssl(),
                   body={"csr": csr_pem(["once.internal.example"])},
                   headers={"Authorization": f"Bearer {token}"})
    await http("POST", f"{served.url}/v1/x509/enroll", served.ssl(), body={"csr": "x"},
               headers={"Authorization": "Bearer hsmca-not-a-token"})
    # A real token used twice was copied or raced: a warning with its id (a client
    # trial saw only an info line without it); a guess stays an info line.
    used = await said(served, "bootstrap token refused", lambda e: e["reason"] == "used"
                      and e.get("token_id") == token.split("-")[1])
    assert used and used[0]["level"] == "warning", used
    guesses = await said(served, "bootstrap token refused",
                         lambda e: e["reason"] == "unknown")
    assert guesses and all(e["level"] == "info" and "token_id" not in e for e in guesses)
    assert not any(token in line for line in served.stderr)
    # The request's own line says from where.
    assert await said(served, "request refused", lambda e: e["route"] == "/v1/x509/enroll"
                      and e.get("client") == "127.0.0.1" and e["status"] == 401)


async def test_a_refused_request_is_logged_with_what_its_client_was_told(
        served: Daemon) -> None:
    """An ACME trial: refused requests were logged with their status alone, while
    the reason was only in the client's own log (and some clients show none)."""
    status, _, body = await http("POST", f"{served.url}/v1/x509/renew", served.ssl(), body={})
    assert status == 403
    told = json.loads(body)
    found = await said(served, "request refused", lambda e: e["route"] == "/v1/x509/renew"
                       and e.get("type") == told["type"])
    assert found and found[-1]["detail"] == told["detail"] and found[-1]["status"] == 403


def _send_raw(d: Daemon, request: bytes) -> bytes:
    """One request as bytes over TLS, whatever they are; the answer until close."""
    import socket
    host, port = d.url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(d.root))
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


async def test_a_request_that_is_not_http_is_one_json_line_without_its_bytes(
        served: Daemon) -> None:
    """aiohttp's parser quotes the offending bytes in its error: an oversized
    Authorization header's would reach the log, as a bare traceback, and the client's
    text/plain answer. It is one JSON line with the error's type instead, the answer a
    problem saying what is wrong, and the daemon serves on."""
    secret = "hsmca-0123-mistakenly-pasted-twice"
    before = len(served.stderr)
    answer = await asyncio.to_thread(
        _send_raw, served, b"GET /health HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
        b"Bearer " + secret.encode() + b"x" * 9000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), head
    assert json.loads(body)["detail"] == (
        "a request line or header line is longer than 8 KiB; nothing was done")
    assert secret.encode() not in answer
    [line] = await said(served, "refused a request that is not valid HTTP",
                        lambda e: e.get("error") == "LineTooLong")
    assert line["status"] == 400 and line["peer"] == "127.0.0.1"
    new = served.stderr[before:]
    assert not any(secret in text for text in new), new
    assert all(json.loads(text) for text in new)  # JSON lines only, no bare traceback
    status, _, _ = await http("GET", f"{served.url}/health", served.ssl())
    assert status == 200
    # A client speaking something else than HTTP inside the TLS connection:
    answer = await asyncio.to_thread(_send_raw, served, b"\x16\x03\x01\x02\x00 / HTTP/1.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") or head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["detail"].startswith("the request method is not valid HTTP")


async def test_requests_that_are_not_http_are_logged_at_a_bounded_rate(served: Daemon) -> None:
    """A soak trial: every request that is not valid HTTP was one warning line, where
    every other refusal anyone can cause is bounded. At most 10 lines a worker per 10 s
    now, and the rest said as a count."""
    from tests.helpers import log_lines
    workers = [e["workers"] for e in log_lines(served.state) if e["event"] == "daemon.start"]
    before = len(served.stderr)
    sent = 10 * workers[-1] + 20  # more than every worker may log one by one
    for _ in range(sent):
        await asyncio.to_thread(_send_raw, served, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                b"X-Long: " + b"x" * 9000 + b"\r\n\r\n")

    def seen() -> tuple[int, int]:
        lines = [json.loads(x) for x in served.stderr[before:]]
        logged = sum(1 for e in lines if e.get("event") == "refused a request that is not "
                     "valid HTTP" and e.get("error") == "LineTooLong")
        counted = sum(e["unlogged"] for e in lines if e.get("event") == "requests that are "
                      "not valid HTTP, not logged one by one")
        carried = sum(e.get("unlogged_before", 0) for e in lines  # a window closed meanwhile
                      if e.get("event") == "refused a request that is not valid HTTP")
        return logged, counted + carried
    # Every one accounted for, as a line or in a count (said once the 10 s are over)
    assert served.wait_stderr(lambda: sum(seen()) == sent, within=60), seen()
    logged, _ = seen()
    assert 1 <= logged <= 10 * workers[-1], (logged, workers)


async def test_an_expired_token_is_refused_as_expired(served: Daemon) -> None:
    """A token made yesterday for an hour, as the inventory would hold it (written there
    directly: the API makes no token that is born expired, and waiting for one to
    expire would be a sleep)."""
    from ca.store import NewToken
    from ca.store.sqlite import SQLiteStore
    secret = "hsmca-0123456789abcdef-yesterdays-token-with-a-one-hour-ttl"
    made = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    store = SQLiteStore(served.state / "hsmca.sqlite3")
    try:
        await store.add_token(NewToken(
            "0123456789abcdef", hashlib.sha256(secret.encode()).hexdigest(), "service",
            (("dns", "late.internal.example"),), (),
            (made + dt.timedelta(hours=1)).isoformat(), made.isoformat(), "admin"))
    finally:
        store.close()
    status, ctype, raw = await http("POST", f"{served.url}/v1/x509/enroll", served.ssl(),
                                    body={"csr": csr_pem(["late.internal.example"])},
                                    headers={"Authorization": f"Bearer {secret}"})
    problem = json.loads(raw)
    assert (status, ctype) == (401, "application/problem+json"), raw
    assert "expired" in problem["detail"], problem
    assert await said(served, "bootstrap token refused", lambda e: e["reason"] == "expired")
    assert not any(secret in line for line in served.stderr)


async def test_refused_tls_handshakes_are_logged_with_the_reason(served: Daemon,
                                                                 tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    foreign = other_ca(tmp_path).leaf(tmp_path, "f.example", now - dt.timedelta(hours=1),
                                      now + dt.timedelta(hours=1))
    assert refused_handshake(served, *foreign) != "accepted"
    # The worker writes the line before it drops the connection; the test's reader of
    # the daemon's stderr is a thread of its own, so the line is awaited, not assumed.
    reasons = await said(served, "refused a TLS handshake",
                         lambda e: "unable to get local issuer certificate" in e["reason"])
    assert reasons, [e["reason"] for e in events(served, "refused a TLS handshake")]
    # and which client it was: the alert the docs advise fires, and the on-call must
    # find the host that presents another CA's certificate (an SRE trial).
    assert {e.get("client") for e in events(served, "refused a TLS handshake")} == \
        {"127.0.0.1"}, events(served, "refused a TLS handshake")
    # A client retrying in a loop is one line per worker and 10 s, and the rest are
    # counted: every refusal is accounted for once its interval is over.
    for _ in range(5):
        assert refused_handshake(served, *foreign) != "accepted"

    def accounted() -> int:
        foreign_ca = "unable to get local issuer certificate"
        return sum(e["refused_since_last_line"] for e in events(
            served, "refused a TLS handshake") if foreign_ca in e["reason"]) + sum(
            e["refused_since_last_line"] for e in events(
                served, "refused TLS handshakes not logged one by one")
            if foreign_ca in e["reason"])
    assert await asyncio.to_thread(served.wait_stderr, lambda: accounted() == 6, 30), \
        accounted()
    # The control: our own certificate on the same request is accepted.
    assert refused_handshake(served, *enroll(served, tmp_path, "service",
                                             ["ok.internal.example"])) == "accepted"
    status, _, raw = await http("GET", f"{served.url}/metrics", served.ssl())
    assert status == 200
    assert b'hsmca_tls_handshakes_refused_total{reason="client-certificate"} 6.0' in raw, raw


async def test_a_torn_line_repaired_at_start_is_said_on_stderr(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    with open(ca.state / "audit/log.jsonl", "ab") as fh:
        fh.write(b'{"event":"hsm.sign","phase":"int')  # a crash mid-write
    d = start_daemon(ca.state)
    try:
        said = [json.loads(line) for line in d.stderr if "torn final line" in line]
        assert said and said[0]["cut_bytes"] == len(b'{"event":"hsm.sign","phase":"int')
        audit = (ca.state / "audit/log.jsonl").read_bytes().splitlines()
        assert json.loads(audit[said[0]["recorded_at_seq"]])["event"] == "log.recover"
    finally:
        assert d.stop() == 0


async def test_a_stop_says_each_step_in_order(tmp_path: Path) -> None:
    """SIGTERM: the operator sees the workers finish, the last checkpoints, then the
    end, in that order, and the log the daemon leaves verifies."""
    d = start_daemon(init_ca(tmp_path).state)
    enroll(d, tmp_path, "service", ["stop.internal.example"])
    assert d.stop() == 0
    assert await said(d, "stopped", lambda e: True)
    steps = [e["event"] for e in (json.loads(line) for line in list(d.stderr)
                                  if line.startswith("{"))
             if e["event"].startswith("stop")]
    assert steps == ["stopping: the workers finish their requests",
                     "stopping: the last checkpoints", "stopped"]
    audit_verify(d.state, ok=True)


async def test_log_level_warning_leaves_out_the_lines_of_every_request(
        tmp_path: Path) -> None:
    """`[server] log-level = "warning"`: a load balancer's probes and every
    certificate issued no longer fill the log (an operator's trial), in the workers as
    in the primary, and warnings are still said."""
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    text = config.read_text()
    assert 'log-level = "info"' in text  # init writes the default, for operators to see
    config.write_text(text.replace('log-level = "info"', 'log-level = "warning"'))
    d = start_daemon(ca.state)
    try:
        enroll(d, tmp_path, "service", ["quiet.internal.example"])  # an info line
        token = await bootstrap_token(d, "service", ["quiet2.internal.example"])
        for _ in range(2):  # used twice: a warning, and a refused request (info)
            await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                       body={"csr": csr_pem(["quiet2.internal.example"])},
                       headers={"Authorization": f"Bearer {token}"})
    finally:
        assert d.stop() == 0
    assert d.stderr_ended.wait(30)
    lines = [json.loads(line) for line in d.stderr if line.startswith("{")]
    assert [e["reason"] for e in lines if e["event"] == "bootstrap token refused"] == ["used"]
    assert {e["level"] for e in lines} <= {"warning", "error"}, lines


async def test_a_key_the_ca_never_had_in_keys_is_named_at_start(tmp_path: Path) -> None:
    """After the first start the inventory says which keys are in use (a rotation
    changes them there, not in the config), so [keys] is not what signs: a label in it
    the CA never had (a typo, another CA's config) is named at start, and the CA goes
    on with its own keys."""
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    d = start_daemon(ca.state)  # the first start records the keys
    assert d.stop() == 0
    text = config.read_text()
    assert "object=issuing-ca;" in text
    config.write_text(text.replace("object=issuing-ca;", "object=no-such-key;"))
    d = start_daemon(ca.state)
    try:
        [line] = await said(d, "the config's [keys] names a key this CA does not have; the "
                               "keys in use are the inventory's (hsmca key list), so it is "
                               "ignored", lambda e: True)
        assert (line["purpose"], line["label"]) == ("issuing", "no-such-key")
        cert, _ = await asyncio.to_thread(enroll, d, tmp_path, "service", ["keys.test"])
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        own = x509.load_pem_x509_certificate((ca.state / "x509/issuing.pem").read_bytes())
        leaf.verify_directly_issued_by(own)  # by the CA's own issuing key
    finally:
        assert d.stop() == 0


async def test_a_key_in_the_token_the_ca_does_not_know_is_named_at_start(
        tmp_path: Path) -> None:
    """A rotation killed between its key generation and its inventory row leaves a key
    in the token that hsmca neither uses nor can retire: the start names it (made here
    by the HSM's own tool, as that crash would leave it)."""
    import subprocess

    from tests.conftest import require
    ca = init_ca(tmp_path)
    t = ca.token
    def tool(*args: str) -> None:
        subprocess.run([require("pkcs11-tool"), "--module", t.module, "--token-label",
                        t.label, "--login", "--pin", t.pin_file.read_text().strip(), *args],
                       capture_output=True, check=True)
    for label in ("issuing-ca-orphan", "root-ca-20261204230519-5faa",
                  "ssh-user-ca-20261207090444-c46f"):
        tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", label)
    # A crash trial's kill during a rotation's key generation left the public half alone.
    tool("--delete-object", "--type", "privkey", "--label", "ssh-user-ca-20261207090444-c46f")
    d = start_daemon(ca.state)
    try:
        found = await said(d, "the token holds a public key with no private key, which this "
                              "CA's inventory does not know: a key generation cut short (a "
                              "rotation killed while it made its key), or another "
                              "application's public key. hsmca never uses it; remove it "
                              "with the HSM's own tools (pkcs11-tool --delete-object --type "
                              "pubkey --label LABEL) once you are sure whose it is",
                           lambda e: True)
        assert [e["label"] for e in found] == ["ssh-user-ca-20261207090444-c46f"], found
        found = await said(d, "the token holds a private key this CA does not know (another "
                              "application's key, or one of hsmca's cut short); hsmca never "
                              "uses it, and it can be removed with the HSM's own tools once "
                              "you are sure whose it is", lambda e: True)
        assert [e["label"] for e in found] == ["issuing-ca-orphan"], found
        # Labelled as a rotation labels keys, it may be the CA's current root, and the
        # inventory a restored backup from before the rotation (a recovery trial was
        # invited to remove such a key): the start says so, and never to remove it.
        found = await said(d, "the token holds a key that an hsmca rotation made and this "
                              "CA's inventory does not know: a rotation cut short after its "
                              "hsm.keygen line, or an inventory restored from a backup older "
                              "than that rotation (then this key may be the CA's current "
                              "one, and certificates in use chain to it: restore the newest "
                              "backup, and never destroy the key before you know which)",
                           lambda e: True)
        assert [e["label"] for e in found] == ["root-ca-20261204230519-5faa"], found
    finally:
        assert d.stop() == 0


async def test_a_flood_of_bad_requests_does_not_flood_the_log(served: Daemon) -> None:
    """Anyone can send thousands of bad requests: each is counted, and the log says
    how many went unlogged instead of growing with them."""
    import aiohttp

    def lines(status: int) -> int:
        return sum(1 for e in events(served, "request refused") if e["status"] == status)

    def unlogged(status: int) -> int:
        return sum(e["unlogged"] for e in events(
            served, "requests refused and not logged one by one") if e["status"] == status)

    before = lines(404), unlogged(404)
    async with aiohttp.ClientSession() as session:
        async def ask() -> None:
            async with session.get(f"{served.url}/no/such/page", ssl=served.ssl()) as r:
                assert r.status == 404
        for _ in range(30):
            await asyncio.gather(*(ask() for _ in range(10)))  # 300 in all
    # At most a burst of 50 per worker and interval were logged one by one (each line
    # is written before its answer goes)...
    workers = events(served, "listening")[0]["workers"]
    assert lines(404) - before[0] <= workers * 50 + 2, (lines(404) - before[0], workers)

    def accounted() -> int:
        return lines(404) - before[0] + unlogged(404) - before[1]

    # ... and the rest are counted: once its interval is over, each worker says how
    # many it left out, though no request came after the flood to carry the line.
    assert await asyncio.to_thread(served.wait_stderr, lambda: accounted() >= 300, 30), \
        accounted()
    # Two workers logged at once on the one stderr, and every line is whole.
    torn = [line for line in served.stderr if not line.startswith("{")
            or not line.endswith("}\n")]
    assert not torn, torn[:5]
    summary = [e for e in events(served, "requests refused and not logged one by one")
               if e["status"] == 404]
    assert summary[-1]["unlogged"] > 0 and summary[-1]["burst"] == 50
    _, _, raw = await http("GET", f"{served.url}/metrics", served.ssl())
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in raw.decode().splitlines()
                  if line.startswith("hsmca_http_requests_total{") and 'status="404"' in line)
    assert counted >= 300  # every one counted


async def test_a_flood_of_token_guesses_does_not_flood_the_log(served: Daemon) -> None:
    """Each guessed bootstrap token used to be its own log line, 429 or not (600 lines
    a second from one connection): now a burst per reason and interval, and the rest
    counted in the line that follows the interval."""
    import aiohttp

    def lines() -> int:
        return sum(1 for e in events(served, "bootstrap token refused")
                   if e["reason"] == "unknown")

    def unlogged() -> int:
        return sum(e["unlogged"] for e in events(
            served, "bootstrap tokens refused and not logged one by one")
            if e["reason"] == "unknown")

    before = lines(), unlogged()
    statuses: set[int] = set()
    waits: set[str] = set()
    began = asyncio.get_running_loop().time()
    async with aiohttp.ClientSession() as session:
        async def guess() -> None:
            async with session.post(f"{served.url}/v1/x509/enroll", ssl=served.ssl(),
                                    json={"csr": "x"},
                                    headers={"Authorization": "Bearer hsmca-guess"}) as r:
                statuses.add(r.status)
                if r.status == 429:  # the wait said to clients, not only in prose
                    waits.add(r.headers.get("Retry-After", "none"))
        for _ in range(20):
            await asyncio.gather(*(guess() for _ in range(10)))  # 200 in all
    assert statuses <= {401, 429} and 429 in statuses, statuses
    assert waits and all(w.isdigit() and int(w) > 0 for w in waits), waits
    # A burst of 20 per worker and 10 s window (as many windows as the flood spanned, on
    # a slow machine more than one)...
    windows = int((asyncio.get_running_loop().time() - began) // 10) + 2
    workers = events(served, "listening")[0]["workers"]
    assert lines() - before[0] <= workers * 20 * windows, (lines() - before[0], workers)

    def accounted() -> int:
        return lines() - before[0] + unlogged() - before[1]

    # ... and the rest counted in the lines that end each window.
    assert await asyncio.to_thread(served.wait_stderr, lambda: accounted() >= 200, 30), \
        accounted()


async def test_what_libraries_log_is_json_lines_too() -> None:
    """psycopg's pool and other libraries log through the standard `logging`: their
    records, a level of their own and one that does not format included, come out as
    the daemon's own JSON lines, and no library call fails because of them."""
    import subprocess
    import sys
    code = ("import logging\nfrom ca.logs import configure\nconfigure()\n"
            "logging.getLogger('lib').log(35, 'custom level %s', 'x')\n"
            "logging.getLogger('lib').warning('bad args %s %s', 'one')\n"
            "logging.getLogger('lib').error('two\\nlines')\n"
            "logging.getLogger('psycopg.pool').warning('error connecting in pool')\n"
            "import warnings\nwarnings.warn('a CN over 64 characters')\n"
            "print('alive')\n")
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=60, env={"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.stdout == "alive\n", proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(e["event"], e["level"]) for e in lines] == [
        ("custom level x", "warning"), ("a library's log record did not format", "warning"),
        ("two\nlines", "error"), ("a CN over 64 characters", "warning")], lines
    # a Python warning (any ACME client can cause cryptography's) is a line like others
    assert lines[-1]["category"] == "UserWarning" and lines[-1]["at"] == "<string>:9"


async def test_a_failure_met_at_every_round_is_said_when_it_begins_changes_and_ends() -> None:
    said: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def warning(self, event: str, **fields: Any) -> None:
            said.append((event, fields))

        def info(self, event: str, **fields: Any) -> None:
            said.append((event, fields))

    failing = Recurring(Log(), "it failed", "it works again", repeat_s=600)
    for _ in range(30):  # a round a second for half a minute
        failing.failed("No space left on device", certificates=10)
    failing.failed("HSM unavailable")
    failing.failed("No space left on device", certificates=10)  # alternating: said before
    failing.ok()
    failing.ok()
    assert said == [("it failed", {"error": "No space left on device", "certificates": 10}),
                    ("it failed", {"error": "HSM unavailable", "failed_since_last_said": 29}),
                    ("it works again", {"after": ["HSM unavailable",
                                                  "No space left on device"]})]


async def test_a_daemon_whose_log_reader_went_away_serves_on_and_stops_cleanly(
        tmp_path: Path) -> None:
    """A cluster trial: `hsmca serve ... 2>&1 | head -3` (or a log shipper restarted)
    took the daemon down at its next log line, a BrokenPipeError: exit 1, no daemon.stop,
    no final checkpoint, its last lines covered by none. Lines that cannot be written are
    dropped; it serves on, and stops as ever."""
    import signal
    import subprocess

    from tests.conftest import HSMCA
    ca = init_ca(tmp_path)
    proc = subprocess.Popen([*HSMCA, "serve", "--config", str(ca.state / "hsmca.toml"),
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on "), first
        url = first.split()[-1]
        proc.stderr.close()  # the reader goes away
        ctx = ssl.create_default_context(cafile=str(ca.state / "x509" / "root.pem"))
        for _ in range(20):  # each a "request refused" line, and the daemon's own lines
            try:
                urllib.request.urlopen(f"{url}/v1/nothing-here", context=ctx, timeout=30)
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
        with urllib.request.urlopen(f"{url}/health", context=ctx, timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [e["event"] for e in log_lines(ca.state)]
    assert "daemon.stop" in events[-8:], events[-8:]
    audit_verify(ca.state, ok=True)


async def test_a_log_line_stderr_could_not_take_for_a_moment_is_dropped_alone() -> None:
    """A review: any write error (a full disk under a stderr sent to a file, a pipe
    full for a moment) sent every later line to /dev/null, the disk's own warnings
    too. Only a reader gone (EPIPE) is for good; otherwise that line alone is lost."""
    import errno
    import io

    from ca.logs import _LogStream

    class Full(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.refusals = [OSError(errno.ENOSPC, "No space left on device")]

        def write(self, text: str) -> int:
            if self.refusals:
                raise self.refusals.pop()
            return super().write(text)

    kept = Full()
    stream = _LogStream(kept)  # type: ignore[arg-type]
    assert stream.write("lost\n") == 5
    stream.write("said\n")
    stream.flush()
    assert kept.getvalue() == "said\n"
