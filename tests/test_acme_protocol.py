"""The ACME server beyond what certbot and lego exercise, against a real daemon with two
workers: nonces good on every worker and only once, key change, account deactivation,
rate limits, dns-01 (and a wildcard) through the configured resolver, http-01 redirect
rules, failed validations, EAB keys audited without their secret, ACME off without
[acme]."""

from __future__ import annotations

import base64
import datetime as dt
import json
import resource
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import dns.rrset
import josepy as jose
import pytest
import requests
from cryptography import x509

from ca.acme.server import new_eab_key
from tests.acme_kit import (
    AcmeCA,
    Client,
    Reply,
    Responder,
    audit_lines,
    b64,
    csr_der,
    new_key,
    sign,
    start_acme_ca,
)
from tests.conftest import Daemon, hsmca, start_daemon
from tests.helpers import audit_verify

NAMES = ("a.test", "b.test", "c.test", "d.test", "redirect.test", "nobody.test")


class DNSServer:
    """A small authoritative DNS server on 127.0.0.1 (UDP) answering from `records`."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                wire, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(wire)
            reply = dns.message.make_response(query)
            q = query.question[0]
            name, kind = q.name.to_text().rstrip(".").lower(), dns.rdatatype.to_text(q.rdtype)
            values = self.records.get((name, kind), [])
            if values:
                texts = [json.dumps(v) if kind == "TXT" else v for v in values]
                reply.answer.append(dns.rrset.from_text_list(q.name, 60, "IN", kind, texts))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    ca: AcmeCA
    responder: Responder
    dns: DNSServer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server = DNSServer()
    tmp = tmp_path_factory.mktemp("acme-protocol")
    ca = start_acme_ca(tmp, NAMES, resolver=f"127.0.0.1:{server.port}",
                       policy={"deny": ["*.secret.test"]},
                       **{"orders-per-hour": 24, "failed-validations-per-hour": 12,
                          "pending-authorizations": 40})
    responder = Responder(ca.http_port)
    try:
        yield World(ca, responder, server)
    finally:
        responder.close()
        server.close()
        ca.daemon.stop()


def worker_of(r: requests.Response) -> str:
    return r.headers["X-Request-Id"][:8]  # the answering process


def test_a_nonce_from_one_worker_is_good_once_on_another(world: World) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    minted = requests.head(c.dir["newNonce"], verify=str(world.ca.daemon.root))
    nonce = minted.headers["Replay-Nonce"]
    for _ in range(64):  # new connections until another worker answers
        body = json.dumps(c.jws(c.kid, None, nonce=nonce))
        r = requests.post(c.kid, data=body, verify=str(world.ca.daemon.root),
                          headers={"Content-Type": "application/jose+json"})
        if worker_of(r) != worker_of(minted):
            break
        assert r.status_code == 200, r.text  # first use, on the same worker
        nonce = r.headers["Replay-Nonce"]
        minted = r
    else:
        raise AssertionError("64 new connections all reached one worker")
    assert r.status_code == 200, r.text
    again = requests.post(c.kid, data=body, verify=str(world.ca.daemon.root),
                          headers={"Content-Type": "application/jose+json"})
    assert again.status_code == 400 and again.json()["type"].endswith(":badNonce")


def test_an_account_lists_its_orders(world: World) -> None:
    """RFC 8555 7.1.2: the account object's `orders` URL, fetched by the account with
    POST-as-GET, lists its orders (not another account's)."""
    c, other = Client(world.ca), Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    assert other.register(world.ca.eab("*.test")).status == 201
    first, second = c.order("a.test"), c.order("b.test")
    assert first.status == second.status == 201
    other.order("c.test")
    orders = c.post(c.kid).json["orders"]
    assert orders == c.kid + "/orders"
    r = c.post(orders)
    assert r.status == 200, r.body
    assert sorted(r.json["orders"]) == sorted([second.headers["Location"],
                                               first.headers["Location"]]), r.json
    refused = other.post(orders)
    assert refused.status == 403 and refused.problem == "unauthorized"


def logged(world: World, event: str, match: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether the daemon's log gets a line `event` that `match`es (within 10 s: a
    worker writes it after it answered)."""
    def found() -> bool:
        return any(e.get("event") == event and match(e)
                   for e in (json.loads(x) for x in list(world.ca.daemon.stderr)
                             if x.startswith("{")))
    return world.ca.daemon.wait_stderr(found)


def key_change(c: Client, new: jose.JWK) -> Reply:
    url = c.dir["keyChange"]
    inner_head = {"alg": "ES256", "jwk": new.public_key().to_partial_json(), "url": url}
    return c.post(url, sign(new, json.dumps({"account": c.kid, "oldKey": c.key.public_key()
                                             .to_partial_json()}).encode(), inner_head))


def test_key_change_moves_the_account_to_the_new_key(world: World) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    new = new_key()
    r = key_change(c, new)
    assert r.status == 200, r.body
    # the old key no longer speaks for the account, and its client is told why; the
    # new one does
    old = c.post(c.kid)
    assert old.status == 400 and "after a key change, sign with the new key" in \
        old.json["detail"], old.body
    account = c.kid.rsplit("/", 1)[1]  # type: ignore[union-attr]
    assert logged(world, "acme account key changed", lambda e: e["account"] == account)
    c.key = new
    assert c.post(c.kid).json["status"] == "valid"
    # A contact change is the operator's to see, with the new address
    assert c.post(c.kid, {"contact": ["mailto:new@key.test"]}).json["contact"] == \
        ["mailto:new@key.test"]
    assert logged(world, "acme account contact changed", lambda e: e["account"] == account
                  and e["contact"] == ["mailto:new@key.test"])
    # A refusal of what the account asked is logged with the account
    assert c.order("outside.example").problem == "rejectedIdentifier"
    assert logged(world, "request refused", lambda e: e.get("account") == account
                  and e["route"] == "/acme/new-order")
    assert Client(world.ca, key=new).register(None, onlyReturnExisting=True).headers[
        "Location"] == c.kid
    assert any(line.get("event") == "acme.account.key-change" for line in audit_lines(world.ca))


def test_a_key_change_to_the_current_key_says_so(world: World) -> None:
    """An ACME trial changed to the key already in use and was told that another
    account had it, with a 409 naming its own account."""
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    r = key_change(c, c.key)
    assert r.status == 400 and r.problem == "malformed" and \
        "the new key is the account's current key" in r.json["detail"], r.body
    assert c.post(c.kid).json["status"] == "valid"


def test_account_changes_the_log_cannot_record_do_not_happen(tmp_path: Path) -> None:
    """While the audit log cannot grow, a new account, a key change and a deactivation
    are refused with 503 and change nothing: the client's old key still works and its
    retry, once the log is back, does what it asked, each with its audit line."""
    ca = start_acme_ca(tmp_path, ("a.test",))
    try:
        c = Client(ca)
        assert c.register(ca.eab("*.test")).status == 201
        newcomer = Client(ca)
        eab = ca.eab("*.test")
        size = (ca.daemon.state / "audit/log.jsonl").stat().st_size
        resource.prlimit(ca.daemon.proc.pid, resource.RLIMIT_FSIZE,
                         (size + 10, resource.RLIM_INFINITY))
        try:
            new = new_key()
            for r in (newcomer.register(eab), key_change(c, new),
                      c.post(c.kid, {"status": "deactivated"})):
                assert r.status == 503 and r.problem == "serverInternal", r.body
                assert "audit log" in r.json["detail"]
        finally:
            resource.prlimit(ca.daemon.proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert newcomer.kid is None
        # the log retries on its own within a second or two; the account is as it was
        deadline = time.monotonic() + 10
        while (r := c.post(c.kid)).status == 503:
            assert time.monotonic() < deadline, r.body
        assert r.status == 200 and r.json["status"] == "valid", r.body
        r = newcomer.register(eab)
        assert r.status == 201, r.body
        assert key_change(c, new).status == 200
        c.key = new
        assert c.post(c.kid, {"status": "deactivated"}).json["status"] == "deactivated"
        account = {c.kid.rsplit("/", 1)[1], newcomer.kid.rsplit("/", 1)[1]}
        events = [(x["event"], x["account"]) for x in audit_lines(ca)
                  if x.get("event", "").startswith("acme.account.")]
        assert sorted(e for e, a in events if a in account) == [
            "acme.account.create", "acme.account.create", "acme.account.deactivate",
            "acme.account.key-change"], events
    finally:
        ca.daemon.stop()
    audit_verify(ca.daemon.state, ok=True)


def test_a_deactivated_account_orders_nothing_more(world: World) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    r = c.post(c.kid, {"status": "deactivated"})
    assert r.status == 200 and r.json["status"] == "deactivated"
    r = c.order("a.test")
    assert r.status == 401 and r.problem == "unauthorized"  # RFC 8555 7.3.6
    # and what to do: clients cannot switch accounts by themselves (an ACME trial)
    assert "ask the CA's operator for a new EAB key" in r.json["detail"], r.json
    assert "revoke one of" not in r.json["detail"], r.json
    # a revocation through it is told the way that works at once (an ACME trial)
    r = c.post(c.dir["revokeCert"], {"certificate": "AAAA"})
    assert r.status == 401 and "to revoke one of its certificates now, sign with that " \
        "certificate's key (certbot revoke --cert-path CERT --key-path KEY)" in \
        r.json["detail"], r.json


def test_a_deactivated_authorization_ends_its_order(world: World) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("a.test", "b.test")
    authz_url = order.json["authorizations"][0]
    # As lego sends it: the authorization's other fields, empty, beside the status.
    r = c.post(authz_url, {"status": "deactivated", "identifier": {"type": "", "value": ""},
                           "expires": "0001-01-01T00:00:00Z"})
    assert r.status == 200 and r.json["status"] == "deactivated"
    assert c.post(order.headers["Location"]).json["status"] == "invalid"
    other = c.post(order.json["authorizations"][1], {"status": "valid"})
    assert other.status == 400 and other.problem == "malformed"
    again = c.post(authz_url, {"status": "deactivated"})
    assert again.status == 400 and again.problem == "malformed"
    # Its challenge asked for: said that nothing will be validated (an ACME trial got
    # 200 "pending", and waited for a validation that never came)
    asked = c.post(c.answer(order, "http-01")[0]["url"], {})
    assert asked.status == 400 and asked.problem == "malformed" and \
        "the authorization is deactivated" in asked.json["detail"], asked.body
    assert c.post(authz_url).json["status"] == "deactivated"


def test_a_validation_left_by_a_worker_that_went_away_runs_again(world: World) -> None:
    """What a worker killed mid-validation leaves: a challenge processing since long
    ago. The client, polling its authorization, gets it validated anyway."""
    import asyncio
    import datetime as dt

    from ca.store.sqlite import SQLiteStore
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("a.test")
    ch = c.answer(order, "http-01")[0]
    world.responder.answers[ch["token"]] = c.key_authorization(ch["token"]).encode()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    store = SQLiteStore(world.ca.daemon.state / "hsmca.sqlite3")
    try:
        assert asyncio.run(store.start_acme_challenge(ch["url"].rsplit("/", 1)[1], long_ago,
                                                      long_ago))
    finally:
        store.close()
    assert c.wait_authz(order.json["authorizations"][0])["status"] == "valid"


def test_a_challenge_being_validated_says_when_to_look_again(world: World) -> None:
    """An ACME trial: lego waits 5 s after each name's validation (which takes
    milliseconds here) unless the answer says when to look again: 19 s for three names.
    A challenge being validated, and its authorization, say Retry-After: 1 (RFC 8555
    7.5.1); once it is done, nothing is said."""
    import threading
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("b.test")
    authz_url = order.json["authorizations"][0]
    ch = next(x for x in c.post(authz_url).json["challenges"] if x["type"] == "http-01")
    world.responder.answers[ch["token"]] = c.key_authorization(ch["token"]).encode()
    world.responder.held[ch["token"]] = release = threading.Event()
    try:
        r = c.post(ch["url"], {})  # the validator now waits for the responder
        assert r.status == 200 and r.json["status"] == "processing", r.body
        assert r.headers.get("Retry-After") == "1", dict(r.headers)
        r = c.post(authz_url)
        assert r.json["status"] == "pending" and r.headers.get("Retry-After") == "1", \
            dict(r.headers)
    finally:
        release.set()
    assert c.wait_authz(authz_url)["status"] == "valid"
    assert "Retry-After" not in c.post(authz_url).headers


def test_dns01_and_a_wildcard_through_the_resolver(world: World) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    # the name is not in [acme.hosts]: its address comes from the resolver too
    world.dns.records[("dnsonly.test", "A")] = ["127.0.0.1"]
    order = c.order("dnsonly.test")
    assert order.status == 201, order.body
    for ch in c.answer(order, "dns-01"):
        import hashlib
        digest = hashlib.sha256(c.key_authorization(ch["token"]).encode()).digest()
        world.dns.records[(f"_acme-challenge.{ch['identifier']}", "TXT")] = [b64(digest)]
        assert c.post(ch["url"], {}).status == 200
    for authz_url in order.json["authorizations"]:
        assert c.wait_authz(authz_url)["status"] == "valid"
    done = c.finalize(order, ["dnsonly.test"])
    assert done.json["status"] == "valid", done.body
    # a wildcard is refused while the policy has no wildcards
    assert c.order("*.wild.test").problem == "rejectedIdentifier"


@pytest.mark.parametrize("redirect, answer, kind, words", [
    ("http://redirect.test:1/x", None, "connection", "only to port"),
    ("ftp://redirect.test/x", None, "connection", "only http(s)"),
    (None, b"x" * 5000, "incorrectResponse", "longer than 4096 bytes"),
    # An account must not point the CA at any host it likes on that port, and read
    # the answers' status (security reviews): only the name being validated is followed,
    # not addresses, single labels, nor another name (which may resolve to any host).
    ("http://127.0.0.2:{port}/internal?x=1", None, "connection", "only on the name being"),
    ("http://2130706434:{port}/", None, "connection", "only on the name being validated"),
    ("http://[::1]:{port}/", None, "connection", "only on the name being validated"),
    ("http://localhost:{port}/", None, "connection", "only on the name being validated"),
    ("http://internal.other.test:{port}/admin?x=1", None, "connection",
     "only on the name being validated (redirect.test), not to another host"),
])
def test_http01_follows_no_odd_redirect_and_reads_a_few_kb(
        world: World, redirect: str | None, answer: bytes | None, kind: str,
        words: str) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("redirect.test")
    ch = c.answer(order, "http-01")[0]
    if redirect:
        world.responder.redirects[ch["token"]] = redirect.format(port=world.ca.http_port)
    else:
        world.responder.answers[ch["token"]] = answer or b""
    assert c.post(ch["url"], {}).status == 200
    authz = c.wait_authz(order.json["authorizations"][0])
    assert authz["status"] == "invalid"
    failed = next(x for x in authz["challenges"] if x["type"] == "http-01")
    assert failed["error"]["type"].endswith(f":{kind}")
    assert words in failed["error"]["detail"]
    assert c.post(order.headers["Location"]).json["status"] == "invalid"


def test_an_http01_redirect_to_its_own_name_spelt_otherwise_stays_on_the_pinned_address(
        world: World) -> None:
    """A security trial: a redirect to `NAME.` (or upper case) left [acme.hosts], which
    pins NAME, and was looked up in DNS, which an account may point elsewhere. The
    second hop goes to the pinned address: here it answers, where DNS's does not."""
    world.dns.records[("redirect.test", "A")] = ["127.0.0.9"]  # nothing listens there
    try:
        c = Client(world.ca)
        assert c.register(world.ca.eab("*.test")).status == 201
        order = c.order("redirect.test")
        ch = c.answer(order, "http-01")[0]
        # The second, scheme-relative ("//NAME:PORT/...": an ACME trial's was refused as
        # not http), goes to the pinned address too
        world.responder.redirects[ch["token"]] = (
            f"http://REDIRECT.test.:{world.ca.http_port}/.well-known/acme-challenge/"
            f"{ch['token']}-moved")
        world.responder.redirects[f"{ch['token']}-moved"] = (
            f"//redirect.test:{world.ca.http_port}/.well-known/acme-challenge/"
            f"{ch['token']}-moved-again")
        world.responder.answers[f"{ch['token']}-moved-again"] = \
            c.key_authorization(ch["token"]).encode()
        assert c.post(ch["url"], {}).status == 200
        authz = c.wait_authz(order.json["authorizations"][0])
        assert authz["status"] == "valid", authz
    finally:
        del world.dns.records[("redirect.test", "A")]


def failed_challenge(c: Client, name: str, kind: str) -> dict[str, Any]:
    """Order `name`, answer its `kind` challenge, and the error it failed with."""
    order = c.order(name)
    ch = c.answer(order, kind)[0]
    assert c.post(ch["url"], {}).status == 200
    authz = c.wait_authz(order.json["authorizations"][0])
    return next(x for x in authz["challenges"] if x["type"] == kind)["error"]


def test_the_validator_does_not_connect_to_a_link_local_address_dns_gives(
        world: World) -> None:
    """A security trial pointed its name's DNS record at 169.254.169.254 (a cloud's
    metadata service) and the validator connected there, and said what answered."""
    # Over the wire with addresses that stay on this host should the check regress (the
    # tests reach nothing beyond loopback); the link-local ones by the function itself.
    world.dns.records[("zero.test", "A")] = ["0.0.0.0"]
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    error = failed_challenge(c, "zero.test", "http-01")
    assert error["type"].endswith(":dns") and "zero.test resolves to 0.0.0.0, an address " \
        "no host to validate has" in error["detail"], error
    from ca.acme.validation import Failed, _reachable
    for address in ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "ff02::1",
                    "fd00:ec2::254", "100.100.100.200", "64:ff9b::a9fe:a9fe"):
        with pytest.raises(Failed, match="an address no host to validate has"):
            _reachable("meta.test", address)
    assert _reachable("ok.test", "10.0.0.7") == "10.0.0.7"  # an internal host: validated


def test_a_failed_validation_says_why_in_plain_words(world: World) -> None:
    """An ACME trial read aiohttp's "ssl:default [Connect call failed ...]": the
    client is told where the CA tried to connect and what the system said."""
    world.dns.records[("closed.test", "A")] = ["127.0.0.9"]  # nothing listens there
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    error = failed_challenge(c, "closed.test", "http-01")
    assert error["type"].endswith(":connection"), error
    assert f"cannot connect to 127.0.0.9 port {world.ca.http_port}: Connection refused" in \
        error["detail"] and "ssl:default" not in error["detail"], error
    # and the operator's log says whose validation it was
    account = c.kid.rsplit("/", 1)[1]  # type: ignore[union-attr]
    assert logged(world, "acme validation", lambda e: e["account"] == account
                  and e["name"] == "closed.test" and e["valid"] is False)
    # tls-alpn-01 in the same words (it said asyncio's "[Errno 111] Connect call failed")
    world.dns.records[("closed2.test", "A")] = ["127.0.0.9"]
    error = failed_challenge(c, "closed2.test", "tls-alpn-01")
    assert error["type"].endswith(":connection"), error
    assert error["detail"] == ("tls-alpn-01 for closed2.test: cannot connect to 127.0.0.9 "
                               f"port {world.ca.tls_port}: Connection refused"), error
    # A name with no address: RFC 8555's "dns" (not the drafts' "unknownHost")
    error = failed_challenge(c, "nowhere.test", "http-01")
    assert error["type"] == "urn:ietf:params:acme:error:dns", error
    assert "nowhere.test" in error["detail"], error


def test_a_resolver_failure_is_said_of_the_configured_resolver() -> None:
    import dns.message
    import dns.resolver

    from ca.acme.validation import Validator
    from ca.config import AcmeConfig
    v = Validator(AcmeConfig(resolver=("10.0.0.53", 5353)))
    said = v._dns_why(dns.resolver.LifetimeTimeout(timeout=5.4, errors=[]))
    assert said == "the resolver 10.0.0.53:5353 ([acme] resolver) did not answer within 5.4 s"
    query = dns.message.make_query("x.test", "A")
    said = v._dns_why(dns.resolver.NoNameservers(request=query, errors=[]))
    assert said.startswith("the resolver 10.0.0.53:5353 ([acme] resolver) refused or failed")


def test_eab_keys_are_audited_without_their_secret(world: World) -> None:
    kid, hmac = world.ca.eab("web.test", "*.svc.test", ttl="2h")
    line = next(x for x in audit_lines(world.ca)
                if x.get("event") == "acme.eab.create" and x.get("kid") == kid)
    assert line["names"] == ["web.test", "*.svc.test"] and line["actor"].startswith("cert:")
    # bare bools: a failure must not print the key itself
    in_log = hmac in (world.ca.daemon.state / "audit" / "log.jsonl").read_text()
    in_stderr = hmac in "".join(world.ca.daemon.stderr)
    assert not in_log, "the audit log holds an EAB HMAC key"
    assert not in_stderr, "the daemon logged an EAB HMAC key"
    bad = hsmca("acme", "eab", "create", "--config", world.ca.config, "--names", "Bad Name",
                check=False)
    assert bad.returncode == 1 and "Bad Name" in bad.stderr


def test_an_admin_lists_withdraws_eab_keys_and_deactivates_accounts(world: World) -> None:
    """An ACME trial: an EAB key handed to the wrong person or leaked stayed bindable
    until it expired (up to 30 days), and an account could not be stopped by the
    operator. `hsmca acme eab list|withdraw` and `hsmca acme account list|deactivate`
    do it, each step audited, no MAC key ever listed."""
    ca = world.ca
    leaked_kid, leaked_hmac = ca.eab("leak.test")
    kept_kid, kept_hmac = ca.eab("kept.test")
    listed = hsmca("acme", "eab", "list", "--config", ca.config).stdout
    assert leaked_hmac not in listed and kept_hmac not in listed
    assert any(line.split()[:2] == [leaked_kid, "unused"] for line in listed.splitlines())
    out = hsmca("acme", "eab", "withdraw", leaked_kid, "--config", ca.config).stdout
    assert f"withdrew {leaked_kid}" in out
    thief = Client(ca)
    r = thief.register((leaked_kid, leaked_hmac))
    assert r.status == 403 and r.problem == "unauthorized", r.body
    # "withdrawn" among what it may be (an ACME trial's lego said the four others)
    assert "unknown, used, expired, withdrawn or wrongly MACed" in r.json["detail"], r.body
    again = hsmca("acme", "eab", "withdraw", leaked_kid, "--config", ca.config, check=False)
    assert again.returncode == 1 and "is withdrawn already" in again.stderr
    assert "deactivate the account" not in again.stderr  # it bound none
    holder = Client(ca)
    assert holder.register((kept_kid, kept_hmac), contact=["mailto:ops@kept.test"]).status \
        == 201
    listed = hsmca("acme", "eab", "list", "--config", ca.config).stdout.splitlines()
    assert any(line.split()[:2] == [leaked_kid, "withdrawn"] for line in listed)
    account = holder.kid.rsplit("/", 1)[1]  # type: ignore[union-attr]
    assert any(line.split()[:3] == [kept_kid, "used", account] for line in listed)
    # ENDS: a used key's binding, a withdrawn key's withdrawal (not an expiry days ahead)
    assert listed[0].split()[3] == "ENDS", listed[0]
    [withdrawn] = [x for x in listed if x.startswith(leaked_kid)]
    [used] = [x for x in listed if x.startswith(kept_kid)]
    now = dt.datetime.now(dt.UTC).isoformat()
    assert withdrawn.split()[3] <= now and used.split()[3] <= now, (withdrawn, used, now)
    refused = hsmca("acme", "eab", "withdraw", kept_kid, "--config", ca.config, check=False)
    assert refused.returncode == 1 and "deactivate the account" in refused.stderr
    accounts = hsmca("acme", "account", "list", "--config", ca.config).stdout.splitlines()
    assert any(line.split()[:3] == [account, "valid", kept_kid] for line in accounts)
    assert accounts[0].split()[4] == "CONTACT", accounts[0]  # as its --help says
    assert any(line.split()[:1] == [account] and line.split()[4] == "ops@kept.test"
               for line in accounts), accounts
    # (after --, as its --help says for an id that begins with '-')
    hsmca("acme", "account", "deactivate", "--config", ca.config, "--", account)
    r = holder.order("kept.test")
    assert r.status in (401, 403) and r.problem == "unauthorized", r.body
    assert "deactivated" in r.json["detail"]
    lines = list(audit_lines(ca))
    assert [x["kid"] for x in lines if x["event"] == "acme.eab.withdraw"] == [leaked_kid]
    [stop] = [x for x in lines if x["event"] == "acme.account.deactivate"
              and x.get("account") == account]
    assert stop["actor"].startswith("cert:")
    in_log = leaked_hmac in (ca.daemon.state / "audit" / "log.jsonl").read_text()
    assert not in_log, "the audit log holds an EAB HMAC key"


def test_an_eab_key_that_expired_unbound_loses_its_mac_key(tmp_path: Path) -> None:
    """An ACME trial: the HMAC key of an EAB key that expired unused stayed in the
    inventory for good, where a used or withdrawn one's is erased. The daemon erases it
    (at start, and every few minutes), and it still reads as expired."""
    ca = start_acme_ca(tmp_path, ("a.test",))
    try:
        kid, hmac = ca.eab("*.test", ttl="1s")
        deadline = time.monotonic() + 30
        while not any(line.split()[:2] == [kid, "expired"] for line in hsmca(
                "acme", "eab", "list", "--config", ca.config).stdout.splitlines()):
            assert time.monotonic() < deadline, "the EAB key never expired"
        ca.daemon.stop()
        ca.daemon = start_daemon(ca.daemon.state)
        assert ca.daemon.wait_stderr(lambda: any(
            '"acme eab keys expired unbound' in x and kid in x for x in ca.daemon.stderr))
        with sqlite3.connect(ca.daemon.state / "hsmca.sqlite3") as db:
            [(mac_key,)] = db.execute("SELECT mac_key FROM acme_eab WHERE kid = ?", (kid,))
        assert mac_key == b""
        listed = hsmca("acme", "eab", "list", "--config", ca.config).stdout
        assert any(line.split()[:2] == [kid, "expired"] for line in listed.splitlines())
        r = Client(ca).register((kid, hmac))
        assert r.status == 403 and r.problem == "unauthorized", r.body
    finally:
        ca.daemon.stop()


def test_eab_keys_can_follow_a_client_flag() -> None:
    """certbot and lego take `--eab-hmac-key KEY`; a KEY starting with '-' is read as
    an option ("expected one argument"), which happened to one key in 64."""
    for _ in range(4096):
        key, text = new_eab_key()
        assert not text.startswith("-"), text
        assert base64.urlsafe_b64decode(text + "=") == key and len(key) == 32


def test_renewal_info_suggests_a_window_inside_the_validity(world: World) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("c.test")
    c.validate_http01(order, world.responder)
    done = c.finalize(order, ["c.test"])
    cert = x509.load_pem_x509_certificates(c.post(done.json["certificate"]).body)[0]
    from tests.acme_kit import cert_id
    r = c.session.get(f"{c.dir['renewalInfo']}/{cert_id(cert)}")
    assert r.status_code == 200 and r.headers["Retry-After"]
    import datetime as dt
    w = r.json()["suggestedWindow"]
    start, end = (dt.datetime.fromisoformat(w[k]) for k in ("start", "end"))
    assert cert.not_valid_before_utc < start < end < cert.not_valid_after_utc
    # A client that polls as told cannot step over the window (6 h over a 4 h one could)
    assert 0 < int(r.headers["Retry-After"]) <= (end - start).total_seconds() / 4, r.headers


def test_an_acme_certificate_renews_over_acme_only(world: World, tmp_path: Path) -> None:
    """A certificate issued over ACME is a TLS client of the CA like any other, but its
    renewal over mutual TLS (or EST) is refused: it would outlive its account and the
    account's name patterns, at any lifetime up to the maximum (security review)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("d.test")
    c.validate_http01(order, world.responder)
    key = ec.generate_private_key(ec.SECP256R1())
    done = c.finalize(order, ["d.test"], key)
    (tmp_path / "cert.pem").write_bytes(c.post(done.json["certificate"]).body)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    mtls = {"cert": (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
            "verify": str(world.ca.daemon.root), "timeout": 30}
    assert requests.get(f"{world.ca.url}/v1/whoami", **mtls).json()["role"] == "service"
    r = requests.post(f"{world.ca.url}/v1/x509/renew", json={"ttl": "30d"}, **mtls)
    assert r.status_code == 403 and r.headers["Content-Type"].startswith("application/problem+json")
    assert "issued over ACME" in r.json()["detail"], r.json()
    r = requests.post(f"{world.ca.url}/.well-known/est/simplereenroll", **mtls,
                      headers={"Content-Type": "application/pkcs10"},
                      data=base64.b64encode(csr_der(["d.test"], key)))
    assert r.status_code == 403, r.text


def test_a_key_revoked_for_compromise_is_refused_as_a_bad_csr(world: World) -> None:
    """The CSR's key is what is barred, so badCSR (RFC 8555 7.4): with badPublicKey,
    which is the JWS key's, certbot said "The JWS was signed by a public key the server
    does not support" (an ACME trial)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    key = ec.generate_private_key(ec.SECP256R1())
    world.dns.records[("kc.test", "A")] = ["127.0.0.1"]
    order = c.order("kc.test")
    c.validate_http01(order, world.responder)
    done = c.finalize(order, ["kc.test"], key)
    der = x509.load_pem_x509_certificate(c.post(done.json["certificate"]).body).public_bytes(
        serialization.Encoding.DER)
    revoked = c.post(f"{world.ca.url}/acme/revoke-cert", {"certificate": b64(der), "reason": 1})
    assert revoked.status == 200, revoked.body
    order = c.order("kc.test")
    c.validate_http01(order, world.responder)
    again = c.finalize(order, ["kc.test"], key)
    assert again.status == 400 and again.problem == "badCSR", again.body
    assert "keyCompromise" in again.json["detail"], again.json
    # and how to make certbot stop sending it (an ACME trial's --reuse-key never could)
    assert "certbot: renew with --no-reuse-key once" in again.json["detail"], again.json
    fresh = c.finalize(order, ["kc.test"])  # a new key: the order is still ready for it
    assert fresh.status == 200, fresh.body
    # Nor as an account's key, new or changed to (an ACME trial registered one with
    # it), as Boulder refuses blocked keys: badPublicKey, which is the JWS key's
    barred = Client(world.ca, key=jose.JWKEC(key=key))
    r = barred.register(world.ca.eab("*.test"))
    assert r.status == 400 and r.problem == "badPublicKey", r.body
    assert "reported compromised" in r.json["detail"], r.json
    r = key_change(c, jose.JWKEC(key=key))
    assert r.status == 400 and r.problem == "badPublicKey", r.body


def test_an_account_holding_every_name_may_revoke_a_certificate_it_did_not_order(
        world: World, tmp_path: Path) -> None:
    """RFC 8555 7.6: the server MUST consider an account that holds authorizations for
    all of a certificate's names (an ACME trial found it refused). Such an account
    revokes for cessationOfOperation or no reason; one holding only some of the names
    may not."""
    from cryptography.hazmat.primitives import serialization
    owner, other, partial = Client(world.ca), Client(world.ca), Client(world.ca)
    for c in (owner, other, partial):
        assert c.register(world.ca.eab("*.test")).status == 201
    for name in ("held-a.test", "held-b.test"):
        world.dns.records[(name, "A")] = ["127.0.0.1"]
    order = owner.order("held-a.test", "held-b.test")
    owner.validate_http01(order, world.responder)
    done = owner.finalize(order, ["held-a.test", "held-b.test"])
    der = x509.load_pem_x509_certificate(owner.post(done.json["certificate"]).body
                                         ).public_bytes(serialization.Encoding.DER)
    url = f"{world.ca.url}/acme/revoke-cert"
    one = partial.order("held-a.test")
    partial.validate_http01(one, world.responder)
    refused = partial.post(url, {"certificate": b64(der)})
    assert refused.status == 403 and refused.problem == "unauthorized", refused.body
    both = other.order("held-a.test", "held-b.test")
    other.validate_http01(both, world.responder)
    compromise = other.post(url, {"certificate": b64(der), "reason": 1})
    assert compromise.status == 400 and compromise.problem == "badRevocationReason" and \
        "certificate's key" in compromise.json["detail"], compromise.body
    revoked = other.post(url, {"certificate": b64(der), "reason": 5})
    assert revoked.status == 200, revoked.body
    again = owner.post(url, {"certificate": b64(der)})
    assert again.problem == "alreadyRevoked", again.body
    # Never a certificate the CA issued otherwise: a service's mutual-TLS identity is
    # not the ACME account's to revoke for holding its name over http-01 (a review)
    from tests.helpers import enroll
    world.dns.records[("held-mtls.test", "A")] = ["127.0.0.1"]
    svc, _ = enroll(world.ca.daemon, tmp_path, "service", ["held-mtls.test"])
    svc_der = x509.load_pem_x509_certificate(svc.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    held = other.order("held-mtls.test")
    other.validate_http01(held, world.responder)
    refused = other.post(url, {"certificate": b64(svc_der), "reason": 5})
    assert refused.status == 403 and refused.problem == "unauthorized", refused.body


def test_a_name_in_upper_case_is_ordered_and_issued_in_lower_case(world: World) -> None:
    """lego sends `-d WEB.example` as typed, in the order and in its CSR; it was refused
    "must be lower case" where Let's Encrypt lower-cases it (an ACME trial)."""
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("B.Test")
    assert order.status == 201, order.body
    assert order.json["identifiers"] == [{"type": "dns", "value": "b.test"}]
    c.validate_http01(order, world.responder)
    done = c.finalize(order, ["B.Test"])
    assert done.status == 200, done.body
    cert = x509.load_pem_x509_certificate(c.post(done.json["certificate"]).body)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["b.test"]


def test_every_refused_identifier_is_said_at_once(world: World) -> None:
    """An order with two refused names named only the first, so an ACME trial fixed its
    names one request at a time: each has its subproblem (RFC 8555 6.7.1)."""
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    r = c.post(c.dir["newOrder"], {"identifiers": [
        {"type": "dns", "value": "a.test"}, {"type": "dns", "value": "outside.example"},
        {"type": "ip", "value": "127.0.0.1"}]})
    assert r.status == 400 and r.problem == "rejectedIdentifier", r.body
    assert r.json["detail"].startswith("2 identifiers are refused: "), r.json
    subs = {(s["identifier"]["type"], s["identifier"]["value"]): s["type"].rsplit(":", 1)[1]
            for s in r.json["subproblems"]}
    assert subs == {("dns", "outside.example"): "rejectedIdentifier",
                    ("ip", "127.0.0.1"): "unsupportedIdentifier"}, r.json
    # One refused name: its own problem, as before
    one = c.order("a.test", "outside2.example")
    assert one.problem == "rejectedIdentifier" and "subproblems" not in one.json, one.json
    assert "'outside2.example'" in one.json["detail"]


def test_one_eab_key_bound_by_racing_accounts_leaves_one_account_in_the_log(
        world: World) -> None:
    """A security trial: eight accounts registering at once with one single-use EAB key
    got one 201, and the audit log held five `acme.account.create` lines for that key.
    Each line whose commit lost is followed by a `record.void` naming it."""
    kid, hmac = world.ca.eab("*.test")
    racers = [Client(world.ca) for _ in range(8)]
    url = racers[0].dir["newAccount"]
    bodies = [json.dumps(c.jws(url, {"termsOfServiceAgreed": True,
                                     "externalAccountBinding": c.eab_binding(kid, hmac)},
                               use_jwk=True)) for c in racers]
    with ThreadPoolExecutor(len(racers)) as pool:
        replies = list(pool.map(Client.raw, racers, [url] * len(racers), bodies))
    assert sorted(r.status for r in replies) == [201] + [403] * 7, [r.body for r in replies]
    [won] = [r for r in replies if r.status == 201]
    lines = list(audit_lines(world.ca))
    created = {x["seq"]: x["account"] for x in lines
               if x["event"] == "acme.account.create" and x["eab_kid"] == kid}
    voided = {x["voids"] for x in lines if x["event"] == "record.void"
              and x["voided"] == "acme.account.create" and x["voids"] in created}
    assert [a for seq, a in created.items() if seq not in voided] == [
        won.headers["Location"].rsplit("/", 1)[1]], (created, voided)
    # Each loser is told what to do, and the operator's log names the key for each
    # (an ACME trial: those that lost the race at the commit had neither)
    for r in replies:
        if r.status == 403:
            assert "ask the CA's operator for a new EAB key" in r.json["detail"], r.json

    def refusals() -> int:
        return sum(1 for e in (json.loads(x) for x in list(world.ca.daemon.stderr)
                               if x.startswith("{"))
                   if e.get("event", "").startswith("ACME account refused: ")
                   and e.get("kid") == kid)
    assert world.ca.daemon.wait_stderr(lambda: refusals() >= 7) and refusals() == 7


def test_a_refusal_does_not_tell_an_account_the_cas_lists(world: World) -> None:
    """The deny list names the CA's internal domains, so an account (anyone who can
    reach the directory, without EAB) learns that a name is refused, not the rule:
    a security trial read `*.secret.test` out of a refusal. The operator's log has it."""
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    r = c.order("db.secret.test")
    assert r.problem == "rejectedIdentifier", r.body
    detail = r.json["detail"]
    assert "'db.secret.test'" in detail and "ask the CA's operator" in detail, r.json
    assert "*.secret.test" not in detail and "deny" not in detail, r.json
    both = c.order("x.secret.test", "outside.example")
    assert "*.secret" not in both.body.decode() and "deny" not in both.body.decode(), \
        both.body
    assert logged(world, "acme request refused by the name policy",
                  lambda e: "'*.secret.test' of the CA's deny list" in e["detail"]
                  and "db.secret.test" in e["detail"])


def test_an_admin_lists_what_one_acme_account_got(world: World) -> None:
    """After deactivating an account its certificates stay valid, "revoke them apart":
    an ACME trial found no command that lists them (the inventory links them)."""
    mine, other = Client(world.ca), Client(world.ca)
    got = {}
    for c, name in ((mine, "a.test"), (mine, "b.test"), (other, "c.test")):
        if c.kid is None:
            assert c.register(world.ca.eab("*.test")).status == 201
        order = c.order(name)
        c.validate_http01(order, world.responder)
        done = c.finalize(order, [name])
        assert done.status == 200, done.body
        cert = x509.load_pem_x509_certificate(c.post(done.json["certificate"]).body)
        got[name] = (format(cert.serial_number, "x"), order.headers["Location"])
    account = mine.kid.rsplit("/", 1)[1]  # type: ignore[union-attr]
    admin = ("--config", world.ca.config, "--url", world.ca.url)
    listed = hsmca("cert", "list", "--account", account, *admin).stdout.splitlines()
    assert sorted(line.split()[0] for line in listed[1:]) == sorted(
        (got["a.test"][0], got["b.test"][0])), listed
    assert all(line.split()[3] == "acme" for line in listed[1:]), listed
    acme = hsmca("cert", "list", "--kind", "acme", "--search", "c.test", *admin).stdout
    assert got["c.test"][0] in acme
    assert hsmca("cert", "list", "--kind", "x509", "--search", "c.test", *admin
                 ).stdout == "no certificate matches\n"
    shown = hsmca("cert", "show", got["a.test"][0], *admin).stdout
    order_id = got["a.test"][1].rstrip("/").rsplit("/", 1)[1]
    assert f"acme        account {account}, order {order_id}" in shown, shown


class TLSServer:
    """Answers TLS handshakes on 127.0.0.1:port with one certificate, offering `alpn`."""

    def __init__(self, port: int, tmp: Path, name: str, acme_ext: bytes | None,
                 alpn: str | None) -> None:
        import datetime as dt
        import ssl

        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
             .public_key(key.public_key()).serial_number(1).not_valid_before(now)
             .not_valid_after(now + dt.timedelta(hours=1))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), True))
        if acme_ext is not None:
            b = b.add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"), acme_ext), critical=True)
        cert, keyfile = tmp / "alpn.pem", tmp / "alpn.key"
        cert.write_bytes(b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, keyfile)
        if alpn:
            ctx.set_alpn_protocols([alpn])
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.ctx = ctx
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept(), so the port is free at once
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.mark.parametrize("good_digest, alpn, kind, words", [
    (False, "acme-tls/1", "incorrectResponse", "wrong digest"),
    (True, None, "tls", "did not negotiate acme-tls/1"),
    # no extension at all: said in words, not with cryptography's repr of its OID (an
    # ACME trial read "<ObjectIdentifier(oid=1.3.6.1.5.5.7.1.31, name=Unknown OID)>")
    (None, "acme-tls/1", "incorrectResponse",
     "the certificate has no acmeIdentifier extension (1.3.6.1.5.5.7.1.31, RFC 8737 3)"),
])
def test_tls_alpn01_checks_the_protocol_and_the_digest(
        world: World, tmp_path: Path, good_digest: bool | None, alpn: str | None, kind: str,
        words: str) -> None:
    import hashlib
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    order = c.order("b.test")
    ch = c.answer(order, "tls-alpn-01")[0]
    digest = hashlib.sha256(c.key_authorization(ch["token"]).encode()).digest()
    ext = None if good_digest is None else b"\x04\x20" + (digest if good_digest else bytes(32))
    server = TLSServer(world.ca.tls_port, tmp_path, "b.test", ext, alpn)
    try:
        assert c.post(ch["url"], {}).status == 200
        authz = c.wait_authz(order.json["authorizations"][0])
    finally:
        server.close()
    assert authz["status"] == "invalid"
    failed = next(x for x in authz["challenges"] if x["type"] == "tls-alpn-01")
    assert failed["error"]["type"].endswith(f":{kind}") and words in failed["error"]["detail"]
    assert "<" not in failed["error"]["detail"], failed["error"]


def test_failed_validations_and_new_orders_are_rate_limited(world: World) -> None:
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    # Nobody answers for nobody.test: each validation fails, and at most 12 an hour
    # may fail for one account.
    for _ in range(13):
        order = c.order("nobody.test")
        ch = c.answer(order, "http-01")[0]
        r = c.post(ch["url"], {})
        if r.status == 429:
            break
        assert r.status == 200, r.body
        assert c.wait_authz(order.json["authorizations"][0])["status"] == "invalid"
    assert r.status == 429 and r.problem == "rateLimited"
    # It says which setting, and to come back when the oldest failure is an hour old
    # (a fixed minute sent clients back too soon).
    assert "([acme] failed-validations-per-hour)" in r.json["detail"], r.json
    assert 3000 < int(r.headers["Retry-After"]) <= 3600, r.headers
    # With bindings, the count is the account's: another account at the same address
    # (a fleet behind one NAT) still validates.
    other = Client(world.ca)
    assert other.register(world.ca.eab("*.test")).status == 201
    order = other.order("nobody.test")
    assert other.post(other.answer(order, "http-01")[0]["url"], {}).status == 200
    # new orders: 24 an hour per account; this account placed some above
    for _ in range(34):
        r = c.order("d.test")
        if r.status == 429:
            break
        assert r.status == 201
    assert r.problem == "rateLimited"


def test_acme_urls_are_built_on_the_cas_own_names_only(world: World) -> None:
    """A security trial: the directory's URLs, and the `url` a JWS is bound to, followed
    the request's Host, so any origin a proxy passed on was taken as the CA's own."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(world.ca.daemon.root)
    r = session.get(world.ca.directory_url, headers={"Host": "evil.example"})
    assert r.status_code == 400 and r.headers["Content-Type"].startswith(
        "application/problem+json"), r.text
    assert "'evil.example'" in r.json()["detail"] and "own names" in r.json()["detail"]
    assert "hsmca.invalid" not in r.json()["detail"]  # the loopback-only name is not offered
    # Nor a Host that only parses as the CA's (a review: `evil.example/@localhost` passed
    # the check and became every URL), nor a malformed one (a 500, before)
    port = world.ca.directory_url.split(":")[2].split("/")[0]
    for host in (f"evil.example/@localhost:{port}", f"evil.example#@localhost:{port}",
                 "localhost:99999", "localhost:abc", "[::1", "[::1]x"):
        r = session.get(world.ca.directory_url, headers={"Host": host})
        assert r.status_code == 400 and "own names" in r.json()["detail"], (host, r.text)
    r = session.get(world.ca.directory_url, headers={"Host": f"LOCALHOST.:{port}"})
    assert r.status_code == 200 and r.json()["newOrder"] == \
        f"https://localhost:{port}/acme/new-order", r.text
    ok = session.get(world.ca.directory_url)
    assert ok.status_code == 200 and ok.json()["newOrder"].startswith(
        world.ca.directory_url.rsplit("/acme/", 1)[0]), ok.text


def test_names_waiting_for_validation_are_bounded_per_account(world: World) -> None:
    """A security trial: orders of 100 names that are never validated, 300 an hour, grew
    the inventory by 470 MB a day for one account. The names an account has waiting
    are bounded ([acme] pending-authorizations)."""
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    first = c.order(*(f"w{i}.test" for i in range(30)))
    assert first.status == 201, first.body
    over = c.order(*(f"x{i}.test" for i in range(11)))
    assert over.status == 429 and over.problem == "rateLimited", over.body
    assert "this account has 30 names waiting for validation, and at most 40" in \
        over.json["detail"] and "([acme] pending-authorizations;" in over.json["detail"]
    assert c.order(*(f"y{i}.test" for i in range(10))).status == 201  # up to the bound
    # Deactivated, they still take room: their rows stay until their order expires (a
    # review: deactivating and ordering again grew the inventory as before)
    for authz in first.json["authorizations"][:5]:
        assert c.post(authz, {"status": "deactivated"}).status == 200
    assert c.order("z0.test").status == 429
    # An order larger than the bound on its own can never pass: said so, with no
    # Retry-After that a client would obey every hour (an ACME trial, told to validate
    # the names it had waiting, of which it had none)
    fresh = Client(world.ca)
    assert fresh.register(world.ca.eab("*.test")).status == 201
    big = fresh.order(*(f"v{i}.test" for i in range(41)))
    assert big.status == 400 and big.problem == "rateLimited", big.body
    assert "this order has 41 names, and at most 40" in big.json["detail"], big.body
    assert "Retry-After" not in big.headers


def test_orders_sent_at_once_stay_within_the_bound_on_names_waiting(world: World) -> None:
    """The bound was counted before the order was written, so orders sent together
    each passed a count none of the others had reached: eight orders of 15 names at
    once, against a bound of 40, must leave at most 30 waiting, the others refused."""
    c = Client(world.ca)
    assert c.register(world.ca.eab("*.test")).status == 201
    racers = [Client(world.ca, key=c.key, kid=c.kid) for _ in range(8)]
    url = c.dir["newOrder"]
    bodies = [json.dumps(r.jws(url, {"identifiers": [
        {"type": "dns", "value": f"r{n}-{i}.test"} for i in range(15)]}))
        for n, r in enumerate(racers)]
    with ThreadPoolExecutor(len(racers)) as pool:
        replies = list(pool.map(Client.raw, racers, [url] * len(racers), bodies))
    assert sorted(r.status for r in replies) == [201] * 2 + [429] * 6, [
        r.body for r in replies]
    assert all(r.problem == "rateLimited" and "([acme] pending-authorizations;"
               in r.json["detail"] for r in replies if r.status == 429), replies
    over = c.order(*(f"s{i}.test" for i in range(11)))
    assert over.status == 429 and "this account has 30 names waiting" in \
        over.json["detail"], over.body


def test_wildcards_allowed_without_a_resolver_are_said_when_put_in_force(
        tmp_path: Path) -> None:
    """An ACME trial turned allow-wildcards on and learned only at each order that ACME
    needs [acme] resolver for them (dns-01): the reload says so."""
    import os
    import signal

    from tests.conftest import set_config
    ca = start_acme_ca(tmp_path, ("a.test",))
    try:
        said = "ACME orders for wildcard names are refused"
        assert not any(said in line for line in ca.daemon.stderr)
        set_config(ca.daemon.state, "policy", "allow-wildcards", True)
        os.kill(ca.daemon.proc.pid, signal.SIGHUP)
        assert ca.daemon.wait_stderr(lambda: any(said in line and "[acme] resolver" in line
                                                 for line in ca.daemon.stderr)), \
            "".join(ca.daemon.stderr[-5:])
        c = Client(ca)
        assert c.register(ca.eab("*.w.test")).status == 201
        r = c.order("*.w.test")
        assert r.problem == "rejectedIdentifier" and "[acme] resolver" in r.json["detail"]
    finally:
        ca.daemon.stop()


def test_no_acme_without_the_section(daemon: Daemon) -> None:
    r = requests.get(f"{daemon.url}/acme/directory", verify=str(daemon.root))
    assert r.status_code == 404
    p = hsmca("acme", "eab", "create", "--config", daemon.state / "hsmca.toml", "--url",
              daemon.url, "--names", "*.test", check=False)
    assert p.returncode == 1 and "[acme]" in p.stderr


def test_a_client_pointed_at_acme_is_told_where_the_directory_is(world: World) -> None:
    """certbot --server https://ca:8443/acme got a bare 'no such endpoint' (ACME trial)."""
    r = requests.get(f"{world.ca.url}/acme", verify=str(world.ca.daemon.root), timeout=30)
    assert r.status_code == 404
    assert r.json()["detail"].endswith("an ACME client's --server is "
                                       "https://HOST:PORT/acme/directory"), r.text


def test_no_account_id_looks_like_an_option() -> None:
    """An id beginning with '-' was taken by `hsmca acme account deactivate ID` for an
    option (a suite run drew one: 1 id in 64)."""
    from ca.acme.server import _new_id
    ids = [_new_id() for _ in range(2_000)]
    assert not [i for i in ids if i.startswith("-")] and len(set(ids)) == len(ids)
