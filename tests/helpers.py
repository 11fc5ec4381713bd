"""What the tests share: HTTP calls as a client makes them, bootstrap tokens (by the API
and in files, the way the docs hand them over), enrollment, the audit log (its lines,
`hsmca audit verify`, a forger's re-chaining), a second CA made in software, and
waiting on a long-running command's JSON log lines (events, not sleeps)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from ca.audit.line import canonical
from ca.client import make_csr
from tests.conftest import HSMCA, Daemon, hsmca, require


async def http(method: str, url: str, ctx: Any, *, body: Any = None, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s, s.request(
            method, url, json=body, data=data, headers=headers, ssl=ctx) as r:
        return r.status, r.content_type, await r.read()


async def bootstrap_token(d: Daemon, role: str, names: list[str], principals: list[str] = (),
                    ttl: str = "15m") -> str:
    body: dict[str, Any] = {"role": role, "names": names, "ttl": ttl}
    if principals:
        body["principals"] = list(principals)
    status, _, raw = await http("POST", f"{d.url}/v1/tokens", d.admin_ssl(), body=body)
    assert status == 201, raw
    return json.loads(raw)["token"]


def csr_pem(names: list[str], key: Any = None, **kw: Any) -> str:
    return make_csr(names, key or ec.generate_private_key(ec.SECP256R1()))


async def health_until(d: Daemon, test: Callable[[dict[str, Any]], bool],
                       within: float = 60) -> dict[str, Any]:
    """GET /health until `test` holds for its body (with "code", the status), within
    `within` seconds: what the daemon's background work changes shows there."""
    deadline = asyncio.get_running_loop().time() + within
    while True:  # paced by the round trips
        status, _, body = await http("GET", f"{d.url}/health", d.ssl())
        found = {**json.loads(body), "code": status}
        if test(found):
            return found
        assert asyncio.get_running_loop().time() < deadline, found


def openssl_verify(d: Daemon, cert: Path) -> None:
    proc = subprocess.run([require("openssl"), "verify", "-CAfile", d.root, "-untrusted",
                           d.state / "x509" / "issuing.pem", cert], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and ": OK" in proc.stdout, proc.stdout + proc.stderr


def token_file(d: Daemon, tmp: Path, role: str, names: list[str],
               principals: list[str] = (), ttl: str = "15m") -> Path:  # type: ignore[assignment]
    """A one-time token from the admin CLI, in a 0600 file (how the docs hand it over)."""
    args = ["token", "create", "--config", d.state / "hsmca.toml", "--url", d.url,
            "--role", role, "--name", *names, "--ttl", ttl]
    if principals:
        args += ["--principal", *principals]
    return _secret_file(tmp, role, names, hsmca(*args).stdout.strip())


def _secret_file(tmp: Path, role: str, names: list[str], token: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", names[0])  # a name may hold '/' (<script>...)
    path = tmp / f"{role}-{safe}-{next(_n)}.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return path


_n = iter(range(1, 10**6))


def enroll(d: Daemon, tmp: Path, role: str, names: list[str], principals: list[str] = (),
           *extra: str) -> tuple[Path, Path]:  # type: ignore[assignment]
    """A client credential of `role` as a new machine or person gets one: a token from
    the admin (by the API: `token_file` tests the admin CLI), handed over in a file,
    then `hsmca enroll`. (cert.pem, key.pem)."""
    body = {"role": role, "names": names, "ttl": "15m"}
    if principals:
        body["principals"] = list(principals)
    request = urllib.request.Request(f"{d.url}/v1/tokens", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=d.admin_ssl(), timeout=60) as answer:
        assert answer.status == 201
        token = json.loads(answer.read())["token"]
    out = tmp / f"{role}-cred-{next(_n)}"
    hsmca("enroll", "--url", d.url, "--ca", d.root, "--token-file",
          _secret_file(tmp, role, names, token), "--name", *names, "--out", out, *extra)
    return out / "cert.pem", out / "key.pem"


def gone(pid: str, within_s: float = 30.0) -> bool:
    """Whether process `pid` has ended (gone, or a zombie) within `within_s`: a signal
    to its group is delivered when it next runs, on a loaded machine a moment later.
    Waited for on a pidfd, which becomes readable when the process ends."""
    try:
        fd = os.pidfd_open(int(pid))
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], within_s)[0])
    finally:
        os.close(fd)


# ---- the audit log ---------------------------------------------------------------------

def log_lines(state: Path) -> list[dict[str, Any]]:
    """The whole lines of a CA's audit log, parsed: a running daemon's batch that
    crosses a page shows page by page, so a read may end in part of a line."""
    return [json.loads(line) for line in whole_lines((state / "audit/log.jsonl").read_bytes())]


def whole_lines(data: bytes) -> list[bytes]:
    """`data`'s lines up to its last newline."""
    return data[:data.rfind(b"\n") + 1].splitlines()


def audit_verify(state: Path, *extra: str | Path, log: Path | None = None,
                 served: tuple[Daemon, tuple[Path, Path]] | None = None,
                 ok: bool = False) -> subprocess.CompletedProcess[str]:
    """`hsmca audit verify` with the audit key of the CA in `state`: offline on `log`
    (default: the CA's own log), or, with `served` (a daemon and a client credential
    of an auditor or admin), over the daemon's API. With `ok`, it must say OK."""
    key = state / "audit" / "audit_key.pem"
    if served is None:
        args: list[str | Path] = ["--log", log or state / "audit" / "log.jsonl"]
    else:
        d, (cert, cred_key) = served
        args = ["--url", d.url, "--ca", d.root, "--client-cert", cert, "--client-key", cred_key]
    proc = hsmca("audit", "verify", *args, "--key", key, *extra, check=False)
    if ok:
        assert proc.returncode == 0 and proc.stdout.startswith("OK:"), proc.stdout + proc.stderr
    return proc


def rechain(lines: list[bytes], start: int) -> list[bytes]:
    """The lines with the hash chain repaired from `start` on, each line that parses
    re-serialised canonically, as a careful forger would; a line that does not parse
    is left as it is (nothing can repair it)."""
    out = list(lines[:start])
    for line in lines[start:]:
        try:
            obj = json.loads(line)
            obj["prev"] = hashlib.sha256(out[-1]).hexdigest() if out else "0" * 64
            line = canonical(obj)
        except (ValueError, TypeError, KeyError):
            pass
        out.append(line)
    return out


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def tls_exchange(d: Daemon, ctx: ssl.SSLContext, method: str, path: str,
                 body: bytes = b"") -> tuple[int, bytes] | str:
    """One HTTP/1.1 request over TLS 1.2 on a connection of its own (blocking: run it
    in a thread): (status, body) of the answer, or, if the handshake failed, the
    reason OpenSSL gave the client. TLS 1.2, because there the server judges the
    client's certificate inside the handshake (TLS 1.3 finishes the client's side of
    the handshake first, and a refusal then looks like any closed connection)."""
    host, port = d.url.removeprefix("https://").rsplit(":", 1)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    request = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname=host)
        except ssl.SSLError as exc:
            return str(exc.reason)
        with s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data[:200]
    return int(head.split(b" ", 2)[1]), answer


def leaf_from_issuing_key(d: Daemon, tmp: Path, name: str, not_before: dt.datetime,
                          not_after: dt.datetime) -> tuple[Path, Path]:
    """A client certificate for `name` signed by the daemon's own issuing key (in the
    HSM) but never issued by it: nothing in its inventory or its audit log. Made by
    a process of its own (SoftHSM is safe across processes, never across threads of
    one), which records its signature in a scratch log. (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_path, cert_path = tmp / f"{name}.key", tmp / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    proc = subprocess.run([sys.executable, "-c", _LEAF_SCRIPT, d.state / "hsmca.toml", key_path,
                           cert_path, tmp / f"{name}-scratch.jsonl", name,
                           not_before.isoformat(), not_after.isoformat()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return cert_path, key_path


_LEAF_SCRIPT = """
import asyncio, datetime as dt, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from ca.issuance import profiles as prof
from ca.audit.log import AuditLog
from ca.config import load
from ca.issuance.pipeline import SigningPipeline

async def main():
    config, key_file, out, scratch, name, not_before, not_after = sys.argv[1:]
    cfg = load(Path(config))
    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), None)
    issuing = x509.load_pem_x509_certificate(cfg.issuing_pem.read_bytes())
    log = AuditLog.open(Path(scratch))
    w = SigningPipeline(cfg.hsm, log)
    w.start()
    ca_key = await w.load_key(cfg.key_label("issuing"))
    b = prof.leaf_builder(prof.LeafProfile(key.public_key(), name, [name]), issuing,
                          dt.datetime.fromisoformat(not_before),
                          dt.datetime.fromisoformat(not_after))
    cert = await w.sign(ca_key.label, lambda k: b.sign(k, hashes.SHA256()), purpose="x509",
                        actor="test")
    Path(out).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    w.close(); log.close()

asyncio.run(main())
"""


def cert_serial(path: Path) -> str:
    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


# ---- another CA, in software ---------------------------------------------------------

@dataclass
class OtherCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    root_pem: Path

    def leaf(self, tmp: Path, name: str, not_before: dt.datetime,
             not_after: dt.datetime) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


def other_ca(tmp: Path, cn: str = "Other Root CA") -> OtherCA:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    root = tmp / "other-root.pem"
    root.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return OtherCA(key, cert, root)


# ---- a long-running command and its log ------------------------------------------------

@dataclass
class Running:
    """A long-running hsmca command (renew --daemon, ssh host --renew). Its stderr is
    JSON lines; `wait` blocks until a line with the event arrives, with a deadline."""

    proc: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    ended: threading.Event = field(default_factory=threading.Event)  # its stderr is read

    @classmethod
    def start(cls, *args: str | Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, preexec_fn: Callable[[], None] | None = None
              ) -> Running:
        proc = subprocess.Popen([*HSMCA, *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                preexec_fn=preexec_fn)
        r = cls(proc)
        threading.Thread(target=r._drain, daemon=True).start()
        threading.Thread(target=r._drain_stdout, daemon=True).start()
        return r

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.raw.append(line)
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    self.lines.append(obj)
                self.cond.notify_all()
        self.ended.set()
        with self.cond:
            self.cond.notify_all()

    def exit_code(self, deadline_s: float = 60) -> int:
        """Its exit status once it has exited on its own and its last line is read."""
        code = self.proc.wait(timeout=deadline_s)
        assert self.ended.wait(deadline_s), "its stderr did not end"
        return code

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.stdout.append(line)
                self.cond.notify_all()

    def events(self, event: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.lines if e.get("event") == event]

    def listening_url(self, deadline_s: float = 60) -> str:
        """The URL a server command (`hsmca ui`) prints once it serves: its first line on
        stdout."""
        with self.cond:
            self.cond.wait_for(lambda: bool(self.stdout) or self.proc.poll() is not None,
                               timeout=deadline_s)
            if not self.stdout:
                raise AssertionError(f"{self.proc.args[len(HSMCA)]} did not start:\n"
                                     f"{''.join(self.raw)}")
            first = self.stdout[0].strip()
        assert first.startswith("listening on http://127.0.0.1:"), first
        return first.split()[-1]

    def mark(self) -> int:
        """A position in the log, for `wait(since=...)`: only later lines count."""
        with self.cond:
            return len(self.lines)

    def wait(self, event: str, count: int = 1, deadline_s: float = 150, since: int = 0,
             **match: Any) -> dict[str, Any]:
        def found() -> list[dict[str, Any]]:
            return [e for e in self.lines[since:] if e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())]

        with self.cond:
            ok = self.cond.wait_for(lambda: len(found()) >= count or self.proc.poll() is not None,
                                    timeout=deadline_s)
            if len(found()) >= count:
                return found()[count - 1]
        state = "exited" if self.proc.poll() is not None else "still running"
        raise AssertionError(f"no {count}x {event} {match or ''} ({state}, "
                             f"deadline {'not ' if ok else ''}reached):\n{''.join(self.raw)}")

    def stop(self) -> int:
        """SIGTERM, and the exit status once its output is read to the end (a line
        logged at the stop was missed by a test reading right after)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ended.wait(60)
        return self.proc.returncode


# ---- OCSP ------------------------------------------------------------------------------

def issuing(d: Daemon) -> x509.Certificate:
    return x509.load_pem_x509_certificate((d.state / "x509/issuing.pem").read_bytes())


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def request_for(cert: x509.Certificate, issuer: x509.Certificate,
                algorithm: hashes.HashAlgorithm | None = None, nonce: bool = False) -> bytes:
    b = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    if nonce:
        b = b.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


async def ask_ocsp(d: Daemon, der: bytes, get: bool = False) -> tuple[ocsp.OCSPResponse, Any]:
    if get:
        url = f"{d.url}/v1/x509/ocsp/{base64.urlsafe_b64encode(der).decode()}"
        status, ctype, raw, headers = await _get(url, d)
    else:
        status, ctype, raw = await http("POST", f"{d.url}/v1/x509/ocsp", d.ssl(), data=der,
                                        headers={"Content-Type": "application/ocsp-request"})
        headers = {}
    assert status == 200 and ctype == "application/ocsp-response"
    return ocsp.load_der_ocsp_response(raw), headers


async def _get(url: str, d: Daemon) -> tuple[int, str, bytes, Any]:
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(url, ssl=d.ssl()) as r:
        return r.status, r.content_type, await r.read(), r.headers


async def signed(d: Daemon, cert: x509.Certificate, want: ocsp.OCSPCertStatus
                 ) -> ocsp.OCSPResponse:
    """The OCSP answer once the daemon has pre-signed `want` (polling with a deadline:
    a new or just revoked certificate is signed by the daemon within seconds)."""
    deadline = time.monotonic() + 30
    while True:
        resp, _ = await ask_ocsp(d, request_for(cert, issuing(d)))
        if resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL and \
                resp.certificate_status == want:
            return resp
        assert time.monotonic() < deadline, (resp.response_status, want)
