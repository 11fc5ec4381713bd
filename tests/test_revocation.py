"""Revocation reaches everything issued on the strength of what it revokes, OCSP costs
an anonymous client nothing, and the security review's findings stay fixed
(issue 13): each test here failed on the code before."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ocsp

from ca import ssh
from ca.policy import Refused
from tests.conftest import Daemon, hsmca, init_ca, require, start_daemon
from tests.helpers import (
    ask_ocsp as ask,
)
from tests.helpers import (
    audit_verify,
    bootstrap_token,
    csr_pem,
    enroll,
    http,
    issuing,
    load,
    log_lines,
    request_for,
    signed,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def ca_daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A CA of its own: these tests revoke."""
    ca = init_ca(tmp_path_factory.mktemp("revocation"))
    d = start_daemon(ca.state)
    yield d
    assert d.stop() == 0
    audit_verify(ca.state, ok=True)


async def barred(d: Daemon, name: str, key: Any) -> None:
    """`key` is barred: a new token's enrollment with it is refused (403 revoked-key)."""
    token = await bootstrap_token(d, "service", [name])
    status, _, raw = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                body={"csr": csr_pem([name], key)},
                                headers={"Authorization": f"Bearer {token}"})
    assert status == 403 and json.loads(raw)["type"].endswith("revoked-key"), raw


def ocsp_lines(d: Daemon) -> int:
    """Audit lines of OCSP signatures so far."""
    return sum(1 for line in (d.state / "audit/log.jsonl").read_bytes().splitlines()
               if b'"purpose":"ocsp"' in line)


# ---- OCSP ---------------------------------------------------------------------------------


async def test_ocsp_answers_the_cert_id_it_was_asked_and_nothing_else(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    d = ca_daemon
    cert_path, _ = enroll(d, tmp_path, "service", ["ocsp1.internal.example"])
    cert = load(cert_path)
    resp = await signed(d, cert, ocsp.OCSPCertStatus.GOOD)
    ca = issuing(d)
    ca.public_key().verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    # Each CertID gets the response that echoes it, exactly.
    for algorithm in (hashes.SHA1(), hashes.SHA256()):
        asked = ocsp.load_der_ocsp_request(request_for(cert, ca, algorithm))
        got, _ = await ask(d, request_for(cert, ca, algorithm))
        assert (got.hash_algorithm.name, got.issuer_name_hash, got.issuer_key_hash,
                got.serial_number) == (asked.hash_algorithm.name, asked.issuer_name_hash,
                                       asked.issuer_key_hash, asked.serial_number)
    # SHA-1 first, then SHA-256 for the same certificate: openssl finds its own CertID.
    openssl = require("openssl")
    for digest in ("-sha1", "-sha256"):
        proc = subprocess.run([openssl, "ocsp", digest, "-issuer", d.state / "x509/issuing.pem",
                               "-cert", cert_path, "-url", f"{d.url}/v1/x509/ocsp", "-CAfile",
                               d.root, "-verify_other", d.state / "x509/issuing.pem"],
                              capture_output=True, text=True, timeout=60)
        assert f"{cert_path}: good" in proc.stdout, proc.stdout + proc.stderr
        assert "Response verify OK" in proc.stderr, proc.stderr
    # Two certificates in one request (RFC 5019 2.1.1 has clients ask for one): an OCSP
    # malformedRequest, which openssl shows, not an HTTP error.
    (tmp_path / "other").mkdir()
    other, _ = enroll(d, tmp_path / "other", "service", ["ocsp2.internal.example"])
    proc = subprocess.run([openssl, "ocsp", "-issuer", d.state / "x509/issuing.pem", "-cert",
                           cert_path, "-cert", other, "-url", f"{d.url}/v1/x509/ocsp",
                           "-CAfile", d.root], capture_output=True, text=True, timeout=60)
    assert "Responder Error: malformedrequest" in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr
    # The right issuer key hash with a bogus issuer name hash is not our question.
    real = ocsp.load_der_ocsp_request(request_for(cert, ca))
    bogus = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        b"\x00" * 20, real.issuer_key_hash, cert.serial_number, hashes.SHA1()).build()
    resp, _ = await ask(d, bogus.public_bytes(serialization.Encoding.DER))
    assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


async def test_anonymous_ocsp_costs_no_signature_and_no_audit_line(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    d = ca_daemon
    cert = load(enroll(d, tmp_path, "service", ["ocsp2.internal.example"])[0])
    await signed(d, cert, ocsp.OCSPCertStatus.GOOD)  # the daemon's own signing is done
    before = ocsp_lines(d)
    ca = issuing(d)
    real = ocsp.load_der_ocsp_request(request_for(cert, ca))
    for i in range(100):
        if i % 2:  # a nonce: ignored, the pre-signed response is served
            resp, _ = await ask(d, request_for(cert, ca, nonce=True))
            assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            assert not list(resp.extensions)  # no nonce echoed: nothing signed for it
        else:  # an unknown serial of our issuer: unsigned unauthorized
            unknown = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
                real.issuer_name_hash, real.issuer_key_hash, 10**30 + i, hashes.SHA1()).build()
            resp, _ = await ask(d, unknown.public_bytes(serialization.Encoding.DER))
            assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert ocsp_lines(d) == before
    # GET too, cacheable until (at most an hour before) its nextUpdate.
    resp, headers = await ask(d, request_for(cert, ca), get=True)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    max_age = int(headers["Cache-Control"].split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= 3600
    # RFC 5019 6.2: the response's own times, and a tag to ask again with.
    assert parsedate_to_datetime(headers["Last-Modified"]) == resp.this_update_utc
    assert parsedate_to_datetime(headers["Expires"]) == resp.next_update_utc
    assert re.fullmatch(r'"[0-9a-f]{32}"', headers["ETag"]), headers["ETag"]
    # A cache coming back with the tag, as must-revalidate has it do, gets 304 and no
    # body while the response stands (a protocol trial got the whole body each time).
    url = f"{d.url}/v1/x509/ocsp/{base64.urlsafe_b64encode(request_for(cert, ca)).decode()}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=d.ssl(), headers={"If-None-Match": headers["ETag"]}) as r:
            assert r.status == 304 and await r.read() == b"" and r.headers["ETag"] == \
                headers["ETag"]
        async with s.get(url, ssl=d.ssl(), headers={"If-None-Match": '"0"'}) as r:
            assert r.status == 200 and await r.read()
        # A POST's answer carries max-age too, as SPEC has every response do
        async with s.post(f"{d.url}/v1/x509/ocsp", ssl=d.ssl(), data=request_for(cert, ca),
                          headers={"Content-Type": "application/ocsp-request"}) as r:
            assert ocsp.load_der_ocsp_response(await r.read()).response_status == \
                ocsp.OCSPResponseStatus.SUCCESSFUL
            assert re.search(r"max-age=\d+", r.headers["Cache-Control"]), r.headers
        # Junk around a GET's request is not the request: one cache key per response
        std = base64.b64encode(request_for(cert, ca)).decode()
        for path in (f"{url}!!!", f"{url}%20%20", f"{d.url}/v1/x509/ocsp/@@{std}",
                     f"{url.rstrip('=')}===", f"{url.rstrip('=')}===="):
            async with s.get(path, ssl=d.ssl()) as r:
                assert ocsp.load_der_ocsp_response(await r.read()).response_status == \
                    ocsp.OCSPResponseStatus.MALFORMED_REQUEST, path
        for path in (url.rstrip("="), f"{d.url}/v1/x509/ocsp/{std}",  # unpadded, standard
                     f"{d.url}/v1/x509/ocsp/{std.replace('+', '%2B').replace('/', '%2F')}"):
            async with s.get(path, ssl=d.ssl()) as r:
                assert ocsp.load_der_ocsp_response(await r.read()).response_status == \
                    ocsp.OCSPResponseStatus.SUCCESSFUL, path


async def test_crls_are_signed_ahead_and_an_anonymous_get_signs_nothing(
        own_daemon: Daemon) -> None:
    """The CA re-signs every CRL that still signs (the issuing CA's, the root's) before
    half its life, by itself: a relying party's GET is served from the inventory."""
    d = own_daemon  # nobody has asked it for a CRL

    def crl_signings() -> list[dict[str, Any]]:
        return [e for e in log_lines(d.state) if e.get("purpose") == "crl"
                and e.get("phase") == "intent"]

    deadline = time.monotonic() + 60
    while len({e["key"] for e in crl_signings()}) < 2:  # signed at start, without a GET
        assert time.monotonic() < deadline, crl_signings()
    before = len(crl_signings())
    for path in ("/v1/x509/crl", "/v1/x509/crl/root-ca"):
        assert x509.load_der_x509_crl(_fetch(d, path)).next_update_utc is not None
    assert len(crl_signings()) == before


async def test_crls_and_the_krl_answer_a_conditional_get_until_a_revocation_changes_them(
        own_daemon: Daemon, tmp_path: Path) -> None:
    """An API client's trial: CRLs, crls.pem and the KRL came with no caching headers,
    so a poller fetched them whole each time, with nothing to go by. Each carries an
    ETag (a CRL its thisUpdate too) under no-cache; unchanged, If-None-Match is 304
    without a body; a revocation changes it at once. If-Modified-Since is ignored: a
    review's revocation in the same second as the last CRL was answered 304."""
    d = own_daemon
    cert, _ = enroll(d, tmp_path, "service", ["etag.internal.example"])
    serial = format(x509.load_pem_x509_certificate(cert.read_bytes()).serial_number, "x")
    # (the bundle too: it changes when an issuing CA certificate is revoked, and had no
    # ETag while roots and chain did: an API trial)
    paths = ("/v1/x509/crl", "/v1/x509/crls.pem", "/v1/ssh/krl", "/v1/x509/bundle")
    first: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        for path in paths:
            async with s.get(f"{d.url}{path}", ssl=d.ssl()) as r:
                assert r.status == 200 and r.headers["Cache-Control"] == "no-cache"
                first[path] = r.headers
                body = await r.read()
            if path == "/v1/ssh/krl":  # nothing revoked: version 0, whatever the clock
                assert struct.unpack(">QQ", body[12:28]) == (0, 0), body[:28]
            elif path == "/v1/x509/bundle":
                assert body.startswith(b"-----BEGIN CERTIFICATE-----"), body[:40]
            else:
                when = parsedate_to_datetime(r.headers["Last-Modified"])
                if path == "/v1/x509/crl":
                    assert when == x509.load_der_x509_crl(body).last_update_utc
            async with s.get(f"{d.url}{path}", ssl=d.ssl(),
                             headers={"If-None-Match": r.headers["ETag"]}) as again:
                assert again.status == 304 and await again.read() == b"", path
            if path not in ("/v1/ssh/krl", "/v1/x509/bundle"):  # whole seconds: not a
                # validator (a review)
                async with s.get(f"{d.url}{path}", ssl=d.ssl(), headers={
                        "If-Modified-Since": r.headers["Last-Modified"]}) as again:
                    assert again.status == 200, path
        status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                    body={"serial": serial})
        assert status == 200, raw
        for path in ("/v1/x509/crl", "/v1/x509/crls.pem"):  # re-signed at the revocation
            async with s.get(f"{d.url}{path}", ssl=d.ssl(),
                             headers={"If-None-Match": first[path]["ETag"]}) as r:
                assert r.status == 200 and r.headers["ETag"] != first[path]["ETag"], path
    # Every worker serves the one KRL, its version the newest revocation's: each built
    # its own, stamped with its own clock, and a poller's If-None-Match got 200 and 304 by
    # turns (a relying-party trial)
    line = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    status, _, raw = await http("POST", f"{d.url}/v1/ssh/revoke", d.admin_ssl(),
                                body={"public_key": line})
    assert status == 200, raw
    seen = set()
    for _ in range(12):  # a connection each: the workers take them by turns
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) \
                as one, one.get(f"{d.url}/v1/ssh/krl", ssl=d.ssl()) as r:
            seen.add((r.headers["ETag"], await r.read()))
    assert len(seen) == 1, seen
    [(_, krl)] = seen
    version, generated = struct.unpack(">QQ", krl[12:28])
    revoked_at = time.time()
    assert version == generated and revoked_at - 120 < version <= revoked_at, version


async def test_a_crl_signed_at_a_revocation_holds_for_a_relying_party_a_little_behind(
        own_daemon: Daemon, tmp_path: Path) -> None:
    """A relying-party trial: the CRL re-signed at a revocation, fetched at once by a
    machine whose clock was 2 s behind, was "not yet valid" to OpenSSL, which allows a
    CRL no skew, so every certificate checked with it failed, the unrevoked ones too. And
    a CRL numbered later never has an earlier thisUpdate, by which OpenSSL chooses."""
    d = own_daemon
    kept = enroll(d, tmp_path, "service", ["kept.internal.example"])[0]
    gone = [enroll(d, tmp_path, "service", [f"gone{i}.internal.example"])[0]
            for i in range(2)]
    crls, issuing_crls = [], []
    for cert in gone:
        hsmca("revoke", format(load(cert).serial_number, "x"), "--config",
              d.state / "hsmca.toml", "--url", d.url)
        crls.append(tmp_path / f"crls{len(crls)}.pem")
        crls[-1].write_bytes(_fetch(d, "/v1/x509/crls.pem"))
        issuing_crls.append(x509.load_der_x509_crl(_fetch(d, "/v1/x509/crl")))
    behind = str(int(time.time()) - 30)

    def verify(cert: Path, crl: Path) -> str:
        proc = subprocess.run(
            [require("openssl"), "verify", "-attime", behind, "-crl_check_all", "-CRLfile",
             crl, "-CAfile", d.root, "-untrusted", d.state / "x509" / "issuing.pem", cert],
            capture_output=True, text=True)
        return (proc.stdout + proc.stderr).strip()
    assert verify(kept, crls[1]) == f"{kept}: OK"
    assert "certificate revoked" in verify(gone[1], crls[1])
    # Both CRLs in one file, either way round: OpenSSL must take the newer, which it
    # chooses by thisUpdate, keeping the first of equal ones (a review)
    both = tmp_path / "both.pem"
    for first, then in ((crls[1], crls[0]), (crls[0], crls[1])):
        both.write_bytes(first.read_bytes() + then.read_bytes())
        assert "certificate revoked" in verify(gone[1], both)
    assert issuing_crls[0].last_update_utc < issuing_crls[1].last_update_utc


# ---- revocation reaches the lineage and SSH ---------------------------------------------


def ssh_user_cert(d: Daemon, tmp: Path, cred: tuple[Path, Path], name: str) -> Path:
    subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", tmp / name],
                   check=True)
    hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", cred[0], "--key", cred[1],
          "--pubkey", tmp / f"{name}.pub")
    return tmp / f"{name}-cert.pub"


def krl_says(d: Daemon, tmp: Path, cert: Path) -> str:
    krl = tmp / "krl"
    krl.write_bytes(_fetch(d, "/v1/ssh/krl"))
    proc = subprocess.run([require("ssh-keygen"), "-Q", "-f", krl, cert], capture_output=True,
                          text=True)
    return "REVOKED" if "REVOKED" in proc.stdout else ("ok" if ": ok" in proc.stdout
                                                       else proc.stdout + proc.stderr)


def _fetch(d: Daemon, path: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(d.root))
    import urllib.request
    with urllib.request.urlopen(f"{d.url}{path}", context=ctx, timeout=30) as r:
        return r.read()  # type: ignore[no-any-return]


async def test_key_compromise_revokes_the_lineage_and_its_ssh_certificates(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    d = ca_daemon
    a = enroll(d, tmp_path, "user", ["alice@example.com"], ["alice"])
    ssh_a = ssh_user_cert(d, tmp_path, a, "id_a")
    # B: A renewed with a new key.
    key_b = ec.generate_private_key(ec.SECP256R1())
    status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*a),
                                body={"csr": csr_pem(["alice@example.com"], key_b)})
    assert status == 201, raw
    b = tmp_path / "b.pem", tmp_path / "b.key"
    b[0].write_text(json.loads(raw)["certificate"])
    b[1].write_bytes(key_b.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    ssh_b = ssh_user_cert(d, tmp_path, b, "id_b")
    # A control that must stay good: another user and their SSH certificate.
    bob = enroll(d, tmp_path, "user", ["bob@example.com"], ["bob"])
    ssh_bob = ssh_user_cert(d, tmp_path, bob, "id_bob")

    serial_a = format(load(a[0]).serial_number, "x")
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.ssl(*a),
                                body={"serial": serial_a, "reason": "keyCompromise"})
    assert status == 200, raw
    answer = json.loads(raw)
    serial_b = format(load(b[0]).serial_number, "x")
    assert sorted(answer["revoked"]) == sorted([serial_a, serial_b])
    assert answer["ssh_certificates"] == 2

    status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*b), body={})
    assert status == 403 and json.loads(raw)["type"].endswith("revoked-certificate")
    crl = x509.load_der_x509_crl(_fetch(d, "/v1/x509/crl"))
    for cert in (load(a[0]), load(b[0])):
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
            x509.ReasonFlags.key_compromise)
    assert crl.get_revoked_certificate_by_serial_number(load(bob[0]).serial_number) is None
    await signed(d, load(b[0]), ocsp.OCSPCertStatus.REVOKED)
    # Whoever checks every link of the chain (openssl -crl_check_all) finds the root's
    # CRL too, signed by the root: the issuing CA is not revoked, the leaf is.
    root = x509.load_pem_x509_certificate(d.root.read_bytes())
    root_crl = x509.load_der_x509_crl(_fetch(d, "/v1/x509/crl/root-ca"))
    assert root_crl.issuer == root.subject and root_crl.is_signature_valid(root.public_key())
    crls = tmp_path / "crls.pem"
    crls.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                              for c in (crl, root_crl)))
    for cred, said in ((bob, ": OK"), (a, "certificate revoked")):
        proc = subprocess.run([require("openssl"), "verify", "-crl_check_all", "-CAfile", d.root,
                               "-untrusted", d.state / "x509/issuing.pem", "-CRLfile", crls,
                               cred[0]], capture_output=True, text=True)
        assert said in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert krl_says(d, tmp_path, ssh_a) == "REVOKED"
    assert krl_says(d, tmp_path, ssh_b) == "REVOKED"
    assert krl_says(d, tmp_path, ssh_bob) == "ok"
    status, _, _ = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*bob), body={})
    assert status == 201


async def test_a_plain_revocation_takes_the_ssh_certificates_but_not_the_lineage(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    d = ca_daemon
    a = enroll(d, tmp_path, "host", ["h1.internal.example"])
    status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*a), body={})
    assert status == 201
    renewed = x509.load_pem_x509_certificate(json.loads(raw)["certificate"].encode())
    subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                    tmp_path / "hk"], check=True)
    hsmca("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", a[0], "--key", a[1],
          "--pubkey", tmp_path / "hk.pub")
    serial_a = format(load(a[0]).serial_number, "x")
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"serial": serial_a, "reason": "superseded"})
    assert status == 200 and json.loads(raw)["revoked"] == [serial_a], raw
    assert json.loads(raw)["ssh_certificates"] == 1
    assert krl_says(d, tmp_path, tmp_path / "hk-cert.pub") == "REVOKED"
    await signed(d, renewed, ocsp.OCSPCertStatus.GOOD)
    # An auditor finds which SSH certificate went with it: its intent names the X.509
    # certificate it was issued on the strength of (an SSH trial: the log named only the
    # X.509 serials, the SSH certificate nowhere).
    ssh_serial = re.search(r"Serial: (\d+)", subprocess.run(
        [require("ssh-keygen"), "-L", "-f", tmp_path / "hk-cert.pub"], capture_output=True,
        text=True, check=True).stdout)
    assert ssh_serial
    lines = log_lines(d.state)
    [intent] = [e for e in lines if e.get("purpose") == "ssh-host" and e.get("phase") ==
                "intent" and e.get("serial") == ssh_serial.group(1)]
    [revoke] = [e for e in lines if e["event"] == "cert.revoke" and e["serial"] == serial_a]
    assert intent["owner_serial"] in revoke["serials"]


async def test_an_identity_of_more_certificates_than_an_audit_line_can_name_is_revoked(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """A review: revoking an identity (or a lineage) of ~1,500 live certificates put
    every serial on one cert.revoke line, longer than an audit line may be: a 500, and
    nothing revoked. Its lines name 1,000 serials each, `part` of `parts`, and every
    certificate is revoked and on the CRL."""
    d = ca_daemon
    cred = enroll(d, tmp_path, "service", ["many.internal.example"])
    ctx = d.ssl(*cred)
    async with aiohttp.ClientSession() as s:
        async def renew() -> None:
            async with s.post(f"{d.url}/v1/x509/renew", json={}, ssl=ctx) as r:
                assert r.status == 201, await r.text()
        for _ in range(2010 // 15):  # 15 at a time: 2,010 renewals, each one live
            await asyncio.gather(*(renew() for _ in range(15)))
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "many.internal.example"})
    assert status == 200, raw
    revoked = json.loads(raw)["revoked"]
    assert len(revoked) == 2011, len(revoked)
    lines = [e for e in log_lines(d.state) if e["event"] == "cert.revoke"
             and e.get("identity") == "many.internal.example"]
    assert [(e["part"], e["parts"], len(e["serials"])) for e in lines] == [
        (1, 3, 1000), (2, 3, 1000), (3, 3, 11)], [(e.get("part"), len(e["serials"]))
                                                  for e in lines]
    assert sorted(s for e in lines for s in e["serials"]) == sorted(revoked)
    status, _, der = await http("GET", f"{d.url}/v1/x509/crl", d.ssl())
    listed = {format(r.serial_number, "x") for r in x509.load_der_x509_crl(der)}
    assert set(revoked) <= listed


async def test_ssh_revocations_of_one_certificate_at_once_leave_one_standing_line(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """A review: four admins' revocations of one SSH certificate at once were three
    200s, two of them saying 0 certificates revoked, and three ssh.revoke lines each
    claiming one. One wins; the others are 409 already-revoked, as a repeat is, and
    their lines are voided."""
    d = ca_daemon
    host = enroll(d, tmp_path, "host", ["race.internal.example"])
    subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                    tmp_path / "race"], check=True)
    hsmca("ssh", "host", "--url", d.url, "--ca", d.root, "--cert", host[0], "--key", host[1],
          "--pubkey", tmp_path / "race.pub")
    listed = subprocess.run([require("ssh-keygen"), "-L", "-f", tmp_path / "race-cert.pub"],
                            capture_output=True, text=True, check=True).stdout
    match = re.search(r"Serial: (\d+)", listed)
    assert match
    serial = int(match.group(1))
    ctx = d.admin_ssl()
    async with aiohttp.ClientSession() as s:
        async def revoke() -> tuple[int, dict[str, Any]]:
            async with s.post(f"{d.url}/v1/ssh/revoke", json={"serial": serial},
                              ssl=ctx) as r:
                return r.status, await r.json(content_type=None)
        answers = await asyncio.gather(*(revoke() for _ in range(8)))
    won = [a for status, a in answers if status == 200]
    assert [a["revoked_certificates"] for a in won] == [1], answers
    assert all(a["type"].endswith("already-revoked") for status, a in answers
               if status != 200), answers
    lines = log_lines(d.state)
    voided = {e["voids"] for e in lines if e["event"] == "record.void"}
    standing = [e for e in lines if e["event"] == "ssh.revoke" and e.get("serial") ==
                str(serial) and e["seq"] not in voided]
    assert len(standing) == 1, standing


async def test_revoke_identity_takes_everything_issued_to_a_name(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    d = ca_daemon
    first = enroll(d, tmp_path, "service", ["gone.internal.example"])
    second = enroll(d, tmp_path, "service", ["gone.internal.example", "x.internal.example"])
    other = enroll(d, tmp_path, "service", ["stays.internal.example"])
    proc = hsmca("revoke", "--identity", "gone.internal.example", "--reason",
                 "cessationOfOperation", "--config", d.state / "hsmca.toml", "--url", d.url)
    assert "revoked 2 certificate(s) issued to gone.internal.example" in proc.stdout
    for cred in (first, second):
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*cred), body={})
        assert status == 403 and json.loads(raw)["type"].endswith("revoked-certificate")
    status, _, _ = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*other), body={})
    assert status == 201
    # Only an admin may; and what is gone is gone.
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.ssl(*other),
                                body={"identity": "stays.internal.example"})
    assert status == 403 and json.loads(raw)["type"].endswith("wrong-role")
    # A repeat (a retry whose answer was lost) is 409 already-revoked, as a serial's is
    # (an API docs trial's was 404, read as never revoked); a name never issued is 404
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "gone.internal.example"})
    assert status == 409 and json.loads(raw)["type"].endswith("already-revoked"), raw
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "never.internal.example"})
    assert status == 404, raw


async def test_an_identity_offboarded_then_found_leaked_is_revoked_for_compromise(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """A relying-party trial: a host offboarded (`revoke --identity`), its key found
    leaked later: `revoke --identity NAME --reason keyCompromise` was refused as revoked
    already, and the leaked key enrolled again. Its certificates' reason becomes
    keyCompromise (their revocation time stands), and the key is barred, as a serial's
    revocation again for keyCompromise does; once so, a repeat is 409."""
    d = ca_daemon
    a = enroll(d, tmp_path, "service", ["offboarded.internal.example"])
    key = serialization.load_pem_private_key(a[1].read_bytes(), None)

    async def revoke(reason: str) -> tuple[int, dict[str, Any]]:
        status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                    body={"identity": "offboarded.internal.example",
                                          "reason": reason})
        return status, json.loads(raw)
    status, first = await revoke("cessationOfOperation")
    assert status == 200, first
    status, again = await revoke("keyCompromise")
    assert status == 200 and again["revoked"] == first["revoked"], again
    assert again["revoked_at"] == first["revoked_at"], again  # the time that stands
    after = await signed(d, load(a[0]), ocsp.OCSPCertStatus.REVOKED)
    assert after.revocation_reason == x509.ReasonFlags.key_compromise
    await barred(d, "offboarded.internal.example", key)
    status, last = await revoke("keyCompromise")
    assert status == 409 and last["type"].endswith("already-revoked"), last


async def test_an_identity_revoked_again_is_409_whatever_other_names_contain_it(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """A review: a repeat of an identity's revocation looked for the name among the
    first 100 revoked certificates whose names contain it as text, and 101 revoked for
    a.rr.internal.example hid rr.internal.example's: 404, read as never revoked."""
    d = ca_daemon
    enroll(d, tmp_path, "service", ["rr.internal.example"])
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "rr.internal.example"})
    assert status == 200, raw
    other = enroll(d, tmp_path, "service", ["a.rr.internal.example"])
    for _ in range(100):
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*other), body={})
        assert status == 201, raw
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "a.rr.internal.example"})
    assert status == 200 and len(json.loads(raw)["revoked"]) == 101, raw
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "rr.internal.example"})
    assert status == 409 and json.loads(raw)["type"].endswith("already-revoked"), raw


async def test_revoke_identity_leaves_the_daemon_s_own_listener_certificate(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """A relying-party trial: `revoke --identity localhost` (SSH hosts on loopback are
    named so, as the CA's listener is) revoked the CA's own listener certificate too,
    said as one more certificate "issued to localhost". Offboarding a name takes its
    holders' certificates, not the daemon's own."""
    d = ca_daemon
    served = load(d.state / "tls" / "server.pem")
    host = enroll(d, tmp_path, "host", ["localhost"])
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "localhost"})
    assert status == 200, raw
    assert json.loads(raw)["revoked"] == [format(load(host[0]).serial_number, "x")], raw
    status, _, der = await http("GET", f"{d.url}/v1/x509/crl", d.ssl())
    crl = x509.load_der_x509_crl(der)
    assert crl.get_revoked_certificate_by_serial_number(served.serial_number) is None


async def test_revoke_identity_reaches_an_ssh_certificate_that_outlived_its_x509(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """An SSH user certificate (up to 24 h) may outlive the X.509 credential it was asked
    with: offboarding by name must still put it in the KRL (an SSH trial: "nothing live
    was issued", and the person still logged in)."""
    d = ca_daemon
    # A credential that expires soon, used before it does: on a loaded machine (a CI
    # run took 19 minutes) 3 s ran out between the enrollment and the SSH request,
    # so a longer one is tried then.
    for ttl in (3, 15, 60):
        gina = enroll(d, tmp_path, "user", ["gina@example.com"], ["gina"],
                      "--ttl", f"{ttl}s")
        subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                        tmp_path / f"id_gina{ttl}"], check=True)
        asked = hsmca("ssh", "user", "--url", d.url, "--ca", d.root, "--cert", gina[0],
                      "--key", gina[1], "--pubkey", tmp_path / f"id_gina{ttl}.pub",
                      check=False)
        if asked.returncode == 0:
            break
        assert "expired at" in asked.stderr, asked.stderr
    assert asked.returncode == 0, asked.stderr
    ssh_gina = tmp_path / f"id_gina{ttl}-cert.pub"
    # Until the daemon itself says her credential expired: asked on one kept-alive
    # connection, each answer pacing the next question, within a deadline.
    deadline, ctx = time.monotonic() + ttl + 30, d.ssl(*gina)
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{d.url}/v1/whoami", ssl=ctx) as answer:
                said = await answer.json(content_type=None)
            if answer.status == 403 and said["type"].endswith("expired-certificate"):
                break
            assert answer.status == 200 and time.monotonic() < deadline, said
    assert krl_says(d, tmp_path, ssh_gina) == "ok"
    proc = hsmca("revoke", "--identity", "gina@example.com", "--config",
                 d.state / "hsmca.toml", "--url", d.url)
    assert "revoked 1 certificate(s) issued to gina@example.com" in proc.stdout, proc.stdout
    assert krl_says(d, tmp_path, ssh_gina) == "REVOKED"


@pytest.mark.parametrize("reason, status, problem", [
    ("cACompromise", 403, "revocation-reason-not-allowed"),
    ("ca_compromise", 403, "revocation-reason-not-allowed"),
    ("certificateHold", 403, "revocation-reason-not-allowed"),
    ("aACompromise", 403, "revocation-reason-not-allowed"),
    (1, 200, None), ("keyCompromise", 200, None), ("key_compromise", 200, None),
    ("superseded", 200, None), (4, 200, None), ("nonsense", 400, "bad-request"),
])
async def test_what_a_holder_may_say_about_their_own_certificate(
        ca_daemon: Daemon, tmp_path: Path, reason: object, status: int,
        problem: str | None) -> None:
    d = ca_daemon
    cred = enroll(d, tmp_path, "service", ["self.internal.example"])
    serial = format(load(cred[0]).serial_number, "x")
    got, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.ssl(*cred),
                             body={"serial": serial, "reason": reason})
    assert got == status, raw
    if problem:
        assert json.loads(raw)["type"].endswith(problem)


# ---- keys and TLS ---------------------------------------------------------------------------


def _ssh_rsa(e: int, bits: int) -> str:
    def string(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    def mpint(n: int) -> bytes:
        return string(n.to_bytes(n.bit_length() // 8 + 1, "big"))

    n = (1 << (bits - 1)) | int.from_bytes(os.urandom(bits // 8), "big") | 1
    n &= (1 << bits) - 1
    blob = string(b"ssh-rsa") + mpint(e) + mpint(n)
    return "ssh-rsa " + base64.b64encode(blob).decode()


@pytest.mark.parametrize("e, bits, words", [(3, 2048, "exponent 3"),
                                            ((1 << 2046) + 1, 2048, "exponent of 2047 bits"),
                                            (65537, 8200, "8200 bits")],
                         ids=["e-3", "e-of-2047-bits", "8200-bits"])
async def test_ssh_rsa_keys_need_a_real_exponent_and_a_sane_size(e: int, bits: int,
                                                                 words: str) -> None:
    with pytest.raises(Refused, match=words):
        ssh.parse_public_key(_ssh_rsa(e, bits))
    line = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert ssh.parse_public_key(line).line == line  # the control


async def test_tls_1_2_offers_no_cbc_suite(ca_daemon: Daemon) -> None:
    host, port = ca_daemon.url.removeprefix("https://").rsplit(":", 1)

    def handshake(ciphers: str) -> str | None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca_daemon.root)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
        try:
            with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                                 server_hostname=host) as s:
                return s.cipher()[0]  # type: ignore[index]
        except ssl.SSLError as exc:
            return f"refused: {exc.reason}"

    assert handshake("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384").startswith("refused")
    assert handshake("ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"


async def test_a_key_revoked_for_compromise_is_never_certified_again(
        ca_daemon: Daemon) -> None:
    """A client trial: a certificate revoked for keyCompromise, then a new token and the
    same CSR (EST clients keep their configured key) got a new certificate for the
    stolen key. Any key a keyCompromise revocation named is refused now, to anyone."""
    d = ca_daemon
    key = ec.generate_private_key(ec.SECP256R1())

    async def enroll_with(k: Any, name: str) -> tuple[int, dict[str, Any]]:
        token = await bootstrap_token(d, "service", [name])
        status, _, body = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                     body={"csr": csr_pem([name], k)},
                                     headers={"Authorization": f"Bearer {token}"})
        return status, json.loads(body)
    status, first = await enroll_with(key, "stolen.internal.example")
    assert status == 201, first
    serial = format(x509.load_pem_x509_certificate(first["certificate"].encode())
                    .serial_number, "x")
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"serial": serial, "reason": "keyCompromise"})
    assert status == 200, raw
    for name in ("stolen.internal.example", "elsewhere.internal.example"):
        status, refused = await enroll_with(key, name)
        assert status == 403 and refused["type"].endswith("revoked-key"), refused
        assert "was reported compromised" in refused["detail"]
        assert "Make a new key" in refused["detail"]
    status, fresh = await enroll_with(ec.generate_private_key(ec.SECP256R1()),
                                      "stolen.internal.example")
    assert status == 201, fresh


async def test_a_certificate_revoked_as_superseded_can_still_be_revoked_for_compromise(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """A service decommissioned (superseded), its key found leaked a week later: the
    admin revokes it again for keyCompromise. The reason becomes keyCompromise in the
    CRL and OCSP, the revocation keeps its time, the key is barred and the lineage
    revoked. It was refused as already revoked, and the leaked key certified again."""
    d = ca_daemon
    a = enroll(d, tmp_path, "service", ["leaked.internal.example"])
    key = serialization.load_pem_private_key(a[1].read_bytes(), None)
    # B: A renewed with the same key, still live when A is retired.
    status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*a), body={})
    assert status == 201, raw
    cert_b = x509.load_pem_x509_certificate(json.loads(raw)["certificate"].encode())
    serial_a = format(load(a[0]).serial_number, "x")

    async def revoke(reason: str) -> tuple[int, dict[str, Any]]:
        status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                    body={"serial": serial_a, "reason": reason})
        return status, json.loads(raw)
    status, first = await revoke("superseded")
    assert status == 200 and first["revoked"] == [serial_a], first
    before = await signed(d, load(a[0]), ocsp.OCSPCertStatus.REVOKED)
    assert before.revocation_reason == x509.ReasonFlags.superseded

    status, again = await revoke("superseded")
    assert status == 409 and "already revoked (superseded)" in again["detail"], again
    assert again["type"].endswith("/already-revoked"), again  # a type to branch on
    assert "only keyCompromise may be given again" in again["detail"]
    status, answer = await revoke("keyCompromise")
    assert status == 200, answer
    assert sorted(answer["revoked"]) == sorted([serial_a, format(cert_b.serial_number, "x")])
    assert answer["revoked_at"] == first["revoked_at"], answer  # the time that stands

    after = await signed(d, load(a[0]), ocsp.OCSPCertStatus.REVOKED)
    assert after.revocation_reason == x509.ReasonFlags.key_compromise
    assert after.revocation_time_utc == before.revocation_time_utc
    crl = x509.load_der_x509_crl(_fetch(d, "/v1/x509/crl"))
    for cert in (load(a[0]), cert_b):
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        assert entry is not None
        assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
            x509.ReasonFlags.key_compromise)
    await barred(d, "leaked.internal.example", key)
    status, last = await revoke("keyCompromise")
    assert status == 409 and last["detail"].endswith("already revoked (keyCompromise)"), last
    lines = [e for e in log_lines(d.state) if e.get("event") == "cert.revoke"
             and serial_a in (e.get("serials") or [])]
    assert [e["reason"] for e in lines] == ["superseded", "keyCompromise"]


async def test_key_compromise_revokes_every_certificate_of_the_key(
        ca_daemon: Daemon, tmp_path: Path) -> None:
    """An EST client enrolled twice with its configured key (two tokens, two lineages):
    revoking one certificate for keyCompromise revokes the other too, which answered
    OCSP good and renewed with the stolen key."""
    d = ca_daemon
    key = ec.generate_private_key(ec.SECP256R1())
    certs = []
    for _ in range(2):
        token = await bootstrap_token(d, "service", ["twice.internal.example"])
        status, _, raw = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                    body={"csr": csr_pem(["twice.internal.example"], key)},
                                    headers={"Authorization": f"Bearer {token}"})
        assert status == 201, raw
        certs.append(x509.load_pem_x509_certificate(json.loads(raw)["certificate"].encode()))
    other = enroll(d, tmp_path, "service", ["twice.internal.example"])
    first, second = (format(c.serial_number, "x") for c in certs)
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"serial": first, "reason": "keyCompromise"})
    assert status == 200, raw
    assert sorted(json.loads(raw)["revoked"]) == sorted([first, second])
    gone = await signed(d, certs[1], ocsp.OCSPCertStatus.REVOKED)
    assert gone.revocation_reason == x509.ReasonFlags.key_compromise
    # The same name with another key is not the compromised key's: it stays good.
    await signed(d, load(other[0]), ocsp.OCSPCertStatus.GOOD)


def _served(d: Daemon) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(d.root))
    ctx.check_hostname = False
    host, port = d.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_the_daemon_s_own_tls_certificate_revoked_is_replaced_with_a_new_key(
        own_daemon: Daemon) -> None:
    """A relying-party trial revoked the daemon's TLS certificate as keyCompromise (its
    key leaked, say): the daemon presented it on, through SIGHUPs and restarts, and
    relying parties that check saw the CA's own endpoint revoked. It is replaced at
    once, with a new key."""
    d = own_daemon
    before = _served(d)
    hsmca("revoke", format(before.serial_number, "x"), "--reason", "keyCompromise",
          "--config", d.state / "hsmca.toml", "--url", d.url)
    deadline = time.monotonic() + 60
    while (now := _served(d)).serial_number == before.serial_number:  # paced by handshakes
        assert time.monotonic() < deadline, "still presenting the revoked certificate"
    assert now.public_key() != before.public_key()
    assert d.wait_stderr(lambda: any("renewing the daemon's TLS certificate" in line
                                     and "revoked (keyCompromise)" in line
                                     for line in d.stderr), within=30)
