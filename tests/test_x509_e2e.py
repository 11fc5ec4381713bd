"""Services enrolling and renewing X.509 certificates against the real daemon."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import socket
import sqlite3
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from ca.client import make_csr
from ca.issuance import profiles as prof
from tests.conftest import Daemon, hsmca, init_ca, require, set_config, start_daemon
from tests.helpers import (
    audit_verify,
    bootstrap_token,
    csr_pem,
    enroll,
    http,
    leaf_from_issuing_key,
    log_lines,
    metric_samples,
    openssl_verify,
    other_ca,
    tls_exchange,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
TYPES = "https://hsmca.dev/problems/"


async def test_health(daemon: Daemon) -> None:
    status, ctype, raw = await http("GET", f"{daemon.url}/health", daemon.ssl())
    assert status == 200 and ctype == "application/json"
    answer = json.loads(raw)
    workers = answer.pop("workers")  # "N of N serving": as many as the machine's cores
    assert answer == {"status": "ok", "hsm": "ok", "audit": "ok", "store": "ok"}, answer
    count = workers.split()[0]
    assert workers == f"{count} of {count} serving" and int(count) >= 1, workers


async def test_acme_asked_of_a_ca_without_it_says_how_to_turn_it_on(daemon: Daemon) -> None:
    status, _, raw = await http("GET", f"{daemon.url}/acme/directory", daemon.ssl())
    assert status == 404 and json.loads(raw)["detail"] == (
        "no such endpoint: /acme/directory: this CA serves no ACME (its config has no "
        "[acme] section: docs/acme.md)"), raw


async def test_enroll_renew_rekey_with_the_cli(daemon: Daemon, tmp_path: Path) -> None:
    token = hsmca("token", "create", "--config", daemon.state / "hsmca.toml", "--url",
                  daemon.url, "--role", "service", "--name", "svc.internal.example",
                  "10.0.0.7").stdout.strip()
    assert token.startswith("hsmca-")
    out = tmp_path / "svc"
    proc = hsmca("enroll", "--url", daemon.url, "--ca", daemon.root, "--token", token,
                 "--name", "svc.internal.example", "10.0.0.7", "--out", out)
    assert "enrolled: serial" in proc.stdout
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    openssl_verify(daemon, out / "cert.pem")
    first = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["svc.internal.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    bc = first.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False

    # The token is single-use.
    again = hsmca("enroll", "--url", daemon.url, "--ca", daemon.root, "--token", token,
                  "--name", "svc.internal.example", "--out", tmp_path / "again", check=False)
    assert again.returncode == 1 and "already been used" in again.stderr

    hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--cert", out / "cert.pem",
          "--key", out / "key.pem")
    renewed = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert renewed.serial_number != first.serial_number
    assert renewed.public_key() == first.public_key()
    openssl_verify(daemon, out / "cert.pem")

    hsmca("renew", "--url", daemon.url, "--ca", daemon.root, "--cert", out / "cert.pem",
          "--key", out / "key.pem", "--rekey")
    rekeyed = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert rekeyed.public_key() != first.public_key()
    assert rekeyed.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value == san


async def test_renewal_never_widens_names(daemon: Daemon, tmp_path: Path) -> None:
    """A re-key's CSR that asks for more (or other) names is refused, saying so, rather
    than answered with a certificate for fewer names than it asked (RFC 7030 4.2.2)."""
    ctx = daemon.ssl(*enroll(daemon, tmp_path, "service", ["narrow.internal.example"]))
    status, _, raw = await http("POST", f"{daemon.url}/v1/x509/renew", ctx, body={
        "csr": csr_pem(["narrow.internal.example", "wide.example.com"])})
    problem = json.loads(raw)
    assert status == 400 and problem["type"].endswith("/bad-csr"), raw
    assert "a renewal keeps the certificate's names (narrow.internal.example)" in \
        problem["detail"]
    # The same names, or none (a bare key, as some EST clients send), re-key as before.
    bare = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    for csr in (csr_pem(["narrow.internal.example"]),
                bare.public_bytes(serialization.Encoding.PEM).decode()):
        status, _, raw = await http("POST", f"{daemon.url}/v1/x509/renew", ctx, body={
            "csr": csr})
        assert status == 201, raw
        cert = x509.load_pem_x509_certificate(json.loads(raw)["certificate"].encode())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["narrow.internal.example"]


async def test_revocation_shows_in_crl_and_ocsp_and_blocks_the_cert(own_daemon: Daemon,
                                                                    tmp_path: Path) -> None:
    daemon = own_daemon  # it revokes a certificate
    openssl = require("openssl")
    cert_path, _ = enroll(daemon, tmp_path, "service", ["doomed.internal.example"])
    out = cert_path.parent
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    serial = format(cert.serial_number, "x")
    issuing = daemon.state / "x509" / "issuing.pem"

    def ocsp_status() -> str:
        """openssl's answer once the response is pre-signed (a new certificate gets
        tryLater until the daemon's refresher has signed its response)."""
        deadline = time.monotonic() + 30
        while True:
            proc = subprocess.run([openssl, "ocsp", "-issuer", issuing, "-cert",
                                   out / "cert.pem", "-url", f"{daemon.url}/v1/x509/ocsp",
                                   "-CAfile", daemon.root, "-verify_other", issuing],
                                  capture_output=True, text=True, timeout=60)
            if "trylater" not in proc.stdout or time.monotonic() > deadline:
                break
        assert "Response verify OK" in proc.stderr + proc.stdout, proc.stderr + proc.stdout
        return proc.stdout

    assert f"{out / 'cert.pem'}: good" in ocsp_status()

    proc = hsmca("revoke", serial, "--reason", "key_compromise", "--config",
                 daemon.state / "hsmca.toml", "--url", daemon.url)
    assert f"revoked {serial}" in proc.stdout

    status, ctype, der = await http("GET", f"{daemon.url}/v1/x509/crl", daemon.ssl())
    assert status == 200 and ctype == "application/pkix-crl"
    crl_file = tmp_path / "crl.der"
    crl_file.write_bytes(der)
    text = subprocess.run([openssl, "crl", "-inform", "DER", "-in", crl_file, "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert serial.upper().zfill(len(serial) + len(serial) % 2) in text.replace(":", "").upper()
    assert "Key Compromise" in text
    crl = x509.load_der_x509_crl(der)
    issuing_cert = x509.load_pem_x509_certificate(issuing.read_bytes())
    assert crl.is_signature_valid(issuing_cert.public_key())
    assert [r.serial_number for r in crl] == [cert.serial_number]  # and nothing else

    assert "revoked" in ocsp_status()

    ctx = daemon.ssl(out / "cert.pem", out / "key.pem")
    status, ctype, raw = await http("POST", f"{daemon.url}/v1/x509/renew", ctx, body={})
    assert status == 403 and ctype == "application/problem+json"
    assert "revoked" in json.loads(raw)["detail"]


async def test_est_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    openssl = require("openssl")
    status, ctype, body = await http("GET", f"{daemon.url}/.well-known/est/cacerts",
                                     daemon.ssl())
    assert status == 200 and ctype == "application/pkcs7-mime"
    # Polled by devices: revalidated by its ETag, as the chain is (an EST trial)
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/.well-known/est/cacerts",
                                                    ssl=daemon.ssl()) as r:
        etag = r.headers["ETag"]
        assert r.headers["Content-Type"] == "application/pkcs7-mime; smime-type=certs-only"
    async with aiohttp.ClientSession() as s, s.get(
            f"{daemon.url}/.well-known/est/cacerts", ssl=daemon.ssl(),
            headers={"If-None-Match": etag}) as r:
        assert r.status == 304 and await r.read() == b""
    p7 = tmp_path / "cacerts.p7"
    p7.write_bytes(base64.b64decode(body))
    text = subprocess.run([openssl, "pkcs7", "-inform", "DER", "-in", p7, "-print_certs",
                           "-noout"], capture_output=True, text=True, check=True).stdout
    assert "hsmca Issuing CA" in text and "hsmca Root CA" in text

    token = await bootstrap_token(daemon, "service", ["est.internal.example"])
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "header-file").write_text(f"Authorization: Bearer {token}\n")
    # simpleenroll with openssl, base64 and curl, as docs/operator.md shows it (read
    # from there: the recipe a docs trial followed gave the leaf alone)
    text = (Path(__file__).resolve().parents[1] / "docs/operator.md").read_text()
    start = text.index("    openssl req -new -key key.pem -subj /CN=api.internal.example")
    end = text.index("| openssl x509 >> cert.pem\n", start) + len("| openssl x509 >> cert.pem")
    recipe = "set -euo pipefail\n" + text[start:end].replace(
        "root.pem", str(daemon.root)).replace("https://ca.example:8443", daemon.url).replace(
        "api.internal.example", "est.internal.example")
    proc = await asyncio.to_thread(subprocess.run, [require("bash"), "-c", recipe],
                                   cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Again with another key, the token spent: curl fails, cert.p7 says why, cert.pem is
    # as it was (a client trial's re-run, without -f, left an empty cert.pem and no
    # reason). (With the same key, the same certificate again: a lost answer's retry.)
    kept = (tmp_path / "cert.pem").read_bytes()
    (tmp_path / "key.pem").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    again = await asyncio.to_thread(subprocess.run, [require("bash"), "-c", recipe],
                                    cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 22, again.stderr
    assert b"already been used" in (tmp_path / "cert.p7").read_bytes()
    assert (tmp_path / "cert.pem").read_bytes() == kept
    # The leaf, then its issuing CA: what a service presents, which a peer holding the
    # root alone verifies (a docs trial: the recipe gave the leaf alone).
    leaf, issuing = x509.load_pem_x509_certificates((tmp_path / "cert.pem").read_bytes())
    assert leaf.public_key() == key.public_key() and leaf.issuer == issuing.subject
    verified = subprocess.run([openssl, "verify", "-CAfile", daemon.root, "-untrusted",
                               tmp_path / "cert.pem", tmp_path / "cert.pem"],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
    issued = leaf

    # simplereenroll over mutual TLS with the certificate just issued
    (tmp_path / "c.pem").write_text(pem)
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    new_key = ec.generate_private_key(ec.SECP256R1())
    csr2 = x509.load_pem_x509_csr(csr_pem(["est.internal.example"], new_key).encode())
    status, ctype, body = await http(
        "POST", f"{daemon.url}/.well-known/est/simplereenroll",
        daemon.ssl(tmp_path / "c.pem", tmp_path / "k.pem"),
        data=base64.encodebytes(csr2.public_bytes(serialization.Encoding.DER)),
        headers={"Content-Type": "application/pkcs10"})
    assert status == 200 and ctype == "application/pkcs7-mime", body
    [reissued] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    assert reissued.public_key() == new_key.public_key()
    assert reissued.serial_number != issued.serial_number
    san = reissued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["est.internal.example"]
    assert list(san) == [x509.DNSName("est.internal.example")]
    (tmp_path / "reissued.pem").write_bytes(reissued.public_bytes(serialization.Encoding.PEM))
    openssl_verify(daemon, tmp_path / "reissued.pem")


async def test_est_takes_the_token_as_the_http_basic_password(daemon: Daemon,
                                                              tmp_path: Path) -> None:
    """EST clients (libest's estclient -u/-h, curl --user) send HTTP Basic (RFC 7030
    3.2.3): a request without credentials is challenged for it, and the bootstrap token
    as the password enrolls; any user name does."""
    url = f"{daemon.url}/.well-known/est/simpleenroll"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(csr_pem(["basic.internal.example"], key).encode())
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
    ptype = {"Content-Type": "application/pkcs10"}
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=ptype,
                                                    ssl=daemon.ssl()) as r:
        assert r.status == 401, await r.text()
        assert r.headers["WWW-Authenticate"].startswith('Basic realm="hsmca"')
        assert "HTTP Basic password" in (await r.json())["detail"]
    wrong = base64.b64encode(b"est:hsmca-not-a-token").decode()
    status, _, raw = await http("POST", url, daemon.ssl(), data=body,
                                headers={**ptype, "Authorization": f"Basic {wrong}"})
    assert status == 401 and json.loads(raw)["detail"] == "unknown bootstrap token", raw

    token = await bootstrap_token(daemon, "service", ["basic.internal.example"])
    # curl reads the credentials from a config file: never the token in argv.
    (tmp_path / "curl.conf").write_text(f'user = "est-client:{token}"\n')
    (tmp_path / "csr.b64").write_bytes(body)
    proc = await asyncio.to_thread(subprocess.run, [
        require("curl"), "-sS", "--fail-with-body", "-K", "curl.conf", "--cacert",
        str(daemon.root), "-H", "Content-Type: application/pkcs10", "--data-binary",
        "@csr.b64", url], cwd=tmp_path, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [issued] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(proc.stdout))
    assert issued.public_key() == key.public_key()
    san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["basic.internal.example"]
    # Spent like any token, whichever way it came: a retry with the same key gets the
    # same certificate (its answer may have been lost), another key nothing.
    basic = {**ptype, "Authorization": "Basic "
             + base64.b64encode(f"x:{token}".encode()).decode()}
    status, _, raw = await http("POST", url, daemon.ssl(), data=body, headers=basic)
    assert status == 200, raw
    assert pkcs7.load_der_pkcs7_certificates(base64.b64decode(raw)) == [issued]
    other = base64.encodebytes(x509.load_pem_x509_csr(csr_pem(
        ["basic.internal.example"]).encode()).public_bytes(serialization.Encoding.DER))
    status, _, raw = await http("POST", url, daemon.ssl(), data=other, headers=basic)
    assert status == 401 and "already been used" in json.loads(raw)["detail"], raw
    # Any user name, in any characters (RFC 7617: an EST trial's device `gerät-01` was
    # refused as if its token were wrong)
    named = {**ptype, "Authorization": "Basic "
             + base64.b64encode(f"gerät-01:{token}".encode()).decode()}
    status, _, raw = await http("POST", url, daemon.ssl(), data=body, headers=named)
    assert status == 200 and pkcs7.load_der_pkcs7_certificates(base64.b64decode(raw)) == \
        [issued], raw


async def test_est_a_device_sending_its_spent_token_beside_its_certificate_renews(
        daemon: Daemon, tmp_path: Path) -> None:
    """An EST trial: a device that keeps sending its configured HTTP Basic credentials
    (the token it enrolled with) beside the certificate that token got it was answered
    with its first certificate again (the same key), or told to ask an admin for a new
    token (a new key). Its certificate renews it now. A token the CA never made is still
    refused as one, and an empty body is said to be empty."""
    url = f"{daemon.url}/.well-known/est/simpleenroll"
    ptype = {"Content-Type": "application/pkcs10"}

    def der_b64(key: Any) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem(["device.internal.example"], key).encode())
        return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))

    key = ec.generate_private_key(ec.SECP256R1())
    token = await bootstrap_token(daemon, "service", ["device.internal.example"])
    basic = {**ptype, "Authorization": "Basic "
             + base64.b64encode(f"device:{token}".encode()).decode()}
    status, _, raw = await http("POST", url, daemon.ssl(), data=der_b64(key), headers=basic)
    assert status == 200, raw
    [first] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(raw))
    (tmp_path / "cert.pem").write_bytes(first.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = daemon.ssl(tmp_path / "cert.pem", tmp_path / "key.pem")
    new_key = ec.generate_private_key(ec.SECP256R1())
    seen = {first.serial_number}
    for asked in (key, new_key):
        status, _, raw = await http("POST", url, ctx, data=der_b64(asked), headers=basic)
        assert status == 200, raw
        [renewed] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(raw))
        assert renewed.serial_number not in seen and renewed.public_key() == \
            asked.public_key()
        seen.add(renewed.serial_number)
    # A new token for another name, beside the old certificate: the token's request,
    # answered again with its own certificate on a retry (a review: it was set aside,
    # and the retry renewed the old name or was refused)
    other = await bootstrap_token(daemon, "service", ["device2.internal.example"])
    basic2 = {**ptype, "Authorization": "Basic "
              + base64.b64encode(f"device:{other}".encode()).decode()}
    key2 = ec.generate_private_key(ec.SECP256R1())
    csr2 = base64.encodebytes(x509.load_pem_x509_csr(csr_pem(
        ["device2.internal.example"], key2).encode()).public_bytes(serialization.Encoding.DER))
    answers = []
    for _ in range(2):
        status, _, raw = await http("POST", url, ctx, data=csr2, headers=basic2)
        assert status == 200, raw
        answers += pkcs7.load_der_pkcs7_certificates(base64.b64decode(raw))
    assert answers[0] == answers[1] and answers[0].extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == \
        ["device2.internal.example"]
    wrong = {**ptype, "Authorization": "Basic "
             + base64.b64encode(b"device:hsmca-0-not-a-token").decode()}
    status, _, raw = await http("POST", url, ctx, data=der_b64(key), headers=wrong)
    assert status == 401 and json.loads(raw)["detail"] == "unknown bootstrap token", raw
    status, _, raw = await http("POST", url, ctx, data=b"", headers=basic)
    assert status == 400 and json.loads(raw)["detail"].startswith("the body is empty"), raw


async def test_an_enrollment_whose_answer_was_lost_is_answered_again(
        daemon: Daemon) -> None:
    """An API client's trial: a retry of an enrollment whose 201 was lost (a timeout, a
    reset) was told the token was used, and the certificate could be fetched by nobody.
    The same token with a CSR of the same key gets that certificate again (200); another
    key, or once it is revoked, the token is spent."""
    token = await bootstrap_token(daemon, "service", ["retry.internal.example"])
    key = ec.generate_private_key(ec.SECP256R1())
    bearer = {"Authorization": f"Bearer {token}"}

    async def enroll_with(csr: str) -> tuple[int, dict[str, Any]]:
        status, _, raw = await http("POST", f"{daemon.url}/v1/x509/enroll", daemon.ssl(),
                                    body={"csr": csr}, headers=bearer)
        return status, json.loads(raw)
    status, first = await enroll_with(csr_pem(["retry.internal.example"], key))
    assert status == 201, first
    lines = len(log_lines(daemon.state))
    # a new CSR of the same key (a client that rebuilds its request) will do
    status, again = await enroll_with(csr_pem(["retry.internal.example"], key))
    assert (status, again) == (200, first)
    # No certificate signed for it (the daemon's own lines go on meanwhile: the first
    # certificate's OCSP responses, checkpoints; counting every line failed under load).
    assert not [e for e in log_lines(daemon.state)[lines:] if e["event"] == "hsm.sign"
                and e.get("purpose") == "x509"], log_lines(daemon.state)[lines:]
    status, other = await enroll_with(csr_pem(["retry.internal.example"]))
    assert status == 401 and "already been used" in other["detail"], other
    status, _, raw = await http("POST", f"{daemon.url}/v1/x509/revoke", daemon.admin_ssl(),
                                body={"serial": first["serial"]})
    assert status == 200, raw
    status, gone = await enroll_with(csr_pem(["retry.internal.example"], key))
    assert status == 401 and "already been used" in gone["detail"], gone


async def test_a_persons_or_operators_certificate_is_no_tls_server_certificate(
        daemon: Daemon, tmp_path: Path) -> None:
    """A security review: every leaf said serverAuth, and an auditor or admin may be
    named with a DNS name that [policy] allow does not bind (it binds the fleet), so a
    relying party trusting the root took an auditor's certificate as that name's TLS
    server. Users', auditors' and admins' certificates are client certificates alone;
    services and hosts keep both."""
    openssl = require("openssl")

    def purposes(cert: Path) -> dict[str, bool]:
        return {purpose: subprocess.run(
            [openssl, "verify", "-purpose", purpose, "-CAfile", daemon.root, "-untrusted",
             daemon.state / "x509" / "issuing.pem", cert], capture_output=True).returncode
            == 0 for purpose in ("sslserver", "sslclient")}
    auditor, _ = enroll(daemon, tmp_path, "auditor", ["bank.internal.example"])
    user, _ = enroll(daemon, tmp_path, "user", ["alice@internal.example"])
    service, _ = enroll(daemon, tmp_path, "service", ["api.internal.example"])
    for cert in (auditor, user, daemon.state / "admin" / "cert.pem"):
        assert purposes(cert) == {"sslserver": False, "sslclient": True}, cert
    assert purposes(service) == {"sslserver": True, "sslclient": True}
    # ...and it still authenticates the auditor
    status, _, raw = await http("GET", f"{daemon.url}/v1/whoami", daemon.ssl(*enroll(
        daemon, tmp_path, "auditor", ["ops@internal.example"])))
    assert status == 200 and json.loads(raw)["role"] == "auditor", raw


async def test_one_token_fifty_concurrent_enrollments(daemon: Daemon) -> None:
    token = await bootstrap_token(daemon, "service", ["race.internal.example"])
    csr = csr_pem(["race.internal.example"])
    ctx = daemon.ssl()
    async with aiohttp.ClientSession() as s:
        async def one() -> tuple[int, bytes, str | None]:
            async with s.post(f"{daemon.url}/v1/x509/enroll", json={"csr": csr}, ssl=ctx,
                              headers={"Authorization": f"Bearer {token}"}) as r:
                return r.status, await r.read(), r.headers.get("Retry-After")
        answers = await asyncio.gather(*(one() for _ in range(50)))
        again = await one()  # a retry once all is done: the same key, that certificate
    statuses = [status for status, _, _ in answers]
    assert statuses.count(201) == 1, statuses
    # The others were told to retry in a second while it was signed (an EST trial's
    # device was told "ask an admin for a new one"), or (the same CSR, so the same key)
    # got that one certificate again once it was.
    assert set(statuses) <= {201, 200, 409}, statuses
    for status, body, retry in answers:
        if status == 409:
            assert retry == "1" and "being spent by another request right now" in \
                json.loads(body)["detail"], body
    assert again[0] == 200
    if 409 in statuses:  # a token used twice at once is the admin's to hear of
        with daemon.stderr_changed:
            assert daemon.stderr_changed.wait_for(lambda: any(
                '"reason": "spending"' in line for line in daemon.stderr), timeout=60)
    assert len({json.loads(body)["serial"] for status, body, _ in [*answers, again]
                if status in (200, 201)}) == 1
    # One certificate for that name in the inventory, one signature in the log.
    with sqlite3.connect(daemon.state / "hsmca.sqlite3") as db:
        rows = [serial for serial, names in db.execute("SELECT serial, names FROM certs")
                if json.loads(names) == ["race.internal.example"]]
    assert len(rows) == 1, rows
    lines = log_lines(daemon.state)
    intents = [e for e in lines if e.get("phase") == "intent"
               and e.get("names") == ["race.internal.example"]]
    assert [e["serial"] for e in intents] == rows
    outcomes = [e for e in lines if e.get("phase") == "outcome"
                and e["op_id"] == intents[0]["op_id"]]
    assert [e["result"] for e in outcomes] == ["ok"]


def _bad_signature_csr() -> str:
    pem = csr_pem(["x.internal.example"]).encode()
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF  # inside the signature
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


def _csr_with(extension: x509.ExtensionType, critical: bool) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .add_extension(extension, critical=critical)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_bad_input_gets_problem_json_and_leaves_the_log_valid(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        good = csr_pem(["ok.internal.example"])
        weak_rsa = make_csr(["ok.internal.example"], rsa.generate_private_key(65537, 1024))
        truncated = good[: len(good) // 2]
        cases: list[tuple[str, int, str, str, dict[str, Any]]] = [
            ("garbage CSR", 400, "bad-csr", "cannot be parsed", {"csr": "hello"}),
            ("truncated CSR", 400, "bad-csr", "cannot be parsed", {"csr": truncated}),
            ("bad CSR signature", 400, "bad-csr", "signature does not verify",
             {"csr": _bad_signature_csr()}),
            ("RSA 1024", 400, "bad-key", "RSA key of 1024 bits refused", {"csr": weak_rsa}),
            ("CA:TRUE", 400, "bad-csr", "asks for a CA certificate",
             {"csr": _csr_with(x509.BasicConstraints(ca=True, path_length=None), True)}),
            ("must-staple", 400, "bad-csr", "asks for OCSP Must-Staple", {"csr": _csr_with(
                x509.TLSFeature([x509.TLSFeatureType.status_request]), False)}),
            ("names outside token", 403, "name-not-granted", "not among the names",
             {"csr": csr_pem(["evil.example.com"])}),
            # A name is issued as the kind it was asked as, or refused (a security
            # review: this one came back a DNS name, 10.0.0.5 asked as DNS an IP address)
            ("DNS name as e-mail", 400, "bad-name", "'ok.internal.example' as an e-mail "
             "address, but it is a DNS name; ask for it as one (subjectAltName "
             "DNS:ok.internal.example)", {"csr": _csr_with(x509.SubjectAlternativeName(
                 [x509.RFC822Name("ok.internal.example")]), False)}),
            ("IP address as DNS", 400, "bad-name", "as a DNS name, but it is an IP address",
             {"csr": _csr_with(x509.SubjectAlternativeName([x509.DNSName("10.0.0.5")]),
                               False)}),
            ("csr not a string", 400, "bad-field", "must be a string", {"csr": 42}),
            ("missing csr", 400, "bad-field", "missing field 'csr': it is required, as a "
             "string", {}),
            # null is not "missing" (an SSH trial's was told so)
            ("null csr", 400, "bad-field", "field 'csr' is null: it is required", {"csr": None}),
        ]
        for what, want, kind, message, body in cases:
            token = await bootstrap_token(d, "service", ["ok.internal.example"])
            status, ctype, raw = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                            body=body,
                                            headers={"Authorization": f"Bearer {token}"})
            assert ctype == "application/problem+json", (what, status, raw)
            problem = json.loads(raw)
            assert (status, problem["type"]) == (want, TYPES + kind), (what, problem)
            assert message in problem["detail"], (what, problem)
            assert set(problem) == {"type", "title", "status", "detail"}

        token = await bootstrap_token(d, "service", ["ok.internal.example"])
        auth = {"Authorization": f"Bearer {token}"}
        raw_cases: list[tuple[str, int, str, dict[str, Any]]] = [
            ("oversized body", 413, "request-entity-too-large", {
                "data": b"{" + b" " * 70000 + b"}",
                "headers": {**auth, "Content-Type": "application/json"}}),
            ("not JSON", 400, "bad-json", {"data": b"{nope", "headers": {
                **auth, "Content-Type": "application/json"}}),
            ("JSON array", 400, "bad-json", {"body": [1, 2], "headers": auth}),
            ("wrong content type", 415, "unsupported-media-type", {"data": b"csr=x", "headers": {
                **auth, "Content-Type": "application/x-www-form-urlencoded"}}),
            ("no token", 401, "bad-token", {"body": {"csr": good}}),
            ("forged token", 401, "bad-token", {
                "body": {"csr": good}, "headers": {"Authorization": "Bearer hsmca-0000-forged"}}),
            ("renew without client cert", 403, "client-certificate-required",
             {"body": {}, "path": "/v1/x509/renew"}),
            ("tokens without admin cert", 403, "client-certificate-required",
             {"body": {"role": "service"}, "path": "/v1/tokens"}),
            ("unknown path", 404, "not-found", {"path": "/v1/nope", "method": "GET"}),
            ("wrong method", 405, "method-not-allowed",
             {"path": "/v1/x509/enroll", "method": "GET"}),
        ]
        for what, want, kind, kw in raw_cases:
            status, ctype, raw = await http(kw.get("method", "POST"),
                                            f"{d.url}{kw.get('path', '/v1/x509/enroll')}",
                                            d.ssl(), body=kw.get("body"), data=kw.get("data"),
                                            headers=kw.get("headers"))
            assert ctype == "application/problem+json", (what, status, raw)
            problem = json.loads(raw)
            assert (status, problem["status"], problem["type"]) == (want, want, TYPES + kind), (
                what, problem)

        # Admin asking for a token with names that are not names.
        status, ctype, raw = await http("POST", f"{d.url}/v1/tokens", d.admin_ssl(), body={
            "role": "service", "names": ["bad name,with comma"], "ttl": "5m"})
        problem = json.loads(raw)
        assert (status, problem["type"]) == (400, TYPES + "bad-name"), problem
        assert "spaces, commas" in problem["detail"]

        status, _, raw = await http("GET", f"{d.url}/health", d.ssl())
        assert status == 200, raw
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)
    pin = ca.token.pin_file.read_text().strip()
    assert pin not in "".join(d.stderr)


async def test_names_longer_than_a_common_name_still_enroll(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    long_dns = "a" * 60 + ".long.internal.example"
    uri = "spiffe://cluster.local/ns/default/sa/" + "b" * 50
    token = await bootstrap_token(daemon, "service", [long_dns, uri])
    key = ec.generate_private_key(ec.SECP256R1())
    status, _, raw = await http("POST", f"{daemon.url}/v1/x509/enroll", daemon.ssl(),
                                body={"csr": csr_pem([long_dns, uri], key)},
                                headers={"Authorization": f"Bearer {token}"})
    assert status == 201, raw
    cert = x509.load_pem_x509_certificate(json.loads(raw)["certificate"].encode())
    assert cert.subject == x509.Name([])  # no name fits a CN: the SAN carries them
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [long_dns]
    (tmp_path / "long.pem").write_text(json.loads(raw)["certificate"])
    openssl_verify(daemon, tmp_path / "long.pem")


async def test_ocsp_refuses_odd_requests_with_ocsp_errors(daemon: Daemon) -> None:
    from cryptography.x509 import ocsp

    def tlv(tag: int, content: bytes) -> bytes:  # short-form DER, enough for this request
        return bytes([tag, len(content)]) + content

    # A well-formed request whose CertID uses MD5, which cryptography will not hash with.
    md5_alg = tlv(0x30, bytes.fromhex("06082a864886f70d0205") + b"\x05\x00")
    cert_id = tlv(0x30, md5_alg + tlv(0x04, b"\x00" * 16) + tlv(0x04, b"\x00" * 16)
                  + tlv(0x02, b"\x01"))
    md5 = tlv(0x30, tlv(0x30, tlv(0x30, tlv(0x30, cert_id))))
    # A well-formed request for another issuer: not ours to answer.
    other = tlv(0x30, tlv(0x30, bytes.fromhex("06052b0e03021a") + b"\x05\x00")
                + tlv(0x04, b"\x00" * 20) + tlv(0x04, b"\x00" * 20) + tlv(0x02, b"\x01"))
    foreign = tlv(0x30, tlv(0x30, tlv(0x30, tlv(0x30, other))))
    expected = {b"garbage": ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
                b"": ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
                md5: ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
                foreign: ocsp.OCSPResponseStatus.UNAUTHORIZED}
    for body, want in expected.items():
        status, ctype, raw = await http("POST", f"{daemon.url}/v1/x509/ocsp", daemon.ssl(),
                                        data=body,
                                        headers={"Content-Type": "application/ocsp-request"})
        assert status == 200 and ctype == "application/ocsp-response", (body[:20], status)
        assert ocsp.load_der_ocsp_response(raw).response_status == want, body[:20]
    status, _, _ = await http("GET", f"{daemon.url}/health", daemon.ssl())
    assert status == 200


async def test_daemon_repairs_its_tls_certificate_and_guards_metrics(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    old = x509.load_pem_x509_certificates((ca.state / "tls/server.pem").read_bytes())[0]
    # A crash between writing the new key and the new certificate leaves them unmatched.
    (ca.state / "tls/server.key").write_bytes(ec.generate_private_key(ec.SECP256R1())
                                              .private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    set_config(ca.state, "server", "metrics-allow", ["10.0.0.0/8"])
    d = start_daemon(ca.state)
    try:
        host, port = d.url.removeprefix("https://").rsplit(":", 1)
        _, w = await asyncio.open_connection(host, int(port), ssl=d.ssl())
        served = x509.load_der_x509_certificate(
            w.get_extra_info("ssl_object").getpeercert(binary_form=True))
        w.close()
        assert served.serial_number != old.serial_number
        status, ctype, raw = await http("GET", f"{d.url}/metrics", d.ssl())
        assert status == 403 and ctype == "application/problem+json"
        assert "metrics-allow" in json.loads(raw)["detail"]
    finally:
        assert d.stop() == 0
    lines = [json.loads(x) for x in (ca.state / "audit/log.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(lines) if e["event"] == "daemon.start"]
    assert any(e.get("purpose") == "tls" for e in lines[starts[0]:])


async def test_client_certificates_not_issued_here_or_expired_are_refused(
        daemon: Daemon, tmp_path: Path) -> None:
    """The same renewal, on a connection of its own, with each client certificate: one
    this CA issued is served; one from another CA ends the TLS handshake (the server
    judges it there, before any route); one made with this CA's issuing key but never
    issued (not in the inventory), expired or not, gets past TLS and is refused by the
    route, which says why. (An expired one used to end the handshake, without a word
    to the client: a client trial's EST client, which always sends its certificate,
    could not even enroll again with a token.)"""
    openssl = require("openssl")
    now = prof.utcnow()
    issued = enroll(daemon, tmp_path, "service", ["valid.internal.example"])
    expired = leaf_from_issuing_key(daemon, tmp_path, "expired.internal.example",
                                    now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    unknown = leaf_from_issuing_key(daemon, tmp_path, "unknown.internal.example",
                                    now - dt.timedelta(minutes=5), now + dt.timedelta(hours=1))
    foreign = other_ca(tmp_path).leaf(tmp_path, "foreign.internal.example",
                                      now - dt.timedelta(minutes=5), now + dt.timedelta(hours=1))

    def verify(cert: Path, *extra: str) -> str:
        """What `openssl verify` says of a certificate against this CA's chain."""
        proc = subprocess.run([openssl, "verify", "-CAfile", daemon.root, "-untrusted",
                               daemon.state / "x509/issuing.pem", *extra, cert],
                              capture_output=True, text=True)
        return proc.stdout + proc.stderr

    # Each certificate has exactly the defect it is named for: the expired one chains
    # to this CA and passes but for the time; the foreign one does not chain.
    assert "certificate has expired" in verify(expired[0])
    assert f"{expired[0]}: OK" in verify(expired[0], "-no_check_time")
    assert "unable to get local issuer certificate" in verify(foreign[0])
    assert f"{unknown[0]}: OK" in verify(unknown[0])

    async def renew(cred: tuple[Path, Path]) -> tuple[int, bytes] | str:
        return await asyncio.to_thread(tls_exchange, daemon, daemon.ssl(*cred), "POST",
                                       "/v1/x509/renew", b"{}")

    async def refusals() -> dict[str, float]:
        """The daemon's count of refused handshakes, by its reason."""
        status, _, raw = await http("GET", f"{daemon.url}/metrics", daemon.ssl())
        assert status == 200, raw
        return {dict(labels)["reason"]: value for (name, labels), value
                in metric_samples(raw.decode()).items()
                if name == "hsmca_tls_handshakes_refused_total"}

    answer = await renew(issued)
    assert isinstance(answer, tuple) and answer[0] == 201, answer
    # The server ends the handshake without a TLS alert (asyncio drops the alert
    # OpenSSL makes for a failed handshake), so the client sees it cut off; the
    # daemon's count of refused handshakes says why, one reason per certificate.
    before = await refusals()
    assert await renew(foreign) == "UNEXPECTED_EOF_WHILE_READING"
    after = await refusals()
    moved = {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)}
    assert moved == {"client-certificate": 1}, moved
    # Plain HTTP to the HTTPS port (a probe, a scanner) is not a refused certificate
    with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1])), 10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(100)  # the daemon closes it
    now = await refusals()
    assert {r: now[r] - after.get(r, 0) for r in now if now[r] != after.get(r, 0)} == {
        "not-tls": 1}, now
    for cred in (unknown, expired):
        answer = await renew(cred)
        assert isinstance(answer, tuple) and answer[0] == 403, answer
        assert json.loads(answer[1])["type"] == TYPES + "unknown-certificate", answer
    status, _, raw = await http("GET", f"{daemon.url}/v1/whoami", daemon.ssl(*unknown))
    assert status == 403 and json.loads(raw)["type"] == TYPES + "unknown-certificate", raw
    status, _, raw = await http("GET", f"{daemon.url}/v1/whoami", daemon.ssl(*issued))
    assert status == 200 and json.loads(raw)["names"] == ["valid.internal.example"], raw


async def test_an_expired_client_certificate_is_told_so_and_a_token_still_enrolls(
        daemon: Daemon, tmp_path: Path) -> None:
    """A client trial: a certificate that expired while the CA was down ended every TLS
    handshake it was presented in, with nothing said to the client; an EST client that
    always sends it could not enroll again even with a new token. Now the route says
    it expired and what to do, and a token enrolls whatever certificate comes along."""
    token = await bootstrap_token(daemon, "service", ["short.internal.example"])
    key = ec.generate_private_key(ec.SECP256R1())
    status, _, body = await http("POST", f"{daemon.url}/v1/x509/enroll", daemon.ssl(),
                                 body={"csr": csr_pem(["short.internal.example"], key),
                                       "ttl": "1s"},
                                 headers={"Authorization": f"Bearer {token}"})
    assert status == 201, body
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(json.loads(body)["certificate"])
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    not_after = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    deadline = time.monotonic() + 30
    while True:  # until its notAfter has passed, paced by the round trips
        status, _, body = await http("GET", f"{daemon.url}/v1/whoami",
                                     daemon.ssl(cert, key_file))
        if status != 200:
            break
        assert time.monotonic() < deadline, "still taken 30 s on"
    assert dt.datetime.now(dt.UTC) > not_after
    problem = json.loads(body)
    assert status == 403 and problem["type"] == TYPES + "expired-certificate", problem
    assert "enroll again with a new bootstrap token" in problem["detail"]
    # EST, as such clients send it: the expired certificate and a new token.
    token = await bootstrap_token(daemon, "service", ["short.internal.example"])
    fresh = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(csr_pem(["short.internal.example"], fresh).encode())
    status, ctype, body = await http(
        "POST", f"{daemon.url}/.well-known/est/simpleenroll", daemon.ssl(cert, key_file),
        data=base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)),
        headers={"Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"})
    assert status == 200 and ctype == "application/pkcs7-mime", body


async def test_the_daemons_own_certificates_are_renewed_while_it_runs(tmp_path: Path) -> None:
    """An operator trial: the listener's certificate was renewed only at a start (a
    daemon up for eleven months serves an expired one), this host's admin credential
    never (a year after init no admin command worked), and /metrics said nothing of
    either. Both are renewed while the daemon runs, checked hourly and at SIGHUP; every
    worker's listener presents the new certificate at its next handshake."""
    import os
    import signal
    import ssl as ssl_

    ca = init_ca(tmp_path)
    d = start_daemon(ca.state, "--workers", "2")
    try:
        port = int(d.url.rsplit(":", 1)[1])

        def served() -> x509.Certificate:
            return x509.load_pem_x509_certificate(
                ssl_.get_server_certificate(("127.0.0.1", port)).encode())
        before = served()
        # Its key replaced under it (what a renewal due looks like to the check, as a
        # certificate 30 days from its end does), and an admin credential of a day in
        # place of init's year.
        (ca.state / "tls" / "server.key").write_bytes(ec.generate_private_key(
            ec.SECP256R1()).private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        # An admin credential of 30 s (and the backdated minute) in place of init's
        # year: in the last third of its life at once, as init's is in its last 30 days
        short_cert, short_key = enroll(d, tmp_path, "admin", ["admin.short.example"],
                                       (), "--ttl", "30s")
        old = x509.load_pem_x509_certificates(short_cert.read_bytes())[0]
        (ca.state / "admin" / "cert.pem").write_bytes(short_cert.read_bytes())
        (ca.state / "admin" / "key.pem").write_bytes(short_key.read_bytes())
        os.kill(d.proc.pid, signal.SIGHUP)
        assert d.wait_stderr(lambda: any("renewing the daemon's TLS certificate" in x
                                         for x in d.stderr), 30), "".join(d.stderr[-10:])
        # A worker loads it at a handshake and presents it from the next one on: then,
        # whichever worker answers, the new certificate, of this CA
        deadline, streak = time.monotonic() + 30, 0
        while streak < 8:
            assert time.monotonic() < deadline, "".join(d.stderr[-10:])
            now = served()
            streak = streak + 1 if now.serial_number != before.serial_number else 0
        now.verify_directly_issued_by(x509.load_pem_x509_certificates(
            (ca.state / "x509" / "issuing.pem").read_bytes())[0])
        # The admin credential, once in its last third (a check at each SIGHUP)
        deadline = time.monotonic() + 60
        while not any("renewing this host's admin credential" in x for x in d.stderr):
            assert time.monotonic() < deadline, "".join(d.stderr[-10:])
            os.kill(d.proc.pid, signal.SIGHUP)
            d.wait_stderr(lambda: any("renewing this host's admin credential" in x
                                      for x in d.stderr), 5)
        assert d.wait_stderr(lambda: _first(ca.state / "admin" / "cert.pem").serial_number
                             != old.serial_number, 30)
        admin = _first(ca.state / "admin" / "cert.pem")
        # for as long as it lived, as a renewal of it (its lineage)
        assert (admin.not_valid_after_utc - admin.not_valid_before_utc
                == old.not_valid_after_utc - old.not_valid_before_utc)
        shown = hsmca("cert", "show", format(admin.serial_number, "x"), "--config",
                      ca.state / "hsmca.toml", "--url", d.url).stdout
        assert format(old.serial_number, "x") in shown.split("renewals")[1], shown
        # /metrics says when each one ends
        status, _, raw = await http("GET", f"{d.url}/metrics", d.ssl())
        assert status == 200, raw
        ends = {dict(labels)["certificate"]: value for (name, labels), value
                in metric_samples(raw.decode()).items()
                if name == "hsmca_certificate_not_after_timestamp_seconds"}
        assert set(ends) == {"root", "issuing", "tls", "admin"}, ends
        # (a credential of 30 s is due again as soon as it is renewed, and another round,
        # woken by the old listener certificate's revocation, may renew it once more:
        # the metric names the one in the file then)
        latest = _first(ca.state / "admin" / "cert.pem")
        assert ends["admin"] in (admin.not_valid_after_utc.timestamp(),
                                 latest.not_valid_after_utc.timestamp()), (ends, latest)
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_revoked_admin_credential_of_this_host_is_replaced_with_a_new_key(
        tmp_path: Path) -> None:
    """An API trial revoked the CA's only admin credential (STATE/admin) and found no
    way back: every admin command was refused, a restart did not renew a revoked
    credential, and `init` refuses an existing CA. The daemon replaces it at once with
    a new key and a lineage of its own; the revoked one stays revoked."""
    ca = init_ca(tmp_path)
    d = start_daemon(ca.state)
    try:
        old = _first(ca.state / "admin" / "cert.pem")
        old_key = (ca.state / "admin" / "key.pem").read_bytes()
        status, _, body = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                     body={"certificate": old.public_bytes(
                                         serialization.Encoding.PEM).decode(),
                                         "reason": "keyCompromise"})
        assert status == 200, body
        # and the revoker is told where the new one goes, and how to have none (a review)
        assert any("it was the CA host's own admin credential" in w and "remove both "
                   "files there" in w for w in json.loads(body)["warnings"]), body
        assert d.wait_stderr(lambda: any("this host's admin credential was revoked: a new "
                                         "one, with a new key, replaces it" in x
                                         for x in d.stderr), 60), "".join(d.stderr[-10:])
        assert d.wait_stderr(lambda: any("this host's admin credential is renewed" in x
                                         for x in d.stderr), 60), "".join(d.stderr[-10:])
        new = _first(ca.state / "admin" / "cert.pem")
        assert new.serial_number != old.serial_number
        assert (ca.state / "admin" / "key.pem").read_bytes() != old_key
        # The next admin command works, with the files as they are now.
        made = hsmca("token", "create", "--config", ca.state / "hsmca.toml", "--role",
                     "service", "--name", "after.example", "--url", d.url)
        assert made.stdout.strip(), made.stderr
        admin = ("--config", ca.state / "hsmca.toml", "--url", d.url)
        shown = hsmca("cert", "show", format(old.serial_number, "x"), *admin).stdout
        assert "revoked" in shown, shown
        # its own lineage: the revoked one's renewals do not name it
        assert format(new.serial_number, "x") not in shown, shown
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def test_a_new_dns_name_is_in_the_listeners_certificate_from_the_next_start(
        tmp_path: Path) -> None:
    """operator.md says a start renews the listener's certificate for a `[server]
    dns-name` given since; a config trial found the old names served until the yearly
    renewal."""
    ca = init_ca(tmp_path)
    set_config(ca.state, "server", "dns-name", "ca.example")
    d = start_daemon(ca.state)
    try:
        served = _first(ca.state / "tls" / "server.pem")
        names = served.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert "ca.example" in names and "localhost" in names, names
    finally:
        assert d.stop() == 0


def _first(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]
