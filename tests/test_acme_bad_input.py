"""Bad input to the ACME endpoints of a real daemon: each case gets its status and its
ACME problem type (urn:ietf:params:acme:error:*), never a 5xx; a hypothesis fuzz of the
JWS parser (in process, on a real inventory) and of the endpoints; afterwards the
daemon still issues and the audit log verifies."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import josepy as jose
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca.acme import jws as acme_jws
from ca.acme.nonces import Nonces
from ca.acme.problems import AcmeProblem
from ca.store import AcmeAccount
from ca.store.sqlite import SQLiteStore
from tests.acme_kit import (
    AcmeCA,
    Client,
    Reply,
    Responder,
    b64,
    cert_id,
    csr_der,
    new_key,
    sign,
    start_acme_ca,
)
from tests.helpers import audit_verify

NAMES = ("acme1.test", "acme2.test", "acme3.test", "evil.example")


@dataclass
class World:
    ca: AcmeCA
    responder: Responder
    a: Client  # an account bound to *.test
    b: Client  # another account
    pending: Reply  # an order of a's, not validated
    ready: Reply  # an order of a's, validated
    cert: x509.Certificate  # issued to a
    cert_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ca = start_acme_ca(tmp_path_factory.mktemp("acme-bad"), NAMES)
    responder = Responder(ca.http_port)
    try:
        a, b = Client(ca), Client(ca)
        assert a.register(ca.eab("*.test")).status == 201
        assert b.register(ca.eab("*.test")).status == 201
        pending = a.order("acme1.test")
        ready = a.order("acme2.test")
        a.validate_http01(ready, responder)
        issued = a.order("acme3.test")
        a.validate_http01(issued, responder)
        cert_key = ec.generate_private_key(ec.SECP256R1())
        done = a.finalize(issued, ["acme3.test"], cert_key)
        assert done.status == 200 and done.json["status"] == "valid", done.body
        chain = a.post(done.json["certificate"])
        cert = x509.load_pem_x509_certificates(chain.body)[0]
        yield World(ca, responder, a, b, pending, ready, cert, cert_key)
    finally:
        responder.close()
        ca.daemon.stop()


def url(w: World, name: str) -> str:
    return str(w.a.dir[name])


def der_b64(cert: x509.Certificate) -> str:
    return b64(cert.public_bytes(serialization.Encoding.DER))


def rsa_jwk(bits: int) -> jose.JWKRSA:
    return jose.JWKRSA(key=rsa.generate_private_key(65537, bits))


def raw_jws(w: World, target: str, **kw: Any) -> dict[str, str]:
    return w.a.jws(target, kw.pop("payload", {}), **kw)


# Each case: (what, request) -> the expected (status, ACME error type).
Case = Callable[[World], Reply]
CASES: list[tuple[str, Case, int, str]] = []


def case(status: int, kind: str) -> Callable[[Case], Case]:
    def add(fn: Case) -> Case:
        CASES.append((fn.__name__, fn, status, kind))
        return fn
    return add


# ---- the HTTP layer ------------------------------------------------------------------------

@case(405, "malformed")
def get_on_a_post_resource(w: World) -> Reply:
    r = w.a.session.get(url(w, "newAccount"))
    return Reply(r.status_code, r.headers, r.content)


@case(405, "malformed")
def get_on_an_order(w: World) -> Reply:
    r = w.a.session.get(w.pending.headers["Location"])
    return Reply(r.status_code, r.headers, r.content)


@case(405, "malformed")
def post_to_the_directory(w: World) -> Reply:
    return w.a.raw(url(w, "newNonce").replace("new-nonce", "directory"), b"{}")


@case(404, "malformed")
def unknown_acme_path(w: World) -> Reply:
    r = w.a.session.post(f"{w.ca.url}/acme/nothing-here", data=b"{}")
    return Reply(r.status_code, r.headers, r.content)


@case(415, "malformed")
def json_content_type(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), json.dumps(raw_jws(w, url(w, "newOrder"))),
                   "application/json")


@case(413, "malformed")
def body_over_64k(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), b"x" * 70_000)


# ---- step 1: one flattened JWS -----------------------------------------------------------

@case(400, "malformed")
def body_not_json(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), b"{not json")


@case(400, "malformed")
def body_a_json_list(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), b"[]")


@case(400, "malformed")
def unprotected_header(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "header": {"kid": w.a.kid}}))


@case(400, "malformed")
def several_signatures(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({"payload": j["payload"], "signatures": [
        {"protected": j["protected"], "signature": j["signature"]}]}))


@case(400, "malformed")
def compact_serialization(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), f"{j['protected']}.{j['payload']}.{j['signature']}")


@case(400, "malformed")
def no_signature_member(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    del j["signature"]
    return w.a.raw(url(w, "newOrder"), json.dumps(j))


@case(400, "malformed")
def protected_not_base64url(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "protected": "!!!"}))


@case(400, "malformed")
def protected_padded(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "protected": j["protected"] + "=="}))


@case(400, "malformed")
def protected_not_json(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "protected": b64(b"not json")}))


@case(400, "malformed")
def protected_a_list(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "protected": b64(b"[1]")}))


@case(400, "malformed")
def members_not_strings(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "payload": 7}))


@case(400, "malformed")
def unexpected_protected_field(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, crit=["b64"])


# ---- step 2: the algorithm ------------------------------------------------------------------

@case(400, "badSignatureAlgorithm")
def alg_none(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    head = json.loads(base64.urlsafe_b64decode(j["protected"] + "=="))
    head["alg"] = "none"
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "protected": b64(
        json.dumps(head).encode()), "signature": ""}))


@case(400, "badSignatureAlgorithm")
def alg_hs256(w: World) -> Reply:
    head = {"alg": "HS256", "kid": w.a.kid, "nonce": w.a.nonce(), "url": url(w, "newOrder")}
    return w.a.raw(url(w, "newOrder"), json.dumps(sign(jose.JWKOct(key=b"k" * 32), b"{}", head,
                                                       jose.HS256)))


@case(400, "badSignatureAlgorithm")
def alg_rs256_with_an_ec_key(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"), alg=jose.ES256)
    head = json.loads(base64.urlsafe_b64decode(j["protected"] + "=="))
    head["alg"] = "RS256"
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "protected": b64(
        json.dumps(head).encode())}))


@case(400, "badSignatureAlgorithm")
def es384_with_a_p256_key(w: World) -> Reply:
    return w.a.raw(url(w, "newAccount"), json.dumps(_es384_on_p256(w, Client(w.ca))))


def _es384_on_p256(w: World, c: Client) -> dict[str, str]:
    j = c.jws(url(w, "newAccount"), {}, use_jwk=True)
    head = json.loads(base64.urlsafe_b64decode(j["protected"] + "=="))
    head["alg"] = "ES384"
    return {**j, "protected": b64(json.dumps(head).encode())}


@case(400, "badSignatureAlgorithm")
def alg_unknown(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), json.dumps(_alg(w, "XX999")))


def _alg(w: World, alg: str) -> dict[str, str]:
    j = raw_jws(w, url(w, "newOrder"))
    head = json.loads(base64.urlsafe_b64decode(j["protected"] + "=="))
    head["alg"] = alg
    return {**j, "protected": b64(json.dumps(head).encode())}


# ---- step 3: the key ---------------------------------------------------------------------------

@case(400, "malformed")
def both_jwk_and_kid(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, jwk=w.a.key.public_key().to_partial_json())


@case(400, "malformed")
def neither_jwk_nor_kid(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, kid=None)


@case(400, "malformed")
def new_account_signed_with_a_kid(w: World) -> Reply:
    return w.a.post(url(w, "newAccount"), {}, use_jwk=False)


@case(400, "malformed")
def new_order_signed_with_a_jwk(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {"identifiers": []}, use_jwk=True)


@case(400, "accountDoesNotExist")
def kid_of_no_account(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, kid=w.a.kid.rsplit("/", 1)[0] + "/nobody")


@case(400, "accountDoesNotExist")
def kid_of_another_server(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, kid="https://elsewhere.example/acme/acct/1")


@case(400, "badPublicKey")
def rsa_1024_account_key(w: World) -> Reply:
    c = Client(w.ca, key=rsa_jwk(1024))
    return c.post(url(w, "newAccount"), {}, use_jwk=True, alg=jose.RS256)


def huge_exponent_jws(target: str, payload: bytes, nonce: str | None) -> dict[str, str]:
    """A JWS by an RSA key whose e has 2047 bits, with a random signature: each check of
    it would cost 40 times an ordinary one (a cheap flood that slowed everyone's
    renewals 25-fold), so it must be refused before its signature is checked."""
    n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n

    def uint(x: int) -> str:
        return b64(x.to_bytes((x.bit_length() + 7) // 8, "big"))
    head = {"alg": "RS256", "jwk": {"kty": "RSA", "n": uint(n), "e": uint((1 << 2046) + 1)},
            "url": target, **({"nonce": nonce} if nonce else {})}
    return {"protected": b64(json.dumps(head).encode()), "payload": b64(payload),
            "signature": b64(os.urandom(256))}


@case(400, "badPublicKey")
def rsa_account_key_with_a_huge_exponent(w: World) -> Reply:
    jws = huge_exponent_jws(url(w, "newAccount"), b"{}", w.a.nonce())
    return w.a.raw(url(w, "newAccount"), json.dumps(jws))


@case(400, "badPublicKey")
def key_change_to_a_key_with_a_huge_exponent(w: World) -> Reply:
    payload = json.dumps({"account": w.a.kid,
                          "oldKey": w.a.key.public_key().to_partial_json()}).encode()
    return w.a.post(url(w, "keyChange"), huge_exponent_jws(url(w, "keyChange"), payload, None))


@case(400, "badSignatureAlgorithm")
def symmetric_jwk(w: World) -> Reply:
    head = {"alg": "ES256", "jwk": {"kty": "oct", "k": b64(b"k" * 32)}, "nonce": w.a.nonce(),
            "url": url(w, "newAccount")}
    return w.a.raw(url(w, "newAccount"), json.dumps(sign(w.a.key, b"{}", head)))


# ---- step 4: the signature -----------------------------------------------------------------

@case(400, "malformed")
def signature_of_another_payload(w: World) -> Reply:
    j = raw_jws(w, url(w, "newOrder"))
    return w.a.raw(url(w, "newOrder"), json.dumps({**j, "payload": b64(b'{"x":1}')}))


@case(400, "malformed")
def signed_by_another_key(w: World) -> Reply:
    j = w.b.jws(url(w, "newOrder"), {}, kid=w.a.kid)
    return w.a.raw(url(w, "newOrder"), json.dumps(j))


# ---- step 5: the nonce ------------------------------------------------------------------------

@case(400, "badNonce")
def no_nonce(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), json.dumps(_without(w, "nonce")))


def _without(w: World, field: str) -> dict[str, str]:
    j = raw_jws(w, url(w, "newOrder"))
    head = json.loads(base64.urlsafe_b64decode(j["protected"] + "=="))
    del head[field]
    return sign(w.a.key, b"{}", head)


@case(400, "badNonce")
def nonce_used_twice(w: World) -> Reply:
    n = w.a.nonce()
    w.a.post(url(w, "newOrder"), {"identifiers": [{"type": "dns", "value": "acme1.test"}]},
             nonce=n)
    return w.a.post(url(w, "newOrder"), {"identifiers": [{"type": "dns",
                                                          "value": "acme1.test"}]}, nonce=n)


@case(400, "badNonce")
def nonce_made_up(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, nonce=b64(bytes(40)))


@case(400, "badNonce")
def nonce_of_the_wrong_length(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, nonce=b64(b"short"))


@case(400, "malformed")
def nonce_not_base64url(w: World) -> Reply:  # RFC 8555 6.5.2: malformed, not badNonce
    return w.a.post(url(w, "newOrder"), {}, nonce="ab+/cd==")


@case(400, "malformed")
def kid_with_a_lone_surrogate(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {}, kid=f"{w.a.kid}\ud800")


@case(400, "malformed")
def identifier_with_a_lone_surrogate(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), b'{"identifiers": [{"type": "dns", '
                    b'"value": "\\udce9.test"}]}')


# ---- step 6: the URL -------------------------------------------------------------------------

@case(401, "unauthorized")
def url_of_another_resource(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), json.dumps(w.a.jws(url(w, "newAccount"), {})))


@case(401, "unauthorized")
def no_url(w: World) -> Reply:
    return w.a.raw(url(w, "newOrder"), json.dumps(_without(w, "url")))


# ---- accounts and EAB ---------------------------------------------------------------------

@case(403, "externalAccountRequired")
def account_without_eab(w: World) -> Reply:
    return Client(w.ca).register(None)


@case(403, "unauthorized")
def eab_with_the_wrong_mac(w: World) -> Reply:
    kid, _ = w.ca.eab("*.test")
    return Client(w.ca).register((kid, b64(b"wrong key of 32 bytes, not ours!")))


@case(403, "unauthorized")
def eab_of_an_unknown_kid(w: World) -> Reply:
    return Client(w.ca).register(("eab-0000000000000000", b64(b"k" * 32)))


@case(403, "unauthorized")
def eab_used_a_second_time(w: World) -> Reply:
    eab = w.ca.eab("*.test")
    assert Client(w.ca).register(eab).status == 201
    return Client(w.ca).register(eab)


@case(403, "unauthorized")
def eab_binding_another_key(w: World) -> Reply:
    c = Client(w.ca)
    binding = c.eab_binding(*w.ca.eab("*.test"), key=new_key())
    return c.post(url(w, "newAccount"), {"externalAccountBinding": binding}, use_jwk=True)


@case(403, "unauthorized")
def eab_for_another_url(w: World) -> Reply:
    c = Client(w.ca)
    binding = c.eab_binding(*w.ca.eab("*.test"), url=f"{w.ca.url}/acme/new-order")
    return c.post(url(w, "newAccount"), {"externalAccountBinding": binding}, use_jwk=True)


@case(400, "malformed")
def eab_not_a_jws(w: World) -> Reply:
    c = Client(w.ca)
    return c.post(url(w, "newAccount"), {"externalAccountBinding": "nope"}, use_jwk=True)


@case(400, "accountDoesNotExist")
def only_return_existing_for_a_new_key(w: World) -> Reply:
    return Client(w.ca).register(None, onlyReturnExisting=True)


@case(400, "unsupportedContact")
def contact_not_mailto(w: World) -> Reply:
    return Client(w.ca).register(w.ca.eab("*.test"), contact=["tel:+1555"])


@case(400, "invalidContact")
def contact_with_two_addresses(w: World) -> Reply:
    return Client(w.ca).register(w.ca.eab("*.test"), contact=["mailto:a@x.test,b@x.test"])


@case(400, "invalidContact")
def contact_with_a_terminal_escape(w: World) -> Reply:  # it would reach an admin's terminal
    return Client(w.ca).register(w.ca.eab("*.test"), contact=["mailto:a\x1b[2J@x.test"])


@case(400, "invalidContact")
def contact_changed_to_one_with_a_bell(w: World) -> Reply:
    return w.a.post(w.a.kid, {"contact": ["mailto:a\x07@x.test"]})


@case(403, "unauthorized")
def posting_to_another_account(w: World) -> Reply:
    return w.b.post(w.a.kid, {"contact": []})


@case(401, "unauthorized")
def new_account_with_a_deactivated_accounts_key(w: World) -> Reply:
    c = Client(w.ca)
    assert c.register(w.ca.eab("*.test")).status == 201
    assert c.post(c.kid, {"status": "deactivated"}).status == 200
    return c.post(c.dir["newAccount"], {"onlyReturnExisting": True}, use_jwk=True)


@case(400, "malformed")
def account_status_other_than_deactivated(w: World) -> Reply:
    return w.a.post(w.a.kid, {"status": "valid"})


@case(400, "malformed")
def key_change_without_an_inner_jws(w: World) -> Reply:
    return w.a.post(url(w, "keyChange"), {"account": w.a.kid})


@case(409, "malformed")
def key_change_to_the_key_of_another_account(w: World) -> Reply:
    inner = w.b.jws(url(w, "keyChange"), {"account": w.a.kid,
                                          "oldKey": w.a.key.public_key().to_partial_json()},
                    use_jwk=True, nonce="x", )
    head = json.loads(base64.urlsafe_b64decode(inner["protected"] + "=="))
    del head["nonce"]
    inner = sign(w.b.key, base64.urlsafe_b64decode(inner["payload"] + "=="), head)
    return w.a.post(url(w, "keyChange"), inner)


# ---- orders ---------------------------------------------------------------------------------

@case(400, "malformed")
def order_without_identifiers(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {"identifiers": []})


@case(400, "malformed")
def order_payload_not_json(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), b"{{")


@case(400, "malformed")
def order_read_with_a_payload(w: World) -> Reply:  # RFC 8555 6.3: the payload is empty
    return w.a.post(w.pending.headers["Location"], {})


@case(400, "malformed")
def certificate_read_with_a_payload(w: World) -> Reply:
    return w.a.post(f"{w.ca.url}/acme/cert/{w.cert.serial_number:x}", {})


def _order_replacing(c: Client, name: str, replaces: str) -> Reply:
    return c.post(c.dir["newOrder"], {"identifiers": [{"type": "dns", "value": name}],
                                      "replaces": replaces})


@case(400, "malformed")
def replaces_something_not_a_cert_id(w: World) -> Reply:
    return _order_replacing(w.a, "acme3.test", "garbage")


@case(400, "malformed")
def replaces_no_certificate(w: World) -> Reply:
    aki, _ = cert_id(w.cert).split(".")
    return _order_replacing(w.a, "acme3.test", f"{aki}.{b64(bytes([1, 2, 3]))}")


@case(403, "unauthorized")
def replaces_another_accounts_certificate(w: World) -> Reply:
    return _order_replacing(w.b, "acme3.test", cert_id(w.cert))


@case(400, "malformed")
def replaces_a_certificate_for_other_names(w: World) -> Reply:
    return _order_replacing(w.a, "acme1.test", cert_id(w.cert))


@case(409, "alreadyReplaced")
def replaces_what_another_order_replaces(w: World) -> Reply:
    first = _order_replacing(w.a, "acme3.test", cert_id(w.cert))
    assert first.status == 201 and first.json["replaces"] == cert_id(w.cert), first.body
    return _order_replacing(w.a, "acme3.test", cert_id(w.cert))


@case(400, "malformed")
def order_as_post_as_get(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), None)


@case(400, "unsupportedIdentifier")
def order_for_an_ip_address(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {"identifiers": [{"type": "ip", "value": "10.0.0.1"}]})


@case(400, "rejectedIdentifier")
def order_outside_the_eab_patterns(w: World) -> Reply:
    return w.a.order("evil.example")


@case(400, "rejectedIdentifier")
def order_for_an_invalid_name(w: World) -> Reply:
    return w.a.order("bad_name.test")


@case(400, "rejectedIdentifier")
def order_for_a_wildcard(w: World) -> Reply:
    return w.a.order("*.acme1.test")


@case(400, "malformed")
def order_with_not_after(w: World) -> Reply:
    return w.a.post(url(w, "newOrder"), {"identifiers": [{"type": "dns", "value": "a.test"}],
                                         "notAfter": "2030-01-01T00:00:00Z"})


@case(404, "malformed")
def unknown_order(w: World) -> Reply:
    return w.a.post(f"{w.ca.url}/acme/order/nothing")


@case(404, "malformed")
def another_accounts_order(w: World) -> Reply:
    return w.b.post(w.ready.headers["Location"])


@case(404, "malformed")
def unknown_authorization(w: World) -> Reply:
    return w.a.post(f"{w.ca.url}/acme/authz/nothing")


@case(404, "malformed")
def another_accounts_authorization(w: World) -> Reply:
    return w.b.post(w.pending.json["authorizations"][0])


@case(400, "malformed")
def changing_an_authorization_other_than_deactivating_it(w: World) -> Reply:
    return w.a.post(w.pending.json["authorizations"][0], {"status": "valid"})


@case(404, "malformed")
def unknown_challenge(w: World) -> Reply:
    return w.a.post(f"{w.ca.url}/acme/chall/nothing", {})


# ---- finalize -----------------------------------------------------------------------------

@case(403, "orderNotReady")
def finalize_a_pending_order(w: World) -> Reply:
    return w.a.finalize(w.pending, ["acme1.test"])


@case(400, "malformed")
def finalize_csr_not_base64url(w: World) -> Reply:
    return w.a.post(w.ready.json["finalize"], {"csr": "%%%"})


@case(400, "badCSR")
def finalize_csr_not_der(w: World) -> Reply:
    return w.a.post(w.ready.json["finalize"], {"csr": b64(b"\x30\x03\x02\x01\x00")})


@case(400, "badCSR")
def finalize_csr_with_another_name(w: World) -> Reply:
    return w.a.finalize(w.ready, ["acme2.test", "acme1.test"])


@case(400, "badCSR")
def finalize_csr_with_the_account_key(w: World) -> Reply:
    return w.a.finalize(w.ready, ["acme2.test"], acme_jws.crypto_key(w.a.key))


@case(400, "badCSR")
def finalize_csr_on_a_weak_curve(w: World) -> Reply:
    return w.a.finalize(w.ready, ["acme2.test"], ec.generate_private_key(ec.SECP224R1()))


@case(400, "badCSR")
def finalize_csr_asking_for_must_staple(w: World) -> Reply:  # certbot --must-staple
    must_staple = x509.TLSFeature([x509.TLSFeatureType.status_request])
    return w.a.post(w.ready.json["finalize"],
                    {"csr": b64(csr_der(["acme2.test"], None, must_staple))})


@case(400, "badCSR")
def finalize_csr_asking_a_name_as_an_email_address(w: World) -> Reply:
    # the CSR's fault, not an identifier refused (a review: rejectedIdentifier)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("acme2.test")]), False)
           .sign(key, hashes.SHA256()))
    return w.a.post(w.ready.json["finalize"],
                    {"csr": b64(csr.public_bytes(serialization.Encoding.DER))})


@case(404, "malformed")
def finalize_another_accounts_order(w: World) -> Reply:
    return w.b.finalize(w.ready, ["acme2.test"])


# ---- certificates, revocation, renewal information -------------------------------------

@case(404, "malformed")
def unknown_certificate(w: World) -> Reply:
    return w.a.post(f"{w.ca.url}/acme/cert/abc123")


@case(404, "malformed")
def certificate_url_not_hex(w: World) -> Reply:
    return w.a.post(f"{w.ca.url}/acme/cert/zz")


@case(403, "unauthorized")
def another_accounts_certificate(w: World) -> Reply:
    return w.b.post(f"{w.ca.url}/acme/cert/{w.cert.serial_number:x}")


@case(403, "unauthorized")
def revoke_another_accounts_certificate(w: World) -> Reply:
    return w.b.post(url(w, "revokeCert"), {"certificate": der_b64(w.cert)})


@case(403, "unauthorized")
def revoke_signed_by_a_key_that_is_not_the_certificates(w: World) -> Reply:
    return Client(w.ca).post(url(w, "revokeCert"), {"certificate": der_b64(w.cert)},
                             use_jwk=True)


@case(400, "malformed")
def revoke_something_not_a_certificate(w: World) -> Reply:
    return w.a.post(url(w, "revokeCert"), {"certificate": b64(b"garbage")})


@case(400, "badRevocationReason")
def revoke_with_certificate_hold(w: World) -> Reply:
    return w.a.post(url(w, "revokeCert"), {"certificate": der_b64(w.cert), "reason": 6})


@case(400, "badRevocationReason")
def revoke_with_a_reason_code_rfc_5280_does_not_have(w: World) -> Reply:
    return w.a.post(url(w, "revokeCert"), {"certificate": der_b64(w.cert), "reason": 7})


@case(400, "badRevocationReason")
def revoke_with_remove_from_crl(w: World) -> Reply:
    r = w.a.post(url(w, "revokeCert"), {"certificate": der_b64(w.cert), "reason": 8})
    # RFC 5280's code, for delta CRLs: not "not an RFC 5280 reason" (an ACME trial)
    assert "removeFromCRL" in r.json["detail"], r.body
    return r


@case(400, "badRevocationReason")
def revoke_with_a_reason_that_is_not_a_number(w: World) -> Reply:
    return w.a.post(url(w, "revokeCert"), {"certificate": der_b64(w.cert), "reason": "x"})


@case(400, "malformed")
def renewal_info_without_a_dot(w: World) -> Reply:
    r = w.a.session.get(f"{url(w, 'renewalInfo')}/abc")
    return Reply(r.status_code, r.headers, r.content)


@case(404, "malformed")
def renewal_info_of_no_certificate(w: World) -> Reply:
    aki, _ = cert_id(w.cert).split(".")
    serial = b64(bytes([1, 2]))
    r = w.a.session.get(f"{url(w, 'renewalInfo')}/{aki}.{serial}")
    return Reply(r.status_code, r.headers, r.content)


@case(404, "malformed")
def renewal_info_of_another_issuer(w: World) -> Reply:
    _, serial = cert_id(w.cert).split(".")
    r = w.a.session.get(f"{url(w, 'renewalInfo')}/{b64(b'x' * 20)}.{serial}")
    return Reply(r.status_code, r.headers, r.content)


def test_a_private_jwk_is_refused_without_its_private_member_quoted(world: World) -> None:
    """An HTTP trial: a jwk with a private "d" that is not its key's came back whole in
    the answer ("Could not decode 'jwk' ({'d': 'SECRET...'") and in the daemon's log.
    Refused as a private key before anything reads it, naming the member, not its
    value; and a jwk josepy cannot read is said in its words without the values."""
    w = world
    secret = b64(b"SECRETd" * 5)
    jwk = {**w.a.key.public_key().to_partial_json(), "d": secret}
    r = w.a.post(url(w, "newAccount"), {}, use_jwk=True, jwk=jwk)
    assert (r.status, r.problem) == (400, "badPublicKey"), r.body
    assert "private key (it has d)" in r.json["detail"] and secret not in r.body.decode()
    odd = {"kty": "EC", "crv": "P-256", "x": "SECRETx", "y": "AAAA"}
    r = w.a.post(url(w, "newAccount"), {}, use_jwk=True, jwk=odd)
    assert (r.status, r.problem) == (400, "malformed"), r.body
    assert "SECRETx" not in r.body.decode() and "Could not decode 'jwk'" in r.json["detail"]
    logged = "".join(w.ca.daemon.stderr)
    assert secret not in logged and "SECRETx" not in logged


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("name, make, status, kind", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world: World, name: str, make: Case, status: int, kind: str) -> None:
    r = make(world)
    assert (r.status, r.problem) == (status, kind), (name, r.status, r.body[:300])
    assert "Replay-Nonce" in r.headers  # a client can retry with a fresh nonce
    if kind == "badSignatureAlgorithm":  # RFC 8555 6.2: which algorithms to use instead
        assert "ES256" in r.json["algorithms"], r.json
    if status == 405:  # RFC 9110 15.5.6
        assert r.headers.get("Allow"), r.headers


# ---- fuzz ---------------------------------------------------------------------------------

b64s = st.one_of(st.binary(max_size=64).map(b64), st.text(max_size=40))
headers = st.dictionaries(
    st.sampled_from(["alg", "jwk", "kid", "nonce", "url", "crit", "b64", "x5c"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), b64s,
              st.sampled_from(["ES256", "RS256", "HS256", "none", "EdDSA"]),
              st.just({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
              st.just({"kty": "RSA", "n": "AQAB", "e": "AQAB"}),
              st.lists(st.text(max_size=5), max_size=3)), max_size=6)
jws_like = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda p, pl, s, extra: json.dumps({"protected": b64(json.dumps(p).encode()),
                                                  "payload": pl, "signature": s, **extra}
                                                 ).encode(),
              headers, b64s, b64s,
              st.dictionaries(st.sampled_from(["header", "signatures", "x"]),
                              st.one_of(st.none(), st.text(max_size=5)), max_size=1)),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                     max_size=3),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()))


@pytest.fixture(scope="module")
def inventory() -> Iterator[SQLiteStore]:
    with tempfile.TemporaryDirectory() as d:
        store = SQLiteStore(Path(d) / "inventory.sqlite3")
        yield store
        store.close()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=jws_like, want=st.sampled_from(["jwk", "kid", "either"]))
def test_the_jws_parser_answers_every_input_with_a_4xx_problem(inventory: SQLiteStore,
                                                               body: bytes, want: str) -> None:
    async def account_of(_id: str) -> AcmeAccount | None:
        return None

    async def run() -> None:
        await acme_jws.verify(body, acme_jws.JOSE_JSON, "https://ca.test/acme/new-order",
                              Nonces(inventory), want=want, account_of=account_of,
                              account_prefix="https://ca.test/acme/acct/")
    with pytest.raises(AcmeProblem) as exc:
        asyncio.run(run())
    assert 400 <= exc.value.status < 500, exc.value.document()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=jws_like, path=st.sampled_from(["new-account", "new-order", "revoke-cert",
                                            "key-change", "acct/x", "order/x/finalize",
                                            "chall/x", "cert/1"]))
def test_the_endpoints_answer_fuzz_with_4xx_problems(world: World, body: bytes,
                                                     path: str) -> None:
    r = world.a.session.post(f"{world.ca.url}/acme/{path}", data=body,
                             headers={"Content-Type": "application/jose+json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert r.json()["type"].startswith("urn:ietf:params:acme:error:")


def test_after_all_that_the_daemon_issues_and_the_log_verifies(world: World) -> None:
    order = world.a.order("acme1.test")
    world.a.validate_http01(order, world.responder)
    done = world.a.finalize(order, ["acme1.test"])
    assert done.json["status"] == "valid", done.body
    world.ca.daemon.stop()
    state = world.ca.daemon.state
    audit_verify(state, ok=True)
    log = (state / "audit" / "log.jsonl").read_text()
    assert "evil.example" not in "".join(
        line for line in log.splitlines() if '"hsm.sign"' in line)
