"""A corpus of bad requests across every endpoint: each gets a 4xx problem+json,
the daemon stays healthy, and its audit log still verifies afterwards."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yarl
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import ocsp as x509_ocsp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ca import policy, ra, ssh
from ca.policy import Policy, Refused
from ca.server.common import parse_csr
from ca.server.problems import Problem
from tests.conftest import Daemon, init_ca, require, start_daemon
from tests.helpers import audit_verify, bootstrap_token, csr_pem, enroll, http
from tests.test_ra import admin, context


@dataclass(frozen=True)
class Case:
    what: str
    method: str
    path: str
    status: int  # the status it must get
    kind: str  # and the problem type (after https://hsmca.dev/problems/)
    who: str = "none"  # none | admin | service | user | host | token
    json_body: Any = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


GOOD_SSH = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
JSON = {"Content-Type": "application/json"}
PKCS10 = {"Content-Type": "application/pkcs10"}
TYPES = "https://hsmca.dev/problems/"


def unknown_key_algorithm_csr(pem: str) -> bytes:
    """The CSR's DER with its key's algorithm OID (id-ecPublicKey, 1.2.840.10045.2.1)
    made into one nobody knows (0.0.840.10045.2.1): it still parses."""
    return pem_der(pem).replace(bytes.fromhex("06072a8648ce3d0201"),
                       bytes.fromhex("0607008648ce3d0201"), 1)


def pem_der(pem: str) -> bytes:
    return parse_csr(pem).public_bytes(serialization.Encoding.DER)


def x400_san_csr() -> str:
    """A validly signed CSR whose SAN holds an x400Address, a name type cryptography
    refuses to parse (UnsupportedGeneralNameType, answered 500 once). cryptography
    will not build one, so its OtherName's tag is changed and the request re-signed."""
    from cryptography import x509 as cx
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID, ObjectIdentifier
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (cx.CertificateSigningRequestBuilder()
           .subject_name(cx.Name([cx.NameAttribute(NameOID.COMMON_NAME, "ok.internal.example")]))
           .add_extension(cx.SubjectAlternativeName([cx.OtherName(
               ObjectIdentifier("1.2.3.4"), b"\x05\x00")]), critical=False)
           .sign(key, hashes.SHA256()))
    tbs = csr.tbs_certrequest_bytes
    at = tbs.index(b"\xa0", tbs.index(bytes.fromhex("0603551d11")))  # [0] otherName
    tbs = tbs[:at] + b"\xa3" + tbs[at + 1:]  # [3] x400Address
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))

    def tlv(tag: int, body: bytes) -> bytes:  # DER: the shortest length form
        n = len(body)
        if n < 128:
            return bytes([tag, n]) + body
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag, 0x80 | len(size)]) + size + body

    alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    return der_to_pem(tlv(0x30, tbs + alg + tlv(0x03, b"\x00" + sig)))


# Ed25519 "keys" of small order, for which R = the point, S = 0 is a signature of
# every message (an SSH trial logged in to sshd as root with such a certificate
# alone): the identity, and a point of order 8.
SMALL_ORDER = [bytes.fromhex("01" + "00" * 31), bytes.fromhex(
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")]


def ssh_ed25519_line(raw: bytes) -> str:
    blob = b"".join(len(x).to_bytes(4, "big") + x for x in (b"ssh-ed25519", raw))
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def small_order_csr(names: list[str]) -> str:
    """A CSR of the identity point, its signature (R = the identity, S = 0) valid: a
    real key's CSR with both swapped, as the lengths are the same."""
    key = ed25519.Ed25519PrivateKey.generate()
    der = pem_der(csr_pem(names, key))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    signature = parse_csr(csr_pem(names, key)).signature  # (Ed25519: the same each time)
    assert der.count(raw) == 1 and der.endswith(signature)
    der = der.replace(raw, SMALL_ORDER[0])
    forged = der_to_pem(der[:-64] + SMALL_ORDER[0] + bytes(32))
    assert parse_csr(forged).is_signature_valid  # what makes the key a bearer's
    return forged


def der_to_pem(der: bytes) -> str:
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


def corpus() -> list[Case]:
    """Every case with the status and problem type it must get: a case refused for
    another reason than the one it is named for fails."""
    c: list[Case] = []
    add = c.append
    # --- malformed bodies on every JSON endpoint -----------------------------------
    json_endpoints = [("/v1/tokens", "admin"), ("/v1/x509/enroll", "token"),
                      ("/v1/x509/renew", "service"), ("/v1/x509/revoke", "service"),
                      ("/v1/ssh/host", "host"), ("/v1/ssh/user", "user"),
                      ("/v1/ssh/revoke", "admin")]
    for path, who in json_endpoints:
        add(Case(f"{path} not JSON", "POST", path, 400, "bad-json", who, data=b"{nope",
                 headers=JSON))
        add(Case(f"{path} JSON array", "POST", path, 400, "bad-json", who, data=b"[1,2]",
                 headers=JSON))
        add(Case(f"{path} JSON string", "POST", path, 400, "bad-json", who, data=b'"x"',
                 headers=JSON))
        add(Case(f"{path} form encoded", "POST", path, 415, "unsupported-media-type", who,
                 data=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"}))
        add(Case(f"{path} oversized", "POST", path, 413, "request-entity-too-large", who,
                 data=b'{"x":"' + b"A" * 70_000 + b'"}', headers=JSON))
        add(Case(f"{path} invalid UTF-8", "POST", path, 400, "bad-json", who,
                 data=b'{"x":"\xff\xfe"}', headers=JSON))
        # Not JSON, though Python's parser takes them: NaN, and a key given twice whose
        # last value would silently win (an API client's trial).
        add(Case(f"{path} NaN", "POST", path, 400, "bad-json", who,
                 data=b'{"ttl": NaN}', headers=JSON))
        add(Case(f"{path} a key twice", "POST", path, 400, "bad-json", who,
                 data=b'{"ttl": "1h", "ttl": "30d"}', headers=JSON))
        add(Case(f"{path} infinite number", "POST", path, 400, "bad-json", who,
                 data=b'{"ttl": 1e999}', headers=JSON))
        add(Case(f"{path} lone surrogate", "POST", path, 400, "bad-json", who,
                 data=b'{"names":["\\ud800.example"],"key_id":"\\udce9"}', headers=JSON))
        add(Case(f"{path} encoded surrogate", "POST", path, 400, "bad-json", who,
                 data=b'{"key_id":"\xed\xa0\x80","names":["\xed\xa0\x80.x"]}',
                 headers=JSON))
        add(Case(f"{path} wrong method", "GET", path, 405, "method-not-allowed", who))
        add(Case(f"{path} deep nesting", "POST", path, 400, "bad-json", who,
                 data=b"[" * 5000 + b"]" * 5000, headers=JSON))
    # --- tokens ---------------------------------------------------------------------
    for body, status, kind in [
            ({"role": "root", "names": ["a.example"]}, 400, "bad-request"),
            # a field missing, or of the wrong JSON type: bad-field, as api.md says (an
            # API trial got bad-request)
            ({"role": "service"}, 400, "bad-field"),
            ({"names": ["a.example"]}, 400, "bad-field"),
            ({"role": "service", "names": []}, 400, "bad-request"),
            ({"role": "service", "names": "a.example"}, 400, "bad-field"),
            ({"role": "service", "names": [42]}, 400, "bad-name"),
            ({"role": "service", "names": ["a b.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["a,b.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["a\nb.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["bücher.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["UPPER.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["-bad.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["a" * 64 + ".example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["*.wild.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["a.example."]}, 400, "bad-name"),
            ({"role": "service", "names": ["a\u202eexample"]}, 400, "bad-name"),
            ({"role": "service", "names": ["a\u200b.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["ok.example"], "ttl": "forever"}, 400,
             "bad-request"),
            ({"role": "service", "names": ["ok.example"], "ttl": 5}, 400, "bad-field"),
            ({"role": "service", "names": ["ok.example"], "ttl": "999d"}, 400,
             "lifetime-too-long"),
            ({"role": "service", "names": ["ok.example"], "ttl": "-5m"}, 400, "bad-request"),
            ({"role": "service", "names": ["ok.example"], "principals": ["root"]}, 400,
             "bad-request"),
            ({"role": "service", "names": ["alice@example.com"]}, 400, "bad-request"),
            ({"role": "user", "names": ["alice@example.com"], "principals": ["a,b"]}, 400,
             "bad-name"),
            ({"role": "user", "names": ["alice@example.com"], "principals": ["alice\n"]},
             400, "bad-name"),
            ({"role": "user", "names": ["alice@example.com"], "principals": [""]}, 400,
             "bad-name"),
            ({"role": "user", "names": ["alice@example.com"], "principals": ["x" * 300]}, 400,
             "bad-name"),
            ({"role": "user", "names": ["not-an-email.example"]}, 400, "bad-request"),
            ({"role": "user", "names": ["a@b@example.com"]}, 400, "bad-name"),
            ({"role": "user", "names": ["a+<i>@x.example"]}, 400, "bad-name"),
            ({"role": "user", "names": ['"quoted"@x.example']}, 400, "bad-name"),
            ({"role": "host", "names": ["10.0.0.1"]}, 400, "bad-request"),
            ({"role": "admin", "names": ["a.example", "b.example"]}, 400, "bad-request"),
            ({"role": "service", "names": ["ok.example"], "extra": True}, 400, "bad-field"),
            ({"role": "service", "names": ["ftp://"]}, 400, "bad-name"),
            # An A-label that is not punycode of anything (SPEC 8: IDNs in A-label form).
            ({"role": "service", "names": ["xn--zz.internal.example"]}, 400, "bad-name"),
            ({"role": "service", "names": ["ok.example"] * 101}, 400, "bad-request")]:
        add(Case(f"token {json.dumps(body)[:90]}", "POST", "/v1/tokens", status, kind, "admin",
                 body))
    add(Case("tokens as service", "POST", "/v1/tokens", 403, "wrong-role", "service",
             {"role": "admin", "names": ["x.example"]}))
    add(Case("tokens without cert", "POST", "/v1/tokens", 403, "client-certificate-required",
             "none", {"role": "admin", "names": ["x.example"]}))
    # --- enroll -----------------------------------------------------------------------
    good = csr_pem(["ok.internal.example"])
    for what, body, status, kind in [
            ("csr number", {"csr": 1}, 400, "bad-field"),
            ("csr null", {"csr": None}, 400, "bad-field"),
            ("csr empty", {"csr": ""}, 400, "bad-csr"),
            ("csr garbage", {"csr": "garbage"}, 400, "bad-csr"),
            ("csr half", {"csr": good[:200]}, 400, "bad-csr"),
            ("csr b64 junk", {"csr": "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n"
                                     "-----END CERTIFICATE REQUEST-----\n"}, 400, "bad-csr"),
            ("csr not DER", {"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                    "-----END CERTIFICATE REQUEST-----\n"}, 400, "bad-csr"),
            ("csr a cert", {"csr": good.replace("CERTIFICATE REQUEST", "CERTIFICATE")}, 400,
             "bad-csr"),
            # A second block, unread before (a security trial): refused, not ignored
            ("csr two blocks", {"csr": good + csr_pem(["evil.example.com"])}, 400,
             "bad-csr"),
            ("csr wrong names", {"csr": csr_pem(["evil.example.com"])}, 403,
             "name-not-granted"),
            ("csr ip not granted", {"csr": csr_pem(["10.9.9.9"])}, 403, "name-not-granted"),
            ("ttl too long", {"csr": good, "ttl": "400d"}, 400, "lifetime-too-long"),
            ("ttl type", {"csr": good, "ttl": ["1h"]}, 400, "bad-field"),
            ("no csr", {}, 400, "bad-field"),
            ("csr ed25519 small order", {"csr": small_order_csr(["ok.internal.example"])},
             400, "bad-key")]:
        add(Case(f"enroll {what}", "POST", "/v1/x509/enroll", status, kind, "token", body))
    for auth in ["", "Bearer", "Bearer ", "Basic abc", "Bearer " + "x" * 5000,
                 "Bearer hsmca-ffff-forged", "Bearer \u00e9t\u00e9", "Bearer \udce9"]:
        add(Case(f"enroll auth {auth[:20]!r}", "POST", "/v1/x509/enroll", 401, "bad-token",
                 "none", {"csr": good}, headers={"Authorization": auth} if auth else {}))
    # --- renew / revoke ---------------------------------------------------------------
    add(Case("renew unknown field", "POST", "/v1/x509/renew", 400, "bad-field", "service",
             {"names": ["x"]}))
    add(Case("renew bad csr", "POST", "/v1/x509/renew", 400, "bad-csr", "service",
             {"csr": "x"}))
    # Found by the mutation fuzz below: a key algorithm cryptography does not know
    # raised UnsupportedAlgorithm, answered 500.
    odd = unknown_key_algorithm_csr(good)
    add(Case("enroll csr unknown key algorithm", "POST", "/v1/x509/enroll", 400, "bad-csr",
             "token", {"csr": der_to_pem(odd)}))
    add(Case("renew csr unknown key algorithm", "POST", "/v1/x509/renew", 400, "bad-csr",
             "service", {"csr": der_to_pem(odd)}))
    # And a validly signed CSR with a name type cryptography does not parse.
    x400 = x400_san_csr()
    add(Case("enroll csr x400Address SAN", "POST", "/v1/x509/enroll", 400, "bad-csr", "token",
             {"csr": x400}))
    add(Case("renew csr x400Address SAN", "POST", "/v1/x509/renew", 400, "bad-csr", "service",
             {"csr": x400}))
    # Also found by it: a CSR version other than v1 (0) raised InvalidVersion.
    wrong_version = bytearray(pem_der(good))
    # The first INTEGER 0 is the version inside CertificationRequestInfo.
    wrong_version[wrong_version.index(b"\x02\x01\x00") + 2] = 1
    add(Case("enroll csr version 2", "POST", "/v1/x509/enroll", 400, "bad-csr", "token",
             {"csr": der_to_pem(bytes(wrong_version))}))
    add(Case("est csr version 2", "POST", "/.well-known/est/simpleenroll", 400, "bad-csr",
             "token", data=base64.b64encode(bytes(wrong_version)), headers=PKCS10))
    add(Case("est csr unknown key algorithm", "POST", "/.well-known/est/simplereenroll", 400,
             "bad-csr", "service", data=base64.b64encode(odd), headers=PKCS10))
    add(Case("renew no cert", "POST", "/v1/x509/renew", 403, "client-certificate-required",
             "none", {}))
    # int(text, 16) alone would take " 1_0" as 0x10 and "0x1" as 1.
    for serial in ["zz", "", "0", "-1", "1" * 60, 12, " 1_0", "0x1a", "1a "]:
        add(Case(f"revoke serial {serial!r}", "POST", "/v1/x509/revoke", 400, "bad-field",
                 "admin", {"serial": serial}))
    add(Case("revoke someone else's", "POST", "/v1/x509/revoke", 403, "wrong-role", "service",
             {"serial": "abc"}))
    add(Case("revoke unknown serial", "POST", "/v1/x509/revoke", 404, "not-found", "admin",
             {"serial": "abc"}))
    add(Case("revoke bad reason", "POST", "/v1/x509/revoke", 400, "bad-request", "admin",
             {"serial": "abc", "reason": "because"}))
    # --- SSH ----------------------------------------------------------------------------
    for what, key, status, kind in [
            ("empty", "", 400, "bad-request"), ("number", 5, 400, "bad-field"),
            ("two lines", GOOD_SSH + "\n" + GOOD_SSH, 400, "bad-request"),
            ("cert", "ssh-ed25519-cert-v01@openssh.com AAAA", 400, "bad-request"),
            ("sk", "sk-ssh-ed25519@openssh.com AAAA", 400, "bad-key"),
            ("dss", "ssh-dss AAAA", 400, "bad-key"),
            ("type only", "ssh-ed25519", 400, "bad-request"),
            ("bad b64", "ssh-ed25519 ####", 400, "bad-key"),
            ("mismatched type", "ssh-rsa " + GOOD_SSH.split()[1], 400, "bad-key"),
            ("huge", "ssh-ed25519 " + "A" * 20000, 400, "bad-request"),
            ("ed25519 identity", ssh_ed25519_line(SMALL_ORDER[0]), 400, "bad-key"),
            ("ed25519 order 8", ssh_ed25519_line(SMALL_ORDER[1]), 400, "bad-key"),
            ("ed25519 zeros", ssh_ed25519_line(bytes(32)), 400, "bad-key"),
            ("ed25519 not on curve", ssh_ed25519_line(bytes.fromhex("ed" + "ff" * 30 + "7f")),
             400, "bad-key")]:
        add(Case(f"ssh user key {what}", "POST", "/v1/ssh/user", status, kind, "user",
                 {"public_key": key}))
    for what, body, status, kind in [
            ("principal comma", {"principals": ["a,b"]}, 400, "bad-name"),
            ("principal space", {"principals": ["a b"]}, 400, "bad-name"),
            ("principal empty list", {"principals": []}, 400, "bad-request"),
            ("principal not list", {"principals": "alice"}, 400, "bad-field"),
            ("principal not granted", {"principals": ["root"]}, 403, "principal-not-granted"),
            ("ttl over", {"ttl": "25h"}, 400, "lifetime-too-long"),
            ("ttl junk", {"ttl": "soon"}, 400, "bad-request"),
            # (not lifetime-too-long, which says to shorten it: an API trial)
            ("ttl under a minute", {"ttl": "1s"}, 400, "bad-request"),
            ("ttl number", {"ttl": 60}, 400, "bad-field"),
            ("source bad", {"source_address": ["not-an-ip"]}, 400, "bad-request"),
            ("source scoped", {"source_address": ["fe80::1%eth0"]}, 400, "bad-request"),
            ("source number", {"source_address": ["10.0.0.0/8", 5]}, 400, "bad-request"),
            ("source not list", {"source_address": "10.0.0.0/8"}, 400, "bad-field"),
            ("unknown field", {"force": True}, 400, "bad-field")]:
        add(Case(f"ssh user {what}", "POST", "/v1/ssh/user", status, kind, "user",
                 {"public_key": GOOD_SSH, **body}))
    add(Case("ssh host other name", "POST", "/v1/ssh/host", 403, "principal-not-granted",
             "host", {"public_key": GOOD_SSH, "principals": ["other.example"]}))
    add(Case("ssh host small-order key", "POST", "/v1/ssh/host", 400, "bad-key", "host",
             {"public_key": ssh_ed25519_line(SMALL_ORDER[1])}))
    add(Case("ssh host as user", "POST", "/v1/ssh/host", 403, "wrong-role", "user",
             {"public_key": GOOD_SSH}))
    add(Case("ssh user as host", "POST", "/v1/ssh/user", 403, "wrong-role", "host",
             {"public_key": GOOD_SSH}))
    add(Case("ssh revoke as user", "POST", "/v1/ssh/revoke", 403, "wrong-role", "user",
             {"serial": "1"}))
    for body, status, kind in [
            ({}, 400, "bad-field"), ({"serial": "1", "key_id": "x"}, 400, "bad-field"),
            ({"key_id": ""}, 400, "bad-field"), ({"key_id": "  "}, 400, "bad-field"),
            ({"key_id": "a@b:1\u0000"}, 400, "bad-field"),
            ({"key_id": "a@b:1\n"}, 400, "bad-field"),
            ({"serial": "abc"}, 400, "bad-field"), ({"serial": True}, 400, "bad-field"),
            ({"serial": "99999999999999999999999"}, 400, "bad-field"),
            # more digits than int() reads (4300): a 500 before (security review)
            ({"serial": "9" * 5000}, 400, "bad-field"),
            # digits to str.isdigit() that int() refuses or reads as another number
            ({"serial": "\u00b9"}, 400, "bad-field"), ({"serial": "\uff15"}, 400, "bad-field"),
            ({"key_id": "nobody:1"}, 404, "not-found"),
            ({"public_key": "junk"}, 400, "bad-request")]:
        add(Case(f"ssh revoke {json.dumps(body)[:40]}", "POST", "/v1/ssh/revoke", status, kind,
                 "admin", body))
    # Keys the KRL would list as no key at all (a review): a NUL in the type (which
    # PostgreSQL refused after the revocation's audit line, and every start after it
    # failed on), a key cut short when pasted, bytes after the key, a type sshd lacks
    blob = base64.b64decode(GOOD_SSH.split()[1])
    for what, key in [
            ("nul type", "ssh-ed25519\u0000 " + base64.b64encode(
                b"\x00\x00\x00\x0cssh-ed25519\x00x").decode()),
            ("cut short", "ssh-ed25519 " + GOOD_SSH.split()[1][:40]),
            ("bytes after", "ssh-ed25519 " + base64.b64encode(blob + b"x").decode()),
            ("unknown type", "foo AAAAA2Zvb3g="),
            # base64 with more after its padding, which ssh-keygen refuses (an SSH trial:
            # the key before it was revoked, and the answer said nothing)
            ("after padding", ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
             + "AAAA"),  # (a P-256 key's base64 ends in one '=')
            ("sk cut short", "sk-ssh-ed25519@openssh.com " + base64.b64encode(
                b"\x00\x00\x00\x1ask-ssh-ed25519@openssh.com\x00\x00\x00\x20"
                + bytes(31)).decode())]:
        add(Case(f"ssh revoke key {what}", "POST", "/v1/ssh/revoke", 400, "bad-key", "admin",
                 {"public_key": key}))
    # --- audit --------------------------------------------------------------------------
    # (and a limit over a page's 1,000, cut silently, ended a paging loop early; a
    # misspelt parameter read from line 0: an API trial)
    for q in ["start=-1", "start=abc", "limit=1e9", "start=99999999999999999999",
              "start=%C2%B2", "start=%EF%BC%95", "limit=%D9%A3", "limit=1001", "strat=5",
              "start=0&limit=10&foo=1"]:
        add(Case(f"entries {q}", "GET", f"/v1/audit/entries?{q}", 400, "bad-query", "admin"))
    add(Case("entries as service", "GET", "/v1/audit/entries", 403, "wrong-role", "service"))
    add(Case("entries anonymous", "GET", "/v1/audit/entries", 403,
             "client-certificate-required", "none"))
    # Where the witnesses stand names their URLs: for auditors and admins, as entries are
    add(Case("witnesses as service", "GET", "/v1/audit/witnesses", 403, "wrong-role",
             "service"))
    add(Case("witnesses anonymous", "GET", "/v1/audit/witnesses", 403,
             "client-certificate-required", "none"))
    add(Case("witnesses foo=1", "GET", "/v1/audit/witnesses?foo=1", 400, "bad-query", "admin"))
    for q in ["", "index=5", "index=5&size=2", "index=0&size=99999999", "index=x&size=1",
              "index=%C2%B2&size=3"]:
        add(Case(f"inclusion {q!r}", "GET", f"/v1/audit/proof/inclusion?{q}", 400, "bad-query",
                 "admin"))
    for q in ["old=0&size=1", "old=5&size=2", "old=1&size=99999999", "old=&size=",
              "old=1&size=%C2%B2"]:
        add(Case(f"consistency {q!r}", "GET", f"/v1/audit/proof/consistency?{q}", 400,
                 "bad-query", "admin"))
    for tile in ["0/x999/x999/x999/x999/x999/x999/999", "entries/x999/x999/x999/x999/x999/999"]:
        add(Case(f"tile {tile}", "GET", f"/v1/audit/tile/{tile}", 400, "bad-query", "admin"))
    # (a misspelt parameter, ignored, listed every certificate: an API trial)
    # (a misspelt role listed nothing, and limit=0 one record: an API docs trial)
    for q in ["limit=%C2%B2", "limit=%EF%BC%95", "stauts=revoked", "kind=ssh", "role=bogus",
              "role=Service", "limit=0"]:
        add(Case(f"inventory {q}", "GET", f"/v1/inventory/certificates?{q}", 400, "bad-query",
                 "admin"))
    add(Case("ssh inventory role=", "GET", "/v1/inventory/ssh-certificates?role=user", 400,
             "bad-query", "admin"))
    add(Case("issuance hours=%C2%B2", "GET", "/v1/inventory/issuance?hours=%C2%B2", 400,
             "bad-query", "admin"))
    # --- EST, OCSP, paths ---------------------------------------------------------------
    good_b64 = base64.b64encode(pem_der(good))
    add(Case("est json", "POST", "/.well-known/est/simpleenroll", 415,
             "unsupported-media-type", "token", {"csr": good}))
    add(Case("est not base64", "POST", "/.well-known/est/simpleenroll", 400, "bad-csr",
             "token", data=b"%%%%", headers=PKCS10))
    add(Case("est base64 junk", "POST", "/.well-known/est/simpleenroll", 400, "bad-csr",
             "token", data=base64.b64encode(b"junk"), headers=PKCS10))
    add(Case("est pem armour", "POST", "/.well-known/est/simpleenroll", 400, "bad-csr",
             "token", data=good.encode(), headers=PKCS10))
    # A good CSR, so that what is refused is the missing credential.
    # 403, not a 401 that names no HTTP scheme: the certificate renewed is the only way
    add(Case("est reenroll no cert", "POST", "/.well-known/est/simplereenroll", 403,
             "client-certificate-required", "none", data=good_b64, headers=PKCS10))
    add(Case("est enroll no credentials", "POST", "/.well-known/est/simpleenroll", 401,
             "client-certificate-required", "none", data=good_b64, headers=PKCS10))
    add(Case("est enroll no credentials junk body", "POST", "/.well-known/est/simpleenroll",
             401, "client-certificate-required", "none", data=b"%%%%", headers=PKCS10))
    # The token before the body, as /v1/x509/enroll (a security review: bad-csr first)
    add(Case("est enroll unknown token junk body", "POST", "/.well-known/est/simpleenroll",
             401, "bad-token", "none", data=b"%%%%",
             headers={**PKCS10, "Authorization": "Bearer hsmca-0-not-a-token"}))
    add(Case("est reenroll no cert junk body", "POST", "/.well-known/est/simplereenroll",
             403, "client-certificate-required", "none", data=b"%%%%", headers=PKCS10))
    add(Case("est reenroll token only", "POST", "/.well-known/est/simplereenroll", 403,
             "client-certificate-required", "token", data=good_b64, headers=PKCS10))
    # Who asks, before what is asked: a revoked certificate with a bad body was told to
    # mend the body, and only then that it can renew nothing (an HTTP trial)
    add(Case("renew revoked misspelt field", "POST", "/v1/x509/renew", 403,
             "revoked-certificate", "revoked", {"tll": "1h"}))
    add(Case("est reenroll revoked junk body", "POST", "/.well-known/est/simplereenroll",
             403, "revoked-certificate", "revoked", data=b"%%%%", headers=PKCS10))
    add(Case("est reenroll json", "POST", "/.well-known/est/simplereenroll", 415,
             "unsupported-media-type", "service", {"csr": good}))
    # A body that does not decode as its Content-Encoding says (a security trial: 500s
    # and logged tracebacks, without a credential on OCSP and EST)
    for coding, what, path, who, ctype in [
            ("gzip", "ocsp", "/v1/x509/ocsp", "none", "application/ocsp-request"),
            ("deflate", "est", "/.well-known/est/simpleenroll", "token", PKCS10["Content-Type"]),
            ("gzip", "enroll", "/v1/x509/enroll", "token", JSON["Content-Type"]),
            ("deflate", "tokens", "/v1/tokens", "admin", JSON["Content-Type"])]:
        add(Case(f"{what} {coding} that is not", "POST", path, 400, "bad-request", who,
                 data=b"garbage", headers={"Content-Type": ctype, "Content-Encoding": coding}))
    # A coding the server does not decode at all: 415, which RFC 9110 (15.5.16) gives
    # an unsupported content coding, not not-http's 400 (an API trial)
    for coding in ("br", "zstd", "compress"):
        add(Case(f"enroll {coding} not decoded", "POST", "/v1/x509/enroll", 415,
                 "unsupported-media-type", "token", data=b"garbage",
                 headers={"Content-Type": JSON["Content-Type"], "Content-Encoding": coding}))
    add(Case("expect 42-foo", "POST", "/v1/x509/enroll", 417, "expectation-failed", "none",
             {}, headers={"Expect": "42-foo"}))
    for path in ["/v1/nothing", "/v1/x509/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                 "/v1/x509/crl/extra", "/v1/ssh/krl/..", "/.well-known/est/nope",
                 "/v1/x509/ocsp/", "/" + "a" * 3000]:
        add(Case(f"path {path[:40]}", "GET", path, 404, "not-found"))
    add(Case("delete chain", "DELETE", "/v1/x509/chain", 405, "method-not-allowed"))
    add(Case("put health", "PUT", "/health", 405, "method-not-allowed", json_body={}))
    # Wrong methods on every read-only endpoint.
    for method, path in [("POST", "/metrics"), ("POST", "/v1/x509/roots"),
                         ("PUT", "/v1/x509/crl"), ("POST", "/.well-known/est/cacerts"),
                         ("POST", "/v1/ssh/ca"), ("DELETE", "/v1/ssh/krl"),
                         ("POST", "/v1/audit/checkpoint"), ("DELETE", "/v1/audit/key"),
                         ("GET", "/v1/x509/renew"), ("GET", "/v1/tokens"),
                         ("PATCH", "/v1/x509/enroll"), ("GET", "/v1/ssh/user")]:
        add(Case(f"{method.lower()} {path}", method, path, 405, "method-not-allowed"))
    add(Case("whoami anonymous", "GET", "/v1/whoami", 403, "client-certificate-required"))
    return c


CASES = corpus()


@dataclass
class Served:
    daemon: Daemon
    creds: dict[str, Any]
    tokens: Iterator[str]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("bad-input")
    ca = init_ca(tmp)
    d = start_daemon(ca.state)
    creds: dict[str, Any] = {"none": d.ssl(), "admin": d.admin_ssl()}
    for role, names, principals in [("service", ["svc.internal.example"], []),
                                    ("user", ["ann@example.com"], ["ann"]),
                                    ("host", ["h1.internal.example"], [])]:
        creds[role] = d.ssl(*enroll(d, tmp, role, names, principals))
    gone = enroll(d, tmp, "service", ["gone.internal.example"])
    status, _, raw = await http("POST", f"{d.url}/v1/x509/revoke", d.admin_ssl(),
                                body={"identity": "gone.internal.example"})
    assert status == 200, raw
    creds["revoked"] = d.ssl(*gone)

    async def token_source() -> list[str]:
        # one for each case that spends one (a count by hand fell short as cases came)
        wanted = sum(1 for c in CASES if c.who == "token")
        return [await bootstrap_token(d, "service", ["ok.internal.example"])
                for _ in range(wanted)]

    tokens = iter(await token_source())
    yield Served(d, creds, tokens)
    assert d.stop() == 0
    audit_verify(ca.state, ok=True)
    # A client's mistake is no server error in the log (an upgrade trial saw an error
    # and a traceback for each body that did not decode, from anyone who could connect)
    errors = [line for line in d.stderr if '"level": "error"' in line]
    assert not errors, errors[:3]


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 100, len(CASES)
    assert len({c.what for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
async def test_bad_request_gets_a_problem(served: Served, case: Case) -> None:
    d = served.daemon
    headers = dict(case.headers)
    ctx = served.creds["none" if case.who == "token" else case.who]
    if case.who == "token":
        headers["Authorization"] = f"Bearer {next(served.tokens)}"
    # encoded=True: the path goes out as written, "..", "%2e%2e" and all (yarl would
    # otherwise tidy the tricks away before they reach the daemon).
    url = yarl.URL(d.url + case.path, encoded=True)
    async with aiohttp.ClientSession() as s, s.request(
            case.method, url, json=case.json_body, data=case.data,
            headers=headers, ssl=ctx, skip_auto_headers=() if case.data is None else
            ("Content-Type",)) as r:
        body = await r.read()
        assert r.content_type == "application/problem+json", (case.what, body[:300])
        problem = json.loads(body)
        assert (r.status, problem["type"]) == (case.status, TYPES + case.kind), problem
        assert set(problem) == {"type", "title", "status", "detail"}, problem
        assert problem["status"] == r.status
        if r.status == 405:  # which methods do work (RFC 9110 15.5.6)
            assert case.method not in r.headers.get("Allow", case.method), r.headers
        if "not decoded" in case.what:  # the codings taken (RFC 9110 15.5.16), and its own
            assert r.headers.get("Accept-Encoding") == "gzip, deflate", r.headers
            assert repr(headers["Content-Encoding"]) in problem["detail"], problem
        if case.kind == "bad-token" or case.what.startswith("est enroll no credentials"):
            # which scheme would do (RFC 9110 11.6.1); EST clients speak HTTP Basic
            assert r.headers.get("WWW-Authenticate") == (
                'Basic realm="hsmca", Bearer realm="hsmca"' if "/est/" in case.path
                else 'Bearer realm="hsmca"'), r.headers
        assert problem["detail"] and "Traceback" not in problem["detail"]
        # words, not a parser's debug dump (cryptography's ASN.1 errors are Rust's)
        assert not re.search(r"\{ \w+: |ParseError", problem["detail"]), problem["detail"]
    async with aiohttp.ClientSession() as s, s.get(d.url + "/health", ssl=ctx) as r:
        assert r.status == 200, "the daemon is unhealthy after: " + case.what


async def raw_request(served: Served, request: bytes) -> tuple[bytes, Any]:
    """`request`'s bytes as they are, over TLS with the admin credential: the answer's
    head and its JSON body."""
    url = yarl.URL(served.daemon.url)
    reader, writer = await asyncio.open_connection(
        url.host, url.port, ssl=served.creds["admin"], server_hostname=url.host)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
        return head, json.loads(await reader.readexactly(length))
    finally:
        writer.close()


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("path", ["/v1/tokens", "/v1/x509/ocsp"])
async def test_a_body_declared_over_the_limit_is_refused_before_it_arrives(
        served: Served, path: str) -> None:
    """A security trial's request claimed 999,999,999 bytes and sent two: it waited for
    the body's timeout and got a 408. The declared length is enough to refuse it."""
    host = yarl.URL(served.daemon.url).host
    head, body = await raw_request(served, (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 999999999\r\n\r\n{{}}").encode())
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert body["type"] == TYPES + "request-entity-too-large", body
    assert body["detail"] == "request bodies are limited to 64 KiB", body


async def test_a_request_line_without_a_version_is_refused_and_no_versions_are_named(
        served: Served) -> None:
    """A security trial: `GET /health` with no HTTP version (HTTP/0.9 to aiohttp) was
    answered 200, where docs/api.md says not-http; and every answer named aiohttp's and
    Python's versions in its Server header."""
    host = yarl.URL(served.daemon.url).host
    for request in (b"GET /health\r\n\r\n",
                    f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()):
        head, body = await raw_request(served, request)
        assert re.search(rb"(?im)^server: hsmca\r$", head), head
        assert b"aiohttp" not in head and b"Python" not in head, head
        if b"HTTP/1.1" in request:
            assert head.startswith(b"HTTP/1.1 200 ") and body["status"] == "ok", head
        else:
            assert b" 400 " in head.split(b"\r\n")[0], head
            assert body["type"] == TYPES + "not-http" and "HTTP/0.9" in body["detail"], body


# ---- hypothesis: the request parsers refuse cleanly, whatever they are given -----------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)


VALID_CSR_DER = parse_csr(csr_pem(["ok.internal.example"])).public_bytes(
    serialization.Encoding.DER)


# Values near enough to valid ones that the parsers accept some of them: what must
# hold then is checked too, not only that a refusal is clean.
NAMES = ["a.example", "svc.internal.example", "alice@example.com", "10.0.0.1", "::1",
         "spiffe://cluster.local/ns/a", "UPPER.example", "a b.example", "*.wild.example",
         "b\u00fccher.example", "fe80::1%eth0", "a@b@example.com", "x" * 64 + ".example",
         "a+<i>@x.example", '"q"@x.example', "o'brien+ops@x.example"]
names_like = (st.lists(st.sampled_from(NAMES[:6]), min_size=1, max_size=3)
              | st.lists(st.sampled_from(NAMES) | st.text(max_size=20), max_size=4))
principals_like = st.lists(st.sampled_from(["alice", "root", "a,b", "", "x" * 300, "deploy"])
                           | st.text(max_size=10), max_size=3)
ttls_like = st.sampled_from(["90s", "15m", "8h", "7d", "8d", "0m", "1h ", "-5m", "999d"])


def token_bodies() -> Any:
    """Mostly the fields a token request has, mostly with plausible values."""
    def value(plausible: Any) -> Any:
        return st.one_of(plausible, plausible, plausible, json_values)
    return st.fixed_dictionaries(
        {"role": value(st.sampled_from(policy.ROLES)), "names": value(names_like)},
        optional={"principals": value(principals_like), "ttl": value(ttls_like),
                  "x": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(body={"role": "service", "names": ["a.example", "10.0.0.1", "a.example"],
               "ttl": "8h"})
@example(body={"role": "user", "names": ["alice@example.com"], "principals": ["alice"]})
@example(body={"role": "service", "names": ["a.example"], "ttl": None})  # found by it
@given(body=token_bodies())
def test_token_request_parser_fuzz(body: dict[str, Any]) -> None:
    request = ra.TokenRequest(body.get("role"), body.get("names"), body.get("principals", []),
                              body.get("ttl", "1h"))
    decision = ra.decide(context(), admin(), request)
    if isinstance(decision, ra.Refusal):
        assert decision.detail and 400 <= decision.reason.status < 500
        return
    # A grant is exactly what was asked, each name valid and in its normal form.
    assert isinstance(decision, ra.TokenGrant)
    assert decision.role == body["role"] and decision.role in policy.ROLES
    assert 1 <= len(decision.names) <= 100 and len(set(decision.names)) == len(decision.names)
    assert set(decision.names) == {policy.classify(n) for n in body["names"]}
    for kind, value in decision.names:
        assert policy.classify(value) == (kind, value)
    kinds = {kind for kind, _ in decision.names}
    assert {"service": "email" not in kinds, "host": "dns" in kinds and "email" not in kinds,
            "user": kinds == {"email"}, "auditor": len(decision.names) == 1,
            "admin": len(decision.names) == 1}[decision.role]
    assert set(decision.principals) == set(body.get("principals", []))
    assert not decision.principals or decision.role == "user"
    for p in decision.principals:
        assert policy.principal(p) == p
    # JSON null is no ttl: the registration authority's default, as for an absent one.
    asked = body.get("ttl")
    assert decision.ttl_s == policy.parse_ttl("1h" if asked is None else asked)
    assert 0 < decision.ttl_s <= Policy().token_max_ttl_s


@settings(max_examples=300, deadline=None)
@example(text="svc.internal.example")
@example(text="alice@example.com")
@example(text="15m")
@example(text="0\n")  # found by this test: '$' let a final newline into a principal
@given(text=st.sampled_from([*NAMES, "15m", " 8h ", "0m", "007h", "alice"]) | st.text(max_size=200))
def test_name_and_principal_parsers_fuzz(text: str) -> None:
    try:
        kind, value = policy.classify(text)
    except policy.Refused as exc:
        assert exc.detail
    else:  # a valid name, in its normal form, which stays what it is
        assert kind in ("dns", "ip", "uri", "email") and value.isascii()
        assert not any(c in value for c in " ,\n\t") and policy.classify(value) == (kind, value)
        if kind == "dns":
            assert value == text == value.lower() and len(value) <= 253
        # ...that cryptography puts in a certificate (a web view trial's token for an
        # e-mail it refuses made every enrollment a 500)
        {"dns": x509.DNSName, "uri": x509.UniformResourceIdentifier, "email": x509.RFC822Name,
         "ip": lambda v: x509.IPAddress(ipaddress.ip_address(v))}[kind](value)
    try:
        principal = policy.principal(text)
    except policy.Refused as exc:
        assert exc.detail
    else:
        assert principal == text and 1 <= len(text) <= 256 and text.isascii()
        assert text.isprintable() and not any(c in text for c in " ,")
    try:
        seconds = policy.parse_ttl(text)
    except policy.Refused as exc:
        assert exc.detail
    else:  # counts of units, largest first, each once, nothing else, more than 0 in all
        parts = re.findall(r"([0-9]+)([dhms])", text.strip())
        assert "".join(n + u for n, u in parts) == text.strip() and seconds > 0
        units = [u for _, u in parts]
        assert units == sorted(set(units), key="dhms".index)
        assert seconds == sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u]
                              for n, u in parts)


@settings(max_examples=200, deadline=None)
@example(text=GOOD_SSH)
@example(text=GOOD_SSH + " a comment")
@given(text=st.text(max_size=300) | st.builds(lambda b: "ssh-ed25519 " + base64.b64encode(
    b).decode(), st.binary(max_size=120)))
def test_ssh_key_parser_fuzz(text: str) -> None:
    try:
        key = ssh.parse_public_key(text)
    except policy.Refused as exc:
        assert exc.detail
        return
    # The key the line holds, in one canonical line that parses back to itself.
    kind, b64 = text.split()[:2]
    assert key.line == f"{kind} {b64}" and key.blob == base64.b64decode(b64)
    assert ssh.parse_public_key(key.line) == key
    assert kind in ("ssh-ed25519", "ssh-rsa") or kind.startswith("ecdsa-sha2-nistp")


@settings(max_examples=200, deadline=None)
@example(data=VALID_CSR_DER)
@given(data=st.binary(max_size=600))
def test_csr_parser_fuzz(data: bytes) -> None:
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(data)
           + b"-----END CERTIFICATE REQUEST-----\n")
    for raw, der in ((data, True), (pem, False)):
        try:
            csr = parse_csr(raw, der=der)
        except Problem as exc:
            assert exc.status_code == 400
            continue
        try:
            policy.check_csr(csr)
            names = policy.csr_names(csr)
        except policy.Refused as exc:
            assert 400 <= exc.reason.status < 500 and exc.detail
            continue
        # Passing the checks means: signed by the key it carries, a key this CA takes.
        assert csr.is_signature_valid
        policy.check_subject_key(csr.public_key())
        assert all(isinstance(n, str) and n for n in names)


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_CSR_DER) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4),
       cut=st.integers(0, len(VALID_CSR_DER)))
def test_mutated_csr_is_refused_or_checked(edits: list[tuple[int, int]], cut: int) -> None:
    """Random bytes rarely parse as DER; a real CSR with a few bytes changed (or cut
    short) gets past the parser often enough to exercise the checks behind it."""
    der = bytearray(VALID_CSR_DER)
    for at, value in edits:
        der[at] = value
    der = der[:max(cut, len(der) - 8)] if cut < len(der) // 2 else der
    try:
        csr = parse_csr(bytes(der), der=True)
    except Problem as exc:
        assert exc.status_code == 400
        return
    try:
        policy.check_csr(csr)
        names = policy.csr_names(csr)
    except policy.Refused as exc:
        assert 400 <= exc.reason.status < 500 and exc.detail
        return
    # What passes asks for exactly what the key's owner signed: the same key, the same
    # names (a change to the signed part breaks the signature, which is checked).
    original = parse_csr(VALID_CSR_DER, der=True)
    assert csr.is_signature_valid and csr.tbs_certrequest_bytes == original.tbs_certrequest_bytes
    assert csr.public_key() == original.public_key()
    assert names == ["ok.internal.example"]


def test_csr_round_trip_still_accepted() -> None:
    """The fuzz above must not be vacuous: a real CSR parses and passes."""
    csr = parse_csr(csr_pem(["ok.internal.example"], ec.generate_private_key(ec.SECP256R1())))
    policy.check_csr(csr)
    assert policy.csr_names(csr) == ["ok.internal.example"]


def test_a_csr_in_the_older_pem_label_is_read_and_a_sha1_one_is_named_as_such(
        tmp_path: Path) -> None:
    """An API client's trial: `NEW CERTIFICATE REQUEST` (Windows certreq, older keytool)
    was "no PEM CERTIFICATE REQUEST block"; a CSR signed with SHA-1 "does not verify
    (was it made with this key?)", a different bug from the one it has."""
    pem = csr_pem(["ok.internal.example"], ec.generate_private_key(ec.SECP256R1()))
    older = pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
    assert parse_csr(older).public_bytes(serialization.Encoding.PEM).decode() == pem
    # (cryptography signs nothing with SHA-1: openssl makes the CSR a client would send)
    subprocess.run([require("openssl"), "req", "-new", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", tmp_path / "key.pem", "-sha1", "-subj",
                    "/CN=ok.internal.example", "-out", tmp_path / "sha1.csr"],
                   check=True, capture_output=True)
    with pytest.raises(Refused, match="signed with SHA1, which is not accepted: sign it "
                                      "with SHA-256"):
        policy.check_csr(parse_csr((tmp_path / "sha1.csr").read_bytes()))


def test_a_pem_of_two_csrs_is_refused_and_openssl_s_text_dump_before_one_is_read(
        tmp_path: Path) -> None:
    """A security trial: a second CSR after the first (other names, CA:TRUE) was
    accepted unread, the first one issued. Refused now, saying why; the dump `openssl req
    -text` writes before the block is still read past."""
    one = csr_pem(["ok.internal.example"], ec.generate_private_key(ec.SECP256R1()))
    two = one + csr_pem(["evil.example.com"], ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(Problem) as refused:
        parse_csr(two)
    assert refused.value.status_code == 400 and "the PEM holds more than one block; send one " \
        "CERTIFICATE REQUEST" in refused.value.detail, refused.value.detail
    subprocess.run([require("openssl"), "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", tmp_path / "key.pem",
                    "-subj", "/CN=ok.internal.example", "-text", "-out", tmp_path / "t.csr"],
                   check=True, capture_output=True)
    dumped = (tmp_path / "t.csr").read_bytes()
    assert dumped.startswith(b"Certificate Request:"), dumped[:40]
    assert parse_csr(dumped).subject.rfc4514_string() == "CN=ok.internal.example"


# ---- hypothesis against the live daemon: the HTTP request parsers ----------------------

# What each parser may answer besides refusing a body that is not a JSON object
# (400 bad-json) or has a field it does not take or of the wrong type (400 bad-field):
# a success when the body happens to make sense, else the refusals its route and the
# registration authority give. Anything else (another problem type, a 5xx) fails.
FIELDS = {(400, "bad-json"), (400, "bad-field")}
LIVE_TARGETS: list[tuple[str, str, str, set[tuple[int, str | None]]]] = [
    ("POST", "/v1/x509/renew", "service", {
        (201, None), (400, "bad-csr"), (400, "bad-key"), (400, "bad-request"),
        (400, "lifetime-too-long"), (403, "name-not-granted")}),
    ("POST", "/v1/ssh/user", "user", {
        (201, None), (400, "bad-request"), (400, "bad-key"), (400, "bad-name"),
        (400, "lifetime-too-long"), (403, "principal-not-granted"), (403, "revoked-key")}),
    ("POST", "/v1/ssh/host", "host", {
        (201, None), (400, "bad-request"), (400, "bad-key"), (400, "bad-name"),
        (403, "principal-not-granted"), (403, "revoked-key")}),
    ("POST", "/v1/tokens", "admin", {
        (201, None), (400, "bad-request"), (400, "bad-name"), (400, "lifetime-too-long")}),
    ("POST", "/v1/x509/revoke", "service", {  # nothing random is its own serial
        (400, "bad-request"), (403, "wrong-role"), (403, "revocation-reason-not-allowed"),
        (404, "not-found")}),
    ("POST", "/v1/ssh/revoke", "admin", {
        (200, None), (400, "bad-request"), (400, "bad-key"), (404, "not-found")}),
]
json_bodies = st.dictionaries(
    st.sampled_from(["csr", "ttl", "public_key", "principals", "role", "names", "serial",
                     "reason", "key_id", "source_address", "x"]), json_values, max_size=4)


async def answer(request: Any) -> tuple[int, str | None, str, bytes]:
    """(status, problem type after the base, content type, body) of one request."""
    async with request as r:
        raw = await r.read()
        kind = None
        if r.content_type == "application/problem+json":
            problem = json.loads(raw)
            assert set(problem) == {"type", "title", "status", "detail"}, problem
            assert problem["status"] == r.status and problem["type"].startswith(TYPES)
            kind = problem["type"].removeprefix(TYPES)
        return r.status, kind, r.content_type, raw


@pytest.mark.asyncio(loop_scope="session")
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(target=st.sampled_from(LIVE_TARGETS), body=json_bodies | json_values,
       query=st.text(st.characters(codec="ascii"), max_size=30),
       ocsp=st.binary(max_size=80), est=st.binary(max_size=200))
async def test_live_parsers_never_fail_on_any_input(
        served: Served, target: tuple[str, str, str, set[tuple[int, str | None]]], body: Any,
        query: str, ocsp: bytes, est: bytes) -> None:
    """Whatever a client sends, the daemon answers with one of the answers its parser
    has: a success if it made sense, else a refusal of the kind the input deserves
    (OCSP answers in its own format, RFC 6960); never a 5xx, never a surprise."""
    d = served.daemon
    method, path, who, allowed = target
    async with aiohttp.ClientSession() as s:
        status, kind, ctype, raw = await answer(s.request(
            method, d.url + path, data=json.dumps(body),
            headers={"Content-Type": "application/json"}, ssl=served.creds[who]))
        assert (status, kind) in allowed | FIELDS, (path, body, status, raw[:300])
        if kind is None:
            assert ctype == "application/json", (path, body, raw[:300])
            json.loads(raw)

        status, kind, ctype, raw = await answer(s.get(yarl.URL(
            d.url + "/v1/audit/entries", encoded=False).with_query(
                {"start": query, "limit": query[::-1]}), ssl=served.creds["admin"]))
        if query.isdigit() and len(query) <= 18:  # both are non-negative integers
            assert (status, ctype) == (200, "application/jsonl"), (query, raw[:300])
        else:
            assert (status, kind) == (400, "bad-query"), (query, raw[:300])

        # Random bytes are never a CSR.
        status, kind, _, raw = await answer(s.post(
            d.url + "/.well-known/est/simplereenroll", data=base64.b64encode(est),
            headers={"Content-Type": "application/pkcs10"}, ssl=served.creds["service"]))
        assert (status, kind) == (400, "bad-csr"), (est, raw[:300])

        # Nor an OCSP request: refused in OCSP's own format (empty: no such path).
        status, kind, ctype, raw = await answer(s.get(
            d.url + "/v1/x509/ocsp/" + base64.urlsafe_b64encode(ocsp).decode(),
            ssl=served.creds["none"]))
        if not ocsp:
            assert (status, kind) == (404, "not-found"), raw[:300]
        else:
            assert (status, ctype) == (200, "application/ocsp-response"), (ocsp, raw[:300])
            assert x509_ocsp.load_der_ocsp_response(raw).response_status == (
                x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST), ocsp


async def test_a_body_in_a_coding_without_its_decoder_is_logged_as_the_415_it_gets(
        served: Served) -> None:
    """br, whose decoder aiohttp lacks, is answered 415 and was logged as a 400 "not
    valid HTTP" (a re-trial)."""
    host = yarl.URL(served.daemon.url).host
    head, body = await raw_request(served, (
        f"POST /v1/x509/enroll HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}").encode())
    assert b" 415 " in head.split(b"\r\n")[0] and body["type"] == TYPES + \
        "unsupported-media-type", (head, body)
    d = served.daemon
    assert d.wait_stderr(lambda: any(
        "refused a request body in a coding this server does not decode" in line
        and '"status": 415' in line for line in d.stderr)), d.stderr[-5:]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("coding", ["foo, chunked", "gzip, chunked"])
async def test_a_transfer_coding_the_server_does_not_apply_is_refused(
        served: Served, coding: str) -> None:
    """An HTTP trial: "Transfer-Encoding: foo, chunked" made a token (aiohttp read the
    body as chunked alone, the coding before it unapplied), and a body gzipped as
    "gzip, chunked" was read as JSON: what a front proxy and the daemon would read
    differently. A 400 naming the header, nothing done."""
    host = yarl.URL(served.daemon.url).host
    body = json.dumps({"role": "service", "names": ["te.internal.example"]}).encode()
    head, answer = await raw_request(served, (
        f"POST /v1/tokens HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: {coding}\r\n\r\n").encode()
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert b" 400 " in head.split(b"\r\n")[0], (head, answer)
    assert answer["type"] == TYPES + "bad-request" and \
        f"the Transfer-Encoding {coding!r} is not one" in answer["detail"], answer


@pytest.mark.asyncio(loop_scope="session")
async def test_a_head_larger_than_its_bound_in_all_is_refused(served: Served) -> None:
    """An HTTP trial: 98 header lines of 8 KB each (each under aiohttp's line bound,
    fewer than its 128 lines) were read whole, and 60 such connections held took a
    worker from 68 to 122 MB. A head over 64 KiB in all is a 431, and the connection
    closes."""
    host = yarl.URL(served.daemon.url).host
    lines = "".join(f"X-Pad-{i}: {'a' * 1000}\r\n" for i in range(70))  # 70 KB, 70 lines
    for end in ("", "\r\n"):  # a head still arriving, and one whole in one write (which
        # the TLS layer hands over in one piece: a review's was served)
        head, answer = await raw_request(served, (
            f"GET /health HTTP/1.1\r\nHost: {host}\r\n{lines}{end}").encode())
        assert b" 431 " in head.split(b"\r\n")[0], (end, head, answer)
        assert answer["type"] == TYPES + "request-header-fields-too-large" and \
            "longer than 64 KiB in all" in answer["detail"], answer
    # An ordinary head is not counted with the heads before it on its connection
    url = yarl.URL(served.daemon.url)
    reader, writer = await asyncio.open_connection(
        url.host, url.port, ssl=served.creds["admin"], server_hostname=url.host)
    try:
        for _ in range(40):  # 40 heads of 2 KB on one connection: 80 KB
            writer.write((f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Pad: {'a' * 2000}"
                          "\r\n\r\n").encode())
            got = await reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in got.split(b"\r\n")[0], got
            length = int(re.search(rb"(?i)content-length: (\d+)", got)[1])  # type: ignore[index]
            await reader.readexactly(length)
    finally:
        writer.close()
