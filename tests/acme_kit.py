"""ACME as a client speaks it, for the tests: a daemon with an [acme] section, JWS
signed with josepy (well formed or deliberately not), EAB keys from the real CLI, and
an http-01 responder on the port the daemon validates against."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import josepy as jose
import requests
import tomli_w
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Daemon, hsmca, init_ca, start_daemon
from tests.helpers import whole_lines
from tests.ports import free_port

JOSE = "application/jose+json"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_key(curve: ec.EllipticCurve | None = None) -> jose.JWKEC:
    return jose.JWKEC(key=ec.generate_private_key(curve or ec.SECP256R1()))


def thumbprint(key: jose.JWK) -> str:
    return b64(key.public_key().thumbprint())


@dataclass
class AcmeCA:
    """A daemon serving ACME; its http-01 and tls-alpn-01 ports, its names."""

    daemon: Daemon
    http_port: int
    tls_port: int

    @property
    def url(self) -> str:
        return self.daemon.url

    @property
    def directory_url(self) -> str:
        return f"{self.daemon.url}/acme/directory"

    @property
    def config(self) -> Path:
        return self.daemon.state / "hsmca.toml"

    def eab(self, *names: str, ttl: str = "1h") -> tuple[str, str]:
        out = hsmca("acme", "eab", "create", "--config", self.config, "--names", *names,
                    "--ttl", ttl).stdout
        lines = dict(line.split("=", 1) for line in out.split())
        return lines["kid"], lines["hmac"]


def start_acme_ca(tmp: Path, hosts: tuple[str, ...], *, workers: int | None = None,
                  policy: dict[str, Any] | None = None, **acme: Any) -> AcmeCA:
    ca = init_ca(tmp)
    http_port, tls_port = free_port(), free_port()
    path = ca.state / "hsmca.toml"
    doc = tomllib.loads(path.read_text())
    if workers is not None:
        doc["server"]["workers"] = workers
    doc.setdefault("policy", {}).update(policy or {})
    doc["acme"] = {"http-01-port": http_port, "tls-alpn-01-port": tls_port,
                   "validation-timeout-s": 5, **acme,
                   "hosts": {h: "127.0.0.1" for h in hosts}}
    path.write_text(tomli_w.dumps(doc))
    return AcmeCA(start_daemon(ca.state), http_port, tls_port)


# ---- the http-01 responder ------------------------------------------------------------------

class Responder:
    """Answers /.well-known/acme-challenge/TOKEN on 127.0.0.1:port with what was put."""

    def __init__(self, port: int) -> None:
        self.answers: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}  # token -> Location of a 302
        self.held: dict[str, threading.Event] = {}  # token -> answered once it is set
        answers, redirects, held = self.answers, self.redirects, self.held

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.path.rsplit("/", 1)[-1]
                if token in held:
                    held[token].wait(60)  # the test's release, or a bound for a hang
                if token in redirects:
                    self.send_response(302)
                    self.send_header("Location", redirects[token])
                    self.end_headers()
                    return
                body = answers.get(token)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- requests ---------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem(self) -> str:
        """The ACME error type without its urn:ietf:params:acme:error: prefix."""
        assert self.headers.get("Content-Type", "").startswith("application/problem+json"), \
            (self.status, self.body[:200])
        return str(self.json["type"]).removeprefix(messages.ERROR_PREFIX)


def sign(key: jose.JWK, payload: bytes, protected: dict[str, Any],
         alg: jose.JWASignature = jose.ES256) -> dict[str, str]:
    p, pl = b64(json.dumps(protected).encode()), b64(payload)
    return {"protected": p, "payload": pl,
            "signature": b64(alg.sign(key.key, f"{p}.{pl}".encode()))}


@dataclass
class Client:
    """One ACME client: an account key, its account URL once registered."""

    ca: AcmeCA
    key: jose.JWK = field(default_factory=new_key)
    kid: str | None = None
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        # Only this CA's root: not a CA bundle named in the environment, which requests
        # would prefer to the session's own setting.
        self.session.trust_env = False
        self.session.verify = str(self.ca.daemon.root)
        self.dir = self.session.get(self.ca.directory_url).json()

    def nonce(self) -> str:
        r = self.session.head(self.dir["newNonce"])
        return str(r.headers["Replay-Nonce"])

    def raw(self, url: str, body: bytes | str, content_type: str = JOSE) -> Reply:
        r = self.session.post(url, data=body, headers={"Content-Type": content_type})
        return Reply(r.status_code, r.headers, r.content)

    def jws(self, url: str, payload: object, *, use_jwk: bool | None = None,
            nonce: str | None = None, alg: jose.JWASignature = jose.ES256,
            **protected: Any) -> dict[str, str]:
        """A JWS as a client sends it; `payload` None is POST-as-GET, bytes go as they
        are, anything else as JSON; keyword arguments replace protected fields (None
        removes one)."""
        if use_jwk is None:
            use_jwk = self.kid is None
        head: dict[str, Any] = {"alg": alg.name, "nonce": nonce or self.nonce(), "url": url}
        if use_jwk:
            head["jwk"] = self.key.public_key().to_partial_json()
        else:
            head["kid"] = self.kid
        for k, v in protected.items():
            if v is None:
                head.pop(k, None)
            else:
                head[k] = v
        raw = b"" if payload is None else payload if isinstance(payload, bytes) else \
            json.dumps(payload).encode()
        return sign(self.key, raw, head, alg)

    def post(self, url: str, payload: object = None, **kw: Any) -> Reply:
        return self.raw(url, json.dumps(self.jws(url, payload, **kw)))

    def eab_binding(self, kid: str, hmac: str, *, url: str | None = None,
                    key: jose.JWK | None = None) -> dict[str, Any]:
        return messages.ExternalAccountBinding.from_data(
            (key or self.key).public_key(), kid, hmac,
            messages.Directory({"newAccount": url or self.dir["newAccount"]}))

    def register(self, eab: tuple[str, str] | None, **extra: Any) -> Reply:
        payload: dict[str, Any] = {"termsOfServiceAgreed": True, **extra}
        if eab is not None:
            payload["externalAccountBinding"] = self.eab_binding(*eab)
        r = self.post(self.dir["newAccount"], payload, use_jwk=True)
        if r.status in (200, 201):
            self.kid = r.headers["Location"]
        return r

    def order(self, *names: str) -> Reply:
        return self.post(self.dir["newOrder"], {"identifiers": [
            {"type": "dns", "value": n} for n in names]})

    def key_authorization(self, token: str) -> str:
        return f"{token}.{thumbprint(self.key)}"

    def answer(self, order: Reply, kind: str) -> list[dict[str, Any]]:
        """Tell the CA the client is ready for the `kind` challenge of every authorization
        (after setting up the answers); the challenges as the CA returned them."""
        out = []
        for authz_url in order.json["authorizations"]:
            authz = self.post(authz_url).json
            ch = next(c for c in authz["challenges"] if c["type"] == kind)
            out.append({**ch, "identifier": authz["identifier"]["value"]})
        return out

    def wait_authz(self, authz_url: str, deadline_s: float = 30) -> dict[str, Any]:
        """Poll an authorization until it is no longer pending (with a deadline; each
        request's round trip to the server paces the polling)."""
        import time
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            authz = self.post(authz_url).json
            if authz["status"] != "pending":
                return dict(authz)
        raise AssertionError(f"{authz_url} still pending after {deadline_s} s")

    def validate_http01(self, order: Reply, responder: Responder) -> None:
        """Answer every authorization of the order over http-01 and wait (polling with a
        deadline, as clients do, paced by each request's round trip) until the order is
        ready."""
        import time
        for authz_url in order.json["authorizations"]:
            authz = self.post(authz_url).json
            ch = next(c for c in authz["challenges"] if c["type"] == "http-01")
            responder.answers[ch["token"]] = self.key_authorization(ch["token"]).encode()
            r = self.post(ch["url"], {})
            assert r.status == 200, r.body
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = self.post(order.headers["Location"])
            if now.json["status"] != "pending":
                assert now.json["status"] == "ready", now.json
                return
        raise AssertionError("the order did not become ready")

    def finalize(self, order: Reply, names: list[str], key: Any = None) -> Reply:
        return self.post(order.json["finalize"], {"csr": b64(csr_der(names, key))})


def csr_der(names: list[str], key: Any = None, *extra: x509.ExtensionType) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                              False))
    for extension in extra:
        builder = builder.add_extension(extension, False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def cert_id(cert: x509.Certificate) -> str:
    """RFC 9773's CertID: base64url(AKI keyIdentifier) "." base64url(DER serial)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    n = cert.serial_number
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")
    assert aki.key_identifier is not None
    return f"{b64(aki.key_identifier)}.{b64(raw)}"


def sha256_hex(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def audit_lines(ca: AcmeCA) -> Iterator[dict[str, Any]]:
    for line in whole_lines((ca.daemon.state / "audit" / "log.jsonl").read_bytes()):
        if line:
            yield json.loads(line)
