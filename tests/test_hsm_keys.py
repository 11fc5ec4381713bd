"""The keys `hsmca init` made can sign, and can never leave the token."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from ca import ra
from ca.config import KEY_LABELS
from ca.issuance import profiles as prof
from ca.issuance.issue import decision_context, sign_ca_cert
from ca.issuance.pipeline import SigningJob, SigningPipeline, SignResult
from ca.policy import Policy
from hsm.errors import HSMError, HSMUnavailable, SignatureCheckFailed
from hsm.session import HSM, KeyInfo, Scheme
from tests.conftest import require

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def session(worker: SigningPipeline, fn: Any) -> Any:
    """`fn(session)` on the signing thread, with raw PKCS#11 access."""
    return await worker.call(lambda hsm: hsm.session_call(fn))


def _find_private(session: Any, label: str) -> Any:
    return session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)


@pytest.mark.parametrize("label", list(KEY_LABELS.values()))
async def test_init_keys_are_non_exportable(worker: SigningPipeline, label: str) -> None:
    def attrs(session: Any) -> dict[str, bool]:
        key = _find_private(session, label)
        return {a.name: bool(key[a]) for a in (
            Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE, Attribute.NEVER_EXTRACTABLE, Attribute.MODIFIABLE)}

    got = await session(worker, attrs)
    assert got == {"TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "ALWAYS_SENSITIVE": True,
                   "EXTRACTABLE": False, "NEVER_EXTRACTABLE": True, "MODIFIABLE": False}


@pytest.mark.parametrize("label", list(KEY_LABELS.values()))
async def test_every_way_out_is_closed(worker: SigningPipeline, label: str) -> None:
    """Reading the value, wrapping, flipping EXTRACTABLE, copying as extractable: all fail."""

    def attempts(session: Any) -> dict[str, str]:
        key = _find_private(session, label)
        results: dict[str, str] = {}
        try:
            key[Attribute.VALUE if key.key_type != KeyType.RSA else
                Attribute.PRIVATE_EXPONENT]
            results["read"] = "allowed"
        except pkcs11.PKCS11Error as exc:
            results["read"] = type(exc).__name__
        wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                       template={Attribute.WRAP: True})
        try:
            wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            results["wrap"] = "allowed"
        except pkcs11.PKCS11Error as exc:
            results["wrap"] = type(exc).__name__
        try:
            key[Attribute.EXTRACTABLE] = True
            results["set"] = "allowed"
        except pkcs11.PKCS11Error as exc:
            results["set"] = type(exc).__name__
        try:
            key.copy({Attribute.EXTRACTABLE: True, Attribute.TOKEN: False})
            results["copy"] = "allowed"
        except pkcs11.PKCS11Error as exc:
            results["copy"] = type(exc).__name__
        return results

    results = await session(worker, attempts)
    assert "allowed" not in results.values(), results
    assert results["read"] == "AttributeSensitive"
    assert results["wrap"] == "KeyUnextractable"


async def test_key_generated_without_protection_is_refused(worker: SigningPipeline) -> None:
    """The start-up check: a key that could be exported is never used."""

    def weak(session: Any) -> None:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters(
                "secp256r1")}, local=True)
        params.generate_keypair(store=True, label="weak-key", id=b"weak-key",
                                private_template={Attribute.SENSITIVE: False,
                                                  Attribute.EXTRACTABLE: True})

    await session(worker, weak)
    with pytest.raises(HSMError, match="could leave the HSM"):
        await worker.load_key("weak-key")


def root_order(key: KeyInfo, name: str) -> ra.CACertOrder:
    ctx = decision_context(Policy(), ra.NoIssuers())
    order: ra.CACertOrder = ra.order(ctx, ra.Local(), ra.RootRequest(
        key.label, key.public_key, prof.name(name)))
    return order


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "ed25519", "rsa-3072"])
async def test_each_key_type_signs_certificates_that_verify(worker: SigningPipeline,
                                                            key_type: str) -> None:
    key = await worker.generate_key(f"lab-{key_type}", key_type)
    cert = await sign_ca_cert(worker, key, root_order(key, f"lab {key_type}"))
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


async def test_rsa_pss_and_crl_and_ocsp_builders_sign_with_hsm_keys(
        worker: SigningPipeline) -> None:
    rsa_key = await worker.generate_key("lab-pss", "rsa-3072")
    data = b"pss please"
    sig = await worker.sign(rsa_key.label, lambda k: k.sign(data, padding.PSS(
        padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256()),
        purpose="x509", actor="local")
    rsa_key.public_key.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                hashes.SHA256())

    ec_key = await worker.generate_key("lab-crl", "ec-p256")
    root = await sign_ca_cert(worker, ec_key, root_order(ec_key, "crl"))
    now = prof.utcnow()
    crl_builder = (x509.CertificateRevocationListBuilder().issuer_name(root.subject)
                   .last_update(now).next_update(now + dt.timedelta(hours=1)))
    crl = await worker.sign(ec_key.label, lambda k: crl_builder.sign(k, hashes.SHA256()),
                            purpose="crl", actor="local")
    assert crl.is_signature_valid(root.public_key())

    from cryptography.x509 import ocsp
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = prof.leaf_builder(prof.LeafProfile(leaf_key.public_key(), "leaf"), root, now,
                             now + dt.timedelta(hours=1)).sign(
        leaf_key, hashes.SHA256())  # signed in software: only its serial matters here
    resp_builder = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf, issuer=root, algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
        this_update=now, next_update=now + dt.timedelta(hours=1), revocation_time=None,
        revocation_reason=None).responder_id(ocsp.OCSPResponderEncoding.HASH, root)
    resp = await worker.sign(ec_key.label, lambda k: resp_builder.sign(k, hashes.SHA256()),
                             purpose="ocsp", actor="local")
    root.public_key().verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


async def test_ssh_certificate_from_hsm_key_passes_ssh_keygen(worker: SigningPipeline,
                                                              tmp_path: Path) -> None:
    ssh_keygen = require("ssh-keygen")
    ca_key = await worker.load_key("ssh-user-ca")
    user_key = ed25519.Ed25519PrivateKey.generate()
    now = int(dt.datetime.now(dt.UTC).timestamp())
    builder = (serialization.SSHCertificateBuilder()
               .public_key(user_key.public_key()).serial(42)
               .type(serialization.SSHCertificateType.USER).key_id(b"alice:42")
               .valid_principals([b"alice"]).valid_after(now - 60).valid_before(now + 3600)
               .add_extension(b"permit-pty", b""))
    cert = await worker.sign(ca_key.label, lambda k: builder.sign(k), purpose="ssh-user",
                             actor="local")
    path = tmp_path / "id-cert.pub"
    path.write_bytes(cert.public_bytes())
    out = subprocess.run([ssh_keygen, "-L", "-f", path], capture_output=True, text=True,
                         check=True).stdout
    assert "Key ID: \"alice:42\"" in out
    assert "Serial: 42" in out
    ca_fp = subprocess.run([ssh_keygen, "-l", "-f", "-"], input=ca_key.public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode(),
        capture_output=True, text=True, check=True).stdout.split()[1]
    assert f"Signing CA: ECDSA {ca_fp}" in out


async def test_the_hsm_signs_only_for_a_durable_intent_once(worker: SigningPipeline) -> None:
    """The HSM's own rules, whoever calls it: an intent line that is not durable gets no
    signature, a durable one gets exactly one, and no other thread gets in at all."""
    await worker.load_key("issuing-ca")
    scheme = Scheme("ecdsa", "sha256")
    audit = worker._audit
    beyond = audit.durable_size() + 1000
    with pytest.raises(HSMError, match="is not durable"):
        await worker.call(lambda hsm: hsm.sign("issuing-ca", scheme, b"x", beyond))
    seq = await audit.append("test.intent")
    sig = await worker.call(lambda hsm: hsm.sign("issuing-ca", scheme, b"x", seq))
    assert sig
    with pytest.raises(HSMError, match="signed for already"):
        await worker.call(lambda hsm: hsm.sign("issuing-ca", scheme, b"y", seq))
    with pytest.raises(HSMError, match="one thread per process"):
        await asyncio.to_thread(worker.hsm.sign, "issuing-ca", scheme, b"z",
                                await audit.append("test.intent"))
    # A key is made for a durable intent alone, like a signature (a kill left a key the
    # log never mentioned: a key lifecycle trial).
    with pytest.raises(HSMError, match="is not durable"):
        await worker.call(lambda hsm: hsm.generate("never-made", "ec-p256", beyond, "op"))
    found = await session(worker, lambda s: list(s.get_objects({Attribute.LABEL: "never-made"})))
    assert found == []


async def test_a_batch_is_signed_together_and_a_failure_stays_its_own(
        worker: SigningPipeline) -> None:
    """How the OCSP refresher signs (submit_all): each job gets its own result, in order.
    A job whose build fails gets its error, and an outcome line that says so; the jobs
    beside it are signed, audited and verify."""
    key: KeyInfo = await worker.load_key("issuing-ca")

    def good(msg: bytes) -> Any:
        return lambda k: k.sign(msg, ec.ECDSA(hashes.SHA256()))

    def broken(_k: Any) -> bytes:
        raise ValueError("a template that does not build")

    jobs = [SigningJob(key.label, "ocsp", "local", good(b"first"), {"n": 1}),
            SigningJob(key.label, "ocsp", "local", broken, {"n": 2}),
            SigningJob(key.label, "ocsp", "local", good(b"third"), {"n": 3})]
    first, failed, third = await worker.submit_all(jobs)
    assert isinstance(failed, ValueError) and "does not build" in str(failed)
    assert isinstance(first, SignResult) and isinstance(third, SignResult)
    key.public_key.verify(first.value, b"first", ec.ECDSA(hashes.SHA256()))
    key.public_key.verify(third.value, b"third", ec.ECDSA(hashes.SHA256()))
    start = min(first.intent_seq, third.intent_seq)
    lines = [json.loads(line) for line in worker._audit.read_lines(  # type: ignore[attr-defined]
        start, max(first.outcome_seq, third.outcome_seq) - start + 1).splitlines()]
    intents = {line["op_id"]: line["n"] for line in lines if line.get("phase") == "intent"}
    results = {intents[line["op_id"]]: line["result"] for line in lines
               if line.get("phase") == "outcome" and line["op_id"] in intents}
    assert results == {1: "ok", 2: "ValueError", 3: "ok"}


async def test_two_thousand_concurrent_signatures(worker: SigningPipeline) -> None:
    """What crashes SoftHSM without the single HSM thread: all must verify."""
    key: KeyInfo = await worker.load_key("issuing-ca")

    async def one(i: int) -> tuple[bytes, bytes]:
        msg = f"message {i}".encode()
        sig = await worker.sign(key.label, lambda k: k.sign(msg, ec.ECDSA(hashes.SHA256())),
                                purpose="x509", actor="local", request_id=str(i))
        return msg, sig

    results = await asyncio.gather(*(one(i) for i in range(2000)))
    pub = key.public_key
    for msg, sig in results:
        pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
    assert len({sig for _, sig in results}) == 2000


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519", "rsa-3072"])
async def test_a_signature_that_does_not_verify_is_never_released(
        worker: SigningPipeline, key_type: str) -> None:
    """A faulty HSM (here: the token's key is not the public half the HSM layer checks
    against) gives SignatureCheckFailed, and the outcome line says so instead of "ok"."""
    label = f"lab-{key_type}"
    try:
        real = await worker.load_key(label)
    except HSMError:
        real = await worker.generate_key(label, key_type)
    wrong = {"ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
             "ed25519": lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
             "rsa-3072": lambda: rsa.generate_private_key(65537, 3072).public_key()}[key_type]()

    def swap(hsm: HSM, pub: Any) -> None:
        hsm._keys[label] = dataclasses.replace(real, public_key=pub)

    def sign(k: Any) -> bytes:
        if key_type == "ed25519":
            return k.sign(b"m")  # type: ignore[no-any-return]
        if key_type.startswith("rsa"):
            return k.sign(b"m", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[no-any-return]
        return k.sign(b"m", ec.ECDSA(hashes.SHA256()))  # type: ignore[no-any-return]

    await worker.call(lambda hsm: swap(hsm, wrong))
    try:
        with pytest.raises(SignatureCheckFailed, match="does not verify with the public key"):
            await worker.sign(label, sign, purpose="x509", actor="local",
                              request_id=f"faulty-hsm-{key_type}")
    finally:
        await worker.call(lambda hsm: swap(hsm, real.public_key))
    lines = [json.loads(line) for line in worker._audit.path.read_bytes().splitlines()]
    intent = next(x for x in lines if x.get("request_id") == f"faulty-hsm-{key_type}")
    outcome = next(x for x in lines if x.get("op_id") == intent["op_id"]
                   and x.get("phase") == "outcome")
    assert outcome["result"] == "SignatureCheckFailed"
    assert "digest" not in outcome and "signature_digest" not in outcome
    # The thread is still usable with the right key.
    assert await worker.sign(label, sign, purpose="x509", actor="local")


async def test_session_closed_under_the_worker_recovers(worker: SigningPipeline) -> None:
    """A session closed from under the worker is found out by the next signature,
    re-opened and logged in again at once, and that signature still succeeds (a
    request must not fail for a session the HSM gives back); the audit log shows the
    error and the reconnect."""
    key = await worker.load_key("issuing-ca")
    before = worker.hsm.reconnects
    await session(worker, lambda s: s.close())
    sig = await worker.sign(key.label, lambda k: k.sign(b"m", ec.ECDSA(hashes.SHA256())),
                            purpose="x509", actor="local", request_id="after-close")
    key.public_key.verify(sig, b"m", ec.ECDSA(hashes.SHA256()))
    assert worker.hsm.reconnects == before + 1
    assert worker.healthy
    # The HSM events go through the writer's queue: a line queued after them is on
    # disk only once they are.
    await worker._audit.append("test.barrier")
    lines = [json.loads(line) for line in worker._audit.path.read_bytes().splitlines()]
    events = [(e["event"], e.get("result"), e.get("error")) for e in lines
              if e["event"] in ("hsm.error", "hsm.reconnect")]
    assert events[-2:] == [("hsm.error", None, "SessionHandleInvalid"),
                           ("hsm.reconnect", "ok", None)], events[-4:]
    op_id = next(i["op_id"] for i in lines if i.get("request_id") == "after-close")
    at = {(e["event"], e.get("phase"), e.get("result")): n for n, e in enumerate(lines)
          if e.get("op_id", op_id) == op_id}
    assert lines[at[("hsm.sign", "outcome", "ok")]]["op_id"] == op_id
    # In the order it happened: intent, the error, the reconnect, then the outcome.
    assert (at[("hsm.sign", "intent", None)] < at[("hsm.error", None, None)]
            < at[("hsm.reconnect", None, "ok")] < at[("hsm.sign", "outcome", "ok")])


async def test_a_flapping_session_backs_off_instead_of_reopening_at_once(
        worker: SigningPipeline) -> None:
    """A session that breaks again right after it was re-opened is not re-opened on the
    spot by every signature (each would log in twice and log six lines): the
    signature gets HSMUnavailable, and the session comes back after its back-off."""
    key = await worker.load_key("issuing-ca")

    async def sign() -> bytes:
        return await worker.sign(key.label, lambda k: k.sign(b"m", ec.ECDSA(hashes.SHA256())),
                                 purpose="x509", actor="local")

    default = worker.hsm.flap_window_s
    try:
        worker.hsm.flap_window_s = 0.0  # whatever the tests before did: nothing is flapping
        await session(worker, lambda s: s.close())
        await sign()  # re-opened at once
        reopened = worker.hsm.reconnects
        worker.hsm.flap_window_s = 3600.0  # and now it breaks again "right after"
        await session(worker, lambda s: s.close())
        with pytest.raises(HSMUnavailable):
            await sign()
        assert worker.hsm.reconnects == reopened and not worker.healthy
        await worker.probe()  # waits for the back-off (well under a second), re-opens
        assert worker.healthy and worker.hsm.reconnects == reopened + 1
        await sign()
    finally:
        worker.hsm.flap_window_s = default


@pytest.mark.parametrize("attr, value, name", [
    (Attribute.SENSITIVE, False, "sensitive"),
    (Attribute.EXTRACTABLE, True, "extractable"),
    (Attribute.MODIFIABLE, True, "modifiable"),
])
async def test_each_protective_attribute_alone_is_enforced(worker: SigningPipeline, attr: Attribute,
                                                           value: bool, name: str) -> None:
    label = f"single-{name}"

    def make(session: Any) -> None:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters(
                "secp256r1")}, local=True)
        template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                    Attribute.MODIFIABLE: False, attr: value}
        params.generate_keypair(store=True, label=label, id=label.encode(),
                                private_template=template)

    await session(worker, make)
    with pytest.raises(HSMError, match=f"has {name}="):
        await worker.load_key(label)


async def test_a_signature_whose_caller_gave_up_meanwhile_is_handed_over_as_dropped(
        worker: SigningPipeline) -> None:
    """A request cancelled once its signature was under way (a stop cancels the requests
    it waited 10 s for) left an "ok" certificate that nobody received, and nothing said
    so (a review). The pipeline hands it over (the worker notes it for the next start
    and revokes it), and its audit log gets a `sign.withheld` line."""
    import threading
    key: KeyInfo = await worker.load_key("issuing-ca")
    started, release = threading.Event(), threading.Event()

    def slow(k: Any) -> bytes:
        started.set()
        release.wait(60)  # the caller is cancelled meanwhile
        return k.sign(b"cancelled", ec.ECDSA(hashes.SHA256()))  # type: ignore[no-any-return]

    loop = asyncio.get_running_loop()
    dropped: asyncio.Future[tuple[str, str, int]] = loop.create_future()

    def taken(*item: Any) -> bool:
        dropped.set_result(item)
        return True
    worker.on_withheld = taken
    try:
        task = asyncio.create_task(worker.submit(SigningJob(
            key.label, "x509", "local", slow, {"serial": "5e1f0d"})))
        assert await asyncio.to_thread(started.wait, 60)
        task.cancel()
        release.set()
        purpose, serial, seq = await asyncio.wait_for(dropped, 60)
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        worker.on_withheld = None
        release.set()
    assert (purpose, serial) == ("x509", "5e1f0d")
    audit = worker._audit
    [intent] = [json.loads(x) for x in audit.read_lines(seq, 1).splitlines()]  # type: ignore[attr-defined]
    assert intent["serial"] == "5e1f0d"
    # The line comes from the signing thread: asking it something waits for it.
    await worker.call(lambda _hsm: None)
    lines = [json.loads(x) for x in audit.read_lines(  # type: ignore[attr-defined]
        seq, audit.durable_size() - seq).splitlines()]
    [withheld] = [x for x in lines if x["event"] == "sign.withheld"
                  and x["op_id"] == intent["op_id"]]
    assert withheld["released"] is False and "cancelled" in withheld["reason"], withheld
