"""The policy in force now decides: a name allowed yesterday and denied today gets
nothing more, on every path, from a real daemon after a restart or a SIGHUP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.client import make_csr
from tests.conftest import init_ca, require, start_daemon
from tests.helpers import audit_verify, bootstrap_token, http, log_lines

pytestmark = pytest.mark.asyncio(loop_scope="session")


def set_policy(config: Path, key: str, value: str) -> None:
    text = config.read_text()
    text, n = re.subn(rf"(?m)^{key} = (\[[^\]]*\]|.*)$", f"{key} = {value}", text)
    assert n == 1, f"{key} not in {config}"
    config.write_text(text)


async def test_a_name_denied_today_gets_no_renewal_and_no_ssh_host_certificate(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    set_policy(config, "allow", '["*.internal.example"]')
    d = start_daemon(ca.state)
    creds: dict[str, tuple[Path, Path]] = {}
    try:
        for role, name in (("service", "svc.internal.example"), ("host", "web1.internal.example")):
            token = await bootstrap_token(d, role, [name])
            key = ec.generate_private_key(ec.SECP256R1())
            status, _, raw = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                        body={"csr": make_csr([name], key)},
                                        headers={"Authorization": f"Bearer {token}"})
            assert status == 201, raw
            cert, key_path = tmp_path / f"{role}.pem", tmp_path / f"{role}.key"
            cert.write_text(json.loads(raw)["certificate"])
            key_path.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            creds[role] = cert, key_path
        subprocess.run([require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                        tmp_path / "hostkey"], check=True)
        host_pub = (tmp_path / "hostkey.pub").read_text()
        status, _, raw = await http("POST", f"{d.url}/v1/ssh/host", d.ssl(*creds["host"]),
                                    body={"public_key": host_pub})
        assert status == 201, raw
        # Outside the allow list, a token is refused, naming the list.
        status, _, raw = await http("POST", f"{d.url}/v1/tokens", d.admin_ssl(), body={
            "role": "service", "names": ["x.other.example"], "ttl": "15m"})
        assert status == 403 and json.loads(raw)["type"].endswith("name-not-allowed")
    finally:
        assert d.stop() == 0

    set_policy(config, "deny", '["svc.internal.example", "web1.internal.example"]')
    d = start_daemon(ca.state)
    try:
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(*creds["service"]),
                                    body={})
        problem = json.loads(raw)
        assert status == 403 and problem["type"].endswith("name-denied"), raw
        assert "'svc.internal.example'" in problem["detail"] and "deny" in problem["detail"]
        status, _, raw = await http("POST", f"{d.url}/v1/ssh/host", d.ssl(*creds["host"]),
                                    body={"public_key": host_pub})
        problem = json.loads(raw)
        assert status == 403 and problem["type"].endswith("name-denied"), raw
        assert "web1.internal.example" in problem["detail"]
        der = x509.load_pem_x509_csr(make_csr(["svc.internal.example"],
                                              ec.generate_private_key(ec.SECP256R1())).encode()
                                     ).public_bytes(serialization.Encoding.DER)
        status, _, raw = await http(
            "POST", f"{d.url}/.well-known/est/simplereenroll", d.ssl(*creds["service"]),
            data=base64.b64encode(der), headers={"Content-Type": "application/pkcs10"})
        assert status == 403 and json.loads(raw)["type"].endswith("name-denied"), raw
        # A name that was not denied still renews: the refusal is the rule, not the CA.
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.admin_ssl(), body={})
        assert status == 201, raw
    finally:
        assert d.stop() == 0


async def test_sighup_puts_a_new_policy_in_force_in_every_worker_and_refuses_a_broken_file(
        tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    config = ca.state / "hsmca.toml"
    set_policy(config, "allow", '["*.internal.example"]')
    started_with = config.read_text()
    d = start_daemon(ca.state, "--workers", "2")
    try:
        name = "svc.internal.example"
        token = await bootstrap_token(d, "service", [name])
        key = ec.generate_private_key(ec.SECP256R1())
        status, _, raw = await http("POST", f"{d.url}/v1/x509/enroll", d.ssl(),
                                    body={"csr": make_csr([name], key)},
                                    headers={"Authorization": f"Bearer {token}"})
        assert status == 201, raw
        cert, key_path = tmp_path / "svc.pem", tmp_path / "svc.key"
        cert.write_text(json.loads(raw)["certificate"])
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

        # Denied in the file, and a setting that only a restart changes.
        set_policy(config, "deny", f'["{name}"]')
        set_policy(config, "workers", "3")
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_stderr(lambda: any("in force in every process" in x for x in d.stderr)), \
            "".join(d.stderr)
        told = "".join(d.stderr)
        # named as the file names it, so the operator knows which line waits
        assert "next start" in told and '"settings": ["[server] workers"]' in told, told
        # Every worker decides by it: each renewal on a connection of its own.
        for _ in range(6):
            status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(cert, key_path),
                                        body={})
            problem = json.loads(raw)
            assert status == 403 and problem["type"].endswith("name-denied"), raw
        lines = log_lines(ca.state)
        [reload] = [x for x in lines if x["event"] == "policy.reload"]
        assert reload["changed"] == {"deny": [name]}
        assert reload["config_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()

        # A file that does not load changes nothing, and says where it is wrong.
        config.write_text(config.read_text().replace("[policy]", "[policy]\ndeny = [", 1))
        seen = len(d.stderr)
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_stderr(lambda: any("reload refused" in x for x in d.stderr[seen:])), \
            "".join(d.stderr[seen:])
        assert str(config) in "".join(d.stderr[seen:])
        status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(cert, key_path),
                                    body={})
        assert status == 403, raw
        status, _, _ = await http("GET", f"{d.url}/health", d.ssl())
        assert status == 200

        # A file that loads but holds what no policy can be: refused the same way,
        # naming the line. (Sent to the workers, it once broke their channel: every
        # later reload was recorded but reached none of them.)
        config.write_text(config.read_text().replace("[policy]\ndeny = [", "[policy]", 1))
        for key, value in (("allow", "[1]"), ("allow", '["*.internal.example "]'),
                           ("ssh-user-extensions", '["permit-ptyy"]')):
            before = config.read_text()
            set_policy(config, key, value)
            line = next(n for n, x in enumerate(config.read_text().splitlines(), 1)
                        if x.startswith(f"{key} = "))
            seen = len(d.stderr)
            d.proc.send_signal(signal.SIGHUP)
            assert d.wait_stderr(lambda seen=seen: any(  # type: ignore[misc]
                "reload refused" in x for x in d.stderr[seen:])), "".join(d.stderr[seen:])
            assert f"{config}:{line} [policy]: {key}" in "".join(d.stderr[seen:])
            config.write_text(before)
        # A file others may write is refused, as at the start, whatever it says; and so
        # is one another user owns, whatever its mode (a review).
        before = config.read_text()
        set_policy(config, "deny", "[]")
        for spoil, mend, said in ((lambda: config.chmod(0o666), lambda: config.chmod(0o600),
                                   "has mode 0666"),
                                  (lambda: os.chown(config, 65534, 65534),
                                   lambda: os.chown(config, 0, 0), "is owned by nobody")):
            spoil()
            seen = len(d.stderr)
            d.proc.send_signal(signal.SIGHUP)
            assert d.wait_stderr(lambda seen=seen: any(  # type: ignore[misc]
                "reload refused" in x for x in d.stderr[seen:])), "".join(d.stderr[seen:])
            assert said in "".join(d.stderr[seen:])
            status, _, raw = await http("POST", f"{d.url}/v1/x509/renew",
                                        d.ssl(cert, key_path), body={})
            assert status == 403, raw  # still denied
            mend()
        config.write_text(before)
        # The name allowed again (and [server] as at the start): every worker takes it,
        # and renews. A change to [policy] alone needs no restart, and is not told one (a
        # trial was told a setting called `written` waited for the next start).
        config.write_text(started_with)
        set_policy(config, "deny", '["other.internal.example"]')
        seen = len(d.stderr)
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_stderr(lambda: any("in force in every process" in x
                                         for x in d.stderr[seen:])), "".join(d.stderr[seen:])
        assert not any("next start" in x for x in d.stderr[seen:]), "".join(d.stderr[seen:])
        for _ in range(6):
            status, _, raw = await http("POST", f"{d.url}/v1/x509/renew", d.ssl(cert, key_path),
                                        body={})
            assert status == 201, raw
            cert.write_text(json.loads(raw)["certificate"])
    finally:
        assert d.stop() == 0
    audit_verify(ca.state, ok=True)
