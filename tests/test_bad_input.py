"""A corpus of bad requests across every endpoint: each gets a 4xx problem+json,
the daemon stays healthy, and its audit log still verifies afterwards."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yarl
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca import policy, ra, ssh
from ca.server.common import parse_csr
from ca.server.problems import Problem
from tests.conftest import Daemon, init_ca, start_daemon
from tests.helpers import audit_verify, bootstrap_token, csr_pem, enroll
from tests.test_ra import admin, context


@dataclass(frozen=True)
class Case:
    what: str
    method: str
    path: str
    who: str = "none"  # none | admin | service | user | host | token
    json_body: Any = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


GOOD_SSH = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
JSON = {"Content-Type": "application/json"}


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


def der_to_pem(der: bytes) -> str:
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


def corpus() -> list[Case]:
    c: list[Case] = []
    add = c.append
    # --- malformed bodies on every JSON endpoint -----------------------------------
    json_endpoints = [("/v1/tokens", "admin"), ("/v1/x509/enroll", "token"),
                      ("/v1/x509/renew", "service"), ("/v1/x509/revoke", "service"),
                      ("/v1/ssh/host", "host"), ("/v1/ssh/user", "user"),
                      ("/v1/ssh/revoke", "admin")]
    for path, who in json_endpoints:
        add(Case(f"{path} not JSON", "POST", path, who, data=b"{nope", headers=JSON))
        add(Case(f"{path} JSON array", "POST", path, who, data=b"[1,2]", headers=JSON))
        add(Case(f"{path} JSON string", "POST", path, who, data=b'"x"', headers=JSON))
        add(Case(f"{path} form encoded", "POST", path, who, data=b"a=b",
                 headers={"Content-Type": "application/x-www-form-urlencoded"}))
        add(Case(f"{path} oversized", "POST", path, who,
                 data=b'{"x":"' + b"A" * 70_000 + b'"}', headers=JSON))
        add(Case(f"{path} invalid UTF-8", "POST", path, who, data=b'{"x":"\xff\xfe"}',
                 headers=JSON))
        add(Case(f"{path} wrong method", "GET", path, who))
        add(Case(f"{path} deep nesting", "POST", path, who,
                 data=b"[" * 5000 + b"]" * 5000, headers=JSON))
    # --- tokens ---------------------------------------------------------------------
    for body in [{"role": "root", "names": ["a.example"]}, {"role": "service"},
                 {"role": "service", "names": []}, {"role": "service", "names": "a.example"},
                 {"role": "service", "names": [42]},
                 {"role": "service", "names": ["a b.example"]},
                 {"role": "service", "names": ["a,b.example"]},
                 {"role": "service", "names": ["a\nb.example"]},
                 {"role": "service", "names": ["bücher.example"]},
                 {"role": "service", "names": ["UPPER.example"]},
                 {"role": "service", "names": ["-bad.example"]},
                 {"role": "service", "names": ["a" * 64 + ".example"]},
                 {"role": "service", "names": ["*.wild.example"]},
                 {"role": "service", "names": ["a.example."]},
                 {"role": "service", "names": ["a\u202eexample"]},
                 {"role": "service", "names": ["a\u200b.example"]},
                 {"role": "service", "names": ["ok.example"], "ttl": "forever"},
                 {"role": "service", "names": ["ok.example"], "ttl": 5},
                 {"role": "service", "names": ["ok.example"], "ttl": "999d"},
                 {"role": "service", "names": ["ok.example"], "ttl": "-5m"},
                 {"role": "service", "names": ["ok.example"], "principals": ["root"]},
                 {"role": "service", "names": ["alice@example.com"]},
                 {"role": "user", "names": ["alice@example.com"], "principals": ["a,b"]},
                 {"role": "user", "names": ["alice@example.com"], "principals": [""]},
                 {"role": "user", "names": ["alice@example.com"], "principals": ["x" * 300]},
                 {"role": "user", "names": ["not-an-email.example"]},
                 {"role": "user", "names": ["a@b@example.com"]},
                 {"role": "host", "names": ["10.0.0.1"]},
                 {"role": "admin", "names": ["a.example", "b.example"]},
                 {"role": "service", "names": ["ok.example"], "extra": True},
                 {"role": "service", "names": ["ftp://"]},
                 {"role": "service", "names": ["ok.example"] * 101}]:
        add(Case(f"token {json.dumps(body)[:90]}", "POST", "/v1/tokens", "admin", body))
    add(Case("tokens as service", "POST", "/v1/tokens", "service",
             {"role": "admin", "names": ["x.example"]}))
    add(Case("tokens without cert", "POST", "/v1/tokens", "none",
             {"role": "admin", "names": ["x.example"]}))
    # --- enroll -----------------------------------------------------------------------
    good = csr_pem(["ok.internal.example"])
    for what, body in [("csr number", {"csr": 1}), ("csr null", {"csr": None}),
                       ("csr empty", {"csr": ""}), ("csr garbage", {"csr": "garbage"}),
                       ("csr half", {"csr": good[:200]}),
                       ("csr b64 junk", {"csr": "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n"
                                         "-----END CERTIFICATE REQUEST-----\n"}),
                       ("csr a cert", {"csr": good.replace("CERTIFICATE REQUEST",
                                                           "CERTIFICATE")}),
                       ("csr wrong names", {"csr": csr_pem(["evil.example.com"])}),
                       ("csr ip not granted", {"csr": csr_pem(["10.9.9.9"])}),
                       ("ttl too long", {"csr": good, "ttl": "400d"}),
                       ("ttl type", {"csr": good, "ttl": ["1h"]}),
                       ("no csr", {})]:
        add(Case(f"enroll {what}", "POST", "/v1/x509/enroll", "token", body))
    for auth in ["", "Bearer", "Bearer ", "Basic abc", "Bearer " + "x" * 5000,
                 "Bearer hsmca-ffff-forged", "Bearer \u00e9t\u00e9"]:
        add(Case(f"enroll auth {auth[:20]!r}", "POST", "/v1/x509/enroll", "none",
                 {"csr": good}, headers={"Authorization": auth} if auth else {}))
    # --- renew / revoke ---------------------------------------------------------------
    add(Case("renew unknown field", "POST", "/v1/x509/renew", "service", {"names": ["x"]}))
    add(Case("renew bad csr", "POST", "/v1/x509/renew", "service", {"csr": "x"}))
    # Found by the mutation fuzz below: a key algorithm cryptography does not know
    # raised UnsupportedAlgorithm, answered 500.
    odd = unknown_key_algorithm_csr(good)
    add(Case("enroll csr unknown key algorithm", "POST", "/v1/x509/enroll", "token",
             {"csr": der_to_pem(odd)}))
    add(Case("renew csr unknown key algorithm", "POST", "/v1/x509/renew", "service",
             {"csr": der_to_pem(odd)}))
    # And a validly signed CSR with a name type cryptography does not parse.
    x400 = x400_san_csr()
    add(Case("enroll csr x400Address SAN", "POST", "/v1/x509/enroll", "token", {"csr": x400}))
    add(Case("renew csr x400Address SAN", "POST", "/v1/x509/renew", "service", {"csr": x400}))
    # Also found by it: a CSR version other than v1 (0) raised InvalidVersion.
    wrong_version = bytearray(pem_der(good))
    # The first INTEGER 0 is the version inside CertificationRequestInfo.
    wrong_version[wrong_version.index(b"\x02\x01\x00") + 2] = 1
    add(Case("enroll csr version 2", "POST", "/v1/x509/enroll", "token",
             {"csr": der_to_pem(bytes(wrong_version))}))
    add(Case("est csr version 2", "POST", "/.well-known/est/simpleenroll", "token",
             data=base64.b64encode(bytes(wrong_version)),
             headers={"Content-Type": "application/pkcs10"}))
    add(Case("est csr unknown key algorithm", "POST", "/.well-known/est/simplereenroll",
             "service", data=base64.b64encode(odd),
             headers={"Content-Type": "application/pkcs10"}))
    add(Case("renew no cert", "POST", "/v1/x509/renew", "none", {}))
    for serial in ["zz", "", "0", "-1", "1" * 60, 12]:
        add(Case(f"revoke serial {serial!r}", "POST", "/v1/x509/revoke", "admin",
                 {"serial": serial}))
    add(Case("revoke someone else's", "POST", "/v1/x509/revoke", "service", {"serial": "abc"}))
    add(Case("revoke unknown serial", "POST", "/v1/x509/revoke", "admin", {"serial": "abc"}))
    add(Case("revoke bad reason", "POST", "/v1/x509/revoke", "admin",
             {"serial": "abc", "reason": "because"}))
    # --- SSH ----------------------------------------------------------------------------
    for what, key in [("empty", ""), ("number", 5), ("two lines", GOOD_SSH + "\n" + GOOD_SSH),
                      ("cert", "ssh-ed25519-cert-v01@openssh.com AAAA"),
                      ("sk", "sk-ssh-ed25519@openssh.com AAAA"), ("dss", "ssh-dss AAAA"),
                      ("type only", "ssh-ed25519"), ("bad b64", "ssh-ed25519 ####"),
                      ("mismatched type", "ssh-rsa " + GOOD_SSH.split()[1]),
                      ("huge", "ssh-ed25519 " + "A" * 20000)]:
        add(Case(f"ssh user key {what}", "POST", "/v1/ssh/user", "user", {"public_key": key}))
    for what, body in [("principal comma", {"principals": ["a,b"]}),
                       ("principal space", {"principals": ["a b"]}),
                       ("principal empty list", {"principals": []}),
                       ("principal not list", {"principals": "alice"}),
                       ("principal not granted", {"principals": ["root"]}),
                       ("ttl over", {"ttl": "25h"}), ("ttl junk", {"ttl": "soon"}),
                       ("source bad", {"source_address": ["not-an-ip"]}),
                       ("source not list", {"source_address": "10.0.0.0/8"}),
                       ("unknown field", {"force": True})]:
        add(Case(f"ssh user {what}", "POST", "/v1/ssh/user", "user",
                 {"public_key": GOOD_SSH, **body}))
    add(Case("ssh host other name", "POST", "/v1/ssh/host", "host",
             {"public_key": GOOD_SSH, "principals": ["other.example"]}))
    add(Case("ssh host as user", "POST", "/v1/ssh/host", "user", {"public_key": GOOD_SSH}))
    add(Case("ssh user as host", "POST", "/v1/ssh/user", "host", {"public_key": GOOD_SSH}))
    add(Case("ssh revoke as user", "POST", "/v1/ssh/revoke", "user", {"serial": "1"}))
    for body in [{}, {"serial": "1", "key_id": "x"}, {"serial": "abc"}, {"serial": True},
                 {"serial": "99999999999999999999999"}, {"key_id": "nobody:1"},
                 {"public_key": "junk"}]:
        add(Case(f"ssh revoke {json.dumps(body)[:40]}", "POST", "/v1/ssh/revoke", "admin",
                 body))
    # --- audit --------------------------------------------------------------------------
    for q in ["start=-1", "start=abc", "limit=1e9", "start=99999999999999999999"]:
        add(Case(f"entries {q}", "GET", f"/v1/audit/entries?{q}", "admin"))
    add(Case("entries as service", "GET", "/v1/audit/entries", "service"))
    add(Case("entries anonymous", "GET", "/v1/audit/entries", "none"))
    for q in ["", "index=5", "index=5&size=2", "index=0&size=99999999", "index=x&size=1"]:
        add(Case(f"inclusion {q!r}", "GET", f"/v1/audit/proof/inclusion?{q}", "admin"))
    for q in ["old=0&size=1", "old=5&size=2", "old=1&size=99999999", "old=&size="]:
        add(Case(f"consistency {q!r}", "GET", f"/v1/audit/proof/consistency?{q}", "admin"))
    # --- EST, OCSP, paths ---------------------------------------------------------------
    add(Case("est json", "POST", "/.well-known/est/simpleenroll", "token", {"csr": good}))
    add(Case("est not base64", "POST", "/.well-known/est/simpleenroll", "token",
             data=b"%%%%", headers={"Content-Type": "application/pkcs10"}))
    add(Case("est base64 junk", "POST", "/.well-known/est/simpleenroll", "token",
             data=base64.b64encode(b"junk"), headers={"Content-Type": "application/pkcs10"}))
    add(Case("est reenroll no cert", "POST", "/.well-known/est/simplereenroll", "none",
             data=b"", headers={"Content-Type": "application/pkcs10"}))
    add(Case("est enroll no credentials", "POST", "/.well-known/est/simpleenroll", "none",
             data=b"", headers={"Content-Type": "application/pkcs10"}))
    add(Case("est reenroll token only", "POST", "/.well-known/est/simplereenroll", "token",
             data=base64.b64encode(pem_der(good)),
             headers={"Content-Type": "application/pkcs10"}))
    add(Case("est reenroll json", "POST", "/.well-known/est/simplereenroll", "service",
             {"csr": good}))
    for path in ["/v1/nothing", "/v1/x509/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                 "/v1/x509/crl/extra", "/v1/ssh/krl/..", "/.well-known/est/nope",
                 "/v1/x509/ocsp/", "/" + "a" * 3000]:
        add(Case(f"path {path[:40]}", "GET", path, "none"))
    add(Case("delete chain", "DELETE", "/v1/x509/chain", "none"))
    add(Case("put health", "PUT", "/health", "none", {}))
    # Wrong methods on every read-only endpoint.
    for method, path in [("POST", "/metrics"), ("POST", "/v1/x509/roots"),
                         ("PUT", "/v1/x509/crl"), ("POST", "/.well-known/est/cacerts"),
                         ("POST", "/v1/ssh/ca"), ("DELETE", "/v1/ssh/krl"),
                         ("POST", "/v1/audit/checkpoint"), ("DELETE", "/v1/audit/key"),
                         ("GET", "/v1/x509/renew"), ("GET", "/v1/tokens"),
                         ("PATCH", "/v1/x509/enroll"), ("GET", "/v1/ssh/user")]:
        add(Case(f"{method.lower()} {path}", method, path, "none"))
    add(Case("whoami anonymous", "GET", "/v1/whoami", "none"))
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

    async def token_source() -> list[str]:
        return [await bootstrap_token(d, "service", ["ok.internal.example"]) for _ in range(40)]

    tokens = iter(await token_source())
    yield Served(d, creds, tokens)
    assert d.stop() == 0
    audit_verify(ca.state, ok=True)


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
        assert 400 <= r.status < 500, (case.what, r.status, body[:300])
        # A rate limit would hide what the case is about.
        assert r.status != 429, (case.what, body[:300])
        assert r.content_type == "application/problem+json", (case.what, body[:300])
        problem = json.loads(body)
        assert set(problem) >= {"type", "title", "status", "detail"}, problem
        assert problem["status"] == r.status
        assert problem["detail"] and "Traceback" not in problem["detail"]
    async with aiohttp.ClientSession() as s, s.get(d.url + "/health", ssl=ctx) as r:
        assert r.status == 200, "the daemon is unhealthy after: " + case.what


# ---- hypothesis: the request parsers refuse cleanly, whatever they are given -----------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(["role", "names", "principals", "ttl", "x"]),
                            json_values, max_size=5))
def test_token_request_parser_fuzz(body: dict[str, Any]) -> None:
    request = ra.TokenRequest(body.get("role"), body.get("names"), body.get("principals", []),
                              body.get("ttl", "1h"))
    decision = ra.decide(context(), admin(), request)
    if isinstance(decision, ra.Refusal):
        assert decision.detail and 400 <= decision.reason.status < 500
        return
    assert isinstance(decision, ra.TokenGrant)
    assert decision.role in policy.ROLES and decision.names


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_name_and_principal_parsers_fuzz(text: str) -> None:
    for fn in (lambda t: policy.classify(t), policy.principal, policy.parse_ttl):
        try:
            fn(text)
        except policy.Refused as exc:
            assert exc.detail


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300) | st.builds(lambda b: "ssh-ed25519 " + base64.b64encode(
    b).decode(), st.binary(max_size=120)))
def test_ssh_key_parser_fuzz(text: str) -> None:
    try:
        key = ssh.parse_public_key(text)
    except policy.Refused as exc:
        assert exc.detail
        return
    assert key.line.startswith(("ssh-", "ecdsa-"))


@settings(max_examples=200, deadline=None)
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
            policy.csr_names(csr)
        except policy.Refused:
            pass


VALID_CSR_DER = parse_csr(csr_pem(["ok.internal.example"])).public_bytes(
    serialization.Encoding.DER)


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
    assert all(isinstance(n, str) for n in names)


def test_csr_round_trip_still_accepted() -> None:
    """The fuzz above must not be vacuous: a real CSR parses and passes."""
    csr = parse_csr(csr_pem(["ok.internal.example"], ec.generate_private_key(ec.SECP256R1())))
    policy.check_csr(csr)
    assert policy.csr_names(csr) == ["ok.internal.example"]


# ---- hypothesis against the live daemon: the HTTP request parsers ----------------------

LIVE_TARGETS = [  # (method, path, who): every parser that takes a body or a query
    ("POST", "/v1/x509/renew", "service"), ("POST", "/v1/ssh/user", "user"),
    ("POST", "/v1/ssh/host", "host"), ("POST", "/v1/tokens", "admin"),
    ("POST", "/v1/x509/revoke", "service"), ("POST", "/v1/ssh/revoke", "admin"),
]
json_bodies = st.dictionaries(
    st.sampled_from(["csr", "ttl", "public_key", "principals", "role", "names", "serial",
                     "reason", "key_id", "source_address", "x"]), json_values, max_size=4)


@pytest.mark.asyncio(loop_scope="session")
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(target=st.sampled_from(LIVE_TARGETS), body=json_bodies | json_values,
       query=st.text(st.characters(codec="ascii"), max_size=30),
       ocsp=st.binary(max_size=80), est=st.binary(max_size=200))
async def test_live_parsers_never_fail_on_any_input(served: Served, target: tuple[str, str, str],
                                                    body: Any, query: str, ocsp: bytes,
                                                    est: bytes) -> None:
    """Whatever a client sends, the daemon answers: a 2xx if it made sense, else a 4xx
    problem+json, never a 5xx (OCSP answers in its own format, RFC 6960)."""
    d = served.daemon
    method, path, who = target
    async with aiohttp.ClientSession() as s:
        requests = [
            s.request(method, d.url + path, data=json.dumps(body),
                      headers={"Content-Type": "application/json"}, ssl=served.creds[who]),
            s.get(yarl.URL(d.url + "/v1/audit/entries", encoded=False).with_query(
                {"start": query, "limit": query[::-1]}), ssl=served.creds["admin"]),
            s.post(d.url + "/.well-known/est/simplereenroll", data=base64.b64encode(est),
                   headers={"Content-Type": "application/pkcs10"}, ssl=served.creds["service"]),
            s.get(d.url + "/v1/x509/ocsp/" + base64.urlsafe_b64encode(ocsp).decode(),
                  ssl=served.creds["none"]),
        ]
        for request in requests:
            async with request as r:
                raw = await r.read()
                assert r.status < 500, (r.url, r.status, raw[:300])
                if r.status >= 400:
                    assert r.content_type == "application/problem+json", (r.url, raw[:300])
                    assert set(json.loads(raw)) >= {"type", "title", "status", "detail"}
