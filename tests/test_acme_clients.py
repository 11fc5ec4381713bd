"""Slow: certbot and lego, Debian's packages unmodified, against a real daemon on
127.0.0.1 with EAB: certbot certonly (http-01), renew and revoke (then the CRL and
OCSP say revoked); lego over http-01, its renewal and tls-alpn-01; an order outside
the account's EAB patterns refused; a second account (the `acme` client library)
cannot fetch or revoke another's certificate; ACME Renewal Information; every
certificate in the inventory with its account and audited; `hsmca audit verify`."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import josepy as jose
import pytest
import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from ca.store.sqlite import SQLiteStore
from tests.acme_kit import AcmeCA, audit_lines, cert_id, sha256_hex, start_acme_ca
from tests.conftest import require
from tests.helpers import audit_verify, openssl_verify

NAMES = ("acme1.test", "acme2.test", "acme3.test", "evil.example")
EMAIL = "ops@example.com"


@dataclass
class Run:
    ca: AcmeCA
    tmp: Path
    got: list[x509.Certificate] = field(default_factory=list)  # every certificate received
    certbot_first: x509.Certificate | None = None


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require("certbot")
    require("lego")
    tmp = tmp_path_factory.mktemp("acme-clients")
    ca = start_acme_ca(tmp, NAMES)
    try:
        yield Run(ca, tmp)
    finally:
        ca.daemon.stop()


def tool(*args: object, env: dict[str, str], timeout: int = 120
         ) -> subprocess.CompletedProcess[str]:
    """A client run; one still waiting after `timeout` s (lego polls a pending order
    forever) is killed and shown as rc 124."""
    try:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout), str(exc.stderr))


def certbot(r: Run, *args: object) -> subprocess.CompletedProcess[str]:
    c = r.tmp / "certbot"
    return tool("certbot", *args, "--server", r.ca.directory_url, "--non-interactive",
                "--config-dir", c / "config", "--work-dir", c / "work", "--logs-dir", c / "logs",
                env=dict(os.environ, REQUESTS_CA_BUNDLE=str(r.ca.daemon.root)))


def lego(r: Run, name: str, *args: object, timeout: int = 120
         ) -> subprocess.CompletedProcess[str]:
    # lego 4.9.1 refuses every command, renew too, without --eab when the directory
    # says externalAccountRequired; --kid/--hmac are needed only to register.
    return tool("lego", "--server", r.ca.directory_url, "--accept-tos", "--email", EMAIL,
                "--path", r.tmp / "lego", "--key-type", "ec256", "--domains", name, "--eab",
                *args, timeout=timeout,
                env=dict(os.environ, LEGO_CA_CERTIFICATES=str(r.ca.daemon.root)))


def tail(p: subprocess.CompletedProcess[str]) -> str:
    return (p.stderr + p.stdout)[-1500:]


def leaf(r: Run, path: Path, name: str) -> x509.Certificate:
    """The certificate verifies against the CA's root and names exactly `name`."""
    openssl_verify(r.ca.daemon, path)
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [name]
    r.got.append(cert)
    return cert


def issuer_of(r: Run) -> x509.Certificate:
    return x509.load_pem_x509_certificate((r.ca.daemon.state / "x509" / "issuing.pem")
                                          .read_bytes())


def ocsp_status(r: Run, cert: x509.Certificate) -> ocsp.OCSPResponse:
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer_of(r), hashes.SHA1()).build()
    resp = requests.post(f"{r.ca.url}/v1/x509/ocsp", verify=str(r.ca.daemon.root),
                         data=req.public_bytes(serialization.Encoding.DER),
                         headers={"Content-Type": "application/ocsp-request"})
    assert resp.status_code == 200
    return ocsp.load_der_ocsp_response(resp.content)


def wait_ocsp(r: Run, cert: x509.Certificate, want: ocsp.OCSPCertStatus) -> None:
    """OCSP answers are pre-signed by the primary: a fresh certificate gets tryLater for
    a moment. Poll with a deadline until the answer is `want` (each request's round trip
    paces the polling)."""
    deadline = time.monotonic() + 30
    seen = None
    while time.monotonic() < deadline:
        resp = ocsp_status(r, cert)
        seen = resp.response_status
        if seen == ocsp.OCSPResponseStatus.SUCCESSFUL:
            # one SingleResponse per CertID hash (SHA-1 and SHA-256), all alike
            statuses = {x.certificate_status for x in resp.responses}
            seen = statuses.pop() if len(statuses) == 1 else statuses
            if seen == want:
                return
        else:
            assert seen == ocsp.OCSPResponseStatus.TRY_LATER, seen
    raise AssertionError(f"OCSP still says {seen} for {cert.serial_number:x}, not {want}")


def crl_lists(r: Run, serial: int) -> bool:
    resp = requests.get(f"{r.ca.url}/v1/x509/crl", verify=str(r.ca.daemon.root))
    crl = x509.load_der_x509_crl(resp.content)
    return crl.get_revoked_certificate_by_serial_number(serial) is not None


def renewal_window(r: Run, cert: x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    resp = requests.get(f"{r.ca.url}/acme/renewal-info/{cert_id(cert)}",
                        verify=str(r.ca.daemon.root))
    assert resp.status_code == 200 and int(resp.headers["Retry-After"]) > 0, resp.text
    w = resp.json()["suggestedWindow"]
    return (dt.datetime.fromisoformat(w["start"]), dt.datetime.fromisoformat(w["end"]))


def account_of(r: Run, cert: x509.Certificate) -> str:
    """The ACME account the inventory lists the certificate under."""
    import asyncio
    store = SQLiteStore(r.ca.daemon.state / "hsmca.sqlite3")
    try:
        rec = asyncio.run(store.acme_cert(cert.serial_number))
    finally:
        store.close()
    assert rec is not None, f"{cert.serial_number:x} is not an ACME certificate in the inventory"
    return rec.account_id


def test_certbot_gets_renews_and_revokes(run: Run) -> None:
    r = run
    kid, hmac = r.ca.eab("*.test")
    p = certbot(r, "certonly", "--standalone", "--http-01-address", "127.0.0.1",
                "--http-01-port", r.ca.http_port, "--agree-tos", "--email", EMAIL,
                "--no-eff-email", "--key-type", "ecdsa", "-d", "acme1.test",
                "--eab-kid", kid, "--eab-hmac-key", hmac)
    live = r.tmp / "certbot" / "config" / "live" / "acme1.test"
    assert p.returncode == 0, tail(p)
    leaked = hmac in p.stdout + p.stderr  # a bare bool: the key itself stays out of reports
    assert not leaked, "certbot printed the EAB HMAC key"
    first = leaf(r, live / "cert.pem", "acme1.test")
    openssl_verify(r.ca.daemon, live / "fullchain.pem")
    r.certbot_first = first
    shutil.copy(live / "cert.pem", r.tmp / "acme1-first.pem")
    assert account_of(r, first)
    wait_ocsp(r, first, ocsp.OCSPCertStatus.GOOD)
    start, end = renewal_window(r, first)
    assert first.not_valid_before_utc < start < end < first.not_valid_after_utc

    p = certbot(r, "renew", "--cert-name", "acme1.test", "--force-renewal",
                "--no-random-sleep-on-renew", "--http-01-address", "127.0.0.1",
                "--http-01-port", r.ca.http_port)
    assert p.returncode == 0, tail(p)
    second = leaf(r, live / "cert.pem", "acme1.test")
    assert second.serial_number != first.serial_number
    assert account_of(r, second) == account_of(r, first)

    p = certbot(r, "revoke", "--cert-path", r.tmp / "acme1-first.pem",
                "--no-delete-after-revoke")
    assert p.returncode == 0, tail(p)
    assert crl_lists(r, first.serial_number)  # the CRL is re-signed with the revocation
    assert not crl_lists(r, second.serial_number)
    wait_ocsp(r, first, ocsp.OCSPCertStatus.REVOKED)
    start, end = renewal_window(r, first)  # revoked: renew now
    assert start <= dt.datetime.now(dt.UTC) <= end + dt.timedelta(minutes=1)


def test_lego_http01_renewal_and_tls_alpn01(run: Run) -> None:
    r = run
    kid, hmac = r.ca.eab("*.test")
    http = ["--http", "--http.port", f"127.0.0.1:{r.ca.http_port}"]
    p = lego(r, "acme2.test", "--kid", kid, "--hmac", hmac, *http, "run")
    assert p.returncode == 0, tail(p)
    crt = r.tmp / "lego" / "certificates" / "acme2.test.crt"
    first = leaf(r, crt, "acme2.test")
    p = lego(r, "acme2.test", *http, "renew", "--days", "400", "--no-random-sleep")
    assert p.returncode == 0, tail(p)
    assert leaf(r, crt, "acme2.test").serial_number != first.serial_number
    p = lego(r, "acme3.test", "--tls", "--tls.port", f"127.0.0.1:{r.ca.tls_port}", "run")
    assert p.returncode == 0, tail(p)
    third = leaf(r, r.tmp / "lego" / "certificates" / "acme3.test.crt", "acme3.test")
    assert account_of(r, third) == account_of(r, first)


def test_an_order_outside_the_eab_patterns_is_refused(run: Run) -> None:
    r = run
    if not (r.tmp / "lego" / "accounts").exists():  # an account of its own otherwise
        kid, hmac = r.ca.eab("*.test")
        extra = ["--kid", kid, "--hmac", hmac]
    else:
        extra = []
    p = lego(r, "evil.example", *extra, "--http", "--http.port",
             f"127.0.0.1:{r.ca.http_port}", "run", timeout=90)
    assert p.returncode not in (0, 124), tail(p)
    assert "rejectedIdentifier" in p.stdout + p.stderr, tail(p)
    assert not (r.tmp / "lego" / "certificates" / "evil.example.crt").exists()
    assert not any(line.get("event") == "hsm.sign" and "evil.example" in str(line)
                   for line in audit_lines(r.ca))


def test_a_second_account_cannot_fetch_or_revoke_anothers_certificate(run: Run) -> None:
    r = run
    assert r.certbot_first is not None, "the certbot test runs first"
    victim = r.got[1]  # certbot's renewed certificate, still valid
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = acme_client.ClientNetwork(key, alg=jose.ES256, verify_ssl=str(r.ca.daemon.root),
                                    user_agent="hsmca-tests")
    directory = acme_client.ClientV2.get_directory(r.ca.directory_url, net)
    other = acme_client.ClientV2(directory, net)
    kid, hmac = r.ca.eab("*.test")
    other.new_account(messages.NewRegistration.from_data(
        email=EMAIL, terms_of_service_agreed=True,
        external_account_binding=messages.ExternalAccountBinding.from_data(
            key.public_key(), kid, hmac, directory)))
    with pytest.raises(messages.Error) as fetch:
        other._post_as_get(f"{r.ca.url}/acme/cert/{victim.serial_number:x}")
    assert fetch.value.code == "unauthorized"
    with pytest.raises((messages.Error, acme_errors.ClientError)) as revoke:
        other.revoke(victim, 0)
    assert "unauthorized" in str(revoke.value)
    wait_ocsp(r, victim, ocsp.OCSPCertStatus.GOOD)
    assert not crl_lists(r, victim.serial_number)


def test_afterwards_every_certificate_is_audited_and_the_log_verifies(run: Run) -> None:
    r = run
    assert len(r.got) >= 5
    r.ca.daemon.stop()
    audit_verify(r.ca.daemon.state, ok=True)
    lines = list(audit_lines(r.ca))
    outcomes = {line.get("fingerprint") for line in lines
                if line.get("event") == "hsm.sign" and line.get("phase") == "outcome"}
    for cert in r.got:
        assert sha256_hex(cert.public_bytes(serialization.Encoding.DER)) in outcomes
    events = {line.get("event") for line in lines}
    assert {"acme.eab.create", "acme.account.create", "cert.revoke"} <= events
    assert not any("hmac" in line for line in lines)
